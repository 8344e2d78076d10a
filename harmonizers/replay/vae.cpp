#include "vae.h"

#include "generative_common.h"

#include <concord/error.h>

#include <c10/core/InferenceMode.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/upsampling.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <cmath>

namespace concord::replay {

namespace nn = torch::nn;
namespace gen = concord::generative;

void VaeOptions::validate() const {
  auto need = [](bool ok, const char* what) {
    if (!ok) throw Error(std::string("replay vae: ") + what);
  };
  need(channels >= 1 && channels <= 16, "channels must be in [1, 16]");
  need(size >= 8 && size <= 512 && size % 8 == 0, "size must be a multiple of 8 in [8, 512]");
  need(num_classes >= 1 && num_classes <= 1000, "num_classes must be in [1, 1000]");
  need(num_sites >= 0 && num_sites <= 1000, "num_sites must be in [0, 1000]");
  need(latent >= 1 && latent <= 4096, "latent must be in [1, 4096]");
  need(width >= 1 && width <= 1024, "width must be in [1, 1024]");
  need(beta >= 0 && std::isfinite(beta), "beta must be finite and >= 0");
  need(sigma > 0 && std::isfinite(sigma), "sigma must be finite and > 0");
  need(lr > 0 && lr < 1, "lr must be in (0, 1)");
  need(batch_size >= 1 && batch_size <= 4096, "batch_size must be in [1, 4096]");
  need(std::isfinite(range_lo) && std::isfinite(range_hi) && range_hi > range_lo,
       "range_hi must be > range_lo (both finite)");
}

namespace {

nn::LeakyReLU lrelu() {
  return nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2));
}

struct EncoderImpl : nn::Module {
  explicit EncoderImpl(const VaeOptions& o) : cells(o.size / 8) {
    const int64_t in = o.channels + o.num_classes + o.num_sites, w = o.width;
    conv = register_module(
        "conv", nn::Sequential(
                    nn::Conv2d(nn::Conv2dOptions(in, w, 4).stride(2).padding(1)), lrelu(),
                    nn::Conv2d(nn::Conv2dOptions(w, 2 * w, 4).stride(2).padding(1)), lrelu(),
                    nn::Conv2d(nn::Conv2dOptions(2 * w, 4 * w, 4).stride(2).padding(1)), lrelu()));
    mu = register_module("mu", nn::Linear(4 * w * cells * cells, o.latent));
    logvar = register_module("logvar", nn::Linear(4 * w * cells * cells, o.latent));
  }
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x) {
    at::Tensor h = conv->forward(x).flatten(1);
    return {mu->forward(h), logvar->forward(h)};
  }
  int64_t cells;
  nn::Sequential conv{nullptr};
  nn::Linear mu{nullptr}, logvar{nullptr};
};
TORCH_MODULE(Encoder);

struct DecoderImpl : nn::Module {
  explicit DecoderImpl(const VaeOptions& o) : cells(o.size / 8), top(4 * o.width) {
    const int64_t w = o.width;
    project = register_module(
        "project", nn::Linear(o.latent + o.num_classes + o.num_sites, top * cells * cells));
    auto up = [] {
      return nn::Upsample(
          nn::UpsampleOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest));
    };
    body = register_module(
        "body",
        nn::Sequential(lrelu(), up(), nn::Conv2d(nn::Conv2dOptions(top, 2 * w, 3).padding(1)),
                       lrelu(), up(), nn::Conv2d(nn::Conv2dOptions(2 * w, w, 3).padding(1)),
                       lrelu(), up(), nn::Conv2d(nn::Conv2dOptions(w, w, 3).padding(1)), lrelu(),
                       nn::Conv2d(nn::Conv2dOptions(w, o.channels, 3).padding(1))));
  }
  at::Tensor forward(const at::Tensor& zc) {
    return body->forward(project->forward(zc).view({zc.size(0), top, cells, cells}));
  }
  int64_t cells, top;
  nn::Linear project{nullptr};
  nn::Sequential body{nullptr};
};
TORCH_MODULE(Decoder);

struct VaeImpl : nn::Module {
  explicit VaeImpl(const VaeOptions& o)
      : encoder(register_module("encoder", Encoder(o))),
        decoder(register_module("decoder", Decoder(o))) {}
  Encoder encoder;
  Decoder decoder;
};
TORCH_MODULE(Vae);

}  // namespace

struct ConditionalVae::Impl {
  VaeOptions opt;
  Vae vae{nullptr};
  gen::NamedParameters params;
  std::unique_ptr<torch::optim::Adam> adam;

