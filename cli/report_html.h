// The HTML reports the CLI writes beside its other outputs (see concord/report.h).
#pragma once

#include "harmonize_report.h"

#include <nlohmann/json.hpp>

#include <string>

namespace concord::cli {

// After `concord run`: RUN_DIR/report.html. A report that cannot be written (no Chart.js) is a
// warning, not a failed run: the results are on disk and `concord report RUN_DIR` retries.
void write_run_report_after_run(const std::string& run_dir);

// `concord harmonize apply --report FILE.json`: the HTML form beside it (FILE.html), with the
// montage of `shift` (up to `per_site` pairs per site) inlined. Returns the path written.
std::string write_harmonize_report_html(const std::string& json_report, const nlohmann::json& rep,
                                        const SiteShiftReport& shift, int per_site);

}  // namespace concord::cli
