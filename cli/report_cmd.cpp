// `concord report RUN_DIR` (rebuild a run's report.html) and `concord compare RUN_DIR...`.
#include "commands.h"

#include <concord/message.h>
#include <concord/report.h>

#include <iostream>

namespace concord::cli {

void add_report_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand("report", "Write a run folder's report.html again");
  struct Opts {
    std::string run_dir, out;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("run_dir", o->run_dir, "Run folder (written by `concord run`)")->required();
  sub->add_option("--out", o->out, "Write the page here instead of RUN_DIR/report.html");
  sub->callback([o] {
    const std::string path = report::write_run_report(o->run_dir, o->out);
    std::cout << "report: " << path << "\n";
  });
}

void add_compare_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand(
      "compare", "Compare runs: final results per site, mean and worst site; curves overlaid");
  sub->footer(
      "Runs of the same pipeline that differ only in their seed are one row: mean ± sample "
      "standard deviation over the seeds.\n");
  struct Opts {
    std::vector<std::string> runs;
    std::string metric, html;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("runs", o->runs, "Run folders")->required();
  sub->add_option("--metric", o->metric, "Only this metric (default: every metric all runs have)");
  sub->add_option("--html", o->html, "Also write an HTML page with the runs' curves overlaid");
  sub->callback([o] {
    std::vector<report::RunFolder> runs;
    for (const auto& d : o->runs) runs.push_back(report::read_run_folder(d));
    // Read the library before the work, so a missing package is reported first.
    const std::string js = o->html.empty() ? "" : report::chart_js();
    const auto groups = report::group_runs(runs);
    const auto metrics = report::compare_metrics(runs, o->metric);
    if (metrics.empty()) throw Error("the runs have no metric in common");
    bool personalized = false;
    for (const auto& r : runs)
      for (const auto& s : report::final_results(r).sites)
        personalized = personalized || !s.personalized.empty();
    for (size_t g = 0; g < groups.size(); ++g)
      if (groups[g].runs.size() > 1) {
        std::cout << "seeds of one pipeline: " << groups[g].label << "\n";
      }
    for (const auto& m : metrics)
      for (int p = 0; p < (personalized ? 2 : 1); ++p)
        std::cout << "\n"
                  << report::format_compare_table(report::compare_table(runs, groups, m, p == 1));
    if (!o->html.empty()) {
      write_file_atomic(o->html, report::render_compare_report(runs, groups, metrics, js));
      std::cout << "\ncomparison: " << o->html << "\n";
    }
  });
}

}  // namespace concord::cli
