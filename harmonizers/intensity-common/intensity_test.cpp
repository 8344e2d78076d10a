// Tests of the intensity harmonizers (histogram-match, nyul, zscore, whitestripe, n4), loaded
// through the real plugin loader, against hand computations on small synthetic images, plus
// real-data checks on the multi-site prostate slices and the Colin27 T1 brain.
#include <concord/harmonizer.h>

#include "intensity.h"
#include "testing.h"

#include <itkImageFileReader.h>
#include <itkNiftiImageIOFactory.h>
#include <opencv2/imgcodecs.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <thread>

using namespace concord;

namespace {

std::unique_ptr<Harmonizer> make(const std::string& name,
                                 const std::map<std::string, Value>& given = {}) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Harmonizer, name);
  return reg.create<Harmonizer>(Kind::Harmonizer, name, make_args(name, desc.args, given));
}

ImageSource source(const std::vector<Image>& images) {
  return [&images](const ImageVisitor& visit) {
    for (const auto& im : images) visit(im);
  };
}

Image image2d(int64_t nx, int64_t ny, int channels = 1) {
  return Image(2, channels, {nx, ny, 1});
}

// 100 voxels 0, 1, ..., 99 scaled and shifted: quantiles are known in closed form.
Image ramp(double scale, double offset) {
  Image im = image2d(10, 10);
  for (int i = 0; i < 100; ++i) im.data[i] = float(scale * i + offset);
  return im;
}

