// CycleGAN and style-GAN trainers on a small synthetic two-style case: random bright shapes on a
// dark background (the site's style) and the same kind of scenes with a gamma-3 intensity curve
// (the reference style). The gamma curve is non-linear on purpose: a linear change would be
// absorbed by the per-site intensity windows before any network sees the images.
#include "cyclegan.h"
#include "style_gan.h"

#include <concord/error.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "testing.h"

namespace concord::cyclegan {
namespace {

// A scene: 1-3 rectangles and discs of value 0.5..1 on background 0.05, `size` x `size`.
Image scene(SeededRandom& rng, int64_t size) {
  Image im(2, 1, {size, size, 1});
  std::fill(im.data.begin(), im.data.end(), 0.05f);
  const int shapes = 1 + int(rng.below(3));
  for (int s = 0; s < shapes; ++s) {
    const double cx = rng.uniform(0.2, 0.8) * double(size),
                 cy = rng.uniform(0.2, 0.8) * double(size);
    const double r = rng.uniform(0.1, 0.25) * double(size);
    const float v = float(rng.uniform(0.5, 1.0));
    const bool disc = rng.below(2) == 0;
    for (int64_t y = 0; y < size; ++y)
      for (int64_t x = 0; x < size; ++x) {
        const double dx = double(x) - cx, dy = double(y) - cy;
        const bool inside = disc ? dx * dx + dy * dy < r * r : std::abs(dx) < r && std::abs(dy) < r;
        if (inside) im.at(x, y) = v;
      }
  }
  return im;
}

Image reference_style(Image im) {
  for (float& v : im.data) v = v * v * v;
  return im;
}

double mae(const Image& a, const Image& b) {
  double s = 0;
  for (size_t i = 0; i < a.data.size(); ++i) s += std::abs(double(a.data[i]) - double(b.data[i]));
  return s / double(a.data.size());
}

struct TwoStyles {
  std::vector<Image> site, reference, site_test, truth_test;
  explicit TwoStyles(int64_t n, int64_t size = 32) {
    SeededRandom rng(derive_seed(7, "test/scenes"));
    for (int64_t i = 0; i < n; ++i) site.push_back(scene(rng, size));
    for (int64_t i = 0; i < n; ++i) reference.push_back(reference_style(scene(rng, size)));
    for (int64_t i = 0; i < 8; ++i) {
      site_test.push_back(scene(rng, size));
      truth_test.push_back(reference_style(site_test.back()));
    }
  }
};

Options small() {
  Options o;
  o.ngf = 8;
  o.ndf = 8;
  o.n_blocks = 2;
  o.epochs_constant = 100;
  return o;
}

bool same(const NamedArrays& a, const NamedArrays& b) {
  if (a.size() != b.size()) return false;
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib) {
    if (ia->first != ib->first || ia->second.shape() != ib->second.shape() ||
        ia->second.dtype() != ib->second.dtype() ||
        std::memcmp(ia->second.raw(), ib->second.raw(), ia->second.nbytes()) != 0)
      return false;
  }
  return true;
}

TEST(CycleGan, CycleLossFallsAndTranslationApproachesTheReferenceStyle) {
  TwoStyles data(24);
  SiteTrainer t(small(), 11);
  t.set_ranges(fit_site_range(data.site), fit_site_range(data.reference));
  SeededRandom rng(derive_seed(11, "test/train"));
  std::vector<double> cycle;
  for (int e = 0; e < 8; ++e) {
    const Losses l = t.train_epoch(data.site, data.reference, rng);
    EXPECT_EQ(l.steps, 24);
    EXPECT_TRUE(std::isfinite(l.g) && std::isfinite(l.d));
    cycle.push_back(l.cycle);
  }
  EXPECT_LT(cycle.back(), 0.5 * cycle.front())
      << "cycle loss " << cycle.front() << " -> " << cycle.back();
  double before = 0, after = 0;
  for (size_t i = 0; i < data.site_test.size(); ++i) {
    before += mae(data.site_test[i], data.truth_test[i]);
    after += mae(t.translate(data.site_test[i]), data.truth_test[i]);
  }
  EXPECT_LT(after, 0.8 * before) << "distance to the reference-style render: untranslated "
                                 << before / 8 << ", translated " << after / 8;
}

TEST(CycleGan, SameSeedIsBitIdenticalAndStateRoundTripResumesExactly) {
  TwoStyles data(6);
  auto run = [&](SiteTrainer& t, uint64_t rng_seed, int epochs) {
    SeededRandom rng(rng_seed);
    for (int e = 0; e < epochs; ++e) t.train_epoch(data.site, data.reference, rng);
  };
  Options o = small();
  o.pool_size = 3;  // the pool fills and starts swapping within the test
  SiteTrainer a(o, 5), b(o, 5), c(o, 6);
  run(a, 1, 2);
  run(b, 1, 2);
  EXPECT_TRUE(same(a.shared_state(), b.shared_state()));
  EXPECT_TRUE(same(a.local_state(), b.local_state()));
  EXPECT_FALSE(same(a.shared_state(), c.shared_state()));  // control: the check can fail

  // Resume: c takes a's exported state and continues exactly as a does.
  c.load_shared_state(a.shared_state());
  c.load_local_state(a.local_state());
  EXPECT_TRUE(same(a.local_state(), c.local_state()));
  EXPECT_EQ(c.epochs_done(), 2);
  run(a, 2, 1);
  run(c, 2, 1);
  EXPECT_TRUE(same(a.shared_state(), c.shared_state()));
  EXPECT_TRUE(same(a.local_state(), c.local_state()));

  // What may leave the site is the site->reference generator, nothing else.
  for (const auto& [name, array] : a.shared_state()) EXPECT_EQ(name.rfind("g_site2ref.", 0), 0u);
  const NamedArrays local = a.local_state();
  EXPECT_TRUE(local.count("adam_g/g_site2ref.model.1.weight/exp_avg"));
  EXPECT_TRUE(local.count("pool_ref/00002"));
  EXPECT_FALSE(local.count("pool_ref/00003"));
  for (const auto& [name, array] : local) EXPECT_NE(name.rfind("g_site2ref.", 0), 0u) << name;
}

TEST(CycleGan, ImportRefusesMissingOrMisshapenEntries) {
  SiteTrainer t(small(), 1);
  NamedArrays s = t.shared_state();
  s.erase("g_site2ref.model.1.bias");
  EXPECT_NE(testkit::error_of([&] {
              t.load_shared_state(s);
            }).find("'g_site2ref.model.1.bias' is missing"),
            std::string::npos);
  s = t.shared_state();
  s["g_site2ref.model.1.bias"] = Array(DType::F32, {3});
  EXPECT_NE(testkit::error_of([&] { t.load_shared_state(s); }).find("has shape [3], expected [8]"),
            std::string::npos);
  s = t.shared_state();
  s["g_site2ref.model.1.bias"].data<float>()[0] = NAN;
  EXPECT_NE(testkit::error_of([&] { t.load_shared_state(s); }).find("non-finite"),
            std::string::npos);
  Options wider = small();
  wider.ngf = 16;
  EXPECT_NE(testkit::error_of([&] {
              Translator(wider, t.shared_state(), {0, 1}, {0, 1});
            }).find("cyclegan translator"),
            std::string::npos);
}

TEST(CycleGan, VolumesTranslateSliceBySliceKeepingGeometry) {
  SiteTrainer t(small(), 3);
  SeededRandom rng(9);
  Image vol(3, 1, {30, 26, 5});  // sizes not multiples of 4: padded and cropped
  for (float& v : vol.data) v = float(rng.uniform());
  vol.geometry.spacing = {0.7, 0.8, 2.5};
  vol.geometry.origin = {-10, 4, 33};
  vol.geometry.direction = {0, 1, 0, 1, 0, 0, 0, 0, -1};
  vol.pixel_type = PixelType::I16;
  vol.meta["Modality"] = "MR";
  t.set_ranges({0, 1}, {0, 2});
  const Image out = t.translate(vol);
  EXPECT_EQ(out.dim, 3);
  EXPECT_EQ(out.size, vol.size);
  EXPECT_EQ(out.geometry.spacing, vol.geometry.spacing);
  EXPECT_EQ(out.geometry.origin, vol.geometry.origin);
  EXPECT_EQ(out.geometry.direction, vol.geometry.direction);
  EXPECT_EQ(out.pixel_type, PixelType::I16);
  EXPECT_EQ(out.meta.at("Modality"), "MR");
  // Slice k of the volume's translation is the translation of slice k alone.
  Image slice(2, 1, {30, 26, 1});
  std::copy(vol.data.begin() + 3 * 30 * 26, vol.data.begin() + 4 * 30 * 26, slice.data.begin());
  const Image alone = t.translate(slice);
  for (int64_t i = 0; i < 30 * 26; ++i)
    ASSERT_NEAR(out.data[size_t(3 * 30 * 26 + i)], alone.data[size_t(i)], 1e-5);
  // Output is in the reference window [0, 2]; the translator built from the shared state agrees.
  for (float v : out.data) ASSERT_TRUE(v >= -1e-4f && v <= 2.0001f);
  Translator tr(small(), t.shared_state(), {0, 1}, {0, 2});
  tr.set_slice_batch(2);
  const Image out2 = tr.translate(vol);
  for (size_t i = 0; i < out.data.size(); ++i) ASSERT_NEAR(out.data[i], out2.data[i], 1e-5);
  Image rgb(2, 3, {8, 8, 1});
  EXPECT_NE(testkit::error_of([&] { t.translate(rgb); }).find("3 channels"), std::string::npos);
}

TEST(CycleGan, MismatchedTrainingSizesAreRefused) {
  TwoStyles a(2, 32), b(2, 16);
  SiteTrainer t(small(), 1);
  SeededRandom rng(1);
  EXPECT_NE(testkit::error_of([&] { t.train_epoch(a.site, b.reference, rng); }).find("resample"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] { t.train_epoch({}, b.reference, rng); }).find("no images"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] {
              t.train_epoch(b.site, b.reference, rng);
            }).find("at least 24 x 24 pixels"),
            std::string::npos);
  Options bad = small();
  bad.lr = 0;
  EXPECT_NE(testkit::error_of([&] { SiteTrainer x(bad, 1); }).find("lr"), std::string::npos);
}

