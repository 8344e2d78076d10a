// The shared kernels and checks of ../common.
#include "aggregation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

TEST(AggregationKernels, SortingNetworkSortsEveryZeroOneInput) {
  // Zero-one principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
  for (int n = 1; n <= 13; ++n) {
    const auto net = agg::sorting_network(n);
    for (const auto& [i, j] : net) {
      ASSERT_LT(i, j);
      ASSERT_LT(j, n);
    }
    for (uint32_t bits = 0; bits < (1u << n); ++bits) {
      std::vector<int> v(n);
      for (int k = 0; k < n; ++k) v[k] = (bits >> k) & 1;
      for (const auto& [i, j] : net)
        if (v[i] > v[j]) std::swap(v[i], v[j]);
      ASSERT_TRUE(std::is_sorted(v.begin(), v.end())) << "n = " << n << " input " << bits;
    }
  }
  EXPECT_EQ(agg::sorting_network(8).size(), 19u);  // Batcher's network for 8 items
}

TEST(AggregationKernels, SortColumnsMatchesStdSort) {
  std::mt19937 rng(7);
  std::normal_distribution<float> d;
  for (int n : {1, 2, 5, 8, 17, 32}) {
    const int64_t len = 1000;
    std::vector<float> table(n * agg::kBlock);
    for (int r = 0; r < n; ++r)
      for (int64_t k = 0; k < len; ++k) table[r * agg::kBlock + k] = d(rng);
    std::vector<float> original = table;
    agg::sort_columns(table.data(), agg::kBlock, len, agg::sorting_network(n));
    for (int64_t k = 0; k < len; ++k) {
      std::vector<float> col(n), got(n);
      for (int r = 0; r < n; ++r) {
        col[r] = original[r * agg::kBlock + k];
        got[r] = table[r * agg::kBlock + k];
      }
      std::sort(col.begin(), col.end());
      ASSERT_EQ(col, got) << "n = " << n << " column " << k;
    }
  }
}

TEST(AggregationKernels, FiniteCheckFindsNanAndInfAnywhere) {
  std::vector<float> x(1037, 1.5f);
  EXPECT_TRUE(agg::all_finite(x.data(), x.size()));
  for (size_t pos : {size_t(0), size_t(15), size_t(16), size_t(1036)}) {
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      std::vector<float> y = x;
      y[pos] = bad;
      EXPECT_FALSE(agg::all_finite(y.data(), y.size())) << pos;
    }
  }
  x[3] = std::numeric_limits<float>::max();
  x[4] = std::numeric_limits<float>::denorm_min();
  EXPECT_TRUE(agg::all_finite(x.data(), x.size()));
}

TEST(AggregationKernels, ReductionsMatchDoubleReference) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> a(10007), b(10007);
  for (auto& v : a) v = d(rng);
  for (auto& v : b) v = d(rng);
  double s = 0, q = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    s += a[k];
    q += double(a[k] - b[k]) * double(a[k] - b[k]);
  }
  EXPECT_NEAR(agg::sum(a.data(), a.size()), s, 1e-3);
  EXPECT_NEAR(agg::squared_distance(a.data(), b.data(), a.size()), q, 1e-6 * q);
}

TEST(AggregationChecks, StructureMismatchNamesSiteAndTensor) {
  NamedArrays global{{"w", vec({0, 0})}};
  std::vector<SiteUpdate> ups = {update("a", {{"w", vec({1, 2})}}),
                                 update("b", {{"w", vec({1, 2, 3})}})};
  try {
    agg::check_structure("median", global, ups, {4, 10, 0});
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("median: round 4"), std::string::npos) << what;
    EXPECT_NE(what.find("site 'b'"), std::string::npos) << what;
    EXPECT_NE(what.find("'w'"), std::string::npos) << what;
  }
  ups[1] = update("c", {});
  EXPECT_THROW(agg::check_structure("median", global, ups, {1, 1, 0}), Error);
}

TEST(AggregationChecks, NonFloatBuffersTakeTheMaximum) {
  NamedArrays global{{"n", Array::from(std::vector<int64_t>{0, 0})}, {"w", vec({0})}};
  std::vector<SiteUpdate> ups = {
      update("a", {{"n", Array::from(std::vector<int64_t>{5, 9})}, {"w", vec({1})}}),
      update("b", {{"n", Array::from(std::vector<int64_t>{7, 2})}, {"w", vec({3})}})};
  for (const char* name : {"fedavg", "median", "trimmed-mean", "fedadam", "fourier"}) {
    NamedArrays out = make(name)->aggregate(global, ups, {1, 1, 0});
    EXPECT_EQ(out.at("n").to_vector<int64_t>(), (std::vector<int64_t>{7, 9})) << name;
  }
}
