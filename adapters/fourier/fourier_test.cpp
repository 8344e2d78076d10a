// Tests of the fourier adapter: the DCT merge against a DCT computed from its definition, the
// pairing with the fourier aggregator (same bands, same schedule), the adapter on a small real
// network with a real SGD trainer, and a brainsim run through the engine read back from its
// checkpoints.
#include <concord/adapter.h>
#include <concord/aggregator.h>
#include <concord/engine.h>
#include <concord/error.h>
#include <concord/message.h>
#include <concord/protocol.h>
#include <concord/tensor_bridge.h>

#include "adapter_common.h"
#include "spectral.h"
#include "test_model.h"
#include "testing.h"

#include <ATen/ATen.h>

#include <cmath>
#include <fstream>
#include <random>

using namespace concord;
using adapter_testing::make_tiny_net;
using adapter_testing::SgdTrainer;

namespace {

// Orthonormal 2-D DCT-II in double precision, straight from the definition (no FFTW).
std::vector<double> dct2(const float* x, int64_t rows, int64_t cols) {
  const double pi = std::acos(-1.0);
  auto a = [](int64_t k, int64_t n) { return std::sqrt((k == 0 ? 1.0 : 2.0) / double(n)); };
  std::vector<double> tmp(size_t(rows * cols)), out(size_t(rows * cols));
  for (int64_t u = 0; u < rows; ++u)
    for (int64_t c = 0; c < cols; ++c) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r)
        s += x[r * cols + c] * std::cos(pi * double(u) * (2.0 * double(r) + 1) / (2.0 * rows));
      tmp[size_t(u * cols + c)] = a(u, rows) * s;
    }
  for (int64_t u = 0; u < rows; ++u)
    for (int64_t v = 0; v < cols; ++v) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c)
        s += tmp[size_t(u * cols + c)] *
             std::cos(pi * double(v) * (2.0 * double(c) + 1) / (2.0 * cols));
      out[size_t(u * cols + v)] = a(v, cols) * s;
    }
  return out;
}

std::vector<double> dct2(const Array& a) {
  const int64_t rows = a.shape()[0];
  return dct2(a.data<float>(), rows, a.numel() / rows);
}

Array random_array(std::vector<int64_t> shape, uint64_t seed, float scale = 1.0f) {
  Array a(DType::F32, std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for (int64_t k = 0; k < a.numel(); ++k) a.data<float>()[k] = normal(rng);
  return a;
}

Array merged(const Array& received, const Array& own, double r) {
  Array out(DType::F32, received.shape());
  const int64_t rows = received.shape()[0];
  fourier::merge(received.data<float>(), own.data<float>(), out.data<float>(), rows,
                 received.numel() / rows, r);
  return out;
}

// Largest |DCT(x) - DCT(ref)| over the low block (low = true) or its complement.
double band_diff(const Array& x, const Array& ref, double r, bool low) {
  const int64_t rows = x.shape()[0], cols = x.numel() / rows;
  const int64_t ku = fourier::low_extent(r, rows), kv = fourier::low_extent(r, cols);
  const auto dx = dct2(x), dr = dct2(ref);
  double worst = 0;
  for (int64_t u = 0; u < rows; ++u)
    for (int64_t v = 0; v < cols; ++v)
      if ((u < ku && v < kv) == low)
        worst = std::max(worst, std::abs(dx[size_t(u * cols + v)] - dr[size_t(u * cols + v)]));
  return worst;
}

// Euclidean distance between the DCTs of x and ref over the high block (outside the low one).
double high_distance(const Array& x, const Array& ref, double r) {
  const int64_t rows = x.shape()[0], cols = x.numel() / rows;
  const int64_t ku = fourier::low_extent(r, rows), kv = fourier::low_extent(r, cols);
  const auto dx = dct2(x), dr = dct2(ref);
  double sum = 0;
  for (int64_t u = 0; u < rows; ++u)
    for (int64_t v = 0; v < cols; ++v)
      if (!(u < ku && v < kv))
        sum += std::pow(dx[size_t(u * cols + v)] - dr[size_t(u * cols + v)], 2);
  return std::sqrt(sum);
}

double max_abs_diff(const Array& a, const Array& b) {
  double worst = 0;
  for (int64_t k = 0; k < a.numel(); ++k)
    worst = std::max(worst, double(std::abs(a.data<float>()[k] - b.data<float>()[k])));
  return worst;
}

std::map<std::string, Value> constant_args(double r) {
  return {{"fraction_start", make_value(r)}, {"schedule", make_value("constant")}};
}

std::unique_ptr<Adapter> make_adapter(const std::map<std::string, Value>& args) {
  const Registry& reg = testkit::builtin_registry();
  return reg.create<Adapter>(Kind::Adapter, "fourier",
                             make_args("fourier", reg.get(Kind::Adapter, "fourier").args, args));
}

std::unique_ptr<Aggregator> make_aggregator(const std::map<std::string, Value>& args) {
  const Registry& reg = testkit::builtin_registry();
  return reg.create<Aggregator>(
      Kind::Aggregator, "fourier",
      make_args("fourier", reg.get(Kind::Aggregator, "fourier").args, args));
}

}  // namespace

