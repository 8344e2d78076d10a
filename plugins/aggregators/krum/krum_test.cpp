#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {
// Five 1-D sites: 0, 1, 2, 3 and an outlier at 20.
std::vector<SiteUpdate> line() {
  std::vector<SiteUpdate> ups;
  for (float x : {0.f, 1.f, 2.f, 3.f, 20.f})
    ups.push_back(update("s" + std::to_string(int(x)), {{"w", vec({x})}}));
  return ups;
}
}  // namespace

TEST(Krum, PicksTheUpdateWithTheLowestScoreByHand) {
  // f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others.
  //   0: 1 + 4 = 5;  1: 1 + 1 = 2;  2: 1 + 1 = 2;  3: 1 + 4 = 5;  20: 289 + 324 = 613.
  // Ties go to the earlier site: krum returns site 1.
  NamedArrays global{{"w", vec({0})}};
  EXPECT_EQ(values(make("krum")->aggregate(global, line(), {1, 1, 0}), "w"),
            (std::vector<float>{1}));
  // multi-krum, m = 0 -> n - f = 4 lowest: 0, 1, 2, 3 -> mean 1.5; m = 2 -> {1, 2} -> 1.5;
  // m = 3 -> {1, 2, 0} -> 1.
  EXPECT_EQ(values(make("multi-krum")->aggregate(global, line(), {1, 1, 0}), "w"),
            (std::vector<float>{1.5f}));
  EXPECT_EQ(
      values(
          make("multi-krum", {{"m", make_value(int64_t(3))}})->aggregate(global, line(), {1, 1, 0}),
          "w"),
      (std::vector<float>{1}));
}

TEST(Krum, TooFewSitesForFIsAnError) {
  // f = 2 needs 2f + 3 = 7 sites.
  auto krum = make("krum", {{"f", make_value(int64_t(2))}});
  try {
    krum->aggregate({{"w", vec({0})}}, line(), {3, 5, 0});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("krum: round 3: 5 usable updates"), std::string::npos)
        << e.what();
  }
}

TEST(Krum, DistancesSpanEveryTensor) {
  // Site c is close to a and b in 'x' but far in 'y': it must not be chosen.
  NamedArrays global{{"x", vec({0})}, {"y", vec({0})}};
  std::vector<SiteUpdate> ups = {update("a", {{"x", vec({0})}, {"y", vec({0})}}),
                                 update("b", {{"x", vec({1})}, {"y", vec({0})}}),
                                 update("c", {{"x", vec({0.5f})}, {"y", vec({50})}})};
  auto krum = make("krum", {{"f", make_value(int64_t(0))}});
  // f = 0, n = 3: neighbours n - 2 = 1. a: 1, b: 1, c: 2500.25 -> a (earlier of the tie).
  const NamedArrays out = krum->aggregate(global, ups, {1, 1, 0});
  EXPECT_EQ(values(out, "x"), std::vector<float>{0});
  EXPECT_EQ(values(out, "y"), std::vector<float>{0});
}
