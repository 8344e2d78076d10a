#include "style_gan.h"

#include "generative_common.h"

#include <concord/error.h>

#include <ATen/ops/binary_cross_entropy_with_logits.h>
#include <c10/core/InferenceMode.h>
#include <torch/autograd.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/upsampling.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <cmath>

namespace concord::cyclegan {

namespace nn = torch::nn;
namespace gen = concord::generative;

void StyleGanOptions::validate() const {
  auto need = [](bool ok, const char* what) {
    if (!ok) throw Error(std::string("style gan: ") + what);
  };
  need(channels >= 1 && channels <= 16, "channels must be in [1, 16]");
  need(size >= 8 && size <= 512 && (size & (size - 1)) == 0,
       "size must be a power of two in [8, 512]");
  need(latent >= 1 && latent <= 4096, "latent must be in [1, 4096]");
  need(ngf >= 1 && ngf <= 1024 && ndf >= 1 && ndf <= 1024, "ngf and ndf must be in [1, 1024]");
  need(batch_size >= 1 && batch_size <= 4096, "batch_size must be in [1, 4096]");
  need(lr > 0 && lr < 1 && beta1 >= 0 && beta1 < 1, "lr in (0, 1) and beta1 in [0, 1)");
  need(dp_clip >= 0 && dp_noise >= 0 && std::isfinite(dp_clip) && std::isfinite(dp_noise),
       "dp_clip and dp_noise must be finite and >= 0");
  need(dp_clip > 0 || dp_noise == 0, "dp_noise needs dp_clip > 0");
}

namespace {

int64_t halvings(int64_t size) {
  int64_t l = 0;
  while ((int64_t(4) << l) < size) ++l;
  return l;
}
int64_t width(int64_t base, int64_t k) {
  return base * std::min<int64_t>(int64_t(1) << k, 8);
}

struct StyleGeneratorImpl : nn::Module {
  StyleGeneratorImpl(const StyleGanOptions& o)
      : levels(halvings(o.size)), top(width(o.ngf, levels)) {
    project = register_module("project", nn::Linear(o.latent, top * 16));
    nn::Sequential s;
    s->push_back(nn::GroupNorm(nn::GroupNormOptions(std::min<int64_t>(8, top), top)));
    s->push_back(nn::ReLU(nn::ReLUOptions(true)));
    for (int64_t k = levels; k >= 1; --k) {
      const int64_t in = width(o.ngf, k), out = width(o.ngf, k - 1);
      s->push_back(nn::Upsample(
          nn::UpsampleOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest)));
      s->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)));
      s->push_back(nn::GroupNorm(nn::GroupNormOptions(std::min<int64_t>(8, out), out)));
      s->push_back(nn::ReLU(nn::ReLUOptions(true)));
    }
    s->push_back(nn::Conv2d(nn::Conv2dOptions(o.ngf, o.channels, 3).padding(1)));
    s->push_back(nn::Tanh());
    body = register_module("body", s);
  }
  at::Tensor forward(const at::Tensor& z) {
    return body->forward(project->forward(z).view({z.size(0), top, 4, 4}));
  }
  int64_t levels, top;
  nn::Linear project{nullptr};
  nn::Sequential body{nullptr};
};
TORCH_MODULE(StyleGenerator);

struct StyleDiscriminatorImpl : nn::Module {
  explicit StyleDiscriminatorImpl(const StyleGanOptions& o) {
    const int64_t levels = halvings(o.size);
    nn::Sequential s;
    int64_t in = o.channels;
    for (int64_t k = 0; k < levels; ++k) {
      const int64_t out = width(o.ndf, k);
      s->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 4).stride(2).padding(1)));
      s->push_back(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2)));
      in = out;
    }
    s->push_back(nn::Conv2d(nn::Conv2dOptions(in, 1, 4)));  // 4x4 -> 1x1
    body = register_module("body", s);
  }
  at::Tensor forward(const at::Tensor& x) { return body->forward(x).view({x.size(0)}); }
  nn::Sequential body{nullptr};
};
TORCH_MODULE(StyleDiscriminator);

std::unique_ptr<torch::optim::Adam> make_adam(const gen::NamedParameters& ps, double lr,
                                              double beta1) {
  std::vector<at::Tensor> ts;
  for (auto& p : ps) ts.push_back(p.second);
  return std::make_unique<torch::optim::Adam>(ts,
                                              torch::optim::AdamOptions(lr).betas({beta1, 0.999}));
}

}  // namespace

