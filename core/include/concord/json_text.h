// JSON text for the files Concord writes (summary.json, metrics.jsonl, reports). Their strings
// come from data and peers (site names, file names, error messages) and may hold any bytes:
// invalid UTF-8 is written as U+FFFD instead of throwing when the file is written.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>

namespace concord {

// `j` as text (indent < 0: one line), never throwing on invalid UTF-8.
std::string json_text(const nlohmann::json& j, int indent = -1);

}  // namespace concord
