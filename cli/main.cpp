// concord: run, validate and inspect federated pipelines; harmonize datasets offline.
#include "commands.h"

#include <concord/error.h>
#include <concord/registry.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>

#include <unistd.h>

namespace concord::cli {

const std::vector<LoadFailure>& load_all_plugins(const Globals& g) {
  static bool loaded = false;
  static std::vector<LoadFailure> failures;
  if (loaded) return failures;
  loaded = true;
  failures = load_plugins(global_registry(), g.plugin_paths);
  for (const auto& f : failures) {
    if (f.path_entry)
      spdlog::warn("plugin path {}: {}", f.file, f.reason);
    else
      spdlog::error("plugin {}: {}", f.file, f.reason);
  }
  return failures;
}

}  // namespace concord::cli

int main(int argc, char** argv) {
  using namespace concord::cli;
  // LibTorch's OpenMP threads spin while waiting by default; on a busy 2-core machine that
  // made training 4-5x slower. libgomp reads the policy at load time, so set it and re-exec;
  // only `run` and `site` train, and the re-exec costs ~0.3 s of start-up, so only for them.
  const bool trains = std::any_of(argv + 1, argv + argc, [](const char* a) {
    return std::string(a) == "run" || std::string(a) == "site";
  });
  if (trains && !std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);  // on failure, carry on with the default policy
  }
  CLI::App app{"Concord: federated learning on medical images, with harmonization"};
  app.set_version_flag("--version", std::string("concord ") + CONCORD_VERSION);
  app.require_subcommand(1);
  Globals g;
  app.add_option("--plugin-path", g.plugin_paths,
                 "Extra plugin library or folder (repeatable; also CONCORD_PLUGIN_PATH)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.fallthrough();  // global options may follow the subcommand
  app.add_flag("-v,--verbose", g.verbose, "Debug logging");
  app.add_flag("-q,--quiet", g.quiet, "Warnings and errors only");
  app.parse_complete_callback([&] {
    spdlog::set_level(g.verbose ? spdlog::level::debug
                      : g.quiet ? spdlog::level::warn
                                : spdlog::level::info);
    spdlog::set_pattern("[%H:%M:%S] %^%l%$ %v");
  });
  add_run_command(app, g);
  add_validate_command(app, g);
  add_plugins_command(app, g);
  add_harmonize_command(app, g);
  add_report_command(app, g);
  add_compare_command(app, g);
  add_provision_command(app, g);
  add_server_command(app, g);
  add_site_command(app, g);
  add_audit_command(app, g);
  try {
    app.parse(argc, argv);
  } catch (const Exit& e) {
    return e.code;
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const concord::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
