// whitestripe: WhiteStripe normalisation (Shinohara et al., NeuroImage: Clinical 6:9, 2014).
//
// Per image and channel: smooth the histogram of foreground intensities (upper tail removed),
// take the white-matter mode (the highest-intensity mode for T1, the largest for T2), let q be
// its quantile; the "white stripe" is the voxels between the (q - tau) and (q + tau) quantiles.
// Every voxel becomes (x - mean_stripe) / sd_stripe. Site-local: nothing to fit.
#include <concord/harmonizer.h>

#include "intensity.h"

#include <algorithm>
#include <cmath>

namespace concord {
namespace {

using namespace intensity;

class WhiteStripe : public SiteLocal {
 public:
  WhiteStripe(const Args& args, const BuildContext& ctx)
      : rule_(foreground_rule(args)),
        tau_(args.real("tau")),
        bins_(args.integer("bins")),
        bandwidth_(args.real("bandwidth")),
        rare_(args.real("rare_prop")),
        tail_(args.real("tail_percentile")),
        last_mode_(args.str("contrast") == "t1") {
    who_ = "harmonizer 'whitestripe'" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")");
  }

  void apply(Image& image) const override {
    for (int c = 0; c < image.channels; ++c) {
      float* v = image.channel(c);
      const std::string where = who_ + ": channel " + std::to_string(c);
      auto voi = sorted_foreground(v, image.voxels(), rule_);
      if (voi.size() < 3)
        throw Error(where + ": fewer than 3 foreground voxels under the foreground policy");
      const double mode = white_matter_mode(voi, where);
      // Quantile of the mode, then the stripe of +-tau quantiles around it.
      const double q = double(std::lower_bound(voi.begin(), voi.end(), float(mode)) - voi.begin()) /
                       double(voi.size());
      auto bounds =
          percentiles(voi, {100 * std::max(q - tau_, 0.0), 100 * std::min(q + tau_, 1.0)});
      auto first = std::upper_bound(voi.begin(), voi.end(), float(bounds[0]));
      auto last = std::lower_bound(voi.begin(), voi.end(), float(bounds[1]));
      if (last - first < 2) {  // quantised data: the open stripe may be empty; close it
        first = std::lower_bound(voi.begin(), voi.end(), float(bounds[0]));
        last = std::upper_bound(voi.begin(), voi.end(), float(bounds[1]));
      }
      const double n = double(last - first);
      double sum = 0, ss = 0;
      for (auto it = first; it != last; ++it) sum += *it;
      const double mean = sum / n;
      for (auto it = first; it != last; ++it) ss += (*it - mean) * (*it - mean);
      const double sd = n > 1 ? std::sqrt(ss / (n - 1)) : 0.0;
      if (!(sd > 0))
        throw Error(where + ": the white stripe around intensity " + std::to_string(mode) +
                    " is constant (standard deviation 0); raise tau");
      for (int64_t i = 0; i < image.voxels(); ++i) v[i] = float((v[i] - mean) / sd);
    }
  }

 private:
  // The white-matter mode of the smoothed histogram of `voi` (sorted), with the upper tail cut.
  double white_matter_mode(const std::vector<float>& voi, const std::string& where) const {
    const double lo = voi.front();
    const double hi = percentiles(voi, {tail_})[0];
    if (!(hi > lo)) throw Error(where + ": foreground intensities have no spread");
    const int64_t B = bins_;
    const double width = (hi - lo) / double(B);
    std::vector<double> h(size_t(B), 0.0);
    for (float x : voi) {
      if (x > hi) break;
      auto b = std::min<int64_t>(B - 1, int64_t((x - lo) / width));
      h[size_t(b)] += 1;
    }
    // Gaussian smoothing; sigma is a fraction of the histogram's intensity range.
    const double sigma = std::max(bandwidth_ * double(B), 0.5);
    const auto radius = int64_t(std::ceil(4 * sigma));
    std::vector<double> kernel(size_t(2 * radius + 1));
    for (int64_t k = -radius; k <= radius; ++k)
      kernel[size_t(k + radius)] = std::exp(-0.5 * double(k * k) / (sigma * sigma));
    std::vector<double> s(size_t(B), 0.0);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t k = -radius; k <= radius; ++k)
        if (i + k >= 0 && i + k < B) s[size_t(i)] += kernel[size_t(k + radius)] * h[size_t(i + k)];
    const double top = *std::max_element(s.begin(), s.end());
    int64_t chosen = -1;
    for (int64_t i = 1; i + 1 < B; ++i) {
      const bool peak = s[size_t(i)] > s[size_t(i - 1)] && s[size_t(i)] >= s[size_t(i + 1)];
      if (!peak || s[size_t(i)] < rare_ * top) continue;  // rare modes are noise (rare_prop)
      if (chosen < 0 || last_mode_ || s[size_t(i)] > s[size_t(chosen)]) chosen = i;
    }
    if (chosen < 0) throw Error(where + ": the smoothed foreground histogram has no interior mode");
    return lo + (double(chosen) + 0.5) * width;
  }

  ForegroundRule rule_;
  double tau_;
  int64_t bins_;
  double bandwidth_, rare_, tail_;
  bool last_mode_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-whitestripe", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::real("tau", 0.05, "half-width of the stripe, in quantiles").range(0.001, 0.5),
      ArgSpec::choice("contrast", {"t1", "t2"}, "t1",
                      "white matter is the highest-intensity mode (t1) or the largest mode (t2)"),
      ArgSpec::integer("bins", 1000, "histogram bins").range(16, 100000),
      ArgSpec::real("bandwidth", 0.01,
                    "Gaussian smoothing sigma, as a fraction of the histogram's intensity range")
          .range(0, 0.5),
      ArgSpec::real("rare_prop", 0.2, "modes lower than this fraction of the highest are ignored")
          .range(0, 1),
      ArgSpec::real("tail_percentile", 99.0,
                    "foreground intensities above this percentile are left out of the histogram")
          .range(50, 100)};
  for (auto& a : intensity::foreground_args("mean")) args.push_back(a);
  registry.add({Kind::Harmonizer, "whitestripe",
                "WhiteStripe: normalise by the white-matter stripe of the histogram (site-local)",
                args, factory_of<WhiteStripe>()});
}
