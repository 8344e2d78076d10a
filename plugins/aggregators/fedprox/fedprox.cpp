// fedprox (Li et al., MLSys 2020): the server step is FedAvg's weighted mean; the difference is
// on the sites, which minimise  loss(w) + mu/2 ||w - w_global||^2  in local training. The
// aggregator's local_loss_term() is that term; every site builds its own FedProx instance from
// the pipeline, so mu is never sent.
#include <concord/aggregator.h>

#include "aggregation.h"

namespace concord {
namespace {

class FedProx : public Aggregator {
 public:
  FedProx(const Args& args, const BuildContext&)
      : weighting_(args.str("weighting")), mu_(args.real("mu")) {}

  bool aggregates_by_sum() const override { return true; }

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure("fedprox", global, updates, round);
    NamedArrays out;
    agg::weighted_mean("fedprox", global, updates,
                       agg::base_weights("fedprox", weighting_, updates, round), round,
                       agg::initial_selection("fedprox", global, updates, round), out);
    return out;
  }

  LossTerm local_loss_term(LocalTrainer& trainer) const override {
    return proximal_term(trainer.model(), trainer.received(), mu_);
  }

 private:
  std::string weighting_;
  double mu_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-fedprox", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Aggregator,
       "fedprox",
       "FedAvg on the server plus a proximal term mu/2 ||w - w_global||^2 in local training",
       {ArgSpec::real("mu", 0.01,
                      "Proximal coefficient the sites add to their local loss (0 = FedAvg)")
            .range(0, 1e3),
        ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                        "Weight sites by training samples, or equally")},
       factory_of<FedProx>()});
}
