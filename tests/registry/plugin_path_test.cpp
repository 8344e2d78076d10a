// Where plugins come from: never the current folder, never a place another user can change,
// and every skipped entry or refused library is reported (also by `concord plugins --kind`).
#include <concord/registry.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>

#include "fixtures.h"
#include "testing.h"

using namespace concord;
using registry_test::fixture;
namespace fs = std::filesystem;

namespace {
std::string load_error(const std::string& file) {
  Registry r;
  return registry_test::load_error(r, file);
}

// Sets an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

class ScopedCwd {
 public:
  explicit ScopedCwd(const fs::path& dir) : old_(fs::current_path()) { fs::current_path(dir); }
  ~ScopedCwd() { fs::current_path(old_); }

 private:
  fs::path old_;
};

// A folder holding one copy of a loadable fixture plugin.
std::string folder_with_plugin(const testkit::TempDir& dir, const std::string& sub) {
  fs::path d = dir.path() / sub;
  fs::create_directories(d);
  fs::copy_file(fixture("dup_a"), d / "libplugin.so");
  return d.string();
}

bool has_entry(const std::vector<LoadFailure>& v, const std::string& file,
               const std::string& reason) {
  return std::any_of(v.begin(), v.end(), [&](const LoadFailure& f) {
    return f.file == file && f.reason.find(reason) != std::string::npos;
  });
}

std::string dump(const std::vector<LoadFailure>& v) {
  std::string s;
  for (const auto& f : v) s += f.file + ": " + f.reason + "\n";
  return s;
}
}  // namespace

TEST(Loader, RefusesNullRegisterFunctionNamingFile) {
  std::string e = load_error(fixture("null_register"));
  EXPECT_NE(e.find("libfixture_null_register.so"), std::string::npos) << e;
  EXPECT_NE(e.find("null register_plugins"), std::string::npos) << e;
}

TEST(Loader, LoadsFromAFolderOnlyYouCanChange) {
  testkit::TempDir dir;  // under /tmp: a sticky world-writable folder above is fine
  std::string d = folder_with_plugin(dir, "ok");
  Registry r;
  PluginLoader loader(r);
  auto failures = loader.load_dirs({d});
  EXPECT_TRUE(failures.empty()) << dump(failures);
  EXPECT_TRUE(r.find(Kind::Aggregator, "dup"));
  EXPECT_EQ(untrusted_plugin_location(d, true), "");
}

TEST(Loader, RefusesWorldWritablePluginFolderNamingIt) {
  testkit::TempDir dir;
  for (mode_t mode : {mode_t(0777), mode_t(01777)}) {  // sticky does not help: anyone adds files
    std::string d = folder_with_plugin(dir, "ww" + std::to_string(mode));
    ASSERT_EQ(::chmod(d.c_str(), mode), 0);
    Registry r;
    PluginLoader loader(r);
    auto failures = loader.load_dirs({d});
    ASSERT_EQ(failures.size(), 1u) << dump(failures);
    EXPECT_EQ(failures[0].file, d);
    EXPECT_NE(failures[0].reason.find("folder " + d + " is writable by every user"),
              std::string::npos)
        << failures[0].reason;
    EXPECT_NE(failures[0].reason.find("CONCORD_ALLOW_INSECURE_PLUGINS=1"), std::string::npos);
    EXPECT_FALSE(r.find(Kind::Aggregator, "dup")) << "nothing may load from it";
  }
}

TEST(Loader, RefusesWorldWritableLibraryAndOneInAWorldWritableFolder) {
  testkit::TempDir dir;
  std::string d = folder_with_plugin(dir, "lib");
  std::string lib = d + "/libplugin.so";
  ASSERT_EQ(::chmod(lib.c_str(), 0666), 0);
  std::string e = load_error(lib);
  EXPECT_NE(e.find("file " + lib + " is writable by every user"), std::string::npos) << e;
  ASSERT_EQ(::chmod(lib.c_str(), 0644), 0);
  EXPECT_EQ(load_error(lib), "");
  // A non-sticky world-writable folder anywhere above: anyone may replace what is below it.
  ASSERT_EQ(::chmod(dir.str().c_str(), 0777), 0);
  e = load_error(lib);
  EXPECT_NE(e.find("folder " + dir.str() + " is writable by every user"), std::string::npos) << e;
}

TEST(Loader, RefusesFilesOwnedByAnotherUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to give a file to another user; skipping";
  testkit::TempDir dir;
  std::string d = folder_with_plugin(dir, "other");
  std::string lib = d + "/libplugin.so";
  ASSERT_EQ(::chown(lib.c_str(), 65534, 65534), 0);  // nobody
  std::string e = load_error(lib);
  EXPECT_NE(e.find("file " + lib + " is owned by user 65534"), std::string::npos) << e;
  ASSERT_EQ(::chown(lib.c_str(), 0, 0), 0);
  ASSERT_EQ(::chown(d.c_str(), 65534, 65534), 0);
  Registry r;
  PluginLoader loader(r);
  auto failures = loader.load_dirs({d});
  ASSERT_EQ(failures.size(), 1u) << dump(failures);
  EXPECT_NE(failures[0].reason.find("folder " + d + " is owned by user 65534"), std::string::npos)
      << failures[0].reason;
}

