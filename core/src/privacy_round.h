// Client-level differential privacy in a run (the pipeline's `privacy:` key; docs/privacy.md):
// the coordinator's budget (the noise multiplier for the planned rounds, the accountant, the
// refusal of a round that would exceed the budget, central noise) and the site's side (clip the
// delta, add the local noise share). The mechanism and the accountant are dp_mechanism.h and
// dp_accountant.h; this unit only wires them into the rounds. Torch-free.
#pragma once

#include <concord/aggregator.h>
#include <concord/dp_accountant.h>
#include <concord/dp_mechanism.h>
#include <concord/engine.h>
#include <concord/pipeline.h>
#include <concord/protocol.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace concord {

// What metrics.jsonl (per round) and summary.json say about privacy.
struct PrivacyStatus {
  double epsilon = 0;  // spent so far, at delta
  double delta = 0;
  double budget = 0;  // the pipeline's epsilon
  double order = 0;   // the RDP order attaining epsilon
  double noise_multiplier = 0;
  double q = 0;  // the last accounted round's sampling rate
  double clip = 0;
  int64_t rounds_accounted = 0;
  std::string level, mode, sampling;
};

// The coordinator's side.
class PrivacyBudget {
 public:
  // `trainers`: the sites that train; `planned_per_round`: how many a round selects when every
  // site is available. Throws Error, naming the pipeline location, when the aggregator cannot
  // be used (it needs individual updates) or no noise multiplier up to 1e6 fits the budget.
  PrivacyBudget(const PipelineConfig& config, Aggregator& aggregator, size_t trainers,
                size_t planned_per_round);
  ~PrivacyBudget();

  // Before a round with `selected` sites: "" and the DP settings added to the train request's
  // `settings`, or why the round is refused (it would take epsilon above the budget).
  std::string plan(int round, size_t selected, std::map<std::string, double>& settings);
  // What train_round aggregates with: the pipeline's aggregator behind equal weights and (central
  // mode) the noise on the mean.
  Aggregator& aggregator();
  // After the round: accounts for it when the global model changed.
  void record(int round, size_t selected, const Coordinator::RoundOutcome& outcome);

  PrivacyStatus status() const;
  // "epsilon 2.31 of 8 at delta 1e-05 (client level, central noise, z = 1.2, C = 1, ...)"
  std::string describe() const;
  // The accountant for checkpoints (Checkpoint::privacy) and back (throws Error when unusable).
  NamedArrays save() const;
  void load(const NamedArrays& saved);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The site's side: clips `upload`'s delta from `global` to settings.dp_clip (every float32 entry,
// as one vector), sends its non-float entries (counters DP cannot protect) as received, and adds
// N(0, dp_noise_std^2) to every float32 value from a stream derived from (seed, site, round).
// Without dp_clip nothing happens, unless the site's own pipeline asks for privacy: then the
// request is refused (SiteError), so a coordinator cannot skip the clipping.
void privatize_upload(NamedArrays& upload, const NamedArrays& global,
                      const protocol::TrainSettings& settings, const PipelineConfig& config,
                      const std::string& site, int round);

}  // namespace concord
