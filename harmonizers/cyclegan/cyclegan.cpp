#include "cyclegan.h"

#include "generative_common.h"
#include "networks.h"

#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include <ATen/ops/l1_loss.h>
#include <ATen/ops/mse_loss.h>
#include <c10/core/InferenceMode.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <cstdio>

namespace concord::cyclegan {

namespace gen = concord::generative;

void Options::validate() const {
  auto need = [](bool ok, const char* what) {
    if (!ok) throw Error(std::string("cyclegan: ") + what);
  };
  need(channels >= 1 && channels <= 16, "channels must be in [1, 16]");
  need(ngf >= 1 && ngf <= 1024, "ngf must be in [1, 1024]");
  need(ndf >= 1 && ndf <= 1024, "ndf must be in [1, 1024]");
  need(n_blocks >= 0 && n_blocks <= 64, "n_blocks must be in [0, 64]");
  need(n_layers_d >= 1 && n_layers_d <= 6, "n_layers_d must be in [1, 6]");
  need(lambda_cycle >= 0 && lambda_identity >= 0, "lambda_cycle and lambda_identity must be >= 0");
  need(pool_size >= 0 && pool_size <= 10000, "pool_size must be in [0, 10000]");
  need(lr > 0 && lr < 1, "lr must be in (0, 1)");
  need(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "betas must be in [0, 1)");
  need(epochs_constant >= 0 && epochs_decay >= 0, "epochs_constant and epochs_decay must be >= 0");
  need(batch_size >= 1 && batch_size <= 1024, "batch_size must be in [1, 1024]");
}

Range fit_site_range(const std::vector<Image>& images, double lower, double upper) {
  std::vector<const Image*> ptrs;
  for (const Image& im : images) ptrs.push_back(&im);
  const gen::IntensityRange r = gen::fit_range(ptrs, lower, upper);
  return {r.lo, r.hi};
}

namespace {

gen::IntensityRange to_gen(const Range& r) {
  return {r.lo, r.hi};
}

// One generator over a 2D image or a 3D volume, slice by slice, `batch` slices per pass.
Image run_generator(ResnetGenerator& g, const Image& image, const Options& opt,
                    const gen::IntensityRange& in, const gen::IntensityRange& out, int64_t batch) {
  if (image.channels != opt.channels)
    throw Error("cyclegan: image has " + std::to_string(image.channels) +
                " channels, the generator was built for " + std::to_string(opt.channels));
  if (image.size[0] < 4 || image.size[1] < 4)
    throw Error("cyclegan: image smaller than 4x4 cannot be translated");
  gen::IntensityRange rin = in, rout = out;
  if (opt.per_image_intensity) rin = rout = gen::fit_range(image);
  Image result = image;  // geometry, meta, pixel type kept; values overwritten below
  const int64_t H = image.size[1], W = image.size[0], D = image.size[2];
  c10::InferenceMode guard;
  for (int64_t z0 = 0; z0 < D; z0 += batch) {
    const int64_t n = std::min(batch, D - z0);
    at::Tensor x = gen::pad_to_multiple(gen::slices_to_unit(image, z0, n, rin), 4);
    at::Tensor y = g->forward(x).narrow(2, 0, H).narrow(3, 0, W);
    gen::unit_to_slices(y, result, z0, rout);
  }
  return result;
}

// The reference's ImagePool: while not full, store and return each image; then with
// probability 1/2 return a stored image (replaced by the new one), otherwise the new image.
at::Tensor query_pool(std::vector<at::Tensor>& pool, int64_t pool_size, const at::Tensor& images,
                      SeededRandom& rng) {
  if (pool_size == 0) return images;
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < images.size(0); ++i) {
    at::Tensor image = images[i].detach().clone();
    if (int64_t(pool.size()) < pool_size) {
      pool.push_back(image);
      out.push_back(image);
    } else if (rng.uniform() > 0.5) {
      const size_t k = size_t(rng.below(pool_size));
      out.push_back(pool[k]);
      pool[k] = image;
    } else {
      out.push_back(image);
    }
  }
  return at::stack(out, 0);
}

void set_requires_grad(torch::nn::Module& m, bool on) {
  for (auto& p : m.parameters()) p.set_requires_grad(on);
}

void export_pool(const std::vector<at::Tensor>& pool, const std::string& prefix, NamedArrays& out) {
  for (size_t i = 0; i < pool.size(); ++i) {
    char name[24];
    std::snprintf(name, sizeof name, "%05zu", i);
    out[prefix + name] = to_array(pool[i].clone());
  }
}

std::vector<at::Tensor> import_pool(const NamedArrays& in, const std::string& prefix,
                                    int64_t pool_size, const std::string& what) {
  std::vector<at::Tensor> pool;
  for (auto it = in.lower_bound(prefix); it != in.end() && it->first.rfind(prefix, 0) == 0; ++it) {
    const Array& a = it->second;
    if (a.dtype() != DType::F32 || a.shape().size() != 3)
      throw Error(what + ": pool entry '" + it->first + "' must be a [C, H, W] f32 array");
    pool.push_back(to_tensor(a).clone());
  }
  if (int64_t(pool.size()) > pool_size)
    throw Error(what + ": " + std::to_string(pool.size()) + " '" + prefix +
                "' entries exceed pool_size " + std::to_string(pool_size));
  return pool;
}

}  // namespace

