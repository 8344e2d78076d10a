// Helpers shared by the model plugins' tests (cnn/, unet/, torchscript/): building a model
// through the plugin registry, one SGD step, comparing states.
#pragma once

#include <concord/model.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>

#include "testing.h"

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace concord::model_testing {

inline std::unique_ptr<Model> make_model(const std::string& name,
                                         const std::map<std::string, Value>& args,
                                         const ModelSpec& spec, uint64_t seed = 42) {
  const Registry& reg = testkit::builtin_registry();
  BuildContext ctx;
  ctx.seed = seed;
  auto model = reg.create<Model>(Kind::Model, name,
                                 make_args(name, reg.get(Kind::Model, name).args, args), ctx);
  model->build(spec);
  return model;
}

inline const StateEntry* find_entry(const std::vector<StateEntry>& state, const std::string& name) {
  for (const StateEntry& e : state)
    if (e.name == name) return &e;
  return nullptr;
}

inline std::vector<StateEntry> entries_of_type(const std::vector<StateEntry>& state,
                                               const std::string& type) {
  std::vector<StateEntry> out;
  for (const StateEntry& e : state)
    if (e.module_type == type) out.push_back(e);
  return out;
}

// Cross-entropy before and after one SGD step on a fixed batch, in training mode.
inline std::pair<double, double> sgd_step_losses(Model& model, const at::Tensor& x,
                                                 const at::Tensor& target, double lr) {
  std::vector<at::Tensor> params;
  for (const StateEntry& e : model.state())
    if (e.is_parameter) params.push_back(e.tensor);
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(lr));
  model.set_training(true);
  sgd.zero_grad();
  at::Tensor loss = torch::nn::functional::cross_entropy(model.forward(x), target);
  loss.backward();
  sgd.step();
  const double before = loss.item<double>();
  torch::NoGradGuard no_grad;
  const double after =
      torch::nn::functional::cross_entropy(model.forward(x), target).item<double>();
  return {before, after};
}

// True when both models hold the same entries with equal values.
inline bool same_state(Model& a, Model& b) {
  auto sa = a.state(), sb = b.state();
  if (sa.size() != sb.size()) return false;
  for (size_t i = 0; i < sa.size(); ++i)
    if (sa[i].name != sb[i].name || !sa[i].tensor.equal(sb[i].tensor)) return false;
  return true;
}

}  // namespace concord::model_testing
