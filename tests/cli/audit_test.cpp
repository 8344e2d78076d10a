// `concord audit`: the gradient-inversion attack on a tiny case (the default small fully connected
// victim) recovers more of the true image than random images do, and DP noise at the budget makes
// it worse; files written.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "testing.h"

namespace fs = std::filesystem;
using namespace concord;

TEST(Audit, AttackBeatsRandomOnPlainFedAvgAndDpMakesItWorse) {
  testkit::TempDir dir;
  const std::string pipeline = dir.str() + "/tiny.yaml";
  std::ofstream(pipeline) << "name: tiny\nseed: 4\n"
                             "data:\n  dataset: {type: brainsim, args: {sites: 3, "
                             "train_per_site: 2, test_per_site: 1, size: 16}}\n"
                             "model: {type: cnn, args: {width: 4, depth: 1}}\n"
                             "training: {lr: 0.01}\n"
                             "federation: {rounds: 5}\n"
                             "privacy: {epsilon: 8, clip: 0.1}\n";
  std::string out;
  const std::string folder = dir.str() + "/audit";
  ASSERT_EQ(testkit::run_command(
                testkit::concord_exe() + " audit " + pipeline + " --iterations 200 --out " + folder,
                &out),
            0)
      << out;
  EXPECT_NE(out.find("leakage audit"), std::string::npos) << out;
  ASSERT_TRUE(fs::exists(folder + "/montage.png"));
  std::ifstream in(folder + "/audit.json");
  const auto j = nlohmann::json::parse(in);
  const auto& s = j["scenarios"];
  const double plain = s["fedavg"]["ssim"], dp = s["dp"]["ssim"], random = s["random"]["ssim"];
  EXPECT_GT(plain, random + 0.1) << out;
  EXPECT_LT(dp, plain) << out;
  EXPECT_GT(s["fedavg"]["psnr"].get<double>(), s["random"]["psnr"].get<double>()) << out;
  EXPECT_DOUBLE_EQ(s["dp"]["epsilon"].get<double>(), 8.0);
}
