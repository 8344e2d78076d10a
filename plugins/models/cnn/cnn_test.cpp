#include <concord/torch_model.h>

#include <torch/script.h>

#include "../model_test_support.h"

#include <filesystem>
#include <fstream>

using namespace concord;
using namespace concord::model_testing;

namespace {

ModelSpec classification(int channels, int classes, int size = 64) {
  ModelSpec spec;
  spec.task = Task::Classification;
  spec.in_channels = channels;
  spec.num_classes = classes;
  spec.image_size = {size, size};
  return spec;
}

}  // namespace

TEST(TorchModuleModel, ShortTypeNames) {
  EXPECT_EQ(TorchModuleModel::type_name("torch::nn::BatchNorm2dImpl"), "BatchNorm2d");
  EXPECT_EQ(TorchModuleModel::type_name("concord::(anonymous namespace)::ConvBlockImpl"),
            "ConvBlock");
  EXPECT_EQ(TorchModuleModel::type_name("Encoder"), "Encoder");
  EXPECT_EQ(TorchModuleModel::type_name("ns::Holder<ns::Thing>"), "Holder");
}

TEST(TorchModuleModel, DerivedSeedsAreStableAndSalted) {
  EXPECT_EQ(derive_model_seed(1, "cnn"), derive_model_seed(1, "cnn"));
  EXPECT_NE(derive_model_seed(1, "cnn"), derive_model_seed(2, "cnn"));
  EXPECT_NE(derive_model_seed(1, "cnn"), derive_model_seed(1, "unet"));
}

TEST(Cnn, ForwardShapesForAnyImageSize) {
  auto gray = make_model("cnn", {}, classification(1, 3));
  EXPECT_EQ(gray->forward(torch::randn({2, 1, 64, 64})).sizes(), (std::vector<int64_t>{2, 3}));
  // Odd, non-square and tiny sizes: pooling stops at 1 pixel, global pooling does the rest.
  EXPECT_EQ(gray->forward(torch::randn({1, 1, 37, 50})).sizes(), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(gray->forward(torch::randn({2, 1, 3, 1})).sizes(), (std::vector<int64_t>{2, 3}));
  // One 1x1 value per channel cannot be batch-normalised in training mode: a concord::Error.
  try {
    gray->forward(torch::randn({1, 1, 1, 1}));
    FAIL() << "BatchNorm in training mode needs more than one value per channel";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[1, 1, 1, 1]"), std::string::npos) << e.what();
  }
  gray->set_training(false);
  EXPECT_EQ(gray->forward(torch::randn({1, 1, 1, 1})).sizes(), (std::vector<int64_t>{1, 3}));

  auto rgb =
      make_model("cnn", {{"width", make_value(int64_t(8))}, {"depth", make_value(int64_t(2))}},
                 classification(3, 2));
  EXPECT_EQ(rgb->forward(torch::randn({4, 3, 32, 32})).sizes(), (std::vector<int64_t>{4, 2}));
  try {
    rgb->forward(torch::randn({4, 1, 32, 32}));
    FAIL() << "a 1-channel input to a 3-channel model must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cnn"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("3 input channel"), std::string::npos) << e.what();
  }
  EXPECT_THROW(rgb->forward(torch::randn({3, 32, 32})), Error);
}

