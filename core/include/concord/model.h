// Model plugins: a LibTorch network addressed by named parts.
#pragma once

#include <concord/image.h>
#include <concord/registry.h>

#include <ATen/core/Tensor.h>

namespace concord {

struct ModelSpec {
  Task task = Task::Classification;
  int in_channels = 1;
  int num_classes = 2;
  std::array<int64_t, 2> image_size{64, 64};  // x, y
};

// One parameter or buffer, with the module that owns it. `module_type` is the class name
// ("BatchNorm2d", "Conv2d", or a TorchScript qualified type name's last component).
struct StateEntry {
  std::string name;          // "encoder.down1.bn.weight"
  at::Tensor tensor;         // live tensor of the model (not a copy)
  bool is_parameter = true;  // false: buffer (running_mean, num_batches_tracked, ...)
  std::string module_path;   // "encoder.down1.bn"
  std::string module_type;   // "BatchNorm2d"
};

struct ModuleEntry {
  std::string path;  // "" for the root
  std::string type;
};

class Model : public Plugin {
 public:
  // Creates the network for the data's task; called once before anything else.
  virtual void build(const ModelSpec& spec) = 0;
  // NCHW float input; logits (N, classes) or (N, classes, H, W).
  virtual at::Tensor forward(const at::Tensor& input) = 0;
  virtual void set_training(bool on) = 0;
  // Every parameter and buffer in a stable order.
  virtual std::vector<StateEntry> state() = 0;
  virtual std::vector<ModuleEntry> modules() = 0;
  // Writes the model (weights included) so that users can load it elsewhere.
  virtual void save(const std::string& file) = 0;
};

}  // namespace concord