struct SiteTrainer::Impl {
  Options opt;
  ResnetGenerator g_a{nullptr}, g_b{nullptr};
  PatchDiscriminator d_a{nullptr}, d_b{nullptr};
  std::unique_ptr<torch::optim::Adam> adam_g, adam_d;
  gen::NamedParameters params_g, params_d;
  std::vector<at::Tensor> pool_ref, pool_site;  // fakes shown to D_A (reference), D_B (site)
  int64_t epochs = 0;
  gen::IntensityRange site_range, ref_range;

  Impl(const Options& o, uint64_t seed) : opt(o) {
    opt.validate();
    g_a = ResnetGenerator(opt.channels, opt.channels, opt.ngf, opt.n_blocks);
    g_b = ResnetGenerator(opt.channels, opt.channels, opt.ngf, opt.n_blocks);
    d_a = PatchDiscriminator(opt.channels, opt.ndf, opt.n_layers_d);
    d_b = PatchDiscriminator(opt.channels, opt.ndf, opt.n_layers_d);
    auto init = [&](torch::nn::Module& m, const char* label) {
      at::Generator g = gen::make_generator(derive_seed(seed, std::string("cyclegan/") + label));
      gen::init_normal(m, g);
    };
    init(*g_a, "g_site2ref");
    init(*g_b, "g_ref2site");
    init(*d_a, "d_ref");
    init(*d_b, "d_site");
    params_g = gen::named_parameters(*g_a, "g_site2ref.");
    for (auto& p : gen::named_parameters(*g_b, "g_ref2site.")) params_g.push_back(p);
    params_d = gen::named_parameters(*d_a, "d_ref.");
    for (auto& p : gen::named_parameters(*d_b, "d_site.")) params_d.push_back(p);
    auto adam = [&](const gen::NamedParameters& ps) {
      std::vector<at::Tensor> ts;
      for (auto& p : ps) ts.push_back(p.second);
      return std::make_unique<torch::optim::Adam>(
          ts, torch::optim::AdamOptions(opt.lr).betas({opt.beta1, opt.beta2}));
    };
    adam_g = adam(params_g);
    adam_d = adam(params_d);
  }

  double lr_at(int64_t epoch) const {
    const double decay = double(std::max<int64_t>(0, epoch + 1 - opt.epochs_constant)) /
                         double(opt.epochs_decay + 1);
    return opt.lr * std::max(0.0, 1.0 - decay);
  }

