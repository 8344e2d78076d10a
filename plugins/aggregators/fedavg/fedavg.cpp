// fedavg: w = sum_i n_i w_i / sum_i n_i (McMahan et al., AISTATS 2017), or the plain mean.
// The weighted mean (and its non-finite guard) lives in ../common, shared with fedprox.
#include <concord/aggregator.h>

#include "aggregation.h"

namespace concord {
namespace {

class FedAvg : public Aggregator {
 public:
  FedAvg(const Args& args, const BuildContext&) : weighting_(args.str("weighting")) {}

  bool aggregates_by_sum() const override { return true; }

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure("fedavg", global, updates, round);
    NamedArrays out;
    agg::weighted_mean("fedavg", global, updates,
                       agg::base_weights("fedavg", weighting_, updates, round), round,
                       agg::initial_selection("fedavg", global, updates, round), out);
    return out;
  }

 private:
  std::string weighting_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-fedavg", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Aggregator,
                "fedavg",
                "Federated averaging of the sites' shared state",
                {ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                                 "Weight sites by training samples, or equally")},
                factory_of<FedAvg>(),
                {"aggregator"}});
}