// Percentile by hand: sort, interpolate linearly at p/100*(n-1).
double hand_percentile(std::vector<float> v, double p) {
  std::sort(v.begin(), v.end());
  double pos = p / 100 * double(v.size() - 1);
  size_t lo = size_t(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

double mean_of(const std::vector<float>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}
double sd_of(const std::vector<float>& v) {
  double m = mean_of(v), ss = 0;
  for (float x : v) ss += (x - m) * (x - m);
  return std::sqrt(ss / double(v.size()));
}

Value float_list(const std::vector<double>& xs) {
  Value v;
  v.type = ArgType::List;
  for (double x : xs) {
    Value item;
    item.type = ArgType::Float;
    item.f = x;
    v.items.push_back(item);
  }
  return v;
}

}  // namespace

// ---------------------------------------------------------------- shared pieces

TEST(IntensityCommon, PercentilesAndPiecewiseLinear) {
  std::vector<float> sorted = {0, 10, 20, 30, 40};
  auto p = intensity::percentiles(sorted, {0, 12.5, 50, 100});
  EXPECT_DOUBLE_EQ(p[0], 0);
  EXPECT_DOUBLE_EQ(p[1], 5);  // position 0.5
  EXPECT_DOUBLE_EQ(p[2], 20);
  EXPECT_DOUBLE_EQ(p[3], 40);
  EXPECT_THROW(intensity::percentiles({}, {50}), Error);

  // Knots at equal x are merged (y averaged); tails follow the chosen policy.
  intensity::PiecewiseLinear f({0, 10, 10, 20}, {0, 10, 30, 40}, intensity::Tails::EndSegments,
                               "t");
  EXPECT_DOUBLE_EQ(f(10), 20);
  EXPECT_DOUBLE_EQ(f(5), 10);
  EXPECT_DOUBLE_EQ(f(-1), -2);  // first segment slope 2
  EXPECT_DOUBLE_EQ(f(21), 42);  // last segment slope 2
  intensity::PiecewiseLinear g({0, 1, 20}, {0, 10, 40}, intensity::Tails::GlobalSlope, "t");
  EXPECT_DOUBLE_EQ(g(-10), -20);  // chord slope 40/20
  intensity::PiecewiseLinear h({0, 20}, {5, 40}, intensity::Tails::Clamp, "t");
  EXPECT_DOUBLE_EQ(h(-3), 5);
  EXPECT_DOUBLE_EQ(h(99), 40);
  EXPECT_THROW(intensity::PiecewiseLinear({3, 3}, {0, 1}, intensity::Tails::Clamp, "t"), Error);
}

TEST(IntensityCommon, OtsuSeparatesTwoLevels) {
  std::vector<float> v(1000, 10.f);
  for (int i = 0; i < 300; ++i) v[i] = 200.f;
  double t = intensity::otsu_threshold(v.data(), int64_t(v.size()));
  EXPECT_GE(t, 10.0);
  EXPECT_LT(t, 200.0);
  auto m =
      intensity::foreground_mask(v.data(), int64_t(v.size()), {intensity::Foreground::Otsu, 0});
  EXPECT_EQ(std::count(m.begin(), m.end(), uint8_t(1)), 300);
  m = intensity::foreground_mask(v.data(), int64_t(v.size()), {intensity::Foreground::Mean, 0});
  EXPECT_EQ(std::count(m.begin(), m.end(), uint8_t(1)), 300);  // mean is 67
}

// ---------------------------------------------------------------- histogram-match

TEST(HistogramMatch, FederatedQuantilesAreTheWeightedMeanAndApplyMapsExactly) {
  const std::map<std::string, Value> args = {{"foreground", make_value("all")}};
  auto site_a = make("histogram-match", args);
  auto site_b = make("histogram-match", args);
  auto coordinator = make("histogram-match", args);
  std::vector<Image> a = {ramp(1, 0)};
  std::vector<Image> b = {ramp(2, 0), ramp(3, 10)};
  Stats sa = site_a->fit_site(source(a));
  Stats sb = site_b->fit_site(source(b));
  EXPECT_EQ(sa.weight, 1);
  EXPECT_EQ(sb.weight, 2);
  ASSERT_EQ(sa.arrays.at("quantiles").shape(), (std::vector<int64_t>{1, 101}));

  // Levels 1, 1.98, ..., 99; the ramp k*i+o has quantile k*0.99*p+o at level p (by hand).
  // Site B: mean of 1.98p and 2.97p+10; global: (1*0.99p + 2*(2.475p+5)) / 3 = 1.98p + 10/3.
  Stats global = coordinator->combine({sa, sb});
  EXPECT_EQ(global.weight, 3);
  const auto levels = global.arrays.at("levels").to_vector<double>();
  const auto q = global.arrays.at("quantiles").to_vector<double>();
  ASSERT_EQ(levels.size(), 101u);
  EXPECT_DOUBLE_EQ(levels[0], 1);
  EXPECT_DOUBLE_EQ(levels[100], 99);
  for (size_t k = 0; k < levels.size(); ++k) {
    EXPECT_NEAR(sb.arrays.at("quantiles").data<double>()[k], 2.475 * levels[k] + 5, 1e-9);
    EXPECT_NEAR(q[k], 1.98 * levels[k] + 10.0 / 3, 1e-9) << "level " << levels[k];
  }
  // combine accepts its own output.
  Stats again = coordinator->combine({global});
  EXPECT_EQ(again.arrays.at("quantiles").to_vector<double>(), q);

  // Site A's image maps onto x -> 2x + 10/3 (inside the landmarks and, by the chord slope 2,
  // beyond them).
  site_a->set_statistics(global, "A");
  Image im = ramp(1, 0);
  site_a->apply(im);
  for (int i = 0; i < 100; ++i) EXPECT_NEAR(im.data[i], 2 * i + 10.0 / 3, 1e-4) << i;
}

TEST(HistogramMatch, ChannelsMapIndependentlyAndErrorsAreReported) {
  auto h = make("histogram-match", {{"foreground", make_value("all")}});
  Image two = image2d(10, 10, 2);
  for (int i = 0; i < 100; ++i) two.channel(0)[i] = float(i), two.channel(1)[i] = float(5 * i);
  Stats s = h->fit_site(source({two}));
  ASSERT_EQ(s.arrays.at("quantiles").shape(), (std::vector<int64_t>{2, 101}));
  Stats g = h->combine({s});

  EXPECT_THROW(h->apply(two), Error);  // before set_statistics
  h->set_statistics(g, "S");
  Image mapped = two;
  h->apply(mapped);  // onto its own quantiles: identity per channel
  for (size_t i = 0; i < two.data.size(); ++i) EXPECT_NEAR(mapped.data[i], two.data[i], 1e-3);

  // Swapped channels are mapped back onto each channel's own reference.
  Image swapped = two;
  std::copy(two.channel(1), two.channel(1) + 100, swapped.channel(0));
  std::copy(two.channel(0), two.channel(0) + 100, swapped.channel(1));
  h->apply(swapped);
  for (size_t i = 0; i < two.data.size(); ++i) EXPECT_NEAR(swapped.data[i], two.data[i], 1e-3);

  // A one-channel site cannot be combined with a two-channel one; the error names the site.
  Stats one = h->fit_site(source({ramp(1, 0)}));
  one.site = "ONE";
  try {
    h->combine({s, one});
    FAIL() << "combine accepted mismatched channel counts";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ONE"), std::string::npos) << e.what();
  }
  // Statistics fitted with other levels are refused, naming the site.
  auto other = make("histogram-match", {{"quantiles", make_value(int64_t(11))}});
  try {
    other->set_statistics(g, "SITE-X");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SITE-X"), std::string::npos) << e.what();
  }
  // An image without foreground is an error, not NaNs.
  Image zeros = image2d(4, 4);
  auto nz = make("histogram-match", {{"foreground", make_value("nonzero")}});
  EXPECT_THROW(nz->fit_site(source({zeros})), Error);
}

// ---------------------------------------------------------------- nyul

namespace {
// 143 x 7 = 1001 voxels: every landmark percentile (1, 10, ..., 90, 99) falls on an order
// statistic, so the standardised image has the standard landmarks exactly.
Image skewed(uint64_t seed, double scale, double shift) {
  std::mt19937_64 rng(seed);
  std::gamma_distribution<float> gamma(2.0f, 1.0f);
  Image im = image2d(143, 7);
  for (auto& v : im.data) v = float(shift + scale * gamma(rng));
  return im;
}
const std::vector<double> kNyulPcts = {1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99};
}  // namespace

TEST(Nyul, StandardScaleIsTheWeightedMeanOfMappedLandmarks) {
  const std::map<std::string, Value> args = {
      {"foreground", make_value("all")}, {"s_min", make_value(0.0)}, {"s_max", make_value(100.0)}};
  std::vector<Image> a = {skewed(1, 10, 5)};
  std::vector<Image> b = {skewed(2, 3, 50), skewed(3, 20, 0)};
  auto site_a = make("nyul", args), site_b = make("nyul", args), coord = make("nyul", args);
  Stats sa = site_a->fit_site(source(a)), sb = site_b->fit_site(source(b));
  Stats global = coord->combine({sa, sb});

  // By hand: landmarks of each image, mapped linearly pc1 -> 0, pc99 -> 100, then averaged
  // with weight 1 for A's image and 1 each for B's two images (B's site weight is 2).
  auto mapped = [](const Image& im) {
    std::vector<double> m;
    for (double p : kNyulPcts) m.push_back(hand_percentile(im.data, p));
    std::vector<double> out;
    for (double x : m) out.push_back((x - m.front()) / (m.back() - m.front()) * 100);
    return out;
  };
  auto ma = mapped(a[0]), mb1 = mapped(b[0]), mb2 = mapped(b[1]);
  const auto standard = global.arrays.at("standard").to_vector<double>();
  ASSERT_EQ(standard.size(), kNyulPcts.size());
  EXPECT_EQ(global.arrays.at("percentiles").to_vector<double>(), kNyulPcts);
  EXPECT_NEAR(standard.front(), 0, 1e-9);
  EXPECT_NEAR(standard.back(), 100, 1e-9);
  for (size_t k = 0; k < standard.size(); ++k) {
    EXPECT_NEAR(sb.arrays.at("standard").data<double>()[k], (mb1[k] + mb2[k]) / 2, 1e-6);
    EXPECT_NEAR(standard[k], (ma[k] + 2 * (mb1[k] + mb2[k]) / 2) / 3, 1e-6) << k;
  }

  // Every image, after apply, has exactly the standard landmarks.
  site_a->set_statistics(global, "A");
  site_b->set_statistics(global, "B");
  for (Image im : {a[0], b[0], b[1]}) {
    site_b->apply(im);
    for (size_t k = 0; k < kNyulPcts.size(); ++k)
      EXPECT_NEAR(hand_percentile(im.data, kNyulPcts[k]), standard[k], 1e-3)
          << "landmark " << kNyulPcts[k];
  }
}

TEST(Nyul, ArgumentsAndDegenerateImagesAreRejected) {
  EXPECT_THROW(make("nyul", {{"landmarks", float_list({50, 30})}}), Error);
  EXPECT_THROW(make("nyul", {{"landmarks", float_list({0.5})}}), Error);  // below pc_low
  EXPECT_THROW(make("nyul", {{"s_min", make_value(5.0)}, {"s_max", make_value(1.0)}}), Error);
  auto custom =
      make("nyul", {{"landmarks", float_list({25, 50, 75})}, {"foreground", make_value("all")}});
  Stats s = custom->fit_site(source({skewed(4, 1, 0)}));
  EXPECT_EQ(s.arrays.at("percentiles").to_vector<double>(),
            (std::vector<double>{1, 25, 50, 75, 99}));
  Image flat = image2d(8, 8);
  std::fill(flat.data.begin(), flat.data.end(), 7.f);
  EXPECT_THROW(custom->fit_site(source({flat})), Error);
}

// ---------------------------------------------------------------- zscore

TEST(ZScore, ForegroundHasMeanZeroAndUnitStd) {
  EXPECT_FALSE(make("zscore")->needs_fit());
  std::mt19937_64 rng(7);
  std::normal_distribution<float> tissue(100, 15), other(300, 40);
  Image im = image2d(64, 64, 2);
  std::vector<uint8_t> inside(64 * 64, 0);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      bool in = (x - 32) * (x - 32) + (y - 32) * (y - 32) < 20 * 20;
      inside[y * 64 + x] = in;
      im.at(x, y, 0, 0) = in ? std::max(tissue(rng), 40.f) : 0.f;
      im.at(x, y, 0, 1) = in ? std::max(other(rng), 120.f) : 0.f;
    }
  for (const char* policy : {"otsu", "threshold", "nonzero"}) {
    Image out = im;
    make("zscore", {{"foreground", make_value(policy)}, {"threshold", make_value(20.0)}})
        ->apply(out);
    for (int c = 0; c < 2; ++c) {
      std::vector<float> fg, orig;
      for (int i = 0; i < 64 * 64; ++i)
        if (inside[i]) fg.push_back(out.channel(c)[i]), orig.push_back(im.channel(c)[i]);
      EXPECT_NEAR(mean_of(fg), 0, 1e-4) << policy << " channel " << c;
      EXPECT_NEAR(sd_of(fg), 1, 1e-4) << policy << " channel " << c;
      // Background is transformed by the same affine map.
      EXPECT_NEAR(out.channel(c)[0], -mean_of(orig) / sd_of(orig), 1e-3);
    }
  }
  Image flat = image2d(8, 8);
  std::fill(flat.data.begin(), flat.data.end(), 3.f);
  EXPECT_THROW(make("zscore", {{"foreground", make_value("all")}})->apply(flat), Error);
}

