// The fixture is a scripted network built here in C++ (conv -> BatchNorm -> ReLU -> mean ->
// linear), with the qualified class names torch.jit.script gives torch.nn modules, saved with
// torch::jit::Module::save exactly as Python's torch.jit.save would.
#include <torch/script.h>

#include "../model_test_support.h"

#include <filesystem>
#include <fstream>

using namespace concord;
using namespace concord::model_testing;

namespace {

using torch::jit::Module;

Module scripted(const std::shared_ptr<torch::jit::CompilationUnit>& cu, const std::string& cls) {
  Module m(c10::QualifiedName(cls), cu, /*shouldMangle=*/true);
  m.register_attribute("training", c10::BoolType::get(), true);
  return m;
}

Module make_fixture(int64_t in, int64_t channels, int64_t classes) {
  torch::manual_seed(9);
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  Module conv = scripted(cu, "__torch__.torch.nn.modules.conv.Conv2d");
  conv.register_parameter("weight", torch::randn({channels, in, 3, 3}).mul_(0.3).requires_grad_(),
                          false);
  conv.register_parameter("bias", torch::zeros({channels}).requires_grad_(), false);
  conv.define(R"(
def forward(self, x):
    return torch.conv2d(x, self.weight, self.bias, [1, 1], [1, 1], [1, 1], 1)
)");
  Module bn = scripted(cu, "__torch__.torch.nn.modules.batchnorm.BatchNorm2d");
  bn.register_parameter("weight", torch::ones({channels}).requires_grad_(), false);
  bn.register_parameter("bias", torch::zeros({channels}).requires_grad_(), false);
  bn.register_buffer("running_mean", torch::zeros({channels}));
  bn.register_buffer("running_var", torch::ones({channels}));
  bn.register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
  bn.define(R"(
def forward(self, x):
    if self.training:
        self.num_batches_tracked.add_(1)
    return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            self.training, 0.1, 1e-5, False)
)");
  Module fc = scripted(cu, "__torch__.torch.nn.modules.linear.Linear");
  fc.register_parameter("weight", torch::randn({classes, channels}).mul_(0.3).requires_grad_(),
                        false);
  fc.register_parameter("bias", torch::zeros({classes}).requires_grad_(), false);
  fc.define(R"(
def forward(self, x):
    return torch.linear(x, self.weight, self.bias)
)");
  Module net = scripted(cu, "__torch__.TinyNet");
  net.register_module("conv", conv);
  net.register_module("bn", bn);
  net.register_module("fc", fc);
  net.define(R"(
def forward(self, x):
    return self.fc.forward(torch.mean(torch.relu(self.bn.forward(self.conv.forward(x))), [2, 3]))
)");
  return net;
}

std::string write_fixture(const testkit::TempDir& dir) {
  const std::string file = dir.str() + "/tiny.pt";
  make_fixture(1, 4, 3).save(file);
  return file;
}

std::map<std::string, Value> file_arg(const std::string& file) {
  return {{"file", make_value(file)}};
}

}  // namespace

TEST(TorchScript, LoadsRunsAndReportsStateWithTypes) {
  testkit::TempDir dir;
  const std::string file = write_fixture(dir);
  auto model = make_model("torchscript", file_arg(file), ModelSpec{});
  model->set_training(false);
  EXPECT_EQ(model->forward(torch::randn({2, 1, 16, 16})).sizes(), (std::vector<int64_t>{2, 3}));

  const auto state = model->state();
  std::vector<std::string> names;
  for (const StateEntry& e : state) names.push_back(e.name);
  EXPECT_EQ(names, (std::vector<std::string>{"conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                             "bn.running_mean", "bn.running_var",
                                             "bn.num_batches_tracked", "fc.weight", "fc.bias"}));
  const auto bn = entries_of_type(state, "BatchNorm2d");
  ASSERT_EQ(bn.size(), 5u);
  EXPECT_EQ(bn[2].name, "bn.running_mean");
  EXPECT_FALSE(bn[2].is_parameter);
  EXPECT_TRUE(bn[0].is_parameter);
  EXPECT_EQ(bn[0].module_path, "bn");
  EXPECT_EQ(find_entry(state, "conv.weight")->module_type, "Conv2d");
  EXPECT_EQ(find_entry(state, "fc.bias")->module_type, "Linear");

  std::map<std::string, std::string> types;
  for (const ModuleEntry& m : model->modules()) types[m.path] = m.type;
  EXPECT_EQ(types,
            (std::map<std::string, std::string>{
                {"", "TinyNet"}, {"conv", "Conv2d"}, {"bn", "BatchNorm2d"}, {"fc", "Linear"}}));
}

TEST(TorchScript, TrainsInPlace) {
  testkit::TempDir dir;
  auto model = make_model("torchscript", file_arg(write_fixture(dir)), ModelSpec{});
  torch::manual_seed(10);
  const at::Tensor x = torch::randn({6, 1, 12, 12});
  const at::Tensor y = torch::tensor({0, 1, 2, 0, 1, 2}, torch::kLong);
  const auto [before, after] = sgd_step_losses(*model, x, y, 0.1);
  EXPECT_LT(after, before);
  EXPECT_EQ(find_entry(model->state(), "bn.num_batches_tracked")->tensor.item<int64_t>(), 2);
  // Evaluation mode uses and keeps the running statistics.
  model->set_training(false);
  const at::Tensor mean = find_entry(model->state(), "bn.running_mean")->tensor.clone();
  model->forward(x);
  EXPECT_TRUE(find_entry(model->state(), "bn.running_mean")->tensor.equal(mean));
}

TEST(TorchScript, SaveRoundTripsThroughTorchJitLoad) {
  testkit::TempDir dir;
  auto model = make_model("torchscript", file_arg(write_fixture(dir)), ModelSpec{});
  torch::manual_seed(11);
  const at::Tensor x = torch::randn({3, 1, 10, 10});
  sgd_step_losses(*model, x, torch::tensor({2, 1, 0}, torch::kLong), 0.1);
  model->set_training(false);
  const at::Tensor expected = model->forward(x);

  const std::string out = dir.str() + "/trained.pt";
  model->save(out);
  torch::jit::Module loaded = torch::jit::load(out);
  loaded.eval();
  EXPECT_TRUE(loaded.forward({x}).toTensor().equal(expected));

  auto again = make_model("torchscript", file_arg(out), ModelSpec{});
  again->set_training(false);
  EXPECT_TRUE(same_state(*model, *again));
  EXPECT_TRUE(again->forward(x).equal(expected));
  for (const StateEntry& e : again->state()) {
    if (e.is_parameter) {
      EXPECT_TRUE(e.tensor.requires_grad()) << e.name;
    }
  }
}

TEST(TorchScript, ErrorsNameTheFile) {
  testkit::TempDir dir;
  const std::string missing = dir.str() + "/missing.pt";
  try {
    make_model("torchscript", file_arg(missing), ModelSpec{});
    FAIL() << "a missing file must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.pt"), std::string::npos) << e.what();
  }
  const std::string garbage = dir.str() + "/garbage.pt";
  std::ofstream(garbage) << "not a TorchScript archive";
  try {
    make_model("torchscript", file_arg(garbage), ModelSpec{});
    FAIL() << "a corrupt file must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(garbage), std::string::npos) << e.what();
  }
  auto model = make_model("torchscript", file_arg(write_fixture(dir)), ModelSpec{});
  try {
    model->forward(torch::randn({1, 2, 8, 8}));  // the fixture expects 1 channel
    FAIL() << "a wrong input must be reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tiny.pt"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[1, 2, 8, 8]"), std::string::npos) << e.what();
  }
}
