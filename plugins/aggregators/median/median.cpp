// median: the coordinate-wise median of the sites' shared state (Yin et al., ICML 2018); with an
// even number of sites, the mean of the two middle values. Sites are not weighted.
#include <concord/aggregator.h>

#include "aggregation.h"

namespace concord {
namespace {

std::pair<int, int> middle(int n, double) {
  return {(n - 1) / 2, n / 2 + 1};
}

class Median : public Aggregator {
 public:
  Median(const Args&, const BuildContext&) {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure("median", global, updates, round);
    NamedArrays out;
    agg::rank_mean("median", global, updates, round, middle, 0.0, out);
    return out;
  }
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-median", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Aggregator,
                "median",
                "Coordinate-wise median of the sites' state (robust to a minority of bad sites)",
                {},
                factory_of<Median>()});
}
