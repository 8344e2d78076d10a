// Local training at one site (see local_training.h).
#include "local_training.h"

#include "privacy_round.h"

#include <concord/batchnorm.h>
#include <concord/checked.h>
#include <concord/error.h>
#include <concord/seed.h>
#include <concord/tensor_bridge.h>
#include <concord/torch_model.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include <malloc.h>
#include <sched.h>

namespace concord {

namespace {

using OptimizerFactory = std::function<std::unique_ptr<torch::optim::Optimizer>(
    std::vector<at::Tensor>, const PipelineConfig::Training&)>;

const std::map<std::string, OptimizerFactory>& optimizers() {
  static const std::map<std::string, OptimizerFactory> table = {
      {"sgd",
       [](std::vector<at::Tensor> p, const PipelineConfig::Training& t) {
         return std::make_unique<torch::optim::SGD>(
             std::move(p),
             torch::optim::SGDOptions(t.lr).momentum(t.momentum).weight_decay(t.weight_decay));
       }},
      {"adam", [](std::vector<at::Tensor> p, const PipelineConfig::Training& t) {
         return std::make_unique<torch::optim::Adam>(
             std::move(p), torch::optim::AdamOptions(t.lr).weight_decay(t.weight_decay));
       }}};
  static const bool same_names = [] {
    std::vector<std::string> keys;
    for (const auto& [name, make] : table) keys.push_back(name);
    if (keys != optimizer_names())
      throw std::logic_error("local training: the optimizer table and optimizer_names() differ");
    return true;
  }();
  (void)same_names;
  return table;
}

void restore_grad(std::vector<std::pair<at::Tensor, bool>>& saved) {
  for (auto& [t, g] : saved) t.set_requires_grad(g);
}

// Row `b` of a batch of `n` items of `shape`: allocated on the first row, later rows must have
// the first one's shape.
void check_row(at::Tensor& batch, int64_t n, int64_t b, const std::vector<int64_t>& shape,
               at::ScalarType type, const std::string& site, const std::string& what) {
  if (b == 0) {
    std::vector<int64_t> full{n};
    full.insert(full.end(), shape.begin(), shape.end());
    batch = torch::empty(full, type);
  } else if (!batch[0].sizes().equals(shape)) {
    throw SiteError(site, what + " has shape " + shape_str(shape) + ", the batch's first " +
                              shape_str(batch[0].sizes().vec()));
  }
}

// An NCHW batch of `samples[idx]` and its targets; with `rng`, the augmenting harmonizers draw.
// Each image is copied once, straight into the batch tensor (no per-sample tensor and stack).
std::pair<at::Tensor, at::Tensor> make_batch(const std::string& site, Task task,
                                             const std::vector<Sample>& samples,
                                             const std::vector<size_t>& idx,
                                             const std::vector<Harmonizer*>& augmenters,
                                             std::mt19937_64* rng) {
  const int64_t n = int64_t(idx.size());
  at::Tensor x, y;
  for (int64_t b = 0; b < n; ++b) {
    const Sample& s = samples[idx[size_t(b)]];
    std::optional<Image> augmented;
    if (rng && !augmenters.empty()) {
      augmented = s.image;
      for (Harmonizer* h : augmenters) h->augment(*augmented, *rng);
    }
    const Image& im = augmented ? *augmented : s.image;
    check_row(x, n, b, image_tensor_shape(im), torch::kFloat, site, "sample '" + s.id + "'");
    std::copy(im.data.begin(), im.data.end(), x[b].data_ptr<float>());
    if (task == Task::Classification) {
      check_row(y, n, b, {}, torch::kLong, site, "label");
      y.data_ptr<int64_t>()[b] = s.label;
      continue;
    }
    if (!s.mask) throw SiteError(site, "sample '" + s.id + "' has no mask");
    const std::vector<int64_t> mshape = image_tensor_shape(*s.mask);
    check_row(y, n, b, {mshape.begin() + 1, mshape.end()}, torch::kLong, site,
              "the mask of sample '" + s.id + "' (first channel)");
    // Class indices: the mask's first channel rounded half to even (as torch::round).
    int64_t* out = y[b].data_ptr<int64_t>();
    const size_t count = size_t(y[0].numel());
    for (size_t k = 0; k < count; ++k) out[k] = int64_t(std::nearbyint(s.mask->data[k]));
  }
  return {x, y};
}

}  // namespace

at::Tensor task_loss(Task task, const at::Tensor& logits, const at::Tensor& y) {
  at::Tensor ce = torch::nn::functional::cross_entropy(logits, y);
  if (task == Task::Classification) return ce;
  at::Tensor prob = torch::softmax(logits, 1);
  at::Tensor onehot = torch::one_hot(y, logits.size(1)).permute({0, 3, 1, 2}).to(torch::kFloat);
  at::Tensor inter = (prob * onehot).sum({0, 2, 3});
  at::Tensor denom = prob.sum({0, 2, 3}) + onehot.sum({0, 2, 3});
  at::Tensor dice = (2 * inter + 1) / (denom + 1);
  return ce + (1 - dice.slice(0, 1).mean());
}

LossTerm proximal_term(Model& model, const std::map<std::string, at::Tensor>& target,
                       double weight) {
  if (weight == 0) return nullptr;
  std::vector<std::pair<at::Tensor, at::Tensor>> pairs;
  for (const StateEntry& e : model.state())
    if (e.is_parameter)
      if (auto it = target.find(e.name); it != target.end())
        pairs.emplace_back(e.tensor, it->second);
  if (pairs.empty()) return nullptr;
  const double half = weight / 2;
  return [pairs, half]() {
    at::Tensor sum;
    for (const auto& [w, g] : pairs) {
      if (!w.requires_grad()) continue;  // frozen this call: a constant, no gradient
      at::Tensor d = w.sub(g.to(w.device(), w.scalar_type())).pow(2).sum();
      sum = sum.defined() ? sum.add(d) : d;
    }
    return sum.defined() ? sum.mul(half) : torch::zeros({}, torch::kFloat);
  };
}

TrainResult LocalTraining::train(int epochs, const ParamFilter& trainable, const LossTerm& extra) {
  const auto& t = *c_.training;
  Model& model = *c_.model;
  const std::vector<Sample>& samples = c_.data->train;
  auto entries = model.state();
  std::vector<at::Tensor> params;
  std::vector<std::pair<at::Tensor, bool>> saved_grad;
  for (auto& e : entries) {
    if (!e.is_parameter) continue;
    bool on = !trainable || trainable(e);
    saved_grad.emplace_back(e.tensor, e.tensor.requires_grad());
    e.tensor.set_requires_grad(on);
    if (on) params.push_back(e.tensor);
  }
  TrainResult result;
  if (params.empty() || samples.empty()) return restore_grad(saved_grad), result;
  auto make = optimizers().find(t.optimizer);
  if (make == optimizers().end())
    throw SiteError(*c_.site, "unknown optimizer '" + t.optimizer + "'");
  std::unique_ptr<torch::optim::Optimizer> opt = make->second(params, t);
  model.set_training(true);
  const int64_t call = (*c_.calls)++;
  std::mt19937_64 rng(derive_seed(c_.seed, "shuffle/" + *c_.site, round_ * 1000 + call));
  if (sample_plan_) {
    result = train_dp_sgd(*opt, params, epochs, extra, rng, call);
    restore_grad(saved_grad);
    return result;
  }
  for (int ep = 0; ep < epochs; ++ep) {
    std::vector<size_t> order(samples.size());
    std::iota(order.begin(), order.end(), 0);
    shuffle(order, rng);
    double loss_sum = 0;
    int64_t seen = 0;
    for (size_t start = 0; start < order.size(); start += size_t(t.batch_size)) {
      size_t end = std::min(order.size(), start + size_t(t.batch_size));
      if (end - start < 2 && order.size() >= 2) break;  // BatchNorm needs 2+ samples
      std::vector<size_t> idx(order.begin() + long(start), order.begin() + long(end));
      auto [x, y] = make_batch(*c_.site, c_.task, samples, idx, *c_.augmenters, &rng);
      if (c_.replayers && !c_.replayers->empty()) add_replay(x, y, idx.size(), ep, epochs, rng);
      opt->zero_grad();
      at::Tensor loss = task_loss(c_.task, model.forward(x), y);
      if (extra) loss = loss + extra();
      if (c_.aggregator_term) loss = loss + c_.aggregator_term();
      loss.backward();
      opt->step();
      loss_sum += loss.item<double>() * double(idx.size());
      seen += int64_t(idx.size());
      result.steps++;
    }
    result.samples += seen;
    result.loss = seen ? loss_sum / double(seen) : 0;
  }
  restore_grad(saved_grad);
  return result;
}

// DP-SGD (Abadi et al., CCS 2016) as the accountant assumes it (privacy_round.h): per step, a
// Poisson sample of the training split (each sample with probability q, drawn from the
// pipeline's seed), one backward pass per sample (per-sample gradients: correct for any model
// without BatchNorm, at the cost of batch-1 passes), each sample's gradient clipped to L2 norm C
// over all trainable parameters, N(0, (sigma C)^2) added to the clipped sum, divided by the
// expected batch size q n. The adapter's and aggregator's loss terms do not read data: their
// gradient is added unclipped.
TrainResult LocalTraining::train_dp_sgd(torch::optim::Optimizer& opt,
                                        const std::vector<at::Tensor>& params, int epochs,
                                        const LossTerm& extra, std::mt19937_64& rng, int64_t call) {
  const SampleLevelPlan& plan = *sample_plan_;
  if (c_.replayers && !c_.replayers->empty())
    throw SiteError(*c_.site,
                    "sample-level DP: a replaying harmonizer adds samples made from this site's "
                    "data to every batch, outside the per-sample clipping; remove it or use "
                    "privacy level: client");
  Model& model = *c_.model;
  const std::vector<Sample>& samples = c_.data->train;
  SeededRandom draws(derive_seed(c_.seed, "dp-sgd/" + *c_.site, int64_t(round_) * 1000 + call));
  StandardNormal<SeededRandom> normal(draws);
  const double noise_std = plan.noise_multiplier * plan.clip;
  std::vector<at::Tensor> sum;
  for (const auto& p : params) sum.push_back(torch::zeros_like(p).contiguous());
  TrainResult result;
  for (int ep = 0; ep < epochs; ++ep) {
    double loss_sum = 0;
    int64_t seen = 0;
    for (int64_t step = 0; step < plan.steps_per_epoch; ++step) {
      for (auto& g : sum) g.zero_();
      for (size_t i = 0; i < samples.size(); ++i) {
        if (!(draws.uniform() < plan.q)) continue;
        auto [x, y] = make_batch(*c_.site, c_.task, samples, {i}, *c_.augmenters, &rng);
        opt.zero_grad();
        at::Tensor loss = task_loss(c_.task, model.forward(x), y);
        loss.backward();
        std::vector<at::Tensor> squares;
        for (const auto& p : params)
          if (p.grad().defined()) squares.push_back(p.grad().pow(2).sum());
        const double norm =
            squares.empty() ? 0 : std::sqrt(at::stack(squares).sum().item<double>());
        const double scale = norm > plan.clip ? plan.clip / norm : 1.0;
        for (size_t k = 0; k < params.size(); ++k)
          if (params[k].grad().defined()) sum[k].add_(params[k].grad(), scale);
        loss_sum += loss.item<double>();
        ++seen;
      }
      for (auto& g : sum) {
        if (noise_std > 0) {
          float* v = g.data_ptr<float>();
          for (int64_t k = 0; k < g.numel(); ++k) v[k] = float(double(v[k]) + noise_std * normal());
        }
        g.div_(plan.expected_batch);
      }
      opt.zero_grad();
      if (extra || c_.aggregator_term) {
        at::Tensor term = extra ? extra() : torch::zeros({}, torch::kFloat);
        if (c_.aggregator_term) term = term + c_.aggregator_term();
        if (term.requires_grad()) term.backward();
      }
      for (size_t k = 0; k < params.size(); ++k) {
        at::Tensor& grad = params[k].mutable_grad();
        if (grad.defined())
          grad.add_(sum[k]);
        else
          grad = sum[k].clone();
      }
      opt.step();
      result.steps++;
    }
    result.samples += seen;
    result.loss = seen ? loss_sum / double(seen) : 0;
  }
  return result;
}

// Synthetic samples from the replaying harmonizers (learned, e.g. a VAE), made here at the site
// and appended to the batch (classification only).
void LocalTraining::add_replay(at::Tensor& x, at::Tensor& y, size_t real, int, int,
                               std::mt19937_64& rng) {
  if (c_.task != Task::Classification)
    throw SiteError(*c_.site, "replay adds labelled samples: classification only");
  std::vector<Image> images;
  std::vector<int64_t> labels;
  for (Harmonizer* h : *c_.replayers)
    h->replay({int64_t(real), round_, c_.rounds, &c_.data->train, &rng}, images, labels);
  if (images.empty()) return;
  if (images.size() != labels.size())
    throw SiteError(*c_.site, "replay returned " + std::to_string(images.size()) + " images and " +
                                  std::to_string(labels.size()) + " labels");
  std::vector<at::Tensor> xs{x}, ys{y};
  for (const auto& im : images) xs.push_back(image_to_tensor(im).unsqueeze(0));
  ys.push_back(torch::tensor(labels, torch::kLong));
  x = torch::cat(xs);
  y = torch::cat(ys);
}

void LocalTraining::recalibrate_batchnorm() {
  torch::NoGradGuard ng;
  Model& model = *c_.model;
  const std::vector<Sample>& samples = c_.data->train;
  // Fresh running statistics estimated from this site's images alone (labels unused). With
  // LibTorch modules the momentum is switched off during the passes (a cumulative average, as
  // PyTorch does with momentum=None); other models get enough passes for the default
  // momentum 0.1 to forget the reset values (0.9^50 < 1%).
  std::vector<std::pair<torch::nn::BatchNormOptions*, c10::optional<double>>> saved_momentum;
  if (auto* tm = dynamic_cast<TorchModuleModel*>(&model)) {
    for (const auto& m : tm->module().modules(/*include_self=*/true)) {
      torch::nn::BatchNormOptions* o = nullptr;
      if (auto* b = m->as<torch::nn::BatchNorm1d>()) o = &b->options;
      if (auto* b = m->as<torch::nn::BatchNorm2d>()) o = &b->options;
      if (auto* b = m->as<torch::nn::BatchNorm3d>()) o = &b->options;
      if (!o) continue;
      saved_momentum.emplace_back(o, o->momentum());
      o->momentum(c10::nullopt);
    }
  }
  const bool cumulative = !saved_momentum.empty();
  for (auto& e : model.state()) {
    if (!is_batchnorm(e) || e.is_parameter) continue;
    const std::string leaf = e.name.substr(e.name.rfind('.') + 1);
    if (leaf == "running_mean" || leaf == "num_batches_tracked") e.tensor.zero_();
    if (leaf == "running_var") e.tensor.fill_(1);
  }
  model.set_training(true);
  std::vector<size_t> idx(samples.size());
  std::iota(idx.begin(), idx.end(), 0);
  const size_t bs = size_t(c_.training->batch_size);
  int passes = 0;
  for (int epoch = 0; epoch < 1000 && (epoch == 0 || (!cumulative && passes < 50)); ++epoch) {
    for (size_t s = 0; s < idx.size(); s += bs) {
      std::vector<size_t> part(idx.begin() + long(s),
                               idx.begin() + long(std::min(idx.size(), s + bs)));
      if (part.size() < 2) break;
      model.forward(make_batch(*c_.site, c_.task, samples, part, *c_.augmenters, nullptr).first);
      ++passes;
    }
    if (passes == 0) break;
  }
  for (auto& [o, m] : saved_momentum) o->momentum(m);
  model.set_training(false);
}

Predictions LocalTraining::predict(int num_classes) {
  Model& model = *c_.model;
  const std::vector<Sample>& test = c_.data->test;
  Predictions p;
  p.task = c_.task;
  p.num_classes = num_classes;
  model.set_training(false);
  torch::NoGradGuard ng;
  const size_t bs = 64;
  for (size_t s = 0; s < test.size(); s += bs) {
    std::vector<size_t> idx;
    for (size_t i = s; i < std::min(test.size(), s + bs); ++i) idx.push_back(i);
    auto [x, y] = make_batch(*c_.site, c_.task, test, idx, *c_.augmenters, nullptr);
    at::Tensor prob = torch::softmax(model.forward(x), 1);
    if (c_.task == Task::Classification) {
      auto pc = prob.contiguous();
      const float* pp = pc.data_ptr<float>();
      p.probs.insert(p.probs.end(), pp, pp + pc.numel());
      auto yc = y.contiguous();
      const int64_t* yy = yc.data_ptr<int64_t>();
      p.labels.insert(p.labels.end(), yy, yy + yc.numel());
    } else {
      at::Tensor pred = prob.argmax(1).to(torch::kUInt8).contiguous();
      at::Tensor truth = y.to(torch::kUInt8).contiguous();
      const int64_t per = pred[0].numel();
      for (int64_t i = 0; i < pred.size(0); ++i) {
        const uint8_t* a = pred[i].data_ptr<uint8_t>();
        const uint8_t* b = truth[i].data_ptr<uint8_t>();
        p.pred_masks.emplace_back(a, a + per);
        p.true_masks.emplace_back(b, b + per);
      }
    }
  }
  return p;
}

}  // namespace concord

