// RDP accounting of the sampled Gaussian mechanism (see dp_accountant.h for the references).
#include <concord/dp_accountant.h>
#include <concord/error.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace concord::dp {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)) without overflow.
double log_add(double a, double b) {
  const double lo = std::min(a, b), hi = std::max(a, b);
  if (lo == -kInf) return hi;
  return std::log1p(std::exp(lo - hi)) + hi;
}

// log(exp(a) - exp(b)), a >= b.
double log_sub(double a, double b) {
  if (b == -kInf) return a;
  if (a <= b) return -kInf;  // a < b only by rounding in the series: the difference is 0
  const double d = a - b;
  if (d > 700) return a;  // expm1 would overflow; exp(b) is negligible next to exp(a)
  return std::log(std::expm1(d)) + b;
}

// log(erfc(x)); past x = 20 erfc underflows towards the subnormals, so the Laurent series at
// infinity is used there: log erfc(x) = -x^2 - log(x) - log(pi)/2 - 1/(2x^2) + 5/(8x^4) - ...
double log_erfc(double x) {
  if (x < 20) return std::log(std::erfc(x));
  const double x2 = x * x;
  return -0.5 * std::log(M_PI) - std::log(x) - x2 - 0.5 / x2 + 0.625 / (x2 * x2) -
         37.0 / 24.0 / (x2 * x2 * x2) + 353.0 / 64.0 / (x2 * x2 * x2 * x2);
}

// log(A_a) for integer a >= 2: log sum_{i=0..a} C(a, i) q^i (1-q)^(a-i) exp((i^2 - i) / (2 s^2)).
double log_a_integer(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  const double lq = std::log(q), l1q = std::log1p(-q), a = double(alpha);
  for (int64_t i = 0; i <= alpha; ++i) {
    const double di = double(i);
    const double log_binom = std::lgamma(a + 1) - std::lgamma(di + 1) - std::lgamma(a - di + 1);
    const double s = log_binom + di * lq + (a - di) * l1q + (di * di - di) / (2 * sigma * sigma);
    log_a = log_add(log_a, s);
  }
  return log_a;
}

// log(A_a) for fractional a > 1: the series of Mironov, Talwar, Zhang 2019 (Section 3.3), split
// at z0 = sigma^2 log(1/q - 1) + 1/2 into two sums of alternating-sign terms, until both terms
// fall below exp(-30).
double log_a_fractional(double q, double sigma, double alpha) {
  double log_a0 = -kInf, log_a1 = -kInf;
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  const double lq = std::log(q), l1q = std::log1p(-q), s2 = sigma * sigma;
  double log_coef = 0;  // log |C(alpha, i)|, by C(a, i) = C(a, i-1) (a - i + 1) / i
  bool positive = true;
  for (int64_t i = 0;; ++i) {
    if (i > 0) {
      const double f = alpha - double(i) + 1;
      log_coef += std::log(std::fabs(f)) - std::log(double(i));
      if (f < 0) positive = !positive;
    }
    if (i > 1000000)
      throw Error("RDP of the sampled Gaussian: the series at order " + std::to_string(alpha) +
                  " did not converge (q " + std::to_string(q) + ", sigma " + std::to_string(sigma) +
                  ")");
    const double di = double(i), j = alpha - di;
    const double log_t0 = log_coef + di * lq + j * l1q;
    const double log_t1 = log_coef + j * lq + di * l1q;
    const double log_e0 = std::log(0.5) + log_erfc((di - z0) / (M_SQRT2 * sigma));
    const double log_e1 = std::log(0.5) + log_erfc((z0 - j) / (M_SQRT2 * sigma));
    const double log_s0 = log_t0 + (di * di - di) / (2 * s2) + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / (2 * s2) + log_e1;
    if (positive) {
      log_a0 = log_add(log_a0, log_s0);
      log_a1 = log_add(log_a1, log_s1);
    } else {
      log_a0 = log_sub(log_a0, log_s0);
      log_a1 = log_sub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < -30) break;
  }
  return log_add(log_a0, log_a1);
}

void check_q_sigma(double q, double sigma) {
  if (!(q >= 0 && q <= 1))
    throw Error("privacy accountant: sampling rate q must be in [0, 1], got " + std::to_string(q));
  if (!(sigma >= 0) || !std::isfinite(sigma))
    throw Error("privacy accountant: noise multiplier must be finite and >= 0, got " +
                std::to_string(sigma));
}

