// unet: 2D U-Net (Ronneberger et al., MICCAI 2015) with BatchNorm after every convolution.
// The root has exactly two children, `encoder` and `decoder`; the final 1x1 convolution is
// `decoder.head`, so "share the encoder, keep the decoder local" keeps the whole output path
// local.
#include <concord/error.h>
#include <concord/torch_model.h>

#include <torch/nn/functional/pixelshuffle.h>
#include <torch/nn/functional/pooling.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

namespace concord {
namespace {

namespace nn = torch::nn;

// (3x3 conv -> BatchNorm -> ReLU) twice.
struct DoubleConvImpl : nn::Module {
  DoubleConvImpl(int64_t in, int64_t out)
      : conv1(register_module("conv1", conv3x3(in, out))),
        bn1(register_module("bn1", nn::BatchNorm2d(out))),
        conv2(register_module("conv2", conv3x3(out, out))),
        bn2(register_module("bn2", nn::BatchNorm2d(out))) {}
  static nn::Conv2d conv3x3(int64_t in, int64_t out) {
    return nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1).bias(false));
  }
  at::Tensor forward(const at::Tensor& x) {
    return torch::relu(bn2(conv2(torch::relu(bn1(conv1(x))))));
  }
  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  nn::Conv2d conv2;
  nn::BatchNorm2d bn2;
};
TORCH_MODULE(DoubleConv);

// Level l (0 = full resolution) has width * 2^l channels.
struct EncoderImpl : nn::Module {
  EncoderImpl(int64_t in, int64_t width, int64_t levels)
      : stem(register_module("stem", DoubleConv(in, width))) {
    for (int64_t l = 1; l <= levels; ++l)
      down.push_back(
          register_module("down" + std::to_string(l), DoubleConv(width << (l - 1), width << l)));
  }
  // The features of every level, full resolution first (the decoder's skip connections).
  std::vector<at::Tensor> forward(const at::Tensor& x) {
    std::vector<at::Tensor> features{stem(x)};
    for (auto& d : down)
      features.push_back(
          d(nn::functional::max_pool2d(features.back(), nn::functional::MaxPool2dFuncOptions(2))));
    return features;
  }
  DoubleConv stem;
  std::vector<DoubleConv> down;
};
TORCH_MODULE(Encoder);

// U-Net's 2x2 stride-2 up-convolution halving the channels, then concatenation with the skip
// and a DoubleConv. The up-convolution is computed as a 1x1 convolution to 4x the channels
// followed by a pixel shuffle (Shi et al., CVPR 2016): the same function, since the 2x2 kernels
// do not overlap (with one bias per output sub-pixel instead of per channel). LibTorch 1.13 runs
// ConvTranspose2d through slow_conv_transpose2d on CPU: this makes the whole U-Net ~1.7x faster.
struct UpImpl : nn::Module {
  explicit UpImpl(int64_t in)
      : upconv(register_module("upconv", nn::Conv2d(nn::Conv2dOptions(in, 4 * (in / 2), 1)))),
        conv(register_module("conv", DoubleConv(in, in / 2))) {}
  at::Tensor forward(const at::Tensor& x, const at::Tensor& skip) {
    return conv(torch::cat({skip, nn::functional::pixel_shuffle(upconv(x), 2)}, 1));
  }
  nn::Conv2d upconv;
  DoubleConv conv;
};
TORCH_MODULE(Up);

struct DecoderImpl : nn::Module {
  DecoderImpl(int64_t classes, int64_t width, int64_t levels) {
    for (int64_t l = levels; l >= 1; --l)  // deepest first, in the order they run
      up.push_back(register_module("up" + std::to_string(l), Up(width << l)));
    head = register_module("head", nn::Conv2d(nn::Conv2dOptions(width, classes, 1)));
  }
  at::Tensor forward(const std::vector<at::Tensor>& features) {
    at::Tensor x = features.back();
    for (size_t i = 0; i < up.size(); ++i) x = up[i]->forward(x, features[features.size() - 2 - i]);
    return head(x);
  }
  std::vector<Up> up;
  nn::Conv2d head{nullptr};
};
TORCH_MODULE(Decoder);

struct UNetImpl : nn::Module {
  UNetImpl(int64_t in, int64_t classes, int64_t width, int64_t levels)
      : encoder(register_module("encoder", Encoder(in, width, levels))),
        decoder(register_module("decoder", Decoder(classes, width, levels))) {}
  at::Tensor forward(const at::Tensor& x) { return decoder(encoder(x)); }
  Encoder encoder;
  Decoder decoder;
};

class UNet : public TorchModuleModel {
 public:
  UNet(const Args& args, const BuildContext& ctx)
      : TorchModuleModel(ctx.instance.empty() ? "unet" : "unet (" + ctx.instance + ")"),
        width_(args.integer("width")),
        levels_(args.integer("levels")),
        seed_(derive_model_seed(ctx.seed, "unet")) {}

  void build(const ModelSpec& spec) override {
    if (spec.task != Task::Segmentation)
      throw Error(plugin() +
                  ": is a segmentation model but the data is for classification"
                  " (use a classifier such as 'cnn')");
    if (spec.num_classes < 2)
      throw Error(plugin() + ": needs at least 2 classes (background included), the data has " +
                  std::to_string(spec.num_classes));
    if (spec.in_channels < 1)
      throw Error(plugin() + ": invalid number of input channels " +
                  std::to_string(spec.in_channels));
    net_ = std::make_shared<UNetImpl>(spec.in_channels, spec.num_classes, width_, levels_);
    install(net_, spec, seed_);
  }

 protected:
  at::Tensor run(const at::Tensor& input) override {
    const int64_t factor = int64_t(1) << levels_;
    if (input.size(2) % factor != 0 || input.size(3) % factor != 0)
      throw Error(plugin() + ": input size " + std::to_string(input.size(3)) + "x" +
                  std::to_string(input.size(2)) + " (width x height) is not divisible by 2^" +
                  std::to_string(levels_) + " = " + std::to_string(factor) +
                  "; resize or crop the images, or lower 'levels'");
    return net_->forward(input);
  }

 private:
  int64_t width_, levels_;
  uint64_t seed_;
  std::shared_ptr<UNetImpl> net_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-model-unet", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Model,
                "unet",
                "2D U-Net with BatchNorm; submodules 'encoder' and 'decoder' (head inside)",
                {ArgSpec::integer("width", 16, "Channels at full resolution (doubling per level)")
                     .range(1, 256),
                 ArgSpec::integer("levels", 3, "Number of 2x downsamplings").range(1, 6)},
                factory_of<UNet>()});
}
