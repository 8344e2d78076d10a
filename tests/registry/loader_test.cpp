#include <concord/aggregator.h>
#include <concord/registry.h>

#include <fstream>

#include "fixtures.h"
#include "testing.h"

using namespace concord;
using namespace concord::registry_test;

TEST(Loader, RefusesOtherApiVersionNamingFileAndBothVersions) {
  Registry r;
  std::string e = load_error(r, fixture("bad_version"));
  EXPECT_NE(e.find("libfixture_bad_version.so"), std::string::npos) << e;
  EXPECT_NE(e.find("API version " + std::to_string(CONCORD_API_VERSION + 41)), std::string::npos)
      << e;
  EXPECT_NE(e.find("has API version " + std::to_string(CONCORD_API_VERSION)), std::string::npos)
      << e;
}

TEST(Loader, RefusesOtherAbi) {
  Registry r;
  std::string e = load_error(r, fixture("bad_abi"));
  EXPECT_NE(e.find("libfixture_bad_abi.so"), std::string::npos) << e;
  EXPECT_NE(e.find("msvc-19"), std::string::npos) << e;
  EXPECT_NE(e.find(CONCORD_ABI_TAG), std::string::npos) << e;
}

TEST(Loader, RefusesLibraryWithoutEntryPoint) {
  Registry r;
  std::string e = load_error(r, fixture("no_symbol"));
  EXPECT_NE(e.find("no 'concord_plugin' entry point"), std::string::npos) << e;
}

TEST(Loader, RefusesFileThatIsNotALibrary) {
  testkit::TempDir dir;
  std::string bogus = dir.str() + "/libbogus.so";
  std::ofstream(bogus) << "this is not an ELF file";
  Registry r;
  std::string e = load_error(r, bogus);
  EXPECT_NE(e.find("cannot load plugin library"), std::string::npos) << e;
  EXPECT_NE(e.find("libbogus.so"), std::string::npos) << e;
  // Loading the folder reports the failure instead of throwing.
  PluginLoader loader(r);
  auto failures = loader.load_dirs({dir.str()});
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_NE(failures[0].file.find("libbogus.so"), std::string::npos);
}

TEST(Loader, RefusesDuplicateNameNamingBothFiles) {
  Registry r;
  PluginLoader loader(r);
  loader.load_file(fixture("dup_a"));
  std::string e = load_error(r, fixture("dup_b"));
  EXPECT_NE(e.find("duplicate aggregator plugin 'dup'"), std::string::npos) << e;
  EXPECT_NE(e.find("libfixture_dup_a.so"), std::string::npos) << e;
  EXPECT_NE(e.find("libfixture_dup_b.so"), std::string::npos) << e;
  // The first one still works and records its file.
  const PluginDesc& d = r.get(Kind::Aggregator, "dup");
  EXPECT_NE(d.library.find("libfixture_dup_a.so"), std::string::npos);
  auto agg = r.create<Aggregator>(Kind::Aggregator, "dup", make_args("dup", d.args));
  EXPECT_TRUE(agg != nullptr);
}

TEST(Registry, UnknownNameSuggestsClosest) {
  const Registry& r = testkit::builtin_registry();
  try {
    r.get(Kind::Aggregator, "fedavgg");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean 'fedavg'"), std::string::npos) << e.what();
  }
}

TEST(Registry, BuiltinsComeFromSeparateLibraries) {
  const Registry& r = testkit::builtin_registry();
  const PluginDesc& d = r.get(Kind::Aggregator, "fedavg");
  EXPECT_NE(d.library.find("libconcord-aggregator-fedavg.so"), std::string::npos) << d.library;
  EXPECT_EQ(d.library_version, "0.1.0");
}

TEST(Args, DefaultsRangesChoicesAndRequired) {
  std::vector<ArgSpec> specs = {ArgSpec::integer("n", 3, "count").range(1, 10),
                                ArgSpec::real("beta", 0.1, "band").range(0, 1),
                                ArgSpec::choice("mode", {"a", "b"}, "a", "mode"),
                                ArgSpec::path("file", "input")};
  EXPECT_THROW(make_args("p", specs), Error);  // file is required
  Args a = make_args("p", specs, {{"file", make_value("/tmp")}, {"n", make_value(int64_t(7))}});
  EXPECT_THROW(make_args("p", specs, {{"file", make_value("/no/such/file")}}), Error);
  EXPECT_EQ(a.integer("n"), 7);
  EXPECT_DOUBLE_EQ(a.real("beta"), 0.1);
  EXPECT_EQ(a.str("mode"), "a");
  EXPECT_THROW(make_args("p", specs, {{"file", make_value("x")}, {"n", make_value(int64_t(11))}}),
               Error);
  EXPECT_THROW(make_args("p", specs, {{"file", make_value("x")}, {"mode", make_value("c")}}),
               Error);
  EXPECT_THROW(a.integer("undeclared"), Error);
}
