// The run folder's record (see run_record.h).
#include "run_record.h"

#include "secure_round.h"

#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/protocol.h>
#include <concord/tensor_bridge.h>

#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace concord {

namespace {

// The whole text of `file`, or "" when it cannot be read.
std::string read_text_or_empty(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string jsonl_line(const json& j) {
  return json_text(j) + "\n";
}

// Metric values as JSON: NaN (undefined, e.g. AUC with one class) as null.
json metrics_json(const std::map<std::string, double>& m) {
  json o = json::object();
  for (const auto& [k, v] : m) o[k] = std::isnan(v) ? json(nullptr) : json(v);
  return o;
}

// The privacy fields of a metrics line and of summary.json (report.cpp reads `privacy.epsilon`).
json privacy_json(const PrivacyStatus& p) {
  json j = {{"epsilon", p.epsilon},
            {"delta", p.delta},
            {"budget", p.budget},
            {"level", p.level},
            {"mode", p.mode},
            {"sampling", p.sampling},
            {"q", p.q},
            {"noise_multiplier", p.noise_multiplier},
            {"clip", p.clip},
            {"rdp_order", p.order},
            {"rounds_accounted", p.rounds_accounted}};
  if (p.level == "sample") {  // epsilon is the largest site's (one accountant per site)
    j["site"] = p.site;
    j["steps_accounted"] = p.steps_accounted;
    j["site_epsilon"] = p.site_epsilon;
  }
  return j;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

RunRecord::RunRecord(fs::path run_dir) : dir_(std::move(run_dir)) {}

void RunRecord::check_folder(bool resume, const std::string& resolved_yaml) const {
  const fs::path stored = dir_ / "pipeline.yaml";
  if (!resume && (fs::exists(dir_ / "checkpoints" / "latest") || fs::exists(stored)))
    throw Error("run folder " + dir_.string() +
                " already holds a run; use --resume to continue it or choose another folder");
  if (resume && read_text_or_empty(stored) != resolved_yaml)
    throw Error("cannot resume " + dir_.string() + ": " +
                (fs::exists(stored) ? "the pipeline differs from the one the run started with"
                                    : std::string("no pipeline.yaml (is it a run folder?)")));
}

void RunRecord::open(bool resume, const std::string& resolved_yaml, int done) {
  fs::create_directories(dir_ / "checkpoints");
  const fs::path file = dir_ / "metrics.jsonl";
  if (!resume) {
    write_file_atomic((dir_ / "pipeline.yaml").string(), resolved_yaml);
    write_file_atomic(file.string(), std::string());
  } else {
    // Drop metric lines written after the checkpoint (an interrupted round, perhaps cut short).
    std::ifstream in(file);
    std::string kept, line;
    while (std::getline(in, line)) {
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.value("round", 0) <= done) kept += line + "\n";
    }
    write_file_atomic(file.string(), kept);
  }
  if (metrics_.is_open()) metrics_.close();
  metrics_.open(file, std::ios::app);
  if (!metrics_) throw Error("cannot append to " + file.string());
}

void RunRecord::append_line(const std::string& line) const {
  const fs::path file = dir_ / "metrics.jsonl";
  std::ofstream out(file, std::ios::app);
  out << line << "\n";
  out.flush();
  if (!out) throw Error("cannot append to " + file.string());
}

void RunRecord::add_round(const Round& r) {
  std::map<std::string, const SiteUpdate*> by_site;
  for (const auto& u : r.outcome->updates) by_site[u.site] = &u;
  std::string lines;
  for (const auto& name : *r.all_sites) {
    json j{{"round", r.round},
           {"site", name},
           {"held_out", !contains(*r.train_sites, name)},
           {"selected", contains(*r.selected, name)},
           {"aggregated", r.outcome->aggregated}};
    if (auto it = by_site.find(name); it != by_site.end()) {
      const auto& scalars = it->second->scalars;
      j[protocol::kTrainLoss] = it->second->train_loss;
      // A secure round knows only the survivors' total (secure_round.h), when it knows any.
      if (!scalars.count(kSecureRound)) j[protocol::kNumSamples] = it->second->num_samples;
      if (auto total = scalars.find(kRoundNumSamples); total != scalars.end())
        j[kRoundNumSamples] = total->second;
    }
    if (contains(r.outcome->skipped, name)) j["skipped"] = "no training samples";
    if (r.metrics)
      if (auto it = r.metrics->find(name); it != r.metrics->end())
        j["metrics"] = metrics_json(it->second);
    if (r.privacy) j["privacy"] = privacy_json(*r.privacy);
    lines += jsonl_line(j);
  }
  metrics_ << lines;
  metrics_.flush();
}

void RunRecord::add_personalized(int round, const SiteMetrics& personalized) {
  std::string lines;
  for (const auto& [name, m] : personalized)
    lines += jsonl_line({{"round", round},
                         {"site", name},
                         {"phase", protocol::kPhasePersonalized},
                         {"metrics", metrics_json(m)}});
  metrics_ << lines;
  metrics_.flush();
}

void RunRecord::write_summary(const PipelineConfig& config, const RunSummary& summary,
                              const std::map<std::string, std::string>& data_notes, Task task,
                              double seconds, const PrivacyStatus* privacy) const {
  json js;
  js["name"] = config.name;
  js["seed"] = config.seed;
  js["rounds"] = summary.rounds_completed;
  js["task"] = task_name(task);
  js["seconds"] = seconds;
  json jsites = json::array();
  for (const auto& s : summary.sites) {
    json o{{"site", s.site}, {"held_out", s.held_out}, {"metrics", metrics_json(s.metrics)}};
    if (!s.personalized.empty()) o["personalized"] = metrics_json(s.personalized);
    jsites.push_back(o);
  }
  js["sites"] = jsites;
  js["mean"] = metrics_json(summary.mean);
  js["worst"] = metrics_json(summary.worst);
  if (privacy) js["privacy"] = privacy_json(*privacy);
  js["failures"] = summary.failures;
  js["ok"] = summary.failures.empty();
  json notes = json::object();
  for (const auto& [k, v] : data_notes) {
    json parsed = json::parse(v, nullptr, /*allow_exceptions=*/false);
    notes[k] = parsed.is_discarded() ? json(v) : parsed;
  }
  js["data_notes"] = notes;
  write_file_atomic((dir_ / "summary.json").string(), json_text(js, 2) + "\n");
}

void RunRecord::write_final_model(int round, const NamedArrays& global, Model& model,
                                  const NamedArrays& initial) const {
  {
    c10::NoGradGuard ng;
    for (auto& e : model.state()) {
      auto it = global.find(e.name);
      e.tensor.copy_(to_tensor(it != global.end() ? it->second : initial.at(e.name)));
    }
  }
  model.save((dir_ / "model.pt").string());
  Bytes gb = encode(protocol::global_state(round, global));
  write_file_atomic((dir_ / "global.state").string(), gb->data(), gb->size());
}

}  // namespace concord
