// The learned-harmonizer stage (core/src/learned_stage.h) with the cyclegan and replay plugins,
// at tiny sizes: resume inside the stage is bit-identical, nothing image-shaped crosses the
// Channel, the reference site is left unchanged, a saved statistics file reproduces the in-run
// harmonization, replay writes its montages, and bad stage settings are refused with FILE:LINE:COL.
#include <concord/engine.h>
#include <concord/message.h>
#include <concord/pipeline.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kSize = 32;  // brainsim image side in these pipelines

std::string cyclegan_pipeline(const std::string& sharing, const std::string& reference = "auto",
                              int task_rounds = 1) {
  return R"(name: learned
seed: 3
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 6, test_per_site: 2, size: 32}}
model: {type: cnn, args: {width: 4, depth: 2}}
harmonizers:
  - type: cyclegan
    args: {reference_site: )" +
         reference + ", generator_sharing: " + sharing + R"(, ngf: 4, ndf: 4, n_blocks: 1,
           pool_size: 2, batch_size: 2, style_epochs: 1, style_ngf: 4, style_batch: 4,
           style_latent: 8, reference_samples: 4}
    stage: {rounds: 2, local_epochs: 1}
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: )" +
         std::to_string(task_rounds) + R"(, min_sites: 1}
)";
}

const char* const kReplayPipeline = R"(name: replay
seed: 4
data:
  dataset: {type: brainsim, args: {sites: 2, train_per_site: 8, test_per_site: 4, size: 16}}
model: {type: cnn, args: {width: 4, depth: 2}}
harmonizers:
  - type: replay
    args: {latent: 6, width: 4, batch_size: 4, ratio: 0.5}
    stage: {rounds: 2, aggregator: {type: fedavg}}
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 2, min_sites: 1}
)";

// Writes the cyclegan pipeline (local generators, reference site-B) to `pipeline` and runs it
// (`concord run`) into `run_dir`; false when the run fails (its output in `out`).
bool run_local_cyclegan(const std::string& pipeline, const std::string& run_dir, std::string& out) {
  { std::ofstream(pipeline) << cyclegan_pipeline("local", "site-B"); }
  return testkit::run_command(testkit::concord_exe() + " run " + pipeline + " --run-dir " +
                                  run_dir + " --no-progress",
                              &out) == 0;
}

PipelineConfig parse(const std::string& text) {
  return parse_pipeline(text, "learned.yaml", {}, testkit::builtin_registry());
}

std::string read_bytes(const fs::path& f) {
  std::ifstream in(f, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Records the shape of every array in every request and reply.
class RecordingChannel : public Channel {
 public:
  explicit RecordingChannel(Channel& inner) : inner_(inner) {}
  Bytes call(const std::string& site, const Bytes& request) override {
    note(decode(request));
    Bytes reply = inner_.call(site, request);
    note(decode(reply));
    return reply;
  }
  struct Seen {
    std::string type, entry;
    std::vector<int64_t> shape;
  };
  std::vector<Seen> seen;
  std::set<std::string> types;

 private:
  void note(const Message& m) {
    types.insert(m.type);
    for (const auto& [k, a] : m.arrays) seen.push_back({m.type, k, a.shape()});
  }
  Channel& inner_;
};

// True when `shape` could hold one of the dataset's images or a batch of them: its last two
// dimensions are the image's H x W, or it holds exactly C*H*W (or H*W) values in fewer dimensions.
bool image_shaped(const std::vector<int64_t>& shape, int64_t side) {
  const size_t n = shape.size();
  if (n >= 2 && shape[n - 2] == side && shape[n - 1] == side) return true;
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return n >= 1 && numel == side * side;
}

}  // namespace

TEST(LearnedStage, ResumeInsideTheCycleGanStageIsBitIdentical) {
  testkit::TempDir whole, parts;
  const std::string text = cyclegan_pipeline("federated");
  NamedArrays expected;
  {
    Experiment exp(parse(text), testkit::builtin_registry());
    RunOptions o;
    o.run_dir = whole.str();
    RunSummary s = exp.run(o);
    EXPECT_EQ(s.rounds_completed, 1);
    expected = exp.global_state();
  }
  // Interrupted after the first round of the cyclegan phase (style rounds 1 and 2 come first).
  int learned_rounds = 0;
  {
    Experiment exp(parse(text), testkit::builtin_registry());
    RunOptions o;
    o.run_dir = parts.str();
    o.stop_after = [&](int round) { return round == 0 && ++learned_rounds == 3; };
    RunSummary s = exp.run(o);
    EXPECT_EQ(s.rounds_completed, 0);
    EXPECT_EQ(learned_rounds, 3);
    EXPECT_TRUE(fs::exists(parts.path() / "learned" / "stage.ckpt"));
    EXPECT_FALSE(fs::exists(parts.path() / "learned" / "harmonizer-0-cyclegan.stats"));
  }
  {
    Experiment exp(parse(text), testkit::builtin_registry());
    RunOptions o;
    o.run_dir = parts.str();
    o.resume = true;
    o.stop_after = [&](int round) { return round == 0 && ++learned_rounds > 100; };
    RunSummary s = exp.run(o);
    EXPECT_EQ(s.rounds_completed, 1);
    EXPECT_EQ(learned_rounds, 4) << "the resumed run trains only the stage's last round";
    EXPECT_TRUE(testkit::bit_identical(expected, exp.global_state()))
        << "the final global state differs after a resume inside the learned stage";
  }
  const std::string stats = "learned/harmonizer-0-cyclegan.stats";
  ASSERT_TRUE(fs::exists(whole.path() / stats));
  EXPECT_EQ(read_bytes(whole.path() / stats), read_bytes(parts.path() / stats))
      << "the stage's result differs after a resume";
  EXPECT_EQ(read_bytes(whole.path() / "global.state"), read_bytes(parts.path() / "global.state"))
      << "the task model differs after a resume inside the learned stage";

  // metrics.jsonl shows the stage: one line per site and stage round, no duplicates after the
  // resume (the interrupted round's lines are replaced).
  std::ifstream in(parts.path() / "metrics.jsonl");
  std::string line;
  std::set<std::string> keys;
  int stage_lines = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("stage")) continue;
    ++stage_lines;
    EXPECT_EQ(j["stage"], "cyclegan");
    const std::string key = j["phase"].get<std::string>() + "/" +
                            std::to_string(j["stage_round"].get<int>()) + "/" +
                            j["site"].get<std::string>();
    EXPECT_TRUE(keys.insert(key).second) << "duplicate stage line " << key;
  }
  EXPECT_EQ(stage_lines, 2 + 2 * 2) << "style: 2 rounds at the reference; cyclegan: 2 x 2 sites";
}

