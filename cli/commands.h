// The `concord` subcommands. Each file adds one subcommand to the CLI11 app.
#pragma once

#include <concord/pipeline.h>
#include <concord/registry.h>

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

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

void add_run_command(CLI::App& app, Globals& g);
void add_validate_command(CLI::App& app, Globals& g);
void add_plugins_command(CLI::App& app, Globals& g);
void add_harmonize_command(CLI::App& app, Globals& g);
void add_report_command(CLI::App& app, Globals& g);   // report_cmd.cpp
void add_compare_command(CLI::App& app, Globals& g);  // report_cmd.cpp
void add_provision_command(CLI::App& app, Globals& g);
void add_audit_command(CLI::App& app, Globals& g);  // audit_cmd.cpp

}  // namespace concord::cli
