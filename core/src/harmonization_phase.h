// The coordinator's side of the harmonizer phase, run before training (Experiment::run) and on
// its own (Experiment::harmonize): for each harmonizer in order, the sites' statistics, their
// combination, and the broadcast each site applies before the next harmonizer is fitted. All
// through the Coordinator's typed exchanges. Torch-free.
#pragma once

#include <concord/engine.h>
#include <concord/pipeline.h>

#include "learned_stage.h"

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace concord {

// Which sites a run has and what each does: the dataset's order, evaluation.held_out (evaluate
// only), and the sites dropped from the run (they could not take the harmonizer statistics).
struct Roster {
  std::vector<std::string> order;
  std::set<std::string> held, dropped;
  // The sites still in the run, in order; the training ones only unless include_held_out.
  std::vector<std::string> names(bool include_held_out) const;
};

// Everything that went wrong at a site or in a round, in order (RunSummary::failures); each line
// is also logged as an error.
struct FailureLog {
  std::vector<std::string> lines;
  void add(const std::string& line);
};

struct HarmonizationPhase {
  const PipelineConfig& config;
  const Registry& registry;
  Coordinator& coordinator;
  Roster& roster;
  FailureLog& failures;
  // (phase, harmonizer index, harmonizers): before each harmonizer.
  std::function<void(const std::string&, int, int)> on_harmonizer;
  // After each site's fit statistics arrive (progress of the fits).
  std::function<void(const std::string& phase)> on_fit;
  // Learned harmonizers' stages (learned_stage.h): run folder, resume, stop, progress, metrics.
  // Null: no checkpoints or records (`concord harmonize --sites`).
  const LearnedStageOptions* learned = nullptr;

  // harmonizers[0..last] (all when last < 0), in order; `given` replaces the fit of the
  // harmonizers it names (by index). Returns the global statistics each one broadcast (empty Stats
  // for site-local ones). A site whose fit fails or whose statistics are refused is left out of the
  // combination; a site that cannot take the combined statistics is dropped from the run. Both
  // are in `failures`.
  std::vector<Stats> run(int last = -1, const std::map<int, Stats>& given = {});

  // The number of site fits run(last, given) makes (for progress).
  int fits(int last, const std::map<int, Stats>& given) const;

 private:
  std::vector<Stats> site_statistics(size_t i, const std::string& label);
};

// Sends harmonizers 0 .. stats.size()-1 their statistics, in order, to `site` alone (a new
// process of the site being brought up to date): "" or the first failure (naming the site).
std::string resend_statistics(Coordinator& coordinator, const std::vector<Stats>& stats,
                              const std::string& site);

}  // namespace concord
