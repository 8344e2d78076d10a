// The HTML reports the CLI writes beside its other outputs (see concord/report.h).
#pragma once

#include "harmonize_report.h"

#include <concord/pipeline.h>

#include <nlohmann/json.hpp>

#include <string>

namespace concord::cli {

// After `concord run` of a pipeline with harmonizers: the harmonization phase replayed (it is
// deterministic: --resume relies on it) without a model, and its site shift before/after and
// before/after montage written to RUN_DIR/harmonization.json and harmonization.png, which the
// report shows. Costs the dataset build and harmonizer fit once more; a failure is a warning.
void write_run_harmonization(const PipelineConfig& config, const std::string& run_dir);

// After `concord run`: RUN_DIR/report.html. A report that cannot be written (no Chart.js) is a
// warning, not a failed run: the results are on disk and `concord report RUN_DIR` retries.
void write_run_report_after_run(const std::string& run_dir);

// `concord harmonize apply --report FILE.json`: the HTML form beside it (FILE.html), with the
// montage of `shift` (up to `per_site` pairs per site) inlined. Returns the path written.
std::string write_harmonize_report_html(const std::string& json_report, const nlohmann::json& rep,
                                        const SiteShiftReport& shift, int per_site);

}  // namespace concord::cli