struct StyleGan::Impl {
  StyleGanOptions opt;
  StyleGenerator g{nullptr};
  StyleDiscriminator d{nullptr};
  gen::NamedParameters params_g, params_d;
  std::unique_ptr<torch::optim::Adam> adam_g, adam_d;
  Range range;
  int64_t epochs = 0, steps = 0, dataset_size = 0;

  Impl(const StyleGanOptions& o, uint64_t seed) : opt(o) {
    opt.validate();
    g = StyleGenerator(opt);
    d = StyleDiscriminator(opt);
    at::Generator gg = gen::make_generator(derive_seed(seed, "style_gan/g"));
    gen::init_normal(*g, gg);
    at::Generator gd = gen::make_generator(derive_seed(seed, "style_gan/d"));
    gen::init_normal(*d, gd);
    params_g = gen::named_parameters(*g, "style_g.");
    params_d = gen::named_parameters(*d, "style_d.");
    adam_g = make_adam(params_g, opt.lr, opt.beta1);
    adam_d = make_adam(params_d, opt.lr, opt.beta1);
  }

  at::Tensor noise(int64_t n, uint64_t seed) const {
    at::Generator gz = gen::make_generator(seed);
    return at::randn({n, opt.latent}, gz, at::TensorOptions(at::kFloat));
  }

  // The discriminator step with DP-SGD: per-sample clipped gradients plus Gaussian noise.
  double dp_discriminator_step(const at::Tensor& real, const at::Tensor& fake, uint64_t seed) {
    std::vector<at::Tensor> params;
    for (auto& p : params_d) params.push_back(p.second);
    std::vector<at::Tensor> sum;
    for (auto& p : params) sum.push_back(at::zeros_like(p));
    double loss_sum = 0;
    const int64_t n = real.size(0);
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor lr = d->forward(real.narrow(0, i, 1)), lf = d->forward(fake.narrow(0, i, 1));
      at::Tensor loss = at::binary_cross_entropy_with_logits(lr, at::ones_like(lr)) +
                        at::binary_cross_entropy_with_logits(lf, at::zeros_like(lf));
      auto grads = torch::autograd::grad({loss}, params);
      double sq = 0;
      for (auto& gi : grads) sq += gi.pow(2).sum().item<double>();
      const double scale = std::min(1.0, opt.dp_clip / (std::sqrt(sq) + 1e-12));
      for (size_t k = 0; k < grads.size(); ++k) sum[k].add_(grads[k], scale);
      loss_sum += loss.item<double>();
    }
    at::Generator gn = gen::make_generator(seed);
    for (size_t k = 0; k < params.size(); ++k) {
      if (opt.dp_noise > 0)
        sum[k].add_(at::normal(0.0, opt.dp_noise * opt.dp_clip, sum[k].sizes(), gn));
      params[k].mutable_grad() = sum[k].div_(double(n));
    }
    adam_d->step();
    return loss_sum / double(n);
  }
};

StyleGan::StyleGan(const StyleGanOptions& options, uint64_t seed)
    : impl_(std::make_unique<Impl>(options, seed)) {}
StyleGan::~StyleGan() = default;

const StyleGanOptions& StyleGan::options() const {
  return impl_->opt;
}

void StyleGan::set_range(const Range& range) {
  if (!(range.hi > range.lo)) throw Error("style gan: an intensity range needs hi > lo");
  impl_->range = range;
}
const Range& StyleGan::range() const {
  return impl_->range;
}