TEST(FourierMerge, FractionOneIsTheReceivedTensorAndZeroTheSitesOwn) {
  const Array received = random_array({6, 3, 3, 3}, 1), own = random_array({6, 3, 3, 3}, 2);
  EXPECT_EQ(max_abs_diff(merged(received, own, 1.0), received), 0.0);
  EXPECT_EQ(max_abs_diff(merged(received, own, 0.0), own), 0.0);
  // Through the transform: equal inputs come back unchanged at any fraction.
  EXPECT_LT(max_abs_diff(merged(received, received, 0.5), received), 1e-6);
}

TEST(FourierMerge, LowBlockIsTheReceivedOneAndHighBlockTheSitesOwn) {
  const Array received = random_array({8, 2, 3, 3}, 3), own = random_array({8, 2, 3, 3}, 4);
  for (double r : {0.1, 0.25, 0.5, 0.7, 0.9}) {
    const Array m = merged(received, own, r);
    EXPECT_LT(band_diff(m, received, r, /*low=*/true), 1e-5) << "r=" << r;
    EXPECT_LT(band_diff(m, own, r, /*low=*/false), 1e-5) << "r=" << r;
    // And the split is not trivial: the bands of the two inputs differ.
    EXPECT_GT(band_diff(m, own, r, /*low=*/true), 1e-2) << "r=" << r;
    EXPECT_GT(band_diff(m, received, r, /*low=*/false), 1e-2) << "r=" << r;
  }
  // Non-square views and a 2-D matrix (apply_to: matrices).
  const Array a = random_array({5, 7}, 5), b = random_array({5, 7}, 6);
  const Array m = merged(a, b, 0.4);
  EXPECT_LT(band_diff(m, a, 0.4, true), 1e-5);
  EXPECT_LT(band_diff(m, b, 0.4, false), 1e-5);
}

TEST(FourierMerge, ScheduleIsTheAggregators) {
  fourier::Schedule s;  // the defaults: 0.25 -> 1, linear
  s.planned_rounds = 4;
  EXPECT_DOUBLE_EQ(s.fraction(1), 0.25);
  EXPECT_DOUBLE_EQ(s.fraction(2), 0.5);
  EXPECT_DOUBLE_EQ(s.fraction(4), 1.0);
  EXPECT_DOUBLE_EQ(s.fraction(9), 1.0);
  s.ramp_rounds = 3;
  EXPECT_DOUBLE_EQ(s.fraction(2), 0.625);
  s.linear = false;
  EXPECT_DOUBLE_EQ(s.fraction(3), 0.25);
  EXPECT_EQ(fourier::low_extent(0.25, 8), 2);
  EXPECT_EQ(fourier::low_extent(0.3, 8), 3);
  EXPECT_EQ(fourier::low_extent(1.0, 8), 8);
  EXPECT_EQ(fourier::low_extent(0.0, 8), 0);
}

