// nyul: Nyul-Udupa piecewise-linear landmark standardisation, fitted across sites.
//
// Per image: landmarks m = percentiles (pc_low, landmarks..., pc_high) of foreground intensities,
// mapped linearly so that pc_low -> s_min and pc_high -> s_max. Each site sends the mean mapped
// landmarks of its images; the coordinator takes the image-weighted mean: the standard scale.
// apply() maps each image's landmarks onto the standard landmarks piecewise-linearly.
// References: Nyul & Udupa, MRM 42:1072 (1999); Nyul, Udupa & Zhang, IEEE TMI 19:143 (2000).
#include <concord/harmonizer.h>

#include "intensity.h"

#include <algorithm>

namespace concord {
namespace {

using namespace intensity;

class Nyul : public Harmonizer {
 public:
  Nyul(const Args& args, const BuildContext& ctx)
      : rule_(foreground_rule(args)),
        tails_(tails_from(args.str("tails"))),
        s_min_(args.real("s_min")),
        s_max_(args.real("s_max")) {
    who_ = "harmonizer 'nyul'" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")");
    const double lo = args.real("pc_low"), hi = args.real("pc_high");
    pcts_.push_back(lo);
    for (double p : list_reals(args, "landmarks")) pcts_.push_back(p);
    pcts_.push_back(hi);
    for (size_t k = 1; k < pcts_.size(); ++k)
      if (!(pcts_[k - 1] < pcts_[k]))
        throw Error(who_ + ": percentiles must increase strictly: pc_low < landmarks < pc_high");
    if (lo < 0 || hi > 100) throw Error(who_ + ": percentiles must lie in [0, 100]");
    if (!(s_min_ < s_max_)) throw Error(who_ + ": s_min must be below s_max");
  }

  Stats fit_site(const ImageSource& images) override {
    Stats s;
    std::vector<double> sum;
    int channels = -1;
    const auto L = int64_t(pcts_.size());
    images([&](const Image& im) {
      if (channels < 0) channels = im.channels, sum.assign(size_t(channels * L), 0.0);
      if (im.channels != channels)
        throw Error(who_ + ": fit: images of one site have " + std::to_string(channels) + " and " +
                    std::to_string(im.channels) + " channels");
      for (int c = 0; c < channels; ++c) {
        auto m = landmarks_of(im, c, "fit");
        // Linear map pc_low -> s_min, pc_high -> s_max (Nyul & Udupa's step 1).
        const double scale = (s_max_ - s_min_) / (m.back() - m.front());
        for (int64_t i = 0; i < L; ++i)
          sum[size_t(c * L + i)] += s_min_ + (m[size_t(i)] - m.front()) * scale;
      }
      s.weight += 1;
    });
    if (s.weight == 0) return s;
    for (double& v : sum) v /= s.weight;
    s.arrays["standard"] = Array::from(sum, {channels, L});
    s.arrays["percentiles"] = Array::from(pcts_);
    return s;
  }

  Stats combine(const std::vector<Stats>& parts) override {
    return weighted_mean(parts, {"standard"}, {"percentiles"}, who_);
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    const std::string where = who_ + " at site '" + site + "'";
    auto p = global.arrays.find("percentiles");
    auto st = global.arrays.find("standard");
    if (p == global.arrays.end() || st == global.arrays.end())
      throw Error(where + ": global statistics lack 'percentiles' or 'standard'");
    if (p->second.dtype() != DType::F64 || p->second.to_vector<double>() != pcts_)
      throw Error(where + ": global statistics were fitted with other percentiles");
    row(st->second, 0, int64_t(pcts_.size()), where);
    standard_ = st->second.clone();
    site_ = site;
  }

  void apply(Image& image) const override {
    if (standard_.empty()) throw Error(who_ + ": apply() called before set_statistics()");
    const auto L = int64_t(pcts_.size());
    for (int c = 0; c < image.channels; ++c) {
      const double* target = row(standard_, c, L, who_ + " at site '" + site_ + "'");
      PiecewiseLinear map(landmarks_of(image, c, "apply"), std::vector<double>(target, target + L),
                          tails_, who_ + ": apply, channel " + std::to_string(c));
      float* v = image.channel(c);
      for (int64_t i = 0; i < image.voxels(); ++i) v[i] = float(map(v[i]));
    }
  }

 private:
  std::vector<double> landmarks_of(const Image& im, int c, const char* phase) const {
    auto fg = sorted_foreground(im.channel(c), im.voxels(), rule_);
    if (fg.empty())
      throw Error(who_ + ": " + phase + ": channel " + std::to_string(c) +
                  " has no foreground voxels under the chosen foreground policy");
    auto m = percentiles(fg, pcts_);
    if (!(m.back() > m.front()))
      throw Error(who_ + ": " + phase + ": channel " + std::to_string(c) +
                  " has equal pc_low and pc_high intensities (" + std::to_string(m.front()) +
                  "): no contrast to standardise");
    return m;
  }

  ForegroundRule rule_;
  Tails tails_;
  double s_min_, s_max_;
  std::vector<double> pcts_;
  std::string who_, site_;
  Array standard_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-nyul", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::real("pc_low", 1.0, "lower percentile of the intensity of interest").range(0, 100),
      ArgSpec::real("pc_high", 99.0, "upper percentile of the intensity of interest").range(0, 100),
      ArgSpec::list("landmarks", ArgType::Float,
                    {"10", "20", "30", "40", "50", "60", "70", "80", "90"},
                    "inner landmark percentiles, strictly between pc_low and pc_high")
          .range(0, 100),
      ArgSpec::real("s_min", 1.0, "standard scale: where pc_low lands"),
      ArgSpec::real("s_max", 100.0, "standard scale: where pc_high lands")};
  for (auto& a : intensity::foreground_args("mean")) args.push_back(a);
  auto tails = intensity::tails_arg();
  tails.default_value->s = "end-segments";  // Nyul & Udupa extend the outer segments
  args.push_back(tails);
  registry.add({Kind::Harmonizer, "nyul",
                "Nyul-Udupa landmark standardisation with a federated standard scale", args,
                factory_of<Nyul>()});
}
