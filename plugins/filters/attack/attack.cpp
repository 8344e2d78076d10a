// attack: makes chosen sites Byzantine, to evaluate robust aggregators (median, trimmed-mean,
// krum, outlier-suppression) against poisoned updates. Never part of a real deployment.
//   scale:     update = global + factor · (update − global)     (model replacement / boosting)
//   noise:     update = global + N(0, factor² I)                 (the site's training is discarded)
//   sign-flip: update = global − (update − global)               (factor unused)
// Only float32 entries change; the other sites pass through untouched.
#include <concord/filter.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "filtering.h"

namespace concord {
namespace {

const char* kName = "attack";

class Attack : public Filter {
 public:
  Attack(const Args& args, const BuildContext& ctx)
      : sites_(args.strings("sites")),
        mode_name_(args.str("mode")),
        mode_(mode_name_ == "scale"   ? Mode::Scale
              : mode_name_ == "noise" ? Mode::Noise
                                      : Mode::SignFlip),
        factor_(args.real("factor")) {
    // Built once per site (ctx.instance is the site's name): say which sites misbehave.
    if (std::find(sites_.begin(), sites_.end(), ctx.instance) != sites_.end())
      spdlog::warn("attack: site '{}' sends poisoned updates ({}, factor {})", ctx.instance,
                   mode_name_, factor_);
  }

  void apply(NamedArrays& update, const NamedArrays& global, FilterContext& ctx) override {
    if (std::find(sites_.begin(), sites_.end(), ctx.site) == sites_.end()) return;
    filtering::StandardNormal normal(filtering::rng_of(kName, ctx));
    const double sigma = std::fabs(factor_);
    for (auto& [name, a] : update) {
      if (a.dtype() != DType::F32) continue;
      const float* x0 = filtering::global_of(kName, ctx, global, name, a).data<float>();
      float* x = a.data<float>();
      for (int64_t k = 0; k < a.numel(); ++k) {
        const double g = x0[k], d = double(x[k]) - g;
        switch (mode_) {
          case Mode::Scale:
            x[k] = float(g + factor_ * d);
            break;
          case Mode::Noise:
            x[k] = float(g + sigma * normal());
            break;
          case Mode::SignFlip:
            x[k] = float(g - d);
            break;
        }
      }
    }
  }

 private:
  enum class Mode { Scale, Noise, SignFlip };
  std::vector<std::string> sites_;
  std::string mode_name_;
  Mode mode_;
  double factor_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-filter-attack", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Filter,
       "attack",
       "Byzantine-site simulation (scale, noise, sign-flip) for evaluating robust aggregators",
       {ArgSpec::list("sites", ArgType::String, {}, "Sites that send poisoned updates").required(),
        ArgSpec::choice("mode", {"scale", "noise", "sign-flip"}, "scale",
                        "scale: global + factor*delta; noise: global + N(0, factor^2); "
                        "sign-flip: global - delta"),
        ArgSpec::real("factor", -10.0,
                      "scale: multiplier of the delta; noise: std |factor|; sign-flip: unused")
            .range(-1e6, 1e6)},
       factory_of<Attack>()});
}