// ---------------------------------------------------------------- whitestripe

namespace {
// A synthetic T1-like brain: background 0, CSF ~ 40, GM ~ 110, WM ~ wm (the brightest mode).
Image t1_phantom(double wm, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> csf(40, 6), gm(110, 8), white(float(wm), 5);
  std::uniform_real_distribution<float> u(0, 1);
  Image im(3, 1, {32, 32, 32});
  for (auto& v : im.data) {
    float r = u(rng);
    v = r < 0.2f ? 0.f : r < 0.35f ? csf(rng) : r < 0.65f ? gm(rng) : white(rng);
  }
  return im;
}
}  // namespace

namespace {
// whitestripe output is (x - mu) / sd: recover mu and sd from two voxels of different value.
std::pair<double, double> stripe_of(const Image& in, const Image& out) {
  size_t a = 0, b = 0;
  for (size_t i = 0; i < in.data.size(); ++i)
    if (std::abs(in.data[i] - in.data[a]) > std::abs(in.data[b] - in.data[a])) b = i;
  const double sd = (double(in.data[a]) - in.data[b]) / (double(out.data[a]) - out.data[b]);
  return {in.data[a] - out.data[a] * sd, sd};
}
}  // namespace

TEST(WhiteStripe, FindsThePlantedWhiteMatterPeak) {
  Image im = t1_phantom(200, 11);
  Image out = im;
  make("whitestripe", {{"foreground", make_value("nonzero")}})->apply(out);
  // The stripe is centred on the planted WM peak (200, sd 5): its mean is within half an
  // intensity unit; a +-5% quantile stripe of a class holding 35% of the voxels is narrow.
  auto [mu, sd] = stripe_of(im, out);
  EXPECT_NEAR(mu, 200, 0.5);
  EXPECT_GT(sd, 0.5);
  EXPECT_LT(sd, 3.0);
  std::vector<float> gm;
  for (size_t i = 0; i < im.data.size(); ++i)
    if (std::abs(im.data[i] - 110) < 20) gm.push_back(out.data[i]);
  EXPECT_NEAR(hand_percentile(gm, 50), (110 - mu) / sd, 0.5);

  // An affine change of the intensities moves the stripe with the peak: same output.
  Image shifted = im;
  for (auto& v : shifted.data)
    if (v != 0) v = v * 1.5f + 30;
  make("whitestripe", {{"foreground", make_value("nonzero")}})->apply(shifted);
  for (size_t i = 0; i < im.data.size(); i += 97)
    if (im.data[i] != 0) {
      EXPECT_NEAR(shifted.data[i], out.data[i], 0.05 * std::abs(out.data[i]) + 0.5);
    }

  // contrast = t2 takes the largest mode (75% of voxels at 80), t1 the brightest (25% at 180).
  Image two = image2d(100, 100);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> big(80, 5), small(180, 5);
  for (size_t i = 0; i < two.data.size(); ++i) two.data[i] = i % 4 == 0 ? small(rng) : big(rng);
  Image t2_out = two, t1_out = two;
  make("whitestripe", {{"contrast", make_value("t2")}, {"foreground", make_value("all")}})
      ->apply(t2_out);
  make("whitestripe", {{"foreground", make_value("all")}})->apply(t1_out);
  EXPECT_NEAR(stripe_of(two, t2_out).first, 80, 0.6);
  EXPECT_NEAR(stripe_of(two, t1_out).first, 180, 0.6);
}

