// cnn: a plain convolutional classifier with BatchNorm and global average pooling.
// Blocks of 3x3 conv -> BatchNorm -> ReLU (Ioffe & Szegedy, ICML 2015), 2x2 max pooling between
// blocks, global average pooling (Lin et al., ICLR 2014) so that any image size works.
// `norm: group` puts GroupNorm (Wu & He, ECCV 2018) in BatchNorm's place and `none` nothing:
// per-sample computations such as sample-level DP-SGD cannot use batch statistics.
#include <concord/error.h>
#include <concord/torch_model.h>

// The specific module headers instead of <torch/torch.h>: ~30% less compile time.
#include <torch/nn/functional/pooling.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <numeric>

namespace concord {
namespace {

namespace nn = torch::nn;

struct ConvBlockImpl : nn::Module {
  // norm: "batch" (module `bn`), "group" (`gn`, gcd(out, 8) groups) or "none" (the conv has a
  // bias instead).
  ConvBlockImpl(int64_t in, int64_t out, const std::string& norm)
      : conv(register_module(
            "conv", nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1).bias(norm == "none")))) {
    if (norm == "batch") bn = register_module("bn", nn::BatchNorm2d(out));
    if (norm == "group")
      gn = register_module("gn",
                           nn::GroupNorm(nn::GroupNormOptions(std::gcd(out, int64_t(8)), out)));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = conv(x);
    if (bn) y = bn(y);
    if (gn) y = gn(y);
    return torch::relu(y);
  }
  nn::Conv2d conv;
  nn::BatchNorm2d bn{nullptr};
  nn::GroupNorm gn{nullptr};
};
TORCH_MODULE(ConvBlock);

// Block i (1-based) has width * 2^min(i-1, 3) channels.
int64_t block_channels(int64_t width, int64_t i) {
  return width << std::min<int64_t>(i - 1, 3);
}

struct FeaturesImpl : nn::Module {
  FeaturesImpl(int64_t in, int64_t width, int64_t depth, const std::string& norm) {
    for (int64_t i = 1; i <= depth; ++i) {
      const int64_t prev = i == 1 ? in : block_channels(width, i - 1);
      blocks.push_back(register_module("block" + std::to_string(i),
                                       ConvBlock(prev, block_channels(width, i), norm)));
    }
  }
  at::Tensor forward(at::Tensor x) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      x = blocks[i](x);
      // Halve each side between blocks while it is at least 2 pixels: small images still work.
      const int64_t kh = x.size(2) >= 2 ? 2 : 1, kw = x.size(3) >= 2 ? 2 : 1;
      if (i + 1 < blocks.size() && kh * kw > 1)
        x = nn::functional::max_pool2d(x, nn::functional::MaxPool2dFuncOptions({kh, kw}));
    }
    return x;
  }
  std::vector<ConvBlock> blocks;
};
TORCH_MODULE(Features);

struct CnnImpl : nn::Module {
  CnnImpl(int64_t in, int64_t classes, int64_t width, int64_t depth, double dropout,
          const std::string& norm)
      : features(register_module("features", Features(in, width, depth, norm))),
        dropout(register_module("dropout", nn::Dropout(dropout))),
        head(register_module("head", nn::Linear(block_channels(width, depth), classes))) {}
  at::Tensor forward(const at::Tensor& x) {
    return head(dropout(features(x).mean({2, 3})));  // global average pooling
  }
  Features features;
  nn::Dropout dropout;
  nn::Linear head;
};

class Cnn : public TorchModuleModel {
 public:
  Cnn(const Args& args, const BuildContext& ctx)
      : TorchModuleModel(ctx.instance.empty() ? "cnn" : "cnn (" + ctx.instance + ")"),
        width_(args.integer("width")),
        depth_(args.integer("depth")),
        dropout_(args.real("dropout")),
        norm_(args.str("norm")),
        seed_(derive_model_seed(ctx.seed, "cnn")) {}

  void build(const ModelSpec& spec) override {
    if (spec.task != Task::Classification)
      throw Error(plugin() +
                  ": is a classifier but the data is for segmentation"
                  " (use a segmentation model such as 'unet')");
    if (spec.num_classes < 2)
      throw Error(plugin() + ": needs at least 2 classes, the data has " +
                  std::to_string(spec.num_classes));
    if (spec.in_channels < 1)
      throw Error(plugin() + ": invalid number of input channels " +
                  std::to_string(spec.in_channels));
    net_ = std::make_shared<CnnImpl>(spec.in_channels, spec.num_classes, width_, depth_, dropout_,
                                     norm_);
    install(net_, spec, seed_);
  }

 protected:
  at::Tensor run(const at::Tensor& input) override { return net_->forward(input); }

 private:
  int64_t width_, depth_;
  double dropout_;
  std::string norm_;
  uint64_t seed_;
  std::shared_ptr<CnnImpl> net_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-model-cnn", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Model,
                "cnn",
                "Convolutional classifier: conv-BatchNorm-ReLU blocks, global average pooling",
                {ArgSpec::integer("width", 32, "Channels of the first block (doubling, up to 8x)")
                     .range(1, 512),
                 ArgSpec::integer("depth", 4, "Number of conv blocks").range(1, 8),
                 ArgSpec::real("dropout", 0.0, "Dropout probability before the linear head")
                     .range(0.0, 0.95),
                 ArgSpec::choice("norm", {"batch", "group", "none"}, "batch",
                                 "Normalisation after each conv: BatchNorm, GroupNorm (per "
                                 "sample: sample-level DP) or none")},
                factory_of<Cnn>()});
}
