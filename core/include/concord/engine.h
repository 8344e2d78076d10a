// The federated engine: a Coordinator and Sites running rounds of five explicit steps
// (select, local training, upload, aggregate, broadcast) over a Channel.
#pragma once

#include <concord/pipeline.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace concord {

struct SiteResult {
  std::string site;
  bool held_out = false;
  std::map<std::string, double> metrics;           // after federation (global model)
  std::map<std::string, double> personalized;       // after the adapter's personalisation
};

struct RunSummary {
  std::string run_dir;
  int rounds_completed = 0;
  std::vector<SiteResult> sites;
  std::map<std::string, double> mean, worst;  // over non-held-out sites, per metric
  std::vector<std::string> failures;          // "round 3: site 'x': reason"
};

struct RunOptions {
  std::string run_dir;        // empty: <output>/<name>
  bool resume = false;        // continue from run_dir/checkpoints/latest
  bool progress = false;      // draw a progress bar (terminal)
  int stop_after_round = -1;  // stop (as if interrupted) after this round; tests only
  // Called after every round with the round number (for tests and progress).
  std::function<void(int)> on_round;
};

// Fault injection for tests: makes a site throw in a given round.
struct FaultPlan {
  std::map<std::pair<std::string, int>, std::string> fail;  // (site, round) -> message
};

class Experiment {
 public:
  Experiment(PipelineConfig config, const Registry& registry);
  ~Experiment();
  RunSummary run(const RunOptions& options);
  void inject_faults(FaultPlan plan);
  // The final global shared state (for tests).
  const NamedArrays& global_state() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace concord
