#include <concord/filter.h>

#include <cmath>
#include <cstring>
#include <random>

#include "testing.h"

using namespace concord;

namespace {

std::unique_ptr<Filter> make(std::map<std::string, Value> given) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Filter, "gaussian-dp");
  return reg.create<Filter>(Kind::Filter, "gaussian-dp",
                            make_args("gaussian-dp", desc.args, given));
}

std::unique_ptr<Filter> make(double clip, double z) {
  return make({{"clip", make_value(clip)}, {"noise_multiplier", make_value(z)}});
}

Array random_array(std::mt19937& rng, int64_t n, float mean, float spread) {
  std::normal_distribution<float> d(mean, spread);
  Array a(DType::F32, {n});
  for (int64_t k = 0; k < n; ++k) a.data<float>()[k] = d(rng);
  return a;
}

// L2 norm of (a - b) over the named float32 entries.
double delta_norm(const NamedArrays& a, const NamedArrays& b,
                  const std::vector<std::string>& names) {
  double s = 0;
  for (const auto& n : names)
    for (int64_t k = 0; k < a.at(n).numel(); ++k) {
      const double d = double(a.at(n).data<float>()[k]) - double(b.at(n).data<float>()[k]);
      s += d * d;
    }
  return std::sqrt(s);
}

bool same_bytes(const Array& a, const Array& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

NamedArrays clone(const NamedArrays& s) {
  NamedArrays out;
  for (const auto& [k, v] : s) out[k] = v.clone();
  return out;
}

struct Fixture {
  NamedArrays global, update;
};

// Two float entries whose delta has L2 norm `norm` (before float rounding).
Fixture two_entries(double norm, uint32_t seed = 1) {
  std::mt19937 rng(seed);
  Fixture f;
  f.global["conv.weight"] = random_array(rng, 300, 0.0f, 0.1f);
  f.global["fc.bias"] = random_array(rng, 7, 0.5f, 0.1f);
  Array d1 = random_array(rng, 300, 0.0f, 1.0f), d2 = random_array(rng, 7, 0.0f, 1.0f);
  double s = 0;
  for (const Array* d : {&d1, &d2})
    for (int64_t k = 0; k < d->numel(); ++k) s += double(d->data<float>()[k]) * d->data<float>()[k];
  const double c = norm / std::sqrt(s);
  for (auto [name, d] : {std::pair{"conv.weight", &d1}, std::pair{"fc.bias", &d2}}) {
    Array u = f.global.at(name).clone();
    for (int64_t k = 0; k < u.numel(); ++k) u.data<float>()[k] += float(c * d->data<float>()[k]);
    f.update[name] = std::move(u);
  }
  return f;
}

void apply(Filter& f, NamedArrays& update, const NamedArrays& global, uint64_t seed,
           const std::string& site = "site-A") {
  std::mt19937_64 rng(seed);
  FilterContext ctx{site, 3, &rng};
  f.apply(update, global, ctx);
}

}  // namespace

TEST(GaussianDp, ClipsTheWholeDeltaToTheBoundKeepingItsDirection) {
  Fixture f = two_entries(50.0);
  NamedArrays original = clone(f.update);
  auto dp = make(1.5, 0.0);
  apply(*dp, f.update, f.global, 7);
  const std::vector<std::string> names = {"conv.weight", "fc.bias"};
  const double before = delta_norm(original, f.global, names);
  // Exactly C up to the float32 rounding of global + Δ' (relative 1e-5 here).
  EXPECT_NEAR(delta_norm(f.update, f.global, names), 1.5, 1.5e-5);
  // One scale for the whole vector (not per tensor): every coordinate shrinks by C / ‖Δ‖.
  for (const auto& n : names)
    for (int64_t k = 0; k < f.update.at(n).numel(); ++k) {
      const double d0 = original.at(n).data<float>()[k] - f.global.at(n).data<float>()[k];
      const double d1 = f.update.at(n).data<float>()[k] - f.global.at(n).data<float>()[k];
      ASSERT_NEAR(d1, d0 * 1.5 / before, 2e-6) << n << "[" << k << "]";
    }
}

TEST(GaussianDp, ZeroNoiseAndADeltaWithinTheBoundIsTheIdentity) {
  Fixture f = two_entries(0.8);
  NamedArrays original = clone(f.update);
  auto dp = make(1e6, 0.0);
  apply(*dp, f.update, f.global, 7);
  for (const auto& [n, a] : original) EXPECT_TRUE(same_bytes(a, f.update.at(n))) << n;
  // And a delta below a finite bound is not scaled up.
  auto dp2 = make(1.0, 0.0);
  apply(*dp2, f.update, f.global, 7);
  for (const auto& [n, a] : original) EXPECT_TRUE(same_bytes(a, f.update.at(n))) << n;
}

TEST(GaussianDp, NoiseHasStdNoiseMultiplierTimesClip) {
  // Δ = 0, so the upload minus global is the noise alone: σ = z C = 1.5 * 2 = 3.
  const int64_t n = 200000;
  NamedArrays global{{"w", Array(DType::F32, {n})}};
  for (int64_t k = 0; k < n; ++k) global["w"].data<float>()[k] = 0.25f;
  NamedArrays update = clone(global);
  auto dp = make(2.0, 1.5);
  apply(*dp, update, global, 2024);
  double sum = 0, sum2 = 0;
  int64_t within_one_sigma = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double e = double(update["w"].data<float>()[k]) - 0.25;
    sum += e;
    sum2 += e * e;
    within_one_sigma += std::fabs(e) <= 3.0;
  }
  const double mean = sum / n, sd = std::sqrt(sum2 / n - mean * mean);
  // Standard errors: mean 3/sqrt(n) = 0.0067, std 3/sqrt(2n) = 0.0047, share 0.001.
  EXPECT_NEAR(mean, 0.0, 0.035);
  EXPECT_NEAR(sd, 3.0, 0.025);
  EXPECT_NEAR(double(within_one_sigma) / n, 0.6827, 0.005);  // Gaussian, not uniform

  // Seeded: the same stream gives the same noise, another stream other noise.
  NamedArrays again = clone(global), other = clone(global);
  apply(*dp, again, global, 2024);
  apply(*dp, other, global, 2025);
  EXPECT_TRUE(same_bytes(again["w"], update["w"]));
  EXPECT_FALSE(same_bytes(other["w"], update["w"]));
}

