// Differential privacy in a run (the pipeline's `privacy:` key; docs/privacy.md): the
// coordinator's budget (the noise multiplier for the planned rounds, the accountant, the refusal
// of a round that would exceed the budget, central noise) and the site's side. Client level: the
// site clips its delta and adds its local noise share. Sample level (DP-SGD): every site's local
// training clips each sample's gradient and noises every step (local_training.cpp), with the
// plan below; the coordinator keeps one accountant per site. The mechanism and the accountant
// are dp_mechanism.h and dp_accountant.h; this unit only wires them into the rounds. Torch-free.
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
#include <vector>

namespace concord {

// Sample-level DP-SGD at one site with `train_samples` training samples (Abadi et al., CCS 2016):
// each step's batch is a Poisson sample (every training sample independently with probability
// q), each sample's gradient is clipped to L2 norm C, the clipped sum gets N(0, (sigma C)^2) per
// coordinate and is divided by the expected batch size q n. The site and the coordinator compute
// the same plan from the same pipeline.
struct SampleLevelPlan {
  double q = 0;                 // min(1, training.batch_size / n): what the accountant assumes
  int64_t steps_per_epoch = 0;  // ceil(n / batch_size)
  int64_t planned_steps = 0;    // federation.rounds x training.local_epochs x steps_per_epoch
  double noise_multiplier = 0;  // sigma: privacy.noise_multiplier, or the smallest that keeps
                                // planned_steps at q within the budget
  double clip = 0;              // C: privacy.clip, the bound on one sample's gradient
  double expected_batch = 0;    // q n: the divisor of the noised sum
};
// Throws Error naming the pipeline's `privacy` key (and `site`) when n is 0 or no noise
// multiplier fits the budget.
SampleLevelPlan sample_level_plan(const PipelineConfig& config, int64_t train_samples,
                                  const std::string& site);
// True when the pipeline asks for sample-level DP.
bool sample_level(const PipelineConfig& config);
// Sample-level DP needs per-sample gradients: a model with BatchNorm (batch statistics mix the
// samples of a batch) is refused with an Error naming the model plugin and the pipeline location.
// `module_types`: Model::modules()' types.
void check_sample_level_model(const PipelineConfig& config,
                              const std::vector<std::string>& module_types);

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
  // Sample level: the site whose epsilon is reported (the largest), its optimizer steps
  // accounted, and every site's epsilon so far.
  std::string site;
  int64_t steps_accounted = 0;
  std::map<std::string, double> site_epsilon;
};

// The coordinator's side.
class PrivacyBudget {
 public:
  // `trainers`: the sites that train; `planned_per_round`: how many a round selects when every
  // site is available. Throws Error, naming the pipeline location, when the aggregator cannot
  // be used (client level: it needs individual updates) or no noise multiplier up to 1e6 fits
  // the budget.
  PrivacyBudget(const PipelineConfig& config, Aggregator& aggregator, size_t trainers,
                size_t planned_per_round);
  ~PrivacyBudget();

  // Sample level: the training-set size of each site, when the coordinator knows them before
  // the first round (simulation): their plans are made (and logged) now, and the first round is
  // checked against the budget too. Remote sites' sizes are learnt from their first upload
  // (num_samples). Client level: ignored.
  void set_site_sizes(const std::map<std::string, int64_t>& train_samples);

  // Before a round with the `selected` sites: "" and the DP settings added to the train request's
  // `settings`, or why the round is refused (it would take epsilon above the budget; sample
  // level: any selected site's).
  std::string plan(int round, const std::vector<std::string>& selected,
                   std::map<std::string, double>& settings);
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
// Without dp_clip nothing happens, unless the site's own pipeline asks for client-level privacy:
// then the request is refused (SiteError), so a coordinator cannot skip the clipping. At sample
// level the upload is already private (local training did DP-SGD): a dp_clip is refused as a
// mismatch, nothing else happens.
void privatize_upload(NamedArrays& upload, const NamedArrays& global,
                      const protocol::TrainSettings& settings, const PipelineConfig& config,
                      const std::string& site, int round);

}  // namespace concord