TEST(CycleGan, LearningRateIsConstantThenDecaysLinearly) {
  TwoStyles data(2, 24);
  Options o = small();
  o.epochs_constant = 2;
  o.epochs_decay = 3;
  SiteTrainer t(o, 1);
  SeededRandom rng(1);
  std::vector<double> lr;
  for (int e = 0; e < 5; ++e) lr.push_back(t.train_epoch(data.site, data.reference, rng).lr);
  // The reference's 'linear' policy: 1 - max(0, e + 1 - n_epochs) / (n_epochs_decay + 1).
  const std::vector<double> want{2e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4};
  for (int e = 0; e < 5; ++e) EXPECT_NEAR(lr[size_t(e)], want[size_t(e)], 1e-12) << e;
}

TEST(StyleGan, LearnsTheReferenceIntensitiesAndSharesOnlyTheGenerator) {
  TwoStyles data(64, 16);
  StyleGanOptions o;
  o.size = 16;
  o.ngf = 16;
  o.ndf = 16;
  o.latent = 16;
  StyleGan g(o, 4);
  g.set_range(fit_site_range(data.reference));
  SeededRandom rng(4);
  double mean_real = 0;
  for (const Image& im : data.reference)
    for (float v : im.data) mean_real += v / double(im.data.size() * data.reference.size());
  auto mean_of = [](const std::vector<Image>& ims) {
    double m = 0;
    for (const Image& im : ims)
      for (float v : im.data) m += v / double(im.data.size() * ims.size());
    return m;
  };
  SeededRandom srng(1);
  const double before = std::abs(mean_of(g.sample(32, srng)) - mean_real);
  for (int e = 0; e < 15; ++e) g.train_epoch(data.reference, rng);
  SeededRandom srng2(1);
  const std::vector<Image> samples = g.sample(32, srng2);
  ASSERT_EQ(samples.size(), 32u);
  EXPECT_EQ(samples[0].size, (std::array<int64_t, 3>{16, 16, 1}));
  const double after = std::abs(mean_of(samples) - mean_real);
  EXPECT_LT(after, 0.5 * before) << "mean intensity gap " << before << " -> " << after;

  // Another site rebuilds the sampler from shared_state alone and draws the same images.
  StyleGan other(o, 99);
  other.load_shared_state(g.shared_state());
  SeededRandom srng3(1);
  const std::vector<Image> again = other.sample(32, srng3);
  EXPECT_EQ(again[5].data, samples[5].data);
  for (const auto& [name, array] : g.shared_state())
    EXPECT_TRUE(name.rfind("style_g.", 0) == 0 || name.rfind("style_range/", 0) == 0) << name;
  EXPECT_EQ(g.privacy_settings().at("dp_enabled"), 0.0);
}

