// A site process that restarts in the middle of a run (RemoteSites::starts): the coordinator
// brings the new process up to date before the next round (harmonizer statistics, the site's
// checkpointed state, the global model), so a restart between two rounds leaves the results
// bit-identical to an uninterrupted run. Without that, the new process refuses to train or
// evaluate on unharmonized images, and says why. The sites here are StandaloneSites (what
// `concord site` runs) behind an in-process Channel, so a "restart" is deterministic.
#include <concord/engine.h>
#include <concord/error.h>
#include <concord/protocol.h>

#include <cstring>
#include <functional>
#include <memory>

#include "testing.h"

using namespace concord;

namespace {

// FedBN (each site keeps its BatchNorm layers: state that only a restore gives back) and a fitted
// harmonizer with per-site statistics.
std::string pipeline() {
  return R"(name: restart-test
seed: 5
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 8, test_per_site: 4, size: 24}}
  sites: [site-A, site-B, site-C]
model: {type: cnn, args: {width: 6, depth: 2}}
harmonizers:
  - type: histogram-match
adapter: {type: batchnorm, args: {policy: local}}
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 3, min_sites: 2}
)";
}

// A learned harmonizer (cyclegan, reference site-B, local generators): its stage trains site-B's
// style GAN, then site-A's and site-C's CycleGANs, 3 rounds each, checkpointed after each round.
std::string cyclegan_pipeline() {
  return R"(name: restart-cyclegan
seed: 3
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 6, test_per_site: 2, size: 32}}
  sites: [site-A, site-B, site-C]
model: {type: cnn, args: {width: 4, depth: 2}}
harmonizers:
  - type: cyclegan
    args: {reference_site: site-B, generator_sharing: local, ngf: 4, ndf: 4, n_blocks: 1,
           pool_size: 2, batch_size: 2, style_epochs: 1, style_ngf: 4, style_batch: 4,
           style_latent: 8, reference_samples: 4}
    stage: {rounds: 3, local_epochs: 1}
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 1, min_sites: 1}
)";
}

PipelineConfig config(const std::string& text = pipeline()) {
  return parse_pipeline(text, "restart-test.yaml", {}, testkit::builtin_registry());
}

// Every site a StandaloneSite, as `concord site` builds it; restart() replaces one with a new
// one (a new process: none of the run's state) and counts it.
class RestartingSites : public Channel {
 public:
  RestartingSites(const PipelineConfig& c, std::string dir) : config_(c), dir_(std::move(dir)) {
    for (const auto& s : config_.data.sites) restart(s);
  }
  Bytes call(const std::string& site, const Bytes& request) override {
    if (restart_before && restart_before(site, decode(request))) restart(site);
    Bytes reply = sites_.at(site)->handle(request);
    if (restart_after && restart_after(site, decode(request))) restart(site);
    return reply;
  }
  // A new process takes the site's place just before this request reaches it, or just after it
  // answered it.
  std::function<bool(const std::string&site, const Message&request)> restart_before, restart_after;
  void restart(const std::string& site) {
    sites_[site].reset();
    sites_[site] = std::make_unique<StandaloneSite>(config_, testkit::builtin_registry(), site,
                                                    dir_ + "/" + site);
    ++starts_[site];
  }
  uint64_t starts(const std::string& site) const { return starts_.at(site); }
  DataShape shape() const { return sites_.begin()->second->shape(); }

 private:
  const PipelineConfig& config_;
  std::string dir_;
  std::map<std::string, std::unique_ptr<StandaloneSite>> sites_;
  std::map<std::string, uint64_t> starts_;
};

struct Outcome {
  NamedArrays global;
  RunSummary summary;
};

Outcome simulate(const std::string& text = pipeline()) {
  testkit::TempDir dir;
  Experiment exp(config(text), testkit::builtin_registry());
  RunOptions o;
  o.run_dir = (dir.path() / "run").string();
  Outcome out;
  out.summary = exp.run(o);
  out.global = exp.global_state();
  return out;
}

