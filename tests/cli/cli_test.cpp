// The `concord` executable as users run it.
#include <filesystem>
#include <fstream>
#include <regex>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {
std::string exe() {
  return testkit::concord_exe();
}

int run(const std::string& args, std::string* out) {
  return testkit::run_command(exe() + " " + args, out);
}
}  // namespace

TEST(Cli, VersionAndHelp) {
  std::string out;
  ASSERT_EQ(run("--version", &out), 0) << out;
  EXPECT_NE(out.find("concord 0.1.0"), std::string::npos) << out;
  for (const char* sub : {"run", "validate", "plugins", "harmonize"}) {
    ASSERT_EQ(run(std::string(sub) + " --help", &out), 0) << sub << ": " << out;
    EXPECT_NE(out.find("Usage"), std::string::npos) << out;
  }
  EXPECT_NE(run("", &out), 0);  // a subcommand is required
}

TEST(Cli, PluginsListsKindsFilesAndArguments) {
  std::string out;
  ASSERT_EQ(run("plugins --kind aggregator", &out), 0) << out;
  EXPECT_NE(out.find("aggregator fedavg"), std::string::npos) << out;
  EXPECT_NE(out.find("libconcord-aggregator-fedavg.so"), std::string::npos) << out;
  EXPECT_NE(out.find("weighting : enum {samples|uniform} = samples"), std::string::npos) << out;
  EXPECT_EQ(out.find("model cnn"), std::string::npos) << "--kind must filter";
  ASSERT_EQ(run("plugins --brief", &out), 0);
  for (const char* p : {"dataset brainsim", "model cnn", "harmonizer amplitude",
                        "adapter batchnorm", "aggregator krum", "metric dice"})
    EXPECT_NE(out.find(p), std::string::npos) << p;
  EXPECT_NE(run("plugins fedavgg", &out), 0);
  EXPECT_NE(out.find("did you mean 'fedavg'"), std::string::npos) << out;
}

TEST(Cli, ValidateReportsEveryErrorAndExitsNonZero) {
  testkit::TempDir dir;
  std::string file = dir.str() + "/bad.yaml";
  std::ofstream(file) << "data:\n  dataset: {type: brainsim, args: {sitez: 3}}\n"
                         "model: {type: cnm}\ntraining: {lr: -1}\n";
  std::string out;
  EXPECT_EQ(run("validate " + file, &out), 1) << out;
  EXPECT_NE(out.find(file + ":2:"), std::string::npos) << out;
  EXPECT_NE(out.find("did you mean 'sites'"), std::string::npos) << out;
  EXPECT_NE(out.find(file + ":3:"), std::string::npos) << out;
  EXPECT_NE(out.find(file + ":4:"), std::string::npos) << out;
  EXPECT_NE(out.find("3 errors"), std::string::npos) << out;
}

