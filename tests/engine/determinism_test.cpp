// Two runs of one pipeline with one seed write the same bytes: checkpoints, global.state and
// model.pt, and every other file of the run folder (summary.json but for its wall time). Encoded
// messages once carried stale memory in their padding (bytes of another site's update), so
// global.state differed between identical runs.
#include <concord/engine.h>
#include <concord/message.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

// A small federation with a fitted harmonizer and an aggregator that keeps server state, so
// every kind of checkpoint entry is written.
const char* const kPipeline = R"(name: determinism
seed: 5
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 8, test_per_site: 4, size: 24}}
model: {type: cnn, args: {width: 6, depth: 2}}
harmonizers:
  - type: histogram-match
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 2, min_sites: 1, fraction: 0.5}
aggregator: {type: fedadam}
)";

std::map<std::string, std::string> run_folder(const fs::path& dir) {
  // Memory the previous run freed is full of a pattern: stale bytes in an output would show.
  for (size_t size : {size_t(4096), size_t(65536), size_t(1) << 20, size_t(3) << 20}) {
    Buffer b(size);
    std::memset(b.data(), 0x5A, size);
  }
  Experiment exp(parse_pipeline(kPipeline, "determinism.yaml", {}, testkit::builtin_registry()),
                 testkit::builtin_registry());
  RunOptions o;
  o.run_dir = dir.string();
  exp.run(o);
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::ostringstream bytes;
    bytes << in.rdbuf();
    files[fs::relative(e.path(), dir).string()] = bytes.str();
  }
  return files;
}

// summary.json reports wall times, the values meant to differ: the run's "seconds" and the
// dataset's "generation_seconds" note.
nlohmann::json without_wall_times(nlohmann::json j) {
  if (!j.is_object()) return j;
  j.erase("seconds");
  j.erase("generation_seconds");
  for (auto& [k, v] : j.items()) v = without_wall_times(v);
  return j;
}

}  // namespace

TEST(Determinism, TwoRunsWithTheSameSeedWriteByteIdenticalFiles) {
  testkit::TempDir first, second;
  auto a = run_folder(first.path());
  auto b = run_folder(second.path());
  for (const char* f :
       {"checkpoints/round-0001.ckpt", "checkpoints/round-0002.ckpt", "checkpoints/latest",
        "global.state", "model.pt", "metrics.jsonl", "pipeline.yaml", "summary.json"})
    EXPECT_TRUE(a.count(f)) << f << " was not written";
  std::set<std::string> names_a, names_b;
  for (const auto& [k, v] : a) names_a.insert(k);
  for (const auto& [k, v] : b) names_b.insert(k);
  ASSERT_EQ(names_a, names_b);
  for (const auto& [name, bytes] : a) {
    if (name == "summary.json") {
      EXPECT_EQ(without_wall_times(nlohmann::json::parse(bytes)),
                without_wall_times(nlohmann::json::parse(b[name])));
      continue;
    }
    if (bytes == b[name]) continue;
    size_t at = 0;
    while (at < bytes.size() && at < b[name].size() && bytes[at] == b[name][at]) ++at;
    ADD_FAILURE() << name << " differs between two identical runs, first at byte " << at << " of "
                  << bytes.size();
  }
  // A checkpoint decodes: the comparison above is of real content, not of empty files.
  Message ckpt = decode(read_file((first.path() / "checkpoints/round-0002.ckpt").string()));
  EXPECT_GT(ckpt.arrays.size(), 10u);
}
