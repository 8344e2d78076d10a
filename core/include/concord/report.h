// HTML reports a person can open: a run's report (`concord run`, `concord report RUN_DIR`), a
// comparison of runs (`concord compare`) and the HTML form of `concord harmonize apply --report`.
//
// Every page is one self-contained file that opens offline: the charts are drawn by Debian's
// libjs-chart.js, inlined into the page, from data embedded as JSON; images are inlined as
// base64 PNG; a Content-Security-Policy forbids every network request. Everything read from a
// run folder (site names, pipeline text, notes, file names) is untrusted: it reaches the page
// only HTML-escaped (html_escape) or as JSON inside a script element (script_json), and the
// page's script puts text on canvases or into textContent, never into innerHTML.
//
// Each page ends with a hidden <pre id="concord-check">: its script writes there, as JSON, what
// it drew (per chart: datasets, drawn datasets, non-blank pixels), the final table's cells,
// the errors it saw (window errors, console.error, CSP violations) and every resource the page
// loaded. The browser tests (tests/report) read it from the rendered DOM.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace concord::report {

// `text` for HTML element content and quoted attribute values: & < > " ' escaped.
std::string html_escape(std::string_view text);
// `j` as JSON text safe inside <script type="application/json">: <, >, & and the line
// separators U+2028 / U+2029 are written as \u escapes (a site named "</script>" cannot end it).
std::string script_json(const nlohmann::json& j);
// RFC 4648 base64 (with padding).
std::string base64(const void* data, size_t size);

// The Chart.js library (Debian's libjs-chart.js: /usr/share/javascript/chart.js/chart.min.js,
// or the file named by CONCORD_CHART_JS). Throws naming the path and the package when absent.
std::string chart_js();

// A run folder as `concord run` leaves it. summary.json is absent while a run has not finished.
struct RunFolder {
  std::string dir;
  std::string pipeline_yaml;
  nlohmann::json summary;             // null when there is no summary.json
  std::vector<nlohmann::json> lines;  // metrics.jsonl, one object per line
  nlohmann::json harmonization;       // harmonization.json (site shift), or null
  struct Figure {
    std::string name;  // file name in the run folder
    std::string png;   // bytes
  };
  std::vector<Figure> figures;  // the run folder's *.png (montages written by plugins)
};

// Reads DIR. Throws naming DIR when it is not a run folder (no pipeline.yaml or metrics.jsonl)
// and naming FILE:LINE for a line of metrics.jsonl that is not a JSON object.
RunFolder read_run_folder(const std::string& dir);

// The final per-site results: summary.json's, or (unfinished run) the last evaluation of each
// site in metrics.jsonl.
struct SiteResult {
  std::string site;
  bool held_out = false;
  std::map<std::string, double> global, personalized;  // NaN: undefined
};
struct FinalResults {
  std::vector<SiteResult> sites;
  std::vector<std::string> metrics;  // in the order of the first site that has them
  bool finished = false;             // from summary.json
};
FinalResults final_results(const RunFolder& run);
// The mean and the worst (lowest) value over the sites that are not held out and whose value is
// defined, as `concord run` computes them; NaN when there is none.
double site_mean(const FinalResults& r, const std::string& metric, bool personalized);
double site_worst(const FinalResults& r, const std::string& metric, bool personalized);

// The page for one run; `chart_js` is the library text (chart_js()).
std::string render_run_report(const RunFolder& run, const std::string& chart_js);
// Reads DIR and writes DIR/report.html atomically (or `out` when given); returns the path.
std::string write_run_report(const std::string& dir, const std::string& out = "");

// --- comparing runs --------------------------------------------------------------------------

// Mean and sample standard deviation (n - 1) of the defined (non-NaN) values; sd is 0 for one
// value and mean NaN for none.
struct MeanSd {
  double mean = 0, sd = 0;
  int n = 0;
};
MeanSd mean_sd(const std::vector<double>& values);
// "0.712", "0.712 ± 0.021" (n > 1) or "-" (n = 0), with `digits` decimals.
std::string format_mean_sd(const MeanSd& m, int digits = 3);

// The pipeline without the keys that do not change the experiment's definition (seed, output):
// two runs with equal identities are seeds of the same pipeline. Throws on invalid YAML.
std::string pipeline_identity(const std::string& yaml);
int64_t run_seed(const RunFolder& run);

// Runs grouped by pipeline identity, in order of first appearance.
struct RunGroup {
  std::string label;  // the run folder, or the folders' common path with the seeds
  std::vector<size_t> runs;
  std::vector<int64_t> seeds;
};
std::vector<RunGroup> group_runs(const std::vector<RunFolder>& runs);

// One metric's final values: a row per group, a column per site, then mean and worst site.
struct CompareTable {
  std::string metric;
  bool personalized = false;
  std::vector<std::string> sites;
  struct Row {
    std::string label;
    size_t runs = 0;
    std::vector<MeanSd> sites;  // as CompareTable::sites
    MeanSd mean, worst;
  };
  std::vector<Row> rows;
};
CompareTable compare_table(const std::vector<RunFolder>& runs, const std::vector<RunGroup>& groups,
                           const std::string& metric, bool personalized);
// The metrics every run reports (in the first run's order), or an error naming the run that
// lacks `wanted` when it is given.
std::vector<std::string> compare_metrics(const std::vector<RunFolder>& runs,
                                         const std::string& wanted);
std::string format_compare_table(const CompareTable& t);  // terminal text
std::string render_compare_report(const std::vector<RunFolder>& runs,
                                  const std::vector<RunGroup>& groups,
                                  const std::vector<std::string>& metrics,
                                  const std::string& chart_js);

// --- harmonization ---------------------------------------------------------------------------

// The HTML form of `concord harmonize apply --report`'s JSON: counts, failures, site shift
// before/after (table and chart) and the before/after montage (PNG bytes, may be empty).
std::string render_harmonize_report(const nlohmann::json& report, const std::string& montage_png,
                                    const std::string& chart_js);

}  // namespace concord::report
