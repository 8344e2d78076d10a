// Making federations out of one dataset: partitioning into sites and per-site scanner shift.
#pragma once

#include <concord/image.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace concord {

struct PartitionSpec {
  std::string scheme = "none";  // none | iid | dirichlet | quantity
  int sites = 4;
  double alpha = 0.5;   // dirichlet: label concentration; quantity: size concentration
  int min_samples = 8;  // each site gets at least this many training samples
};

// Splits every site's train and test samples of `pooled` (usually one source) into
// spec.sites sites named site-1 .. site-N. Deterministic in `seed`. "none" returns the input.
// A draw leaving a site below min_samples is redrawn (100 tries), then rebalanced by moving
// random samples from the largest site; the test split reuses the accepted proportions.
// notes["partition"] gets the sizes and label histograms (JSON).
Federation partition(Federation pooled, const PartitionSpec& spec, uint64_t seed);

// A site's acquisition signature (all deterministic in seed and site index).
struct ScannerSignature {
  double gamma = 1;           // intensity exponent (on [0,1]-normalised intensities)
  double contrast = 1;        // multiplicative
  double brightness = 0;      // additive
  double bias_amplitude = 0;  // smooth multiplicative bias field amplitude
  uint64_t bias_seed = 0;     // shape of the bias field
  double noise_sigma = 0;     // Gaussian noise std
  double blur_sigma = 0;      // Gaussian blur (pixels)
  double lowfreq_scale = 1;   // scaling of the low-frequency amplitude spectrum
  std::string json() const;
};

// strength 0 gives the identity signature; 1 a strong, visible shift.
ScannerSignature site_signature(uint64_t seed, int site_index, double strength);
// Applies the signature in place; noise drawn from `noise_seed`.
void apply_signature(Image& image, const ScannerSignature& sig, uint64_t noise_seed);
// Applies a per-site signature to every image of every site (keeps `reference` untouched
// when set; records the parameters in federation.notes["scanner.<site>"]).
void apply_scanner_shift(Federation& federation, double strength, uint64_t seed);

// Seed derivation and a portable random source. std::*_distribution results differ between
// standard libraries; these samplers (xoshiro256** underneath) give the same numbers everywhere.
uint64_t mix_seed(uint64_t a, uint64_t b);  // splitmix64 of a combined with b
class SeededRandom {
 public:
  explicit SeededRandom(uint64_t seed);
  uint64_t next();                       // raw 64 bits
  double uniform();                      // [0, 1)
  double uniform(double lo, double hi);  // [lo, hi)
  int64_t below(int64_t n);              // integer in [0, n), n > 0
  double normal();                       // standard normal (Box-Muller)
  double gamma(double shape);            // Gamma(shape, 1) (Marsaglia-Tsang)
  std::vector<double> dirichlet(double alpha, int k);
  template <class T>
  void shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (int64_t i = int64_t(v.size()) - 1; i > 0; --i) std::swap(v[i], v[below(i + 1)]);
  }

 private:
  uint64_t state_[4];  // xoshiro256** state
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace concord