  // One optimisation step of both generators, then both discriminators (the reference's
  // optimize_parameters). Adds the step's losses to `sum`.
  void step(const at::Tensor& real_a, const at::Tensor& real_b, SeededRandom& rng, Losses& sum) {
    const double lam = opt.lambda_cycle, lam_idt = opt.lambda_identity * opt.lambda_cycle;
    set_requires_grad(*d_a, false);
    set_requires_grad(*d_b, false);
    adam_g->zero_grad();
    at::Tensor fake_b = g_a->forward(real_a);
    at::Tensor rec_a = g_b->forward(fake_b);
    at::Tensor fake_a = g_b->forward(real_b);
    at::Tensor rec_b = g_a->forward(fake_a);
    at::Tensor idt = at::zeros({}, at::kFloat);
    if (lam_idt > 0)
      idt = at::l1_loss(g_a->forward(real_b), real_b) * lam_idt +
            at::l1_loss(g_b->forward(real_a), real_a) * lam_idt;
    at::Tensor pa = d_a->forward(fake_b), pb = d_b->forward(fake_a);
    at::Tensor gan = at::mse_loss(pa, at::ones_like(pa)) + at::mse_loss(pb, at::ones_like(pb));
    at::Tensor cycle = at::l1_loss(rec_a, real_a) * lam + at::l1_loss(rec_b, real_b) * lam;
    at::Tensor loss_g = gan + cycle + idt;
    loss_g.backward();
    adam_g->step();

    set_requires_grad(*d_a, true);
    set_requires_grad(*d_b, true);
    adam_d->zero_grad();
    auto d_loss = [](PatchDiscriminator& d, const at::Tensor& real, const at::Tensor& fake) {
      at::Tensor pr = d->forward(real), pf = d->forward(fake);
      at::Tensor l =
          (at::mse_loss(pr, at::ones_like(pr)) + at::mse_loss(pf, at::zeros_like(pf))) * 0.5;
      l.backward();
      return l.item<double>();
    };
    const double da = d_loss(d_a, real_b, query_pool(pool_ref, opt.pool_size, fake_b, rng));
    const double db = d_loss(d_b, real_a, query_pool(pool_site, opt.pool_size, fake_a, rng));
    adam_d->step();

    sum.g += loss_g.item<double>();
    sum.g_gan += gan.item<double>();
    sum.cycle += cycle.item<double>();
    sum.identity += idt.item<double>();
    sum.d += da + db;
    sum.steps += 1;
  }
};

SiteTrainer::SiteTrainer(const Options& options, uint64_t seed)
    : impl_(std::make_unique<Impl>(options, seed)) {}
SiteTrainer::~SiteTrainer() = default;

const Options& SiteTrainer::options() const {
  return impl_->opt;
}

void SiteTrainer::set_ranges(const Range& site, const Range& reference) {
  if (!(site.hi > site.lo) || !(reference.hi > reference.lo))
    throw Error("cyclegan: an intensity range needs hi > lo");
  impl_->site_range = to_gen(site);
  impl_->ref_range = to_gen(reference);
}

int64_t SiteTrainer::epochs_done() const {
  return impl_->epochs;
}

Losses SiteTrainer::train_epoch(const std::vector<Image>& own, const std::vector<Image>& reference,
                                SeededRandom& rng) {
  Impl& m = *impl_;
  const gen::IntensityMode mode =
      m.opt.per_image_intensity ? gen::IntensityMode::PerImage : gen::IntensityMode::PerSite;
  at::Tensor a = gen::pad_to_multiple(
      gen::stack_slices(own, mode, m.site_range, "cyclegan: the site's images"), 4);
  at::Tensor b = gen::pad_to_multiple(
      gen::stack_slices(reference, mode, m.ref_range, "cyclegan: the reference-style images"), 4);
  if (!a.sizes().slice(1).equals(b.sizes().slice(1)))
    throw Error(
        "cyclegan: the site's images and the reference-style images differ in channels "
        "or size: resample them to one size first");
  if (a.size(1) != m.opt.channels)
    throw Error("cyclegan: images have " + std::to_string(a.size(1)) +
                " channels, the networks were built for " + std::to_string(m.opt.channels));
  // The PatchGAN halves the size n_layers_d times, then runs two 4x4 convolutions of padding 1.
  const int64_t min_side = int64_t(3) << m.opt.n_layers_d;
  if (std::min(a.size(2), a.size(3)) < min_side)
    throw Error("cyclegan: images of at least " + std::to_string(min_side) + " x " +
                std::to_string(min_side) + " pixels are needed by the discriminator (n_layers_d " +
                std::to_string(m.opt.n_layers_d) + ")");
  const int64_t na = a.size(0), nb = b.size(0), n = std::max(na, nb);
  std::vector<int64_t> order(size_t(n), 0);
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i % na;
  rng.shuffle(order);

  Losses sum;
  sum.lr = m.lr_at(m.epochs);
  gen::set_adam_lr(*m.adam_g, sum.lr);
  gen::set_adam_lr(*m.adam_d, sum.lr);
  m.g_a->train();
  m.g_b->train();
  m.d_a->train();
  m.d_b->train();
  const int64_t bs = m.opt.batch_size;
  for (int64_t start = 0; start < n; start += bs) {
    const int64_t k = std::min(bs, n - start);
    std::vector<int64_t> ia(order.begin() + start, order.begin() + start + k), ib;
    for (int64_t j = 0; j < k; ++j) ib.push_back(rng.below(nb));
    const at::Tensor idx_a = at::tensor(ia, at::kLong), idx_b = at::tensor(ib, at::kLong);
    m.step(a.index_select(0, idx_a), b.index_select(0, idx_b), rng, sum);
  }
  const double steps = double(std::max<int64_t>(1, sum.steps));
  sum.g /= steps;
  sum.g_gan /= steps;
  sum.cycle /= steps;
  sum.identity /= steps;
  sum.d /= steps;
  m.epochs += 1;
  return sum;
}

