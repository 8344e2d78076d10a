#include <concord/torch_model.h>

#include "../model_test_support.h"

#include <set>

using namespace concord;
using namespace concord::model_testing;

namespace {

ModelSpec segmentation(int channels, int classes) {
  ModelSpec spec;
  spec.task = Task::Segmentation;
  spec.in_channels = channels;
  spec.num_classes = classes;
  return spec;
}

std::map<std::string, Value> small_unet() {
  return {{"width", make_value(int64_t(4))}, {"levels", make_value(int64_t(2))}};
}

}  // namespace

TEST(UNet, ForwardShapes) {
  auto model = make_model("unet", {}, segmentation(1, 3));
  EXPECT_EQ(model->forward(torch::randn({2, 1, 64, 64})).sizes(),
            (std::vector<int64_t>{2, 3, 64, 64}));
  EXPECT_EQ(model->forward(torch::randn({1, 1, 32, 48})).sizes(),
            (std::vector<int64_t>{1, 3, 32, 48}));
  auto rgb = make_model("unet", small_unet(), segmentation(3, 2));
  EXPECT_EQ(rgb->forward(torch::randn({2, 3, 12, 20})).sizes(),
            (std::vector<int64_t>{2, 2, 12, 20}));
}

TEST(UNet, SizeNotDivisibleByTwoToTheLevelsNamesTheSize) {
  auto model = make_model("unet", {}, segmentation(1, 2));
  try {
    model->forward(torch::randn({1, 1, 64, 60}));
    FAIL() << "60 is not divisible by 8";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("unet"), std::string::npos) << what;
    EXPECT_NE(what.find("60x64"), std::string::npos) << what;
    EXPECT_NE(what.find("2^3 = 8"), std::string::npos) << what;
  }
  ModelSpec cls = segmentation(1, 2);
  cls.task = Task::Classification;
  EXPECT_THROW(make_model("unet", {}, cls), Error);
}

TEST(UNet, EncoderAndDecoderAreTheTwoTopLevelParts) {
  auto model = make_model("unet", small_unet(), segmentation(1, 2));
  std::set<std::string> top;
  std::map<std::string, std::string> types;
  for (const ModuleEntry& m : model->modules()) {
    types[m.path] = m.type;
    if (!m.path.empty() && m.path.find('.') == std::string::npos) top.insert(m.path);
  }
  EXPECT_EQ(top, (std::set<std::string>{"encoder", "decoder"}));
  EXPECT_EQ(types.at(""), "UNet");
  EXPECT_EQ(types.at("encoder"), "Encoder");
  EXPECT_EQ(types.at("encoder.down2.bn1"), "BatchNorm2d");
  EXPECT_EQ(types.at("decoder.up1.upconv"), "Conv2d");  // 2x2 up-convolution as 1x1 + shuffle
  EXPECT_EQ(types.at("decoder.head"), "Conv2d");

  const auto state = model->state();
  for (const StateEntry& e : state)
    EXPECT_TRUE(e.name.rfind("encoder.", 0) == 0 || e.name.rfind("decoder.", 0) == 0) << e.name;
  // DoubleConvs: encoder stem, down1, down2; decoder up2, up1: 2 BatchNorms each, 5 entries.
  const auto bn = entries_of_type(state, "BatchNorm2d");
  EXPECT_EQ(bn.size(), 5u * 2 * 5);
  size_t in_decoder = 0;
  for (const StateEntry& e : bn) in_decoder += e.module_path.rfind("decoder.", 0) == 0;
  EXPECT_EQ(in_decoder, 2u * 2 * 5);
  const StateEntry* deepest = find_entry(state, "encoder.down2.bn2.running_var");
  ASSERT_NE(deepest, nullptr);
  EXPECT_FALSE(deepest->is_parameter);
  EXPECT_EQ(deepest->tensor.size(0), 16);  // width 4 * 2^2
  EXPECT_EQ(find_entry(state, "decoder.head.weight")->tensor.sizes(),
            (std::vector<int64_t>{2, 4, 1, 1}));
}

TEST(UNet, OneSgdStepLowersTheLoss) {
  torch::manual_seed(5);
  auto model = make_model("unet", small_unet(), segmentation(1, 3));
  const at::Tensor x = torch::randn({4, 1, 16, 16});
  const at::Tensor y =
      (x.squeeze(1) > 0.5).to(torch::kLong) + (x.squeeze(1) > 1.0).to(torch::kLong);
  const auto [before, after] = sgd_step_losses(*model, x, y, 0.05);
  EXPECT_LT(after, before);
}

TEST(UNet, SaveAndLoadGiveIdenticalOutputs) {
  testkit::TempDir dir;
  torch::manual_seed(6);
  auto model = make_model("unet", small_unet(), segmentation(1, 2), 11);
  const at::Tensor x = torch::randn({2, 1, 16, 16});
  sgd_step_losses(*model, x, (x.squeeze(1) > 0).to(torch::kLong), 0.1);
  model->set_training(false);
  const at::Tensor expected = model->forward(x);
  const std::string file = dir.str() + "/unet.pt";
  model->save(file);

  auto copy = make_model("unet", small_unet(), segmentation(1, 2), 12);
  dynamic_cast<TorchModuleModel&>(*copy).load(file);
  copy->set_training(false);
  EXPECT_TRUE(same_state(*model, *copy));
  EXPECT_TRUE(copy->forward(x).equal(expected));
}