TEST(LearnedStage, NoMessageCarriesAnImageShapedTensor) {
  for (const std::string& text : {cyclegan_pipeline("local"), std::string(kReplayPipeline)}) {
    const int64_t side = text.find("size: 16") != std::string::npos ? 16 : kSize;
    testkit::TempDir dir;
    Experiment exp(parse(text), testkit::builtin_registry());
    RecordingChannel* rec = nullptr;
    exp.interpose_channel([&](Channel& inner) {
      auto c = std::make_unique<RecordingChannel>(inner);
      rec = c.get();
      return c;
    });
    RunOptions o;
    o.run_dir = dir.str();
    exp.run(o);
    ASSERT_NE(rec, nullptr);
    for (const char* t : {protocol::kLearnBegin, protocol::kLearn, protocol::kLearnResult,
                          protocol::kLearnExport, protocol::kLearnState})
      EXPECT_TRUE(rec->types.count(t)) << "no '" << t << "' message was sent";
    size_t arrays = 0;
    for (const auto& s : rec->seen) {
      ++arrays;
      std::string shape;
      for (auto d : s.shape) shape += std::to_string(d) + " ";
      EXPECT_FALSE(image_shaped(s.shape, side))
          << "message '" << s.type << "' carries '" << s.entry << "' of shape [" << shape
          << "], the shape of the dataset's images";
    }
    EXPECT_GT(arrays, 10u);
  }
}

TEST(LearnedStage, ReferenceSiteUnchangedOthersTranslatedAndStatsFileReproducesTheRun) {
  const std::string text = cyclegan_pipeline("local", "site-B");
  Experiment exp(parse(text), testkit::builtin_registry());
  HarmonizeOptions ho;
  ho.keep_unharmonized = true;
  HarmonizeResult fitted = exp.harmonize(ho);
  ASSERT_TRUE(fitted.unharmonized);
  ASSERT_EQ(fitted.stats.size(), 1u);
  for (size_t s = 0; s < fitted.federation.sites.size(); ++s) {
    const SiteData& after = fitted.federation.sites[s];
    const SiteData& before = fitted.unharmonized->sites[s];
    bool same = true;
    for (size_t i = 0; i < after.train.size(); ++i) {
      EXPECT_EQ(after.train[i].image.size, before.train[i].image.size);
      same = same && after.train[i].image.data == before.train[i].image.data;
    }
    for (size_t i = 0; i < after.test.size(); ++i)
      same = same && after.test[i].image.data == before.test[i].image.data;
    if (after.name == "site-B")
      EXPECT_TRUE(same) << "the reference site's images changed";
    else
      EXPECT_FALSE(same) << "site " << after.name << " was not translated";
  }
  // The statistics as a file (what `concord harmonize fit --sites` and a run write) give the
  // same images when applied, as `concord harmonize apply --stats` does.
  testkit::TempDir dir;
  const std::string file = (dir.path() / "cyclegan.stats").string();
  save_stats(fitted.stats[0], file, "cyclegan");
  Experiment again(parse(text), testkit::builtin_registry());
  HarmonizeOptions from_file;
  from_file.last_stats = load_stats(file);
  HarmonizeResult applied = again.harmonize(from_file);
  for (size_t s = 0; s < applied.federation.sites.size(); ++s)
    for (size_t i = 0; i < applied.federation.sites[s].train.size(); ++i)
      EXPECT_EQ(applied.federation.sites[s].train[i].image.data,
                fitted.federation.sites[s].train[i].image.data)
          << applied.federation.sites[s].name << " image " << i;
}