  Impl(const VaeOptions& o, uint64_t seed) : opt(o) {
    opt.validate();
    vae = Vae(opt);
    at::Generator g = gen::make_generator(derive_seed(seed, "vae"));
    gen::init_normal(*vae, g);
    // N(0, 0.02) suits the GAN reference; for the VAE a He-style scale per layer trains faster.
    {
      torch::NoGradGuard no_grad;
      for (auto& item : vae->named_parameters(true))
        if (item.value().dim() >= 2) {
          const double fan_in = double(item.value().numel() / item.value().size(0));
          item.value().normal_(0.0, std::sqrt(1.0 / fan_in), g);
        }
    }
    params = gen::named_parameters(*vae, "vae.");
    std::vector<at::Tensor> ts;
    for (auto& p : params) ts.push_back(p.second);
    adam = std::make_unique<torch::optim::Adam>(ts, torch::optim::AdamOptions(opt.lr));
  }

  // One-hot [N, classes + sites] of the conditions, checked.
  at::Tensor condition(const std::vector<int64_t>& labels,
                       const std::vector<int64_t>& sites) const {
    const int64_t n = int64_t(labels.size());
    if (opt.num_sites > 0 ? sites.size() != labels.size() : !sites.empty())
      throw Error("replay vae: give one site index per image when num_sites > 0, none otherwise");
    at::Tensor c = at::zeros({n, opt.num_classes + opt.num_sites}, at::kFloat);
    float* p = c.data_ptr<float>();
    const int64_t stride = opt.num_classes + opt.num_sites;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = labels[size_t(i)];
      if (l < 0 || l >= opt.num_classes)
        throw Error("replay vae: label " + std::to_string(l) + " of sample " + std::to_string(i) +
                    " is outside [0, " + std::to_string(opt.num_classes) + ")");
      p[i * stride + l] = 1;
      if (opt.num_sites > 0) {
        const int64_t s = sites[size_t(i)];
        if (s < 0 || s >= opt.num_sites)
          throw Error("replay vae: site " + std::to_string(s) + " of sample " + std::to_string(i) +
                      " is outside [0, " + std::to_string(opt.num_sites) + ")");
        p[i * stride + opt.num_classes + s] = 1;
      }
    }
    return c;
  }

  at::Tensor images_to_unit(const std::vector<Image>& images) const {
    for (size_t i = 0; i < images.size(); ++i) {
      const Image& im = images[i];
      if (im.channels != opt.channels || im.size[0] != opt.size || im.size[1] != opt.size ||
          im.size[2] != 1)
        throw Error("replay vae: image " + std::to_string(i) + " must be 2D " +
                    std::to_string(opt.channels) + " x " + std::to_string(opt.size) + " x " +
                    std::to_string(opt.size) + " (C x H x W): resample it first");
    }
    return gen::stack_slices(images, gen::IntensityMode::PerSite, {opt.range_lo, opt.range_hi},
                             "replay vae");
  }

  at::Tensor encoder_input(const at::Tensor& x, const at::Tensor& c) const {
    return at::cat({x, c.view({c.size(0), c.size(1), 1, 1}).expand({-1, -1, x.size(2), x.size(3)})},
                   1);
  }

  // Negative ELBO terms (sums over the batch) for x with condition c; z from `eps` (or mu).
  std::pair<at::Tensor, at::Tensor> elbo_terms(const at::Tensor& x, const at::Tensor& c,
                                               const at::Tensor* eps, at::Tensor* recon_out) {
    auto [mu, logvar] = vae->encoder->forward(encoder_input(x, c));
    at::Tensor z = eps ? mu + (*eps) * (0.5 * logvar).exp() : mu;
    at::Tensor xh = vae->decoder->forward(at::cat({z, c}, 1));
    if (recon_out) *recon_out = xh;
    at::Tensor recon = (xh - x).pow(2).sum() * (0.5 / (opt.sigma * opt.sigma));
    at::Tensor kl = (mu.pow(2) + logvar.exp() - 1 - logvar).sum() * 0.5;
    return {recon, kl};
  }

  std::vector<Image> to_images(const at::Tensor& y) const {
    std::vector<Image> out;
    const at::Tensor clamped = y.clamp(-1, 1);  // the decoder's output is linear
    for (int64_t i = 0; i < y.size(0); ++i)
      out.push_back(gen::unit_to_image(clamped[i], {opt.range_lo, opt.range_hi}));
    return out;
  }
};

ConditionalVae::ConditionalVae(const VaeOptions& options, uint64_t seed)
    : impl_(std::make_unique<Impl>(options, seed)) {}
ConditionalVae::~ConditionalVae() = default;

const VaeOptions& ConditionalVae::options() const {
  return impl_->opt;
}

