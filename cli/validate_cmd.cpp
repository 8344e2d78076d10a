// `concord validate FILE [--set k=v]...`: every problem at once, with FILE:LINE:COL.
#include "commands.h"

#include <concord/pipeline.h>

#include <iostream>

namespace concord::cli {

// Shared with `run`: loads plugins and the pipeline; prints diagnostics and exits 1 on errors.
PipelineConfig load_or_report(const Globals& g, const std::string& file,
                              const std::vector<std::string>& overrides) {
  load_all_plugins(g);
  try {
    return load_pipeline(file, overrides, global_registry());
  } catch (const ValidationError& e) {
    for (const auto& d : e.diagnostics()) std::cerr << d.str() << "\n";
    std::cerr << e.diagnostics().size() << " error" << (e.diagnostics().size() == 1 ? "" : "s")
              << " in " << file << "\n";
    throw Exit{1};
  }
}

void add_validate_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand("validate", "Check a pipeline file without running anything");
  auto file = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto print = std::make_shared<bool>(false);
  sub->add_option("file", *file, "Pipeline YAML file")->required();
  sub->add_option("--set", *sets, "Override a key, e.g. --set training.lr=1e-3 (repeatable)");
  sub->add_flag("--print", *print, "Print the resolved pipeline (every default filled in)");
  sub->callback([&g, file, sets, print] {
    PipelineConfig c = load_or_report(g, *file, *sets);
    if (*print) std::cout << c.resolved_yaml;
    std::cout << *file << ": ok (" << c.name << ": " << c.data.dataset.type << ", " << c.model.type
              << ", " << c.harmonizers.size() << " harmonizer(s), "
              << (c.adapter ? c.adapter->type : std::string("no adapter")) << ", "
              << c.aggregator.type << ", " << c.federation.rounds << " rounds)\n";
  });
}

}  // namespace concord::cli
