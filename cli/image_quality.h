// Full-reference image quality for `concord harmonize evaluate`: SSIM (Wang et al. 2004, through
// OpenCV's quality module), PSNR, and the least-squares linear intensity fit used before
// comparing a harmonized image with its neutral rendering.
#pragma once

#include <concord/image.h>

namespace concord::cli {

// SSIM of two 2D single-channel images of one size (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP
// 13(4) 2004): Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, for intensities of
// dynamic range L = `range` (values are divided by it, so [0, range] acts as [0, 1]); the mean of
// the SSIM map over every pixel (OpenCV's cv::quality::QualitySSIM, reflected borders).
double ssim(const Image& a, const Image& b, double range);

// Peak signal-to-noise ratio in dB for peak value `range`: 10 log10(range^2 / MSE); +inf when
// the images are equal.
double psnr(const Image& a, const Image& b, double range);

// The least-squares fit target ≈ scale * x + offset over every voxel (scale 0 and offset the
// target's mean when x is constant).
struct LinearFit {
  double scale = 1, offset = 0;
};
LinearFit fit_linear(const Image& x, const Image& target);
// x mapped by the fit (a copy).
Image apply_linear(const Image& x, const LinearFit& fit);

}  // namespace concord::cli
