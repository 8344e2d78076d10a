// Test fixtures for the adapter unit tests: a small real LibTorch network served through
// TorchModuleModel, and a real LocalTrainer running plain SGD on seeded synthetic tensors.
// The engine's own LocalTrainer needs a dataset plugin and a whole pipeline; this one lets the
// unit tests see every train() call (epochs, trainable set, values before/after) directly.
// tests in engine_test.cpp run the same adapters through the real engine.
#pragma once

#include <concord/adapter.h>
#include <concord/torch_model.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace concord::adapter_testing {

// Modules (in forward order):
//   norm        BatchNorm2d on the input (a BatchNorm whose path has no "bn")
//   bn_conv     Conv2d (a path containing "bn" that is not a BatchNorm)
//   features    a custom block: features.conv (Conv2d), features.bn1 (BatchNorm2d)
//   classifier  Linear after global average pooling
// with_batchnorm = false replaces both BatchNorms by nothing (a network without BatchNorm).
std::unique_ptr<TorchModuleModel> make_tiny_net(int in_channels, int classes, uint64_t seed,
                                                bool with_batchnorm = true);

// One train() call as the trainer saw it.
struct TrainCall {
  int epochs = 0;
  std::set<std::string> trainable;  // parameter names given gradients
  bool had_extra = false;
  NamedArrays before, after;  // every state entry, deep copies
};

class SgdTrainer : public LocalTrainer {
 public:
  // `n` samples of `channels`x8x8 drawn N(offset, 1) with labels 0/1, all from `seed`.
  SgdTrainer(std::string site, Model& model, int n, int channels, float offset, uint64_t seed,
             double lr = 0.05);

  const std::string& site() const override { return site_; }
  int round() const override { return round_; }
  int rounds() const override { return rounds_; }
  void set_rounds(int n) { rounds_ = n; }
  Model& model() override { return model_; }
  const std::map<std::string, at::Tensor>& received() const override { return received_; }
  // Mini-batches of 4 in a fixed order; plain SGD on the selected parameters.
  TrainResult train(int epochs, const ParamFilter& trainable = nullptr,
                    const LossTerm& extra = nullptr) override;
  // Resets BatchNorm statistics and re-estimates them with a cumulative average.
  void recalibrate_batchnorm() override;
  NamedArrays& site_store() override { return store_; }
  int64_t train_samples() const override { return n_; }
  bool has_trained() const override { return trained_; }

  // What the engine does at the start of a round: load `global` into the model and remember
  // it as received().
  void receive(const NamedArrays& global, int round);
  void set_trained(bool t) { trained_ = t; }
  int recalibrations() const { return recalibrations_; }
  const std::vector<TrainCall>& calls() const { return calls_; }
  void clear_calls() { calls_.clear(); }
  const at::Tensor& inputs() const { return x_; }

 private:
  std::string site_;
  Model& model_;
  int64_t n_;
  at::Tensor x_, y_;
  double lr_;
  std::map<std::string, at::Tensor> received_;
  NamedArrays store_;
  bool trained_ = false;
  int round_ = 0;
  int rounds_ = 0;  // planned rounds (0: unknown, like a trainer outside the engine)
  int recalibrations_ = 0;
  std::vector<TrainCall> calls_;
};

}  // namespace concord::adapter_testing
