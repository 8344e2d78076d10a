// Sample-level DP-SGD in local training (LocalTraining::set_sample_level, privacy_round.h):
// per-sample clipping bounds one sample's contribution to a step, noise 0 with a huge bound is
// plain training, the noise has the planned size, Poisson sampling draws from the pipeline's seed,
// and a model with BatchNorm is refused.
#include "local_training.h"
#include "privacy_round.h"

#include <concord/dp_accountant.h>
#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include <c10/core/GradMode.h>

#include "testing.h"
#include "trainer_fixture.h"

#include <cmath>
#include <string>

using namespace concord;

namespace {

// One site with `n` 8x8 two-class images and a cnn with `norm` (no BatchNorm by default).
struct Fixture : testkit::TrainerFixture {
  NamedArrays initial;

  explicit Fixture(int n, const std::string& norm = "none") {
    const Registry& reg = testkit::builtin_registry();
    ModelSpec spec;
    spec.image_size = {8, 8};
    Value width, depth, nm;
    width.type = depth.type = ArgType::Int;
    width.i = 4;
    depth.i = 2;
    nm.type = ArgType::Enum;
    nm.s = norm;
    model = reg.create<Model>(Kind::Model, "cnn",
                              make_args("cnn", reg.get(Kind::Model, "cnn").args,
                                        {{"width", width}, {"depth", depth}, {"norm", nm}}),
                              BuildContext{1, ""});
    model->build(spec);
    for (auto& e : model->state()) initial[e.name] = to_array(e.tensor.detach().clone());
    for (int i = 0; i < n; ++i) data.train.push_back(sample(i, 1.f));
    training.optimizer = "sgd";
    training.momentum = 0;
    training.lr = 0.1;
    training.batch_size = n;
    seed = 7;
  }
  static Sample sample(int i, float scale) {
    Sample s;
    s.id = "img" + std::to_string(i);
    s.label = i % 2;
    s.image = Image(2, 1, {8, 8, 1});
    for (size_t k = 0; k < s.image.data.size(); ++k)
      s.image.data[k] = scale * float((k * 7 + size_t(i) * 3) % 11) / 11.f;
    return s;
  }
  void reset() {
    c10::NoGradGuard ng;
    for (auto& e : model->state()) e.tensor.copy_(to_tensor(initial.at(e.name)));
    calls = 0;
  }
  // Trains from the initial weights; returns the parameters afterwards.
  NamedArrays train(const SampleLevelPlan* plan, int epochs = 1, int round = 1,
                    TrainResult* result = nullptr) {
    reset();
    LocalTraining t = trainer(round);
    if (plan) t.set_sample_level(plan);
    TrainResult r = t.train(epochs, nullptr, nullptr);
    if (result) *result = r;
    NamedArrays out;
    for (auto& e : model->state())
      if (e.is_parameter) out[e.name] = to_array(e.tensor.detach().clone());
    return out;
  }
};

SampleLevelPlan plan_of(double q, int64_t steps_per_epoch, double sigma, double clip,
                        double expected_batch) {
  SampleLevelPlan p;
  p.q = q;
  p.steps_per_epoch = steps_per_epoch;
  p.planned_steps = steps_per_epoch;
  p.noise_multiplier = sigma;
  p.clip = clip;
  p.expected_batch = expected_batch;
  return p;
}

// L2 distance between two parameter sets, float64.
double distance(const NamedArrays& a, const NamedArrays& b) {
  double s = 0;
  for (const auto& [name, x] : a) {
    const float* u = x.data<float>();
    const float* v = b.at(name).data<float>();
    for (int64_t k = 0; k < x.numel(); ++k) s += (double(u[k]) - v[k]) * (double(u[k]) - v[k]);
  }
  return std::sqrt(s);
}

}  // namespace

