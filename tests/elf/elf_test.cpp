// Nothing is loaded from the current folder: every executable and shared library the build
// makes has only absolute or $ORIGIN-relative RPATH/RUNPATH entries. The installed tree is
// checked by tests/install/install_test.sh with the same reader (tests/elf/tool).
#include <algorithm>

#include "runpath.h"
#include "testing.h"

using namespace concord;
using namespace concord::elfcheck;

namespace {
std::string fixture(const std::string& name) {
  return testkit::build_dir() + "/test-fixtures/elf/lib" + name + ".so";
}
std::string joined(const std::vector<std::string>& lines) {
  std::string s;
  for (const auto& l : lines) s += l + "\n";
  return s;
}
}  // namespace

TEST(Runpath, EntryRules) {
  for (const char* ok : {"/usr/lib", "$ORIGIN", "$ORIGIN/../lib", "${ORIGIN}/../..", "/"})
    EXPECT_TRUE(safe_entry(ok)) << ok;
  for (const char* bad : {"", "lib", "./lib", "../lib", "$ORIGINAL/x", "$LIB", "${ORIGIN}x"})
    EXPECT_FALSE(safe_entry(bad)) << bad;
}

TEST(Runpath, EveryBuiltExecutableAndLibraryIsSafe) {
  const std::string b = testkit::build_dir();
  auto files = elf_files({b + "/bin", b + "/lib"});
  // The walk must see what users run and load, or the check below proves nothing.
  for (const std::string& must : {b + "/bin/concord", b + "/lib/libconcord.so.0.1.0",
                                  b + "/lib/concord/plugins/libconcord-aggregator-fedavg.so"})
    EXPECT_NE(std::find(files.begin(), files.end(), must), files.end()) << must;
  std::vector<std::string> problems;
  size_t with_paths = 0;
  for (const auto& f : files) {
    auto p = unsafe_entries(f);
    problems.insert(problems.end(), p.begin(), p.end());
    with_paths += !search_paths(f).empty();
  }
  EXPECT_TRUE(problems.empty()) << joined(problems);
  EXPECT_GT(with_paths, 0u) << "no file had a search path: the reader found nothing to check";
  // The executable finds libconcord through $ORIGIN, the same in the build and install trees.
  auto exe = search_paths(b + "/bin/concord");
  ASSERT_EQ(exe.size(), 1u);
  EXPECT_EQ(exe[0].value, "$ORIGIN/../lib");
}

TEST(Runpath, ControlFlagsAnEmptyEntry) {
  // Linked with -Wl,-rpath,:/x (RUNPATH ":/x").
  auto sp = search_paths(fixture("empty_runpath"));
  ASSERT_EQ(sp.size(), 1u);
  EXPECT_STREQ(sp[0].tag, "RUNPATH");
  EXPECT_EQ(sp[0].value, ":/x");
  auto p = unsafe_entries(fixture("empty_runpath"));
  ASSERT_EQ(p.size(), 1u) << joined(p);
  EXPECT_NE(p[0].find("libempty_runpath.so: RUNPATH ':/x' entry 0 is empty"), std::string::npos)
      << p[0];
}

TEST(Runpath, ControlFlagsARelativeOldStyleRpath) {
  // Linked with --disable-new-dtags -rpath /ok:lib (DT_RPATH, searched before LD_LIBRARY_PATH).
  auto p = unsafe_entries(fixture("relative_rpath"));
  ASSERT_EQ(p.size(), 1u) << joined(p);
  EXPECT_NE(p[0].find("RPATH '/ok:lib' entry 1 'lib' is relative"), std::string::npos) << p[0];
}

TEST(Runpath, ToolUsedOnTheInstalledTreeFailsOnTheControls) {
  const std::string tool = testkit::build_dir() + "/bin/check-runpath";
  std::string out;
  EXPECT_EQ(testkit::run_command(tool + " " + testkit::build_dir() + "/test-fixtures/elf", &out), 1)
      << out;
  EXPECT_NE(out.find("libempty_runpath.so"), std::string::npos) << out;
  EXPECT_NE(out.find("librelative_rpath.so"), std::string::npos) << out;
  // A folder without any ELF file is an error, not a pass.
  testkit::TempDir empty;
  EXPECT_NE(testkit::run_command(tool + " " + empty.str(), &out), 0) << out;
  EXPECT_EQ(testkit::run_command(tool + " " + testkit::build_dir() + "/bin/concord", &out), 0)
      << out;
}

TEST(Runpath, LibraryPlantedInTheCurrentFolderIsNotLoaded) {
  const std::string cwd = testkit::build_dir() + "/test-fixtures/elf/cwd";
  ASSERT_TRUE(std::filesystem::exists(cwd + "/libfmt.so.9"));
  std::filesystem::remove(cwd + "/PLANTED-LIBRARY-RAN");
  std::string out;
  ASSERT_EQ(
      testkit::run_command("cd " + cwd + " && " + testkit::concord_exe() + " --version", &out), 0)
      << out;
  EXPECT_FALSE(std::filesystem::exists(cwd + "/PLANTED-LIBRARY-RAN"))
      << "concord loaded libfmt.so.9 from the current folder";
}
