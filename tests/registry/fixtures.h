// The deliberately broken plugin libraries of tests/fixtures/plugins, and loading one.
#pragma once

#include <concord/registry.h>

#include <string>

namespace concord::registry_test {

inline std::string fixture(const std::string& name) {
  return std::string(FIXTURE_PLUGIN_DIR) + "/libfixture_" + name + ".so";
}

// The error loading `file` into `r` raises, or "" when it loads.
inline std::string load_error(Registry& r, const std::string& file) {
  PluginLoader loader(r);
  try {
    loader.load_file(file);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace concord::registry_test
