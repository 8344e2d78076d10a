// The pipeline's `privacy:` through the engine: the noise multiplier planned before the run,
// epsilon in every metrics line and in summary.json, the accountant in checkpoints (a resumed run
// ends with the same epsilon), a round refused when it would exceed the budget, clipping at the
// site.
#include <concord/dp_accountant.h>
#include <concord/dp_mechanism.h>
#include <concord/engine.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string pipeline(int rounds, const std::string& extra) {
  return "name: privacy-test\nseed: 5\n"
         "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: 12, test_per_site: "
         "6, size: 32}}\n"
         "model: {type: cnn, args: {width: 8, depth: 2}}\n"
         "training: {local_epochs: 1, batch_size: 6, lr: 0.01}\n"
         "federation: {rounds: " +
         std::to_string(rounds) + "}\n" + extra;
}

PipelineConfig config(const std::string& text, std::vector<std::string> sets = {}) {
  return parse_pipeline(text, "privacy-test.yaml", sets, testkit::builtin_registry());
}

std::vector<json> read_jsonl(const fs::path& f) {
  std::vector<json> out;
  std::ifstream in(f);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

json read_json(const fs::path& f) {
  std::ifstream in(f);
  return json::parse(in);
}

RunSummary run(Experiment& e, const std::string& dir) {
  RunOptions o;
  o.run_dir = dir;
  return e.run(o);
}

// Records every update a site sends (decoded) and every train request it receives.
class Recorder : public Channel {
 public:
  Recorder(Channel& inner, std::vector<Message>& requests, std::vector<Message>& replies)
      : inner_(inner), requests_(requests), replies_(replies) {}
  Bytes call(const std::string& site, const Bytes& request) override {
    Message in = decode(request);
    Bytes reply = inner_.call(site, request);
    if (in.type == protocol::kTrain) {
      requests_.push_back(in);
      replies_.push_back(decode(reply));
    }
    return reply;
  }

 private:
  Channel& inner_;
  std::vector<Message>& requests_;
  std::vector<Message>& replies_;
};

const std::string kPrivacy = "privacy: {epsilon: 8, delta: 1.0e-5, clip: 0.5}\n";

}  // namespace

