#include <concord/dataset.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstring>
#include <filesystem>

#include "testing.h"

using namespace concord;

namespace {

const char* kSource = "/usr/share/mricron/templates/ch2bet.nii.gz";

#define REQUIRE_SOURCE()                                                              \
  do {                                                                                \
    if (!std::filesystem::exists(kSource))                                            \
      GTEST_SKIP() << kSource << " absent: install mricron-data (scripts/bootstrap)"; \
  } while (0)

Federation load(std::map<std::string, Value> given, uint64_t seed = 1,
                std::vector<std::string> sites = {}) {
  const auto& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Dataset, "brainsim");
  auto ds = reg.create<Dataset>(Kind::Dataset, "brainsim", make_args("brainsim", desc.args, given));
  return ds->load({seed, sites});
}

bool same(const Image& a, const Image& b) {
  return a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

double mean_abs_diff(const Image& a, const Image& b) {
  double d = 0;
  for (size_t i = 0; i < a.data.size(); ++i) d += std::abs(a.data[i] - b.data[i]);
  return d / a.data.size();
}

}  // namespace

TEST(BrainSim, DefaultFederationCountsAndBalance) {
  REQUIRE_SOURCE();
  const auto t0 = std::chrono::steady_clock::now();
  auto fed = load({});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("brainsim: 4 sites x (160 + 48) samples at 64x64 generated in %.2f s\n", s);
  EXPECT_EQ(fed.task, Task::Classification);
  EXPECT_EQ(fed.num_classes, 2);
  ASSERT_EQ(fed.sites.size(), 4u);
  const char* names[] = {"site-A", "site-B", "site-C", "site-D"};
  for (size_t i = 0; i < 4; ++i) {
    const auto& site = fed.sites[i];
    EXPECT_EQ(site.name, names[i]);
    ASSERT_EQ(site.train.size(), 160u);
    ASSERT_EQ(site.test.size(), 48u);
    int pos = 0, test_pos = 0;
    for (const auto& x : site.train) {
      pos += x.label == 1;
      EXPECT_TRUE(x.label == 0 || x.label == 1);
      EXPECT_EQ(x.image.size[0], 64);
      EXPECT_EQ(x.image.size[1], 64);
      EXPECT_EQ(x.image.channels, 1);
      EXPECT_FALSE(x.mask.has_value());
      ASSERT_TRUE(x.reference.has_value());
      EXPECT_GT(mean_abs_diff(x.image, *x.reference), 0.01) << x.id;
    }
    for (const auto& x : site.test) test_pos += x.label == 1;
    EXPECT_EQ(pos, 80) << site.name;
    EXPECT_EQ(test_pos, 24) << site.name;
    ASSERT_TRUE(fed.notes.count("scanner." + site.name));
    EXPECT_TRUE(nlohmann::json::parse(fed.notes.at("scanner." + site.name)).contains("gamma"));
  }
  EXPECT_NE(fed.notes.at("scanner.site-A"), fed.notes.at("scanner.site-B"));
  EXPECT_TRUE(fed.notes.count("brainsim"));
  // Neutral renderings lie in [0,1] and show a brain (a good share of non-zero pixels).
  const Image& ref = *fed.sites[0].train[0].reference;
  int tissue = 0;
  for (float v : ref.data) {
    EXPECT_GE(v, 0.f);
    EXPECT_LE(v, 1.f);
    tissue += v > 0.1f;
  }
  EXPECT_GT(tissue, 64 * 64 / 4);
}

TEST(BrainSim, DeterministicInSeed) {
  REQUIRE_SOURCE();
  std::map<std::string, Value> small = {{"sites", make_value(int64_t(2))},
                                        {"train_per_site", make_value(int64_t(6))},
                                        {"test_per_site", make_value(int64_t(2))}};
  auto a = load(small, 5), b = load(small, 5), c = load(small, 6);
  for (size_t s = 0; s < 2; ++s)
    for (size_t i = 0; i < 6; ++i) {
      EXPECT_TRUE(same(a.sites[s].train[i].image, b.sites[s].train[i].image));
      EXPECT_EQ(a.sites[s].train[i].label, b.sites[s].train[i].label);
      EXPECT_FALSE(same(a.sites[s].train[i].image, c.sites[s].train[i].image));
    }
  EXPECT_EQ(a.notes.at("scanner.site-B"), b.notes.at("scanner.site-B"));
  // Requesting one site gives exactly that site's samples.
  auto only_b = load(small, 5, {"site-B"});
  ASSERT_EQ(only_b.sites.size(), 1u);
  EXPECT_EQ(only_b.sites[0].name, "site-B");
  EXPECT_TRUE(same(only_b.sites[0].train[3].image, a.sites[1].train[3].image));
  EXPECT_THROW(load(small, 5, {"site-Z"}), Error);
}

