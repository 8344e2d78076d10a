// `concord audit`: the gradient-inversion attack on a tiny case (the default small fully connected
// victim) recovers more of the true image than random images do, and DP noise at the budget makes
// it worse; files written.
#include <concord/dp_accountant.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "testing.h"

namespace fs = std::filesystem;
using namespace concord;

namespace {

// Runs `concord audit` (200 iterations) on a tiny brainsim pipeline whose model, training and
// privacy lines are given; returns audit.json, the output in `out`, the folder in `folder`.
nlohmann::json audit(const testkit::TempDir& dir, const std::string& train_per_site,
                     const std::string& lines, std::string& out, std::string& folder) {
  const std::string pipeline = dir.str() + "/tiny.yaml";
  std::ofstream(pipeline) << "name: tiny\nseed: 4\n"
                             "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: "
                          << train_per_site << ", test_per_site: 1, size: 16}}\n"
                          << lines << "federation: {rounds: 5}\n";
  folder = dir.str() + "/audit";
  const int rc = testkit::run_command(
      testkit::concord_exe() + " audit " + pipeline + " --iterations 200 --out " + folder, &out);
  EXPECT_EQ(rc, 0) << out;
  std::ifstream in(folder + "/audit.json");
  return rc == 0 ? nlohmann::json::parse(in) : nlohmann::json();
}

}  // namespace

TEST(Audit, AttackBeatsRandomOnPlainFedAvgAndDpMakesItWorse) {
  testkit::TempDir dir;
  std::string out, folder;
  const auto j = audit(dir, "2",
                       "model: {type: cnn, args: {width: 4, depth: 1}}\n"
                       "training: {lr: 0.01}\n"
                       "privacy: {epsilon: 8, clip: 0.1}\n",
                       out, folder);
  ASSERT_FALSE(j.is_null());
  EXPECT_NE(out.find("leakage audit"), std::string::npos) << out;
  ASSERT_TRUE(fs::exists(folder + "/montage.png"));
  const auto& s = j["scenarios"];
  const double plain = s["fedavg"]["ssim"], dp = s["dp"]["ssim"], random = s["random"]["ssim"];
  EXPECT_GT(plain, random + 0.1) << out;
  EXPECT_LT(dp, plain) << out;
  EXPECT_GT(s["fedavg"]["psnr"].get<double>(), s["random"]["psnr"].get<double>()) << out;
  EXPECT_DOUBLE_EQ(s["dp"]["epsilon"].get<double>(), 8.0);
}

// With `privacy: {level: sample}` the DP view is one DP-SGD step as the site takes it: each
// image's gradient clipped, noise at the site's plan (q = batch / n, rounds x epochs x steps).
TEST(Audit, SampleLevelDpViewUsesTheSitesDpSgdPlan) {
  testkit::TempDir dir;
  std::string out, folder;
  const auto j = audit(dir, "4",
                       "model: {type: cnn, args: {width: 4, depth: 1, norm: group}}\n"
                       "training: {lr: 0.01, batch_size: 2, local_epochs: 1}\n"
                       "privacy: {level: sample, epsilon: 8, clip: 0.1}\n",
                       out, folder);
  ASSERT_FALSE(j.is_null());
  const auto& scenarios = j["scenarios"];
  const auto& dp = scenarios["dp"];
  EXPECT_EQ(dp["level"], "sample") << dp.dump();
  EXPECT_LT(dp["ssim"].get<double>(), scenarios["fedavg"]["ssim"].get<double>()) << out;
  // q = 2 / 4, 5 rounds x 1 epoch x 2 steps: the accountant's sigma for that plan.
  EXPECT_DOUBLE_EQ(dp["q"].get<double>(), 0.5);
  EXPECT_EQ(dp["planned_steps"].get<int>(), 10);
  EXPECT_DOUBLE_EQ(dp["noise_multiplier"].get<double>(),
                   dp::noise_multiplier_for(8, 1e-5, 0.5, 10));
  EXPECT_DOUBLE_EQ(dp["noise_std"].get<double>(), dp["noise_multiplier"].get<double>() * 0.1 / 2);
  EXPECT_NE(out.find("dp (sample level): epsilon 8"), std::string::npos) << out;
}
