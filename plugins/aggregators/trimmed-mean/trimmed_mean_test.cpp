#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

TEST(TrimmedMean, DropsFloorBetaNAtEachEnd) {
  NamedArrays global{{"w", vec({0, 0})}};
  std::vector<SiteUpdate> ups;
  const std::vector<std::vector<float>> v = {{1, -100}, {2, 5}, {3, 6}, {4, 7}, {100, 8}};
  for (size_t s = 0; s < v.size(); ++s)
    ups.push_back(update("s" + std::to_string(s), {{"w", vec(v[s])}}));
  // beta 0.2, n 5: k = 1 -> mean of ranks 1..3: {2,3,4} = 3; {5,6,7} = 6.
  EXPECT_EQ(values(make("trimmed-mean")->aggregate(global, ups, {1, 1, 0}), "w"),
            (std::vector<float>{3, 6}));
  // beta 0.1: k = 0 -> the plain mean.
  auto none = make("trimmed-mean", {{"beta", make_value(0.1)}});
  const auto out = values(none->aggregate(global, ups, {1, 1, 0}), "w");
  EXPECT_FLOAT_EQ(out[0], 110.0f / 5);
  EXPECT_FLOAT_EQ(out[1], -74.0f / 5);
  // beta 0.45, n 5: k = 2 -> the median.
  auto most = make("trimmed-mean", {{"beta", make_value(0.45)}});
  EXPECT_EQ(values(most->aggregate(global, ups, {1, 1, 0}), "w"), (std::vector<float>{3, 6}));
}

TEST(TrimmedMean, BetaMustStayBelowOneHalf) {
  const auto& desc = testkit::builtin_registry().get(Kind::Aggregator, "trimmed-mean");
  EXPECT_THROW(make_args("trimmed-mean", desc.args, {{"beta", make_value(0.5)}}), Error);
  EXPECT_THROW(make_args("trimmed-mean", desc.args, {{"beta", make_value(-0.1)}}), Error);
}
