#include "generative_common.h"

#include <concord/checked.h>
#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/padding.h>
#include <torch/nn/module.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <cmath>

namespace concord::generative {

namespace nn = torch::nn;

at::Generator make_generator(uint64_t seed) {
  return at::detail::createCPUGenerator(seed);
}

void init_normal(nn::Module& module, at::Generator& gen, double gain) {
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    at::Tensor& p = item.value();
    const std::string& name = item.key();
    const bool is_bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    if (is_bias)
      p.zero_();
    else if (p.dim() == 1)  // a normalisation scale (affine BatchNorm / GroupNorm)
      p.normal_(1.0, gain, gen);
    else
      p.normal_(0.0, gain, gen);
  }
}

void export_module(const nn::Module& module, const std::string& prefix, NamedArrays& out) {
  for (const auto& item : module.named_parameters(true))
    out[prefix + item.key()] = to_array(item.value().detach().to(at::kFloat).clone());
  for (const auto& item : module.named_buffers(true))
    out[prefix + item.key()] = to_array(item.value().detach().to(at::kFloat).clone());
}

namespace {

const Array& find_entry(const NamedArrays& in, const std::string& name, const std::string& what) {
  auto it = in.find(name);
  if (it == in.end()) throw Error(what + ": state entry '" + name + "' is missing");
  return it->second;
}

void copy_checked(at::Tensor& dst, const Array& src, const std::string& name,
                  const std::string& what) {
  if (src.dtype() != DType::F32)
    throw Error(what + ": state entry '" + name + "' has dtype " + dtype_name(src.dtype()) +
                ", expected f32");
  if (src.shape() != dst.sizes().vec()) {
    std::string want, got;
    for (auto d : dst.sizes()) want += (want.empty() ? "" : "x") + std::to_string(d);
    for (auto d : src.shape()) got += (got.empty() ? "" : "x") + std::to_string(d);
    throw Error(what + ": state entry '" + name + "' has shape [" + got + "], expected [" + want +
                "]");
  }
  at::Tensor t = to_tensor(src);
  if (!t.isfinite().all().item<bool>())
    throw Error(what + ": state entry '" + name + "' holds a non-finite value");
  dst.copy_(t);
}

}  // namespace

void import_module(nn::Module& module, const std::string& prefix, const NamedArrays& in,
                   const std::string& what) {
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(true)) {
    const std::string name = prefix + item.key();
    copy_checked(item.value(), find_entry(in, name, what), name, what);
  }
  for (auto& item : module.named_buffers(true)) {
    const std::string name = prefix + item.key();
    copy_checked(item.value(), find_entry(in, name, what), name, what);
  }
}

NamedParameters named_parameters(const nn::Module& module, const std::string& prefix) {
  NamedParameters out;
  for (const auto& item : module.named_parameters(true))
    out.emplace_back(prefix + item.key(), item.value());
  return out;
}

namespace {
std::string adam_key(const at::Tensor& p) {
  return c10::guts::to_string(p.unsafeGetTensorImpl());
}
}  // namespace

void export_adam(torch::optim::Adam& adam, const NamedParameters& params, const std::string& prefix,
                 NamedArrays& out) {
  auto& state = adam.state();
  for (const auto& [name, p] : params) {
    auto it = state.find(adam_key(p));
    if (it == state.end()) continue;
    const auto& s = static_cast<const torch::optim::AdamParamState&>(*it->second);
    out[prefix + name + "/exp_avg"] = to_array(s.exp_avg().detach().clone());
    out[prefix + name + "/exp_avg_sq"] = to_array(s.exp_avg_sq().detach().clone());
    out[prefix + name + "/step"] = Array::from(std::vector<int64_t>{s.step()});
  }
}