TEST(LearnedStage, ReplayRunTrainsWithSyntheticSamplesAndWritesMontages) {
  testkit::TempDir dir;
  Experiment exp(parse(kReplayPipeline), testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.str();
  RunSummary s = exp.run(o);
  EXPECT_EQ(s.rounds_completed, 2);
  EXPECT_TRUE(s.failures.empty());
  for (const char* site : {"site-A", "site-B"}) {
    const fs::path png = dir.path() / (std::string("replay-montage-") + site + ".png");
    ASSERT_TRUE(fs::exists(png)) << png;
    EXPECT_GT(fs::file_size(png), 100u);
  }
  EXPECT_TRUE(fs::exists(dir.path() / "learned" / "harmonizer-0-replay.stats"));
  std::ifstream in(dir.path() / "metrics.jsonl");
  std::string line;
  int vae_lines = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("phase", "") == "vae") {
      ++vae_lines;
      EXPECT_TRUE(j.contains("recon"));
    }
  }
  EXPECT_EQ(vae_lines, 2 * 2);
}

TEST(LearnedStage, StageSettingsAreValidatedWithFileLineColumn) {
  auto error = [](const std::string& text) { return testkit::error_of([&] { parse(text); }); };
  const std::string head = R"(name: bad
data:
  dataset: {type: brainsim, args: {sites: 2, size: 32}}
model: {type: cnn}
harmonizers:
)";
  std::string e = error(head + "  - type: zscore\n    stage: {rounds: 3}\n");
  EXPECT_NE(e.find("learned.yaml:7:12: error: 'harmonizers[0].stage': harmonizer 'zscore' is not "
                   "learned"),
            std::string::npos)
      << e;
  e = error(head + "  - type: cyclegan\n    stage: {rounds: 0}\n");
  EXPECT_NE(e.find("learned.yaml:7:21"), std::string::npos) << e;
  EXPECT_NE(e.find("harmonizers[0].stage.rounds"), std::string::npos) << e;
  e = error(head + "  - type: cyclegan\n    stage: {round: 3}\n");
  EXPECT_NE(e.find("unknown key 'round' in 'harmonizers[0].stage' (did you mean 'rounds'?)"),
            std::string::npos)
      << e;
  e = error(head + "  - type: replay\n    stage: {aggregator: {type: fedavgg}}\n");
  EXPECT_NE(e.find("unknown aggregator plugin 'fedavgg' (did you mean 'fedavg'?)"),
            std::string::npos)
      << e;
  e = error(head + "  - type: cyclegan\n    stages: {rounds: 3}\n");
  EXPECT_NE(e.find("unknown key 'stages' in component 'harmonizers[0]'"), std::string::npos) << e;
  // Defaults are filled in and written to the resolved pipeline.
  PipelineConfig c = parse(head + "  - type: cyclegan\n");
  ASSERT_EQ(c.learned_stages.count(0), 1u);
  EXPECT_EQ(c.learned_stages[0].rounds, 4);
  EXPECT_DOUBLE_EQ(c.learned_stages[0].lr, 2e-4);
  EXPECT_EQ(c.learned_stages[0].aggregator.type, "fedavg");
  EXPECT_NE(c.resolved_yaml.find("stage:"), std::string::npos) << c.resolved_yaml;
}

