// End to end: one of five brainsim sites sends poisoned updates through the `attack` filter.
// FedAvg follows the attacker; median, trimmed-mean, krum and outlier-suppression stay near the
// clean run. Distances are between final global weight vectors (deterministic: every random
// choice derives from the pipeline seed), measured in units of how far clean FedAvg training
// moved the model from its initialisation.
#include <concord/engine.h>
#include <concord/fault_injection.h>

#include <cmath>
#include <cstdio>

#include "testing.h"

using namespace concord;

namespace {

const char* kAttacker = "site-C";

// Tolerances, from the values measured with this pipeline (seed 7; printed by every run). The
// distance unit is how far clean FedAvg moved the global model from its initialisation (1.77).
// Measured distance no attack / scale ×−10 / noise σ 1, then accuracy the same way:
//   fedavg               0    / 2.87 / 21.4    0.669 / 0.494 / 0.500  (chance: 0.5)
//   median               0.47 / 0.76 / 0.63    0.669 / 0.681 / 0.669
//   trimmed-mean β 0.2   0.31 / 0.71 / 0.52    0.650 / 0.644 / 0.681
//   krum f 1             0.77 / 0.95 / 0.95    0.625 / 0.694 / 0.694  (one site's model)
//   outlier-suppression  0    / 1.10 / 0.72    0.669 / 0.588 / 0.656  (downweight: bounded)
// (the no-attack column from DISABLED_ReportCleanRobustRuns). The robust rules differ from
// FedAvg even without attack, so "near" means well inside FedAvg's displacement, not zero.
// Accuracy is over 5 x 32 test images (standard error about 0.04).
constexpr double kFedAvgAttackedAtLeast = 2.0;
constexpr double kChanceAtMost = 0.56;
constexpr double kRobustAtMost = 1.4;
constexpr double kAccuracyDropAtMost = 0.12;

std::string pipeline(const std::string& aggregator, const std::string& attack_mode,
                     const std::string& filters = "") {
  std::string p =
      "name: robustness-test\nseed: 7\n"
      "data:\n  dataset: {type: brainsim, args: {sites: 5, train_per_site: 96, test_per_site: 32, "
      "size: 32}}\n"
      "model: {type: cnn, args: {width: 8, depth: 3}}\n"
      "adapter: {type: batchnorm, args: {policy: local}}\n"
      "training: {local_epochs: 1, batch_size: 32, lr: 0.005}\n"
      "federation: {rounds: 6, min_sites: 5}\n"
      "aggregator: " +
      aggregator +
      "\n"
      "evaluation: {metrics: [accuracy], every: 6}\n";
  if (!filters.empty())
    p += "filters:\n  - " + filters + "\n";
  else if (!attack_mode.empty())
    p += "filters:\n  - {type: attack, args: {sites: [" + std::string(kAttacker) +
         "], mode: " + attack_mode + ", factor: " + (attack_mode == "noise" ? "1.0" : "-10") +
         "}}\n";
  return p;
}

struct Outcome {
  NamedArrays global;
  double accuracy = 0;  // mean over the five sites' test splits
};

Outcome run(const std::string& aggregator, const std::string& attack_mode,
            bool everyone_fails = false, const std::string& filters = "") {
  PipelineConfig c = parse_pipeline(pipeline(aggregator, attack_mode, filters),
                                    "robustness-test.yaml", {}, testkit::builtin_registry());
  Experiment exp(std::move(c), testkit::builtin_registry());
  if (everyone_fails) {  // no round aggregates: the global state stays the initialisation
    test_seam::FaultPlan plan;
    for (char s = 'A'; s <= 'E'; ++s)
      for (int r = 1; r <= 6; ++r) plan.fail[{std::string("site-") + s, r}] = "offline";
    test_seam::inject_faults(exp, plan);
  }
  testkit::TempDir dir;
  RunOptions o;
  o.run_dir = dir.str() + "/run";
  RunSummary s = exp.run(o);
  Outcome out;
  for (const auto& [k, v] : exp.global_state()) out.global[k] = v.clone();
  out.accuracy = s.mean.count("accuracy") ? s.mean.at("accuracy") : 0.0;
  return out;
}

// L2 distance over the float32 entries present in both states.
double distance(const NamedArrays& a, const NamedArrays& b) {
  double s = 0;
  for (const auto& [name, x] : a) {
    if (x.dtype() != DType::F32) continue;
    const Array& y = b.at(name);
    for (int64_t k = 0; k < x.numel(); ++k) {
      const double d = double(x.data<float>()[k]) - double(y.data<float>()[k]);
      s += d * d;
    }
  }
  return std::sqrt(s);
}

class Robustness : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    initial_ = new Outcome(run("fedavg", "", true));
    clean_ = new Outcome(run("fedavg", ""));
    scale_ = distance(clean_->global, initial_->global);
    std::printf("clean fedavg: moved %.4f from the initialisation, mean accuracy %.3f\n", scale_,
                clean_->accuracy);
  }
  static void TearDownTestSuite() {
    delete initial_;
    delete clean_;
  }
  // Distance to the clean FedAvg model in units of the clean training's displacement.
  static double relative(const Outcome& o) { return distance(o.global, clean_->global) / scale_; }
  static Outcome report(const std::string& aggregator, const std::string& mode) {
    Outcome o = run(aggregator, mode);
    std::printf("%-45s %-9s relative distance %8.4f  accuracy %.3f\n", aggregator.c_str(),
                mode.empty() ? "clean" : mode.c_str(), relative(o), o.accuracy);
    return o;
  }

  static Outcome* initial_;
  static Outcome* clean_;
  static double scale_;
};
Outcome* Robustness::initial_ = nullptr;
Outcome* Robustness::clean_ = nullptr;
double Robustness::scale_ = 0;

