#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

TEST(Median, OddAndEvenSiteCounts) {
  auto agg = make("median");
  NamedArrays global{{"w", vec({0, 0, 0})}};
  std::vector<SiteUpdate> ups = {update("a", {{"w", vec({1, 10, -3})}}, 100),
                                 update("b", {{"w", vec({5, 20, -1})}}, 1),
                                 update("c", {{"w", vec({3, 90, -2})}}, 1)};
  EXPECT_EQ(values(agg->aggregate(global, ups, {1, 1, 0}), "w"),
            (std::vector<float>{3, 20, -2}));  // unweighted: num_samples plays no part
  ups.push_back(update("d", {{"w", vec({4, 0, 8})}}));
  // Even: mean of the two middle values: {3,4} {10,20} {-2,-1}
  EXPECT_EQ(values(agg->aggregate(global, ups, {1, 1, 0}), "w"),
            (std::vector<float>{3.5f, 15, -1.5f}));
}

TEST(Median, LargeTensorAcrossBlocksMatchesPerCoordinateMedian) {
  // More coordinates than one block, including a partial last block.
  const int64_t d = 5000;
  std::vector<std::vector<float>> site(5, std::vector<float>(d));
  for (int s = 0; s < 5; ++s)
    for (int64_t k = 0; k < d; ++k) site[s][k] = float((k * (s + 3) * 7919) % 101) - 50;
  std::vector<SiteUpdate> ups;
  for (int s = 0; s < 5; ++s) ups.push_back(update("s" + std::to_string(s), {{"w", vec(site[s])}}));
  const auto out =
      values(make("median")->aggregate({{"w", vec(std::vector<float>(d))}}, ups, {1, 1, 0}), "w");
  for (int64_t k = 0; k < d; ++k) {
    std::vector<float> col;
    for (int s = 0; s < 5; ++s) col.push_back(site[s][k]);
    std::sort(col.begin(), col.end());
    ASSERT_EQ(out[k], col[2]) << k;
  }
}
