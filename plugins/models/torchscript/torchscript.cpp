// torchscript: trains a user's scripted network (torch.jit.script(...).save(file) in Python, or
// torch::jit::Module::save in C++), loaded with torch::jit::load.
#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/message.h>
#include <concord/model.h>

#include <torch/script.h>

#include <optional>
#include <sstream>

namespace concord {
namespace {

std::string join(const std::string& path, const std::string& name) {
  return path.empty() ? name : path + "." + name;
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// "__torch__.torch.nn.modules.batchnorm.BatchNorm2d" -> "BatchNorm2d".
std::string type_of(const torch::jit::Module& m) {
  const auto& name = m.type()->name();
  return name ? name->name() : m.type()->str();
}

class TorchScript : public Model {
 public:
  TorchScript(const Args& args, const BuildContext& ctx)
      : file_(args.str("file")),
        label_("torchscript" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")") + " '" +
               file_ + "'") {}

  void build(const ModelSpec&) override {
    try {
      module_ = torch::jit::load(file_, c10::Device(c10::kCPU));
    } catch (const c10::Error& e) {
      throw Error(label_ + ": cannot load the TorchScript module: " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      throw Error(label_ + ": cannot load the TorchScript module: " + e.what());
    }
    if (!module_->find_method("forward"))
      throw Error(label_ + ": the scripted module has no forward() method");
  }

  at::Tensor forward(const at::Tensor& input) override {
    c10::IValue out;
    try {
      out = mod().forward({input});
    } catch (const c10::Error& e) {
      throw Error(label_ + ": forward() failed on an input of shape " + shape_str(input.sizes()) +
                  ": " + e.what_without_backtrace());
    } catch (const std::exception& e) {  // torch::jit::JITException: errors raised in the script
      throw Error(label_ + ": forward() failed on an input of shape " + shape_str(input.sizes()) +
                  ": " + e.what());
    }
    if (!out.isTensor())
      throw Error(label_ + ": forward() returned " + out.tagKind() + ", expected a Tensor");
    return out.toTensor();
  }

  void set_training(bool on) override { mod().train(on); }

  // Per module in pre-order: parameters, then buffers (the order of PyTorch's state_dict()).
  std::vector<StateEntry> state() override {
    std::vector<StateEntry> out;
    for (const auto& m : mod().named_modules()) {
      const std::string type = type_of(m.value);
      for (const auto& p : m.value.named_parameters(/*recurse=*/false))
        if (p.value.defined()) out.push_back({join(m.name, p.name), p.value, true, m.name, type});
      for (const auto& b : m.value.named_buffers(/*recurse=*/false))
        if (b.value.defined()) out.push_back({join(m.name, b.name), b.value, false, m.name, type});
    }
    return out;
  }

  std::vector<ModuleEntry> modules() override {
    std::vector<ModuleEntry> out;
    for (const auto& m : mod().named_modules()) out.push_back({m.name, type_of(m.value)});
    return out;
  }

  // A TorchScript file again: torch.jit.load(file) in Python, torch::jit::load in C++.
  void save(const std::string& file) override {
    std::ostringstream bytes;
    try {
      mod().save(bytes);
    } catch (const c10::Error& e) {
      throw Error(label_ + ": cannot save to '" + file + "': " + e.what_without_backtrace());
    }
    write_file_atomic(file, bytes.str());
  }

 private:
  torch::jit::Module& mod() {
    if (!module_) throw Error(label_ + ": the model is used before build()");
    return *module_;
  }

  std::string file_;
  std::string label_;
  std::optional<torch::jit::Module> module_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-model-torchscript", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Model,
                "torchscript",
                "A user's TorchScript network file, trained in place",
                {ArgSpec::path("file", "TorchScript module (.pt) written by torch.jit.save")},
                factory_of<TorchScript>()});
}