void import_adam(torch::optim::Adam& adam, const NamedParameters& params, const std::string& prefix,
                 const NamedArrays& in, const std::string& what) {
  auto& state = adam.state();
  state.clear();
  for (const auto& [name, p] : params) {
    const std::string base = prefix + name;
    if (!in.count(base + "/step")) continue;  // no moments yet for this parameter
    const Array& step = find_entry(in, base + "/step", what);
    if (step.dtype() != DType::I64 || step.numel() != 1 || step.data<int64_t>()[0] < 0)
      throw Error(what + ": state entry '" + base + "/step' must be one non-negative i64");
    auto s = std::make_unique<torch::optim::AdamParamState>();
    at::Tensor m = at::zeros_like(p, at::MemoryFormat::Preserve);
    at::Tensor v = at::zeros_like(p, at::MemoryFormat::Preserve);
    copy_checked(m, find_entry(in, base + "/exp_avg", what), base + "/exp_avg", what);
    copy_checked(v, find_entry(in, base + "/exp_avg_sq", what), base + "/exp_avg_sq", what);
    s->step(step.data<int64_t>()[0]);
    s->exp_avg(m);
    s->exp_avg_sq(v);
    state[adam_key(p)] = std::move(s);
  }
}

void set_adam_lr(torch::optim::Adam& adam, double lr) {
  for (auto& group : adam.param_groups())
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
}

void export_count(int64_t value, const std::string& name, NamedArrays& out) {
  out[name] = Array::from(std::vector<int64_t>{value});
}

int64_t import_count(const NamedArrays& in, const std::string& name, const std::string& what) {
  auto it = in.find(name);
  if (it == in.end() || it->second.dtype() != DType::I64 || it->second.numel() != 1 ||
      it->second.data<int64_t>()[0] < 0)
    throw Error(what + ": '" + name + "' must be one non-negative i64");
  return it->second.data<int64_t>()[0];
}

// ---- intensity mapping ---------------------------------------------------------------------

IntensityRange fit_range(const std::vector<const Image*>& images, double lower, double upper) {
  if (!(lower >= 0 && lower < upper && upper <= 100))
    throw Error("intensity range: percentiles must satisfy 0 <= lower < upper <= 100");
  size_t total = 0;
  for (const Image* im : images) total += im->data.size();
  if (total == 0) throw Error("intensity range: no voxels to fit on");
  const size_t stride = std::max<size_t>(1, total / (size_t(1) << 20));
  std::vector<float> v;
  v.reserve(total / stride + images.size());
  size_t k = 0;  // global voxel index, so the stride runs across image boundaries
  for (const Image* im : images)
    for (float x : im->data) {
      if (k++ % stride == 0 && std::isfinite(x)) v.push_back(x);
    }
  if (v.empty()) throw Error("intensity range: no finite voxels to fit on");
  auto at_pct = [&](double pct) {
    const size_t i = std::min(v.size() - 1, size_t(std::floor(pct / 100.0 * double(v.size() - 1))));
    std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(i), v.end());
    return v[i];
  };
  IntensityRange r;
  r.lo = at_pct(lower);
  r.hi = at_pct(upper);
  if (!(r.hi > r.lo)) r.hi = r.lo + 1;
  return r;
}

IntensityRange fit_range(const Image& image, double lower, double upper) {
  return fit_range(std::vector<const Image*>{&image}, lower, upper);
}

void export_range(const IntensityRange& range, const std::string& prefix, NamedArrays& out) {
  out[prefix + "lo"] = Array::from(std::vector<float>{range.lo});
  out[prefix + "hi"] = Array::from(std::vector<float>{range.hi});
}

IntensityRange import_range(const NamedArrays& in, const std::string& prefix,
                            const std::string& what) {
  auto one = [&](const std::string& name) {
    const Array& a = find_entry(in, prefix + name, what);
    if (a.dtype() != DType::F32 || a.numel() != 1 || !std::isfinite(a.data<float>()[0]))
      throw Error(what + ": state entry '" + prefix + name + "' must be one finite f32");
    return a.data<float>()[0];
  };
  IntensityRange r{one("lo"), one("hi")};
  if (!(r.hi > r.lo)) throw Error(what + ": intensity range '" + prefix + "' has hi <= lo");
  return r;
}

