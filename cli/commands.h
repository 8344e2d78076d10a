// The `concord` subcommands. Each file adds one subcommand to the CLI11 app.
#pragma once

#include <concord/pipeline.h>
#include <concord/registry.h>

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace concord {
class Experiment;
struct RunSummary;
}  // namespace concord

namespace concord::cli {

struct Globals {
  std::vector<std::string> plugin_paths;  // --plugin-path (repeatable)
  bool verbose = false;
  bool quiet = false;
};

// Thrown by a subcommand to end the process with this status after it printed its own report.
struct Exit {
  int code;
};

// Loads the built-in plugins, CONCORD_PLUGIN_PATH and --plugin-path into the global registry
// (once); logs refused libraries (errors) and skipped path entries (warnings) and returns them.
const std::vector<LoadFailure>& load_all_plugins(const Globals& g);

// Loads the plugins and the pipeline FILE with `--set` overrides; on validation errors prints
// every diagnostic (FILE:LINE:COL) and throws Exit{1}. Defined in validate_cmd.cpp.
PipelineConfig load_or_report(const Globals& g, const std::string& file,
                              const std::vector<std::string>& overrides);

// `concord run`'s body for any Experiment, simulated or with remote sites (run_cmd.cpp): the run
// folder (a fresh <output>/<name>[-N] when run_dir is empty), progress bar, SIGINT/SIGTERM (stop
// after the round: Exit{130}), the results table and report.html; Exit{1} when the run has
// failures.
struct RunRequest {
  std::string run_dir;
  bool resume = false;
  bool no_progress = false;
  std::string resume_command = "concord run --resume";   // printed when stopped
  std::function<void(int round)> after_round;            // after each round's checkpoint
  std::function<void(const RunSummary&)> after_run;      // when run() returns
  std::function<void(const RunSummary&)> before_report;  // after the table, before report.html
};
RunSummary run_experiment(Experiment& exp, const PipelineConfig& config, const RunRequest& r);
// The pipeline file of `command FILE` or `command --resume RUN_DIR` (RUN_DIR/pipeline.yaml).
std::string run_pipeline_file(const std::string& command, const std::string& file,
                              const std::string& resume);

void add_run_command(CLI::App& app, Globals& g);
void add_server_command(CLI::App& app, Globals& g);  // federation_cmd.cpp
void add_site_command(CLI::App& app, Globals& g);    // federation_cmd.cpp
void add_validate_command(CLI::App& app, Globals& g);
void add_plugins_command(CLI::App& app, Globals& g);
void add_harmonize_command(CLI::App& app, Globals& g);
void add_report_command(CLI::App& app, Globals& g);   // report_cmd.cpp
void add_compare_command(CLI::App& app, Globals& g);  // report_cmd.cpp
void add_provision_command(CLI::App& app, Globals& g);
void add_audit_command(CLI::App& app, Globals& g);  // audit_cmd.cpp

}  // namespace concord::cli