TEST(WhiteStripe, Colin27T1WhiteMatterPeak) {
  const std::string file = "/usr/share/mricron/templates/ch2bet.nii.gz";
  if (!std::filesystem::exists(file)) GTEST_SKIP() << file << " not installed (mricron-data)";
  itk::NiftiImageIOFactory::RegisterOneFactory();
  using Img = itk::Image<float, 3>;
  auto reader = itk::ImageFileReader<Img>::New();
  reader->SetFileName(file);
  reader->Update();
  Img* itk_img = reader->GetOutput();
  auto sz = itk_img->GetLargestPossibleRegion().GetSize();
  Image im(3, 1, {int64_t(sz[0]), int64_t(sz[1]), int64_t(sz[2])});
  std::copy(itk_img->GetBufferPointer(), itk_img->GetBufferPointer() + im.voxels(),
            im.data.begin());
  Image out = im;
  make("whitestripe", {{"foreground", make_value("nonzero")}})->apply(out);
  auto [mu, sd] = stripe_of(im, out);
  // Independent check: the WM peak is the most frequent brain intensity above the median
  // (ch2bet holds integer intensities; count them directly).
  std::vector<float> brain;
  std::map<float, int64_t> counts;
  for (float v : im.data)
    if (v != 0) brain.push_back(v), counts[std::round(v)]++;
  const double median = hand_percentile(brain, 50), range = hand_percentile(brain, 99);
  float peak = 0;
  int64_t best = 0;
  for (auto [v, n] : counts)
    if (v > median && n > best) best = n, peak = v;
  std::printf(
      "Colin27 whitestripe: stripe mean %.2f sd %.2f; WM peak by counting %.0f "
      "(brain median %.1f, 99th percentile %.1f)\n",
      mu, sd, double(peak), median, range);
  EXPECT_NEAR(mu, peak, 0.03 * range);
  EXPECT_GT(sd, 0);
  EXPECT_LT(sd, 0.1 * range);
}

