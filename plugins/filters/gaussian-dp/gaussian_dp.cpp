// gaussian-dp: the client-side Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018;
// Geyer et al., 2017). Δ = update − global over the included float32 entries, taken as one
// vector; Δ' = Δ · min(1, C / ‖Δ‖₂) + N(0, (z C)² I); the site uploads global + Δ'.
// The clipping and the noise are concord::dp::clip_update and add_gaussian_noise (dp_mechanism.h).
// No privacy accounting is done here: see README.md for what this does and does not give.
#include <concord/dp_mechanism.h>
#include <concord/filter.h>

#include <spdlog/spdlog.h>

#include <set>

#include "filtering.h"

namespace concord {
namespace {

const char* kName = "gaussian-dp";

class GaussianDp : public Filter {
 public:
  GaussianDp(const Args& args, const BuildContext&)
      : clip_(args.real("clip")),
        noise_multiplier_(args.real("noise_multiplier")),
        exclude_modules_(args.strings("exclude_modules")),
        exclude_leaves_(leaves(args)) {}

  void apply(NamedArrays& update, const NamedArrays& global, FilterContext& ctx) override {
    // The included entries, checked against their global values (errors name plugin, site,
    // round); everything else passes through untouched.
    const dp::EntrySelector select = [this](const std::string& name, const Array& a) {
      return a.dtype() == DType::F32 && !excluded(name);
    };
    size_t included = 0;
    for (const auto& [name, a] : update)
      if (select(name, a)) {
        filtering::global_of(kName, ctx, global, name, a);
        ++included;
      }
    if (included == 0)
      throw Error(filtering::where(kName, ctx) +
                  ": no float32 entry left to privatise after the exclusions");
    auto& rng = filtering::rng_of(kName, ctx);  // before anything changes

    const double norm = dp::clip_update(update, global, clip_, select);
    const double sigma = noise_multiplier_ * clip_;
    spdlog::debug("{}: ‖Δ‖₂ = {:.6g}, scaled by {:.6g}, noise σ = {:.6g}",
                  filtering::where(kName, ctx), norm, norm > clip_ ? clip_ / norm : 1.0, sigma);
    dp::add_gaussian_noise(update, sigma, rng, select);
  }

 private:
  static std::set<std::string> leaves(const Args& args) {
    const std::vector<std::string> v = args.strings("exclude_leaves");
    return {v.begin(), v.end()};
  }

  bool excluded(const std::string& name) const {
    for (const auto& m : exclude_modules_)
      if (name == m ||
          (name.size() > m.size() && name.compare(0, m.size(), m) == 0 && name[m.size()] == '.'))
        return true;
    const auto dot = name.rfind('.');
    return exclude_leaves_.count(dot == std::string::npos ? name : name.substr(dot + 1)) > 0;
  }

  double clip_, noise_multiplier_;
  std::vector<std::string> exclude_modules_;
  std::set<std::string> exclude_leaves_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-filter-gaussian-dp", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Filter,
       "gaussian-dp",
       "DP-FedAvg client mechanism: clip the update's delta to L2 norm C, add N(0, (zC)^2) noise",
       {ArgSpec::real("clip", 1.0, "L2 bound C on the whole delta (update - global)")
            .range(1e-12, 1e12)
            .required(),
        ArgSpec::real("noise_multiplier", 1.0, "z: noise std per coordinate is z * clip")
            .range(0, 1e6)
            .required(),
        ArgSpec::list("exclude_modules", ArgType::String, {},
                      "Module paths (name prefixes up to a '.') left untouched"),
        ArgSpec::list("exclude_leaves", ArgType::String,
                      {"running_mean", "running_var", "num_batches_tracked"},
                      "Entry leaf names (after the last '.') left untouched")},
       factory_of<GaussianDp>()});
}
