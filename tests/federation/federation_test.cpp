// Partitioning into sites and simulated scanner shift (core/src/federation_tools.cpp).
#include <concord/error.h>
#include <concord/federation_tools.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "testing.h"

using namespace concord;

namespace {

// One pooled source: n train samples (label i % classes unless `labels` skews it), m test.
Federation pooled(int n_train, int n_test, int classes = 2) {
  Federation f;
  f.num_classes = classes;
  f.sites.push_back({"all", {}, {}});
  for (int i = 0; i < n_train + n_test; ++i) {
    Sample s;
    s.id = (i < n_train ? "train-" : "test-") + std::to_string(i);
    s.label = i % classes;
    s.image = Image(2, 1, {4, 4, 1});
    s.image.data[0] = float(i);
    (i < n_train ? f.sites[0].train : f.sites[0].test).push_back(std::move(s));
  }
  return f;
}

std::vector<std::vector<std::string>> ids(const Federation& f) {
  std::vector<std::vector<std::string>> out;
  for (const auto& site : f.sites) {
    out.emplace_back();
    for (const auto& s : site.train) out.back().push_back(s.id);
    out.back().push_back("|");
    for (const auto& s : site.test) out.back().push_back(s.id);
  }
  return out;
}

Image ramp(int64_t w, int64_t h, int channels = 1) {
  Image img(2, channels, {w, h, 1});
  for (int c = 0; c < channels; ++c)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        img.at(x, y, 0, c) = float(0.1 + 0.8 * (x + y) / double(w + h - 2)) * (c ? 0.5f : 1.0f);
  return img;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST(Random, SamplersAreDeterministicAndSane) {
  SeededRandom a(42), b(42), c(43);
  EXPECT_EQ(a.next(), b.next());
  EXPECT_NE(a.next(), c.next());
  SeededRandom r(7);
  double sum = 0, sq = 0, gsum = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double x = r.normal();
    sum += x;
    sq += x * x;
    gsum += r.gamma(0.3);
  }
  EXPECT_NEAR(sum / n, 0.0, 0.03);
  EXPECT_NEAR(sq / n, 1.0, 0.05);
  EXPECT_NEAR(gsum / n, 0.3, 0.03);  // E[Gamma(k, 1)] = k
  auto p = r.dirichlet(0.5, 5);
  double total = 0;
  for (double x : p) total += x;
  EXPECT_NEAR(total, 1.0, 1e-12);
  for (int i = 0; i < 1000; ++i) {
    const int64_t k = r.below(3);
    EXPECT_TRUE(k >= 0 && k < 3);
  }
}

TEST(Partition, NoneReturnsInput) {
  auto f = partition(pooled(10, 4), {"none", 4, 0.5, 1}, 1);
  ASSERT_EQ(f.sites.size(), 1u);
  EXPECT_EQ(f.sites[0].name, "all");
  EXPECT_EQ(f.sites[0].train.size(), 10u);
}

TEST(Partition, CountsAddUpForEveryScheme) {
  for (std::string scheme : {"iid", "dirichlet", "quantity"}) {
    auto f = partition(pooled(200, 60, 3), {scheme, 5, 0.5, 8}, 3);
    ASSERT_EQ(f.sites.size(), 5u) << scheme;
    size_t train = 0, test = 0;
    std::set<std::string> seen;
    for (size_t s = 0; s < f.sites.size(); ++s) {
      EXPECT_EQ(f.sites[s].name, "site-" + std::to_string(s + 1));
      EXPECT_GE(f.sites[s].train.size(), 8u) << scheme << " " << f.sites[s].name;
      EXPECT_GE(f.sites[s].test.size(), 1u) << scheme << " " << f.sites[s].name;
      train += f.sites[s].train.size();
      test += f.sites[s].test.size();
      for (const auto& x : f.sites[s].train) seen.insert(x.id);
      for (const auto& x : f.sites[s].test) seen.insert(x.id);
    }
    EXPECT_EQ(train, 200u) << scheme;
    EXPECT_EQ(test, 60u) << scheme;
    EXPECT_EQ(seen.size(), 260u) << scheme;  // every sample exactly once
    auto note = nlohmann::json::parse(f.notes.at("partition"));
    EXPECT_EQ(note["scheme"], scheme);
  }
}

TEST(Partition, IidSizesDifferByAtMostOne) {
  auto f = partition(pooled(103, 20), {"iid", 4, 0.5, 1}, 9);
  for (const auto& s : f.sites) {
    EXPECT_GE(s.train.size(), 25u);
    EXPECT_LE(s.train.size(), 26u);
  }
}

TEST(Partition, DeterministicInSeed) {
  for (std::string scheme : {"iid", "dirichlet", "quantity"}) {
    const PartitionSpec spec{scheme, 4, 0.3, 5};
    auto a = ids(partition(pooled(120, 40), spec, 11));
    auto b = ids(partition(pooled(120, 40), spec, 11));
    auto c = ids(partition(pooled(120, 40), spec, 12));
    EXPECT_EQ(a, b) << scheme;
    EXPECT_NE(a, c) << scheme;
  }
}

TEST(Partition, SmallAlphaDirichletSkewsLabels) {
  // Average over sites of the majority-class share: ~0.5 for balanced two-class sites.
  auto majority_share = [](const Federation& f) {
    double total = 0;
    for (const auto& site : f.sites) {
      std::map<int64_t, int> h;
      for (const auto& s : site.train) h[s.label]++;
      int best = 0;
      for (auto& [l, n] : h) best = std::max(best, n);
      total += double(best) / site.train.size();
    }
    return total / f.sites.size();
  };
  const double skewed = majority_share(partition(pooled(400, 100), {"dirichlet", 4, 0.1, 10}, 5));
  const double mild = majority_share(partition(pooled(400, 100), {"dirichlet", 4, 100.0, 10}, 5));
  const double iid = majority_share(partition(pooled(400, 100), {"iid", 4, 0.1, 10}, 5));
  EXPECT_GT(skewed, 0.8);
  EXPECT_LT(mild, 0.6);
  EXPECT_LT(iid, 0.6);
}

TEST(Partition, TestSplitFollowsTrainLabelMix) {
  auto f = partition(pooled(400, 400), {"dirichlet", 3, 0.2, 10}, 21);
  for (const auto& site : f.sites) {
    auto share = [](const std::vector<Sample>& v) {
      double ones = 0;
      for (const auto& s : v) ones += s.label == 1;
      return v.empty() ? 0.0 : ones / v.size();
    };
    EXPECT_NEAR(share(site.train), share(site.test), 0.1) << site.name;
  }
}

// test: iid keeps the skewed training split (the same as with follow) and gives every site a
// test split with the pooled label mix.
TEST(Partition, IidTestSplitKeepsTrainingSkewAndPoolsLabels) {
  PartitionSpec follow{"dirichlet", 3, 0.2, 10}, iid = follow;
  iid.test = "iid";
  auto a = partition(pooled(400, 400), follow, 21), b = partition(pooled(400, 400), iid, 21);
  auto share = [](const std::vector<Sample>& v) {
    double ones = 0;
    for (const auto& s : v) ones += s.label == 1;
    return v.empty() ? 0.0 : ones / v.size();
  };
  double pooled_share = 0, n = 0;
  for (const auto& site : b.sites)
    for (const auto& s : site.test) pooled_share += s.label == 1, n += 1;
  pooled_share /= n;
  EXPECT_EQ(n, 400);
  double max_train_gap = 0;
  for (size_t k = 0; k < b.sites.size(); ++k) {
    std::vector<std::string> ta, tb;
    for (const auto& s : a.sites[k].train) ta.push_back(s.id);
    for (const auto& s : b.sites[k].train) tb.push_back(s.id);
    EXPECT_EQ(ta, tb) << b.sites[k].name;
    EXPECT_NEAR(share(b.sites[k].test), pooled_share, 0.1) << b.sites[k].name;
    EXPECT_NEAR(double(b.sites[k].test.size()), 400.0 / 3, 1.0) << b.sites[k].name;
    max_train_gap = std::max(max_train_gap, std::abs(share(b.sites[k].train) - pooled_share));
  }
  EXPECT_GT(max_train_gap, 0.2);  // the training split is still skewed
  EXPECT_EQ(nlohmann::json::parse(b.notes.at("partition"))["test"], "iid");
  PartitionSpec bad = follow;
  bad.test = "balanced";
  EXPECT_THROW(partition(pooled(400, 400), bad, 21), Error);
}

TEST(Partition, MinSamplesHonouredEvenWhenDrawsFail) {
  // alpha 0.01 puts nearly everything on one site: redraws cannot fix it, rebalancing must.
  auto f = partition(pooled(100, 10), {"quantity", 10, 0.01, 9}, 2);
  for (const auto& s : f.sites) EXPECT_GE(s.train.size(), 9u) << s.name;
  auto g = partition(pooled(100, 10), {"dirichlet", 10, 0.01, 9}, 2);
  for (const auto& s : g.sites) EXPECT_GE(s.train.size(), 9u) << s.name;
  auto note = nlohmann::json::parse(g.notes.at("partition"));
  EXPECT_GT(note["rebalanced_samples"].get<int>() + note["draws"].get<int>(), 1);
}

TEST(Partition, Errors) {
  EXPECT_THROW(partition(pooled(10, 2), {"iid", 4, 0.5, 3}, 1), Error);  // 10 < 4 * 3
  EXPECT_THROW(partition(pooled(10, 2), {"bogus", 2, 0.5, 1}, 1), Error);
  EXPECT_THROW(partition(pooled(10, 2), {"quantity", 2, 0.0, 1}, 1), Error);
  auto unlabeled = pooled(10, 2);
  unlabeled.sites[0].train[3].label = -1;
  try {
    partition(unlabeled, {"dirichlet", 2, 0.5, 1}, 1);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train-3"), std::string::npos) << e.what();
  }
}

TEST(ScannerShift, StrengthZeroIsIdentity) {
  const auto sig = site_signature(5, 2, 0.0);
  EXPECT_EQ(sig.gamma, 1);
  EXPECT_EQ(sig.contrast, 1);
  EXPECT_EQ(sig.brightness, 0);
  EXPECT_EQ(sig.bias_amplitude, 0);
  EXPECT_EQ(sig.noise_sigma, 0);
  EXPECT_EQ(sig.blur_sigma, 0);
  EXPECT_EQ(sig.lowfreq_scale, 1);
  Image img = ramp(17, 12, 3);
  const auto before = img.data;
  apply_signature(img, sig, 99);
  EXPECT_TRUE(bitwise_equal(before, img.data));
}

TEST(ScannerShift, SignaturesDeterministicAndDistinct) {
  EXPECT_EQ(site_signature(3, 1, 1.0).json(), site_signature(3, 1, 1.0).json());
  std::set<std::string> all;
  for (int i = 0; i < 6; ++i) all.insert(site_signature(3, i, 1.0).json());
  EXPECT_EQ(all.size(), 6u);
  EXPECT_NE(site_signature(3, 1, 1.0).json(), site_signature(4, 1, 1.0).json());
  // Distinct enough to matter: sites 0 and 1 differ in gamma by more than 0.05.
  EXPECT_GT(std::abs(site_signature(3, 0, 1.0).gamma - site_signature(3, 1, 1.0).gamma), 0.05);
}

TEST(ScannerShift, SameSeedSameOutputBitwiseDifferentSeedDifferent) {
  const auto sig = site_signature(8, 1, 1.0);
  Image a = ramp(32, 24), b = ramp(32, 24), c = ramp(32, 24);
  apply_signature(a, sig, 1);
  apply_signature(b, sig, 1);
  apply_signature(c, sig, 2);
  EXPECT_TRUE(bitwise_equal(a.data, b.data));
  EXPECT_FALSE(bitwise_equal(a.data, c.data));
  EXPECT_FALSE(bitwise_equal(a.data, ramp(32, 24).data));
}

TEST(ScannerShift, EachStepDoesWhatItSays) {
  ScannerSignature id;
  {  // contrast and brightness: v = c v + b
    Image img = ramp(8, 8);
    const float v = img.at(3, 2);
    ScannerSignature s = id;
    s.contrast = 2;
    s.brightness = 0.1;
    apply_signature(img, s, 0);
    EXPECT_FLOAT_EQ(img.at(3, 2), 2 * v + 0.1f);
  }
  {  // gamma (negative values clamp to 0)
    Image img = ramp(8, 8);
    const float v = img.at(5, 1);
    ScannerSignature s = id;
    s.gamma = 2;
    apply_signature(img, s, 0);
    EXPECT_NEAR(img.at(5, 1), v * v, 1e-6);
  }
  {  // low-frequency scaling keeps the mean, changes the spread
    Image img = ramp(32, 32);
    double mean0 = 0, var0 = 0, mean1 = 0, var1 = 0;
    for (float v : img.data) mean0 += v;
    mean0 /= img.data.size();
    for (float v : img.data) var0 += (v - mean0) * (v - mean0);
    ScannerSignature s = id;
    s.lowfreq_scale = 0.5;
    apply_signature(img, s, 0);
    for (float v : img.data) mean1 += v;
    mean1 /= img.data.size();
    for (float v : img.data) var1 += (v - mean1) * (v - mean1);
    EXPECT_NEAR(mean1, mean0, 1e-4);
    EXPECT_LT(var1, 0.6 * var0);
  }
  {  // noise: std close to sigma on a flat image
    Image img(2, 1, {64, 64, 1});
    std::fill(img.data.begin(), img.data.end(), 0.5f);
    ScannerSignature s = id;
    s.noise_sigma = 0.05;
    apply_signature(img, s, 4);
    double sq = 0;
    for (float v : img.data) sq += (v - 0.5) * (v - 0.5);
    EXPECT_NEAR(std::sqrt(sq / img.data.size()), 0.05, 0.005);
  }
  {  // bias field: smooth, within exp(+-a)
    Image img(2, 1, {40, 40, 1});
    std::fill(img.data.begin(), img.data.end(), 0.5f);
    ScannerSignature s = id;
    s.bias_amplitude = 0.3;
    s.bias_seed = 77;
    apply_signature(img, s, 0);
    float lo = 1e9f, hi = -1e9f, step = 0;
    for (int64_t y = 0; y < 40; ++y)
      for (int64_t x = 0; x < 40; ++x) {
        lo = std::min(lo, img.at(x, y));
        hi = std::max(hi, img.at(x, y));
        if (x) step = std::max(step, std::abs(img.at(x, y) - img.at(x - 1, y)));
      }
    EXPECT_GE(lo, 0.5f * std::exp(-0.3f) - 1e-5f);
    EXPECT_LE(hi, 0.5f * std::exp(0.3f) + 1e-5f);
    EXPECT_GT(hi - lo, 0.05f);
    EXPECT_LT(step, 0.03f);  // smooth: neighbours differ little
  }
}

TEST(ScannerShift, ThreeDimensionalImages) {
  Image vol(3, 1, {12, 10, 6});
  for (size_t i = 0; i < vol.data.size(); ++i) vol.data[i] = float(i % 13) / 13.0f;
  Image copy = vol;
  const auto sig = site_signature(1, 0, 1.0);
  apply_signature(vol, sig, 3);
  apply_signature(copy, sig, 3);
  EXPECT_TRUE(bitwise_equal(vol.data, copy.data));
  EXPECT_EQ(vol.data.size(), 12u * 10 * 6);
}

TEST(ScannerShift, FederationKeepsReferenceAndRecordsParameters) {
  auto f = partition(pooled(40, 8), {"iid", 2, 0.5, 1}, 1);
  for (auto& site : f.sites)
    for (auto& s : site.train) s.image = ramp(16, 16);
  // A reference set by the dataset (e.g. brainsim's neutral rendering) is kept as it is.
  Image preset = ramp(16, 16);
  preset.data[0] = 123;
  f.sites[0].train[0].reference = preset;
  apply_scanner_shift(f, 1.0, 7);
  for (const auto& site : f.sites) {
    ASSERT_TRUE(f.notes.count("scanner." + site.name)) << site.name;
    auto j = nlohmann::json::parse(f.notes.at("scanner." + site.name));
    EXPECT_TRUE(j.contains("gamma") && j.contains("lowfreq_scale"));
    for (const auto& s : site.train) {
      ASSERT_TRUE(s.reference.has_value());
      EXPECT_FALSE(bitwise_equal(s.reference->data, s.image.data));
    }
  }
  EXPECT_EQ(f.sites[0].train[0].reference->data[0], 123.0f);
  EXPECT_TRUE(bitwise_equal(f.sites[0].train[1].reference->data, ramp(16, 16).data));
  EXPECT_NE(f.notes.at("scanner.site-1"), f.notes.at("scanner.site-2"));
}