void check_delta(double delta) {
  if (!(delta > 0 && delta < 1))
    throw Error("privacy accountant: delta must be in (0, 1), got " + std::to_string(delta));
}

}  // namespace

const std::vector<double>& default_orders() {
  static const std::vector<double> orders = [] {
    std::vector<double> o = {1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5};
    for (int a = 5; a < 64; ++a) o.push_back(a);
    o.insert(o.end(), {128, 256, 512});
    return o;
  }();
  return orders;
}

std::vector<double> opacus_orders() {
  std::vector<double> o;
  for (int x = 1; x < 100; ++x) o.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) o.push_back(a);
  return o;
}

double rdp_sampled_gaussian(double q, double sigma, double order) {
  check_q_sigma(q, sigma);
  if (!(order > 1))
    throw Error("privacy accountant: RDP orders must be > 1, got " + std::to_string(order));
  if (q == 0) return 0;
  if (sigma == 0) return kInf;
  if (std::isinf(order)) return kInf;
  if (q == 1) return order / (2 * sigma * sigma);
  const double log_a = order == std::floor(order) && order < 1e6
                           ? log_a_integer(q, sigma, int64_t(order))
                           : log_a_fractional(q, sigma, order);
  return log_a / (order - 1);
}

std::vector<double> rdp_sampled_gaussian(double q, double sigma, int64_t steps,
                                         const std::vector<double>& orders) {
  if (steps < 0)
    throw Error("privacy accountant: steps must be >= 0, got " + std::to_string(steps));
  std::vector<double> out;
  out.reserve(orders.size());
  for (double a : orders) out.push_back(rdp_sampled_gaussian(q, sigma, a) * double(steps));
  return out;
}

Epsilon epsilon_from_rdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                         double delta) {
  check_delta(delta);
  if (orders.size() != rdp.size() || orders.empty())
    throw Error("privacy accountant: " + std::to_string(orders.size()) + " orders but " +
                std::to_string(rdp.size()) + " RDP values");
  Epsilon best{kInf, orders.front()};
  for (size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i], r = rdp[i];
    if (!(a > 1)) throw Error("privacy accountant: RDP orders must be > 1");
    if (!(r >= 0)) throw Error("privacy accountant: RDP values must be >= 0");
    double eps;
    if (delta * delta + std::expm1(-r) > 0)
      eps = 0;  // delta <= sqrt(1 - exp(-KL)) already: nothing is spent at this delta
    else if (a > 1.01 && std::isfinite(r) && std::isfinite(a))
      eps = r + std::log1p(-1 / a) - std::log(delta * a) / (a - 1);
    else
      eps = kInf;  // the bound is numerically useless next to a = 1
    if (eps < best.epsilon) best = {eps, a};
  }
  best.epsilon = std::max(0.0, best.epsilon);
  return best;
}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)) {
  if (orders_.empty()) throw Error("privacy accountant: no RDP orders");
  for (double a : orders_)
    if (!(a > 1))
      throw Error("privacy accountant: RDP orders must be > 1, got " + std::to_string(a));
}

void RdpAccountant::step(double sigma, double q, int64_t count) {
  check_q_sigma(q, sigma);
  if (count < 1)
    throw Error("privacy accountant: step count must be >= 1, got " + std::to_string(count));
  if (!history_.empty() && history_.back().q == q && history_.back().sigma == sigma)
    history_.back().steps += count;
  else
    history_.push_back({q, sigma, count});
}

int64_t RdpAccountant::total_steps() const {
  int64_t n = 0;
  for (const auto& h : history_) n += h.steps;
  return n;
}

std::vector<double> RdpAccountant::rdp() const {
  std::vector<double> total(orders_.size(), 0.0);
  for (const auto& h : history_) {
    const auto r = rdp_sampled_gaussian(h.q, h.sigma, h.steps, orders_);
    for (size_t i = 0; i < total.size(); ++i) total[i] += r[i];
  }
  return total;
}

Epsilon RdpAccountant::epsilon(double delta) const {
  return epsilon_from_rdp(orders_, rdp(), delta);
}

Epsilon RdpAccountant::epsilon_after(double sigma, double q, int64_t count, double delta) const {
  RdpAccountant next = *this;
  next.step(sigma, q, count);
  return next.epsilon(delta);
}

