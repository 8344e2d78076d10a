#include <concord/registry.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace fs = std::filesystem;

namespace concord {

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Dataset:
      return "dataset";
    case Kind::Model:
      return "model";
    case Kind::Harmonizer:
      return "harmonizer";
    case Kind::Adapter:
      return "adapter";
    case Kind::Aggregator:
      return "aggregator";
    case Kind::Filter:
      return "filter";
    case Kind::Metric:
      return "metric";
  }
  return "?";
}

std::vector<Kind> all_kinds() {
  return {Kind::Dataset,    Kind::Model,  Kind::Harmonizer, Kind::Adapter,
          Kind::Aggregator, Kind::Filter, Kind::Metric};
}

std::optional<Kind> kind_from_name(const std::string& name) {
  for (Kind k : all_kinds())
    if (name == kind_name(k)) return k;
  return std::nullopt;
}

void Registry::set_current_library(std::string file, std::string version) {
  current_library_ = std::move(file);
  current_version_ = std::move(version);
}

void Registry::add(PluginDesc desc) {
  desc.library = current_library_;
  desc.library_version = current_version_;
  auto key = std::make_pair(desc.kind, desc.name);
  auto it = plugins_.find(key);
  if (it != plugins_.end())
    throw Error(std::string("duplicate ") + kind_name(desc.kind) + " plugin '" + desc.name +
                "': registered by " + it->second.library + " and again by " + desc.library);
  if (!desc.make)
    throw Error("plugin '" + desc.name + "' from " + desc.library + " has no factory");
  plugins_.emplace(key, std::move(desc));
}

const PluginDesc* Registry::find(Kind kind, const std::string& name) const {
  auto it = plugins_.find({kind, name});
  return it == plugins_.end() ? nullptr : &it->second;
}

const PluginDesc& Registry::get(Kind kind, const std::string& name) const {
  if (const PluginDesc* d = find(kind, name)) return *d;
  std::string msg = std::string("unknown ") + kind_name(kind) + " plugin '" + name + "'";
  std::string s = suggest(kind, name);
  if (!s.empty()) msg += " (did you mean '" + s + "'?)";
  auto all = names(kind);
  if (!all.empty()) {
    msg += "; available:";
    for (const auto& n : all) msg += " " + n;
  }
  throw Error(msg);
}

std::vector<const PluginDesc*> Registry::list(std::optional<Kind> kind) const {
  std::vector<const PluginDesc*> out;
  for (const auto& [key, d] : plugins_)
    if (!kind || key.first == *kind) out.push_back(&d);
  return out;
}

std::vector<std::string> Registry::names(Kind kind) const {
  std::vector<std::string> out;
  for (const auto& [key, d] : plugins_)
    if (key.first == kind) out.push_back(key.second);
  return out;
}

static size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest_name(const std::string& name, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(3, name.size() / 3) + 1;
  for (const auto& c : candidates) {
    size_t d = edit_distance(name, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

std::string Registry::suggest(Kind kind, const std::string& name) const {
  return closest_name(name, names(kind));
}

void PluginLoader::load_file(const std::string& file) {
  std::string path = fs::absolute(file).string();
  if (std::find(loaded_.begin(), loaded_.end(), path) != loaded_.end()) return;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) throw Error("cannot load plugin library " + path + ": " + dlerror());
  auto entry = reinterpret_cast<concord_plugin_fn>(dlsym(handle, CONCORD_PLUGIN_SYMBOL));
  if (!entry) {
    dlclose(handle);
    throw Error("plugin library " + path +
                " has no '" CONCORD_PLUGIN_SYMBOL
                "' entry point (is it a Concord plugin? use the CONCORD_PLUGIN macro)");
  }
  const concord_plugin_info* info = entry();
  if (!info) throw Error("plugin library " + path + ": " CONCORD_PLUGIN_SYMBOL "() returned null");
  // Copy what we report before dlclose: `info` lives in the library.
  const uint32_t api = info->api_version;
  if (api != CONCORD_API_VERSION) {
    dlclose(handle);
    throw Error("plugin library " + path + " was built for Concord plugin API version " +
                std::to_string(api) + ", this Concord has API version " +
                std::to_string(CONCORD_API_VERSION) + "; rebuild the plugin");
  }
  std::string abi = info->abi_tag ? info->abi_tag : "";
  if (abi != CONCORD_ABI_TAG) {
    dlclose(handle);
    throw Error("plugin library " + path + " was built with ABI '" + abi +
                "', this Concord has ABI '" CONCORD_ABI_TAG "'; rebuild the plugin");
  }
  registry_.set_current_library(path, info->version ? info->version : "");
  try {
    info->register_plugins(&registry_);
  } catch (...) {
    registry_.set_current_library("<built into the executable>", "");
    throw;  // the library stays loaded: factories it already added point into it
  }
  registry_.set_current_library("<built into the executable>", "");
  loaded_.push_back(path);
}

std::vector<LoadFailure> PluginLoader::load_dirs(const std::vector<std::string>& dirs) {
  std::vector<LoadFailure> failures;
  for (const auto& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      if (fs::is_regular_file(dir, ec)) {  // a single library named on the path
        try {
          load_file(dir);
        } catch (const std::exception& e) {
          failures.push_back({dir, e.what()});
        }
      }
      continue;
    }
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".so") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      try {
        load_file(f.string());
      } catch (const std::exception& e) {
        failures.push_back({f.string(), e.what()});
      }
    }
  }
  return failures;
}

static std::string self_exe_dir() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  buf[n] = 0;
  return fs::path(buf).parent_path().string();
}

static std::string this_library_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&self_exe_dir), &info) && info.dli_fname)
    return fs::absolute(info.dli_fname).parent_path().string();
  return "";
}

std::vector<std::string> plugin_search_path(const std::vector<std::string>& extra) {
  std::vector<std::string> dirs;
  auto add = [&](const fs::path& p) {
    std::error_code ec;
    if (!fs::is_directory(p, ec) && !fs::is_regular_file(p, ec)) return;
    std::string c = fs::weakly_canonical(p, ec).string();
    if (std::find(dirs.begin(), dirs.end(), c) == dirs.end()) dirs.push_back(c);
  };
  // Built-in plugins: beside libconcord (lib/concord/plugins), which is the same layout in the
  // build tree and the install tree; then relative to the executable; then the install prefix.
  std::string libdir = this_library_dir();
  if (!libdir.empty()) add(fs::path(libdir) / "concord" / "plugins");
  add(fs::path(self_exe_dir()) / ".." / CONCORD_PLUGIN_SUBDIR);
  bool builtin_found = !dirs.empty();
  if (!builtin_found) add(CONCORD_INSTALL_PLUGIN_DIR);
  if (const char* env = std::getenv("CONCORD_PLUGIN_PATH")) {
    std::string s = env;
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(':', start);
      if (end == std::string::npos) end = s.size();
      if (end > start) add(s.substr(start, end - start));
      start = end + 1;
    }
  }
  for (const auto& e : extra) add(e);
  return dirs;
}

std::vector<LoadFailure> load_plugins(Registry& registry, const std::vector<std::string>& extra) {
  PluginLoader loader(registry);
  std::vector<LoadFailure> failures;
  for (const auto& e : extra) {
    std::error_code ec;
    if (!fs::exists(e, ec)) failures.push_back({e, "plugin path does not exist"});
  }
  auto more = loader.load_dirs(plugin_search_path(extra));
  failures.insert(failures.end(), more.begin(), more.end());
  return failures;
}

Registry& global_registry() {
  static Registry registry;
  return registry;
}

}  // namespace concord