// The pipeline with remote sites; site-B restarts after round `restart_after` (checkpointed),
// or before the requests `restart_before` picks.
Outcome remote(
    int restart_after, bool count_starts,
    std::function<bool(const std::string&, const Message&)> restart_before = nullptr,
    std::function<bool(const std::string&, const Message&)> restart_once_answered = nullptr,
    const std::string& text = pipeline()) {
  testkit::TempDir dir;
  const PipelineConfig c = config(text);
  RestartingSites sites(c, dir.str());
  sites.restart_before = std::move(restart_before);
  sites.restart_after = std::move(restart_once_answered);
  RemoteSites remote{&sites, sites.shape(), nullptr};
  if (count_starts) remote.starts = [&](const std::string& s) { return sites.starts(s); };
  Experiment exp(c, testkit::builtin_registry(), remote);
  RunOptions o;
  o.run_dir = (dir.path() / "run").string();
  o.on_round = [&](int round) {
    if (round == restart_after) sites.restart("site-B");
  };
  Outcome out;
  out.summary = exp.run(o);
  out.global = exp.global_state();
  return out;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  return all;
}

}  // namespace

TEST(SiteRestart, RemoteSitesWithoutARestartMatchTheSimulation) {
  const Outcome sim = simulate();
  const Outcome net = remote(0, true);
  EXPECT_TRUE(sim.summary.failures.empty()) << joined(sim.summary.failures);
  EXPECT_TRUE(net.summary.failures.empty()) << joined(net.summary.failures);
  EXPECT_TRUE(testkit::bit_identical(net.global, sim.global));
}

TEST(SiteRestart, ARestartedSiteIsBroughtUpToDateAndTheRunEndsBitIdentical) {
  const Outcome sim = simulate();
  for (int after : {1, 2}) {
    const Outcome net = remote(after, true);
    EXPECT_TRUE(net.summary.failures.empty()) << after << "\n" << joined(net.summary.failures);
    EXPECT_EQ(net.summary.rounds_completed, 3);
    EXPECT_TRUE(testkit::bit_identical(net.global, sim.global)) << "restart after round " << after;
    // Every site still reports its metrics (site-B evaluated with its restored BatchNorm).
    ASSERT_EQ(net.summary.sites.size(), sim.summary.sites.size());
    for (size_t i = 0; i < sim.summary.sites.size(); ++i)
      EXPECT_EQ(net.summary.sites[i].metrics, sim.summary.sites[i].metrics)
          << sim.summary.sites[i].site << ", restart after round " << after;
  }
}

TEST(SiteRestart, WithoutCatchUpTheNewProcessRefusesUnharmonizedWorkAndSaysWhy) {
  const Outcome sim = simulate();
  const Outcome net = remote(1, false);
  // Rounds 2 and 3 go on with site-A and site-C (min_sites 2); site-B refuses each request.
  const std::string all = joined(net.summary.failures);
  EXPECT_NE(all.find("round 2: site 'site-B'"), std::string::npos) << all;
  EXPECT_NE(all.find("refusing 'train': 0 of 1 harmonizers' statistics applied"), std::string::npos)
      << all;
  EXPECT_EQ(all.find("not aggregated"), std::string::npos) << all;
  EXPECT_FALSE(testkit::bit_identical(net.global, sim.global));
}

// A process that registers during the harmonizer phase, before its statistics are sent, takes
// them there like any site: it is not brought up to date again (a harmonizer is applied once).
TEST(SiteRestart, AProcessStartedDuringTheHarmonizerPhaseTakesItsStatisticsThere) {
  const Outcome sim = simulate();
  bool done = false;
  const Outcome net = remote(0, true, [&](const std::string& site, const Message& m) {
    if (done || site != "site-B" || m.type != protocol::kSetStatistics) return false;
    return done = true;
  });
  EXPECT_TRUE(done);
  EXPECT_TRUE(net.summary.failures.empty()) << joined(net.summary.failures);
  EXPECT_TRUE(testkit::bit_identical(net.global, sim.global));
}