TEST(Loader, InsecureLocationsLoadOnlyWithTheOptOut) {
  testkit::TempDir dir;
  std::string d = folder_with_plugin(dir, "optout");
  ASSERT_EQ(::chmod(d.c_str(), 0777), 0);
  {
    ScopedEnv allow("CONCORD_ALLOW_INSECURE_PLUGINS", "1");
    Registry r;
    PluginLoader loader(r);
    auto failures = loader.load_dirs({d});
    EXPECT_TRUE(failures.empty()) << dump(failures);
    EXPECT_TRUE(r.find(Kind::Aggregator, "dup"));
  }
  ScopedEnv other("CONCORD_ALLOW_INSECURE_PLUGINS", "yes");  // only "1" opts out
  Registry r;
  PluginLoader loader(r);
  EXPECT_EQ(loader.load_dirs({d}).size(), 1u);
}

TEST(SearchPath, NeverTheCurrentFolder) {
  testkit::TempDir dir;
  std::string good = folder_with_plugin(dir, "good");
  fs::create_directories(dir.path() / "rel");
  ScopedCwd cwd(dir.path());
  ScopedEnv env("CONCORD_PLUGIN_PATH", "::rel:" + good + "::/no/such/folder:");
  std::vector<LoadFailure> skipped;
  auto dirs = plugin_search_path({}, &skipped);
  for (const auto& d : dirs) {
    EXPECT_TRUE(fs::path(d).is_absolute()) << d;
    EXPECT_NE(fs::path(d), fs::current_path()) << "the current folder is on the search path";
    EXPECT_NE(fs::path(d), fs::current_path() / "rel") << "a relative entry was taken";
  }
  EXPECT_NE(std::find(dirs.begin(), dirs.end(), good), dirs.end());
  EXPECT_TRUE(has_entry(skipped, "rel", "relative entry in CONCORD_PLUGIN_PATH ignored"))
      << dump(skipped);
  EXPECT_TRUE(has_entry(skipped, "/no/such/folder", "does not exist")) << dump(skipped);
  EXPECT_EQ(skipped.size(), 2u) << "empty entries are ignored quietly: " << dump(skipped);
  for (const auto& s : skipped) EXPECT_TRUE(s.path_entry);
}

TEST(SearchPath, RelativeCommandLineEntryIsResolvedOnce) {
  testkit::TempDir dir;
  std::string good = folder_with_plugin(dir, "cli");
  ScopedCwd cwd(dir.path());
  std::vector<LoadFailure> skipped;
  auto dirs = plugin_search_path({"cli", "", "missing"}, &skipped);
  EXPECT_NE(std::find(dirs.begin(), dirs.end(), good), dirs.end());
  EXPECT_TRUE(has_entry(skipped, "--plugin-path \"\"", "empty plugin path ignored"))
      << dump(skipped);
  EXPECT_TRUE(has_entry(skipped, (dir.path() / "missing").string(), "does not exist"))
      << dump(skipped);
}

TEST(SearchPath, CliReportsLoadErrorsAndMissingEntriesWhateverTheKindFilter) {
  std::string out;
  std::string env = std::string("CONCORD_PLUGIN_PATH=") + FIXTURE_PLUGIN_DIR + ":/no/such/dir ";
  for (const char* filter : {"", "--kind aggregator", "--kind metric", "--brief fedavg"}) {
    int rc = testkit::run_command(env + testkit::concord_exe() + " plugins " + filter, &out);
    EXPECT_EQ(rc, 1) << "a refused library sets the exit status; " << filter << ": " << out;
    EXPECT_NE(out.find("libfixture_bad_version.so"), std::string::npos) << filter << ": " << out;
    EXPECT_NE(out.find("null register_plugins"), std::string::npos) << filter << ": " << out;
    EXPECT_NE(out.find("warning plugin path /no/such/dir: plugin path does not exist"),
              std::string::npos)
        << filter << ": " << out;
    EXPECT_NE(out.find("could not be loaded (their plugins are not listed)"), std::string::npos)
        << filter << ": " << out;
  }
  // Only a missing entry: listed, a warning, exit 0.
  int rc = testkit::run_command(
      "CONCORD_PLUGIN_PATH=/no/such/dir " + testkit::concord_exe() + " plugins --kind metric",
      &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("/no/such/dir"), std::string::npos) << out;
  EXPECT_NE(out.find("metric dice"), std::string::npos) << out;
}