TEST(BrainSim, SegmentationMasksMatchLabelsAndLesionsShow) {
  REQUIRE_SOURCE();
  auto fed = load({{"task", make_value("segmentation")},
                   {"sites", make_value(int64_t(2))},
                   {"train_per_site", make_value(int64_t(40))},
                   {"test_per_site", make_value(int64_t(10))},
                   {"shift", make_value(0.0)}});
  EXPECT_EQ(fed.task, Task::Segmentation);
  int lesions = 0;
  for (const auto& site : fed.sites)
    for (const auto* split : {&site.train, &site.test})
      for (const auto& x : *split) {
        ASSERT_TRUE(x.mask.has_value()) << x.id;
        int64_t on = 0;
        for (int64_t y = 0; y < 64; ++y)
          for (int64_t xx = 0; xx < 64; ++xx) {
            const float m = x.mask->at(xx, y);
            EXPECT_TRUE(m == 0.f || m == 1.f);
            on += m == 1.f;
          }
        EXPECT_EQ(on > 0, x.label == 1) << x.id;
        if (x.label == 1) {
          ++lesions;
          EXPECT_GE(on, 12) << x.id;    // radius >= 4 px: a visible area
          EXPECT_LE(on, 1000) << x.id;  // radius <= 10 px (plus soft edge)
          // shift 0: the image is the neutral rendering itself
          EXPECT_TRUE(same(x.image, *x.reference)) << x.id;
        }
      }
  EXPECT_EQ(lesions, 2 * (20 + 5));
}

TEST(BrainSim, LesionsChangeIntensityClearlyAboveNoise) {
  REQUIRE_SOURCE();
  // Same seed, lesion_fraction 0 vs 1: identical subjects (the lesion draw comes after the
  // anatomy draw), so the difference inside the mask is the lesion contrast.
  std::map<std::string, Value> base = {{"task", make_value("segmentation")},
                                       {"sites", make_value(int64_t(1))},
                                       {"train_per_site", make_value(int64_t(20))},
                                       {"test_per_site", make_value(int64_t(0))},
                                       {"shift", make_value(0.0)}};
  auto none = base, all = base;
  none["lesion_fraction"] = make_value(0.0);
  all["lesion_fraction"] = make_value(1.0);
  auto a = load(none, 9), b = load(all, 9);
  for (size_t i = 0; i < 20; ++i) {
    const auto& clean = a.sites[0].train[i];
    const auto& les = b.sites[0].train[i];
    double diff = 0;
    int n = 0;
    for (size_t k = 0; k < les.mask->data.size(); ++k)
      if (les.mask->data[k] == 1.f) {
        diff += std::abs(les.image.data[k] - clean.image.data[k]);
        ++n;
      }
    ASSERT_GT(n, 0);
    EXPECT_GT(diff / n, 0.08) << les.id;  // well above the strongest site noise (0.04)
  }
}

TEST(BrainSim, MissingSourceSaysHowToInstall) {
  try {
    load({{"source", make_value("/nonexistent/ch2bet.nii.gz")}});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("/nonexistent/ch2bet.nii.gz"), std::string::npos) << msg;
    EXPECT_NE(msg.find("mricron-data"), std::string::npos) << msg;
    EXPECT_NE(msg.find("scripts/bootstrap"), std::string::npos) << msg;
  }
}

TEST(BrainSim, SameTestSubjectsUnderEverySitesScanner) {
  REQUIRE_SOURCE();
  std::map<std::string, Value> args{{"sites", make_value(int64_t(3))},
                                    {"train_per_site", make_value(int64_t(4))},
                                    {"test_per_site", make_value(int64_t(5))},
                                    {"size", make_value(int64_t(32))},
                                    {"shift", make_value(1.5)},
                                    {"same_test_subjects", make_value(true)}};
  const Federation fed = load(args, 7);
  ASSERT_EQ(fed.sites.size(), 3u);
  for (int i = 0; i < 5; ++i) {
    const Sample& a = fed.sites[0].test[i];
    ASSERT_TRUE(a.reference.has_value());
    for (size_t s = 1; s < 3; ++s) {
      const Sample& b = fed.sites[s].test[i];
      EXPECT_TRUE(same(*a.reference, *b.reference)) << "subject " << i << " site " << s;
      EXPECT_EQ(a.label, b.label);
      EXPECT_GT(mean_abs_diff(a.image, b.image), 1e-3) << "the scanners differ";
    }
  }
  // Training subjects stay site-specific; the same seed gives the same federation.
  EXPECT_FALSE(same(*fed.sites[0].train[0].reference, *fed.sites[1].train[0].reference));
  const Federation again = load(args, 7);
  EXPECT_TRUE(same(again.sites[2].test[3].image, fed.sites[2].test[3].image));
  // Without the flag, test subjects differ between sites (the default federation).
  args.erase("same_test_subjects");
  const Federation plain = load(args, 7);
  EXPECT_FALSE(same(*plain.sites[0].test[0].reference, *plain.sites[1].test[0].reference));
  EXPECT_TRUE(same(plain.sites[1].train[2].image, fed.sites[1].train[2].image));
}
