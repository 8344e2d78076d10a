// Shared machinery of the learned harmonizers (harmonizers/cyclegan, harmonizers/replay): a
// private seeded LibTorch generator per purpose, the reference initialisation, network and Adam
// state as concord::NamedArrays (what the engine stores, checkpoints and ships), and the
// documented intensity mapping between concord::Image and tensors in [-1, 1].
//
// Includes LibTorch headers: include it only from the generative libraries' own sources.
#pragma once

#include <concord/array.h>
#include <concord/image.h>
#include <concord/seed.h>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Adam;
}

namespace concord::generative {

// A CPU generator of its own, seeded from `seed`: the global LibTorch generator is never used,
// so weights and noise depend only on the seeds the caller derives (concord/seed.h).
at::Generator make_generator(uint64_t seed);

// The CycleGAN/DCGAN reference initialisation ("normal", gain 0.02): convolution and linear
// weights N(0, gain), normalisation scales N(1, gain), biases 0, drawn from `gen` in the
// module's parameter order.
void init_normal(torch::nn::Module& module, at::Generator& gen, double gain = 0.02);

// Every parameter and buffer of `module` as "<prefix><dotted name>": deep float32 copies, so the
// result stays valid while training goes on.
void export_module(const torch::nn::Module& module, const std::string& prefix, NamedArrays& out);
// Copies the "<prefix>..." entries of `in` into `module`. Throws Error naming `what` and the
// entry when one is missing, has another shape or dtype, or holds a non-finite value.
void import_module(torch::nn::Module& module, const std::string& prefix, const NamedArrays& in,
                   const std::string& what);

// Adam's per-parameter moments as "<prefix><param>/exp_avg", ".../exp_avg_sq", ".../step"
// (parameters without state yet are skipped), and back. Import replaces the whole state of
// `adam`; entries for the listed parameters must be complete or absent.
using NamedParameters = std::vector<std::pair<std::string, at::Tensor>>;
void export_adam(torch::optim::Adam& adam, const NamedParameters& params, const std::string& prefix,
                 NamedArrays& out);
void import_adam(torch::optim::Adam& adam, const NamedParameters& params, const std::string& prefix,
                 const NamedArrays& in, const std::string& what);
void set_adam_lr(torch::optim::Adam& adam, double lr);
// The parameters of `module` named "<prefix><dotted name>".
NamedParameters named_parameters(const torch::nn::Module& module, const std::string& prefix);

// A non-negative counter (epochs, steps) as one i64 array, and back (Error names `what` and
// `name` when it is missing, of another type or negative).
void export_count(int64_t value, const std::string& name, NamedArrays& out);
int64_t import_count(const NamedArrays& in, const std::string& name, const std::string& what);

// ---- intensity mapping ---------------------------------------------------------------------
// An image's values map linearly from [lo, hi] to [-1, 1] (clamped) before a network sees them,
// and a network's output maps back the same way. The range is either fitted per site over all
// its training images (the default: intensity differences between images of one site survive)
// or per image.
struct IntensityRange {
  float lo = 0;
  float hi = 1;
};
enum class IntensityMode { PerSite, PerImage };
// The `lower` and `upper` percentiles (in [0, 100]) of the voxels of `images` (every channel,
// every slice). At most ~1M voxels are looked at (a fixed stride), so the cost is bounded and
// the result deterministic. A constant input gives hi = lo + 1.
IntensityRange fit_range(const std::vector<const Image*>& images, double lower = 0.5,
                         double upper = 99.5);
IntensityRange fit_range(const Image& image, double lower = 0.5, double upper = 99.5);
// Serialised as two arrays "<prefix>lo" and "<prefix>hi" (scalars in shape [1]).
void export_range(const IntensityRange& range, const std::string& prefix, NamedArrays& out);
IntensityRange import_range(const NamedArrays& in, const std::string& prefix,
                            const std::string& what);

// Slices [z0, z0 + count) of `image` (2D: z0 = 0, count = 1) as a [count, C, H, W] tensor in
// [-1, 1] through `range`.
at::Tensor slices_to_unit(const Image& image, int64_t z0, int64_t count,
                          const IntensityRange& range);
// Writes a [count, C, H, W] tensor in [-1, 1] back into slices [z0, z0 + count) of `image`
// through `range` (the inverse map, no clamping beyond the tensor's own range).
void unit_to_slices(const at::Tensor& unit, Image& image, int64_t z0, const IntensityRange& range);
// Every 2D slice of every image (3D volumes give one per z) as one [N, C, H, W] tensor in
// [-1, 1]; all slices must share C, H and W (Error names `what` and the first mismatch).
at::Tensor stack_slices(const std::vector<Image>& images, IntensityMode mode,
                        const IntensityRange& site_range, const std::string& what);
// Reflection-pads a [N, C, H, W] tensor at the bottom/right to multiples of `multiple`.
at::Tensor pad_to_multiple(const at::Tensor& x, int64_t multiple);

// A 2D Image (dim 2, C channels, H x W) from one [C, H, W] tensor in [-1, 1] through `range`.
Image unit_to_image(const at::Tensor& chw, const IntensityRange& range);

}  // namespace concord::generative
