// Shared helpers for Concord's tests.
#pragma once

#include <concord/array.h>
#include <concord/registry.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>

namespace concord::testkit {

// ../shared/data (CONCORD_SHARED_DATA), or "" when absent.
std::string shared_data();
// Skips the current test with a clear message when the shared data folder is absent.
#define CONCORD_REQUIRE_SHARED_DATA(sub)                                                     \
  do {                                                                                       \
    if (::concord::testkit::shared_data().empty() ||                                         \
        !std::filesystem::exists(::concord::testkit::shared_data() + "/" + (sub)))           \
      GTEST_SKIP() << "shared data '" << (sub) << "' not found (set CONCORD_SHARED_DATA or " \
                   << "place ../shared/data beside the project); skipping";                  \
  } while (0)

std::string source_dir();  // the project's source tree
std::string build_dir();   // the build tree (bin/, lib/concord/plugins/)
std::string concord_exe();

// A registry holding every built-in plugin of this build (loaded once per process, through the
// same loader the CLI uses). Fails the test if any built-in library refuses to load.
const Registry& builtin_registry();

// Builds a plugin from the built-in registry with the given arguments (defaults for the rest).
template <class T>
std::unique_ptr<T> make_plugin(Kind kind, const std::string& name,
                               const std::map<std::string, Value>& given = {}) {
  const Registry& reg = builtin_registry();
  return reg.create<T>(kind, name, make_args(name, reg.get(kind, name).args, given));
}

// The message of the concord::Error that `f` throws, or "(no error)".
std::string error_of(const std::function<void()>& f);

// A fresh temporary folder, removed at destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

// Same names, and every array byte for byte (dtype, shape and values).
bool bit_identical(const NamedArrays& a, const NamedArrays& b);

// Runs a shell command, returns exit status; output captured into `output`.
int run_command(const std::string& command, std::string* output = nullptr);

}  // namespace concord::testkit
