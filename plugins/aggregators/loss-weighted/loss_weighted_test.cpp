#include <cmath>
#include <limits>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

TEST(LossWeighted, InverseRuleByHand) {
  // w = n / (L + eps): a: 2 / 1 = 2, b: 1 / 3 -> x = (2*1 + 1/3*7) / (2 + 1/3) = 13/7.
  auto agg = make("loss-weighted", {{"epsilon", make_value(0.0)}});
  NamedArrays global{{"w", vec({0})}};
  const NamedArrays out = agg->aggregate(
      global, {update("a", {{"w", vec({1})}}, 2, 1.0), update("b", {{"w", vec({7})}}, 1, 3.0)},
      {1, 1, 0});
  EXPECT_NEAR(values(out, "w")[0], 13.0f / 7.0f, 1e-6);
}

TEST(LossWeighted, SoftmaxRuleByHandAndUniformBase) {
  // w = exp(-(L - Lmin) / T), T = 0.5: a: 1, b: exp(-2).
  auto agg = make("loss-weighted", {{"rule", make_value("softmax")},
                                    {"temperature", make_value(0.5)},
                                    {"weighting", make_value("uniform")}});
  const NamedArrays out = agg->aggregate(
      {{"w", vec({0})}},
      {update("a", {{"w", vec({1})}}, 100, 0.2), update("b", {{"w", vec({7})}}, 1, 1.2)},
      {1, 1, 0});
  const double e = std::exp(-2.0);
  EXPECT_NEAR(values(out, "w")[0], (1 + 7 * e) / (1 + e), 1e-6);
}

TEST(LossWeighted, PoorSitesCountLess) {
  auto agg = make("loss-weighted", {{"weighting", make_value("uniform")}});
  const NamedArrays out = agg->aggregate(
      {{"w", vec({0})}},
      {update("good", {{"w", vec({1})}}, 1, 0.1), update("bad", {{"w", vec({-1})}}, 1, 5.0)},
      {1, 1, 0});
  EXPECT_GT(values(out, "w")[0], 0.9f);  // fedavg would give 0
}

TEST(LossWeighted, NonFiniteLossIsRejected) {
  auto agg = make("loss-weighted");
  const NamedArrays out =
      agg->aggregate({{"w", vec({0})}},
                     {update("a", {{"w", vec({1})}}, 1, 0.5),
                      update("b", {{"w", vec({9})}}, 1, std::numeric_limits<double>::quiet_NaN())},
                     {1, 1, 0});
  EXPECT_FLOAT_EQ(values(out, "w")[0], 1.0f);
}
