// outlier-suppression: distance-based down-weighting of sites far from the others.
//
//   c     = coordinate-wise median of the n usable updates (float32 tensors, one vector)
//   d_i   = ||x_i - c||_2                      distance of site i to the robust centre
//   s     = median_i d_i                       typical distance
//   t     = kappa s                            threshold
//   mode = downweight:  a_i = min(1, t / d_i)  (Huber weights: influence bounded by t)
//   mode = drop:        a_i = 1 if d_i <= t, else 0
//   x     = sum_i a_i p_i x_i / sum_i a_i p_i  p_i: samples or uniform
// A site at distance 0 (or every site, when s = 0 and d_i = 0) keeps a_i = 1; when s = 0 any site
// with d_i > 0 gets a_i = 0. Sites suppressed are logged with their distance and the threshold.
#include <concord/aggregator.h>
#include <concord/error.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "aggregation.h"

namespace concord {
namespace {

constexpr const char* kName = "outlier-suppression";

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class OutlierSuppression : public Aggregator {
 public:
  OutlierSuppression(const Args& args, const BuildContext&)
      : kappa_(args.real("kappa")),
        drop_(args.str("mode") == "drop"),
        weighting_(args.str("weighting")) {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure(kName, global, updates, round);
    std::vector<double> dist2;
    NamedArrays unused;
    const auto sel = agg::run_finite(
        kName, updates, round, agg::initial_selection(kName, global, updates, round),
        [&](const std::vector<size_t>& s) {
          const size_t n = s.size();
          dist2.assign(n, 0.0);
          const agg::Tensors t = agg::gather(global, updates, s, unused, false);
          std::vector<float> centre(agg::kBlock);
          return agg::visit_sorted(
              t, [&](size_t, int64_t, int64_t len, const float* table, const float* const* rows) {
                agg::mean_of_rows(table, agg::kBlock, static_cast<int>(n - 1) / 2,
                                  static_cast<int>(n) / 2 + 1, len, centre.data());
                for (size_t i = 0; i < n; ++i)
                  dist2[i] += agg::squared_distance(rows[i], centre.data(), len);
              });
        });
    if (sel.empty()) return agg::keep_global(kName, global, round);

    std::vector<double> dist(sel.size());
    for (size_t i = 0; i < sel.size(); ++i) dist[i] = std::sqrt(dist2[i]);
    const double threshold = kappa_ * median_of(dist);
    std::vector<double> weights = agg::base_weights(kName, weighting_, updates, round);
    std::vector<size_t> kept;
    for (size_t i = 0; i < sel.size(); ++i) {
      double a = 1.0;
      if (dist[i] > threshold) a = drop_ ? 0.0 : threshold / dist[i];
      if (a < 1.0)
        spdlog::warn(
            "{}: round {}: site '{}' is at distance {:.6g} from the median (threshold "
            "{:.6g}): weight x{:.4g}",
            kName, round.round, updates[sel[i]].site, dist[i], threshold, a);
      weights[sel[i]] *= a;
      if (a > 0) kept.push_back(sel[i]);
    }
    NamedArrays out;
    agg::weighted_mean(kName, global, updates, weights, round, kept, out);
    return out;
  }

 private:
  double kappa_;
  bool drop_;
  std::string weighting_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-outlier-suppression", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Aggregator,
       kName,
       "Weighted mean with sites far from the coordinate-wise median down-weighted or dropped",
       {ArgSpec::real("kappa", 2.5,
                      "Threshold in units of the median site distance to the coordinate-wise "
                      "median")
            .range(1e-6, 1e6),
        ArgSpec::choice("mode", {"downweight", "drop"}, "downweight",
                        "Beyond the threshold: weight x threshold/distance, or drop the site"),
        ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                        "Base weight of a site: training samples, or equal")},
       factory_of<OutlierSuppression>()});
}
