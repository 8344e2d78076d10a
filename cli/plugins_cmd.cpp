// `concord plugins [--kind K] [NAME]`: what is loaded, from which file, with every argument.
#include "commands.h"

#include <concord/registry.h>

#include <algorithm>
#include <iostream>

namespace concord::cli {

static void print_plugin(const PluginDesc& d, bool detailed) {
  std::cout << kind_name(d.kind) << " " << d.name << " — " << d.summary << "\n";
  if (!detailed) return;
  std::cout << "  library: " << d.library
            << (d.library_version.empty() ? "" : " (version " + d.library_version + ")") << "\n";
  if (d.args.empty()) std::cout << "  arguments: none\n";
  for (const auto& a : d.args) {
    std::cout << "  " << a.name << " : " << a.type_str() << " = " << a.default_str() << "\n"
              << "      " << a.doc << "\n";
  }
}

void add_plugins_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand("plugins", "List loaded plugins and their arguments");
  auto kind = std::make_shared<std::string>();
  auto name = std::make_shared<std::string>();
  auto brief = std::make_shared<bool>(false);
  sub->add_option("--kind", *kind,
                  "Only this kind (dataset, model, harmonizer, adapter, "
                  "aggregator, filter, metric)");
  sub->add_option("name", *name, "Show only the plugin with this name");
  sub->add_flag("--brief", *brief, "One line per plugin");
  sub->callback([&g, kind, name, brief] {
    // Refused libraries are listed again after the listing, whatever the filter: their
    // plugins are missing from it, which a filtered listing would not make obvious.
    const auto& failures = load_all_plugins(g);
    const size_t refused = std::count_if(failures.begin(), failures.end(),
                                         [](const LoadFailure& f) { return !f.path_entry; });
    std::optional<Kind> k;
    if (!kind->empty()) {
      k = kind_from_name(*kind);
      if (!k) throw Error("unknown plugin kind '" + *kind + "'");
    }
    int shown = 0;
    for (const PluginDesc* d : global_registry().list(k)) {
      if (!name->empty() && d->name != *name) continue;
      print_plugin(*d, !*brief);
      ++shown;
    }
    if (refused) {
      std::cerr << refused << " plugin librar" << (refused == 1 ? "y" : "ies")
                << " could not be loaded (their plugins are not listed):\n";
      for (const auto& f : failures)
        if (!f.path_entry) std::cerr << "  " << f.file << "\n";
    }
    if (shown == 0 && !name->empty()) {
      std::string hint;
      for (Kind kk : all_kinds()) {
        std::string s = global_registry().suggest(kk, *name);
        if (!s.empty()) hint = " (did you mean '" + s + "'?)";
      }
      throw Error("no plugin named '" + *name + "'" + hint);
    }
    if (refused) throw Exit{1};
  });
}

}  // namespace concord::cli
