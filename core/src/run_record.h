// What a run leaves in its folder besides checkpoints: pipeline.yaml, metrics.jsonl (one line per
// site and round, and per site for the personalized evaluation), and at the end summary.json,
// global.state and model.pt. Every file is written atomically or appended line by line.
#pragma once

#include <concord/engine.h>
#include <concord/model.h>

#include "privacy_round.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace concord {

using SiteMetrics = std::map<std::string, std::map<std::string, double>>;  // site -> metric -> v

class RunRecord {
 public:
  explicit RunRecord(std::filesystem::path run_dir);
  const std::filesystem::path& dir() const { return dir_; }

  // Refuses a folder that already holds a run unless resuming; on resume, refuses one started
  // with another pipeline. Call before anything is written.
  void check_folder(bool resume, const std::string& resolved_yaml) const;
  // Creates the folder and pipeline.yaml and starts metrics.jsonl: empty for a new run; for a
  // resumed one the lines up to round `done`, so an interrupted round's lines go.
  void open(bool resume, const std::string& resolved_yaml, int done);

  // One line per site for a finished round.
  struct Round {
    int round = 0;
    const std::vector<std::string>* all_sites = nullptr;
    const std::vector<std::string>* train_sites = nullptr;
    const std::vector<std::string>* selected = nullptr;
    const Coordinator::RoundOutcome* outcome = nullptr;
    const SiteMetrics* metrics = nullptr;    // null: no evaluation this round
    const PrivacyStatus* privacy = nullptr;  // null: no `privacy:` in the pipeline
  };
  void add_round(const Round& r);
  void add_personalized(int round, const SiteMetrics& personalized);
  // One line (JSON text) appended to metrics.jsonl, also before open() (a learned harmonizer's
  // stage runs before the task stage; its lines carry round 0).
  void append_line(const std::string& line) const;

  // summary.json: the run's results, its failures, `ok`, and the data's notes.
  void write_summary(const PipelineConfig& config, const RunSummary& summary,
                     const std::map<std::string, std::string>& data_notes, Task task,
                     double seconds, const PrivacyStatus* privacy = nullptr) const;
  // global.state (the final global state as a protocol message) and model.pt (the model with
  // the global state, local entries at their initial values).
  void write_final_model(int round, const NamedArrays& global, Model& model,
                         const NamedArrays& initial) const;

 private:
  std::filesystem::path dir_;
  std::ofstream metrics_;
};

}  // namespace concord