// The statistics file a run leaves (learned/harmonizer-0-cyclegan.stats) translates plain image
// files offline (`concord harmonize apply --stats FILE FOLDERS`) to the same bytes as the
// pipeline's own sites with those statistics, and leaves the reference site's files unchanged.
TEST(LearnedStage, HarmonizeApplyStatsOnFilesMatchesTheSitesWithTheRunsStatistics) {
  testkit::TempDir dir;
  const std::string exe = testkit::concord_exe(), d = dir.str(), p = d + "/p.yaml";
  std::string out;
  ASSERT_TRUE(run_local_cyclegan(p, d + "/run", out)) << out;
  const std::string stats = d + "/run/learned/harmonizer-0-cyclegan.stats";
  ASSERT_TRUE(fs::exists(stats)) << out;
  ASSERT_EQ(testkit::run_command(exe + " harmonize apply --pipeline " + p +
                                     " --set 'harmonizers=[{type: identity}]' --sites --out " + d +
                                     "/raw --no-progress",
                                 &out),
            0)
      << out;
  ASSERT_EQ(testkit::run_command(exe + " harmonize apply --pipeline " + p + " --sites --stats " +
                                     stats + " --out " + d + "/sites --no-progress",
                                 &out),
            0)
      << out;
  ASSERT_EQ(
      testkit::run_command(exe + " harmonize apply --stats " + stats + " --out " + d + "/files " +
                               d + "/raw/site-A " + d + "/raw/site-B " + "--no-progress",
                           &out),
      0)
      << out;
  int compared = 0;
  for (const char* site : {"site-A", "site-B"})
    for (const auto& e : fs::recursive_directory_iterator(dir.path() / "files" / site)) {
      if (!e.is_regular_file()) continue;
      const fs::path rel = fs::relative(e.path(), dir.path() / "files");
      EXPECT_EQ(read_bytes(e.path()), read_bytes(dir.path() / "sites" / rel)) << rel;
      if (std::string(site) == "site-B")
        EXPECT_EQ(read_bytes(e.path()), read_bytes(dir.path() / "raw" / rel))
            << "the reference site's file changed: " << rel;
      else
        EXPECT_NE(read_bytes(e.path()), read_bytes(dir.path() / "raw" / rel)) << rel;
      ++compared;
    }
  EXPECT_EQ(compared, 2 * (6 + 2));
  // A learned harmonizer is not fitted from files.
  EXPECT_NE(testkit::run_command(exe + " harmonize fit --method cyclegan --stats " + d +
                                     "/x.stats " + d + "/raw/site-A --no-progress",
                                 &out),
            0);
  EXPECT_NE(out.find("is learned"), std::string::npos) << out;
}

// The run's HTML report shows harmonization figures also when a learned harmonizer is not the
// last one: the stage's statistics file stands in for its fit (HarmonizeOptions::given_stats)
// and the harmonizers after it are fitted as in the run.
TEST(LearnedStage, ReportFiguresWithALearnedHarmonizerBeforeAnother) {
  testkit::TempDir dir;
  std::string text = cyclegan_pipeline("local", "site-B");
  text.replace(text.find("training: {"), 0, "  - type: histogram-match\n");
  const fs::path pipeline = dir.path() / "p.yaml";
  { std::ofstream(pipeline) << text; }
  std::string out;
  ASSERT_EQ(testkit::run_command(testkit::concord_exe() + " run " + pipeline.string() +
                                     " --run-dir " + dir.str() + "/run --no-progress",
                                 &out),
            0)
      << out;
  EXPECT_EQ(out.find("harmonization figures not written"), std::string::npos) << out;
  const fs::path figures = dir.path() / "run" / "harmonization.json";
  ASSERT_TRUE(fs::exists(figures)) << out;
  const auto j = nlohmann::json::parse(read_bytes(figures));
  EXPECT_EQ(j["harmonizers"], nlohmann::json::array({"cyclegan", "histogram-match"})) << j.dump();
  EXPECT_TRUE(fs::exists(dir.path() / "run" / "harmonization.png"));
}

// `concord harmonize fit --pipeline P --sites` trains a learned harmonizer through the same stage
// as `concord run`, without a run folder: the statistics file is byte for byte the run's.
TEST(LearnedStage, HarmonizeFitSitesTrainsTheStageAndWritesTheRunsStatistics) {
  testkit::TempDir dir;
  const std::string exe = testkit::concord_exe(), d = dir.str(), p = d + "/p.yaml";
  std::string out;
  ASSERT_TRUE(run_local_cyclegan(p, d + "/run", out)) << out;
  ASSERT_EQ(testkit::run_command(exe + " harmonize fit --pipeline " + p + " --sites --stats " + d +
                                     "/fit.stats --no-progress",
                                 &out),
            0)
      << out;
  EXPECT_NE(out.find("stage cyclegan"), std::string::npos) << out;
  const std::string fitted = read_bytes(dir.path() / "fit.stats");
  EXPECT_FALSE(fitted.empty());
  EXPECT_TRUE(fitted == read_bytes(dir.path() / "run/learned/harmonizer-0-cyclegan.stats"));
}
