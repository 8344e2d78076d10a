// Seeds and portable samplers: every random choice in Concord flows from the pipeline's seed
// through derive_seed() (or mix_seed() for numeric labels), and is drawn with the samplers
// below, never with std::*_distribution or std::shuffle: their algorithms are left to each
// standard library, so their results differ between toolchains, and sites built on different
// machines must make the same choices.
//
// Portability: derive_seed, mix_seed, SeededRandom, uniform01, uniform_below and shuffle use
// integer arithmetic and exact conversions only: the same numbers on every platform. The
// standard normal (Box-Muller) also calls std::log, std::sqrt, std::cos and std::sin: sqrt is
// exact by IEEE 754, the others may differ in the last bit between math libraries.
// tests/seed pins the exact outputs for fixed seeds.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace concord {

// A seed for one purpose: `label` names it ("select", "shuffle/<site>", "partition", ...) and
// `n` numbers it (a round, ...). FNV-1a of the label, combined with seed and n, mixed by
// splitmix64's finaliser.
uint64_t derive_seed(uint64_t seed, const std::string& label, int64_t n = 0);
// A seed derived from `a` and a numeric label `b` (splitmix64 step b + 1 from a).
uint64_t mix_seed(uint64_t a, uint64_t b);

// xoshiro256** (Blackman and Vigna), seeded by mix_seed: a small, fast engine whose output is
// the same everywhere. Any engine producing 64 random bits per call works with the samplers
// (std::mt19937_64 too: the standard specifies its output sequence).
class SeededRandom {
 public:
  using result_type = uint64_t;
  static constexpr uint64_t min() { return 0; }
  static constexpr uint64_t max() { return std::numeric_limits<uint64_t>::max(); }

  explicit SeededRandom(uint64_t seed);
  uint64_t next();  // raw 64 bits
  uint64_t operator()() { return next(); }
  double uniform();                      // [0, 1), 53 bits
  double uniform(double lo, double hi);  // [lo, hi)
  int64_t below(int64_t n);              // integer in [0, n), n > 0
  double normal();                       // standard normal (Box-Muller)
  double gamma(double shape);            // Gamma(shape, 1) (Marsaglia-Tsang)
  std::vector<double> dirichlet(double alpha, int k);
  template <class T>
  void shuffle(std::vector<T>& v);

 private:
  uint64_t state_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

// ---- samplers over any engine G returning 64 uniformly random bits per call ----------------

template <class G>
constexpr void require_64_bit_engine() {
  static_assert(G::min() == 0 && G::max() == std::numeric_limits<uint64_t>::max(),
                "the samplers need an engine returning 64 random bits per call");
}

// Uniform in [0, 1): the top 53 bits of one draw.
template <class G>
double uniform01(G& g) {
  require_64_bit_engine<G>();
  return double(uint64_t(g()) >> 11) * 0x1.0p-53;
}

// Uniform integer in [0, n), n > 0, without modulo bias: draws at or above the largest multiple
// of n are rejected (fewer than one in two draws, usually none).
template <class G>
uint64_t uniform_below(G& g, uint64_t n) {
  require_64_bit_engine<G>();
  if (n == 0) throw std::invalid_argument("uniform_below: n must be positive");
  const uint64_t top = std::numeric_limits<uint64_t>::max();
  const uint64_t limit = top - top % n;
  uint64_t x;
  do x = uint64_t(g());
  while (x >= limit);
  return x % n;
}

// Fisher-Yates from the back: v[i] swaps with v[uniform_below(i + 1)], i = size - 1 .. 1.
template <class T, class G>
void shuffle(std::vector<T>& v, G& g) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[size_t(uniform_below(g, i))]);
}

// Box-Muller on two uniform01 draws (u1 redrawn while 0): yields cos then sin of one pair.
template <class G>
double box_muller(G& g, double& spare, bool& has_spare) {
  if (has_spare) {
    has_spare = false;
    return spare;
  }
  double u1;
  do u1 = uniform01(g);
  while (u1 <= 0);
  const double u2 = uniform01(g);
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2 * 3.14159265358979323846 * u2;
  spare = r * std::sin(theta);
  has_spare = true;
  return r * std::cos(theta);
}

// Standard normal draws from `g` (the same sequence SeededRandom::normal gives).
template <class G>
class StandardNormal {
 public:
  explicit StandardNormal(G& g) : g_(g) {}
  double operator()() { return box_muller(g_, spare_, has_spare_); }

 private:
  G& g_;
  double spare_ = 0;
  bool has_spare_ = false;
};

template <class T>
void SeededRandom::shuffle(std::vector<T>& v) {
  concord::shuffle(v, *this);
}

}  // namespace concord
