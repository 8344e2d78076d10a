#include "networks.h"

#include <torch/nn/functional/instancenorm.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/instancenorm.h>
#include <torch/nn/modules/padding.h>

#include <algorithm>

namespace concord::cyclegan {

namespace nn = torch::nn;

namespace {

nn::InstanceNorm2d norm(int64_t c) {
  return nn::InstanceNorm2d(nn::InstanceNorm2dOptions(c));
}
nn::ReLU relu() {
  return nn::ReLU(nn::ReLUOptions(true));
}

// x + (pad, conv3, IN, ReLU, pad, conv3, IN)(x)
struct ResnetBlockImpl : nn::Module {
  explicit ResnetBlockImpl(int64_t dim) {
    conv_block = register_module(
        "conv_block", nn::Sequential(nn::ReflectionPad2d(nn::ReflectionPad2dOptions(1)),
                                     nn::Conv2d(nn::Conv2dOptions(dim, dim, 3)), norm(dim), relu(),
                                     nn::ReflectionPad2d(nn::ReflectionPad2dOptions(1)),
                                     nn::Conv2d(nn::Conv2dOptions(dim, dim, 3)), norm(dim)));
  }
  at::Tensor forward(const at::Tensor& x) { return x + conv_block->forward(x); }
  nn::Sequential conv_block;
};
TORCH_MODULE(ResnetBlock);

}  // namespace

ResnetGeneratorImpl::ResnetGeneratorImpl(int64_t in_channels, int64_t out_channels, int64_t ngf,
                                         int64_t n_blocks) {
  nn::Sequential s;
  s->push_back(nn::ReflectionPad2d(nn::ReflectionPad2dOptions(3)));
  s->push_back(nn::Conv2d(nn::Conv2dOptions(in_channels, ngf, 7)));
  s->push_back(norm(ngf));
  s->push_back(relu());
  for (int i = 0; i < 2; ++i) {  // downsampling
    const int64_t mult = int64_t(1) << i;
    s->push_back(nn::Conv2d(nn::Conv2dOptions(ngf * mult, ngf * mult * 2, 3).stride(2).padding(1)));
    s->push_back(norm(ngf * mult * 2));
    s->push_back(relu());
  }
  for (int64_t i = 0; i < n_blocks; ++i) s->push_back(ResnetBlock(ngf * 4));
  for (int i = 0; i < 2; ++i) {  // upsampling
    const int64_t mult = int64_t(4) >> i;
    s->push_back(nn::ConvTranspose2d(nn::ConvTranspose2dOptions(ngf * mult, ngf * mult / 2, 3)
                                         .stride(2)
                                         .padding(1)
                                         .output_padding(1)));
    s->push_back(norm(ngf * mult / 2));
    s->push_back(relu());
  }
  s->push_back(nn::ReflectionPad2d(nn::ReflectionPad2dOptions(3)));
  s->push_back(nn::Conv2d(nn::Conv2dOptions(ngf, out_channels, 7)));
  s->push_back(nn::Tanh());
  model = register_module("model", s);
}

at::Tensor ResnetGeneratorImpl::forward(const at::Tensor& x) {
  return model->forward(x);
}

PatchDiscriminatorImpl::PatchDiscriminatorImpl(int64_t in_channels, int64_t ndf, int64_t n_layers) {
  auto lrelu = [] {
    return nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2).inplace(true));
  };
  nn::Sequential s;
  s->push_back(nn::Conv2d(nn::Conv2dOptions(in_channels, ndf, 4).stride(2).padding(1)));
  s->push_back(lrelu());
  int64_t mult = 1, prev = 1;
  for (int64_t n = 1; n < n_layers; ++n) {
    prev = mult;
    mult = std::min<int64_t>(int64_t(1) << n, 8);
    s->push_back(nn::Conv2d(nn::Conv2dOptions(ndf * prev, ndf * mult, 4).stride(2).padding(1)));
    s->push_back(norm(ndf * mult));
    s->push_back(lrelu());
  }
  prev = mult;
  mult = std::min<int64_t>(int64_t(1) << n_layers, 8);
  s->push_back(nn::Conv2d(nn::Conv2dOptions(ndf * prev, ndf * mult, 4).stride(1).padding(1)));
  s->push_back(norm(ndf * mult));
  s->push_back(lrelu());
  s->push_back(nn::Conv2d(nn::Conv2dOptions(ndf * mult, 1, 4).stride(1).padding(1)));
  model = register_module("model", s);
}

at::Tensor PatchDiscriminatorImpl::forward(const at::Tensor& x) {
  return model->forward(x);
}

}  // namespace concord::cyclegan
