// Harmonizer plugins: federated fit of statistics, then a per-image transform (or augmentation).
//
// Federated fit phase (run by the engine before training, and by `concord harmonize fit`):
//   1. each site: stats_i = fit_site(its training images)     -> only stats cross the Channel
//   2. coordinator: global = combine({stats_i})               -> broadcast
//   3. each site: set_statistics(global, site); then apply() to each of its images (or
//      augment() per sample during training when augments() is true).
// Masks are never passed to a harmonizer.
#pragma once

#include <concord/array.h>
#include <concord/image.h>
#include <concord/message.h>
#include <concord/registry.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

namespace concord {

// Statistics a harmonizer declares: named arrays and scalars, with the weight (usually the
// number of images) they stand for. This is all that leaves a site.
struct Stats {
  NamedArrays arrays;
  std::map<std::string, double> scalars;
  double weight = 0;
  // The site a fit_site() result comes from: set by the caller (engine, `concord harmonize`)
  // before combine(), so harmonizers that keep per-site statistics can key them by site.
  // Empty for combined statistics.
  std::string site;
};

// Calls the visitor once per image; lets sites and the offline tool stream images.
using ImageVisitor = std::function<void(const Image&)>;
using ImageSource = std::function<void(const ImageVisitor&)>;

// ---- learned harmonizers (a federated training stage instead of one round of statistics) ----
//
// A learned harmonizer (learned() true) is fitted by the engine's learned stage
// (core/src/learned_stage.h, ARCHITECTURE.md), through the same Coordinator and protocol as the
// task model, before the task stage:
//   1. survey    each training site: survey(its training data) -> declared statistics only
//                (default: fit_site over its training images)
//   2. plan      coordinator: plan(survey, settings) -> phases (who trains, the shared state to
//                start from, rounds) and the plan every site receives (learn_begin)
//   3. phases    per phase, per round: coordinator sends the phase's global shared state; each
//                site of the phase: learn_round() trains locally and returns its shareable
//                state; the stage's aggregator combines them; checkpoint (learned_state() of
//                every site through the Channel, restored with load_learned_state on resume)
//   4. result    each training site: learn_result(final global) -> Stats (weights it needs);
//                coordinator: combine() -> what set_statistics receives at every site, and what
//                `concord harmonize fit --sites` saves (so `harmonize apply --stats` works)
// Nothing but named arrays and scalars crosses the Channel; images stay at their site.

// The stage's settings (pipeline: harmonizers[i].stage; defaults from default_stage()).
struct StageSettings {
  int rounds = 5;        // rounds of each training phase
  int local_epochs = 1;  // local epochs per round
  double lr = 1e-3;      // the harmonizer's learning rate
};

// One federated training phase of a learned stage.
struct LearnedPhase {
  std::string name;                // "style", "cyclegan", "vae": progress bar and metrics.jsonl
  std::vector<std::string> sites;  // the sites that train in it (a subset of the survey's)
  NamedArrays initial;             // the shared state it starts from: every upload must have its
                                   // entries, dtypes and shapes (empty: nothing is shared)
  int rounds = 1;
  int local_epochs = 1;
};

struct LearnedPlan {
  std::vector<LearnedPhase> phases;
  Stats shared;  // sent to every site before the first phase (learn_begin), e.g. the reference
};

// A site's training data as a learned harmonizer sees it (masks are there, never to be changed).
struct LearnedSiteData {
  std::string site;
  const std::vector<Sample>* train = nullptr;
  int num_classes = 0;  // the task's (0: unknown, e.g. `concord harmonize --sites`)
  uint64_t seed = 0;    // the pipeline's
  StageSettings settings;
  std::string output_dir;  // where the site may write figures (montages); empty: nowhere
};

// One round of one phase at a site.
struct LearnedRound {
  size_t phase = 0;
  int round = 1;  // 1-based within the phase
  int rounds = 1;
  int local_epochs = 1;
  const NamedArrays* global = nullptr;               // the phase's current global shared state
  const std::vector<NamedArrays>* finals = nullptr;  // final global state of earlier phases
};

struct LearnedUpdate {
  NamedArrays shared;      // the entries of the phase's global state (empty when none)
  double num_samples = 0;  // the aggregation weight (0: nothing trained)
  double loss = 0;         // reported as train_loss in metrics.jsonl
  std::map<std::string, double> scalars;  // other per-round figures (logged)
};

// Task-stage replay (learned harmonizers that add synthetic samples to training batches).
struct ReplayRequest {
  int64_t real = 0;  // real samples in the batch
  int round = 1, rounds = 1;
  const std::vector<Sample>* train = nullptr;  // the site's real training samples
  std::mt19937_64* rng = nullptr;
};

class Harmonizer : public Plugin {
 public:
  // False: the harmonizer is site-local (e.g. N4) and fit/combine are skipped.
  virtual bool needs_fit() const { return true; }
  virtual Stats fit_site(const ImageSource& images) = 0;
  // Combines per-site (or per-chunk) statistics; must accept its own output as input.
  virtual Stats combine(const std::vector<Stats>& parts) = 0;
  virtual void set_statistics(const Stats& global, const std::string& site) = 0;
  // Fixed transform applied once to every image of the site (train and test).
  virtual void apply(Image& image) const = 0;
  // Augmentation instead of a fixed transform: applied to each training sample per draw.
  virtual bool augments() const { return false; }
  virtual void augment(Image& /*image*/, std::mt19937_64& /*rng*/) const {}

  // ---- learned harmonizers (see above); the defaults describe a statistics harmonizer ----
  virtual bool learned() const { return false; }
  virtual StageSettings default_stage() const { return {}; }
  // Site: what it declares for planning (the fit exchange). Default: fit_site over its images.
  virtual Stats survey(const LearnedSiteData& data);
  // Coordinator: the phases, from the survey (fit_site results, Stats::site set).
  virtual LearnedPlan plan(const std::vector<Stats>& survey, const StageSettings& settings);
  // Site: before the first phase (and again on resume, before load_learned_state).
  virtual void learn_begin(const Stats& /*plan*/, const LearnedSiteData& /*data*/) {}
  virtual LearnedUpdate learn_round(const LearnedRound& round);
  // Site: everything needed to continue bit-identically after a resume (never leaves the run:
  // it goes into the coordinator's checkpoint file only).
  virtual NamedArrays learned_state() const { return {}; }
  virtual void load_learned_state(const NamedArrays& /*state*/) {}
  // Site: the statistics it contributes after the last phase (`final_global`: the last phase's).
  virtual Stats learn_result(const NamedArrays& final_global);
  // Task stage: synthetic samples appended to each training batch (replay). Classification.
  virtual bool replays() const { return false; }
  virtual void replay(const ReplayRequest& /*request*/, std::vector<Image>& /*images*/,
                      std::vector<int64_t>& /*labels*/) const {}
};

// Stats as a Message (the Channel and the statistics file use the same form): arrays and
// scalars as they are, the weight as the reserved scalar "__weight". `site` does not travel.
Message stats_message(Stats stats, const std::string& type);
Stats stats_from_message(Message&& message);

// Serialises Stats to a file (the same wire format as Channel messages), atomically.
void save_stats(const Stats& stats, const std::string& file, const std::string& method);
Stats load_stats(const std::string& file, std::string* method = nullptr);

}  // namespace concord
