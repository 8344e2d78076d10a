#include <concord/dataset.h>
#include <concord/engine.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

std::string pipeline(int rounds, int min_sites, const std::string& extra = "") {
  return "name: engine-test\nseed: 11\n"
         "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: 12, test_per_site: "
         "6, size: 32}}\n"
         "model: {type: cnn, args: {width: 8, depth: 2}}\n"
         "training: {local_epochs: 1, batch_size: 6, lr: 0.01}\n"
         "federation: {rounds: " +
         std::to_string(rounds) + ", min_sites: " + std::to_string(min_sites) + "}\n" + extra;
}

PipelineConfig config(const std::string& text, std::vector<std::string> sets = {}) {
  return parse_pipeline(text, "engine-test.yaml", sets, testkit::builtin_registry());
}

std::vector<std::string> site_names() {
  const auto& reg = testkit::builtin_registry();
  PipelineConfig c = config(pipeline(1, 1));
  auto ds = reg.create<Dataset>(Kind::Dataset, "brainsim", c.data.dataset.args);
  std::vector<std::string> out;
  for (const auto& s : ds->load(DataRequest{11, {}}).sites) out.push_back(s.name);
  return out;
}

bool bit_identical(const NamedArrays& a, const NamedArrays& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end() || it->second.nbytes() != v.nbytes() ||
        std::memcmp(it->second.raw(), v.raw(), v.nbytes()) != 0)
      return false;
  }
  return true;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& f) {
  std::vector<nlohmann::json> out;
  std::ifstream in(f);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(Engine, RunWritesOutputsAndReportsEverySite) {
  testkit::TempDir dir;
  Experiment exp(config(pipeline(2, 1)), testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.str();
  RunSummary s = exp.run(o);
  EXPECT_EQ(s.rounds_completed, 2);
  ASSERT_EQ(s.sites.size(), 3u);
  for (const auto& r : s.sites) {
    ASSERT_TRUE(r.metrics.count("accuracy")) << r.site;
    EXPECT_GE(r.metrics.at("accuracy"), 0.0);
    EXPECT_LE(r.metrics.at("accuracy"), 1.0);
  }
  EXPECT_TRUE(s.worst.count("accuracy"));
  EXPECT_LE(s.worst.at("accuracy"), s.mean.at("accuracy"));
  for (const char* f : {"pipeline.yaml", "metrics.jsonl", "summary.json", "model.pt",
                        "global.state", "checkpoints/latest", "checkpoints/round-0002.ckpt"})
    EXPECT_TRUE(fs::exists(dir.path() / f)) << f;
  auto lines = read_jsonl(dir.path() / "metrics.jsonl");
  EXPECT_EQ(lines.size(), 6u);  // one line per site per round
  for (const auto& j : lines) EXPECT_TRUE(j.contains("metrics"));
  // A second run into the same folder is refused (nothing is overwritten silently).
  Experiment again(config(pipeline(2, 1)), testkit::builtin_registry());
  EXPECT_THROW(again.run(o), Error);
}

TEST(Engine, FailedSiteIsReportedAndRoundGoesOnWithKofN) {
  auto names = site_names();
  testkit::TempDir dir;
  Experiment exp(config(pipeline(2, 2)), testkit::builtin_registry());
  FaultPlan plan;
  plan.fail[{names[1], 1}] = "GPU on fire";
  exp.inject_faults(plan);
  RunOptions o;
  o.run_dir = dir.str();
  RunSummary s = exp.run(o);
  ASSERT_EQ(s.failures.size(), 1u);
  EXPECT_NE(s.failures[0].find("round 1"), std::string::npos) << s.failures[0];
  EXPECT_NE(s.failures[0].find(names[1]), std::string::npos) << s.failures[0];
  EXPECT_NE(s.failures[0].find("GPU on fire"), std::string::npos) << s.failures[0];
  auto lines = read_jsonl(dir.path() / "metrics.jsonl");
  for (const auto& j : lines) EXPECT_TRUE(j["aggregated"].get<bool>()) << j.dump();
}

TEST(Engine, TooFewRepliesLeaveTheGlobalModelUnchanged) {
  auto names = site_names();
  testkit::TempDir dir;
  Experiment exp(config(pipeline(1, 3)), testkit::builtin_registry());
  FaultPlan plan;
  plan.fail[{names[0], 1}] = "offline";
  exp.inject_faults(plan);
  RunOptions o;
  o.run_dir = dir.str();
  exp.run(o);
  auto lines = read_jsonl(dir.path() / "metrics.jsonl");
  ASSERT_FALSE(lines.empty());
  EXPECT_FALSE(lines[0]["aggregated"].get<bool>());
  // Global state equals a fresh initialisation with the same seed (no aggregation happened).
  testkit::TempDir dir2;
  Experiment zero(config(pipeline(1, 3)), testkit::builtin_registry());
  FaultPlan all;
  for (const auto& n : names) all.fail[{n, 1}] = "offline";
  zero.inject_faults(all);
  RunOptions o2;
  o2.run_dir = dir2.str();
  zero.run(o2);
  EXPECT_TRUE(bit_identical(exp.global_state(), zero.global_state()));
}

TEST(Engine, ResumedRunIsBitIdenticalToUninterruptedRun) {
  testkit::TempDir full_dir, cut_dir;
  Experiment full(config(pipeline(3, 1), {"federation.fraction=0.67"}),
                  testkit::builtin_registry());
  RunOptions o;
  o.run_dir = full_dir.str();
  full.run(o);

  {
    Experiment first(config(pipeline(3, 1), {"federation.fraction=0.67"}),
                     testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = cut_dir.str();
    cut.stop_after_round = 2;
    first.run(cut);
  }
  Experiment resumed(config(pipeline(3, 1), {"federation.fraction=0.67"}),
                     testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary s = resumed.run(r);
  EXPECT_EQ(s.rounds_completed, 3);
  EXPECT_TRUE(bit_identical(full.global_state(), resumed.global_state()));
  EXPECT_EQ(read_jsonl(full_dir.path() / "metrics.jsonl").size(),
            read_jsonl(cut_dir.path() / "metrics.jsonl").size());
  // And a different seed gives a different model (the check above can fail).
  testkit::TempDir other_dir;
  Experiment other(config(pipeline(3, 1), {"federation.fraction=0.67", "seed=12"}),
                   testkit::builtin_registry());
  RunOptions oo;
  oo.run_dir = other_dir.str();
  other.run(oo);
  EXPECT_FALSE(bit_identical(full.global_state(), other.global_state()));
}

TEST(Engine, ResumeRefusesAChangedPipeline) {
  testkit::TempDir dir;
  {
    Experiment first(config(pipeline(2, 1)), testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = dir.str();
    cut.stop_after_round = 1;
    first.run(cut);
  }
  Experiment changed(config(pipeline(2, 1), {"training.lr=0.5"}), testkit::builtin_registry());
  RunOptions r;
  r.run_dir = dir.str();
  r.resume = true;
  EXPECT_THROW(changed.run(r), Error);
}

namespace {
class Null : public Aggregator {
 public:
  NamedArrays aggregate(const NamedArrays& g, const std::vector<SiteUpdate>&,
                        const RoundInfo&) override {
    return g;
  }
};
}  // namespace

TEST(Coordinator, SelectionIsSeededAndHonoursFractionAndAvailability) {
  InProcessChannel ch;
  Null agg;
  Coordinator c(ch, agg, 5);
  std::vector<std::string> sites;
  for (int i = 0; i < 20; ++i) sites.push_back("s" + std::to_string(i));
  auto a = c.select(3, sites, 0.25, 1.0, {});
  EXPECT_EQ(a.size(), 5u);
  EXPECT_EQ(a, c.select(3, sites, 0.25, 1.0, {}));
  EXPECT_NE(a, c.select(4, sites, 0.25, 1.0, {}));
  // Never-available sites are never selected; availability 0.5 leaves about half.
  std::map<std::string, double> never{{"s0", 0.0}, {"s1", 0.0}};
  int total = 0;
  for (int r = 1; r <= 50; ++r) {
    auto s = c.select(r, sites, 1.0, 0.5, never);
    for (const auto& x : s) EXPECT_TRUE(x != "s0" && x != "s1");
    total += int(s.size());
  }
  EXPECT_GT(total, 50 * 18 * 0.35);
  EXPECT_LT(total, 50 * 18 * 0.65);
}

TEST(Coordinator, RejectsNonFiniteUpdatesNamingTheSite) {
  InProcessChannel ch;
  auto reply_with = [](float v) {
    return [v](const Bytes&) {
      Message m;
      m.type = "update";
      m.arrays["w"] = Array::from(std::vector<float>{v, 1});
      m.scalars["num_samples"] = 1;
      return encode(m);
    };
  };
  ch.connect("good", reply_with(2));
  ch.connect("bad", reply_with(NAN));
  Null agg;
  Coordinator c(ch, agg, 1);
  c.set_global({{"w", Array::from(std::vector<float>{0, 0})}});
  auto out = c.train_round(1, 1, {"good", "bad"}, {}, 1);
  ASSERT_EQ(out.updates.size(), 1u);
  EXPECT_EQ(out.updates[0].site, "good");
  ASSERT_EQ(out.failures.size(), 1u);
  EXPECT_NE(out.failures[0].find("'bad'"), std::string::npos);
  EXPECT_NE(out.failures[0].find("non-finite"), std::string::npos);
}
