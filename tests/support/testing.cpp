#include "testing.h"

#include <sys/wait.h>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

namespace fs = std::filesystem;

namespace concord::testkit {

static std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

std::string shared_data() {
  std::string d = env_or("CONCORD_SHARED_DATA", source_dir() + "/../shared/data");
  return fs::is_directory(d) ? d : "";
}

std::string source_dir() {
  return env_or("CONCORD_SOURCE_DIR", CONCORD_TEST_SOURCE_DIR);
}
std::string build_dir() {
  return env_or("CONCORD_BUILD_DIR", CONCORD_TEST_BUILD_DIR);
}
std::string concord_exe() {
  return build_dir() + "/bin/concord";
}

const Registry& builtin_registry() {
  static Registry* registry = [] {
    auto* r = new Registry;
    PluginLoader loader(*r);
    auto failures = loader.load_dirs({build_dir() + "/lib/concord/plugins"});
    for (const auto& f : failures)
      ADD_FAILURE() << "built-in plugin failed to load: " << f.file << ": " << f.reason;
    return r;
  }();
  return *registry;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TempDir::TempDir() {
  std::random_device rd;
  path_ =
      fs::temp_directory_path() / ("concord-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(path_);
}
TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

int run_command(const std::string& command, std::string* output) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return -1;
  std::array<char, 4096> buf;
  std::string out;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int status = pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool bit_identical(const NamedArrays& a, const NamedArrays& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end() || it->second.dtype() != v.dtype() || it->second.shape() != v.shape() ||
        it->second.nbytes() != v.nbytes() ||
        std::memcmp(it->second.raw(), v.raw(), v.nbytes()) != 0)
      return false;
  }
  return true;
}

}  // namespace concord::testkit