// ---------------------------------------------------------------- n4

namespace {
// Two tissues (150 inside, 80 in a ring) under a smooth multiplicative bias 0.6..1.4.
Image biased_phantom(int dim, int64_t n, std::vector<uint8_t>* flat_region, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0, 2);
  const int64_t nz = dim == 3 ? n : 1;
  Image im(dim, 1, {n, n, nz});
  flat_region->assign(size_t(im.voxels()), 0);
  const double c = (n - 1) / 2.0;
  for (int64_t z = 0; z < nz; ++z)
    for (int64_t y = 0; y < n; ++y)
      for (int64_t x = 0; x < n; ++x) {
        double dz = dim == 3 ? (z - c) / c : 0;
        double r =
            std::sqrt(((x - c) / c) * ((x - c) / c) + ((y - c) / c) * ((y - c) / c) + dz * dz);
        double tissue = r < 0.5 ? 150 : r < 0.85 ? 80 : 0;
        double bias = 1 + 0.4 * std::sin(M_PI * (x / double(n - 1) - 0.5)) *
                              std::cos(0.5 * M_PI * (y / double(n - 1)));
        size_t i = size_t((z * n + y) * n + x);
        im.data[i] = tissue > 0 ? float(tissue * bias + noise(rng)) : 0.f;
        (*flat_region)[i] = r < 0.45;
      }
  return im;
}
double cv_of(const Image& im, const std::vector<uint8_t>& region) {
  std::vector<float> v;
  for (size_t i = 0; i < region.size(); ++i)
    if (region[i]) v.push_back(im.data[i]);
  return sd_of(v) / mean_of(v);
}
}  // namespace

