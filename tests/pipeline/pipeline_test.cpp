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
