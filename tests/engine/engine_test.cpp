#include <concord/dataset.h>
#include <concord/engine.h>
#include <concord/fault_injection.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <algorithm>
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
  test_seam::FaultPlan plan;
  plan.fail[{names[1], 1}] = "GPU on fire";
  test_seam::inject_faults(exp, plan);
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
  test_seam::FaultPlan plan;
  plan.fail[{names[0], 1}] = "offline";
  test_seam::inject_faults(exp, plan);
  RunOptions o;
  o.run_dir = dir.str();
  exp.run(o);
  auto lines = read_jsonl(dir.path() / "metrics.jsonl");
  ASSERT_FALSE(lines.empty());
  EXPECT_FALSE(lines[0]["aggregated"].get<bool>());
  // Global state equals a fresh initialisation with the same seed (no aggregation happened).
  testkit::TempDir dir2;
  Experiment zero(config(pipeline(1, 3)), testkit::builtin_registry());
  test_seam::FaultPlan all;
  for (const auto& n : names) all.fail[{n, 1}] = "offline";
  test_seam::inject_faults(zero, all);
  RunOptions o2;
  o2.run_dir = dir2.str();
  zero.run(o2);
  EXPECT_TRUE(testkit::bit_identical(exp.global_state(), zero.global_state()));
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
    cut.stop_after = [](int r) { return r == 2; };
    first.run(cut);
  }
  Experiment resumed(config(pipeline(3, 1), {"federation.fraction=0.67"}),
                     testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary s = resumed.run(r);
  EXPECT_EQ(s.rounds_completed, 3);
  EXPECT_TRUE(testkit::bit_identical(full.global_state(), resumed.global_state()));
  EXPECT_EQ(read_jsonl(full_dir.path() / "metrics.jsonl").size(),
            read_jsonl(cut_dir.path() / "metrics.jsonl").size());
  // And a different seed gives a different model (the check above can fail).
  testkit::TempDir other_dir;
  Experiment other(config(pipeline(3, 1), {"federation.fraction=0.67", "seed=12"}),
                   testkit::builtin_registry());
  RunOptions oo;
  oo.run_dir = other_dir.str();
  other.run(oo);
  EXPECT_FALSE(testkit::bit_identical(full.global_state(), other.global_state()));
}

