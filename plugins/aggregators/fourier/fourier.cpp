// fourier: progressive Fourier aggregation, after the PFA of Chen et al., "Personalized
// Retrogress-Resilient Framework for Real-World Medical Federated Learning", MICCAI 2021.
//
// Each selected float32 tensor W (conv kernels: ndim >= 3; with apply_to = matrices also ndim 2)
// is viewed as a matrix of R = shape[0] rows and C = numel / R columns and moved to the frequency
// domain by the 2-D DCT-II. With r_t the low-frequency fraction of round t,
//   low = { (u, v) : u < ceil(r_t R), v < ceil(r_t C) }
//   DCT(W_new)[u, v] = sum_i p_i DCT(W_i)[u, v]   for (u, v) in low   (sites' average)
//                    = DCT(W_global)[u, v]         otherwise           (previous global)
// By linearity this is W_new = W_g + IDCT(mask . DCT(mean - W_g)): one transform pair per tensor.
// Other float32 tensors (biases, norms) are averaged as in FedAvg; other dtypes take the maximum.
// r_t rises from fraction_start to fraction_end (linear) over ramp_rounds, or stays at
// fraction_start (constant). At r = 1 this is FedAvg; at r = 0 the global does not move.
#include <concord/aggregator.h>
#include <concord/error.h>

#include <fftw3.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "aggregation.h"

namespace concord {
namespace {

constexpr const char* kName = "fourier";

class Fourier : public Aggregator {
 public:
  Fourier(const Args& args, const BuildContext&)
      : start_(args.real("fraction_start")),
        end_(args.real("fraction_end")),
        linear_(args.str("schedule") == "linear"),
        ramp_(args.integer("ramp_rounds")),
        min_ndim_(args.str("apply_to") == "conv" ? 3 : 2),
        weighting_(args.str("weighting")) {
    // FFTW's planner is not re-entrant; other plugins in the process may plan concurrently.
    static std::once_flag once;
    std::call_once(once, [] { fftwf_make_planner_thread_safe(); });
  }

  // r_t: the fraction of each frequency axis that is averaged in round `round`.
  double fraction(const RoundInfo& round) const {
    if (!linear_) return start_;
    const int64_t ramp = ramp_ > 0 ? ramp_ : round.rounds;
    if (ramp <= 1) return end_;
    const double t = std::clamp((round.round - 1) / double(ramp - 1), 0.0, 1.0);
    return start_ + (end_ - start_) * t;
  }

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure(kName, global, updates, round);
    NamedArrays out;
    const auto used = agg::weighted_mean(
        kName, global, updates, agg::base_weights(kName, weighting_, updates, round), round,
        agg::initial_selection(kName, global, updates, round), out);
    if (used.empty()) return out;
    const double r = fraction(round);
    spdlog::debug("{}: round {}: low-frequency fraction {:.4f}", kName, round.round, r);
    for (const auto& [name, g] : global)
      if (g.dtype() == DType::F32 && static_cast<int>(g.shape().size()) >= min_ndim_)
        keep_low_frequencies(g, out.at(name), r);
    return out;
  }

 private:
  static void keep_low_frequencies(const Array& global, Array& mean, double r) {
    const int64_t rows = global.shape()[0];
    if (rows == 0 || global.numel() == 0) return;
    const int64_t cols = global.numel() / rows;
    const int64_t ku = std::min<int64_t>(rows, static_cast<int64_t>(std::ceil(r * rows - 1e-9)));
    const int64_t kv = std::min<int64_t>(cols, static_cast<int64_t>(std::ceil(r * cols - 1e-9)));
    const float* g = global.data<float>();
    float* x = mean.data<float>();
    const int64_t n = global.numel();
    if (ku == rows && kv == cols) return;  // everything shared: the plain mean
    if (ku == 0 || kv == 0) {              // nothing shared: the previous global
      std::copy(g, g + n, x);
      return;
    }
    std::vector<float> delta(n), coef(n);
    for (int64_t k = 0; k < n; ++k) delta[k] = x[k] - g[k];
    fftwf_plan forward = fftwf_plan_r2r_2d(int(rows), int(cols), delta.data(), coef.data(),
                                           FFTW_REDFT10, FFTW_REDFT10, FFTW_ESTIMATE);
    fftwf_plan inverse = fftwf_plan_r2r_2d(int(rows), int(cols), coef.data(), delta.data(),
                                           FFTW_REDFT01, FFTW_REDFT01, FFTW_ESTIMATE);
    if (!forward || !inverse) throw Error("fourier: FFTW could not plan a DCT");
    fftwf_execute(forward);
    for (int64_t u = 0; u < rows; ++u)
      for (int64_t v = (u < ku ? kv : 0); v < cols; ++v) coef[u * cols + v] = 0.0f;
    fftwf_execute(inverse);
    fftwf_destroy_plan(forward);
    fftwf_destroy_plan(inverse);
    // DCT-III after DCT-II scales by 2R * 2C in FFTW's unnormalised convention.
    const float scale = 1.0f / static_cast<float>(4 * rows * cols);
    for (int64_t k = 0; k < n; ++k) x[k] = g[k] + delta[k] * scale;
  }

  double start_, end_;
  bool linear_;
  int64_t ramp_;
  int min_ndim_;
  std::string weighting_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-fourier", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Aggregator,
       kName,
       "Progressive Fourier aggregation: average the low DCT frequencies of conv kernels, keep "
       "the rest from the previous global",
       {ArgSpec::real("fraction_start", 0.25,
                      "Low-frequency fraction of each axis averaged in round 1")
            .range(0, 1),
        ArgSpec::real("fraction_end", 1.0, "Fraction reached at the end of the ramp").range(0, 1),
        ArgSpec::choice("schedule", {"linear", "constant"}, "linear",
                        "linear: fraction_start to fraction_end over ramp_rounds; constant: "
                        "fraction_start every round"),
        ArgSpec::integer("ramp_rounds", 0, "Rounds of the linear ramp (0 = the planned rounds)")
            .range(0, 1000000),
        ArgSpec::choice("apply_to", {"conv", "matrices"}, "conv",
                        "Tensors filtered in frequency: conv kernels (ndim >= 3) or also 2-D "
                        "weights"),
        ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                        "Weight sites by training samples, or equally")},
       factory_of<Fourier>()});
}
