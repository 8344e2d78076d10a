#include <cmath>
#include <numeric>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {

Array tensor(std::vector<float> v, std::vector<int64_t> shape) {
  return Array::from(std::move(v), std::move(shape));
}

// Sites a, b with a conv kernel [2, 2, 1, 1] and a bias; the global is zero.
struct Case {
  NamedArrays global{{"k", tensor({0, 0, 0, 0}, {2, 2, 1, 1})}, {"b", vec({0, 0})}};
  std::vector<SiteUpdate> ups = {
      update("a", {{"k", tensor({1, 2, 3, 4}, {2, 2, 1, 1})}, {"b", vec({1, 3})}}),
      update("b", {{"k", tensor({3, 2, 1, 8}, {2, 2, 1, 1})}, {"b", vec({3, 5})}})};
};
// Mean kernel {2, 2, 2, 6}: its DC component is the average 3.

std::unique_ptr<Aggregator> constant(double r) {
  return make("fourier", {{"schedule", make_value("constant")},
                          {"fraction_start", make_value(r)},
                          {"weighting", make_value("uniform")}});
}

}  // namespace

TEST(Fourier, FullFractionIsFedAvgAndZeroKeepsTheGlobal) {
  Case c;
  const NamedArrays all = constant(1.0)->aggregate(c.global, c.ups, {1, 1, 0});
  EXPECT_EQ(values(all, "k"), (std::vector<float>{2, 2, 2, 6}));
  const NamedArrays none = constant(0.0)->aggregate(c.global, c.ups, {1, 1, 0});
  EXPECT_EQ(values(none, "k"), (std::vector<float>{0, 0, 0, 0}));
  // Biases are always averaged.
  EXPECT_EQ(values(none, "b"), (std::vector<float>{2, 4}));
}

TEST(Fourier, OnlyTheLowestFrequencyIsSharedAtHalfFraction) {
  // R = C = 2, r = 0.5: ceil(1) x ceil(1) -> only the DC coefficient is averaged; the global
  // (zero) supplies the rest, so every entry becomes the mean of the averaged kernel: 3.
  Case c;
  const auto k = values(constant(0.5)->aggregate(c.global, c.ups, {1, 1, 0}), "k");
  for (float v : k) EXPECT_NEAR(v, 3.0f, 1e-6);
}

TEST(Fourier, FirstRowOfFrequenciesAtSixtyPercentOfARectangularKernel) {
  // Kernel [2, 4, 1, 1]: R = 2, C = 4. r = 0.6 -> ceil(1.2) = 2 rows (all), ceil(2.4) = 3
  // columns: only the highest column frequency v = 3 is dropped. Check against a direct DCT.
  std::vector<float> mean = {1, -2, 3, 0.5f, 4, 4, -1, 2};
  NamedArrays global{{"k", tensor(std::vector<float>(8, 0), {2, 4, 1, 1})}};
  auto agg = constant(0.6);
  const auto got = values(
      agg->aggregate(global, {update("a", {{"k", tensor(mean, {2, 4, 1, 1})}})}, {1, 1, 0}), "k");
  // Per row, the orthonormal DCT-II basis vector of frequency 3 over 4 points; projecting it out
  // of each row (rows are kept entirely) is the expected result.
  const double pi = std::acos(-1.0);
  for (int row = 0; row < 2; ++row) {
    double c3 = 0;
    std::vector<double> basis(4);
    for (int n = 0; n < 4; ++n) {
      basis[n] = std::sqrt(0.5) * std::cos(pi * (n + 0.5) * 3 / 4);
      c3 += mean[row * 4 + n] * basis[n];
    }
    for (int n = 0; n < 4; ++n)
      EXPECT_NEAR(got[row * 4 + n], mean[row * 4 + n] - c3 * basis[n], 1e-5) << row << "," << n;
  }
}

TEST(Fourier, FractionGrowsLinearlyOverTheRamp) {
  // fraction_start 0.5, fraction_end 1, 3 rounds: r = 0.5, 0.75, 1.0. For the [2,2] kernel:
  // r = 0.5 -> DC only (all 3); r = 0.75 -> ceil(1.5) = 2: everything (fedavg); r = 1 -> fedavg.
  auto agg =
      make("fourier", {{"fraction_start", make_value(0.5)}, {"weighting", make_value("uniform")}});
  Case c;
  const auto r1 = values(agg->aggregate(c.global, c.ups, {1, 3, 0}), "k");
  for (float v : r1) EXPECT_NEAR(v, 3.0f, 1e-6);
  EXPECT_EQ(values(agg->aggregate(c.global, c.ups, {2, 3, 0}), "k"),
            (std::vector<float>{2, 2, 2, 6}));
  auto slow = make("fourier", {{"fraction_start", make_value(0.25)},
                               {"ramp_rounds", make_value(int64_t(5))},
                               {"weighting", make_value("uniform")}});
  // r = 0.25, 0.4375, 0.625: rounds 1 and 2 share DC only (ceil(0.875) = 1), round 3 all.
  for (int round : {1, 2}) {
    const auto k = values(slow->aggregate(c.global, c.ups, {round, 100, 0}), "k");
    for (float v : k) EXPECT_NEAR(v, 3.0f, 1e-6) << round;
  }
  EXPECT_EQ(values(slow->aggregate(c.global, c.ups, {3, 100, 0}), "k"),
            (std::vector<float>{2, 2, 2, 6}));
}

TEST(Fourier, MatricesOptionFiltersTwoDimensionalWeights) {
  NamedArrays global{{"fc", tensor({0, 0, 0, 0}, {2, 2})}};
  std::vector<SiteUpdate> ups = {update("a", {{"fc", tensor({2, 2, 2, 6}, {2, 2})}})};
  auto conv_only = constant(0.5);
  EXPECT_EQ(values(conv_only->aggregate(global, ups, {1, 1, 0}), "fc"),
            (std::vector<float>{2, 2, 2, 6}));
  auto matrices = make("fourier", {{"schedule", make_value("constant")},
                                   {"fraction_start", make_value(0.5)},
                                   {"apply_to", make_value("matrices")}});
  for (float v : values(matrices->aggregate(global, ups, {1, 1, 0}), "fc"))
    EXPECT_NEAR(v, 3.0f, 1e-6);
}
