// mean-scale: a complete federated harmonizer in one file, as a plugin author writes one.
//
// Fit: each site reports the mean intensity of its training images and how many voxels that
// mean covers. Combine: the coordinator computes the voxel-weighted global mean and keeps each
// site's own mean (keyed by site). Apply: every image of site s is multiplied by
// global_mean / mean_s, so all sites end up with the same mean intensity.
#include <concord/error.h>
#include <concord/harmonizer.h>

#include <cmath>

namespace {

using namespace concord;

class MeanScale : public Harmonizer {
 public:
  MeanScale(const Args& args, const BuildContext&) : min_mean_(args.real("min_mean")) {}

  Stats fit_site(const ImageSource& images) override {
    double sum = 0, voxels = 0;
    Stats s;
    images([&](const Image& im) {
      for (float v : im.data) sum += v;
      voxels += double(im.data.size());
      s.weight += 1;  // images
    });
    s.scalars["sum"] = sum;
    s.scalars["voxels"] = voxels;
    return s;
  }

  Stats combine(const std::vector<Stats>& parts) override {
    Stats out;
    for (const auto& p : parts) {
      out.scalars["sum"] += p.scalars.at("sum");
      out.scalars["voxels"] += p.scalars.at("voxels");
      out.weight += p.weight;
      if (!p.site.empty() && p.scalars.at("voxels") > 0)
        out.scalars["mean/" + p.site] = p.scalars.at("sum") / p.scalars.at("voxels");
      // Combined parts (no site) carry their per-site means along.
      for (const auto& [k, v] : p.scalars)
        if (k.rfind("mean/", 0) == 0) out.scalars[k] = v;
    }
    return out;
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    double voxels = global.scalars.at("voxels");
    if (voxels <= 0) throw Error("mean-scale: the federation has no image voxels");
    global_mean_ = global.scalars.at("sum") / voxels;
    auto it = global.scalars.find("mean/" + site);
    // A site that did not contribute (held out) is scaled by the mean it measures itself.
    site_mean_ = it != global.scalars.end() ? it->second : NAN;
  }

  void apply(Image& image) const override {
    double mean = site_mean_;
    if (std::isnan(mean)) {
      double sum = 0;
      for (float v : image.data) sum += v;
      mean = image.data.empty() ? 0 : sum / double(image.data.size());
    }
    if (std::fabs(mean) < min_mean_) return;  // nearly empty: leave it alone
    const float k = float(global_mean_ / mean);
    for (float& v : image.data) v *= k;
  }

 private:
  double min_mean_;
  double global_mean_ = 0;
  double site_mean_ = NAN;
};

}  // namespace

CONCORD_PLUGIN("example-mean-scale", "1.0.0") {
  registry.add({concord::Kind::Harmonizer,
                "mean-scale",
                "Scale each site's intensities to the federation's mean intensity",
                {concord::ArgSpec::real("min_mean", 1e-6,
                                        "Images whose mean is below this are left unchanged")
                     .at_least(0)},
                concord::factory_of<MeanScale>()});
}