TEST(StyleGan, DpSgdIsSeededAndReportsItsSettings) {
  TwoStyles data(8, 8);
  StyleGanOptions o;
  o.size = 8;
  o.ngf = 4;
  o.ndf = 4;
  o.latent = 4;
  o.batch_size = 4;
  o.dp_clip = 1.0;
  o.dp_noise = 1.1;
  StyleGan a(o, 2), b(o, 2);
  SeededRandom ra(3), rb(3);
  a.train_epoch(data.reference, ra);
  b.train_epoch(data.reference, rb);
  EXPECT_TRUE(same(a.shared_state(), b.shared_state()));
  EXPECT_TRUE(same(a.local_state(), b.local_state()));
  const auto p = a.privacy_settings();
  EXPECT_EQ(p.at("dp_enabled"), 1.0);
  EXPECT_EQ(p.at("dp_clip"), 1.0);
  EXPECT_EQ(p.at("dp_noise_multiplier"), 1.1);
  EXPECT_EQ(p.at("steps"), 2.0);
  EXPECT_EQ(p.at("sample_rate"), 0.5);
  StyleGan c(o, 2);
  c.load_local_state(a.local_state());
  c.load_shared_state(a.shared_state());
  EXPECT_TRUE(same(a.local_state(), c.local_state()));
  StyleGanOptions bad = o;
  bad.size = 12;
  EXPECT_NE(testkit::error_of([&] { StyleGan x(bad, 1); }).find("power of two"), std::string::npos);
}

}  // namespace
}  // namespace concord::cyclegan
