// Making federations out of one dataset: partitioning into sites and per-site scanner shift.
#pragma once

#include <concord/image.h>
#include <concord/seed.h>  // SeededRandom, mix_seed: used with these tools

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
  // follow: a site's test split follows its training split's proportions (label or size skew);
  // iid: the test split is dealt uniformly, so every site is tested on the pooled label mix
  // (the usual evaluation under label skew: a site's skew is its training data, not its task).
  std::string test = "follow";
};

// Splits every site's train and test samples of `pooled` (usually one source) into
// spec.sites sites named site-1 .. site-N. Deterministic in `seed`. "none" returns the input.
// A draw leaving a site below min_samples is redrawn (100 tries), then rebalanced by moving
// random samples from the largest site; the test split reuses the accepted proportions
// (test: follow) or is dealt uniformly (test: iid).
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

}  // namespace concord
