// Gradient inversion ("inverting gradients", Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020;
// after DLG, Zhu, Liu, Han, NeurIPS 2019): images whose loss gradient on a model matches an
// observed one, found by gradient descent on the images. `concord audit` runs it against what a
// coordinator sees of one site's update. LibTorch: include only from the audit's own TUs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace concord::audit {

// A network's forward pass: NCHW images to logits (its parameters are passed alongside).
using Forward = std::function<at::Tensor(const at::Tensor&)>;

// The gradient of the mean cross-entropy of `model` on (x, labels) with respect to `params`;
// create_graph keeps it differentiable (the attack differentiates through it).
std::vector<at::Tensor> loss_gradient(const Forward& model, const std::vector<at::Tensor>& params,
                                      const at::Tensor& x, const at::Tensor& labels,
                                      bool create_graph);

struct AttackOptions {
  int iterations = 300;
  double lr = 0.1;          // Adam on the images
  double tv_weight = 1e-2;  // total-variation prior (Geiping et al.)
  uint64_t seed = 0;        // the dummy images' start
  float low = 0, high = 1;  // images are kept in [low, high]
};

// Images of `shape` (N, C, H, W) with the known `labels` (the label of a single image is
// recoverable from the last layer's gradient, Zhao et al. 2020) minimising
// 1 - cos(grad(x), target) + tv_weight * TV(x), the cosine over all parameters as one vector.
at::Tensor invert_gradients(const Forward& model, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& target, const at::Tensor& labels,
                            const std::vector<int64_t>& shape, const AttackOptions& options);

}  // namespace concord::audit
