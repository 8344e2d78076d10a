// derive_seed, mix_seed and SeededRandom (see seed.h).
#include <concord/error.h>
#include <concord/seed.h>

#include <algorithm>

namespace concord {

namespace {
// splitmix64's finaliser (Steele, Lea and Flood; Stafford's mix 13).
uint64_t finalise(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;  // 2^64 / golden ratio: splitmix64's step
}  // namespace

uint64_t derive_seed(uint64_t seed, const std::string& label, int64_t n) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a: stable everywhere, unlike std::hash
  for (unsigned char c : label) h = (h ^ c) * 1099511628211ull;
  return finalise(seed ^ h ^ (uint64_t(n) * kGolden));
}

uint64_t mix_seed(uint64_t a, uint64_t b) {
  return finalise(a + kGolden * (b + 1));
}

SeededRandom::SeededRandom(uint64_t seed) {
  uint64_t s = seed;
  for (auto& x : state_) {
    s = mix_seed(s, 0x5eed);
    x = s;
  }
  if (!(state_[0] | state_[1] | state_[2] | state_[3])) state_[0] = 1;
}

static inline uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

uint64_t SeededRandom::next() {
  const uint64_t result = rotl(state_[1] * 5, 7) * 9;
  const uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

double SeededRandom::uniform() {
  return uniform01(*this);
}
double SeededRandom::uniform(double lo, double hi) {
  return lo + (hi - lo) * uniform();
}

int64_t SeededRandom::below(int64_t n) {
  if (n <= 0) throw Error("SeededRandom::below: n must be positive, got " + std::to_string(n));
  return int64_t(uniform_below(*this, uint64_t(n)));
}

double SeededRandom::normal() {
  return box_muller(*this, spare_, has_spare_);
}

double SeededRandom::gamma(double shape) {
  if (!(shape > 0)) throw Error("SeededRandom::gamma: shape must be > 0");
  if (shape < 1) {  // Gamma(a) = Gamma(a + 1) * U^(1/a)
    double u;
    do u = uniform();
    while (u <= 0);
    return gamma(shape + 1) * std::pow(u, 1.0 / shape);
  }
  const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9 * d);
  for (;;) {
    double x, v;
    do {
      x = normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = uniform();
    if (u < 1 - 0.0331 * x * x * x * x) return d * v;
    if (u > 0 && std::log(u) < 0.5 * x * x + d * (1 - v + std::log(v))) return d * v;
  }
}

std::vector<double> SeededRandom::dirichlet(double alpha, int k) {
  std::vector<double> p(k);
  double sum = 0;
  for (auto& x : p) sum += (x = gamma(alpha));
  if (sum <= 0) {  // every draw underflowed (tiny alpha): all mass on one category
    std::fill(p.begin(), p.end(), 0.0);
    p[below(k)] = 1;
    return p;
  }
  for (auto& x : p) x /= sum;
  return p;
}

}  // namespace concord