// The aggregator's output holds the sites' mean in the low block and the previous global
// elsewhere; the adapter's merge with the same schedule gives back exactly the bands it should:
// merge(aggregated, own) has the mean's low block and the site's own high block, and
// merge(aggregated, previous global) is the aggregated tensor itself (equal blocks both ways).
TEST(FourierMerge, PairsWithTheFourierAggregatorRoundByRound) {
  auto agg = make_aggregator({{"ramp_rounds", make_value(int64_t(4))}});
  fourier::Schedule s;
  s.ramp_rounds = 4;
  const NamedArrays global = {{"conv.weight", random_array({8, 2, 3, 3}, 10)},
                              {"conv.bias", random_array({8}, 11)}};
  std::vector<SiteUpdate> updates;
  for (int i = 0; i < 2; ++i) {
    SiteUpdate u;
    u.site = i ? "site-B" : "site-A";
    u.state = {{"conv.weight", random_array({8, 2, 3, 3}, 20 + uint64_t(i))},
               {"conv.bias", random_array({8}, 30 + uint64_t(i))}};
    u.num_samples = 10;
    updates.push_back(std::move(u));
  }
  Array mean(DType::F32, {8, 2, 3, 3});
  for (int64_t k = 0; k < mean.numel(); ++k)
    mean.data<float>()[k] = 0.5f * (updates[0].state.at("conv.weight").data<float>()[k] +
                                    updates[1].state.at("conv.weight").data<float>()[k]);
  for (int round = 1; round <= 4; ++round) {
    const NamedArrays out = agg->aggregate(global, updates, RoundInfo{round, 4, 0});
    const Array& a = out.at("conv.weight");
    const double r = s.fraction(round);
    EXPECT_LT(max_abs_diff(merged(a, global.at("conv.weight"), r), a), 1e-5) << round;
    for (const auto& u : updates) {
      const Array m = merged(a, u.state.at("conv.weight"), r);
      EXPECT_LT(band_diff(m, mean, r, true), 1e-5) << round << " " << u.site;
      if (r < 1) {
        EXPECT_LT(band_diff(m, u.state.at("conv.weight"), r, false), 1e-5) << round;
        EXPECT_GT(band_diff(m, a, r, false), 1e-2) << round;
      }
    }
  }
}

TEST(FourierAdapter, KeepsTheSitesHighFrequenciesAcrossRounds) {
  auto model = make_tiny_net(1, 2, 3);
  SgdTrainer trainer("site-A", *model, 16, 1, 0.5f, 7);
  auto adapter = make_adapter(constant_args(0.5));
  adapter->attach(*model);
  const NamedArrays g1 = adapters::snapshot(*model);
  trainer.receive(g1, 1);
  adapter->train_local(trainer, 1);
  const NamedArrays trained = adapters::snapshot(*model);

  // The store holds the trained conv kernels, and nothing else.
  const NamedArrays own = adapters::take_prefixed(trainer.site_store(), "fourier/");
  std::set<std::string> names;
  for (const auto& [k, v] : own) names.insert(k);
  EXPECT_EQ(names, (std::set<std::string>{"bn_conv.weight", "features.conv.weight"}));
  for (const auto& [k, v] : own) EXPECT_EQ(max_abs_diff(v, trained.at(k)), 0.0) << k;
  EXPECT_GT(max_abs_diff(trained.at("bn_conv.weight"), g1.at("bn_conv.weight")), 1e-4);

  // A new global arrives: evaluation uses its low block and the site's high block.
  NamedArrays g2;
  uint64_t seed = 100;
  for (const auto& [k, v] : g1) {
    g2[k] = v.clone();
    if (v.dtype() != DType::F32) continue;
    const Array noise = random_array(v.shape(), seed++, 0.1f);
    for (int64_t i = 0; i < v.numel(); ++i) g2[k].data<float>()[i] += noise.data<float>()[i];
  }
  trainer.receive(g2, 2);
  adapter->before_evaluate(trainer);
  const NamedArrays eval = adapters::snapshot(*model);
  for (const char* k : {"bn_conv.weight", "features.conv.weight"}) {
    EXPECT_LT(band_diff(eval.at(k), g2.at(k), 0.5, true), 1e-5) << k;
    EXPECT_LT(band_diff(eval.at(k), trained.at(k), 0.5, false), 1e-5) << k;
    EXPECT_GT(max_abs_diff(eval.at(k), g2.at(k)), 1e-3) << k;
  }
  for (const char* k : {"classifier.weight", "classifier.bias", "bn_conv.bias",
                        "features.conv.bias", "features.bn1.running_mean"})
    EXPECT_EQ(max_abs_diff(eval.at(k), g2.at(k)), 0.0) << k;

  // Round 2 trains from the same merge (constant schedule), and stores the new kernels.
  trainer.receive(g2, 2);
  trainer.clear_calls();
  adapter->train_local(trainer, 1);
  ASSERT_EQ(trainer.calls().size(), 1u);
  for (const char* k : {"bn_conv.weight", "features.conv.weight"})
    EXPECT_LT(max_abs_diff(trainer.calls()[0].before.at(k), eval.at(k)), 1e-6) << k;
  const NamedArrays own2 = adapters::take_prefixed(trainer.site_store(), "fourier/");
  EXPECT_EQ(
      max_abs_diff(own2.at("bn_conv.weight"), adapters::snapshot(*model).at("bn_conv.weight")),
      0.0);
}