TEST(PrivacyRun, PipelineKeyIsValidatedWithLineAndColumn) {
  const std::string err = testkit::error_of(
      [&] { config(pipeline(2, "privacy: {epsilon: 8, mode: centrl, clipp: 1}\n")); });
  EXPECT_NE(err.find("privacy-test.yaml:8:"), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean 'clip'"), std::string::npos) << err;
  EXPECT_NE(err.find("centrl"), std::string::npos) << err;
  const std::string missing = testkit::error_of([&] { config(pipeline(2, "privacy: {}\n")); });
  EXPECT_NE(missing.find("missing required 'epsilon'"), std::string::npos) << missing;
  PipelineConfig c = config(pipeline(2, kPrivacy));
  ASSERT_TRUE(c.privacy);
  EXPECT_EQ(c.privacy->mode, "central");
  EXPECT_EQ(c.privacy->sampling, "none");
  EXPECT_DOUBLE_EQ(c.privacy->clip, 0.5);
  EXPECT_NE(c.resolved_yaml.find("privacy:"), std::string::npos);
  EXPECT_FALSE(config(pipeline(2, "")).privacy);
}

// Epsilon after each round is the accountant's for the planned noise multiplier, written in every
// metrics line, in summary.json (as the HTML report reads it) and in the terminal summary line.
TEST(PrivacyRun, EpsilonIsLoggedEveryRoundAndStaysWithinTheBudget) {
  testkit::TempDir dir;
  Experiment e(config(pipeline(3, kPrivacy)), testkit::builtin_registry());
  RunSummary s = run(e, dir.str());
  EXPECT_TRUE(s.failures.empty());
  EXPECT_NE(s.privacy.find("epsilon"), std::string::npos) << s.privacy;
  const double z = dp::noise_multiplier_for(8, 1e-5, 1.0, 3);
  dp::RdpAccountant reference;
  std::map<int, double> eps;
  for (const auto& line : read_jsonl(dir.path() / "metrics.jsonl")) {
    ASSERT_TRUE(line.contains("privacy")) << line.dump();
    EXPECT_EQ(line["privacy"]["level"], "client");
    EXPECT_EQ(line["privacy"]["sampling"], "none");
    EXPECT_DOUBLE_EQ(line["privacy"]["delta"].get<double>(), 1e-5);
    EXPECT_DOUBLE_EQ(line["privacy"]["noise_multiplier"].get<double>(), z);
    eps[line["round"].get<int>()] = line["privacy"]["epsilon"].get<double>();
  }
  ASSERT_EQ(eps.size(), 3u);
  for (int r = 1; r <= 3; ++r) {
    reference.step(z, 1.0);
    EXPECT_NEAR(eps[r], reference.epsilon(1e-5).epsilon, 1e-12) << r;
    if (r > 1) {
      EXPECT_GT(eps[r], eps[r - 1]);
    }
  }
  EXPECT_LE(eps[3], 8.0);
  EXPECT_GT(eps[3], 7.5);  // the planned z spends nearly all of it
  const json summary = read_json(dir.path() / "summary.json");
  EXPECT_DOUBLE_EQ(summary["privacy"]["epsilon"].get<double>(), eps[3]);
  EXPECT_DOUBLE_EQ(summary["privacy"]["budget"].get<double>(), 8.0);
  EXPECT_EQ(summary["privacy"]["rounds_accounted"], 3);
}

TEST(PrivacyRun, ResumedRunKeepsTheBudget) {
  testkit::TempDir full_dir, cut_dir;
  const std::string text = pipeline(3, kPrivacy);
  Experiment full(config(text), testkit::builtin_registry());
  run(full, full_dir.str());
  {
    Experiment first(config(text), testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = cut_dir.str();
    cut.stop_after = [](int r) { return r == 2; };
    first.run(cut);
  }
  Experiment resumed(config(text), testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary s = resumed.run(r);
  EXPECT_EQ(s.rounds_completed, 3);
  const double a = read_json(full_dir.path() / "summary.json")["privacy"]["epsilon"];
  const double b = read_json(cut_dir.path() / "summary.json")["privacy"]["epsilon"];
  EXPECT_DOUBLE_EQ(a, b);
  EXPECT_EQ(read_json(cut_dir.path() / "summary.json")["privacy"]["rounds_accounted"], 3);
  // The control: a fresh accountant after round 2 would report one round's epsilon.
  dp::RdpAccountant one;
  one.step(dp::noise_multiplier_for(8, 1e-5, 1.0, 3), 1.0);
  EXPECT_GT(b, one.epsilon(1e-5).epsilon * 1.2);
}

// With a noise multiplier fixed too low for the budget, the round that would exceed it is refused
// before any site trains, and the run ends there with a failure naming the budget.
TEST(PrivacyRun, ARoundThatWouldExceedTheBudgetIsRefused) {
  testkit::TempDir dir;
  Experiment e(config(pipeline(5, "privacy: {epsilon: 3, noise_multiplier: 1.0}\n")),
               testkit::builtin_registry());
  std::vector<Message> requests, replies;
  e.interpose_channel(
      [&](Channel& inner) { return std::make_unique<Recorder>(inner, requests, replies); });
  RunSummary s = run(e, dir.str());
  dp::RdpAccountant acc;
  int allowed = 0;
  while (acc.epsilon_after(1.0, 1.0, 1, 1e-5).epsilon <= 3) acc.step(1.0, 1.0), ++allowed;
  ASSERT_LT(allowed, 5);
  EXPECT_EQ(s.rounds_completed, allowed);
  EXPECT_EQ(requests.size(), size_t(3 * allowed));  // no site was asked to train after that
  ASSERT_FALSE(s.failures.empty());
  EXPECT_NE(s.failures.back().find("round " + std::to_string(allowed + 1) + ": privacy budget"),
            std::string::npos)
      << s.failures.back();
  const json summary = read_json(dir.path() / "summary.json");
  EXPECT_LE(summary["privacy"]["epsilon"].get<double>(), 3.0);
  EXPECT_EQ(summary["rounds"], allowed);
}

TEST(PrivacyRun, AggregatorsThatNeedIndividualUpdatesAreRefused) {
  Experiment e(config(pipeline(2, kPrivacy + "aggregator: median\n")), testkit::builtin_registry());
  testkit::TempDir dir;
  const std::string err = testkit::error_of([&] { run(e, dir.str()); });
  EXPECT_NE(err.find("privacy-test.yaml:8:"), std::string::npos) << err;
  EXPECT_NE(err.find("aggregator 'median'"), std::string::npos) << err;
  EXPECT_NE(err.find("needs the individual updates"), std::string::npos) << err;
}

// Every upload leaving a site is clipped to C (central mode: no noise at the site); in local mode
// it carries the site's noise share, so its distance from the global model is about
// z C / sqrt(m) per value, far beyond C.
TEST(PrivacyRun, SitesClipTheirDeltaAndAddTheirNoiseShareInLocalMode) {
  for (const std::string mode : {"central", "local"}) {
    testkit::TempDir dir;
    Experiment e(config(pipeline(2, kPrivacy), {"privacy.mode=" + mode}),
                 testkit::builtin_registry());
    std::vector<Message> requests, replies;
    e.interpose_channel(
        [&](Channel& inner) { return std::make_unique<Recorder>(inner, requests, replies); });
    run(e, dir.str());
    ASSERT_EQ(requests.size(), 6u) << mode;
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_DOUBLE_EQ(requests[i].scalars.at(protocol::kDpClip), 0.5) << mode;
      EXPECT_EQ(requests[i].scalars.count(protocol::kDpNoiseStd), mode == "local" ? 1u : 0u);
    }
    double largest = 0;
    for (size_t i = 0; i + 1 < 3 && i < replies.size(); ++i) {
      // Two uploads of the same round differ by two deltas, each of norm <= C (+ noise).
      largest = std::max(largest, dp::delta_norm(replies[i].arrays, replies[i + 1].arrays));
    }
    if (mode == "central") {
      EXPECT_LE(largest, 2 * 0.5 + 1e-4);
    } else {
      EXPECT_GT(largest, 10.0);
    }
  }
}

// ---- sample level (DP-SGD in every site's local training) ---------------------------------------

namespace {

// 3 sites x 12 training samples, batch 6: q = 0.5, 2 steps per local epoch. GroupNorm: the cnn
// without BatchNorm.
const std::string kSample = "privacy: {level: sample, epsilon: 8, delta: 1.0e-5, clip: 1.0}\n";
const std::vector<std::string> kGroupNorm = {"model.args.norm=group"};

}  // namespace

TEST(PrivacyRun, SampleLevelIsValidatedWithLineAndColumn) {
  const std::string err = testkit::error_of(
      [&] { config(pipeline(2, "privacy: {level: sample, epsilon: 8, mode: local}\n")); });
  EXPECT_NE(err.find("privacy-test.yaml:8:"), std::string::npos) << err;
  EXPECT_NE(err.find("'privacy.mode' applies to level: client only"), std::string::npos) << err;
  const std::string sampling = testkit::error_of(
      [&] { config(pipeline(2, "privacy: {level: sample, epsilon: 8, sampling: none}\n")); });
  EXPECT_NE(sampling.find("'privacy.sampling: none' applies to level: client only"),
            std::string::npos)
      << sampling;
  const std::string level =
      testkit::error_of([&] { config(pipeline(2, "privacy: {level: samples, epsilon: 8}\n")); });
  EXPECT_NE(level.find("samples"), std::string::npos) << level;
  PipelineConfig c = config(pipeline(2, kSample));
  ASSERT_TRUE(c.privacy);
  EXPECT_EQ(c.privacy->level, "sample");
}

// Each site's epsilon after each round is an independent accountant's for its own steps at
// q = batch / n and the sigma planned for all rounds' steps; the logged epsilon is the largest.
TEST(PrivacyRun, SampleLevelLogsEachSitesEpsilonEveryRound) {
  testkit::TempDir dir;
  Experiment e(config(pipeline(3, kSample), kGroupNorm), testkit::builtin_registry());
  std::vector<Message> requests, replies;
  e.interpose_channel(
      [&](Channel& inner) { return std::make_unique<Recorder>(inner, requests, replies); });
  RunSummary s = run(e, dir.str());
  EXPECT_TRUE(s.failures.empty());
  EXPECT_NE(s.privacy.find("sample level"), std::string::npos) << s.privacy;
  const double sigma = dp::noise_multiplier_for(8, 1e-5, 0.5, 3 * 2);
  std::map<int, double> eps;
  for (const auto& line : read_jsonl(dir.path() / "metrics.jsonl")) {
    const json& p = line["privacy"];
    EXPECT_EQ(p["level"], "sample");
    EXPECT_EQ(p["sampling"], "poisson");
    EXPECT_DOUBLE_EQ(p["q"].get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(p["noise_multiplier"].get<double>(), sigma);
    EXPECT_EQ(p["site_epsilon"].size(), 3u);
    EXPECT_EQ(p["steps_accounted"], 2 * line["round"].get<int>());
    eps[line["round"].get<int>()] = p["epsilon"].get<double>();
  }
  ASSERT_EQ(eps.size(), 3u);
  dp::RdpAccountant reference;
  for (int r = 1; r <= 3; ++r) {
    reference.step(sigma, 0.5, 2);
    EXPECT_NEAR(eps[r], reference.epsilon(1e-5).epsilon, 1e-12) << r;
  }
  EXPECT_LE(eps[3], 8.0);
  EXPECT_GT(eps[3], 7.5);
  // No client-level clipping is asked for: the sites' own pipelines make them do DP-SGD.
  for (const auto& r : requests) EXPECT_EQ(r.scalars.count(protocol::kDpClip), 0u);
  for (const auto& r : replies) EXPECT_EQ(r.scalars.at(protocol::kSteps), 2);
  const json summary = read_json(dir.path() / "summary.json");
  EXPECT_DOUBLE_EQ(summary["privacy"]["epsilon"].get<double>(), eps[3]);
  EXPECT_EQ(summary["privacy"]["level"], "sample");
}

TEST(PrivacyRun, SampleLevelRefusesARoundOverTheBudgetAndResumeKeepsIt) {
  dp::RdpAccountant acc;
  int allowed = 0;
  while (acc.epsilon_after(2.0, 0.5, 2, 1e-5).epsilon <= 3) acc.step(2.0, 0.5, 2), ++allowed;
  ASSERT_GE(allowed, 2);
  ASSERT_LT(allowed, 6);
  const std::string text =
      pipeline(6, "privacy: {level: sample, epsilon: 3, noise_multiplier: 2}\n");
  testkit::TempDir full_dir, cut_dir;
  Experiment full(config(text, kGroupNorm), testkit::builtin_registry());
  RunSummary s = run(full, full_dir.str());
  EXPECT_EQ(s.rounds_completed, allowed);
  ASSERT_FALSE(s.failures.empty());
  EXPECT_NE(s.failures.back().find("round " + std::to_string(allowed + 1) + ": privacy budget"),
            std::string::npos)
      << s.failures.back();
  const json summary = read_json(full_dir.path() / "summary.json");
  EXPECT_NEAR(summary["privacy"]["epsilon"].get<double>(), acc.epsilon(1e-5).epsilon, 1e-12);
  {
    Experiment first(config(text, kGroupNorm), testkit::builtin_registry());
    RunOptions cut;
    cut.run_dir = cut_dir.str();
    cut.stop_after = [](int r) { return r == 1; };
    first.run(cut);
  }
  Experiment resumed(config(text, kGroupNorm), testkit::builtin_registry());
  RunOptions r;
  r.run_dir = cut_dir.str();
  r.resume = true;
  RunSummary t = resumed.run(r);
  EXPECT_EQ(t.rounds_completed, allowed);
  const json resumed_summary = read_json(cut_dir.path() / "summary.json");
  EXPECT_EQ(resumed_summary["privacy"]["site_epsilon"], summary["privacy"]["site_epsilon"]);
  EXPECT_EQ(resumed_summary["privacy"]["steps_accounted"], 2 * allowed);
  // Poisson draws and noise come from the pipeline's seed: the resumed model is the same, bit
  // for bit.
  EXPECT_EQ(dp::delta_norm(full.global_state(), resumed.global_state()), 0.0);
}

TEST(PrivacyRun, SampleLevelRefusesAModelWithBatchNorm) {
  Experiment e(config(pipeline(2, kSample)), testkit::builtin_registry());
  testkit::TempDir dir;
  const std::string err = testkit::error_of([&] { run(e, dir.str()); });
  EXPECT_NE(err.find("privacy-test.yaml:5:"), std::string::npos) << err;
  EXPECT_NE(err.find("model 'cnn' has BatchNorm2d layers"), std::string::npos) << err;
}
