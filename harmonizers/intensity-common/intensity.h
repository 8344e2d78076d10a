// Shared pieces of the intensity harmonizers: foreground selection, percentiles, piecewise-linear
// intensity maps, weighted averaging of per-site statistics, and a base for site-local methods.
// Everything here is stateless (or const after construction), so apply() built on it is
// thread-safe.
#pragma once

#include <concord/args.h>
#include <concord/harmonizer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace concord::intensity {

// Which voxels of a channel count as foreground when statistics are taken.
//   mean:      v > mean of the channel (Nyul & Udupa's background cut)
//   otsu:      v > Otsu threshold of the channel (ITK OtsuThresholdImageFilter, 256 bins)
//   nonzero:   v != 0 (skull-stripped / masked-out background)
//   threshold: v > the `threshold` argument
//   all:       every voxel
enum class Foreground { Mean, Otsu, Nonzero, Threshold, All };

struct ForegroundRule {
  Foreground kind = Foreground::Mean;
  double threshold = 0;
};

// The two arguments every intensity harmonizer declares: `foreground` (enum) and `threshold`.
std::vector<ArgSpec> foreground_args(const std::string& default_policy);
ForegroundRule foreground_rule(const Args& args);

// 1 for foreground voxels of the `n` values at `v`.
std::vector<uint8_t> foreground_mask(const float* v, int64_t n, const ForegroundRule& rule);
// The foreground values themselves, sorted ascending.
std::vector<float> sorted_foreground(const float* v, int64_t n, const ForegroundRule& rule);

// Otsu's threshold of the values (ITK's OtsuThresholdImageFilter on a `bins`-bin histogram).
double otsu_threshold(const float* v, int64_t n, unsigned bins = 256);

// Percentiles (in percent, 0..100) of ascending `sorted` values, interpolating linearly between
// order statistics at position p/100 * (n - 1) (numpy's default). Throws on empty input.
std::vector<double> percentiles(const std::vector<float>& sorted, const std::vector<double>& pcts);

// How a piecewise-linear map continues beyond its first and last knots:
//   global-slope: the slope of the chord from first to last knot (robust to tiny end segments)
//   end-segments: the slopes of the first and last segments (Nyul & Udupa 2000)
//   clamp:        constant (the end values)
enum class Tails { GlobalSlope, EndSegments, Clamp };
ArgSpec tails_arg();
Tails tails_from(const std::string& name);

// A monotone piecewise-linear map through knots (x_i, y_i). Knots sharing the same x are merged
// (their y values averaged), which happens with quantised (e.g. 8-bit) images.
class PiecewiseLinear {
 public:
  // Throws Error (prefixed with `context`) when fewer than two distinct x remain.
  PiecewiseLinear(const std::vector<double>& x, const std::vector<double>& y, Tails tails,
                  const std::string& context);
  double operator()(double v) const;
  const std::vector<double>& x() const { return x_; }
  const std::vector<double>& y() const { return y_; }

 private:
  std::vector<double> x_, y_;
  double slope_lo_ = 0, slope_hi_ = 0;
};

// A list argument as numbers, whether its items were typed Int, Float or given as text.
std::vector<double> list_reals(const Args& args, const std::string& name);

// Weighted mean over `parts` of the arrays named in `averaged` (F64, equal shapes), weights being
// Stats::weight; arrays named in `identical` must be equal in every part and are copied through.
// Parts with weight 0 (a site without images) are ignored. The result's weight is the sum, so
// combine() accepts its own output. Errors name `plugin` and the offending part.
Stats weighted_mean(const std::vector<Stats>& parts, const std::vector<std::string>& averaged,
                    const std::vector<std::string>& identical, const std::string& plugin);

// Row `c` (length `len`) of an F64 array of shape [channels, len], with checks naming `what`.
const double* row(const Array& a, int c, int64_t len, const std::string& what);

// Base of the site-local methods (zscore, whitestripe, n4): nothing to fit. fit_site counts the
// images so that the engine can still report them; combine sums the counts.
class SiteLocal : public Harmonizer {
 public:
  bool needs_fit() const override { return false; }
  Stats fit_site(const ImageSource& images) override;
  Stats combine(const std::vector<Stats>& parts) override;
  void set_statistics(const Stats&, const std::string&) override {}
};

}  // namespace concord::intensity