void RdpAccountant::save(NamedArrays& out, const std::string& prefix) const {
  std::vector<double> q, sigma;
  std::vector<int64_t> steps;
  for (const auto& h : history_) {
    q.push_back(h.q);
    sigma.push_back(h.sigma);
    steps.push_back(h.steps);
  }
  const int64_t n = int64_t(history_.size());
  out[prefix + "orders"] = Array::from(orders_, {int64_t(orders_.size())});
  out[prefix + "q"] = Array::from(q, {n});
  out[prefix + "sigma"] = Array::from(sigma, {n});
  out[prefix + "steps"] = Array::from(steps, {n});
}

RdpAccountant RdpAccountant::load(const NamedArrays& in, const std::string& prefix) {
  auto get = [&](const std::string& key, DType dtype) -> const Array& {
    auto it = in.find(prefix + key);
    if (it == in.end())
      throw Error("privacy accountant state: entry '" + prefix + key + "' is missing");
    if (it->second.dtype() != dtype || it->second.shape().size() != 1)
      throw Error("privacy accountant state: entry '" + prefix + key + "' must be a " +
                  dtype_name(dtype) + " vector");
    return it->second;
  };
  const Array& orders = get("orders", DType::F64);
  const Array& q = get("q", DType::F64);
  const Array& sigma = get("sigma", DType::F64);
  const Array& steps = get("steps", DType::I64);
  if (q.numel() != sigma.numel() || q.numel() != steps.numel())
    throw Error("privacy accountant state under '" + prefix + "': q, sigma and steps differ in " +
                "length (" + std::to_string(q.numel()) + ", " + std::to_string(sigma.numel()) +
                ", " + std::to_string(steps.numel()) + ")");
  for (double a : orders.to_vector<double>())
    if (!(a > 1) || std::isnan(a))
      throw Error("privacy accountant state: entry '" + prefix + "orders' holds an order <= 1");
  RdpAccountant acc(orders.to_vector<double>());
  for (int64_t i = 0; i < q.numel(); ++i) {
    const double qi = q.data<double>()[i], si = sigma.data<double>()[i];
    const int64_t ni = steps.data<int64_t>()[i];
    if (!(qi >= 0 && qi <= 1) || !(si >= 0) || !std::isfinite(si) || ni < 1)
      throw Error("privacy accountant state under '" + prefix + "': history entry " +
                  std::to_string(i) + " is invalid (q " + std::to_string(qi) + ", sigma " +
                  std::to_string(si) + ", steps " + std::to_string(ni) + ")");
    acc.history_.push_back({qi, si, ni});  // kept as saved: no merging, the curve is the same
  }
  return acc;
}

double noise_multiplier_for(double target_epsilon, double delta, double q, int64_t steps,
                            const std::vector<double>& orders, double epsilon_tolerance) {
  check_delta(delta);
  if (!(target_epsilon > 0) || !std::isfinite(target_epsilon))
    throw Error("privacy accountant: target epsilon must be finite and > 0, got " +
                std::to_string(target_epsilon));
  if (!(epsilon_tolerance > 0)) throw Error("privacy accountant: epsilon tolerance must be > 0");
  auto eps = [&](double sigma) {
    return epsilon_from_rdp(orders, rdp_sampled_gaussian(q, sigma, steps, orders), delta).epsilon;
  };
  constexpr double kMaxSigma = 1e6;
  double sigma_low = 0, sigma_high = 10, eps_high = kInf;
  while (eps_high > target_epsilon) {
    sigma_high *= 2;
    if (sigma_high > kMaxSigma)
      throw Error("privacy accountant: no noise multiplier up to 1e6 keeps " +
                  std::to_string(steps) + " steps at q " + std::to_string(q) + " within epsilon " +
                  std::to_string(target_epsilon) + " at delta " + std::to_string(delta));
    eps_high = eps(sigma_high);
  }
  for (int it = 0; it < 200 && target_epsilon - eps_high > epsilon_tolerance; ++it) {
    const double sigma = (sigma_low + sigma_high) / 2;
    const double e = eps(sigma);
    if (e < target_epsilon) {
      sigma_high = sigma;
      eps_high = e;
    } else {
      sigma_low = sigma;
    }
  }
  return sigma_high;
}

}  // namespace concord::dp
