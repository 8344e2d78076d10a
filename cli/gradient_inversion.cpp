// Gradient inversion (see gradient_inversion.h).
#include "gradient_inversion.h"

#include <torch/torch.h>

namespace concord::audit {

std::vector<at::Tensor> loss_gradient(const Forward& model, const std::vector<at::Tensor>& params,
                                      const at::Tensor& x, const at::Tensor& labels,
                                      bool create_graph) {
  const at::Tensor loss = torch::nn::functional::cross_entropy(model(x), labels);
  return torch::autograd::grad({loss}, params, {}, /*retain_graph=*/create_graph, create_graph);
}

namespace {

at::Tensor total_variation(const at::Tensor& x) {
  using torch::indexing::Slice;
  const at::Tensor dx = x.index({Slice(), Slice(), Slice(), Slice(1)}) -
                        x.index({Slice(), Slice(), Slice(), Slice(0, -1)});
  const at::Tensor dy = x.index({Slice(), Slice(), Slice(1), Slice()}) -
                        x.index({Slice(), Slice(), Slice(0, -1), Slice()});
  return dx.abs().mean() + dy.abs().mean();
}

}  // namespace

at::Tensor invert_gradients(const Forward& model, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& target, const at::Tensor& labels,
                            const std::vector<int64_t>& shape, const AttackOptions& o) {
  torch::manual_seed(o.seed);
  at::Tensor x = (torch::rand(shape) * (o.high - o.low) + o.low).requires_grad_(true);
  torch::optim::Adam opt({x}, torch::optim::AdamOptions(o.lr));
  at::Tensor target_norm = torch::zeros({});
  for (const auto& t : target) target_norm = target_norm + t.pow(2).sum();
  target_norm = target_norm.sqrt();
  // Step-decay at 3/8, 5/8 and 7/8 of the iterations, as Geiping et al.'s reference code.
  const int decay[] = {o.iterations * 3 / 8, o.iterations * 5 / 8, o.iterations * 7 / 8};
  for (int it = 0; it < o.iterations; ++it) {
    for (int d : decay)
      if (it == d)
        for (auto& g : opt.param_groups())
          static_cast<torch::optim::AdamOptions&>(g.options())
              .lr(static_cast<torch::optim::AdamOptions&>(g.options()).lr() * 0.1);
    opt.zero_grad();
    const auto grads = loss_gradient(model, params, x, labels, /*create_graph=*/true);
    at::Tensor dot = torch::zeros({}), norm = torch::zeros({});
    for (size_t i = 0; i < grads.size(); ++i) {
      dot = dot + (grads[i] * target[i]).sum();
      norm = norm + grads[i].pow(2).sum();
    }
    const at::Tensor cost =
        1 - dot / (norm.sqrt() * target_norm + 1e-12) + o.tv_weight * total_variation(x);
    cost.backward();
    x.mutable_grad() = x.grad().sign();  // signed gradients, as the reference implementation
    opt.step();
    torch::NoGradGuard ng;
    x.clamp_(o.low, o.high);
  }
  return x.detach();
}

}  // namespace concord::audit
