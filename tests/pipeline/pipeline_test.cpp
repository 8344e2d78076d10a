#include <concord/pipeline.h>

#include "testing.h"

using namespace concord;

namespace {

const char* kGood = R"(name: t
seed: 3
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 8, test_per_site: 4, size: 32}}
model: {type: cnn, args: {width: 8, depth: 2}}
harmonizers:
  - {type: identity}
training: {local_epochs: 1, batch_size: 4, lr: 0.01}
federation: {rounds: 2, min_sites: 2}
aggregator: {type: fedavg, args: {weighting: uniform}}
)";

std::vector<Diagnostic> errors_of(const std::string& text, std::vector<std::string> sets = {}) {
  try {
    parse_pipeline(text, "p.yaml", sets, testkit::builtin_registry());
  } catch (const ValidationError& e) {
    return e.diagnostics();
  }
  return {};
}

bool has(const std::vector<Diagnostic>& d, int line, int col, const std::string& text) {
  for (const auto& x : d)
    if (x.where.line == line && (col == 0 || x.where.column == col) &&
        x.message.find(text) != std::string::npos)
      return true;
  return false;
}

std::string dump(const std::vector<Diagnostic>& d) {
  std::string s;
  for (const auto& x : d) s += x.str() + "\n";
  return s;
}

}  // namespace

TEST(Pipeline, ValidFileResolvesDefaults) {
  PipelineConfig c = parse_pipeline(kGood, "p.yaml", {}, testkit::builtin_registry());
  EXPECT_EQ(c.name, "t");
  EXPECT_EQ(c.seed, 3u);
  EXPECT_EQ(c.federation.rounds, 2);
  EXPECT_EQ(c.federation.min_sites, 2);
  EXPECT_DOUBLE_EQ(c.federation.fraction, 1.0);  // default
  EXPECT_EQ(c.training.optimizer, "adam");       // default
  EXPECT_EQ(c.aggregator.args.str("weighting"), "uniform");
  ASSERT_EQ(c.harmonizers.size(), 1u);
  EXPECT_NE(c.resolved_yaml.find("optimizer: adam"), std::string::npos) << c.resolved_yaml;
  // The resolved pipeline is itself a valid pipeline that resolves to the same text.
  PipelineConfig again =
      parse_pipeline(c.resolved_yaml, "resolved.yaml", {}, testkit::builtin_registry());
  EXPECT_EQ(again.resolved_yaml, c.resolved_yaml);
}

TEST(Pipeline, ReportsEveryErrorWithLineAndColumn) {
  std::string text = R"(name: t
seed: 3
data:
  dataset: {type: brainsim, args: {sites: 0, trian_per_site: 8}}
model: {type: cnnn}
training: {local_epochs: two, batch_size: 4, lrr: 0.01}
federation: {rounds: 2, fraction: 1.5}
aggregator: {type: fedavg, args: {weighting: bogus}}
evaluaton: {}
)";
  auto d = errors_of(text);
  EXPECT_GE(d.size(), 7u) << dump(d);
  EXPECT_TRUE(has(d, 4, 0, "out of range")) << dump(d);                   // sites: 0
  EXPECT_TRUE(has(d, 4, 0, "did you mean 'train_per_site'")) << dump(d);  // typo'd arg
  EXPECT_TRUE(has(d, 5, 0, "unknown model plugin 'cnnn' (did you mean 'cnn'?)")) << dump(d);
  EXPECT_TRUE(has(d, 6, 26, "expects int")) << dump(d);  // two
  EXPECT_TRUE(has(d, 6, 0, "did you mean 'lr'")) << dump(d);
  EXPECT_TRUE(has(d, 7, 35, "out of range")) << dump(d);  // fraction 1.5
  EXPECT_TRUE(has(d, 8, 0, "is not one of")) << dump(d);  // weighting
  EXPECT_TRUE(has(d, 9, 1, "unknown key 'evaluaton' (did you mean 'evaluation'?)")) << dump(d);
  for (const auto& x : d) EXPECT_EQ(x.where.file, "p.yaml");
}

TEST(Pipeline, MissingRequiredAndMissingPath) {
  std::string text = R"(data:
  dataset: {type: npz}
model: {type: cnn}
)";
  auto d = errors_of(text);
  EXPECT_TRUE(has(d, 2, 0, "missing required 'path'")) << dump(d);
  std::string text2 = R"(data:
  dataset: {type: npz, args: {path: /nonexistent/file.npz}}
model: {type: cnn}
)";
  auto d2 = errors_of(text2);
  EXPECT_TRUE(has(d2, 2, 0, "/nonexistent/file.npz' does not exist")) << dump(d2);
}

