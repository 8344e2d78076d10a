// The registry of plugin factories and the loader that fills it from shared libraries.
#pragma once

#include <concord/args.h>
#include <concord/plugin_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace concord {

enum class Kind { Dataset, Model, Harmonizer, Adapter, Aggregator, Filter, Metric };
const char* kind_name(Kind k);                                // "dataset", ...
std::optional<Kind> kind_from_name(const std::string& name);  // inverse
std::vector<Kind> all_kinds();

// Base of every plugin object; its virtual destructor is defined in libconcord so that
// dynamic_cast works across dlopen'ed libraries.
class Plugin {
 public:
  virtual ~Plugin();
};

// What a plugin may read when it is built.
struct BuildContext {
  uint64_t seed = 0;     // the pipeline's seed (derive, never use raw time)
  std::string instance;  // e.g. "harmonizers[1]" or a site name, for error messages
};

using Factory = std::function<std::unique_ptr<Plugin>(const Args&, const BuildContext&)>;

struct PluginDesc {
  PluginDesc() = default;
  PluginDesc(Kind kind, std::string name, std::string summary, std::vector<ArgSpec> args,
             Factory make, std::vector<std::string> default_for = {})
      : kind(kind),
        name(std::move(name)),
        summary(std::move(summary)),
        args(std::move(args)),
        make(std::move(make)),
        default_for(std::move(default_for)) {}
  Kind kind = Kind::Dataset;
  std::string name;     // unique within its kind, e.g. "fedavg"
  std::string summary;  // one line
  std::vector<ArgSpec> args;
  Factory make;
  // Where the plugin is used when a pipeline names none of its kind: an aggregator declares
  // {"aggregator"}; a metric the tasks it is a default for ({"classification"}, {"segmentation"}).
  // Core names no plugin: these declarations are the defaults.
  std::vector<std::string> default_for;
  std::string library;          // filled by the loader: file it came from
  std::string library_version;  // filled by the loader
};

// Convenience for a plugin class T constructible from (const Args&, const BuildContext&).
template <class T>
Factory factory_of() {
  return [](const Args& a, const BuildContext& c) -> std::unique_ptr<Plugin> {
    return std::make_unique<T>(a, c);
  };
}

class Registry {
 public:
  // Adds a factory; refuses a duplicate (kind, name) naming both library files.
  void add(PluginDesc desc);
  const PluginDesc* find(Kind kind, const std::string& name) const;
  const PluginDesc& get(Kind kind, const std::string& name) const;  // throws with did-you-mean
  std::vector<const PluginDesc*> list(std::optional<Kind> kind = std::nullopt) const;
  std::vector<std::string> names(Kind kind) const;
  // The plugins of `kind` that declare themselves a default for `use` (PluginDesc::default_for),
  // in name order.
  std::vector<const PluginDesc*> defaults(Kind kind, const std::string& use) const;
  // Closest registered name (edit distance), or "" when nothing is close.
  std::string suggest(Kind kind, const std::string& name) const;

  // Builds a plugin and checks it has the interface T. Throws Error naming the plugin.
  template <class T>
  std::unique_ptr<T> create(Kind kind, const std::string& name, const Args& args,
                            const BuildContext& ctx = {}) const {
    std::unique_ptr<Plugin> p = get(kind, name).make(args, ctx);
    if (auto* t = dynamic_cast<T*>(p.get())) {
      p.release();
      return std::unique_ptr<T>(t);
    }
    throw Error(std::string("plugin '") + name + "' (" + kind_name(kind) +
                ") does not implement the expected interface");
  }

  // Set by the loader while a library registers, so descriptors record their file.
  void set_current_library(std::string file, std::string version);

 private:
  std::map<std::pair<Kind, std::string>, PluginDesc> plugins_;
  std::string current_library_ = "<built into the executable>";
  std::string current_version_;
};

// The candidate closest to `name` by edit distance, or "" when none is close (did-you-mean).
std::string closest_name(const std::string& name, const std::vector<std::string>& candidates);

// One library that could not be loaded, or one search-path entry that was skipped, and why.
struct LoadFailure {
  std::string file;
  std::string reason;
  bool path_entry = false;  // a skipped search-path entry (a warning), not a refused library
};

// Loads plugin libraries with dlopen, always by absolute path. Libraries stay loaded for the
// process lifetime.
//
// Code is loaded only from places no other user can change (as ssh and sudo check their
// files): a library, the folder scanned for it and every folder above must be owned by root,
// by the user running Concord, or by the owner of libconcord itself (who already decides what
// code runs); none may be world-writable, except sticky folders above the plugin folder (/tmp).
// A folder scanned for plugins may not be world-writable even when sticky: anyone could add a
// library to it. CONCORD_ALLOW_INSECURE_PLUGINS=1 turns these checks into warnings.
class PluginLoader {
 public:
  explicit PluginLoader(Registry& registry) : registry_(registry) {}
  // Loads one file; throws Error naming the file on any refusal (bad file, missing symbol, null
  // entry points, API or ABI mismatch, duplicate plugin name, insecure ownership or mode).
  void load_file(const std::string& file);
  // Loads every *.so in each folder (non-recursive). Failures are returned, not thrown, so one
  // broken third-party library does not hide the others; callers must report them.
  std::vector<LoadFailure> load_dirs(const std::vector<std::string>& dirs);
  const std::vector<std::string>& loaded() const { return loaded_; }

 private:
  Registry& registry_;
  std::vector<std::string> loaded_;
};

// Why `path` (a plugin library, or with `scanned_folder` a folder whose libraries are all
// loaded) may not be trusted to hold code, naming the file or folder at fault; "" when it may.
std::string untrusted_plugin_location(const std::string& path, bool scanned_folder);

// Default search path, every entry absolute: the built-in plugin folder (next to libconcord,
// then next to the executable, then the install prefix), then CONCORD_PLUGIN_PATH
// (colon-separated), then `extra` (from --plugin-path). Nothing is ever taken from the current
// folder implicitly: empty CONCORD_PLUGIN_PATH entries ("a::b", a trailing ':') are ignored and
// relative ones are skipped (the variable outlives the folder it was set in); a relative
// `extra` entry is what the user typed and is resolved against the current folder once, here.
// Skipped and nonexistent entries are appended to `skipped` (path_entry = true) when given.
std::vector<std::string> plugin_search_path(const std::vector<std::string>& extra = {},
                                            std::vector<LoadFailure>* skipped = nullptr);

// The process-wide registry used by the CLI: loads the search path once.
Registry& global_registry();
// Loads the search path into `registry`; returns every refused library and skipped entry.
std::vector<LoadFailure> load_plugins(Registry& registry, const std::vector<std::string>& extra);

}  // namespace concord