TEST(GaussianDp, NoiseIsAddedAfterClipping) {
  Fixture f = two_entries(1000.0);
  NamedArrays clipped = clone(f.update), noisy = clone(f.update);
  auto no_noise = make(1.0, 0.0);
  auto dp = make(1.0, 0.01);
  apply(*no_noise, clipped, f.global, 5);
  apply(*dp, noisy, f.global, 5);
  // The noise is around the clipped delta with σ = 0.01, not around the raw one (far larger).
  double s2 = 0;
  int64_t count = 0;
  for (const auto& [n, a] : noisy)
    for (int64_t k = 0; k < a.numel(); ++k, ++count) {
      const double e = double(a.data<float>()[k]) - clipped.at(n).data<float>()[k];
      s2 += e * e;
    }
  EXPECT_NEAR(std::sqrt(s2 / double(count)), 0.01, 0.002);
}

TEST(GaussianDp, ExcludedAndNonFloatEntriesAreUntouchedAndOutsideTheNorm) {
  Fixture f = two_entries(10.0);
  std::mt19937 rng(3);
  // Large deltas in the excluded entries: they must not count towards the clipped norm.
  for (const char* name :
       {"bn.running_mean", "bn.running_var", "encoder.conv.weight", "encoderx.weight"}) {
    f.global[name] = random_array(rng, 50, 1.0f, 0.1f);
    f.update[name] = random_array(rng, 50, 40.0f, 5.0f);
  }
  f.global["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{4});
  f.update["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{9});
  NamedArrays original = clone(f.update);
  auto dp = make({{"clip", make_value(2.0)},
                  {"noise_multiplier", make_value(0.0)},
                  {"exclude_modules", make_value(std::vector<std::string>{"encoder"})}});
  apply(*dp, f.update, f.global, 1);
  for (const char* name :
       {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "encoder.conv.weight"})
    EXPECT_TRUE(same_bytes(original.at(name), f.update.at(name))) << name;
  // 'encoderx' is another module than 'encoder': clipped with the rest.
  EXPECT_FALSE(same_bytes(original.at("encoderx.weight"), f.update.at("encoderx.weight")));
  EXPECT_NEAR(delta_norm(f.update, f.global, {"conv.weight", "fc.bias", "encoderx.weight"}), 2.0,
              2e-5);

  // With no leaf exclusions the running statistics are clipped too.
  NamedArrays all = clone(original);
  auto dp_all = make({{"clip", make_value(2.0)},
                      {"noise_multiplier", make_value(0.0)},
                      {"exclude_leaves", make_value(std::vector<std::string>{})}});
  apply(*dp_all, all, f.global, 1);
  EXPECT_FALSE(same_bytes(original.at("bn.running_mean"), all.at("bn.running_mean")));
  EXPECT_TRUE(same_bytes(original.at("bn.num_batches_tracked"), all.at("bn.num_batches_tracked")));
}

TEST(GaussianDp, ErrorsNameTheSiteRoundAndEntry) {
  Fixture f = two_entries(1.0);
  auto dp = make(1.0, 1.0);
  NamedArrays global = clone(f.global);
  global.erase("fc.bias");
  try {
    apply(*dp, f.update, global, 1, "site-C");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("gaussian-dp"), std::string::npos) << m;
    EXPECT_NE(m.find("site-C"), std::string::npos) << m;
    EXPECT_NE(m.find("round 3"), std::string::npos) << m;
    EXPECT_NE(m.find("fc.bias"), std::string::npos) << m;
  }
  // Everything excluded: refusing beats uploading an unprotected update.
  auto none = make({{"clip", make_value(1.0)},
                    {"noise_multiplier", make_value(1.0)},
                    {"exclude_modules", make_value(std::vector<std::string>{"conv", "fc"})}});
  EXPECT_THROW(apply(*none, f.update, f.global, 1), Error);
  // No random stream: refused rather than silently unprotected.
  FilterContext no_rng{"site-A", 1, nullptr};
  EXPECT_THROW(dp->apply(f.update, f.global, no_rng), Error);
}

TEST(GaussianDp, ArgumentsAreRequiredAndChecked) {
  const auto& desc = testkit::builtin_registry().get(Kind::Filter, "gaussian-dp");
  EXPECT_THROW(make_args("gaussian-dp", desc.args, {{"clip", make_value(1.0)}}), Error);
  EXPECT_THROW(make_args("gaussian-dp", desc.args, {{"noise_multiplier", make_value(1.0)}}), Error);
  EXPECT_THROW(make_args("gaussian-dp", desc.args,
                         {{"clip", make_value(0.0)}, {"noise_multiplier", make_value(1.0)}}),
               Error);
  EXPECT_THROW(make_args("gaussian-dp", desc.args,
                         {{"clip", make_value(1.0)}, {"noise_multiplier", make_value(-0.5)}}),
               Error);
}