// q = 1, no noise, a bound no gradient reaches: the mean of the per-sample gradients is the batch
// gradient, so DP-SGD takes the steps plain training takes (up to float summation order).
TEST(DpSgd, NoNoiseAndAHugeBoundIsPlainTraining) {
  Fixture f(8);
  const NamedArrays plain = f.train(nullptr, 3);
  const SampleLevelPlan p = plan_of(1.0, 1, 0.0, 1e9, 8);
  TrainResult r;
  const NamedArrays dp = f.train(&p, 3, 1, &r);
  EXPECT_EQ(r.steps, 3);
  EXPECT_EQ(r.samples, 24);
  ASSERT_GT(distance(plain, f.initial), 1e-3);  // it did train
  EXPECT_LT(distance(plain, dp), 1e-5 * distance(plain, f.initial) + 1e-6);
}

// Adding one sample whose gradient is enormous (its image is 1000x brighter) changes a step by its
// clipped gradient over the expected batch only: lr C / B at most. Without clipping the same
// sample moves the weights orders of magnitude further (the control: the test can fail).
TEST(DpSgd, PerSampleClippingBoundsOneSamplesContribution) {
  const double lr = 0.1, clip = 0.05, batch = 8;
  Fixture without(7), with(7);
  with.data.train.push_back(Fixture::sample(7, 1000.f));
  const SampleLevelPlan p = plan_of(1.0, 1, 0.0, clip, batch);
  const double moved = distance(without.train(&p), with.train(&p));
  EXPECT_GT(moved, 0.0);
  EXPECT_LE(moved, lr * clip / batch * (1 + 1e-4));
  const SampleLevelPlan unclipped = plan_of(1.0, 1, 0.0, 1e9, batch);
  EXPECT_GT(distance(without.train(&unclipped), with.train(&unclipped)), 100 * lr * clip / batch);
}

// The noise on the step is N(0, (sigma C / B)^2) per coordinate (times lr): with a tiny data
// gradient, the weights move by it alone. It is drawn from the pipeline's seed: the same round
// again gives the same weights bit for bit, another round other noise.
TEST(DpSgd, NoiseHasThePlannedSizeAndComesFromTheSeed) {
  const double lr = 0.1, clip = 1.0, sigma = 10, batch = 8;
  Fixture f(8);
  const SampleLevelPlan p = plan_of(1.0, 1, sigma, clip, batch);
  const NamedArrays a = f.train(&p, 1, 3);
  double s2 = 0;
  int64_t n = 0;
  for (const auto& [name, x] : a) {
    const float* u = x.data<float>();
    const float* v = f.initial.at(name).data<float>();
    for (int64_t k = 0; k < x.numel(); ++k, ++n)
      s2 += (double(u[k]) - v[k]) * (double(u[k]) - v[k]);
  }
  ASSERT_GT(n, 200);
  const double expected = lr * sigma * clip / batch;
  EXPECT_NEAR(std::sqrt(s2 / double(n)), expected, 0.15 * expected);
  EXPECT_EQ(distance(a, f.train(&p, 1, 3)), 0.0);
  EXPECT_GT(distance(a, f.train(&p, 1, 4)), expected);
}

// Each step's batch is a Poisson sample: every sample with probability q, so the samples seen
// vary around q n per step; the steps are the plan's, and the draws replay exactly.
TEST(DpSgd, BatchesArePoissonSamplesOfThePlannedSize) {
  Fixture f(40);
  f.training.batch_size = 10;
  const SampleLevelPlan p = plan_of(0.25, 4, 1.0, 1.0, 10);
  TrainResult r1, r2;
  const NamedArrays a = f.train(&p, 5, 1, &r1);
  const NamedArrays b = f.train(&p, 5, 1, &r2);
  EXPECT_EQ(r1.steps, 20);
  EXPECT_EQ(r1.samples, r2.samples);
  EXPECT_EQ(distance(a, b), 0.0);
  // Binomial(800, 0.25): mean 200, sd 12.2.
  EXPECT_GT(r1.samples, 150);
  EXPECT_LT(r1.samples, 250);
}