StyleGanLosses StyleGan::train_epoch(const std::vector<Image>& images, SeededRandom& rng) {
  Impl& m = *impl_;
  at::Tensor x = gen::stack_slices(images, gen::IntensityMode::PerSite, {m.range.lo, m.range.hi},
                                   "style gan: the reference site's images");
  if (x.size(1) != m.opt.channels || x.size(2) != m.opt.size || x.size(3) != m.opt.size)
    throw Error("style gan: images must be " + std::to_string(m.opt.channels) + " x " +
                std::to_string(m.opt.size) + " x " + std::to_string(m.opt.size) +
                " (C x H x W), got " + std::to_string(x.size(1)) + " x " +
                std::to_string(x.size(2)) + " x " + std::to_string(x.size(3)));
  const int64_t n = x.size(0);
  m.dataset_size = n;
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  rng.shuffle(order);
  m.g->train();
  m.d->train();
  StyleGanLosses sum;
  for (int64_t start = 0; start < n; start += m.opt.batch_size) {
    const int64_t k = std::min(m.opt.batch_size, n - start);
    std::vector<int64_t> idx(order.begin() + start, order.begin() + start + k);
    at::Tensor real = x.index_select(0, at::tensor(idx, at::kLong));
    // Discriminator on real vs a fresh batch of fakes.
    at::Tensor fake = m.g->forward(m.noise(k, rng.next())).detach();
    m.adam_d->zero_grad();
    if (m.opt.dp_clip > 0) {
      sum.d += m.dp_discriminator_step(real, fake, rng.next());
    } else {
      at::Tensor lr = m.d->forward(real), lf = m.d->forward(fake);
      at::Tensor loss = at::binary_cross_entropy_with_logits(lr, at::ones_like(lr)) +
                        at::binary_cross_entropy_with_logits(lf, at::zeros_like(lf));
      loss.backward();
      m.adam_d->step();
      sum.d += loss.item<double>();
    }
    // Generator: non-saturating loss through the (frozen for this step) discriminator.
    for (auto& p : m.params_d) p.second.set_requires_grad(false);
    m.adam_g->zero_grad();
    at::Tensor lg = m.d->forward(m.g->forward(m.noise(k, rng.next())));
    at::Tensor loss_g = at::binary_cross_entropy_with_logits(lg, at::ones_like(lg));
    loss_g.backward();
    m.adam_g->step();
    for (auto& p : m.params_d) p.second.set_requires_grad(true);
    sum.g += loss_g.item<double>();
    sum.steps += 1;
  }
  m.steps += sum.steps;
  m.epochs += 1;
  if (sum.steps > 0) {
    sum.g /= double(sum.steps);
    sum.d /= double(sum.steps);
  }
  return sum;
}

std::vector<Image> StyleGan::sample(int64_t n, SeededRandom& rng) const {
  if (n < 0 || n > 1000000) throw Error("style gan: sample count must be in [0, 1e6]");
  Impl& m = *impl_;
  std::vector<Image> out;
  c10::InferenceMode guard;
  const gen::IntensityRange r{m.range.lo, m.range.hi};
  for (int64_t start = 0; start < n; start += 64) {
    const int64_t k = std::min<int64_t>(64, n - start);
    at::Tensor y = m.g->forward(m.noise(k, rng.next()));
    for (int64_t i = 0; i < k; ++i) out.push_back(gen::unit_to_image(y[i], r));
  }
  return out;
}

NamedArrays StyleGan::shared_state() const {
  NamedArrays out;
  gen::export_module(*impl_->g, "style_g.", out);
  gen::export_range({impl_->range.lo, impl_->range.hi}, "style_range/", out);
  return out;
}

void StyleGan::load_shared_state(const NamedArrays& state) {
  gen::import_module(*impl_->g, "style_g.", state, "style gan shared state");
  const gen::IntensityRange r = gen::import_range(state, "style_range/", "style gan shared state");
  impl_->range = {r.lo, r.hi};
}

NamedArrays StyleGan::local_state() const {
  const Impl& m = *impl_;
  NamedArrays out;
  gen::export_module(*m.d, "style_d.", out);
  gen::export_adam(*m.adam_g, m.params_g, "adam_g/", out);
  gen::export_adam(*m.adam_d, m.params_d, "adam_d/", out);
  gen::export_count(m.epochs, "epochs_done", out);
  gen::export_count(m.steps, "steps_done", out);
  return out;
}

void StyleGan::load_local_state(const NamedArrays& state) {
  Impl& m = *impl_;
  const std::string what = "style gan local state";
  gen::import_module(*m.d, "style_d.", state, what);
  gen::import_adam(*m.adam_g, m.params_g, "adam_g/", state, what);
  gen::import_adam(*m.adam_d, m.params_d, "adam_d/", state, what);
  m.epochs = gen::import_count(state, "epochs_done", what);
  m.steps = gen::import_count(state, "steps_done", what);
}

std::map<std::string, double> StyleGan::privacy_settings() const {
  const Impl& m = *impl_;
  return {
      {"dp_enabled", m.opt.dp_clip > 0 ? 1.0 : 0.0},
      {"dp_clip", m.opt.dp_clip},
      {"dp_noise_multiplier", m.opt.dp_noise},
      {"batch_size", double(m.opt.batch_size)},
      {"dataset_size", double(m.dataset_size)},
      {"sample_rate",
       m.dataset_size > 0 ? std::min(1.0, double(m.opt.batch_size) / double(m.dataset_size)) : 0.0},
      {"steps", double(m.steps)}};
}

}  // namespace concord::cyclegan
