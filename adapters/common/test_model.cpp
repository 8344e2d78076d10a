#include "test_model.h"

#include "adapter_common.h"

#include <concord/tensor_bridge.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

namespace concord::adapter_testing {
namespace {

struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t c, bool with_bn) {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(c, c, 3).padding(1)));
    if (with_bn) bn1 = register_module("bn1", torch::nn::BatchNorm2d(c));
  }
  at::Tensor forward(at::Tensor x) {
    x = conv(x);
    if (bn1) x = bn1(x);
    return torch::relu(x);
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
};
TORCH_MODULE(Block);

struct TinyImpl : torch::nn::Module {
  TinyImpl(int64_t in, int64_t classes, bool with_bn) {
    if (with_bn) norm = register_module("norm", torch::nn::BatchNorm2d(in));
    bn_conv = register_module("bn_conv",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(in, 4, 3).padding(1)));
    features = register_module("features", Block(4, with_bn));
    classifier = register_module("classifier", torch::nn::Linear(4, classes));
  }
  at::Tensor forward(at::Tensor x) {
    if (norm) x = norm(x);
    x = torch::relu(bn_conv(x));
    x = features(x);
    return classifier(x.mean({2, 3}));
  }
  torch::nn::BatchNorm2d norm{nullptr};
  torch::nn::Conv2d bn_conv{nullptr};
  Block features{nullptr};
  torch::nn::Linear classifier{nullptr};
};
TORCH_MODULE(Tiny);

class TinyNet : public TorchModuleModel {
 public:
  TinyNet(uint64_t seed, bool with_bn) : TorchModuleModel("tiny"), seed_(seed), with_bn_(with_bn) {}
  void build(const ModelSpec& spec) override {
    net_ = Tiny(spec.in_channels, spec.num_classes, with_bn_);
    install(net_.ptr(), spec, seed_);
  }

 protected:
  at::Tensor run(const at::Tensor& input) override { return net_->forward(input); }

 private:
  uint64_t seed_;
  bool with_bn_;
  Tiny net_{nullptr};
};

}  // namespace

std::unique_ptr<TorchModuleModel> make_tiny_net(int in_channels, int classes, uint64_t seed,
                                                bool with_batchnorm) {
  auto m = std::make_unique<TinyNet>(seed, with_batchnorm);
  ModelSpec spec;
  spec.in_channels = in_channels;
  spec.num_classes = classes;
  spec.image_size = {8, 8};
  m->build(spec);
  return m;
}

SgdTrainer::SgdTrainer(std::string site, Model& model, int n, int channels, float offset,
                       uint64_t seed, double lr)
    : site_(std::move(site)), model_(model), n_(n), lr_(lr) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  x_ = torch::randn({n, channels, 8, 8}, gen) + offset;
  y_ = torch::randint(0, 2, {n}, gen);
}

TrainResult SgdTrainer::train(int epochs, const ParamFilter& trainable, const LossTerm& extra) {
  TrainCall call;
  call.epochs = epochs;
  call.had_extra = bool(extra);
  call.before = adapters::snapshot(model_);
  std::vector<at::Tensor> params;
  std::vector<StateEntry> entries = model_.state();
  for (StateEntry& e : entries) {
    if (!e.is_parameter) continue;
    const bool on = !trainable || trainable(e);
    e.tensor.set_requires_grad(on);
    if (on) {
      params.push_back(e.tensor);
      call.trainable.insert(e.name);
    }
  }
  TrainResult result;
  const int64_t bs = 4;
  for (int ep = 0; ep < epochs; ++ep) {
    double loss_sum = 0;
    for (int64_t s = 0; s + bs <= n_; s += bs) {
      model_.set_training(true);
      for (at::Tensor& p : params) p.mutable_grad() = at::Tensor();
      at::Tensor loss = torch::nn::functional::cross_entropy(model_.forward(x_.slice(0, s, s + bs)),
                                                             y_.slice(0, s, s + bs));
      if (extra) loss = loss + extra();
      loss.backward();
      {
        torch::NoGradGuard no_grad;
        for (at::Tensor& p : params)
          if (p.grad().defined()) p.sub_(lr_ * p.grad());
      }
      loss_sum += loss.item<double>() * bs;
      result.samples += bs;
      result.steps++;
    }
    result.loss = loss_sum / double(n_ - n_ % bs);
  }
  for (StateEntry& e : entries)
    if (e.is_parameter) e.tensor.set_requires_grad(true);
  trained_ = true;
  call.after = adapters::snapshot(model_);
  calls_.push_back(std::move(call));
  return result;
}

void SgdTrainer::recalibrate_batchnorm() {
  ++recalibrations_;
  auto& net = dynamic_cast<TorchModuleModel&>(model_).module();
  std::vector<std::pair<torch::nn::BatchNorm2dImpl*, c10::optional<double>>> saved;
  for (const auto& m : net.modules()) {
    if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      bn->reset_running_stats();
      saved.emplace_back(bn, bn->options.momentum());
      bn->options.momentum(c10::nullopt);  // cumulative average over the batches
    }
  }
  torch::NoGradGuard no_grad;
  model_.set_training(true);
  for (int64_t s = 0; s + 4 <= n_; s += 4) model_.forward(x_.slice(0, s, s + 4));
  model_.set_training(false);
  for (auto& [bn, momentum] : saved) bn->options.momentum(momentum);
}

void SgdTrainer::receive(const NamedArrays& global, int round) {
  adapters::restore(model_, global, "test", /*require_all=*/false);
  received_.clear();
  for (const auto& [name, a] : global) received_[name] = to_tensor(a).clone();
  round_ = round;
}

}  // namespace concord::adapter_testing
