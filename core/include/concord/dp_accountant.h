// Privacy accounting for the (Poisson-)sampled Gaussian mechanism with Renyi differential privacy
// (Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar, Zhang, "Renyi Differential
// Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, 2019), as Opacus and
// TF-Privacy / dp_accounting compute it:
//
//   one step: a subset is sampled with probability q per member (Poisson), the clipped sum gets
//   N(0, (sigma C)^2) noise; its RDP at order a is log(A_a) / (a - 1), A_a computed in log space
//   (integer a: the binomial sum exactly; fractional a: the two-sided erfc series);
//   composition: RDP adds over steps, at every order of the grid, for any mix of (q, sigma);
//   (epsilon, delta): the tight conversion of Balle, Barthe, Gaboardi, Hsu, Sato, "Hypothesis
//   Testing Interpretations and Renyi Differential Privacy", AISTATS 2020 (Proposition 12 in
//   v4; the one Opacus's get_privacy_spent and dp_accounting use), minimised over the orders.
//
// Torch-free; the history (q, sigma, steps) saves to and loads from NamedArrays for checkpoints.
// docs/privacy.md says what q means at client and sample level and how to choose a budget.
#pragma once

#include <concord/array.h>

#include <cstdint>
#include <string>
#include <vector>

namespace concord::dp {

// The order grid of TF-Privacy's compute_dp_sgd_privacy and dp_accounting:
// 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, ..., 63, 128, 256, 512.
const std::vector<double>& default_orders();
// Opacus's RDPAccountant grid: 1.1, 1.2, ..., 10.9, 12, 13, ..., 63.
std::vector<double> opacus_orders();

// RDP at `order` (> 1, may be +inf) of one step of the Poisson-sampled Gaussian mechanism with
// sampling rate q in [0, 1] and noise multiplier sigma >= 0 (noise std / L2 sensitivity).
// q = 0: 0; sigma = 0 (q > 0): +inf; q = 1: order / (2 sigma^2).
double rdp_sampled_gaussian(double q, double sigma, double order);
// `steps` such steps, at every order (composition: the RDP adds).
std::vector<double> rdp_sampled_gaussian(double q, double sigma, int64_t steps,
                                         const std::vector<double>& orders);

struct Epsilon {
  double epsilon = 0;  // >= 0; +inf when no order gives a finite bound
  double order = 0;    // the order attaining it
};
// The smallest epsilon such that (epsilon, delta)-DP follows from the RDP curve (rdp[i] at
// orders[i]), by Balle et al. 2020: eps = rdp + log1p(-1/a) - log(delta a) / (a - 1), with
// eps = 0 where delta^2 + expm1(-rdp) > 0 (the KL bound); orders at or below 1.01 are skipped.
// delta in (0, 1).
Epsilon epsilon_from_rdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                         double delta);

// One entry of the history: `steps` consecutive steps at (q, sigma).
struct PrivacyStep {
  double q = 0;
  double sigma = 0;
  int64_t steps = 0;
};

class RdpAccountant {
 public:
  explicit RdpAccountant(std::vector<double> orders = default_orders());

  // Records `count` steps at sampling rate q and noise multiplier sigma (merged into the last
  // entry when (q, sigma) are the same).
  void step(double sigma, double q, int64_t count = 1);
  const std::vector<PrivacyStep>& history() const { return history_; }
  const std::vector<double>& orders() const { return orders_; }
  int64_t total_steps() const;

  // The composed RDP curve, one value per order.
  std::vector<double> rdp() const;
  // epsilon spent so far at `delta` (0 with an empty history).
  Epsilon epsilon(double delta) const;
  // epsilon if `count` more steps at (q, sigma) were taken: to refuse a round that would exceed a
  // budget before running it.
  Epsilon epsilon_after(double sigma, double q, int64_t count, double delta) const;

  // The history as arrays `<prefix>orders`, `<prefix>q`, `<prefix>sigma` (float64) and
  // `<prefix>steps` (int64), for a checkpoint.
  void save(NamedArrays& out, const std::string& prefix) const;
  // The accountant saved under `prefix`. Untrusted input: every array is checked (present,
  // dtype, matching lengths, q in [0, 1], sigma finite >= 0, steps >= 1, orders > 1) and an
  // Error names the entry at fault.
  static RdpAccountant load(const NamedArrays& in, const std::string& prefix);

 private:
  std::vector<double> orders_;
  std::vector<PrivacyStep> history_;
};

// The smallest noise multiplier (up to the bisection's tolerance) for which `steps` steps at
// sampling rate q stay within (target_epsilon, delta): Opacus's get_noise_multiplier (bracket
// [0, 10] doubled until it holds, then bisection until target_epsilon - epsilon <=
// epsilon_tolerance). The answer always satisfies epsilon <= target_epsilon. Throws Error when
// no sigma up to 1e6 suffices.
double noise_multiplier_for(double target_epsilon, double delta, double q, int64_t steps,
                            const std::vector<double>& orders = default_orders(),
                            double epsilon_tolerance = 0.01);

}  // namespace concord::dp
