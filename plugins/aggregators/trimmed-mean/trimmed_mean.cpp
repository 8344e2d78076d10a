// trimmed-mean: per coordinate, drop the k = floor(beta n) largest and k smallest site values and
// average the n - 2k left (Yin et al., ICML 2018). Sites are not weighted.
#include <concord/aggregator.h>

#include <cmath>

#include "aggregation.h"

namespace concord {
namespace {

std::pair<int, int> kept(int n, double beta) {
  const int k = static_cast<int>(std::floor(beta * n));
  return {k, n - k};  // beta < 0.5, so n - 2k >= 1
}

class TrimmedMean : public Aggregator {
 public:
  TrimmedMean(const Args& args, const BuildContext&) : beta_(args.real("beta")) {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure("trimmed-mean", global, updates, round);
    NamedArrays out;
    agg::rank_mean("trimmed-mean", global, updates, round, kept, beta_, out);
    return out;
  }

 private:
  double beta_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-trimmed-mean", "0.1.0") {
  using namespace concord;
  ArgSpec beta = ArgSpec::real("beta", 0.2,
                               "Fraction trimmed at each end: floor(beta n) highest and lowest "
                               "site values per coordinate are dropped");
  beta.min = 0.0;
  beta.max = 0.4999999;
  registry.add({Kind::Aggregator,
                "trimmed-mean",
                "Coordinate-wise mean after dropping the beta fraction of extreme site values",
                {beta},
                factory_of<TrimmedMean>()});
}