TEST(Pipeline, MissingSectionsAndSyntaxErrors) {
  auto d = errors_of("seed: 1\n");
  EXPECT_TRUE(has(d, 0, 0, "missing 'data' section") || has(d, 1, 0, "missing 'data' section"))
      << dump(d);
  auto s = errors_of("data: {dataset: [unclosed\n");
  ASSERT_EQ(s.size(), 1u);
  EXPECT_NE(s[0].message.find("YAML syntax"), std::string::npos);
  EXPECT_GT(s[0].where.line, 0);
}

TEST(Pipeline, OverridesAreAppliedAndValidated) {
  PipelineConfig c = parse_pipeline(
      kGood, "p.yaml", {"training.lr=1e-4", "federation.rounds=7", "model.args.width=4"},
      testkit::builtin_registry());
  EXPECT_DOUBLE_EQ(c.training.lr, 1e-4);
  EXPECT_EQ(c.federation.rounds, 7);
  EXPECT_EQ(c.model.args.integer("width"), 4);
  auto d = errors_of(kGood, {"federation.rounds=-1", "training.optimiser=sgd"});
  ASSERT_EQ(d.size(), 2u) << dump(d);
  EXPECT_EQ(d[0].where.file.rfind("--set ", 0), 0u) << dump(d);
  EXPECT_TRUE(has(d, 0, 0, "did you mean 'optimizer'")) << dump(d);
  EXPECT_THROW(parse_pipeline(kGood, "p.yaml", {"novalue"}, testkit::builtin_registry()),
               ValidationError);
}

// The one text -> Value conversion that pipeline files and `--arg key=value` share.
TEST(ParseValue, TypesRangesChoicesListsAndPaths) {
  const ArgSpec count = ArgSpec::integer("count", 1, "").range(1, 10);
  EXPECT_EQ(parse_value(count, "7").i, 7);
  EXPECT_EQ(parse_value(count, "7").type, ArgType::Int);
  EXPECT_EQ(parse_value(count, "3.0").i, 3);  // YAML writes integral floats like this
  EXPECT_EQ(testkit::error_of([&] { parse_value(count, "2.5"); }),
            "'count' expects int in [1, 10], got '2.5'");
  EXPECT_EQ(testkit::error_of([&] { parse_value(count, "seven"); }),
            "'count' expects int in [1, 10], got 'seven'");
  EXPECT_EQ(testkit::error_of([&] { parse_value(count, "11", "training.count"); }),
            "'training.count' = 11 is out of range: expected int in [1, 10]");
  EXPECT_NE(testkit::error_of([&] {
              parse_value(ArgSpec::integer("n", 0, ""), "1e30");
            }).find("out of range"),
            std::string::npos);

  const ArgSpec lr = ArgSpec::real("lr", 0.1, "").range(0, 1);
  EXPECT_DOUBLE_EQ(parse_value(lr, "2.5e-1").f, 0.25);
  EXPECT_NE(testkit::error_of([&] { parse_value(lr, "-0.5"); }).find("is out of range"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] { parse_value(lr, "nan"); }).find("out of range"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] { parse_value(lr, "0.5x"); }).find("expects float"),
            std::string::npos);

  const ArgSpec flag = ArgSpec::boolean("flag", false, "");
  for (const char* t : {"true", "Yes", "ON", "1", "y"}) EXPECT_TRUE(parse_value(flag, t).b) << t;
  for (const char* t : {"false", "No", "off", "0", "N"}) EXPECT_FALSE(parse_value(flag, t).b) << t;
  EXPECT_EQ(testkit::error_of([&] { parse_value(flag, "maybe"); }),
            "'flag' expects bool, got 'maybe'");

  const ArgSpec mode = ArgSpec::choice("mode", {"samples", "uniform"}, "samples", "");
  EXPECT_EQ(parse_value(mode, "uniform").s, "uniform");
  EXPECT_EQ(testkit::error_of([&] { parse_value(mode, "sampels"); }),
            "'mode' = 'sampels' is not one of enum {samples|uniform} (did you mean 'samples'?)");

  const ArgSpec pcts = ArgSpec::list("pcts", ArgType::Float, {"1", "99"}, "").range(0, 100);
  Value l = parse_value(pcts, "[0.5, 99.5]");
  ASSERT_EQ(l.items.size(), 2u);
  EXPECT_DOUBLE_EQ(l.items[1].f, 99.5);
  EXPECT_EQ(l.items[1].type, ArgType::Float);
  EXPECT_EQ(parse_value(pcts, "1,2,3").items.size(), 3u);
  EXPECT_TRUE(parse_value(pcts, "").items.empty());
  EXPECT_TRUE(parse_value(pcts, "[]").items.empty());
  EXPECT_EQ(testkit::error_of([&] { parse_value(pcts, "1,200"); }),
            "'pcts[1]' = 200 is out of range: expected list<float> in [0, 100]");
  const ArgSpec names = ArgSpec::list("names", ArgType::String, {}, "");
  EXPECT_EQ(parse_value(names, "a, b").items[1].s, "b");

  testkit::TempDir dir;
  const ArgSpec file = ArgSpec::path("file", "");
  EXPECT_EQ(parse_value(file, dir.str()).s, dir.str());
  EXPECT_NE(testkit::error_of([&] {
              parse_value(file, dir.str() + "/missing");
            }).find("'file': path '" + dir.str() + "/missing' does not exist"),
            std::string::npos);
  EXPECT_EQ(parse_value(ArgSpec::path("out", "").output(), "/no/such/dir").s, "/no/such/dir");
  EXPECT_EQ(parse_value(ArgSpec::string("s", "", ""), "a,b").s, "a,b");  // strings keep commas
}