TEST(FourierAdapter, SiteThatNeverTrainedEvaluatesTheReceivedWeights) {
  auto model = make_tiny_net(1, 2, 3);
  SgdTrainer trainer("site-C", *model, 16, 1, 0.5f, 7);
  auto adapter = make_adapter(constant_args(0.5));
  NamedArrays g = adapters::snapshot(*model);
  for (auto& [k, v] : g)
    if (v.dtype() == DType::F32)
      for (int64_t i = 0; i < v.numel(); ++i) v.data<float>()[i] += 0.25f;
  trainer.receive(g, 3);
  adapter->prepare_unseen_site(trainer);
  adapter->before_evaluate(trainer);
  const NamedArrays eval = adapters::snapshot(*model);
  for (const auto& [k, v] : g) EXPECT_TRUE(to_tensor(eval.at(k)).equal(to_tensor(v))) << k;
}

TEST(FourierAdapter, AppliesToMatricesWhenAsked) {
  auto model = make_tiny_net(1, 2, 3);
  SgdTrainer trainer("site-A", *model, 16, 1, 0.5f, 7);
  auto args = constant_args(0.5);
  args["apply_to"] = make_value("matrices");
  auto adapter = make_adapter(args);
  trainer.receive(adapters::snapshot(*model), 1);
  adapter->train_local(trainer, 1);
  EXPECT_TRUE(trainer.site_store().count("fourier/classifier.weight"));
  EXPECT_FALSE(trainer.site_store().count("fourier/classifier.bias"));
}

TEST(FourierAdapter, LinearRampOverThePlannedRoundsTakesThemFromTheEngine) {
  auto model = make_tiny_net(1, 2, 3);
  SgdTrainer trainer("site-A", *model, 16, 1, 0.5f, 7);
  trainer.receive(adapters::snapshot(*model), 1);
  auto adapter = make_adapter({});  // linear over the planned rounds
  try {
    adapter->train_local(trainer, 1);  // this trainer does not know the planned rounds
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fourier (adapter)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("site-A"), std::string::npos) << msg;
    EXPECT_NE(msg.find("planned_rounds"), std::string::npos) << msg;
  }
  trainer.set_rounds(4);
  EXPECT_NO_THROW(adapter->train_local(trainer, 1));
  EXPECT_NO_THROW(make_adapter({{"planned_rounds", make_value(int64_t(5))}}));
  EXPECT_NO_THROW(make_adapter({{"ramp_rounds", make_value(int64_t(5))}}));
}

namespace {

struct Checkpoint {
  NamedArrays global;
  std::map<std::string, NamedArrays> store;  // per site
};

Checkpoint read_checkpoint(const std::filesystem::path& file, const RunSummary& summary) {
  std::vector<std::string> sites;
  for (const auto& s : summary.sites) sites.push_back(s.site);
  protocol::Checkpoint ckpt = protocol::read_checkpoint(decode(read_file(file.string())), sites);
  Checkpoint c;
  c.global = std::move(ckpt.global);
  for (auto& [site, state] : ckpt.sites)
    if (!state.store.empty()) c.store[site] = std::move(state.store);
  return c;
}

}  // namespace

