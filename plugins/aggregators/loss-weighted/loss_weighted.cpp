// loss-weighted: a weighted mean in which sites with a high training loss count less.
//
//   rule = inverse:  w_i = p_i / (L_i + epsilon)
//   rule = softmax:  w_i = p_i exp(-(L_i - min_j L_j) / T)
//   x = sum_i w_i x_i / sum_i w_i            p_i: samples or uniform; L_i: SiteUpdate::train_loss
// A site whose loss is non-finite, or (inverse) not above -epsilon, is rejected and logged.
#include <concord/aggregator.h>

#include <spdlog/spdlog.h>

#include <cmath>

#include "aggregation.h"

namespace concord {
namespace {

constexpr const char* kName = "loss-weighted";

class LossWeighted : public Aggregator {
 public:
  LossWeighted(const Args& args, const BuildContext&)
      : softmax_(args.str("rule") == "softmax"),
        epsilon_(args.real("epsilon")),
        temperature_(args.real("temperature")),
        weighting_(args.str("weighting")) {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure(kName, global, updates, round);
    std::vector<size_t> sel;
    for (size_t i : agg::initial_selection(kName, global, updates, round)) {
      const double loss = updates[i].train_loss;
      if (!std::isfinite(loss))
        agg::log_rejected(kName, updates[i], round, "non-finite train_loss");
      else if (!softmax_ && loss + epsilon_ <= 0)
        agg::log_rejected(kName, updates[i], round,
                          "train_loss " + std::to_string(loss) + " <= -epsilon");
      else
        sel.push_back(i);
    }
    if (sel.empty()) return agg::keep_global(kName, global, round);
    std::vector<double> w = agg::base_weights(kName, weighting_, updates, round);
    double lowest = updates[sel.front()].train_loss;
    for (size_t i : sel) lowest = std::min(lowest, updates[i].train_loss);
    for (size_t i : sel) {
      const double loss = updates[i].train_loss;
      w[i] *= softmax_ ? std::exp(-(loss - lowest) / temperature_) : 1.0 / (loss + epsilon_);
      spdlog::debug("{}: round {}: site '{}' loss {:.6g} weight {:.6g}", kName, round.round,
                    updates[i].site, loss, w[i]);
    }
    NamedArrays out;
    agg::weighted_mean(kName, global, updates, w, round, sel, out);
    return out;
  }

 private:
  bool softmax_;
  double epsilon_;
  double temperature_;
  std::string weighting_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-loss-weighted", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Aggregator,
       kName,
       "Weighted mean in which sites with a higher training loss count less",
       {ArgSpec::choice("rule", {"inverse", "softmax"}, "inverse",
                        "inverse: w = p/(loss + epsilon); softmax: w = p exp(-(loss - min)/T)"),
        ArgSpec::real("epsilon", 1e-3, "Added to the loss in the inverse rule").range(0, 1e6),
        ArgSpec::real("temperature", 1.0, "Softmax temperature T (in loss units)").range(1e-9, 1e9),
        ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                        "Base weight p of a site: training samples, or equal")},
       factory_of<LossWeighted>()});
}