TEST(N4, ReducesAPlantedSmoothBiasIn2DAnd3D) {
  EXPECT_FALSE(make("n4")->needs_fit());
  struct Case {
    int dim;
    int64_t n, shrink;
  };
  for (Case k : {Case{2, 128, 2}, Case{3, 40, 2}}) {
    std::vector<uint8_t> region;
    Image im = biased_phantom(k.dim, k.n, &region, 5);
    Image out = im;
    make("n4", {{"shrink_factor", make_value(k.shrink)}})->apply(out);
    double before = cv_of(im, region), after = cv_of(out, region);
    std::printf("n4 %dD: CV of the flat region %.4f -> %.4f\n", k.dim, before, after);
    EXPECT_GT(before, 0.08);
    EXPECT_LT(after, 0.5 * before) << k.dim << "D";
    for (size_t i = 0; i < im.data.size(); ++i)
      if (im.data[i] == 0) {
        ASSERT_EQ(out.data[i], 0.f);  // background stays 0
      }
  }
  Image empty = image2d(16, 16);
  EXPECT_THROW(make("n4")->apply(empty), Error);
}

// ---------------------------------------------------------------- thread safety

TEST(Intensity, ApplyFromTwoThreadsIsIdentical) {
  std::vector<Image> inputs = {skewed(21, 5, 1), skewed(22, 9, 3)};
  std::vector<uint8_t> region;
  Image bias = biased_phantom(2, 96, &region, 9);
  for (const std::string name : {"histogram-match", "nyul", "zscore", "whitestripe", "n4"}) {
    auto h = make(name, {{"foreground", make_value(name == "n4" ? "otsu" : "all")}});
    Stats g = h->combine({h->fit_site(source(inputs))});
    h->set_statistics(g, "S");
    const Image& in = name == "n4" ? bias : inputs[0];
    Image serial = in;
    h->apply(serial);
    std::vector<Image> outs(2, in);
    std::thread t1([&] { h->apply(outs[0]); });
    std::thread t2([&] { h->apply(outs[1]); });
    t1.join();
    t2.join();
    EXPECT_EQ(outs[0].data, serial.data) << name;
    EXPECT_EQ(outs[1].data, serial.data) << name;
    EXPECT_NE(serial.data, in.data) << name << " changed nothing";
  }
}

// ---------------------------------------------------------------- real data