// brainsim, 3 sites, 2 rounds, fourier aggregator and adapter at r = 0.5. What each site keeps
// is read back from the run's checkpoints.
TEST(FourierEngine, SitesShareLowFrequenciesAndKeepTheirOwnHighOnes) {
  const std::string args = "{fraction_start: 0.5, schedule: constant}";
  const std::string text =
      "name: fourier-e2e\nseed: 5\n"
      "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: 12, "
      "test_per_site: 6, size: 32, task: classification}}\n"
      "model: {type: cnn, args: {width: 8, depth: 2}}\n"
      "training: {local_epochs: 1, batch_size: 6, lr: 0.01}\n"
      "federation: {rounds: 2}\n"
      "aggregator: {type: fourier, args: &pfa " +
      args + "}\nadapter: {type: fourier, args: *pfa}\n";  // one mapping for both, as README
  testkit::TempDir dir;
  Experiment exp(parse_pipeline(text, "fourier-e2e.yaml", {}, testkit::builtin_registry()),
                 testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.str();
  const RunSummary summary = exp.run(o);
  ASSERT_EQ(summary.rounds_completed, 2);
  for (const auto& s : summary.sites) EXPECT_TRUE(s.metrics.count("accuracy")) << s.site;

  const auto ckpts = dir.path() / "checkpoints";
  std::string latest;
  std::ifstream((ckpts / "latest").string()) >> latest;
  EXPECT_EQ(latest, "round-0002.ckpt");
  const Checkpoint c2 = read_checkpoint(ckpts / latest, summary);
  const Checkpoint c1 = read_checkpoint(ckpts / "round-0001.ckpt", summary);
  ASSERT_EQ(c2.store.size(), 3u);

  const double r = 0.5;
  for (const std::string k : {"features.block1.conv.weight", "features.block2.conv.weight"}) {
    const Array& g1 = c1.global.at(k);
    const Array& g2 = c2.global.at(k);
    // The aggregator: round 2's global keeps round 1's high block and moves the low one to the
    // mean of what the sites uploaded, which is what each site stored (equal sample counts).
    Array mean(DType::F32, g2.shape());
    for (int64_t i = 0; i < mean.numel(); ++i) {
      float sum = 0;
      for (const auto& [site, store] : c2.store) sum += store.at("fourier/" + k).data<float>()[i];
      mean.data<float>()[i] = sum / 3.0f;
    }
    EXPECT_LT(band_diff(g2, mean, r, true), 1e-5) << k;
    EXPECT_LT(band_diff(g2, g1, r, false), 1e-5) << k;

    // The sites: each trained in round 2 from the global low block and its own high block of
    // round 1, so its uploaded high block moved away from the global's.
    std::map<std::string, Array> eval;
    for (const auto& [site, store] : c2.store) {
      ASSERT_TRUE(store.count("fourier/" + k)) << site << " " << k;
      ASSERT_TRUE(c1.store.at(site).count("fourier/" + k)) << site << " " << k;
      const Array& own1 = c1.store.at(site).at("fourier/" + k);
      const Array& own2 = store.at("fourier/" + k);
      EXPECT_GT(band_diff(own2, g1, r, false), 1e-3) << site << " " << k;
      // Round 2 started from the site's own round-1 high block, not the global's (which is
      // still the initial model's): the trained high block stays nearer the site's own.
      EXPECT_LT(high_distance(own2, own1, r), 0.8 * high_distance(own2, g1, r)) << site << " " << k;
      // What the site evaluates with after round 2 (before_evaluate's merge).
      eval[site] = merged(g2, store.at("fourier/" + k), r);
      EXPECT_LT(band_diff(eval[site], g2, r, true), 1e-5) << site << " " << k;
      EXPECT_LT(band_diff(eval[site], store.at("fourier/" + k), r, false), 1e-5) << site;
    }
    EXPECT_GT(band_diff(eval.at("site-A"), eval.at("site-B"), r, false), 1e-3) << k;
    EXPECT_GT(band_diff(eval.at("site-A"), eval.at("site-C"), r, false), 1e-3) << k;
    EXPECT_LT(band_diff(eval.at("site-A"), eval.at("site-B"), r, true), 1e-5) << k;
  }
  // The head (2-D) is not split: it is not in the store.
  for (const auto& [site, store] : c2.store) EXPECT_FALSE(store.count("fourier/head.weight"));
}