namespace concord {

void seed_torch(uint64_t seed) {
  torch::manual_seed(seed);
}

namespace {

// The CPUs this process may run on (its affinity mask: taskset, cgroups, Slurm's allocation).
int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

int configure_torch_process(int threads) {
  // LibTorch's own default is the physical-core count of its cpuinfo library, read from CPUID:
  // on a 2-core VM whose kernel sees 2 cores it was 1 thread (half the speed of the same model
  // trained in PyTorch with 2). OMP_NUM_THREADS / MKL_NUM_THREADS still choose when set, as
  // they do for LibTorch.
  if (threads <= 0 && !std::getenv("OMP_NUM_THREADS") && !std::getenv("MKL_NUM_THREADS"))
    threads = available_cpus();
  if (threads > 0) torch::set_num_threads(threads);
  // glibc serves blocks above its mmap threshold (128 KB, rising to at most 32 MB) from fresh
  // mmap()s and unmaps them on free: every training step faulted its activations in again,
  // page by page (40% of a 128x128 U-Net step in the kernel). Keep freed memory in the heap for the
  // next step instead, unless the user tunes malloc through GLIBC_TUNABLES.
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (!tunables || !std::strstr(tunables, "glibc.malloc.")) {
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
  }
  return torch::get_num_threads();
}

}  // namespace concord
