#include <cmath>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {
// Sites at 0, 1, 2, 3, 30 (1-D). Median c = 2; distances 2, 1, 0, 1, 28; median distance s = 1.
std::vector<SiteUpdate> sites() {
  std::vector<SiteUpdate> ups;
  for (float x : {0.f, 1.f, 2.f, 3.f, 30.f})
    ups.push_back(update("s" + std::to_string(int(x)), {{"w", vec({x})}}));
  return ups;
}
}  // namespace

TEST(OutlierSuppression, DropModeByHand) {
  // kappa 2.5: threshold 2.5 -> site 30 dropped; mean of 0..3 = 1.5.
  auto agg = make("outlier-suppression",
                  {{"mode", make_value("drop")}, {"weighting", make_value("uniform")}});
  EXPECT_FLOAT_EQ(values(agg->aggregate({{"w", vec({0})}}, sites(), {1, 1, 0}), "w")[0], 1.5f);
  // kappa 1.5: threshold 1.5 -> site 0 (distance 2) is dropped too: mean of 1, 2, 3 = 2.
  auto tight = make("outlier-suppression", {{"mode", make_value("drop")},
                                            {"kappa", make_value(1.5)},
                                            {"weighting", make_value("uniform")}});
  EXPECT_FLOAT_EQ(values(tight->aggregate({{"w", vec({0})}}, sites(), {1, 1, 0}), "w")[0], 2.0f);
}

TEST(OutlierSuppression, DownweightModeByHand) {
  // Site 30 gets weight 2.5 / 28; the others 1: x = (0+1+2+3 + 30 * 2.5/28) / (4 + 2.5/28).
  auto agg = make("outlier-suppression", {{"weighting", make_value("uniform")}});
  const float a = 2.5f / 28.0f;
  EXPECT_NEAR(values(agg->aggregate({{"w", vec({0})}}, sites(), {1, 1, 0}), "w")[0],
              (6.0f + 30.0f * a) / (4.0f + a), 1e-5);
}

TEST(OutlierSuppression, AgreeingSitesAreAveragedByTheirSamples) {
  auto agg = make("outlier-suppression");
  std::vector<SiteUpdate> ups = {update("a", {{"w", vec({1, 1})}}, 1),
                                 update("b", {{"w", vec({2, 2})}}, 3)};
  // Two sites: both at distance 0.5*sqrt(2) = s, below kappa s: plain weighted mean.
  EXPECT_EQ(values(agg->aggregate({{"w", vec({0, 0})}}, ups, {1, 1, 0}), "w"),
            (std::vector<float>{1.75f, 1.75f}));
}
