#include "image_quality.h"

#include <concord/error.h>

#include <opencv2/core.hpp>
#include <opencv2/quality/qualityssim.hpp>

#include <cmath>
#include <limits>
#include <string>

namespace concord::cli {

namespace {

void check_pair(const Image& a, const Image& b, const char* what) {
  if (a.dim != 2 || a.channels != 1 || b.dim != 2 || b.channels != 1)
    throw Error(std::string(what) + ": needs 2D single-channel images");
  if (a.size != b.size) throw Error(std::string(what) + ": the images differ in size");
}

// A float32 view of a 2D single-channel image, scaled by `factor`.
cv::Mat as_mat(const Image& im, double factor) {
  cv::Mat view(int(im.size[1]), int(im.size[0]), CV_32F, const_cast<float*>(im.data.data())), out;
  view.convertTo(out, CV_32F, factor);
  return out;
}

}  // namespace

double ssim(const Image& a, const Image& b, double range) {
  check_pair(a, b, "ssim");
  if (!(range > 0)) throw Error("ssim: the dynamic range must be positive");
  // OpenCV's constants are those of 8-bit images (C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2):
  // scaling both images by 255 / range gives SSIM with L = range.
  const double f = 255.0 / range;
  return cv::quality::QualitySSIM::compute(as_mat(a, f), as_mat(b, f), cv::noArray())[0];
}

double psnr(const Image& a, const Image& b, double range) {
  check_pair(a, b, "psnr");
  double se = 0;
  for (size_t i = 0; i < a.data.size(); ++i) se += std::pow(double(a.data[i]) - b.data[i], 2);
  if (se == 0) return std::numeric_limits<double>::infinity();
  return 10 * std::log10(range * range / (se / double(a.data.size())));
}

LinearFit fit_linear(const Image& x, const Image& target) {
  if (x.data.size() != target.data.size() || x.data.empty())
    throw Error("fit_linear: the images differ in size");
  const double n = double(x.data.size());
  double mx = 0, my = 0;
  for (size_t i = 0; i < x.data.size(); ++i) mx += x.data[i], my += target.data[i];
  mx /= n, my /= n;
  double sxy = 0, sxx = 0;
  for (size_t i = 0; i < x.data.size(); ++i) {
    sxy += (x.data[i] - mx) * (target.data[i] - my);
    sxx += (x.data[i] - mx) * (x.data[i] - mx);
  }
  LinearFit f;
  f.scale = sxx > 0 ? sxy / sxx : 0;
  f.offset = my - f.scale * mx;
  return f;
}

Image apply_linear(const Image& x, const LinearFit& fit) {
  Image out = x;
  for (float& v : out.data) v = float(fit.scale * v + fit.offset);
  return out;
}

}  // namespace concord::cli