NamedArrays SiteTrainer::shared_state() const {
  NamedArrays out;
  gen::export_module(*impl_->g_a, "g_site2ref.", out);
  return out;
}

void SiteTrainer::load_shared_state(const NamedArrays& state) {
  gen::import_module(*impl_->g_a, "g_site2ref.", state, "cyclegan shared state");
}

NamedArrays SiteTrainer::local_state() const {
  const Impl& m = *impl_;
  NamedArrays out;
  gen::export_module(*m.g_b, "g_ref2site.", out);
  gen::export_module(*m.d_a, "d_ref.", out);
  gen::export_module(*m.d_b, "d_site.", out);
  gen::export_adam(*m.adam_g, m.params_g, "adam_g/", out);
  gen::export_adam(*m.adam_d, m.params_d, "adam_d/", out);
  export_pool(m.pool_ref, "pool_ref/", out);
  export_pool(m.pool_site, "pool_site/", out);
  gen::export_count(m.epochs, "epochs_done", out);
  gen::export_range(m.site_range, "range_site/", out);
  gen::export_range(m.ref_range, "range_ref/", out);
  return out;
}

void SiteTrainer::load_local_state(const NamedArrays& state) {
  Impl& m = *impl_;
  const std::string what = "cyclegan local state";
  gen::import_module(*m.g_b, "g_ref2site.", state, what);
  gen::import_module(*m.d_a, "d_ref.", state, what);
  gen::import_module(*m.d_b, "d_site.", state, what);
  gen::import_adam(*m.adam_g, m.params_g, "adam_g/", state, what);
  gen::import_adam(*m.adam_d, m.params_d, "adam_d/", state, what);
  m.pool_ref = import_pool(state, "pool_ref/", m.opt.pool_size, what);
  m.pool_site = import_pool(state, "pool_site/", m.opt.pool_size, what);
  m.epochs = gen::import_count(state, "epochs_done", what);
  m.site_range = gen::import_range(state, "range_site/", what);
  m.ref_range = gen::import_range(state, "range_ref/", what);
}

Image SiteTrainer::translate(const Image& image) const {
  return run_generator(impl_->g_a, image, impl_->opt, impl_->site_range, impl_->ref_range, 8);
}

Image SiteTrainer::translate_back(const Image& image) const {
  return run_generator(impl_->g_b, image, impl_->opt, impl_->ref_range, impl_->site_range, 8);
}

struct Translator::Impl {
  Options opt;
  ResnetGenerator g{nullptr};
  gen::IntensityRange in, out;
  int64_t slice_batch = 8;
};

Translator::Translator(const Options& options, const NamedArrays& state, const Range& in,
                       const Range& out)
    : impl_(std::make_unique<Impl>()) {
  options.validate();
  if (!(in.hi > in.lo) || !(out.hi > out.lo))
    throw Error("cyclegan: an intensity range needs hi > lo");
  impl_->opt = options;
  impl_->g = ResnetGenerator(options.channels, options.channels, options.ngf, options.n_blocks);
  gen::import_module(*impl_->g, "g_site2ref.", state, "cyclegan translator");
  impl_->g->eval();
  impl_->in = to_gen(in);
  impl_->out = to_gen(out);
}
Translator::~Translator() = default;

void Translator::set_slice_batch(int64_t n) {
  if (n < 1) throw Error("cyclegan: slice batch must be >= 1");
  impl_->slice_batch = n;
}

Image Translator::translate(const Image& image) const {
  return run_generator(impl_->g, image, impl_->opt, impl_->in, impl_->out, impl_->slice_batch);
}

}  // namespace concord::cyclegan