TEST(Engine, ResumeRefusesAChangedPipeline) {
  testkit::TempDir dir;
  {
    Experiment first(config(pipeline(2, 1)), testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = dir.str();
    cut.stop_after = [](int r) { return r == 1; };
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
  Coordinator c(ch, 5);
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

// Site selection is the same on every platform (seed.h samplers): availability draws and the
// sample of sites. The golden lists come from an independent reimplementation (tests/seed).
TEST(Coordinator, SelectionIsPinnedOnEveryPlatform) {
  InProcessChannel ch;
  Coordinator c(ch, 1);
  std::vector<std::string> sites;
  for (int i = 0; i < 20; ++i) sites.push_back("s" + std::to_string(i));
  EXPECT_EQ(c.select(3, sites, 0.25, 1.0, {}),
            (std::vector<std::string>{"s2", "s3", "s9", "s17", "s19"}));
  EXPECT_EQ(
      c.select(4, sites, 1.0, 0.5, {}),
      (std::vector<std::string>{"s0", "s3", "s4", "s7", "s8", "s10", "s12", "s15", "s17", "s19"}));
}

TEST(Coordinator, RejectsNonFiniteUpdatesNamingTheSite) {
  InProcessChannel ch;
  auto reply_with = [](float v) {
    return [v](const Bytes&) {
      return encode(
          protocol::update("site", 1, {{"w", Array::from(std::vector<float>{v, 1})}}, 1, 0.5, 3));
    };
  };
  ch.connect("good", reply_with(2));
  ch.connect("bad", reply_with(NAN));
  Null agg;
  Coordinator c(ch, 1);
  Aggregator& aggregator = agg;
  c.set_global({{"w", Array::from(std::vector<float>{0, 0})}});
  auto out = c.train_round(aggregator, 1, 1, {"good", "bad"}, {}, 1);
  ASSERT_EQ(out.updates.size(), 1u);
  EXPECT_EQ(out.updates[0].site, "good");
  ASSERT_EQ(out.failures.size(), 1u);
  EXPECT_NE(out.failures[0].find("'bad'"), std::string::npos);
  EXPECT_NE(out.failures[0].find("non-finite"), std::string::npos);
}

// ---- misbehaving sites and careless pipelines (issue 8) -----------------------------------

namespace {

NamedArrays sample_global() {
  return {{"w", Array::from(std::vector<float>{0, 0})},
          {"n", Array::from(std::vector<int64_t>{0})}};
}

// A site replying to "train" with `edit` applied to an otherwise good upload.
SiteHandler replying(const std::function<void(Message&)>& edit) {
  return [edit](const Bytes&) {
    NamedArrays state = sample_global();
    state["w"] = Array::from(std::vector<float>{1, 2});
    Message m = protocol::update("site", 1, std::move(state), 4, 0.5, 3);
    if (edit) edit(m);
    return encode(m);
  };
}

// Runs `c` into `dir` with the faults of `plan`.
RunSummary run_with(const PipelineConfig& c, test_seam::FaultPlan plan,
                    const testkit::TempDir& dir) {
  Experiment exp(c, testkit::builtin_registry());
  test_seam::inject_faults(exp, std::move(plan));
  RunOptions o;
  o.run_dir = dir.str();
  return exp.run(o);
}

// A fault plan in which `site` rewrites its replies of `type` (in round `round`; -1: any) with
// `edit`: a misbehaving peer.
test_seam::FaultPlan tampering(const std::string& site, const std::string& type,
                               std::function<void(Message&)> edit, int round = -1) {
  test_seam::FaultPlan plan;
  plan.tamper = [=](const std::string& from, Message& reply) {
    if (from == site && reply.type == type && (round < 0 || reply.round == round)) edit(reply);
  };
  return plan;
}

class Counting : public Aggregator {
 public:
  std::vector<std::string> seen;
  NamedArrays aggregate(const NamedArrays& g, const std::vector<SiteUpdate>& updates,
                        const RoundInfo&) override {
    for (const auto& u : updates) seen.push_back(u.site);
    return g;
  }
};

}  // namespace

TEST(Coordinator, RejectsEveryMalformedUploadByNameAndAggregatesTheOthers) {
  const std::vector<std::pair<std::string, std::function<void(Message&)>>> cases = {
      {"expected float32 [2]",
       [](Message& m) { m.arrays["w"] = Array::from(std::vector<float>{1}); }},
      {"expected float32 [2]",
       [](Message& m) {
         m.arrays["w"] = Array::from(std::vector<float>{1, 2}, {1, 2});
       }},
      {"expected float32 [2]",
       [](Message& m) {
         m.arrays["w"] = Array::from(std::vector<double>{1, 2});
       }},
      {"lacks entry 'n'", [](Message& m) { m.arrays.erase("n"); }},
      {"unexpected entry 'extra'",
       [](Message& m) { m.arrays["extra"] = Array::from(std::vector<float>{1}); }},
      {"num_samples", [](Message& m) { m.scalars[protocol::kNumSamples] = -3; }},
      {"num_samples", [](Message& m) { m.scalars[protocol::kNumSamples] = NAN; }},
      {"num_samples", [](Message& m) { m.scalars[protocol::kNumSamples] = 1e300; }},
      {"num_samples", [](Message& m) { m.scalars[protocol::kNumSamples] = 2.5; }},
      {"num_samples", [](Message& m) { m.scalars.erase(protocol::kNumSamples); }},
      {"non-finite train_loss", [](Message& m) { m.scalars[protocol::kTrainLoss] = INFINITY; }},
      {"no train_loss", [](Message& m) { m.scalars.erase(protocol::kTrainLoss); }},
      {"replied 'metrics'", [](Message& m) { m.type = protocol::kMetrics; }},
      {"speaks protocol version '0'; this build speaks protocol version " +
           std::to_string(protocol::kVersion),
       [](Message& m) { m.text[protocol::kVersionKey] = "0"; }},
      {"carries no protocol version", [](Message& m) { m.text.clear(); }},
  };
  for (const auto& [expect, edit] : cases) {
    SCOPED_TRACE(expect);
    InProcessChannel ch;
    ch.connect("good-1", replying(nullptr));
    ch.connect("bad", replying(edit));
    ch.connect("good-2", replying(nullptr));
    Counting agg;
    Coordinator c(ch, 1);
    Aggregator& aggregator = agg;
    c.set_global(sample_global());
    auto out = c.train_round(aggregator, 1, 1, {"good-1", "bad", "good-2"}, {}, 2);
    EXPECT_TRUE(out.aggregated) << out.not_aggregated;
    EXPECT_EQ(agg.seen, (std::vector<std::string>{"good-1", "good-2"}));
    ASSERT_EQ(out.failures.size(), 1u);
    EXPECT_NE(out.failures[0].find("site 'bad'"), std::string::npos) << out.failures[0];
    EXPECT_NE(out.failures[0].find(expect), std::string::npos) << out.failures[0];
  }
}

TEST(Coordinator, ZeroSampleUploadIsSkippedNotWeighed) {
  InProcessChannel ch;
  ch.connect("good", replying(nullptr));
  ch.connect("empty", replying([](Message& m) { m.scalars[protocol::kNumSamples] = 0; }));
  Counting agg;
  Coordinator c(ch, 1);
  Aggregator& aggregator = agg;
  c.set_global(sample_global());
  auto out = c.train_round(aggregator, 1, 1, {"good", "empty"}, {}, 1);
  EXPECT_TRUE(out.aggregated);
  EXPECT_EQ(agg.seen, std::vector<std::string>{"good"});
  EXPECT_EQ(out.skipped, std::vector<std::string>{"empty"});
  EXPECT_TRUE(out.failures.empty());
}

TEST(Coordinator, AFailingAggregatorCostsTheRoundNotTheRun) {
  struct Throwing : Aggregator {  // with server state it advances before throwing
    int64_t steps = 0;
    NamedArrays aggregate(const NamedArrays&, const std::vector<SiteUpdate>&,
                          const RoundInfo&) override {
      ++steps;
      throw std::runtime_error("shapes disagree");
    }
    NamedArrays state() const override {
      return {{"steps", Array::from(std::vector<int64_t>{steps})}};
    }
    void load_state(const NamedArrays& s) override { steps = s.at("steps").data<int64_t>()[0]; }
  };
  struct Misshapen : Aggregator {
    NamedArrays aggregate(const NamedArrays& g, const std::vector<SiteUpdate>&,
                          const RoundInfo&) override {
      NamedArrays out = g;
      out["w"] = Array::from(std::vector<float>{1, 2, 3});
      return out;
    }
  };
  struct NonFinite : Aggregator {
    NamedArrays aggregate(const NamedArrays& g, const std::vector<SiteUpdate>&,
                          const RoundInfo&) override {
      NamedArrays out = g;
      out["w"] = Array::from(std::vector<float>{NAN, 2});
      return out;
    }
  };
  Throwing t;
  Misshapen m;
  NonFinite n;
  for (auto [agg, expect] : std::vector<std::pair<Aggregator*, std::string>>{
           {&t, "shapes disagree"}, {&m, "expected float32 [2]"}, {&n, "non-finite"}}) {
    SCOPED_TRACE(expect);
    InProcessChannel ch;
    ch.connect("a", replying(nullptr));
    Coordinator c(ch, 1);
    Aggregator& aggregator = *agg;
    c.set_global(sample_global());
    auto out = c.train_round(aggregator, 1, 1, {"a"}, {}, 1);
    EXPECT_FALSE(out.aggregated);
    EXPECT_NE(out.not_aggregated.find("aggregation failed"), std::string::npos);
    EXPECT_NE(out.not_aggregated.find(expect), std::string::npos) << out.not_aggregated;
    EXPECT_TRUE(testkit::bit_identical(c.global(), sample_global()));  // unchanged
  }
  EXPECT_EQ(t.steps, 0) << "the aggregator's server state is put back after a failed round";
}

// Through the whole engine: a site uploads a tensor of the wrong shape in round 1. The run
// completes, the site is named, the other two sites were aggregated that round.
TEST(Engine, MisshapenUploadIsRejectedAndTheRunCompletes) {
  auto names = site_names();
  testkit::TempDir dir;
  const std::string bad = names[1];
  test_seam::FaultPlan plan = tampering(
      bad, protocol::kUpdate,
      [](Message& m) {
        m.arrays.begin()->second = Array::from(std::vector<float>{1, 2, 3});
      },
      1);
  RunSummary s = run_with(config(pipeline(2, 2)), plan, dir);
  EXPECT_EQ(s.rounds_completed, 2);
  ASSERT_EQ(s.failures.size(), 1u);
  EXPECT_NE(s.failures[0].find("round 1: site '" + bad + "'"), std::string::npos) << s.failures[0];
  EXPECT_NE(s.failures[0].find("(rejected)"), std::string::npos) << s.failures[0];
  int trained_round1 = 0;
  for (const auto& j : read_jsonl(dir.path() / "metrics.jsonl")) {
    EXPECT_TRUE(j["aggregated"].get<bool>()) << j.dump();
    if (j["round"] == 1 && j.contains(protocol::kTrainLoss)) ++trained_round1;
  }
  EXPECT_EQ(trained_round1, 2);
  auto summary = nlohmann::json::parse(std::ifstream(dir.path() / "summary.json"));
  EXPECT_FALSE(summary["ok"].get<bool>());
  EXPECT_EQ(summary["failures"].size(), 1u);
}

// A site sending harmonizer statistics of another shape than the others is left out of the
// combination, by name; the run goes on with the rest.
TEST(Engine, MisshapenHarmonizerStatisticsAreLeftOutByName) {
  auto names = site_names();
  testkit::TempDir dir;
  const std::string bad = names[2];
  test_seam::FaultPlan plan = tampering(bad, protocol::kStats, [](Message& m) {
    ASSERT_FALSE(m.arrays.empty());
    m.arrays.begin()->second = Array::from(std::vector<float>{1, 2, 3, 4, 5});
  });
  RunSummary s =
      run_with(config(pipeline(1, 1, "harmonizers:\n  - {type: histogram-match}\n")), plan, dir);
  EXPECT_EQ(s.rounds_completed, 1);
  ASSERT_EQ(s.failures.size(), 1u) << testing::PrintToString(s.failures);
  EXPECT_NE(s.failures[0].find("fit: harmonizer 0 (histogram-match): site '" + bad + "'"),
            std::string::npos)
      << s.failures[0];
  EXPECT_NE(s.failures[0].find("left out"), std::string::npos) << s.failures[0];
}

// Evaluation replies are checked too, and a site failing its evaluation is a failure.
TEST(Engine, BadEvaluationRepliesAreNamedFailures) {
  auto names = site_names();
  testkit::TempDir dir;
  const std::string bad = names[0];
  test_seam::FaultPlan plan =
      tampering(bad, protocol::kMetrics, [](Message& m) { m.scalars["accuracy"] = INFINITY; });
  const std::string crashing = names[1];  // and one whose evaluation throws
  plan.tamper = [crashing, inf = plan.tamper](const std::string& site, Message& reply) {
    if (site == crashing && reply.type == protocol::kMetrics)
      throw std::runtime_error("out of memory");
    inf(site, reply);
  };
  RunSummary s = run_with(config(pipeline(1, 1)), plan, dir);
  ASSERT_EQ(s.failures.size(), 2u) << testing::PrintToString(s.failures);
  EXPECT_NE(s.failures[0].find("evaluate (global): site '" + bad + "'"), std::string::npos)
      << s.failures[0];
  EXPECT_NE(s.failures[0].find("infinite"), std::string::npos) << s.failures[0];
  EXPECT_NE(s.failures[1].find("evaluate (global): site '" + crashing + "': out of memory"),
            std::string::npos)
      << s.failures[1];
  ASSERT_EQ(s.sites.size(), 3u);  // the third site's results are there
  EXPECT_TRUE(s.sites[2].metrics.count("accuracy"));
}

// Site names and failure messages come from data and peers: bytes that are not UTF-8 must not
// stop summary.json (and its failure list) from being written.
TEST(Engine, InvalidUtf8InFailuresStillWritesTheSummary) {
  auto names = site_names();
  testkit::TempDir dir;
  test_seam::FaultPlan plan;
  plan.fail[{names[0], 1}] = "cannot read scan-\xff\xfe.nii";
  RunSummary s = run_with(config(pipeline(1, 1)), plan, dir);
  ASSERT_EQ(s.failures.size(), 1u);
  auto summary = nlohmann::json::parse(std::ifstream(dir.path() / "summary.json"));
  ASSERT_EQ(summary["failures"].size(), 1u);
  EXPECT_NE(summary["failures"][0].get<std::string>().find("cannot read scan-"), std::string::npos);
}

// A round in which nothing was aggregated is a failure of the run, not a quiet no-op.
TEST(Engine, RoundsThatAggregateNothingAreFailures) {
  auto names = site_names();
  testkit::TempDir dir;
  std::string never = "federation.site_availability={";
  for (const auto& n : names) never += n + ": 0, ";
  RunSummary s = run_with(config(pipeline(2, 1), {never + "}"}), {}, dir);
  ASSERT_EQ(s.failures.size(), 2u) << testing::PrintToString(s.failures);
  EXPECT_NE(s.failures[0].find("round 1: not aggregated: no site was available"), std::string::npos)
      << s.failures[0];
  EXPECT_NE(s.failures[1].find("round 2: not aggregated"), std::string::npos) << s.failures[1];
}

TEST(Engine, ZeroSampleUploadIsReportedAsSkippedWithoutALoss) {
  auto names = site_names();
  testkit::TempDir dir;
  const std::string empty = names[0];
  test_seam::FaultPlan plan =
      tampering(empty, protocol::kUpdate, [](Message& m) { m.scalars[protocol::kNumSamples] = 0; });
  RunSummary s = run_with(config(pipeline(1, 1)), plan, dir);
  EXPECT_TRUE(s.failures.empty()) << testing::PrintToString(s.failures);
  for (const auto& j : read_jsonl(dir.path() / "metrics.jsonl")) {
    if (j["site"] != empty) continue;
    EXPECT_FALSE(j.contains(protocol::kTrainLoss)) << j.dump();
    EXPECT_EQ(j.value("skipped", ""), "no training samples") << j.dump();
  }
}

TEST(Engine, FailedSetUpLeavesNoRunFolder) {
  testkit::TempDir dir;
  Experiment exp(config(pipeline(1, 1, "evaluation: {held_out: [nowhere]}\n")),
                 testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.str() + "/run";
  EXPECT_THROW(exp.run(o), Error);
  EXPECT_FALSE(fs::exists(o.run_dir));
}

// Killed before its first checkpoint: the folder holds pipeline.yaml and nothing to restore.
// Resuming starts again from round 1 and ends where an uninterrupted run ends.
TEST(Engine, ResumeBeforeTheFirstCheckpointStartsFromRoundOne) {
  testkit::TempDir full_dir, cut_dir;
  PipelineConfig c = config(pipeline(2, 1));
  Experiment full(c, testkit::builtin_registry());
  RunOptions o;
  o.run_dir = full_dir.str();
  full.run(o);
  fs::create_directories(cut_dir.path() / "checkpoints");
  std::ofstream(cut_dir.path() / "pipeline.yaml") << c.resolved_yaml;
  std::ofstream(cut_dir.path() / "metrics.jsonl") << "{\"round\": 1, \"site\": \"x\"";  // cut
  Experiment resumed(c, testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary s = resumed.run(r);
  EXPECT_EQ(s.rounds_completed, 2);
  EXPECT_TRUE(testkit::bit_identical(full.global_state(), resumed.global_state()));
  EXPECT_EQ(read_jsonl(full_dir.path() / "metrics.jsonl").size(),
            read_jsonl(cut_dir.path() / "metrics.jsonl").size());
}

// A truncated latest checkpoint is named and the previous one used; the result is the same as
// an uninterrupted run. With every checkpoint unreadable, the error names each file.
TEST(Engine, TruncatedLatestCheckpointFallsBackToThePreviousOne) {
  testkit::TempDir full_dir, cut_dir;
  PipelineConfig c = config(pipeline(3, 1));
  Experiment full(c, testkit::builtin_registry());
  RunOptions o;
  o.run_dir = full_dir.str();
  full.run(o);
  {
    Experiment first(c, testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = cut_dir.str();
    cut.stop_after = [](int r) { return r == 2; };
    first.run(cut);
  }
  const fs::path ckpt = cut_dir.path() / "checkpoints";
  fs::resize_file(ckpt / "round-0002.ckpt", fs::file_size(ckpt / "round-0002.ckpt") / 2);
  testkit::TempDir copy_dir;
  const fs::path copy = copy_dir.path() / "run";
  fs::copy(cut_dir.path(), copy, fs::copy_options::recursive);
  Experiment resumed(c, testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary s = resumed.run(r);
  EXPECT_EQ(s.rounds_completed, 3);
  EXPECT_TRUE(testkit::bit_identical(full.global_state(), resumed.global_state()));

  fs::resize_file(copy / "checkpoints" / "round-0001.ckpt", 10);
  Experiment none(c, testkit::builtin_registry());
  r.run_dir = copy.string();
  try {
    none.run(r);
    FAIL() << "no readable checkpoint must be an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("round-0002.ckpt"), std::string::npos) << m;
    EXPECT_NE(m.find("round-0001.ckpt"), std::string::npos) << m;
  }
}

// A partition can leave a site without training samples: it trains nothing, uploads nothing to
// weigh, and metrics.jsonl says it was skipped instead of claiming a loss of 0.
TEST(Engine, SiteWithoutTrainingSamplesIsSkipped) {
  testkit::TempDir dir;
  PipelineConfig c =
      config(pipeline(1, 1), {"data.partition={scheme: dirichlet, sites: 8, alpha: 0.01, "
                              "min_samples: 0}",
                              "data.dataset.args.sites=2", "data.dataset.args.train_per_site=6"});
  RunSummary s = run_with(c, {}, dir);
  EXPECT_TRUE(s.failures.empty()) << testing::PrintToString(s.failures);
  int skipped = 0, trained = 0;
  for (const auto& j : read_jsonl(dir.path() / "metrics.jsonl")) {
    if (j.contains("skipped")) {
      ++skipped;
      EXPECT_FALSE(j.contains(protocol::kTrainLoss)) << j.dump();
    }
    if (j.contains(protocol::kTrainLoss)) {
      ++trained;
      EXPECT_GT(j[protocol::kNumSamples].get<double>(), 0) << j.dump();
    }
  }
  EXPECT_GT(skipped, 0) << "the partition must leave a site without training samples";
  EXPECT_GT(trained, 0);
}

TEST(Protocol, StatisticsAndMetricsRepliesAreChecked) {
  Stats good_stats;
  good_stats.arrays["mean"] = Array::from(std::vector<double>{1, 2, 3});
  good_stats.weight = 2;
  const Message good = protocol::statistics("a", good_stats);
  ASSERT_TRUE(protocol::read_statistics(Message(good)).ok());
  EXPECT_EQ(protocol::read_statistics(Message(good)).value->weight, 2);
  // What read_statistics refuses on its own, and what differs from the other sites' statistics.
  const std::vector<std::pair<std::string, std::function<void(Message&)>>> cases = {
      {"replied 'ack'", [](Message& m) { m.type = protocol::kAck; }},
      {"non-finite values in 'mean'",
       [](Message& m) {
         m.arrays["mean"] = Array::from(std::vector<double>{1, NAN, 3});
       }},
      {"negative weight", [](Message& m) { m.scalars[protocol::kWeight] = -1; }},
      {"non-finite __weight", [](Message& m) { m.scalars[protocol::kWeight] = INFINITY; }},
      {"lack scalar '__weight'", [](Message& m) { m.scalars.clear(); }},
      {"speaks protocol version '99'", [](Message& m) { m.text[protocol::kVersionKey] = "99"; }},
      {"entry 'mean' is float64 [2], expected float64 [3]",
       [](Message& m) {
         m.arrays["mean"] = Array::from(std::vector<double>{1, 2});
       }},
      {"unexpected scalar 'x'", [](Message& m) { m.scalars["x"] = 1; }},
  };
  for (const auto& [expect, edit] : cases) {
    Message bad = good;
    edit(bad);
    auto read = protocol::read_statistics(std::move(bad));
    const std::string why =
        read.ok() ? protocol::statistics_mismatch(*read.value, good_stats) : read.problem;
    EXPECT_NE(why.find(expect), std::string::npos) << expect << ": " << why;
  }
  std::map<std::string, double> values{{"roc-auc", NAN}};  // undefined (one class): allowed
  auto metrics =
      protocol::read_metrics(protocol::metrics("a", 1, protocol::kPhaseGlobal, 4, values));
  ASSERT_TRUE(metrics.ok()) << metrics.problem;
  EXPECT_EQ(metrics.value->num_test, 4);
  EXPECT_EQ(metrics.value->values.size(), 1u);  // num_test is not a metric
  values["accuracy"] = -INFINITY;
  EXPECT_NE(protocol::read_metrics(protocol::metrics("a", 1, protocol::kPhaseGlobal, 4, values))
                .problem.find("accuracy is infinite"),
            std::string::npos);
}

namespace {

// Passes every exchange on, recording (site, request type); optionally rewrites requests.
class Recorder : public Channel {
 public:
  Recorder(Channel& inner, std::vector<std::pair<std::string, std::string>>& log,
           std::function<void(Message&)> rewrite = nullptr)
      : inner_(inner), log_(log), rewrite_(std::move(rewrite)) {}
  Bytes call(const std::string& site, const Bytes& request) override {
    Message m = decode(request);
    log_.emplace_back(site, m.type);
    if (!rewrite_) return inner_.call(site, request);
    rewrite_(m);
    return inner_.call(site, encode(m));
  }

 private:
  Channel& inner_;
  std::vector<std::pair<std::string, std::string>>& log_;
  std::function<void(Message&)> rewrite_;
};

size_t count(const std::vector<std::pair<std::string, std::string>>& log, const std::string& site,
             const std::string& type) {
  return size_t(std::count(log.begin(), log.end(), std::make_pair(site, type)));
}

const std::string kFedBN = "adapter: {type: batchnorm, args: {policy: local}}\n";

}  // namespace

// Checkpoints hold every site's own state (FedBN: its BatchNorm entries), which the coordinator
// gets by asking each site through the Channel and gives back the same way on resume.
TEST(Engine, CheckpointsAskEachSiteForItsStateThroughTheChannel) {
  const auto sites = site_names();
  testkit::TempDir full_dir, cut_dir;
  Experiment full(config(pipeline(3, 1, kFedBN)), testkit::builtin_registry());
  RunOptions o;
  o.run_dir = full_dir.str();
  full.run(o);

  std::vector<std::pair<std::string, std::string>> first_log, resume_log;
  {
    Experiment first(config(pipeline(3, 1, kFedBN)), testkit::builtin_registry());
    first.interpose_channel(
        [&](Channel& inner) { return std::make_unique<Recorder>(inner, first_log); });
    RunOptions cut;
    cut.run_dir = cut_dir.str();
    cut.stop_after = [](int r) { return r == 2; };
    first.run(cut);
  }
  for (const auto& s : sites) {
    EXPECT_EQ(count(first_log, s, protocol::kExportState), 2u) << s;  // one per round
    EXPECT_EQ(count(first_log, s, protocol::kRestoreState), 0u) << s;
  }
  Experiment resumed(config(pipeline(3, 1, kFedBN)), testkit::builtin_registry());
  resumed.interpose_channel(
      [&](Channel& inner) { return std::make_unique<Recorder>(inner, resume_log); });
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  resumed.run(r);
  for (const auto& s : sites) {
    EXPECT_EQ(count(resume_log, s, protocol::kRestoreState), 1u) << s;
    // Restored before the site trains again.
    auto restore = std::find(resume_log.begin(), resume_log.end(),
                             std::make_pair(s, std::string(protocol::kRestoreState)));
    auto train = std::find(resume_log.begin(), resume_log.end(),
                           std::make_pair(s, std::string(protocol::kTrain)));
    EXPECT_LT(restore - resume_log.begin(), train - resume_log.begin()) << s;
  }
  EXPECT_TRUE(testkit::bit_identical(full.global_state(), resumed.global_state()));
}

// A state that does not fit the site's model is refused by the site, by name, before anything
// is installed; with no other checkpoint the resume fails naming the site and the entry.
TEST(Engine, ASiteRefusesARestoredStateThatDoesNotFitItsModel) {
  testkit::TempDir dir;
  {
    Experiment first(config(pipeline(2, 1, kFedBN)), testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = dir.str();
    cut.stop_after = [](int r) { return r == 1; };
    first.run(cut);
  }
  std::vector<std::pair<std::string, std::string>> log;
  Experiment resumed(config(pipeline(2, 1, kFedBN)), testkit::builtin_registry());
  std::string victim;
  resumed.interpose_channel([&](Channel& inner) {
    return std::make_unique<Recorder>(inner, log, [&](Message& m) {
      if (m.type != protocol::kRestoreState || !victim.empty()) return;
      for (auto& [k, v] : m.arrays)
        if (k.rfind("local/", 0) == 0) {
          victim = k.substr(6);
          v = Array::from(std::vector<float>{1, 2, 3});  // not the entry's shape
          return;
        }
    });
  });
  RunOptions r;
  r.run_dir = dir.str();
  r.resume = true;
  const std::string err = testkit::error_of([&] { resumed.run(r); });
  ASSERT_FALSE(victim.empty()) << "FedBN sites must have local entries to restore";
  EXPECT_NE(err.find("cannot resume"), std::string::npos) << err;
  EXPECT_NE(err.find(victim), std::string::npos) << err;
  EXPECT_NE(err.find("site '"), std::string::npos) << err;
}
