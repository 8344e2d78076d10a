// `concord harmonize evaluate` and its image-quality metrics (cli/image_quality.h).
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "../../cli/image_quality.h"
#include "testing.h"

using namespace concord;
using namespace concord::cli;
namespace fs = std::filesystem;

namespace {

Image make(int64_t n, const std::function<double(int64_t x, int64_t y)>& f) {
  Image im(2, 1, {n, n, 1});
  for (int64_t y = 0; y < n; ++y)
    for (int64_t x = 0; x < n; ++x) im.at(x, y) = float(f(x, y));
  return im;
}

}  // namespace

TEST(ImageQuality, SsimOfIdenticalImagesIsOne) {
  const Image a =
      make(24, [](int64_t x, int64_t y) { return std::sin(0.3 * x) * std::cos(0.2 * y); });
  EXPECT_NEAR(ssim(a, a, 2.0), 1.0, 1e-6);
}

TEST(ImageQuality, SsimOfConstantImagesIsTheLuminanceTerm) {
  // sigma = 0: SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1), C1 = (0.01 L)^2, at every pixel.
  const Image a = make(16, [](int64_t, int64_t) { return 0.2; });
  const Image b = make(16, [](int64_t, int64_t) { return 0.6; });
  EXPECT_NEAR(ssim(a, b, 1.0), (2 * 0.2 * 0.6 + 1e-4) / (0.04 + 0.36 + 1e-4), 1e-5);
  // The range scales C1: with L = 10 the same pair is compared as 0.02 and 0.06.
  EXPECT_NEAR(ssim(a, b, 10.0), (2 * 0.2 * 0.6 + 1e-2) / (0.04 + 0.36 + 1e-2), 1e-5);
}

TEST(ImageQuality, SsimMatchesAFloat64Reference) {
  // Wang et al. 2004 in numpy float64 (Gaussian 11x11, sigma 1.5, reflected borders, K1 0.01,
  // K2 0.03, L 1, mean of the map): 0.9698596660474428 for this pair.
  auto x = [](int64_t c, int64_t r) { return double((r * 7 + c * 3) % 11) / 10.0; };
  const Image a = make(16, x);
  const Image b = make(
      16, [&](int64_t c, int64_t r) { return 0.8 * x(c, r) + 0.1 + double((r * c) % 5) / 50; });
  EXPECT_NEAR(ssim(a, b, 1.0), 0.9698596660474428, 1e-4);
  EXPECT_THROW(ssim(a, make(8, x), 1.0), Error);
}

TEST(ImageQuality, PsnrAndLinearFit) {
  const Image a = make(10, [](int64_t x, int64_t y) { return 0.05 * double(x + y); });
  const Image b = make(10, [](int64_t x, int64_t y) { return 0.05 * double(x + y) + 0.1; });
  EXPECT_NEAR(psnr(a, b, 1.0), 20.0, 1e-4);   // MSE 0.01
  EXPECT_NEAR(psnr(a, b, 10.0), 40.0, 1e-4);  // 10 log10(100 / 0.01)
  EXPECT_TRUE(std::isinf(psnr(a, a, 1.0)));
  // target = 2 x - 3 exactly: the fit recovers it and the mapped image equals the target.
  const Image t = make(10, [](int64_t x, int64_t y) { return 2 * 0.05 * double(x + y) - 3; });
  const LinearFit f = fit_linear(a, t);
  EXPECT_NEAR(f.scale, 2.0, 1e-6);
  EXPECT_NEAR(f.offset, -3.0, 1e-6);
  EXPECT_GT(psnr(apply_linear(a, f), t, 1.0), 80);
  // A constant x explains nothing: scale 0, offset the target's mean.
  const LinearFit c = fit_linear(make(10, [](int64_t, int64_t) { return 4.0; }), t);
  EXPECT_EQ(c.scale, 0.0);
  EXPECT_NEAR(c.offset, 2 * 0.05 * 9 - 3, 1e-6);
}

TEST(HarmonizeEvaluate, SmallBrainsimRunWritesAFiniteTable) {
  if (!fs::exists("/usr/share/mricron/templates/ch2bet.nii.gz"))
    GTEST_SKIP() << "mricron-data absent (scripts/bootstrap)";
  const fs::path dir = fs::temp_directory_path() / ("concord-eval-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string out = (dir / "eval.json").string();
  std::string text;
  const int rc = testkit::run_command(
      testkit::concord_exe() + " harmonize evaluate --no-progress --json " + out +
          " --set data.dataset.args.sites=3 --set data.dataset.args.size=32"
          " --set data.dataset.args.train_per_site=8 --set data.dataset.args.test_per_site=4"
          " --row none=none --row amp=amplitude:beta=1 --row hm=histogram-match"
          " --row later=no-such-harmonizer:x=1",
      &text);
  ASSERT_EQ(rc, 0) << text;
  EXPECT_NE(text.find("xsite"), std::string::npos) << text;
  EXPECT_NE(text.find("later"), std::string::npos) << text;
  std::ifstream f(out);
  ASSERT_TRUE(f) << out;
  const auto j = nlohmann::json::parse(f);
  ASSERT_EQ(j["rows"].size(), 4u);
  for (const auto& r : j["rows"]) {
    if (r["name"] == "later") {
      EXPECT_TRUE(r.contains("skipped"));
      continue;
    }
    for (const auto* group : {"cross_site", "fidelity", "site_shift"})
      for (const auto& [k, v] : r[group].items())
        EXPECT_TRUE(v.is_number() && std::isfinite(v.get<double>())) << r["name"] << " " << k;
    EXPECT_EQ(r["subjects"], 4);
    EXPECT_GE(r["cross_site"]["ssim"].get<double>(), -1.0);
    EXPECT_LE(r["cross_site"]["ssim"].get<double>(), 1.0);
  }
  const auto& none = j["rows"][0];
  const auto& amp = j["rows"][1];
  // No harmonizer leaves the site shift as it was; amplitude (beta 1) lowers it.
  EXPECT_NEAR(none["site_shift"]["histogram_w1"].get<double>(),
              none["site_shift"]["histogram_w1_before"].get<double>(), 1e-12);
  EXPECT_LT(amp["site_shift"]["histogram_w1"].get<double>(),
            none["site_shift"]["histogram_w1"].get<double>());
  EXPECT_LT(amp["cross_site"]["mae"].get<double>(), none["cross_site"]["mae"].get<double>());
  fs::remove_all(dir);
}

TEST(HarmonizeEvaluate, RefusesSitesWithoutTheSameSubjects) {
  if (!fs::exists("/usr/share/mricron/templates/ch2bet.nii.gz"))
    GTEST_SKIP() << "mricron-data absent (scripts/bootstrap)";
  std::string text;
  const int rc = testkit::run_command(
      testkit::concord_exe() +
          " harmonize evaluate --no-progress --row none=none"
          " --set data.dataset.args.sites=2 --set data.dataset.args.size=32"
          " --set data.dataset.args.train_per_site=4 --set data.dataset.args.test_per_site=2"
          " --set data.dataset.args.same_test_subjects=false",
      &text);
  EXPECT_NE(rc, 0);
  EXPECT_NE(text.find("same_test_subjects"), std::string::npos) << text;
}