const std::vector<std::string> kRobust = {"median", "{type: trimmed-mean, args: {beta: 0.2}}",
                                          "{type: krum, args: {f: 1}}", "outlier-suppression"};

}  // namespace

TEST_F(Robustness, CleanRunLearns) {
  // The metric checks below mean something only if the clean model is well above chance.
  EXPECT_GT(clean_->accuracy, 0.62);
}

TEST_F(Robustness, FedAvgFollowsOnePoisonedSiteOfFive) {
  for (const std::string mode : {"scale", "noise"}) {
    SCOPED_TRACE(mode);
    Outcome o = report("fedavg", mode);
    EXPECT_GT(relative(o), kFedAvgAttackedAtLeast);
    EXPECT_LT(o.accuracy, kChanceAtMost);
  }
}

TEST_F(Robustness, RobustAggregatorsStayNearTheCleanRun) {
  for (const std::string mode : {"scale", "noise"})
    for (const auto& aggregator : kRobust) {
      SCOPED_TRACE(aggregator + " under " + mode);
      Outcome o = report(aggregator, mode);
      EXPECT_LT(relative(o), kRobustAtMost);
      EXPECT_GT(o.accuracy, clean_->accuracy - kAccuracyDropAtMost);
    }
}

// gaussian-dp inside the engine: with no noise and a bound no update reaches it is the identity
// (bit for bit the clean run); with clipping and noise the global model moves elsewhere.
TEST_F(Robustness, GaussianDpInTheEngine) {
  Outcome identity =
      run("fedavg", "", false, "{type: gaussian-dp, args: {clip: 1.0e6, noise_multiplier: 0}}");
  EXPECT_EQ(distance(identity.global, clean_->global), 0.0);
  Outcome noisy =
      run("fedavg", "", false, "{type: gaussian-dp, args: {clip: 0.5, noise_multiplier: 0.1}}");
  const double d = distance(noisy.global, clean_->global);
  std::printf("gaussian-dp clip 0.5, z 0.1: relative distance %.4f, accuracy %.3f\n", d / scale_,
              noisy.accuracy);
  EXPECT_TRUE(std::isfinite(d));
  EXPECT_GT(d, 0.0);
}

// Measurement only (--gtest_also_run_disabled_tests): the robust rules without any attack.
TEST_F(Robustness, DISABLED_ReportCleanRobustRuns) {
  for (const auto& aggregator : kRobust) report(aggregator, "");
}

TEST(RobustnessPipeline, AttackArgumentsAreValidatedWithTheirLine) {
  const std::string text =
      pipeline("median", "") + "filters:\n  - {type: attack, args: {mode: scale}}\n";
  try {
    parse_pipeline(text, "bad.yaml", {}, testkit::builtin_registry());
    FAIL() << "a missing `sites` must be refused";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("bad.yaml:"), std::string::npos) << m;
    EXPECT_NE(m.find("sites"), std::string::npos) << m;
  }
}
