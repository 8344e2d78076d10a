// CycleGAN between one site's images and the reference site's style (Zhu et al., ICCV 2017;
// used for federated harmonization by Yan et al., "Variation-aware federated learning with
// multi-source decentralized medical image data", IEEE JBHI 2021).
//
// One SiteTrainer lives at each non-reference site. Domain A is the site's own images, domain B
// the reference style (images sampled locally from the reference site's StyleGan, style_gan.h):
//   g_site2ref  G_A: site -> reference   the only part that may leave the site (shared_state)
//   g_ref2site  G_B: reference -> site   local
//   d_ref       D_A: judges reference-style images (real B vs G_A's output), local
//   d_site      D_B: judges site-style images, local
// plus both Adam optimizers' moments, the two 50-image history pools and the epoch counter, all
// local (local_state), so a round-by-round run can be checkpointed and resumed bit-identically.
//
// Torch-free header (pimpl): the engine-side plugin code that holds a SiteTrainer does not pay
// for LibTorch headers.
#pragma once

#include <concord/array.h>
#include <concord/image.h>
#include <concord/seed.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace concord::cyclegan {

// Defaults: the reference's hyper-parameters with widths sized for CPU (ngf = ndf = 32 instead
// of 64). The schedule is the reference's "linear" policy: lr constant for `epochs_constant`
// epochs, then linearly to ~0 over `epochs_decay` epochs (counted by the trainer across calls).
struct Options {
  int64_t channels = 1;
  int64_t ngf = 32;
  int64_t ndf = 32;
  int64_t n_blocks = 6;
  int64_t n_layers_d = 3;
  double lambda_cycle = 10;      // lambda_A = lambda_B
  double lambda_identity = 0.5;  // identity weight = lambda_identity * lambda_cycle; 0 disables
  int64_t pool_size = 50;        // history of generated images shown to the discriminators
  double lr = 2e-4;
  double beta1 = 0.5;
  double beta2 = 0.999;
  int64_t epochs_constant = 10;
  int64_t epochs_decay = 10;
  int64_t batch_size = 1;  // the reference trains with batch 1
  // How images map to [-1, 1] (generative_common.h): per site (a percentile range fitted on the
  // site's own images, set with set_ranges) or per image (each image's own percentiles).
  bool per_image_intensity = false;
  // Throws Error naming the field when a value is out of range.
  void validate() const;
};

// Mean losses of one epoch (per step), as the reference reports them.
struct Losses {
  double g = 0;         // total generator loss
  double g_gan = 0;     // LSGAN terms of both generators
  double cycle = 0;     // lambda * (|G_B(G_A(a)) - a| + |G_A(G_B(b)) - b|)
  double identity = 0;  // lambda * lambda_identity * (|G_A(b) - b| + |G_B(a) - a|)
  double d = 0;         // D_A + D_B, each 0.5 * (MSE(D(real), 1) + MSE(D(fake), 0))
  int64_t steps = 0;
  double lr = 0;  // learning rate used during the epoch
};

// A linear intensity window [lo, hi] -> [-1, 1] (generative_common.h's IntensityRange).
struct Range {
  float lo = 0;
  float hi = 1;
};

// The percentile window of a site's images (every slice and channel), lower/upper in [0, 100].
Range fit_site_range(const std::vector<Image>& images, double lower = 0.5, double upper = 99.5);

class SiteTrainer {
 public:
  // Initialises the four networks with the reference's N(0, 0.02) init from seeds derived from
  // `seed` ("cyclegan/g_site2ref", ...). Sites that must start from the same shared generator
  // (federated sharing) pass the same seed, or load the global shared state before training.
  SiteTrainer(const Options& options, uint64_t seed);
  ~SiteTrainer();
  SiteTrainer(const SiteTrainer&) = delete;
  SiteTrainer& operator=(const SiteTrainer&) = delete;

  const Options& options() const;
  // The intensity windows of the site's own images and of the reference-style images (per-site
  // mode). Defaults [0, 1] both. Kept in local_state.
  void set_ranges(const Range& site, const Range& reference);

  // One epoch of the reference's unaligned training: max(|own|, |reference|) / batch_size steps;
  // the own images in an order shuffled by `rng`, each paired with a reference image drawn
  // uniformly by `rng` (the reference's serial_batches = false). 3D volumes contribute each z
  // slice. All slices must share one size; H and W are reflection-padded to multiples of 4.
  // Throws Error when either set is empty.
  Losses train_epoch(const std::vector<Image>& own, const std::vector<Image>& reference,
                     SeededRandom& rng);
  int64_t epochs_done() const;

  // "g_site2ref.<param>": the shareable generator (site -> reference).
  NamedArrays shared_state() const;
  void load_shared_state(const NamedArrays& state);
  // Everything else: "g_ref2site.*", "d_ref.*", "d_site.*", "adam_g/*", "adam_d/*",
  // "pool_ref/NN", "pool_site/NN", "epochs_done", "range_site/lo|hi", "range_ref/lo|hi".
  NamedArrays local_state() const;
  void load_local_state(const NamedArrays& state);

  // Site -> reference style (G_A). 2D images and 3D volumes (slice by slice along z); geometry,
  // meta and pixel type are kept, only the values change. Per-site mode maps back through the
  // reference range.
  Image translate(const Image& image) const;
  // Reference -> site style (G_B), for inspection and tests.
  Image translate_back(const Image& image) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Only the site -> reference generator: what a site's `apply` needs after training, built from
// shared_state() (or the federated average of it). Thread-compatible: translate() is const.
class Translator {
 public:
  // `state` holds "g_site2ref.*" entries (Error names the missing or mismatched entry).
  // `in`: the site's window, `out`: the reference window (per-site mode; ignored per image).
  Translator(const Options& options, const NamedArrays& state, const Range& in, const Range& out);
  ~Translator();
  Translator(const Translator&) = delete;
  Translator& operator=(const Translator&) = delete;
  Image translate(const Image& image) const;
  // Slices per forward pass when translating a volume (memory vs speed; default 8).
  void set_slice_batch(int64_t n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace concord::cyclegan