// The plan of a site: q = batch / n, ceil(n / batch) steps per epoch, the noise multiplier that
// keeps the planned steps within the budget (or the pipeline's), the expected batch q n.
TEST(DpSgd, ThePlanFollowsTheSitesSizeAndTheBudget) {
  PipelineConfig c;
  c.privacy = PipelineConfig::Privacy{};
  c.privacy->level = "sample";
  c.privacy->epsilon = 4;
  c.privacy->clip = 0.7;
  c.training.batch_size = 32;
  c.training.local_epochs = 2;
  c.federation.rounds = 10;
  const SampleLevelPlan p = sample_level_plan(c, 1000, "a");
  EXPECT_DOUBLE_EQ(p.q, 0.032);
  EXPECT_EQ(p.steps_per_epoch, 32);
  EXPECT_EQ(p.planned_steps, 640);
  EXPECT_DOUBLE_EQ(p.clip, 0.7);
  EXPECT_DOUBLE_EQ(p.expected_batch, 32);
  EXPECT_DOUBLE_EQ(p.noise_multiplier, dp::noise_multiplier_for(4, 1e-5, 0.032, 640));
  dp::RdpAccountant acc;
  acc.step(p.noise_multiplier, p.q, p.planned_steps);
  EXPECT_LE(acc.epsilon(1e-5).epsilon, 4.0);
  EXPECT_GT(acc.epsilon(1e-5).epsilon, 3.9);
  // A site smaller than a batch: every sample every step, the expected batch is n.
  const SampleLevelPlan small = sample_level_plan(c, 20, "b");
  EXPECT_DOUBLE_EQ(small.q, 1.0);
  EXPECT_EQ(small.steps_per_epoch, 1);
  EXPECT_DOUBLE_EQ(small.expected_batch, 20);
  c.privacy->noise_multiplier = 1.5;
  EXPECT_DOUBLE_EQ(sample_level_plan(c, 1000, "a").noise_multiplier, 1.5);
  EXPECT_THROW(sample_level_plan(c, 0, "c"), Error);
}

TEST(DpSgd, AModelWithBatchNormIsRefusedNamingThePlugin) {
  PipelineConfig c;
  c.privacy = PipelineConfig::Privacy{};
  c.privacy->level = "sample";
  c.model.type = "cnn";
  for (const std::string norm : {"batch", "group", "none"}) {
    Fixture f(2, norm);
    std::vector<std::string> types;
    for (const auto& m : f.model->modules()) types.push_back(m.type);
    const std::string err = testkit::error_of([&] { check_sample_level_model(c, types); });
    if (norm == "batch") {
      EXPECT_NE(err.find("model 'cnn' has BatchNorm2d layers"), std::string::npos) << err;
      EXPECT_NE(err.find("norm: group"), std::string::npos) << err;
    } else {
      EXPECT_EQ(err, "(no error)") << norm;
    }
  }
}

// The plan's q and steps with the accountant reproduce TF-Privacy's compute_dp_sgd_privacy for
// DP-SGD on MNIST (compute_dp_sgd_privacy_test: n 60000, batch 150, sigma 1.3, 15 epochs,
// delta 1e-5 -> epsilon 0.7242234026109595 at order 19), and asking for that epsilon gives back
// sigma 1.3 within the bisection's tolerance.
TEST(DpSgd, ThePlanReproducesTfPrivacysMnistReference) {
  PipelineConfig c;
  c.privacy = PipelineConfig::Privacy{};
  c.privacy->level = "sample";
  c.privacy->noise_multiplier = 1.3;
  c.training.batch_size = 150;
  c.training.local_epochs = 1;
  c.federation.rounds = 15;  // one epoch per round
  const SampleLevelPlan p = sample_level_plan(c, 60000, "mnist");
  EXPECT_DOUBLE_EQ(p.q, 0.0025);
  EXPECT_EQ(p.planned_steps, 6000);
  dp::RdpAccountant acc;
  acc.step(p.noise_multiplier, p.q, p.planned_steps);
  const dp::Epsilon e = acc.epsilon(1e-5);
  EXPECT_NEAR(e.epsilon, 0.7242234026109595, 1e-3 * 0.7242234026109595);
  EXPECT_EQ(e.order, 19.0);
  c.privacy->noise_multiplier = 0;
  c.privacy->epsilon = 0.7242234026109595;
  EXPECT_NEAR(sample_level_plan(c, 60000, "mnist").noise_multiplier, 1.3, 0.02);
}
