// The adapters through the real engine: brainsim sites, the cnn and unet models, FedAvg. What a
// site keeps is read back from the run's checkpoint (global state once, each site's local state
// and store separately), which is exactly what the engine persists.
#include <concord/engine.h>
#include <concord/message.h>
#include <concord/protocol.h>
#include <concord/tensor_bridge.h>

#include "testing.h"

#include <ATen/ATen.h>

#include <set>

using namespace concord;
namespace fs = std::filesystem;

namespace {

std::string pipeline(const std::string& adapter, int rounds,
                     const std::string& task = "classification",
                     const std::string& model = "{type: cnn, args: {width: 8, depth: 2}}",
                     const std::string& extra = "") {
  return "name: adapters-e2e\nseed: 5\n"
         "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: 12, "
         "test_per_site: 6, size: 32, task: " +
         task + "}}\nmodel: " + model +
         "\ntraining: {local_epochs: 1, batch_size: 6, lr: 0.01}\n"
         "federation: {rounds: " +
         std::to_string(rounds) + "}\nadapter: " + adapter + "\n" + extra;
}

struct RunResult {
  RunSummary summary;
  NamedArrays global;
  std::map<std::string, NamedArrays> local, store;  // per site
};

RunResult run(const std::string& text) {
  testkit::TempDir dir;
  Experiment exp(parse_pipeline(text, "adapters-e2e.yaml", {}, testkit::builtin_registry()),
                 testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.str();
  RunResult r;
  r.summary = exp.run(o);
  char name[32];
  std::snprintf(name, sizeof(name), "round-%04d.ckpt", r.summary.rounds_completed);
  std::vector<std::string> sites;
  for (const auto& s : r.summary.sites) sites.push_back(s.site);
  protocol::Checkpoint ckpt = protocol::read_checkpoint(
      decode(read_file((dir.path() / "checkpoints" / name).string())), sites);
  r.global = std::move(ckpt.global);
  for (auto& [site, state] : ckpt.sites) {
    if (!state.local.empty()) r.local[site] = std::move(state.local);
    if (!state.store.empty()) r.store[site] = std::move(state.store);
  }
  return r;
}

bool same(const Array& a, const Array& b) {
  return to_tensor(a).equal(to_tensor(b));
}

bool has_prefix(const NamedArrays& m, const std::string& prefix) {
  for (const auto& [k, v] : m)
    if (k.rfind(prefix, 0) == 0) return true;
  return false;
}

}  // namespace

TEST(AdaptersEngine, FedBNKeepsBatchNormPerSiteAndSharesConvolutions) {
  RunResult r = run(pipeline("{type: batchnorm, args: {policy: local}}", 1));
  ASSERT_EQ(r.summary.rounds_completed, 1);
  ASSERT_EQ(r.local.size(), 3u);
  // Convolutions and the head: one global value, the same for every site; nothing per site.
  for (const char* name :
       {"features.block1.conv.weight", "features.block2.conv.weight", "head.weight"})
    EXPECT_TRUE(r.global.count(name)) << name;
  EXPECT_FALSE(has_prefix(r.global, "features.block1.bn."));
  for (const auto& [site, local] : r.local) {
    EXPECT_FALSE(has_prefix(local, "features.block1.conv")) << site;
    for (const char* name :
         {"features.block1.bn.weight", "features.block1.bn.bias", "features.block1.bn.running_mean",
          "features.block1.bn.running_var", "features.block2.bn.running_var"})
      EXPECT_TRUE(local.count(name)) << site << " " << name;
  }
  // After one round each site's BatchNorm state is its own.
  std::vector<std::string> sites;
  for (const auto& [s, l] : r.local) sites.push_back(s);
  for (size_t i = 0; i < sites.size(); ++i)
    for (size_t j = i + 1; j < sites.size(); ++j)
      for (const char* name : {"features.block1.bn.weight", "features.block1.bn.running_mean",
                               "features.block2.bn.running_var"})
        EXPECT_FALSE(same(r.local[sites[i]].at(name), r.local[sites[j]].at(name)))
            << sites[i] << " vs " << sites[j] << ": " << name;
  for (const auto& s : r.summary.sites) EXPECT_TRUE(s.metrics.count("accuracy")) << s.site;
}

TEST(AdaptersEngine, SiloBNSharesAffineParametersOnly) {
  RunResult r =
      run(pipeline("{type: batchnorm, args: {policy: stats-local}}", 1, "classification",
                   "{type: cnn, args: {width: 8, depth: 2}}", "evaluation: {held_out: [site-C]}"));
  EXPECT_TRUE(r.global.count("features.block1.bn.weight"));
  EXPECT_TRUE(r.global.count("features.block1.bn.bias"));
  EXPECT_FALSE(r.global.count("features.block1.bn.running_mean"));
  for (const std::string site : {"site-A", "site-B"}) {
    ASSERT_TRUE(r.local.count(site)) << site;
    EXPECT_TRUE(r.local[site].count("features.block1.bn.running_mean")) << site;
    EXPECT_TRUE(r.local[site].count("features.block1.bn.num_batches_tracked")) << site;
    EXPECT_FALSE(r.local[site].count("features.block1.bn.weight")) << site;
  }
  EXPECT_FALSE(same(r.local["site-A"].at("features.block1.bn.running_mean"),
                    r.local["site-B"].at("features.block1.bn.running_mean")));
  // The held-out site evaluates (after re-estimating its statistics without labels).
  bool held_out_seen = false;
  for (const auto& s : r.summary.sites)
    if (s.site == "site-C") {
      held_out_seen = true;
      EXPECT_TRUE(s.held_out);
      EXPECT_TRUE(s.metrics.count("accuracy"));
    }
  EXPECT_TRUE(held_out_seen);
}

TEST(AdaptersEngine, UNetSharedEncoderSiteSpecificDecoder) {
  RunResult r = run(pipeline("{type: split, args: {shared: [encoder], local: [decoder]}}", 1,
                             "segmentation", "{type: unet, args: {width: 4, levels: 2}}"));
  ASSERT_FALSE(r.global.empty());
  for (const auto& [name, v] : r.global) EXPECT_EQ(name.rfind("encoder.", 0), 0u) << name;
  ASSERT_EQ(r.local.size(), 3u);
  for (const auto& [site, local] : r.local) {
    ASSERT_FALSE(local.empty()) << site;
    for (const auto& [name, v] : local) EXPECT_EQ(name.rfind("decoder.", 0), 0u) << name;
  }
  EXPECT_FALSE(same(r.local["site-A"].at("decoder.head.weight"),
                    r.local["site-B"].at("decoder.head.weight")));
  for (const auto& s : r.summary.sites) EXPECT_TRUE(s.metrics.count("dice")) << s.site;
}

TEST(AdaptersEngine, SplitNamesUnknownModulePathsInThePipeline) {
  const std::string text = pipeline("{type: split, args: {shared: [encoder], local: [head]}}", 1);
  try {
    run(text);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("unknown module path 'encoder'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("features.block1"), std::string::npos) << msg;
  }
}

TEST(AdaptersEngine, DittoAndFineTuneReportGlobalAndPersonalizedMetrics) {
  RunResult ditto = run(pipeline("{type: ditto, args: {lambda: 0.1, epochs: 1}}", 2));
  ASSERT_EQ(ditto.store.size(), 3u);
  for (const auto& [site, store] : ditto.store) {
    ASSERT_TRUE(store.count("ditto.personal/head.weight")) << site;
    EXPECT_FALSE(same(store.at("ditto.personal/head.weight"), ditto.global.at("head.weight")))
        << site;
  }
  for (const auto& s : ditto.summary.sites) {
    EXPECT_TRUE(s.metrics.count("accuracy")) << s.site;
    EXPECT_TRUE(s.personalized.count("accuracy")) << s.site;
  }

  RunResult ft = run(pipeline("{type: finetune, args: {epochs: 2}}", 1));
  for (const auto& s : ft.summary.sites) {
    EXPECT_TRUE(s.metrics.count("accuracy")) << s.site;
    EXPECT_TRUE(s.personalized.count("accuracy")) << s.site;
  }
}