TEST(Cnn, RefusesSegmentationAndBadArguments) {
  ModelSpec seg = classification(1, 2);
  seg.task = Task::Segmentation;
  try {
    make_model("cnn", {}, seg);
    FAIL() << "cnn must refuse a segmentation task";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cnn"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_model("cnn", {{"depth", make_value(int64_t(0))}}, classification(1, 2)), Error);
  EXPECT_THROW(make_model("cnn", {{"dropout", make_value(1.5)}}, classification(1, 2)), Error);
}

TEST(Cnn, StateAndModulesNameEveryPartWithItsType) {
  auto model = make_model("cnn", {{"width", make_value(int64_t(4))}}, classification(1, 2));
  const auto state = model->state();
  // depth 4: each block has conv.weight and bn.{weight, bias, running_mean, running_var,
  // num_batches_tracked}; then head.{weight, bias}.
  ASSERT_EQ(state.size(), 4u * 6 + 2);
  EXPECT_EQ(state[0].name, "features.block1.conv.weight");
  EXPECT_EQ(state[0].module_path, "features.block1.conv");
  EXPECT_EQ(state[0].module_type, "Conv2d");
  EXPECT_EQ(state.back().name, "head.bias");
  EXPECT_EQ(state.back().module_type, "Linear");

  const auto bn = entries_of_type(state, "BatchNorm2d");
  ASSERT_EQ(bn.size(), 4u * 5);
  for (const StateEntry& e : bn) EXPECT_EQ(e.module_path.substr(0, 14), "features.block");
  const StateEntry* mean = find_entry(state, "features.block2.bn.running_mean");
  ASSERT_NE(mean, nullptr);
  EXPECT_FALSE(mean->is_parameter);
  EXPECT_EQ(mean->module_path, "features.block2.bn");
  EXPECT_EQ(mean->tensor.size(0), 8);  // width 4, doubled in block 2
  EXPECT_TRUE(find_entry(state, "features.block2.bn.weight")->is_parameter);
  EXPECT_EQ(find_entry(state, "features.block4.bn.weight")->tensor.size(0), 32);
  EXPECT_EQ(find_entry(state, "head.weight")->tensor.sizes(), (std::vector<int64_t>{2, 32}));

  // Live tensors: writing through state() changes the model.
  find_entry(state, "head.bias")->tensor.data_ptr<float>()[0] = 5.0f;
  EXPECT_EQ(find_entry(model->state(), "head.bias")->tensor[0].item<float>(), 5.0f);

  std::map<std::string, std::string> types;
  for (const ModuleEntry& m : model->modules()) types[m.path] = m.type;
  EXPECT_EQ(types.at(""), "Cnn");
  EXPECT_EQ(types.at("features"), "Features");
  EXPECT_EQ(types.at("features.block1"), "ConvBlock");
  EXPECT_EQ(types.at("features.block1.bn"), "BatchNorm2d");
  EXPECT_EQ(types.at("head"), "Linear");
}

TEST(Cnn, InitialisationFollowsTheSeed) {
  auto a = make_model("cnn", {}, classification(1, 2), 7);
  auto b = make_model("cnn", {}, classification(1, 2), 7);
  auto c = make_model("cnn", {}, classification(1, 2), 8);
  EXPECT_TRUE(same_state(*a, *b));
  EXPECT_FALSE(same_state(*a, *c));
  const StateEntry* bn_w = find_entry(a->state(), "features.block1.bn.weight");
  EXPECT_TRUE(bn_w->tensor.eq(1).all().item<bool>());
}

TEST(Cnn, OneSgdStepLowersTheLossAndUpdatesBatchNormStatistics) {
  torch::manual_seed(3);
  auto model = make_model("cnn", {{"width", make_value(int64_t(8))}}, classification(1, 2));
  const at::Tensor x = torch::randn({8, 1, 32, 32});
  const at::Tensor y = torch::tensor({0, 1, 0, 1, 1, 0, 1, 0}, torch::kLong);
  const auto [before, after] = sgd_step_losses(*model, x, y, 0.05);
  EXPECT_LT(after, before);
  const auto state = model->state();
  EXPECT_EQ(find_entry(state, "features.block1.bn.num_batches_tracked")->tensor.item<int64_t>(), 2);
  EXPECT_FALSE(
      find_entry(state, "features.block1.bn.running_mean")->tensor.eq(0).all().item<bool>());

  // Evaluation mode leaves the statistics alone.
  model->set_training(false);
  const at::Tensor saved = find_entry(state, "features.block1.bn.running_mean")->tensor.clone();
  model->forward(x);
  EXPECT_TRUE(find_entry(model->state(), "features.block1.bn.running_mean")->tensor.equal(saved));
}

TEST(Cnn, SaveWritesAFileThatLoadsBackWithIdenticalOutputs) {
  testkit::TempDir dir;
  torch::manual_seed(4);
  auto model = make_model("cnn", {{"width", make_value(int64_t(8))}, {"dropout", make_value(0.3)}},
                          classification(3, 4), 1);
  const at::Tensor x = torch::randn({5, 3, 24, 24});
  sgd_step_losses(*model, x, torch::tensor({0, 1, 2, 3, 0}, torch::kLong), 0.1);
  model->set_training(false);
  const at::Tensor expected = model->forward(x);

  const std::string file = dir.str() + "/cnn.pt";
  model->save(file);
  ASSERT_TRUE(std::filesystem::exists(file));
  for (const auto& f : std::filesystem::directory_iterator(dir.path()))  // no temporary left
    EXPECT_EQ(f.path().filename(), "cnn.pt");

  // Another seed, then load(): identical weights, buffers and outputs.
  auto copy = make_model("cnn", {{"width", make_value(int64_t(8))}, {"dropout", make_value(0.3)}},
                         classification(3, 4), 2);
  EXPECT_FALSE(same_state(*model, *copy));
  auto* torch_copy = dynamic_cast<TorchModuleModel*>(copy.get());
  ASSERT_NE(torch_copy, nullptr);
  torch_copy->load(file);
  EXPECT_TRUE(same_state(*model, *copy));
  copy->set_training(false);
  EXPECT_TRUE(copy->forward(x).equal(expected));

  // The file is a TorchScript archive: torch.jit.load (Python) / torch::jit::load read it.
  torch::jit::Module archive = torch::jit::load(file);
  std::map<std::string, at::Tensor> saved;
  for (const auto& p : archive.named_parameters()) saved[p.name] = p.value;
  for (const auto& b : archive.named_buffers()) saved[b.name] = b.value;
  for (const StateEntry& e : model->state()) {
    ASSERT_TRUE(saved.count(e.name)) << e.name;
    EXPECT_TRUE(saved[e.name].equal(e.tensor)) << e.name;
  }
}

TEST(Cnn, LoadNamesTheFileAndTheMismatch) {
  testkit::TempDir dir;
  auto small = make_model("cnn", {{"width", make_value(int64_t(4))}}, classification(1, 2));
  auto wide = make_model("cnn", {{"width", make_value(int64_t(8))}}, classification(1, 2));
  const std::string file = dir.str() + "/small.pt";
  small->save(file);
  try {
    dynamic_cast<TorchModuleModel&>(*wide).load(file);
    FAIL() << "loading a width-4 file into a width-8 model must throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(file), std::string::npos) << what;
    EXPECT_NE(what.find("features.block1.conv.weight"), std::string::npos) << what;
  }
  const std::string garbage = dir.str() + "/garbage.pt";
  std::ofstream(garbage) << "not a model";
  try {
    dynamic_cast<TorchModuleModel&>(*wide).load(garbage);
    FAIL() << "loading garbage must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(garbage), std::string::npos) << e.what();
  }
}

// norm: group puts GroupNorm (gcd(channels, 8) groups, no running statistics) where BatchNorm
// was, norm: none nothing (the conv gets a bias); both train per sample (sample-level DP).
TEST(Cnn, NormGroupAndNoneHaveNoBatchNorm) {
  for (const std::string norm : {"group", "none"}) {
    Value choice;
    choice.type = ArgType::Enum;
    choice.s = norm;
    auto model = make_model(
        "cnn",
        {{"width", make_value(int64_t(4))}, {"depth", make_value(int64_t(2))}, {"norm", choice}},
        classification(1, 2, 16));
    const auto state = model->state();
    EXPECT_TRUE(entries_of_type(state, "BatchNorm2d").empty()) << norm;
    for (const StateEntry& e : state) EXPECT_TRUE(e.is_parameter) << e.name;  // no buffers
    std::map<std::string, std::string> types;
    for (const ModuleEntry& m : model->modules()) types[m.path] = m.type;
    if (norm == "group") {
      EXPECT_EQ(types.at("features.block2.gn"), "GroupNorm");
      EXPECT_EQ(find_entry(state, "features.block2.gn.weight")->tensor.size(0), 8);
      EXPECT_EQ(find_entry(state, "features.block1.conv.bias"), nullptr);
    } else {
      EXPECT_EQ(types.count("features.block2.gn"), 0u);
      EXPECT_NE(find_entry(state, "features.block1.conv.bias"), nullptr);
    }
    model->set_training(true);
    // One image alone gives the same output as in a batch: nothing mixes the samples.
    const at::Tensor x = torch::rand({3, 1, 16, 16});
    const at::Tensor batch = model->forward(x);
    EXPECT_TRUE(torch::allclose(model->forward(x.slice(0, 1, 2)), batch.slice(0, 1, 2), 1e-5, 1e-6))
        << norm;
  }
}
