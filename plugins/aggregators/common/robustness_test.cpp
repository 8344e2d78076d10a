// Every aggregator against poisoned and non-finite updates.
#include <cmath>
#include <limits>
#include <random>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {

const std::vector<std::string> kAll = {
    "fedavg", "fedprox",      "fedadam", "fedyogi",    "fedadagrad",          "loss-weighted",
    "median", "trimmed-mean", "krum",    "multi-krum", "outlier-suppression", "fourier"};

// Sites around w* = 1 (spread 0.01) with equal samples; optionally site 0 poisoned.
std::vector<SiteUpdate> sites(std::mt19937& rng, const std::string& poison, int count = 5) {
  std::vector<SiteUpdate> ups;
  for (int s = 0; s < count; ++s)
    ups.push_back(update("site" + std::to_string(s), random_state(rng, 1.0f, 0.01f), 10, 0.5));
  if (poison == "flip") {
    for (auto& [name, a] : ups[0].state)
      if (a.dtype() == DType::F32)
        for (int64_t k = 0; k < a.numel(); ++k) a.data<float>()[k] *= -10.0f;
  } else if (poison == "noise") {
    std::normal_distribution<float> big(0.0f, 100.0f);
    for (auto& [name, a] : ups[0].state)
      if (a.dtype() == DType::F32)
        for (int64_t k = 0; k < a.numel(); ++k) a.data<float>()[k] += big(rng);
  }
  return ups;
}

// Largest coordinate distance between the float tensors of two states.
double max_gap(const NamedArrays& a, const NamedArrays& b) {
  double gap = 0;
  for (const auto& [name, x] : a)
    if (x.dtype() == DType::F32)
      for (int64_t k = 0; k < x.numel(); ++k)
        gap = std::max(gap, double(std::fabs(x.data<float>()[k] - b.at(name).data<float>()[k])));
  return gap;
}

NamedArrays clean_mean(const std::vector<SiteUpdate>& ups) {
  NamedArrays mean;
  for (const auto& [name, a] : ups[1].state) {
    if (a.dtype() != DType::F32) continue;
    Array m(DType::F32, a.shape());
    for (size_t s = 1; s < ups.size(); ++s)
      for (int64_t k = 0; k < a.numel(); ++k)
        m.data<float>()[k] += ups[s].state.at(name).data<float>()[k] / float(ups.size() - 1);
    mean[name] = std::move(m);
  }
  return mean;
}

}  // namespace

TEST(Robustness, RobustAggregatorsIgnoreOnePoisonedSiteOfFive) {
  for (const std::string poison : {"flip", "noise"}) {
    std::mt19937 rng(poison == "flip" ? 1 : 2);
    const auto ups = sites(rng, poison);
    const NamedArrays clean = clean_mean(ups);
    const NamedArrays global = random_state(rng, 1.0f, 0.01f);
    for (const std::string name :
         {"median", "trimmed-mean", "krum", "multi-krum", "outlier-suppression"}) {
      const NamedArrays out = make(name)->aggregate(global, ups, {1, 1, 0});
      // The clean sites spread 0.01 around 1: robust results stay within a few spreads.
      EXPECT_LT(max_gap(out, clean), 0.05) << name << " / " << poison;
    }
    const NamedArrays avg = make("fedavg")->aggregate(global, ups, {1, 1, 0});
    EXPECT_GT(max_gap(avg, clean), 1.0) << "fedavg / " << poison;
  }
}

TEST(Robustness, EveryAggregatorRejectsANonFiniteUpdate) {
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (const std::string& name : kAll) {
      std::mt19937 rng(5);
      const NamedArrays global = random_state(rng, 1.0f, 0.01f);
      // Six sites, so that krum's f = 1 still has 2f + 3 = 5 once the bad one is gone.
      std::vector<SiteUpdate> ups = sites(rng, "", 6);
      std::vector<SiteUpdate> without(ups.begin() + 1, ups.end());
      // Poison the last coordinate of the last tensor visited: met at the end of the pass.
      ups[0].state["conv.weight"] = ups[0].state["conv.weight"].clone();
      ups[0].state["conv.weight"].data<float>()[107] = bad;
      const NamedArrays out = make(name)->aggregate(global, ups, {2, 3, 0});
      for (const auto& [tensor, a] : out) {
        if (a.dtype() != DType::F32) continue;
        for (int64_t k = 0; k < a.numel(); ++k)
          ASSERT_TRUE(std::isfinite(a.data<float>()[k])) << name << " " << tensor;
      }
      // Exactly as if the site had not been there.
      EXPECT_TRUE(identical(out, make(name)->aggregate(global, without, {2, 3, 0}))) << name;
    }
  }
}

TEST(Robustness, NoUsableUpdateKeepsTheGlobalAndTheServerState) {
  for (const std::string& name : kAll) {
    std::mt19937 rng(9);
    auto agg = make(name);
    const NamedArrays global =
        agg->aggregate(random_state(rng, 1.0f, 0.01f), sites(rng, ""), {1, 2, 0});
    const NamedArrays before = agg->state();
    std::vector<SiteUpdate> ups = sites(rng, "");
    for (auto& u : ups) {
      u.state["conv.weight"] = u.state["conv.weight"].clone();
      u.state["conv.weight"].data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
    }
    const NamedArrays out = agg->aggregate(global, ups, {2, 2, 0});
    EXPECT_TRUE(identical(out, global)) << name;
    EXPECT_TRUE(identical(agg->state(), before)) << name;  // fedadam's moments did not move
  }
}