at::Tensor slices_to_unit(const Image& image, int64_t z0, int64_t count,
                          const IntensityRange& range) {
  const int64_t C = image.channels, H = image.size[1], W = image.size[0], D = image.size[2];
  if (z0 < 0 || count < 0 || z0 + count > D)
    throw Error("slices_to_unit: slice range outside the image");
  at::Tensor out = at::empty({count, C, H, W}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float scale = 2.0f / (range.hi - range.lo);
  const int64_t plane = H * W;
  for (int64_t s = 0; s < count; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const float* src = image.data.data() + (c * D + z0 + s) * plane;
      float* dst = o + (s * C + c) * plane;
      for (int64_t i = 0; i < plane; ++i)
        dst[i] = std::clamp((src[i] - range.lo) * scale - 1.0f, -1.0f, 1.0f);
    }
  return out;
}

void unit_to_slices(const at::Tensor& unit, Image& image, int64_t z0, const IntensityRange& range) {
  at::Tensor u = unit.detach().to(at::kFloat).contiguous();
  const int64_t C = image.channels, H = image.size[1], W = image.size[0], D = image.size[2];
  const int64_t count = u.size(0);
  if (u.dim() != 4 || u.size(1) != C || u.size(2) != H || u.size(3) != W || z0 < 0 ||
      z0 + count > D)
    throw Error("unit_to_slices: tensor does not match the image's slices");
  const float* p = u.data_ptr<float>();
  const float half = 0.5f * (range.hi - range.lo);
  const int64_t plane = H * W;
  for (int64_t s = 0; s < count; ++s)
    for (int64_t c = 0; c < C; ++c) {
      float* dst = image.data.data() + (c * D + z0 + s) * plane;
      const float* src = p + (s * C + c) * plane;
      for (int64_t i = 0; i < plane; ++i) dst[i] = (src[i] + 1.0f) * half + range.lo;
    }
}

at::Tensor stack_slices(const std::vector<Image>& images, IntensityMode mode,
                        const IntensityRange& site_range, const std::string& what) {
  if (images.empty()) throw Error(what + ": no images");
  const Image& first = images.front();
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < images.size(); ++i) {
    const Image& im = images[i];
    if (im.channels != first.channels || im.size[0] != first.size[0] || im.size[1] != first.size[1])
      throw Error(what + ": image " + std::to_string(i) + " is " + std::to_string(im.channels) +
                  "x" + std::to_string(im.size[1]) + "x" + std::to_string(im.size[0]) +
                  " (C x H x W) but image 0 is " + std::to_string(first.channels) + "x" +
                  std::to_string(first.size[1]) + "x" + std::to_string(first.size[0]) +
                  ": resample the images to one size first");
    const IntensityRange r = mode == IntensityMode::PerImage ? fit_range(im) : site_range;
    parts.push_back(slices_to_unit(im, 0, im.size[2], r));
  }
  return at::cat(parts, 0);
}

at::Tensor pad_to_multiple(const at::Tensor& x, int64_t multiple) {
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t ph = (multiple - H % multiple) % multiple,
                pw = (multiple - W % multiple) % multiple;
  if (ph == 0 && pw == 0) return x;
  if (ph >= H || pw >= W) throw Error("pad_to_multiple: image smaller than the padding");
  namespace F = torch::nn::functional;
  return F::pad(x, F::PadFuncOptions({0, pw, 0, ph}).mode(torch::kReflect));
}

Image unit_to_image(const at::Tensor& chw, const IntensityRange& range) {
  Image im(2, int(chw.size(0)), {chw.size(2), chw.size(1), 1});
  unit_to_slices(chw.unsqueeze(0), im, 0, range);
  return im;
}

}  // namespace concord::generative
