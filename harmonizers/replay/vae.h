// Conditional VAE for generative replay (Qu et al., "Handling data heterogeneity with generative
// replay in collaborative learning for medical imaging", Medical Image Analysis 2022): trained
// federatedly (its whole state is shareable, FedAvg by default), then each site decodes samples
// of any label (and site style) locally and mixes them into its task training. Samples are made
// on the site and never leave it.
//
//   encoder  [x, one-hot(label), one-hot(site)] as input planes -> 3 x (4x4 stride-2 conv,
//            LeakyReLU 0.2) -> linear to mu and log-variance (latent)
//   decoder  [z, one-hot(label), one-hot(site)] -> linear to 4*width x size/8 x size/8 ->
//            3 x (nearest 2x upsample, 3x3 conv, LeakyReLU) -> 3x3 conv, linear output (clamped
//            to [-1, 1] only when decoded to images: a tanh output saturated at the background
//            value early in training and the decoder stalled, measured on the test's bars)
//   loss     ELBO: 0.5 * sum((x - x_hat)^2) / sigma^2 + beta * KL(q(z|x, c) || N(0, I)), per
//            image, averaged over the batch (a Gaussian decoder of fixed std sigma in [-1, 1]
//            units). sigma = 1 by default: with sigma 0.1 the latent carried the class too and
//            the decoder ignored the label (conditional samples at chance); at sigma 1 a
//            classifier trained on real images labels 96% of the samples as requested.
// No normalisation layers: nothing site-specific hides in running statistics, so the averaged
// state means the same at every site.
//
// Images map to [-1, 1] through the intensity window [range_lo, range_hi] (clamped), agreed by
// the federation (e.g. from declared per-site percentiles); samples come back in that window.
// Torch-free header (pimpl).
#pragma once

#include <concord/array.h>
#include <concord/image.h>
#include <concord/seed.h>

#include <memory>
#include <string>
#include <vector>

namespace concord::replay {

struct VaeOptions {
  int64_t channels = 1;
  int64_t size = 64;  // square images, a multiple of 8 in [8, 512]
  int64_t num_classes = 2;
  int64_t num_sites = 0;  // > 0: also conditioned on the site index (its style)
  int64_t latent = 32;
  int64_t width = 32;
  double beta = 1.0;
  double sigma = 1.0;
  double lr = 1e-3;
  int64_t batch_size = 32;
  float range_lo = 0;
  float range_hi = 1;
  void validate() const;  // throws Error naming the field
};

struct VaeLosses {
  double loss = 0;   // mean negative ELBO per image
  double recon = 0;  // its reconstruction part
  double kl = 0;     // KL (before beta)
  int64_t steps = 0;
  int64_t samples = 0;
};

class ConditionalVae {
 public:
  ConditionalVae(const VaeOptions& options,
                 uint64_t seed);  // weights from derive_seed(seed, "vae")
  ~ConditionalVae();
  ConditionalVae(const ConditionalVae&) = delete;
  ConditionalVae& operator=(const ConditionalVae&) = delete;

  const VaeOptions& options() const;

  // One shuffled pass in batches; labels[i] in [0, num_classes) for images[i] (2D, size x size);
  // `sites` (same length, indices in [0, num_sites)) when num_sites > 0, else empty. Adam moments
  // persist across calls (optimizer_state). Error names the first bad image, label or site.
  VaeLosses train_epoch(const std::vector<Image>& images, const std::vector<int64_t>& labels,
                        SeededRandom& rng, const std::vector<int64_t>& sites = {});
  // One decoded sample per entry of `labels`, z ~ N(0, I) drawn from seeds of `rng`.
  std::vector<Image> sample(const std::vector<int64_t>& labels, SeededRandom& rng,
                            const std::vector<int64_t>& sites = {}) const;
  // Decoded posterior means (deterministic).
  std::vector<Image> reconstruct(const std::vector<Image>& images,
                                 const std::vector<int64_t>& labels,
                                 const std::vector<int64_t>& sites = {}) const;
  // Mean negative ELBO without training (z = mu, so deterministic), for validation.
  VaeLosses evaluate(const std::vector<Image>& images, const std::vector<int64_t>& labels,
                     const std::vector<int64_t>& sites = {}) const;

  // "vae.encoder.*", "vae.decoder.*": every weight (the shareable state).
  NamedArrays state() const;
  void load_state(const NamedArrays& state);
  // "adam/*": the optimizer's moments (local; keep them for bit-identical resume).
  NamedArrays optimizer_state() const;
  void load_optimizer_state(const NamedArrays& state);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace concord::replay