TEST(Cli, EveryExamplePipelineValidates) {
  int checked = 0;
  for (const auto& e : fs::directory_iterator(testkit::source_dir() + "/pipelines")) {
    if (e.path().extension() != ".yaml") continue;
    std::ifstream in(e.path());
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (text.find("shared/data") != std::string::npos && testkit::shared_data().empty()) {
      std::cout << "skipping " << e.path() << ": needs ../shared/data\n";
      continue;
    }
    std::string out;
    // From the source tree: pipelines name data relative to the project root.
    int rc = testkit::run_command(
        "cd " + testkit::source_dir() + " && " + exe() + " validate " + e.path().string(), &out);
    EXPECT_EQ(rc, 0) << e.path() << ":\n" << out;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(Cli, RunPrintsTheResultsTableAndWritesTheRunFolder) {
  testkit::TempDir dir;
  std::string out;
  int rc =
      run("run " + testkit::source_dir() + "/pipelines/quickstart.yaml --no-progress" +
              " --run-dir " + dir.str() + "/run --set federation.rounds=2" +
              " --set data.dataset.args.train_per_site=24 --set data.dataset.args.test_per_site=8" +
              " --set data.dataset.args.size=32 --set model.args.width=8",
          &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex("site-A +[0-9.]+ +[0-9.]+ +[0-9.]+"))) << out;
  EXPECT_NE(out.find("worst site"), std::string::npos) << out;
  for (const char* f : {"pipeline.yaml", "metrics.jsonl", "summary.json", "model.pt"})
    EXPECT_TRUE(fs::exists(dir.path() / "run" / f)) << f;
  // The resolved pipeline carries the overrides; resuming a finished run is a no-op that works.
  std::ifstream p(dir.path() / "run" / "pipeline.yaml");
  std::string resolved((std::istreambuf_iterator<char>(p)), std::istreambuf_iterator<char>());
  EXPECT_NE(resolved.find("rounds: 2"), std::string::npos);
  EXPECT_EQ(run("run --no-progress --resume " + dir.str() + "/run", &out), 0) << out;
  // A second fresh run into the same folder is refused.
  EXPECT_NE(run("run " + testkit::source_dir() +
                    "/pipelines/quickstart.yaml --no-progress --run-dir " + dir.str() + "/run",
                &out),
            0);
  EXPECT_NE(out.find("--resume"), std::string::npos) << out;
}

TEST(Cli, HarmonizeTakesMethodAndArgumentsFromAPipeline) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  testkit::TempDir dir;
  std::string pipe = dir.str() + "/p.yaml";
  std::ofstream(pipe) << "data: {dataset: {type: brainsim}}\nmodel: {type: cnn}\n"
                         "harmonizers:\n  - {type: zscore}\n"
                         "  - {type: amplitude, args: {mode: normalize, beta: 0.05}}\n";
  std::string out;
  std::string data = testkit::shared_data() + "/multisite-prostate";
  ASSERT_EQ(run("harmonize fit --no-progress --pipeline " + pipe + " --harmonizer 1 " + data +
                    " --stats " + dir.str() + "/a.stats",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("fitted 'amplitude'"), std::string::npos) << out;
  std::ifstream side(dir.str() + "/a.stats.json");
  std::string sidecar((std::istreambuf_iterator<char>(side)), std::istreambuf_iterator<char>());
  EXPECT_NE(sidecar.find("beta=0.05"), std::string::npos) << sidecar;
  EXPECT_NE(run("harmonize fit --no-progress --pipeline " + pipe + " --harmonizer 2 " + data +
                    " --stats " + dir.str() + "/b.stats",
                &out),
            0);
  EXPECT_NE(out.find("out of range"), std::string::npos) << out;
}

// A run that completes but aggregates nothing (no site is ever available) writes its summary
// with the failures and exits 1; a run that cannot start leaves no run folder and exits 1.
TEST(Cli, RunExitStatusSaysWhetherEverythingWorked) {
  testkit::TempDir dir;
  const std::string base = "run " + testkit::source_dir() +
                           "/pipelines/quickstart.yaml --no-progress --set federation.rounds=1" +
                           " --set data.dataset.args.train_per_site=8" +
                           " --set data.dataset.args.test_per_site=4" +
                           " --set data.dataset.args.size=32 --set model.args.width=8";
  std::string out;
  EXPECT_EQ(run(base + " --run-dir " + dir.str() + "/never" +
                    " --set 'federation.site_availability={site-A: 0, site-B: 0, site-C: 0, "
                    "site-D: 0}'",
                &out),
            1)
      << out;
  EXPECT_NE(out.find("round 1: not aggregated: no site was available"), std::string::npos) << out;
  std::ifstream summary(dir.path() / "never" / "summary.json");
  std::string text((std::istreambuf_iterator<char>(summary)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"ok\": false"), std::string::npos) << text;
  EXPECT_NE(text.find("not aggregated"), std::string::npos) << text;

  EXPECT_EQ(run(base + " --run-dir " + dir.str() + "/bad --set 'data.sites=[site-Z]'", &out), 1)
      << out;
  EXPECT_NE(out.find("site-Z"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir.path() / "bad")) << "a failed set-up must leave no run folder";
}

// Ctrl-C (SIGINT) during a run stops it after the round in progress, checkpointed, with exit
// status 130; --resume then finishes it.
TEST(Cli, InterruptedRunStopsAfterARoundAndResumes) {
  testkit::TempDir dir;
  const std::string run_dir = dir.str() + "/run";
  const std::string cmd = exe() + " run " + testkit::source_dir() +
                          "/pipelines/quickstart.yaml --no-progress --run-dir " + run_dir +
                          " --set federation.rounds=30 --set data.dataset.args.train_per_site=8" +
                          " --set data.dataset.args.test_per_site=4" +
                          " --set data.dataset.args.size=32 --set model.args.width=8";
  std::string out;
  // Start the run, wait for its first metric line, then interrupt it.
  testkit::run_command("sh -c '" + cmd + " > " + dir.str() + "/log 2>&1 & pid=$!; " +
                           "while [ ! -s " + run_dir + "/metrics.jsonl ]; do sleep 0.05; done; " +
                           "kill -INT $pid; wait $pid; echo rc=$?'",
                       &out);
  std::ifstream logf(dir.path() / "log");
  std::string log((std::istreambuf_iterator<char>(logf)), std::istreambuf_iterator<char>());
  ASSERT_NE(out.find("rc=130"), std::string::npos) << out << log;
  EXPECT_NE(log.find("continue with: concord run --resume"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(fs::path(run_dir) / "summary.json")) << "the run did not finish";
  EXPECT_EQ(run("run --no-progress --resume " + run_dir, &out), 0) << out;
  std::ifstream summary(fs::path(run_dir) / "summary.json");
  std::string text((std::istreambuf_iterator<char>(summary)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"rounds\": 30"), std::string::npos) << text;
}
