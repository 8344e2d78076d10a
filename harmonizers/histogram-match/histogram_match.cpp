// histogram-match: federated quantile (histogram) matching.
//
// Each site sends the mean over its images of the per-image quantile functions of foreground
// intensities (K values per channel at fixed percent levels); the coordinator takes their
// image-weighted mean, i.e. the 1-D Wasserstein-2 barycentre of the sites' intensity
// distributions. apply() maps an image's own quantiles onto the global ones piecewise-linearly.
// Reference: Nyul & Udupa 1999 (landmark matching); ITK HistogramMatchingImageFilter uses the
// same piecewise-linear quantile map between two images.
#include <concord/harmonizer.h>

#include "intensity.h"

#include <cmath>

namespace concord {
namespace {

using namespace intensity;

class HistogramMatch : public Harmonizer {
 public:
  HistogramMatch(const Args& args, const BuildContext& ctx)
      : rule_(foreground_rule(args)), tails_(tails_from(args.str("tails"))) {
    who_ = "harmonizer 'histogram-match'" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")");
    const auto k = args.integer("quantiles");
    const double lo = args.real("lower_percentile"), hi = args.real("upper_percentile");
    if (!(lo < hi)) throw Error(who_ + ": lower_percentile must be below upper_percentile");
    for (int64_t i = 0; i < k; ++i) levels_.push_back(lo + (hi - lo) * double(i) / double(k - 1));
  }

  Stats fit_site(const ImageSource& images) override {
    Stats s;
    std::vector<double> sum;
    int channels = -1;
    const auto k = static_cast<int64_t>(levels_.size());
    images([&](const Image& im) {
      if (channels < 0) channels = im.channels, sum.assign(size_t(channels * k), 0.0);
      if (im.channels != channels)
        throw Error(who_ + ": fit: images of one site have " + std::to_string(channels) + " and " +
                    std::to_string(im.channels) + " channels");
      for (int c = 0; c < channels; ++c) {
        auto q = quantiles_of(im, c, "fit");
        for (int64_t i = 0; i < k; ++i) sum[size_t(c * k + i)] += q[size_t(i)];
      }
      s.weight += 1;
    });
    if (s.weight == 0) return s;  // a site without images contributes nothing
    for (double& v : sum) v /= s.weight;
    s.arrays["quantiles"] = Array::from(sum, {channels, k});
    s.arrays["levels"] = Array::from(levels_);
    return s;
  }

  Stats combine(const std::vector<Stats>& parts) override {
    return weighted_mean(parts, {"quantiles"}, {"levels"}, who_);
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    const std::string where = who_ + " at site '" + site + "'";
    auto lv = global.arrays.find("levels");
    auto q = global.arrays.find("quantiles");
    if (lv == global.arrays.end() || q == global.arrays.end())
      throw Error(where + ": global statistics lack 'levels' or 'quantiles'");
    if (lv->second.dtype() != DType::F64 || lv->second.to_vector<double>() != levels_)
      throw Error(where + ": global statistics were fitted with other quantile levels");
    row(q->second, 0, int64_t(levels_.size()), where);  // validates dtype and shape
    global_ = q->second.clone();
    site_ = site;
  }

  void apply(Image& image) const override {
    if (global_.empty()) throw Error(who_ + ": apply() called before set_statistics()");
    const auto k = int64_t(levels_.size());
    for (int c = 0; c < image.channels; ++c) {
      const double* target = row(global_, c, k, who_ + " at site '" + site_ + "'");
      PiecewiseLinear map(quantiles_of(image, c, "apply"), std::vector<double>(target, target + k),
                          tails_, who_ + ": apply, channel " + std::to_string(c));
      float* v = image.channel(c);
      for (int64_t i = 0; i < image.voxels(); ++i) v[i] = float(map(v[i]));
    }
  }

 private:
  std::vector<double> quantiles_of(const Image& im, int c, const char* phase) const {
    auto fg = sorted_foreground(im.channel(c), im.voxels(), rule_);
    if (fg.empty())
      throw Error(who_ + ": " + phase + ": channel " + std::to_string(c) +
                  " has no foreground voxels under the chosen foreground policy");
    return percentiles(fg, levels_);
  }

  ForegroundRule rule_;
  Tails tails_;
  std::vector<double> levels_;
  std::string who_, site_;
  Array global_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-histogram-match", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::integer("quantiles", 101, "number of quantile levels shared per channel")
          .range(3, 10001),
      ArgSpec::real("lower_percentile", 1.0, "lowest quantile level, in percent").range(0, 100),
      ArgSpec::real("upper_percentile", 99.0, "highest quantile level, in percent").range(0, 100)};
  for (auto& a : intensity::foreground_args("mean")) args.push_back(a);
  args.push_back(intensity::tails_arg());
  registry.add({Kind::Harmonizer, "histogram-match",
                "Federated quantile matching to the sites' mean quantile function", args,
                factory_of<HistogramMatch>()});
}
