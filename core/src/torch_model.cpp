#include <concord/batchnorm.h>
#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/message.h>
#include <concord/seed.h>
#include <concord/torch_model.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cmath>
#include <sstream>

namespace concord {

namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

std::string join(const std::string& path, const std::string& name) {
  return path.empty() ? name : path + "." + name;
}

// Splits "a.b.c" into {"a", "b", "c"}; "" gives {}.
std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start < path.size()) {
    size_t dot = path.find('.', start);
    if (dot == std::string::npos) dot = path.size();
    parts.push_back(path.substr(start, dot - start));
    start = dot + 1;
  }
  return parts;
}

}  // namespace

uint64_t derive_model_seed(uint64_t pipeline_seed, const std::string& salt) {
  return derive_seed(pipeline_seed, "model/" + salt);
}

TorchModuleModel::TorchModuleModel(std::string plugin) : plugin_(std::move(plugin)) {}
TorchModuleModel::~TorchModuleModel() = default;

std::string TorchModuleModel::type_name(const std::string& module_name) {
  return short_type_name(module_name);
}

torch::nn::Module& TorchModuleModel::module() const {
  if (!module_) throw Error(plugin_ + ": the model is used before build()");
  return *module_;
}

void TorchModuleModel::install(std::shared_ptr<torch::nn::Module> module, const ModelSpec& spec,
                               uint64_t seed) {
  module_ = std::move(module);
  spec_ = spec;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  torch::NoGradGuard no_grad;
  for (const StateEntry& e : state()) {
    if (!e.is_parameter) continue;
    at::Tensor t = e.tensor;
    const bool is_weight =
        e.name.size() >= 6 && e.name.compare(e.name.size() - 6, 6, "weight") == 0;
    if (t.dim() >= 2) {
      const double fan_in = double(t.numel() / t.size(0));
      t.normal_(0.0, std::sqrt(2.0 / fan_in), gen);
    } else if (is_weight) {
      t.fill_(1.0);
    } else {
      t.zero_();
    }
  }
}

at::Tensor TorchModuleModel::forward(const at::Tensor& input) {
  module();
  if (input.dim() != 4)
    throw Error(plugin_ + ": expected an NCHW input, got shape " + shape_str(input.sizes()));
  if (input.size(1) != spec_.in_channels)
    throw Error(plugin_ + ": built for " + std::to_string(spec_.in_channels) +
                " input channel(s), got an input of shape " + shape_str(input.sizes()));
  try {
    return run(input);
  } catch (const c10::Error& e) {
    throw Error(plugin_ + ": forward pass failed on an input of shape " + shape_str(input.sizes()) +
                ": " + e.what_without_backtrace());
  }
}

void TorchModuleModel::set_training(bool on) {
  module().train(on);
}

std::vector<StateEntry> TorchModuleModel::state() {
  std::vector<StateEntry> out;
  for (const auto& item : module().named_modules()) {
    const std::string& path = item.key();
    const std::string type = type_name(item.value()->name());
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
      if (p.value().defined()) out.push_back({join(path, p.key()), p.value(), true, path, type});
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false))
      if (b.value().defined()) out.push_back({join(path, b.key()), b.value(), false, path, type});
  }
  return out;
}

std::vector<ModuleEntry> TorchModuleModel::modules() {
  std::vector<ModuleEntry> out;
  for (const auto& item : module().named_modules())
    out.push_back({item.key(), type_name(item.value()->name())});
  return out;
}

void TorchModuleModel::save(const std::string& file) {
  torch::serialize::OutputArchive archive;
  module().save(archive);
  std::ostringstream bytes;
  try {
    archive.save_to(bytes);
  } catch (const c10::Error& e) {
    throw Error(plugin_ + ": cannot serialise the model for '" + file +
                "': " + e.what_without_backtrace());
  }
  write_file_atomic(file, bytes.str());
}

void TorchModuleModel::load(const std::string& file) {
  const std::vector<StateEntry> entries = state();
  torch::serialize::InputArchive root;
  try {
    root.load_from(file);
  } catch (const c10::Error& e) {
    throw Error(plugin_ + ": cannot read model file '" + file + "': " + e.what_without_backtrace());
  }
  torch::NoGradGuard no_grad;
  for (const StateEntry& e : entries) {
    // Archives nest one child archive per submodule, as Module::save() writes them.
    torch::serialize::InputArchive* node = &root;
    std::vector<std::unique_ptr<torch::serialize::InputArchive>> chain;  // owns the children
    for (const std::string& part : split_path(e.module_path)) {
      chain.push_back(std::make_unique<torch::serialize::InputArchive>());
      if (!node->try_read(part, *chain.back()))
        throw Error(plugin_ + ": model file '" + file + "' has no module '" + e.module_path + "'");
      node = chain.back().get();
    }
    const std::string local = e.name.substr(e.module_path.empty() ? 0 : e.module_path.size() + 1);
    at::Tensor value;
    if (!node->try_read(local, value, /*is_buffer=*/!e.is_parameter))
      throw Error(plugin_ + ": model file '" + file + "' has no entry '" + e.name + "'");
    if (!value.sizes().equals(e.tensor.sizes()))
      throw Error(plugin_ + ": model file '" + file + "': entry '" + e.name + "' has shape " +
                  shape_str(value.sizes()) + ", the model has " + shape_str(e.tensor.sizes()));
    e.tensor.copy_(value);  // in place: callers holding the live tensors see the new values
  }
}

}  // namespace concord
