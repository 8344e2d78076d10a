// The reference style as weights: a small unconditional DCGAN-style generator (Radford et al.,
// ICLR 2016) that the reference site trains on its own images. Other sites receive only its
// generator weights (shared_state) and sample reference-style images locally to train their
// CycleGAN (cyclegan.h); no image leaves the reference site.
//
//   generator      z (latent) -> linear to 4x4 -> [nearest 2x upsample, 3x3 conv, GroupNorm, ReLU]
//                  per doubling -> 3x3 conv -> tanh. Upsample + conv instead of transposed
//                  convolution: no checkerboard artefacts and LibTorch's CPU transposed
//                  convolution is slow. GroupNorm instead of BatchNorm: sampling needs no
//                  running statistics.
//   discriminator  [4x4 stride-2 conv, LeakyReLU 0.2] down to 4x4, then a 4x4 conv to one
//                  logit; no normalisation, so per-sample gradients (DP-SGD) are well defined.
//   loss           non-saturating GAN loss (binary cross-entropy on logits); Adam 2e-4, beta1 0.5.
//
// Optional DP-SGD (Abadi et al., CCS 2016) on the discriminator, the only network that touches
// the reference site's images: each sample's gradient is clipped to L2 norm `dp_clip`, the sum
// gets Gaussian noise of std dp_noise * dp_clip, then divided by the batch size. The generator
// learns only through the discriminator (post-processing). privacy_settings() returns what a
// run must log; no epsilon is computed here (batches are shuffled, not Poisson-sampled: an
// accountant should treat the figures as an approximation).
#pragma once

#include "cyclegan.h"

namespace concord::cyclegan {

struct StyleGanOptions {
  int64_t channels = 1;
  int64_t size = 64;  // square images, a power of two in [8, 512]
  int64_t latent = 64;
  int64_t ngf = 32;  // channels at full resolution; doubled per halving, capped at 8 * ngf
  int64_t ndf = 32;
  int64_t batch_size = 16;
  double lr = 2e-4;
  double beta1 = 0.5;
  double dp_clip = 0;   // > 0 turns DP-SGD on
  double dp_noise = 0;  // noise multiplier sigma (std = sigma * clip)
  void validate() const;
};

struct StyleGanLosses {
  double g = 0;
  double d = 0;
  int64_t steps = 0;
};

class StyleGan {
 public:
  StyleGan(const StyleGanOptions& options, uint64_t seed);
  ~StyleGan();
  StyleGan(const StyleGan&) = delete;
  StyleGan& operator=(const StyleGan&) = delete;

  const StyleGanOptions& options() const;
  // The reference site's intensity window (fit_site_range of its images); travels with the
  // generator in shared_state so samples come back in the reference site's intensities.
  void set_range(const Range& range);
  const Range& range() const;

  // One pass over `images` (2D, or 3D volumes slice by slice; every slice size x size) in
  // batches of batch_size, shuffled by `rng`; noise also drawn from seeds of `rng`.
  StyleGanLosses train_epoch(const std::vector<Image>& images, SeededRandom& rng);
  // `n` reference-style 2D images (size x size) in the reference site's intensities.
  std::vector<Image> sample(int64_t n, SeededRandom& rng) const;

  // "style_g.*" and "style_range/lo|hi": what other sites receive.
  NamedArrays shared_state() const;
  void load_shared_state(const NamedArrays& state);
  // "style_d.*", "adam_g/*", "adam_d/*", "epochs_done": stays at the reference site.
  NamedArrays local_state() const;
  void load_local_state(const NamedArrays& state);

  // dp_enabled, dp_clip, dp_noise_multiplier, batch_size, dataset_size, sample_rate, steps:
  // for the run's log (metrics.jsonl) so that epsilon can be accounted offline.
  std::map<std::string, double> privacy_settings() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace concord::cyclegan
