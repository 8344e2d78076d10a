// zscore: per image and channel, (x - mean_fg) / std_fg with the mean and (population) standard
// deviation of the foreground voxels; every voxel is transformed. Site-local: nothing to fit.
#include <concord/harmonizer.h>

#include "intensity.h"

#include <cmath>

namespace concord {
namespace {

using namespace intensity;

class ZScore : public SiteLocal {
 public:
  ZScore(const Args& args, const BuildContext& ctx) : rule_(foreground_rule(args)) {
    who_ = "harmonizer 'zscore'" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")");
  }

  void apply(Image& image) const override {
    for (int c = 0; c < image.channels; ++c) {
      float* v = image.channel(c);
      const int64_t n = image.voxels();
      auto mask = foreground_mask(v, n, rule_);
      // Two passes in double: robust for large volumes with a big offset.
      double sum = 0, count = 0;
      for (int64_t i = 0; i < n; ++i)
        if (mask[i]) sum += v[i], count += 1;
      if (count == 0)
        throw Error(who_ + ": channel " + std::to_string(c) +
                    " has no foreground voxels under the chosen foreground policy");
      const double mean = sum / count;
      double ss = 0;
      for (int64_t i = 0; i < n; ++i)
        if (mask[i]) ss += (v[i] - mean) * (v[i] - mean);
      const double sd = std::sqrt(ss / count);
      if (!(sd > 0))
        throw Error(who_ + ": channel " + std::to_string(c) + ": the " +
                    std::to_string(int64_t(count)) +
                    " foreground voxels are constant (standard deviation 0)");
      for (int64_t i = 0; i < n; ++i) v[i] = float((v[i] - mean) / sd);
    }
  }

 private:
  ForegroundRule rule_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-zscore", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Harmonizer, "zscore",
                "Per-image z-score of intensities over a foreground mask (site-local)",
                intensity::foreground_args("otsu"), factory_of<ZScore>()});
}
