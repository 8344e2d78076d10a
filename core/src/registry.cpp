#include <concord/registry.h>

#include <dlfcn.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
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

std::vector<const PluginDesc*> Registry::defaults(Kind kind, const std::string& use) const {
  std::vector<const PluginDesc*> out;
  for (const auto& [key, d] : plugins_)
    if (key.first == kind &&
        std::find(d.default_for.begin(), d.default_for.end(), use) != d.default_for.end())
      out.push_back(&d);
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

static bool insecure_plugins_allowed() {
  const char* v = std::getenv("CONCORD_ALLOW_INSECURE_PLUGINS");
  return v && std::string(v) == "1";
}

static std::string this_library_file() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&insecure_plugins_allowed), &info) && info.dli_fname &&
      info.dli_fname[0] == '/')
    return info.dli_fname;
  return "";
}

std::string untrusted_plugin_location(const std::string& path, bool scanned_folder) {
  std::error_code ec;
  fs::path p = fs::canonical(path, ec);
  if (ec) return path + ": " + ec.message();
  // Whoever owns libconcord already decides what code runs in this process.
  static const uid_t concord_owner = [] {
    struct stat st {};
    std::string lib = this_library_file();
    return !lib.empty() && ::stat(lib.c_str(), &st) == 0 ? st.st_uid : uid_t(0);
  }();
  const uid_t me = ::geteuid();
  bool first = true;
  for (fs::path cur = p;; cur = cur.parent_path()) {
    struct stat st {};
    if (::stat(cur.c_str(), &st) != 0) return cur.string() + ": cannot stat";
    const char* what = S_ISDIR(st.st_mode) ? "folder " : "file ";
    if (st.st_uid != 0 && st.st_uid != me && st.st_uid != concord_owner)
      return what + cur.string() + " is owned by user " + std::to_string(st.st_uid) +
             ", neither root nor you";
    // A sticky folder (/tmp) above the plugins is fine: others cannot replace what is in it.
    // The scanned folder itself is not: anyone could add a library to it.
    const bool strict = first && (scanned_folder || !S_ISDIR(st.st_mode));
    if ((st.st_mode & S_IWOTH) && (strict || !(st.st_mode & S_ISVTX)))
      return what + cur.string() + " is writable by every user";
    first = false;
    if (cur == cur.root_path() || cur.parent_path() == cur) break;
  }
  return "";
}

// Throws when `path` may be changed by another user, unless the user opted out.
static void require_trusted(const std::string& path, bool scanned_folder) {
  std::string why = untrusted_plugin_location(path, scanned_folder);
  if (why.empty()) return;
  if (insecure_plugins_allowed()) {
    spdlog::warn("loading plugins from {} although {} (CONCORD_ALLOW_INSECURE_PLUGINS=1)", path,
                 why);
    return;
  }
  throw Error("refusing plugin " + std::string(scanned_folder ? "folder " : "library ") + path +
              ": " + why + " (another user could make Concord run their code; fix the " +
              "ownership or mode, or set CONCORD_ALLOW_INSECURE_PLUGINS=1)");
}

void PluginLoader::load_file(const std::string& file) {
  // Absolute and symlink-free: dlopen never searches for it, and the checked file is the one
  // loaded.
  std::error_code ec;
  fs::path resolved = fs::canonical(fs::absolute(file), ec);
  if (ec) throw Error("cannot load plugin library " + file + ": " + ec.message());
  std::string path = resolved.string();
  if (std::find(loaded_.begin(), loaded_.end(), path) != loaded_.end()) return;
  require_trusted(path, false);
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
  if (!info) {
    dlclose(handle);
    throw Error("plugin library " + path + ": " CONCORD_PLUGIN_SYMBOL "() returned null");
  }
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
  if (!info->register_plugins) {
    dlclose(handle);
    throw Error("plugin library " + path +
                ": " CONCORD_PLUGIN_SYMBOL "() returned a null register_plugins function");
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
      } else {
        failures.push_back({dir, "plugin path does not exist", true});
      }
      continue;
    }
    try {
      require_trusted(dir, true);
    } catch (const std::exception& e) {
      failures.push_back({dir, e.what()});
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
  if (n <= 0 || buf[0] != '/') return "";  // never fall back to the current folder
  buf[n] = 0;
  return fs::path(buf).parent_path().string();
}

std::vector<std::string> plugin_search_path(const std::vector<std::string>& extra,
                                            std::vector<LoadFailure>* skipped) {
  std::vector<std::string> dirs;
  auto skip = [&](const std::string& entry, const std::string& why) {
    if (skipped) skipped->push_back({entry, why, true});
  };
  // Only absolute paths get here.
  auto add = [&](const fs::path& p, bool report_missing) {
    std::error_code ec;
    if (!fs::is_directory(p, ec) && !fs::is_regular_file(p, ec)) {
      if (report_missing) skip(p.string(), "plugin path does not exist (ignored)");
      return;
    }
    std::string c = fs::weakly_canonical(p, ec).string();
    if (std::find(dirs.begin(), dirs.end(), c) == dirs.end()) dirs.push_back(c);
  };
  // Built-in plugins: beside libconcord (lib/concord/plugins), which is the same layout in the
  // build tree and the install tree; then relative to the executable; then the install prefix.
  std::string lib = this_library_file();
  if (!lib.empty()) add(fs::path(lib).parent_path() / "concord" / "plugins", false);
  std::string exe_dir = self_exe_dir();
  if (!exe_dir.empty()) add(fs::path(exe_dir) / ".." / CONCORD_PLUGIN_SUBDIR, false);
  bool builtin_found = !dirs.empty();
  if (!builtin_found) add(CONCORD_INSTALL_PLUGIN_DIR, false);
  if (const char* env = std::getenv("CONCORD_PLUGIN_PATH")) {
    std::string s = env;
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(':', start);
      if (end == std::string::npos) end = s.size();
      std::string entry = s.substr(start, end - start);
      // Empty entries mean nothing here (for the dynamic loader they mean the current folder).
      if (!entry.empty() && entry[0] != '/')
        skip(entry,
             "relative entry in CONCORD_PLUGIN_PATH ignored: entries must be absolute paths");
      else if (!entry.empty())
        add(entry, true);
      start = end + 1;
    }
  }
  for (const auto& e : extra) {
    if (e.empty()) {
      skip("--plugin-path \"\"", "empty plugin path ignored");
      continue;
    }
    fs::path p = e;
    if (p.is_relative()) {
      std::error_code ec;
      p = fs::absolute(p, ec);
      if (ec) {
        skip(e, "cannot resolve relative plugin path: " + ec.message());
        continue;
      }
      spdlog::info("plugin path {} is relative: using {}", e, p.string());
    }
    add(p, true);
  }
  return dirs;
}

std::vector<LoadFailure> load_plugins(Registry& registry, const std::vector<std::string>& extra) {
  PluginLoader loader(registry);
  std::vector<LoadFailure> failures;
  auto dirs = plugin_search_path(extra, &failures);
  auto more = loader.load_dirs(dirs);
  failures.insert(failures.end(), more.begin(), more.end());
  return failures;
}

Registry& global_registry() {
  static Registry registry;
  return registry;
}

}  // namespace concord
