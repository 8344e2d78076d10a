// A Model backed by a LibTorch C++ module tree (torch::nn::Module): the common half of every
// built-in network plugin. Subclasses build their module in build() and hand it over with
// install(); this class answers state(), modules(), set_training(), save() and load().
//
// The header only forward-declares torch::nn::Module: <torch/nn/module.h> costs ~5 s per
// translation unit against ~1 s for <ATen/core/Tensor.h>, and engine code needs neither.
#pragma once

#include <concord/model.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace concord {

class TorchModuleModel : public Model {
 public:
  // `plugin` names the model in error messages ("cnn", "unet").
  explicit TorchModuleModel(std::string plugin);
  ~TorchModuleModel() override;

  // Checks the input (4-D NCHW, the built number of channels), then calls run().
  at::Tensor forward(const at::Tensor& input) override;
  void set_training(bool on) override;
  // Per module in pre-order (root first): its parameters, then its buffers, as in PyTorch's
  // state_dict(). Names are full dotted paths ("features.block1.bn.running_mean").
  std::vector<StateEntry> state() override;
  std::vector<ModuleEntry> modules() override;
  // Writes a torch::serialize archive (a TorchScript zip holding every parameter and buffer
  // under its module path) via a temporary file and a rename. Load it back with load() below,
  // with `torch::load(module, file)` in C++, or in Python with
  // `torch.jit.load(file).state_dict()` (names match the module's own parameter names).
  void save(const std::string& file) override;
  // Copies the weights of a file written by save() into this built model. Throws Error naming
  // the file and the entry when an entry is missing or its shape differs.
  void load(const std::string& file);

  // The network; throws Error naming the plugin when build() has not run yet.
  torch::nn::Module& module() const;
  const ModelSpec& spec() const { return spec_; }
  const std::string& plugin() const { return plugin_; }

  // The short type name of a LibTorch module name: "torch::nn::BatchNorm2dImpl" ->
  // "BatchNorm2d", "concord::(anonymous namespace)::ConvBlockImpl" -> "ConvBlock".
  static std::string type_name(const std::string& module_name);

 protected:
  // Installs the built network and initialises every parameter from `seed` with a private
  // generator (the global LibTorch generator is left untouched): weights with two or more
  // dimensions He-normal (std = sqrt(2 / fan_in)), 1-D weights (normalisation scales) 1,
  // biases 0. Buffers keep their constructor values.
  void install(std::shared_ptr<torch::nn::Module> module, const ModelSpec& spec, uint64_t seed);
  // The network's forward pass on a checked input.
  virtual at::Tensor run(const at::Tensor& input) = 0;

 private:
  std::string plugin_;
  ModelSpec spec_;
  std::shared_ptr<torch::nn::Module> module_;
};

// A seed for model initialisation: derive_seed(pipeline_seed, "model/" + salt), identical on
// every site so that all sites start from the same weights.
uint64_t derive_model_seed(uint64_t pipeline_seed, const std::string& salt);

}  // namespace concord