namespace {
struct Site {
  std::string name;
  std::vector<Image> train, all;
};
Image read_png(const std::string& file) {
  cv::Mat m = cv::imread(file, cv::IMREAD_GRAYSCALE);
  if (m.empty()) throw Error("cannot read " + file);
  Image im = image2d(m.cols, m.rows);
  for (int y = 0; y < m.rows; ++y)
    for (int x = 0; x < m.cols; ++x) im.at(x, y) = float(m.at<uint8_t>(y, x));
  im.pixel_type = PixelType::U8;
  return im;
}
// Distances between the sites' intensity histograms, averaged over site pairs. Histograms are
// binned on the pooled 0.5..99.5 percentile range of the condition measured, so a common affine
// rescale of all sites changes nothing. tv: total variation of 32-bin histograms; ks: largest
// difference of the cumulative histograms (1024 bins); w1: area between the cumulative
// histograms divided by the pooled interquartile range (scale-free Wasserstein-1).
struct Distances {
  double tv = 0, ks = 0, w1 = 0;
};
Distances mean_pairwise_distance(const std::vector<Site>& sites) {
  std::vector<float> pooled;
  for (const auto& s : sites)
    for (const auto& im : s.all) pooled.insert(pooled.end(), im.data.begin(), im.data.end());
  const double lo = hand_percentile(pooled, 0.5), hi = hand_percentile(pooled, 99.5);
  const double iqr = hand_percentile(pooled, 75) - hand_percentile(pooled, 25);
  auto hist = [&](const Site& s, int bins) {
    std::vector<double> h(size_t(bins), 0.0);
    double n = 0;
    for (const auto& im : s.all)
      for (float v : im.data) {
        int b = int((v - lo) / (hi - lo) * bins);
        h[size_t(std::clamp(b, 0, bins - 1))] += 1;
        n += 1;
      }
    for (double& x : h) x /= n;
    return h;
  };
  Distances d;
  int pairs = 0;
  for (size_t i = 0; i < sites.size(); ++i)
    for (size_t j = i + 1; j < sites.size(); ++j, ++pairs) {
      auto a = hist(sites[i], 32), b = hist(sites[j], 32);
      for (size_t k = 0; k < a.size(); ++k) d.tv += std::abs(a[k] - b[k]) / 2;
      a = hist(sites[i], 1024), b = hist(sites[j], 1024);
      double ca = 0, cb = 0, ks = 0;
      for (size_t k = 0; k < a.size(); ++k) {
        ca += a[k], cb += b[k];
        ks = std::max(ks, std::abs(ca - cb));
        d.w1 += std::abs(ca - cb) * (hi - lo) / 1024 / iqr;
      }
      d.ks += ks;
    }
  d.tv /= pairs, d.ks /= pairs, d.w1 /= pairs;
  return d;
}
}  // namespace

TEST(Intensity, MultisiteProstateHistogramsConverge) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  const std::string root = testkit::shared_data() + "/multisite-prostate";
  std::vector<Site> sites;
  for (const char* name : {"BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL"}) {
    Site s{name, {}, {}};
    for (const char* split : {"train", "test"})
      for (const auto& e :
           std::filesystem::directory_iterator(root + "/" + name + "/" + split + "/image")) {
        Image im = read_png(e.path().string());
        if (std::string(split) == "train") s.train.push_back(im);
        s.all.push_back(im);
      }
    ASSERT_FALSE(s.train.empty()) << name;
    sites.push_back(s);
  }
  const Distances before = mean_pairwise_distance(sites);
  // The slices are tissue-filled crops (no air background to cut), so every voxel counts as
  // foreground, and the distances are measured on every voxel too.
  const std::string fg = "all";
  for (const std::string method : {"histogram-match", "nyul"}) {
    // Federated fit on the training slices; every slice of every site is then standardised.
    std::vector<std::unique_ptr<Harmonizer>> local;
    std::vector<Stats> parts;
    for (const auto& s : sites) {
      local.push_back(make(method, {{"foreground", make_value(fg)}}));
      parts.push_back(local.back()->fit_site(source(s.train)));
      parts.back().site = s.name;
    }
    Stats global = make(method)->combine(parts);
    EXPECT_EQ(global.weight, double(sites.size()));
    std::vector<Site> out = sites;
    for (size_t k = 0; k < out.size(); ++k) {
      local[k]->set_statistics(global, out[k].name);
      for (auto& im : out[k].all) local[k]->apply(im);
    }
    const Distances after = mean_pairwise_distance(out);
    std::printf(
        "multisite-prostate, %s fg=%s: mean pairwise distances tv %.4f -> %.4f, ks %.4f -> %.4f, "
        "w1/iqr %.4f -> %.4f\n",
        method.c_str(), fg.c_str(), before.tv, after.tv, before.ks, after.ks, before.w1, after.w1);
    EXPECT_LT(after.tv, 0.75 * before.tv) << method;
    EXPECT_LT(after.ks, 0.5 * before.ks) << method;
    EXPECT_LT(after.w1, 0.5 * before.w1) << method;
  }
}
