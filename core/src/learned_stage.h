// The learned-harmonizer stage (harmonizer.h, "learned harmonizers"): the coordinator's side
// (LearnedStage, called by the harmonizer phase for every harmonizer whose learned() is true) and
// the site's side (answer_learned, called by site.cpp for the learn-* requests). Everything goes
// through the Coordinator's exchanges and the typed protocol (protocol.h, "the learned-harmonizer
// stage"), so it runs unchanged when sites are other processes. Torch-free.
#pragma once

#include <concord/engine.h>
#include <concord/harmonizer.h>
#include <concord/pipeline.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace concord {

struct Roster;
struct FailureLog;

// Thrown when RunOptions::stop_after asks a run to stop during a learned stage (after the
// stage's checkpoint): Experiment::run returns as after an interrupted round.
struct LearnedStageStopped {};

struct LearnedStageOptions {
  // The run folder: checkpoints/learned.ckpt after every round, learned/harmonizer-<i>-<type>.stats
  // when the stage ends (a statistics file, as `concord harmonize fit` writes), site outputs.
  // Empty (`concord harmonize --sites`): no checkpoints, nothing written.
  std::filesystem::path run_dir;
  bool resume = false;
  // Asked after each checkpointed round; true stops the run (LearnedStageStopped).
  std::function<bool()> stop;
  std::function<void(const std::string& phase, int done, int total)> on_progress;
  // One metrics.jsonl line (JSON text without the newline).
  std::function<void(const std::string& line)> add_metrics_line;
  // Remote sites (RemoteSites::starts): true when `site` has a new process since it was last
  // brought up to date; caught_up(site) records that it now is. Before each round of the stage
  // such a process gets what its predecessor had: the statistics of the harmonizers before this
  // one (`earlier`, set by the harmonizer phase), learn-begin, and its learned state from the
  // stage's last checkpoint. Unset: sites do not restart (simulation).
  std::function<bool(const std::string& site)> restarted;
  std::function<void(const std::string& site)> caught_up;
  const std::vector<Stats>* earlier = nullptr;
};

// True when one of the pipeline's harmonizers is learned.
bool has_learned_harmonizer(const PipelineConfig& config, const Registry& registry);

class LearnedStage {
 public:
  LearnedStage(const PipelineConfig& config, const Registry& registry, Coordinator& coordinator,
               Roster& roster, FailureLog& failures, LearnedStageOptions options);
  // Trains harmonizers[index] (`coordinator_side`: the coordinator's instance of it) and returns
  // the combined statistics every site then receives with set_statistics. `survey` runs the fit
  // exchange (the sites' fit_site statistics, Stats::site set). On resume, a finished stage's
  // statistics file is read instead, and an interrupted stage continues from its checkpoint.
  Stats run(size_t index, Harmonizer& coordinator_side,
            const std::function<std::vector<Stats>()>& survey);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// The site's side: answers learn-begin, learn, learn-result, learn-export and learn-restore for
// its harmonizers. `data` is the site's own (training samples, labels). `output_dir`: where the
// site may write figures (empty: nowhere).
struct LearnedSiteContext {
  const PipelineConfig* config = nullptr;
  const std::string* site = nullptr;
  const SiteData* data = nullptr;
  std::string output_dir;
  int num_classes = 0;  // the task's, 0 when the site has no model
  // The harmonizers this site process had learn-begin for (updated here): any other learn-*
  // request for a harmonizer not in it is refused (a process that started during the stage).
  std::set<size_t>* begun = nullptr;
};
Message answer_learned(const std::vector<std::unique_ptr<Harmonizer>>& harmonizers, Message&& in,
                       const LearnedSiteContext& context);

}  // namespace concord
