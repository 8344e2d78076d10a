// The federated engine: a Coordinator and Sites running rounds of five explicit steps
// (select, local training, upload, aggregate, broadcast) over a Channel.
#pragma once

#include <concord/aggregator.h>
#include <concord/channel.h>
#include <concord/harmonizer.h>
#include <concord/pipeline.h>
#include <concord/protocol.h>
#include <concord/seed.h>

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace concord {

// The coordinator's side of the five steps, knowing nothing of models, data or strategies:
// it moves named arrays over a Channel and asks the aggregator plugin to combine them.
class Coordinator {
 public:
  Coordinator(Channel& channel, uint64_t seed);

  // Step 1: sites available this round (each with its probability), then a seeded sample of
  // ceil(fraction * available) of them. Deterministic in (seed, round), on every platform.
  std::vector<std::string> select(int round, const std::vector<std::string>& candidates,
                                  double fraction, double availability,
                                  const std::map<std::string, double>& site_availability) const;

  struct RoundOutcome {
    std::vector<SiteUpdate> updates;    // accepted uploads
    std::vector<std::string> failures;  // "site 'x': reason", one per failed or rejected site
    std::vector<std::string> skipped;   // sites with no training samples: nothing to aggregate
    bool aggregated = false;            // false when fewer than min_sites replied
    std::string not_aggregated;         // why not (too few usable uploads, aggregator failed)
  };
  // Steps 2-4: ask each selected site to train (the request carries `settings`), collect the
  // uploads (rejecting, by site, any that protocol::read_update() refuses), aggregate with
  // `aggregator` when at least `min_sites` are usable. An aggregator that throws or returns a
  // state unlike the global one leaves the global model unchanged (aggregated = false,
  // not_aggregated says why). `on_site(site, i, n)` is called before each site's exchange.
  RoundOutcome train_round(
      Aggregator& aggregator, int round, int rounds, const std::vector<std::string>& selected,
      const std::map<std::string, double>& settings, int min_sites,
      const std::function<void(const std::string&, size_t, size_t)>& on_site = nullptr);
  // Steps 2-4 with secure aggregation (secure_round.cpp): the selected sites train and send
  // masked deltas over the four secagg-* exchanges; the coordinator decodes only their weighted
  // sum, recovers sites that drop after sharing keys, and gives the aggregator one update per
  // survivor, each the survivors' mean (the aggregator must aggregate by sum). Below the
  // threshold the round is not aggregated (not_aggregated says why) and the next one proceeds.
  RoundOutcome secure_train_round(Aggregator& aggregator, int round, int rounds,
                                  const std::vector<std::string>& selected,
                                  const std::map<std::string, double>& settings, int min_sites,
                                  const PipelineConfig::SecureAggregation& secure,
                                  bool equal_weights);
  // The same steps with the request given (the learned-harmonizer stage's learn requests): the
  // sites reply with updates checked against global().
  RoundOutcome train_round_with(
      Aggregator& aggregator, int round, int rounds, const std::vector<std::string>& selected,
      const Message& request, int min_sites,
      const std::function<void(const std::string&, size_t, size_t)>& on_site = nullptr);
  // Step 5: send the global state to `sites` (encoded once; one call per site). Returns a
  // failure line per site that did not acknowledge it.
  std::vector<std::string> broadcast(int round, const std::vector<std::string>& sites);

  // The other exchanges, each asking `sites` in turn. A site that fails or whose reply the
  // protocol's reader refuses adds one line naming it to `failures` and is left out of the
  // result; the others go on.
  struct Failure {
    std::string site;
    std::string what;  // "site 'x': reason"
  };
  using Failures = std::vector<Failure>;
  // Harmonizer phase: every site's statistics for harmonizers[index]. `after_each(site)` is
  // called after each site's reply (progress).
  std::vector<std::pair<std::string, Stats>> fit_statistics(
      size_t index, const std::vector<std::string>& sites, Failures& failures,
      const std::function<void(const std::string&)>& after_each = nullptr);
  // Harmonizer phase: the combined statistics of harmonizers[index], for each site to apply.
  Failures set_statistics(size_t index, Stats global, const std::vector<std::string>& sites);
  // Evaluation of the current model at each site (phase kPhaseGlobal or kPhasePersonalized).
  std::map<std::string, std::map<std::string, double>> evaluate(
      int round, const std::string& phase, const std::vector<std::string>& sites,
      Failures& failures);
  // The adapter's personalisation at each site.
  Failures personalize(int round, const std::vector<std::string>& sites);
  // Checkpointing: each site's own state (local model parts, adapter store), and back.
  std::map<std::string, protocol::SiteState> export_states(int round,
                                                           const std::vector<std::string>& sites,
                                                           Failures& failures);
  Failures restore_states(int round, const std::map<std::string, protocol::SiteState>& states);

  // Any other exchange (the learned-harmonizer stage): `request` to each of `sites`; `take`
  // reads each reply and returns "" or why it is unusable.
  Failures ask(const Message& request, const std::vector<std::string>& sites,
               const std::function<std::string(const std::string& site, Message&& reply)>& take);

  const NamedArrays& global() const { return global_; }
  void set_global(NamedArrays g) { global_ = std::move(g); }

 private:
  Channel& channel_;
  uint64_t seed_;
  NamedArrays global_;
  // Step 4 of train_round and secure_train_round: aggregates out.updates into global_ when at
  // least min_sites are there, guarding against a failing aggregator.
  void aggregate_updates(Aggregator& aggregator, int round, int rounds,
                         const std::vector<std::string>& selected, int min_sites,
                         RoundOutcome& out);
};

// The failure line for an exception from an exchange with `site`, naming the site once.
std::string site_failure(const std::string& site, const std::exception& e);

struct SiteResult {
  std::string site;
  bool held_out = false;
  std::map<std::string, double> metrics;       // after federation (global model)
  std::map<std::string, double> personalized;  // after the adapter's personalisation
};

struct RunSummary {
  std::string run_dir;
  int rounds_completed = 0;
  std::vector<SiteResult> sites;
  std::map<std::string, double> mean, worst;  // over non-held-out sites, per metric
  // "round 3: site 'x': reason", "round 3: not aggregated: reason", "fit: ...", "evaluate: ...".
  // Empty when every selected site trained and every round aggregated (exit status 0).
  std::vector<std::string> failures;
  // With the pipeline's `privacy:`: the epsilon spent, its delta and assumptions (one line).
  std::string privacy;
};

struct RunOptions {
  std::string run_dir;    // empty: <output>/<name>
  bool resume = false;    // continue from run_dir/checkpoints/latest
  bool progress = false;  // draw a progress bar (terminal)
  // Called after every round with the round number (progress).
  std::function<void(int)> on_round;
  // Asked after each round is checkpointed: true ends the run there, as an interruption would,
  // and resume continues it (the CLI's answer to SIGINT/SIGTERM; tests interrupt with it).
  // During a learned harmonizer's stage it is asked with round 0 after each of its checkpointed
  // rounds.
  std::function<bool(int round)> stop_after;
  // Called as work advances: phase ("fit", "round 3/5", "evaluate"), step, steps in phase.
  std::function<void(const std::string& phase, int done, int total)> on_progress;
};

// The harmonization phase of a run on its own (Experiment::harmonize; `concord harmonize
// --sites`).
struct HarmonizeOptions {
  // harmonizers[0..last] run in order, each fitted federatively and applied before the next is
  // fitted, exactly as run() does before training; -1: all of them.
  int last = -1;
  // Statistics for harmonizers[last] instead of fitting it (e.g. from load_stats).
  std::optional<Stats> last_stats;
  // Statistics for any of harmonizers[0..last] instead of fitting it, by index (e.g. a learned
  // harmonizer's stage result from a run folder). last_stats, when set, wins for `last`.
  std::map<int, Stats> given_stats;
  // Also return the federation as the dataset built it, before any harmonizer.
  bool keep_unharmonized = false;
  // Called after each site's fit_site: ("fit <type>", sites fitted so far, sites to fit in all).
  std::function<void(const std::string& phase, int done, int total)> on_progress;
};

struct HarmonizeResult {
  Federation federation;                   // every site's images after harmonizers[0..last]
  std::optional<Federation> unharmonized;  // with keep_unharmonized
  // The global statistics each harmonizer broadcast (empty Stats for site-local ones).
  std::vector<Stats> stats;
  std::vector<std::string> fitted_sites;  // the sites that fitted (all but evaluation.held_out)
  int64_t fitted_images = 0;              // their training images
};

// What the sites' data is like: all a coordinator needs to build the model without the data
// (`concord server`; each site tells it when it registers).
struct DataShape {
  Task task = Task::Classification;
  int channels = 1;
  int num_classes = 2;
  std::array<int64_t, 2> image_size{0, 0};  // x, y
  bool operator==(const DataShape& o) const {
    return task == o.task && channels == o.channels && num_classes == o.num_classes &&
           image_size == o.image_size;
  }
  std::string str() const;  // "classification, 2 classes, 1 x 24 x 24"
};

// The sites of a federation that run in other processes (`concord server`): the coordinator
// reaches the pipeline's data.sites, in that order, through `channel`, and builds the model for
// data of `shape`. The sites load their own data and answer the protocol (StandaloneSite).
struct RemoteSites {
  Channel* channel = nullptr;
  DataShape shape;
  // How many site processes of `site` have registered so far (each process once, however often
  // it reconnects). When the count grows during a run (a site process restarted, or a site
  // registered after the run began), the coordinator brings the new process up to date before
  // the next round: the harmonizers' statistics in order, the site's state from the last
  // checkpoint, the current global model. Null: site processes never change.
  std::function<uint64_t(const std::string& site)> starts;
};

// One site of such a federation (`concord site`): its data loaded as a run loads it (the
// pipeline's data section; a simulated federation is built whole and this site's part kept, so
// it holds exactly what the simulation gives it), its Site built with the pipeline's plugins as
// in simulation, answering the coordinator's requests. `output_dir` is the site's own folder
// (a learned harmonizer's site-local state, replay montages); created when used.
class StandaloneSite {
 public:
  StandaloneSite(const PipelineConfig& config, const Registry& registry, const std::string& site,
                 const std::string& output_dir);
  ~StandaloneSite();
  Bytes handle(const Bytes& request);
  const DataShape& shape() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Experiment {
 public:
  Experiment(PipelineConfig config, const Registry& registry);
  // The coordinator of a federation whose sites run elsewhere: run() only (no harmonize()).
  Experiment(PipelineConfig config, const Registry& registry, RemoteSites remote);
  ~Experiment();
  RunSummary run(const RunOptions& options);
  // Test and tooling seam: every exchange between the coordinator and the sites passes through
  // the channel `wrap` returns around the simulation's own (fault injection, recording what
  // crosses the wire: concord/fault_injection.h). Call before run() or harmonize().
  void interpose_channel(std::function<std::unique_ptr<Channel>(Channel& inner)> wrap);
  // Only the start of run(): builds the dataset as run() does (plugin, arguments, seed, site
  // list, partition, scanner shift) and runs the harmonizer fit phase (fit_site per site over
  // its training images, combine, broadcast, apply), without a model. Call it instead of run().
  HarmonizeResult harmonize(const HarmonizeOptions& options);
  // The final global shared state (for tests).
  const NamedArrays& global_state() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace concord
