// `concord plugins [--kind K] [NAME]`: what is loaded, from which file, with every argument.
#include "commands.h"

#include <concord/registry.h>

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
    load_all_plugins(g);
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
    if (shown == 0 && !name->empty()) {
      std::string hint;
      for (Kind kk : all_kinds()) {
        std::string s = global_registry().suggest(kk, *name);
        if (!s.empty()) hint = " (did you mean '" + s + "'?)";
      }
      throw Error("no plugin named '" + *name + "'" + hint);
    }
  });
}

}  // namespace concord::cli