// A process that registers right after its predecessor took the last harmonizer statistics (the
// end of the harmonizer phase) is brought up to date before round 1. The engine used to count a
// site's processes at the end of the phase, so such a process counted as up to date and refused
// every round.
TEST(SiteRestart, AProcessStartedJustAfterTheLastStatisticsIsBroughtUpToDate) {
  const Outcome sim = simulate();
  bool done = false;
  const Outcome net = remote(0, true, nullptr, [&](const std::string& site, const Message& m) {
    if (done || site != "site-B" || m.type != protocol::kSetStatistics) return false;
    return done = true;
  });
  EXPECT_TRUE(done);
  EXPECT_TRUE(net.summary.failures.empty()) << joined(net.summary.failures);
  EXPECT_TRUE(testkit::bit_identical(net.global, sim.global));
}

// Statistics a site process already applied, sent again, are acknowledged and not applied twice;
// other statistics for a harmonizer already applied are refused.
TEST(SiteRestart, RepeatedStatisticsAreAcknowledgedOnce) {
  testkit::TempDir dir;
  const PipelineConfig c = config();
  StandaloneSite site(c, testkit::builtin_registry(), "site-B", dir.str());
  // This site's own statistics stand in for the combined ones.
  protocol::Checked<Stats> fitted =
      protocol::read_statistics(decode(site.handle(encode(protocol::fit_request(0)))));
  ASSERT_TRUE(fitted.ok()) << fitted.problem;
  const Stats s = *fitted.value;
  auto send = [&](const Stats& st) {
    return decode(site.handle(encode(protocol::set_statistics(0, st))));
  };
  EXPECT_EQ(send(s).type, protocol::kAck);
  EXPECT_EQ(send(s).type, protocol::kAck);  // the same again: a no-op
  Stats other = s;
  other.weight = 9;
  const std::string e = testkit::error_of([&] { send(other); });
  EXPECT_NE(e.find("already applied"), std::string::npos) << e;
}

// A site process that restarts between two rounds of a learned harmonizer's stage is brought into
// the stage before the next round (learn-begin, its state from the stage's checkpoint) and the
// run ends bit-identical to the uninterrupted simulation. It used to sit out the rest of the
// stage and be brought up to date only after it.
TEST(SiteRestart, AProcessRestartedDuringALearnedStageRejoinsItBitIdentical) {
  const Outcome sim = simulate(cyclegan_pipeline());
  ASSERT_TRUE(sim.summary.failures.empty()) << joined(sim.summary.failures);
  // site-A restarts once it has answered the checkpoint request after its first CycleGAN
  // round (the checkpoints before it are of the style phase, in which site-A takes no part).
  int exports = 0;
  const auto after_first_round = [&](const std::string& site, const Message& m) {
    return site == "site-A" && m.type == protocol::kLearnExport && ++exports == 4;
  };
  const Outcome net = remote(0, true, nullptr, after_first_round, cyclegan_pipeline());
  EXPECT_GE(exports, 4);
  EXPECT_TRUE(net.summary.failures.empty()) << joined(net.summary.failures);
  EXPECT_TRUE(testkit::bit_identical(net.global, sim.global));
  // Restarted in the middle of a round instead (before its second CycleGAN request), the new
  // process refuses that round's request and says why, then rejoins from the next round.
  int learns = 0;
  const Outcome mid = remote(
      0, true,
      [&](const std::string& site, const Message& m) {
        return site == "site-A" && m.type == protocol::kLearn && ++learns == 2;
      },
      nullptr, cyclegan_pipeline());
  const std::string all = joined(mid.summary.failures);
  EXPECT_NE(all.find("stage cyclegan cyclegan round 2: site 'site-A': refusing 'learn'"),
            std::string::npos)
      << all;
  EXPECT_NE(all.find("had no learn-begin"), std::string::npos) << all;
  EXPECT_EQ(all.find("round 3"), std::string::npos) << all;
}
