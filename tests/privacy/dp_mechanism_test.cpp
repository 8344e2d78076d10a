// Client-level DP settings: noise scales (measured over many draws), local shares that add up to
// the central noise, exact clipping, seeded noise, and the accountant's q.
#include <concord/dp_mechanism.h>
#include <concord/error.h>
#include <concord/seed.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

using namespace concord;
using namespace concord::dp;

namespace {

NamedArrays filled(int64_t n, float value) {
  NamedArrays s{{"w", Array(DType::F32, {n})}};
  for (int64_t k = 0; k < n; ++k) s["w"].data<float>()[k] = value;
  return s;
}

struct Moments {
  double mean, sd;
};
Moments moments(const Array& a, double centre) {
  double s = 0, s2 = 0;
  for (int64_t k = 0; k < a.numel(); ++k) {
    const double e = double(a.data<float>()[k]) - centre;
    s += e;
    s2 += e * e;
  }
  const double n = double(a.numel()), mean = s / n;
  return {mean, std::sqrt(s2 / n - mean * mean)};
}

DpSettings settings(Placement placement, double clip, double z) {
  DpSettings s;
  s.placement = placement;
  s.clip = clip;
  s.noise_multiplier = z;
  s.check();
  return s;
}

}  // namespace

TEST(DpMechanism, NoiseStdMeasuredOverManyDrawsMatches) {
  const int64_t n = 200000;
  NamedArrays s = filled(n, 0.5f);
  add_gaussian_noise(s, 0.75, derive_seed(7, "dp-noise", 1));
  const Moments m = moments(s["w"], 0.5);
  // Standard errors: mean 0.75 / sqrt(n) = 0.0017, sd 0.75 / sqrt(2n) = 0.0012.
  EXPECT_NEAR(m.mean, 0.0, 0.008);
  EXPECT_NEAR(m.sd, 0.75, 0.006);
  // Seeded: the same seed gives the same noise, another seed other noise.
  NamedArrays again = filled(n, 0.5f), other = filled(n, 0.5f);
  add_gaussian_noise(again, 0.75, derive_seed(7, "dp-noise", 1));
  add_gaussian_noise(other, 0.75, derive_seed(7, "dp-noise", 2));
  EXPECT_EQ(std::memcmp(again["w"].raw(), s["w"].raw(), s["w"].nbytes()), 0);
  EXPECT_NE(std::memcmp(other["w"].raw(), s["w"].raw(), s["w"].nbytes()), 0);
  // Zero std: untouched; non-float entries are never selected by default.
  NamedArrays quiet = filled(10, 0.5f);
  quiet["count"] = Array::from(std::vector<int64_t>{3});
  add_gaussian_noise(quiet, 0.0, 1);
  add_gaussian_noise(quiet, 1.0, 1,
                     [](const std::string& name, const Array&) { return name == "nothing"; });
  EXPECT_EQ(quiet["w"].data<float>()[3], 0.5f);
}

TEST(DpMechanism, LocalSharesSumToTheCentralNoise) {
  // m sites each add N(0, (zC)^2 / m) to a zero delta; the sum must carry std zC and the mean
  // the central z C / m.
  const int64_t m = 8, n = 100000;
  const DpSettings local = settings(Placement::Local, 2.0, 1.3);
  const DpSettings central = settings(Placement::Central, 2.0, 1.3);
  EXPECT_DOUBLE_EQ(local.local_share_std(m), 1.3 * 2.0 / std::sqrt(8.0));
  EXPECT_DOUBLE_EQ(central.central_std(m), 1.3 * 2.0 / 8.0);
  NamedArrays sum = filled(n, 0.0f);
  for (int64_t site = 0; site < m; ++site) {
    NamedArrays share = filled(n, 0.0f);
    add_gaussian_noise(share, local.local_share_std(m), derive_seed(11, "site", site));
    const Moments one = moments(share["w"], 0.0);
    EXPECT_NEAR(one.sd, local.local_share_std(m), 0.01);
    for (int64_t k = 0; k < n; ++k) sum["w"].data<float>()[k] += share["w"].data<float>()[k];
  }
  const Moments total = moments(sum["w"], 0.0);
  EXPECT_NEAR(total.sd, 1.3 * 2.0, 0.02);  // se 2.6 / sqrt(2n) = 0.006
  EXPECT_NEAR(total.sd / double(m), central.central_std(m), 0.0025);
  // Sites that drop take their noise with them: the sum's effective multiplier shrinks.
  EXPECT_DOUBLE_EQ(local.effective_noise_multiplier(8, 6), 1.3 * std::sqrt(6.0 / 8.0));
  EXPECT_DOUBLE_EQ(central.effective_noise_multiplier(8, 6), 1.3);
  EXPECT_THROW(local.effective_noise_multiplier(8, 9), Error);
}

TEST(DpMechanism, ClippingIsExactAndKeepsTheDirection) {
  NamedArrays global{{"a", Array(DType::F32, {3})}, {"b", Array(DType::F32, {1})}};
  NamedArrays update{{"a", Array::from(std::vector<float>{3, 0, 4})},
                     {"b", Array::from(std::vector<float>{12})},
                     {"n", Array::from(std::vector<int64_t>{5})}};
  for (auto& [k, v] : global) v.data<float>()[0] = 1.0f;
  // delta = (2, 0, 4) and (11): norm sqrt(4 + 16 + 121) = sqrt(141).
  EXPECT_DOUBLE_EQ(delta_norm(update, global), std::sqrt(141.0));
  const double before = clip_update(update, global, 1.5);
  EXPECT_DOUBLE_EQ(before, std::sqrt(141.0));
  EXPECT_NEAR(delta_norm(update, global), 1.5, 1e-6);
  const double s = 1.5 / std::sqrt(141.0);
  EXPECT_FLOAT_EQ(update["a"].data<float>()[0], float(1 + 2 * s));
  EXPECT_FLOAT_EQ(update["a"].data<float>()[1], 0.0f);
  EXPECT_FLOAT_EQ(update["a"].data<float>()[2], float(4 * s));
  EXPECT_FLOAT_EQ(update["b"].data<float>()[0], float(1 + 11 * s));
  EXPECT_EQ(update["n"].data<int64_t>()[0], 5);  // not float: not selected
  // Within the bound: bit-for-bit untouched.
  NamedArrays copy{{"a", update["a"].clone()}, {"b", update["b"].clone()}};
  clip_update(copy, global, 10.0);
  EXPECT_EQ(std::memcmp(copy["a"].raw(), update["a"].raw(), 12), 0);
  // A selected entry without a global value is named.
  global.erase("b");
  try {
    clip_update(update, global, 1.0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'b'"), std::string::npos) << e.what();
  }
}

TEST(DpMechanism, SamplingRateFollowsTheAssumption) {
  DpSettings s;
  EXPECT_EQ(s.sampling_rate(3, 10), 1.0);  // None: no amplification assumed
  s.sampling = Sampling::Poisson;
  EXPECT_DOUBLE_EQ(s.sampling_rate(3, 10), 0.3);
  EXPECT_THROW(s.sampling_rate(11, 10), Error);
  EXPECT_THROW(s.sampling_rate(0, 10), Error);
  EXPECT_STREQ(name(Sampling::Poisson), "poisson");
  EXPECT_STREQ(name(Level::Sample), "sample");
  EXPECT_STREQ(name(Placement::Local), "local");
  s.clip = 0;
  EXPECT_THROW(s.check(), Error);
  s.clip = 1;
  s.noise_multiplier = std::nan("");
  EXPECT_THROW(s.check(), Error);
}