VaeLosses ConditionalVae::train_epoch(const std::vector<Image>& images,
                                      const std::vector<int64_t>& labels, SeededRandom& rng,
                                      const std::vector<int64_t>& sites) {
  Impl& m = *impl_;
  if (images.size() != labels.size())
    throw Error("replay vae: " + std::to_string(images.size()) + " images but " +
                std::to_string(labels.size()) + " labels");
  if (images.empty()) throw Error("replay vae: no images to train on");
  const at::Tensor x = m.images_to_unit(images), c = m.condition(labels, sites);
  const int64_t n = x.size(0);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  rng.shuffle(order);
  m.vae->train();
  VaeLosses sum;
  for (int64_t start = 0; start < n; start += m.opt.batch_size) {
    const int64_t k = std::min(m.opt.batch_size, n - start);
    const at::Tensor idx = at::tensor(
        std::vector<int64_t>(order.begin() + start, order.begin() + start + k), at::kLong);
    const at::Tensor xb = x.index_select(0, idx), cb = c.index_select(0, idx);
    at::Generator g = gen::make_generator(rng.next());
    const at::Tensor eps = at::randn({k, m.opt.latent}, g, at::TensorOptions(at::kFloat));
    m.adam->zero_grad();
    auto [recon, kl] = m.elbo_terms(xb, cb, &eps, nullptr);
    at::Tensor loss = (recon + kl * m.opt.beta) / double(k);
    loss.backward();
    m.adam->step();
    sum.recon += recon.item<double>();
    sum.kl += kl.item<double>();
    sum.steps += 1;
  }
  sum.samples = n;
  sum.recon /= double(n);
  sum.kl /= double(n);
  sum.loss = sum.recon + m.opt.beta * sum.kl;
  return sum;
}

VaeLosses ConditionalVae::evaluate(const std::vector<Image>& images,
                                   const std::vector<int64_t>& labels,
                                   const std::vector<int64_t>& sites) const {
  Impl& m = *impl_;
  if (images.size() != labels.size() || images.empty())
    throw Error("replay vae: evaluate needs one label per image and at least one image");
  c10::InferenceMode guard;
  auto [recon, kl] =
      m.elbo_terms(m.images_to_unit(images), m.condition(labels, sites), nullptr, nullptr);
  VaeLosses out;
  out.samples = int64_t(images.size());
  out.recon = recon.item<double>() / double(out.samples);
  out.kl = kl.item<double>() / double(out.samples);
  out.loss = out.recon + m.opt.beta * out.kl;
  return out;
}

std::vector<Image> ConditionalVae::sample(const std::vector<int64_t>& labels, SeededRandom& rng,
                                          const std::vector<int64_t>& sites) const {
  Impl& m = *impl_;
  const at::Tensor c = m.condition(labels, sites);
  c10::InferenceMode guard;
  std::vector<Image> out;
  const int64_t n = c.size(0);
  for (int64_t start = 0; start < n; start += 256) {
    const int64_t k = std::min<int64_t>(256, n - start);
    at::Generator g = gen::make_generator(rng.next());
    const at::Tensor z = at::randn({k, m.opt.latent}, g, at::TensorOptions(at::kFloat));
    for (Image& im : m.to_images(m.vae->decoder->forward(at::cat({z, c.narrow(0, start, k)}, 1))))
      out.push_back(std::move(im));
  }
  return out;
}

std::vector<Image> ConditionalVae::reconstruct(const std::vector<Image>& images,
                                               const std::vector<int64_t>& labels,
                                               const std::vector<int64_t>& sites) const {
  Impl& m = *impl_;
  if (images.size() != labels.size())
    throw Error("replay vae: reconstruct needs one label per image");
  if (images.empty()) return {};
  c10::InferenceMode guard;
  at::Tensor xh;
  m.elbo_terms(m.images_to_unit(images), m.condition(labels, sites), nullptr, &xh);
  return m.to_images(xh);
}

NamedArrays ConditionalVae::state() const {
  NamedArrays out;
  gen::export_module(*impl_->vae, "vae.", out);
  return out;
}

void ConditionalVae::load_state(const NamedArrays& state) {
  gen::import_module(*impl_->vae, "vae.", state, "replay vae state");
}

NamedArrays ConditionalVae::optimizer_state() const {
  NamedArrays out;
  gen::export_adam(*impl_->adam, impl_->params, "adam/", out);
  return out;
}

void ConditionalVae::load_optimizer_state(const NamedArrays& state) {
  gen::import_adam(*impl_->adam, impl_->params, "adam/", state, "replay vae optimizer state");
}

}  // namespace concord::replay
