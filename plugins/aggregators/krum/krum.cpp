// krum and multi-krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
// Gradient Descent", NeurIPS 2017).
//
// With n usable updates and f assumed Byzantine, each update i gets the score
//   s(i) = sum of ||x_i - x_j||^2 over the n - f - 2 updates j closest to i,
// over all float32 tensors taken as one vector (the global cancels out, so states and deltas give
// the same scores). krum returns the update with the lowest score; multi-krum the mean of the m
// lowest-scored updates (m = 0: n - f). Ties go to the earlier site. Needs n >= 2f + 3.
// Cost: n(n-1)/2 distances over d parameters, O(n^2 d), computed block by block in cache.
#include <concord/aggregator.h>
#include <concord/error.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <numeric>

#include "aggregation.h"

namespace concord {
namespace {

class Krum : public Aggregator {
 public:
  Krum(bool multi, const Args& args)
      : name_(multi ? "multi-krum" : "krum"),
        f_(static_cast<int>(args.integer("f"))),
        m_(multi ? static_cast<int>(args.integer("m")) : 1),
        weighting_(multi ? args.str("weighting") : "uniform") {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure(name_, global, updates, round);
    std::vector<double> dist;  // n x n, upper triangle filled
    NamedArrays unused;
    const auto sel = agg::run_finite(
        name_, updates, round, agg::initial_selection(name_, global, updates, round),
        [&](const std::vector<size_t>& s) {
          const size_t n = s.size();
          dist.assign(n * n, 0.0);
          const agg::Tensors t = agg::gather(global, updates, s, unused, false);
          return agg::visit_blocks(t, [&](size_t, int64_t, int64_t len, const float* const* rows) {
            for (size_t a = 0; a < n; ++a)
              for (size_t b = a + 1; b < n; ++b)
                dist[a * n + b] += agg::squared_distance(rows[a], rows[b], len);
          });
        });
    if (sel.empty()) return agg::keep_global(name_, global, round);
    const int n = static_cast<int>(sel.size());
    if (n < 2 * f_ + 3)
      throw Error(std::string(name_) + ": round " + std::to_string(round.round) + ": " +
                  std::to_string(n) + " usable updates, but f = " + std::to_string(f_) +
                  " needs at least 2f + 3 = " + std::to_string(2 * f_ + 3));
    const int m = m_ > 0 ? std::min(m_, n) : n - f_;

    std::vector<double> score(n, 0.0), row;
    for (int a = 0; a < n; ++a) {
      row.clear();
      for (int b = 0; b < n; ++b)
        if (b != a) row.push_back(a < b ? dist[a * n + b] : dist[b * n + a]);
      std::sort(row.begin(), row.end());
      score[a] = std::accumulate(row.begin(), row.begin() + (n - f_ - 2), 0.0);
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] < score[b]; });
    std::vector<size_t> chosen;
    std::string names;
    for (int r = 0; r < m; ++r) {
      chosen.push_back(sel[order[r]]);
      names += (r ? ", " : "") + updates[sel[order[r]]].site;
    }
    std::sort(chosen.begin(), chosen.end());
    spdlog::info("{}: round {}: selected {} of {} sites: {}", name_, round.round, m, n, names);

    NamedArrays out;
    agg::weighted_mean(name_, global, updates, agg::base_weights(name_, weighting_, updates, round),
                       round, chosen, out);
    return out;
  }

 private:
  const char* name_;
  int f_;
  int m_;
  std::string weighting_;
};

struct KrumPlugin : Krum {
  KrumPlugin(const Args& a, const BuildContext&) : Krum(false, a) {}
};
struct MultiKrumPlugin : Krum {
  MultiKrumPlugin(const Args& a, const BuildContext&) : Krum(true, a) {}
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-krum", "0.1.0") {
  using namespace concord;
  const ArgSpec f = ArgSpec::integer("f", 1,
                                     "Number of Byzantine sites assumed; needs n >= 2f + 3 "
                                     "usable updates")
                        .range(0, 1000);
  registry.add({Kind::Aggregator,
                "krum",
                "The one site update closest to its n - f - 2 nearest neighbours",
                {f},
                factory_of<KrumPlugin>()});
  registry.add({Kind::Aggregator,
                "multi-krum",
                "Mean of the m site updates with the lowest Krum scores",
                {f,
                 ArgSpec::integer("m", 0, "Updates averaged (0 = n - f, the usable count minus f)")
                     .range(0, 100000),
                 ArgSpec::choice("weighting", {"uniform", "samples"}, "uniform",
                                 "Average the selected updates equally, or by training samples")},
                factory_of<MultiKrumPlugin>()});
}