// yaml-cpp keeps the first of two equal keys silently; every duplicate is an error with the
// position of the second and of the first, at any depth, together with the other errors.
TEST(Pipeline, DuplicateKeysAreErrorsWithTheirPositions) {
  const std::string text = R"(name: t
seed: 3
data:
  dataset: {type: brainsim, args: {sites: 3, sites: 4}}
model: {type: cnn}
training: {lr: 0.01, batch_size: 4}
training: {lr: 0.5}
federation: {rounds: 0}
)";
  auto d = errors_of(text);
  EXPECT_TRUE(has(d, 4, 46, "duplicate key 'sites' (first at line 4, column 36")) << dump(d);
  EXPECT_TRUE(has(d, 7, 1, "duplicate key 'training' (first at line 6, column 1")) << dump(d);
  EXPECT_TRUE(has(d, 8, 0, "rounds")) << dump(d);  // the other errors are still reported
  // Aliases share a map: it is not reported (or walked) twice.
  EXPECT_TRUE(errors_of(std::string(kGood) + "evaluation: &e {every: 1}\n").empty());
}

// `name` becomes a folder under `output`: it must be one plain folder name.
TEST(Pipeline, NameMustBeOneSafeFolderName) {
  for (const std::string bad : {"../../x", "a/b", "..", ".hidden", "tab\\there", "nul\\0byte"}) {
    SCOPED_TRACE(bad);
    std::string text = kGood;
    text.replace(text.find("name: t"), 7, "name: \"" + bad + "\"");
    auto d = errors_of(text);
    EXPECT_TRUE(has(d, 1, 7, "'name' names the run folder")) << dump(d);
  }
  EXPECT_TRUE(has(errors_of(kGood, {"name=../up"}), 0, 0, "one plain folder name"));
  EXPECT_TRUE(errors_of(std::string(kGood).replace(0, 7, "name: ok-run_2.b")).empty());
}

// A fraction or availability of 0 selects no site in any round: refused before the run.
TEST(Pipeline, FractionAndAvailabilityMustLeaveSomeoneIn) {
  auto d = errors_of(std::string(kGood) + "", {"federation.fraction=0"});
  EXPECT_EQ(d.size(), 1u) << dump(d);
  EXPECT_TRUE(has(d, 0, 0, "'federation.fraction' must be above 0")) << dump(d);
  std::string text = kGood;
  text.replace(text.find("federation: {rounds: 2, min_sites: 2}"), 37,
               "federation: {rounds: 2, availability: 0}");
  d = errors_of(text);
  EXPECT_TRUE(has(d, 9, 39, "'federation.availability' must be above 0")) << dump(d);
  EXPECT_TRUE(errors_of(kGood, {"federation.fraction=0.01"}).empty());
}

// A path argument that is a symlink loop is one error among the others, not the end of
// validation.
TEST(Pipeline, SymlinkLoopInAPathIsOneErrorAmongOthers) {
  testkit::TempDir dir;
  const std::filesystem::path loop = dir.path() / "loop";
  std::filesystem::create_symlink(loop, loop);
  const std::string text = "name: t\ndata:\n  dataset: {type: npz, args: {path: " + loop.string() +
                           "}}\nmodel: {type: cnm}\n";
  auto d = errors_of(text);
  EXPECT_TRUE(has(d, 3, 0, "cannot examine path")) << dump(d);
  EXPECT_TRUE(has(d, 3, 0, "symbolic links")) << dump(d);
  EXPECT_TRUE(has(d, 4, 0, "unknown model plugin 'cnm'")) << dump(d);
}
