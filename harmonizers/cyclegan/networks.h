// The CycleGAN networks (Zhu et al., ICCV 2017; layer for layer as in the authors' reference,
// junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py, with instance norm and no dropout):
//   ResnetGenerator   c7s1-ngf, d(2 ngf), d(4 ngf), n_blocks x R(4 ngf), u(2 ngf), u(ngf),
//                     c7s1-out, tanh; reflection padding, InstanceNorm2d (affine off, no running
//                     statistics), biases on (the reference turns them on with instance norm).
//   PatchDiscriminator the 70x70 PatchGAN for n_layers = 3: C(ndf) without norm, C(2 ndf),
//                     C(4 ndf) stride 2, C(8 ndf) stride 1, then a 1-channel 4x4 convolution;
//                     LeakyReLU 0.2. Outputs one logit per patch (LSGAN loss on it).
// Parameter names follow the reference's nn.Sequential layout ("model.1.weight", ...), so a
// state exported here reads like the reference's state_dict.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

namespace concord::cyclegan {

struct ResnetGeneratorImpl : torch::nn::Module {
  ResnetGeneratorImpl(int64_t in_channels, int64_t out_channels, int64_t ngf, int64_t n_blocks);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Sequential model;
};
TORCH_MODULE(ResnetGenerator);

struct PatchDiscriminatorImpl : torch::nn::Module {
  PatchDiscriminatorImpl(int64_t in_channels, int64_t ndf, int64_t n_layers);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Sequential model;
};
TORCH_MODULE(PatchDiscriminator);

}  // namespace concord::cyclegan
