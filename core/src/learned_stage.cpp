// The learned-harmonizer stage (see learned_stage.h and harmonizer.h).
#include "learned_stage.h"

#include "harmonization_phase.h"

#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/protocol.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace concord {

bool has_learned_harmonizer(const PipelineConfig& config, const Registry& registry) {
  for (size_t i = 0; i < config.harmonizers.size(); ++i) {
    const auto& h = config.harmonizers[i];
    if (registry.create<Harmonizer>(Kind::Harmonizer, h.type, h.args, {config.seed, "coordinator"})
            ->learned())
      return true;
  }
  return false;
}

namespace {

std::string acked(const std::string&, Message&& reply) {
  return protocol::ack_problem(reply);
}

// A phase that shares nothing (sites train only for themselves): the uploads carry no state and
// there is nothing to aggregate.
class NothingShared : public Aggregator {
 public:
  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>&,
                        const RoundInfo&) override {
    return global;
  }
};

// The stage's position: phase, then round (0: before the phase's first round).
struct Position {
  size_t phase = 0;
  int round = 0;
};

}  // namespace

struct LearnedStage::Impl {
  const PipelineConfig& config;
  const Registry& registry;
  Coordinator& coordinator;
  Roster& roster;
  FailureLog& failures;
  LearnedStageOptions options;
  // Each site's learned state at the last checkpoint that has it, and that checkpoint's round.
  std::map<std::string, std::pair<int64_t, NamedArrays>> last_states;

  fs::path folder() const { return options.run_dir / "learned"; }
  fs::path checkpoint_file() const { return folder() / "stage.ckpt"; }
  fs::path stats_file(size_t i) const {
    return folder() /
           ("harmonizer-" + std::to_string(i) + "-" + config.harmonizers[i].type + ".stats");
  }

  void progress(const std::string& phase, int done, int total) const {
    if (options.on_progress) options.on_progress(phase, done, total);
  }

  // The learned lines of metrics.jsonl written after `keep` for harmonizer `i` go (an
  // interrupted round's, replayed on resume); every other line stays.
  void drop_metric_lines_after(size_t i, const Position& keep) const {
    const fs::path file = options.run_dir / "metrics.jsonl";
    std::ifstream in(file);
    if (!in) return;
    std::string kept, line;
    while (std::getline(in, line)) {
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("stage") && j.value("harmonizer", -1) == int(i)) {
        const size_t phase = j.value("phase_index", size_t(0));
        const int round = j.value("stage_round", 0);
        if (phase > keep.phase || (phase == keep.phase && round > keep.round)) continue;
      }
      kept += line + "\n";
    }
    write_file_atomic(file.string(), kept);
  }

  Stats run(size_t i, Harmonizer& h, const std::function<std::vector<Stats>()>& survey_fn) {
    const auto& hc = config.harmonizers[i];
    const std::string label = "harmonizer " + std::to_string(i) + " (" + hc.type + ")";
    const bool record = !options.run_dir.empty();
    if (record && options.resume && fs::exists(stats_file(i))) {
      std::string method;
      Stats done = load_stats(stats_file(i).string(), &method);
      if (method != hc.type)
        throw Error(stats_file(i).string() + ": statistics of method '" + method + "', not '" +
                    hc.type + "'");
      spdlog::info("{}: stage finished before the interruption; its statistics are read from {}",
                   label, stats_file(i).string());
      return done;
    }
    auto it = config.learned_stages.find(i);
    if (it == config.learned_stages.end())
      throw Error(label + ": the pipeline has no stage settings for it (not validated?)");
    const PipelineConfig::LearnedStage& stage = it->second;
    StageSettings settings{stage.rounds, stage.local_epochs, stage.lr};

    // 1. survey and 2. plan
    progress("stage " + hc.type + ": survey", 0, 1);
    std::vector<Stats> parts = survey_fn();
    if (parts.empty()) throw Error(label + ": no site sent usable survey statistics");
    LearnedPlan plan;
    try {
      plan = h.plan(parts, settings);
    } catch (const std::exception& e) {
      throw Error(label + ": planning the stage failed: " + e.what());
    }
    std::vector<std::string> sites;
    for (const auto& p : parts) sites.push_back(p.site);
    for (const auto& f : coordinator.ask(protocol::learn_begin(i, plan.shared), sites, acked))
      failures.add("stage: " + label + ": " + f.what + " (left out of the stage)");
    spdlog::info("{}: stage of {} phase(s) over {} site(s)", label, plan.phases.size(),
                 sites.size());

    // Resume inside the stage.
    Position start;
    std::vector<NamedArrays> finals;
    NamedArrays resumed_global, resumed_aggregator;
    bool resumed = false;
    if (record && options.resume && fs::exists(checkpoint_file())) {
      protocol::LearnedCheckpoint c = protocol::read_learned_checkpoint(
          decode(read_file(checkpoint_file().string())), roster.order);
      if (c.pipeline != config.resolved_yaml)
        throw Error(checkpoint_file().string() +
                    ": written for another pipeline than the run folder's pipeline.yaml");
      if (c.harmonizer == i) {
        if (c.phase >= plan.phases.size() || c.round < 1 || c.round > plan.phases[c.phase].rounds)
          throw Error(checkpoint_file().string() + ": phase " + std::to_string(c.phase) +
                      " round " + std::to_string(c.round) + " is not in this stage's plan");
        for (const auto& [site, st] : c.sites)
          for (const auto& f :
               coordinator.ask(protocol::learn_restore_request(i, c.round, st), {site}, acked))
            throw Error(checkpoint_file().string() + ": " + f.what);
        start = {c.phase, int(c.round)};
        for (const auto& [site, st] : c.sites) last_states[site] = {int64_t(c.round), st};
        finals = std::move(c.finals);
        resumed_global = std::move(c.global);
        resumed_aggregator = std::move(c.aggregator);
        failures.lines = std::move(c.failures);
        resumed = true;
        spdlog::info("{}: resuming the stage after phase '{}' round {}", label,
                     plan.phases[c.phase].name, c.round);
      }
    }
    if (record) drop_metric_lines_after(i, start);

    // 3. phases
    const NamedArrays task_global = coordinator.global();
    for (size_t p = resumed ? start.phase : 0; p < plan.phases.size(); ++p) {
      const LearnedPhase& phase = plan.phases[p];
      std::unique_ptr<Aggregator> aggregator =
          phase.initial.empty() ? std::make_unique<NothingShared>()
                                : registry.create<Aggregator>(
                                      Kind::Aggregator, stage.aggregator.type,
                                      stage.aggregator.args, {config.seed, "stage-aggregator"});
      NamedArrays global = phase.initial;
      int first = 1;
      if (resumed && p == start.phase) {
        if (std::string why = protocol::state_mismatch(phase.initial, resumed_global); !why.empty())
          throw Error(checkpoint_file().string() + ": global state " + why);
        global = std::move(resumed_global);
        aggregator->load_state(resumed_aggregator);
        first = start.round + 1;
      }
      std::vector<std::string> phase_sites;
      for (const auto& s : phase.sites)
        if (!roster.dropped.count(s)) phase_sites.push_back(s);
      if (phase_sites.empty()) {  // e.g. a federation of the reference site alone
        finals.push_back(std::move(global));
        continue;
      }
      for (int r = first; r <= phase.rounds; ++r) {
        const std::string name = "stage " + hc.type + " " + phase.name + " " + std::to_string(r) +
                                 "/" + std::to_string(phase.rounds);
        bring_up_to_date(i, plan.shared, sites,
                         hc.type + " " + phase.name + " round " + std::to_string(r));
        progress(name, 0, int(phase_sites.size()));
        protocol::LearnRequest req;
        req.harmonizer = i;
        req.phase = p;
        req.round = r;
        req.rounds = phase.rounds;
        req.local_epochs = phase.local_epochs;
        req.global = global;
        req.finals = finals;
        coordinator.set_global(global);
        auto outcome = coordinator.train_round_with(
            *aggregator, r, phase.rounds, phase_sites, protocol::learn_request(req), 1,
            [&](const std::string& site, size_t k, size_t n) {
              progress(name + ": " + site + " training (" + std::to_string(k + 1) + "/" +
                           std::to_string(n) + ")",
                       int(k), int(n));
            });
        global = coordinator.global();
        coordinator.set_global(task_global);
        const std::string at =
            "stage " + hc.type + " " + phase.name + " round " + std::to_string(r) + ": ";
        for (const auto& f : outcome.failures) failures.add(at + f);
        if (!outcome.aggregated) failures.add(at + "not aggregated: " + outcome.not_aggregated);
        log_round(i, hc.type, p, phase, r, outcome);
        if (record) {
          checkpoint(i, p, r, global, *aggregator, finals, sites);
          if (options.stop && options.stop()) {
            spdlog::warn("stopped after {} ; continue with --resume", name);
            throw LearnedStageStopped{};
          }
        }
      }
      finals.push_back(std::move(global));
    }

    // 4. result
    progress("stage " + hc.type + ": result", 0, 1);
    std::vector<Stats> results;
    const NamedArrays last = finals.empty() ? NamedArrays{} : finals.back();
    for (const auto& f : coordinator.ask(protocol::learn_result_request(i, last), sites,
                                         [&](const std::string&site, Message&&reply) {
                                           auto s = protocol::read_statistics(std::move(reply));
                                           if (!s.ok()) return s.problem;
                                           results.push_back(std::move(*s.value));
                                           results.back().site = site;
                                           return std::string();
                                         }))
      failures.add("stage: " + label + ": result: " + f.what + " (left out)");
    if (results.empty()) throw Error(label + ": no site sent the stage's result");
    Stats global;
    try {
      global = h.combine(results);
    } catch (const std::exception& e) {
      throw Error(label + ": combining the stage's results failed: " + e.what());
    }
    if (record) {
      fs::create_directories(folder());
      save_stats(global, stats_file(i).string(), hc.type);
      // The sidecar `concord harmonize apply --stats` reads the plugin's arguments from.
      json side{{"method", hc.type}, {"sites", roster.names(false)}, {"learned_stage", true}};
      json args = json::array();
      for (const auto& [k, v] : hc.args.values()) args.push_back(k + "=" + v.str());
      side["args"] = args;
      write_file_atomic(stats_file(i).string() + ".json", json_text(side, 2) + "\n");
      spdlog::info("{}: stage done; statistics in {}", label, stats_file(i).string());
    }
    return global;
  }

  // Remote sites: a stage site whose process is new since it was last brought up to date (a
  // restart during the stage) gets, before round `at`, the earlier harmonizers' statistics,
  // learn-begin and its state from the stage's last checkpoint, and takes part from that round.
  // Without a checkpoint (no run folder) its local networks start afresh. If that fails, the
  // failure is named and the engine brings the process up to date after the stage.
  void bring_up_to_date(size_t i, const Stats& shared, const std::vector<std::string>& sites,
                        const std::string& at) {
    if (!options.restarted || !options.caught_up) return;
    static const std::vector<Stats> none;
    const std::vector<Stats>& earlier = options.earlier ? *options.earlier : none;
    for (const auto& site : sites) {
      if (!options.restarted(site)) continue;
      std::string why = resend_statistics(coordinator, earlier, site);
      if (why.empty())
        for (const auto& f : coordinator.ask(protocol::learn_begin(i, shared), {site}, acked))
          why = f.what;
      auto kept = last_states.find(site);
      if (why.empty() && kept != last_states.end())
        for (const auto& f : coordinator.ask(
                 protocol::learn_restore_request(i, kept->second.first, kept->second.second),
                 {site}, acked))
          why = f.what;
      if (!why.empty()) {
        failures.add("stage " + at + ": " + why +
                     " (a new process of the site could not join the stage; it is brought up "
                     "to date after it)");
        continue;
      }
      options.caught_up(site);
      spdlog::info(
          "stage {}: site '{}': a new process of the site registered: brought into the "
          "stage ({} earlier harmonizer statistics, {})",
          at, site, earlier.size(),
          kept != last_states.end() ? "its state from the stage's checkpoint of round " +
                                          std::to_string(kept->second.first)
                                    : "no checkpointed state: its networks start afresh");
    }
  }

  void log_round(size_t i, const std::string& type, size_t p, const LearnedPhase& phase, int r,
                 const Coordinator::RoundOutcome& outcome) const {
    double loss = 0, n = 0;
    for (const auto& u : outcome.updates) loss += u.train_loss * u.num_samples, n += u.num_samples;
    spdlog::info("stage {} {} round {}/{}: {} sites trained, mean loss {:.4f}", type, phase.name, r,
                 phase.rounds, outcome.updates.size(), n > 0 ? loss / n : 0.0);
    if (!options.add_metrics_line) return;
    for (const auto& u : outcome.updates) {
      json j{{"round", 0},
             {"stage", type},
             {"harmonizer", i},
             {"phase", phase.name},
             {"phase_index", p},
             {"stage_round", r},
             {"site", u.site},
             {"aggregated", outcome.aggregated},
             {"stage_loss", u.train_loss},
             {protocol::kNumSamples, u.num_samples}};
      for (const auto& [k, v] : u.scalars)
        if (k != protocol::kTrainLoss && k != protocol::kNumSamples) j[k] = v;
      options.add_metrics_line(json_text(j));
    }
  }

  // Every training site's learned state (through the Channel), with the stage's global and
  // aggregator state, into learned/stage.ckpt (atomically).
  void checkpoint(size_t i, size_t p, int r, const NamedArrays& global, Aggregator& aggregator,
                  const std::vector<NamedArrays>& finals, const std::vector<std::string>& sites) {
    protocol::LearnedCheckpoint c;
    c.harmonizer = i;
    c.phase = p;
    c.round = r;
    c.global = global;
    c.aggregator = aggregator.state();
    c.finals = finals;
    for (const auto& f : coordinator.ask(protocol::learn_export_request(i, r), sites,
                                         [&](const std::string&site, Message&&reply) {
                                           auto st = protocol::read_learn_state(std::move(reply));
                                           if (!st.ok()) return st.problem;
                                           c.sites[site] = std::move(*st.value);
                                           return std::string();
                                         }))
      failures.add("stage round " + std::to_string(r) + ": checkpoint: " + f.what);
    // For a site process that restarts during the stage (a site whose export failed keeps its
    // state of an earlier checkpoint: the last it had).
    for (const auto& [site, st] : c.sites) last_states[site] = {r, st};
    c.pipeline = config.resolved_yaml;
    c.failures = failures.lines;
    fs::create_directories(folder());
    Bytes b = encode(protocol::learned_checkpoint(c));
    write_file_atomic(checkpoint_file().string(), b->data(), b->size());
  }
};

LearnedStage::LearnedStage(const PipelineConfig& config, const Registry& registry,
                           Coordinator& coordinator, Roster& roster, FailureLog& failures,
                           LearnedStageOptions options)
    : impl_(std::make_shared<Impl>(
          Impl{config, registry, coordinator, roster, failures, std::move(options), {}})) {}

Stats LearnedStage::run(size_t index, Harmonizer& coordinator_side,
                        const std::function<std::vector<Stats>()>& survey) {
  return impl_->run(index, coordinator_side, survey);
}

// ---- the site's side ---------------------------------------------------------------------------

namespace {
StageSettings config_stage(const LearnedSiteContext& ctx, size_t i) {
  auto it = ctx.config->learned_stages.find(i);
  if (it == ctx.config->learned_stages.end())
    throw Error("harmonizers[" + std::to_string(i) + "] has no stage settings in the pipeline");
  return {it->second.rounds, it->second.local_epochs, it->second.lr};
}
}  // namespace

Message answer_learned(const std::vector<std::unique_ptr<Harmonizer>>& harmonizers, Message&& in,
                       const LearnedSiteContext& ctx) {
  const std::string& site = *ctx.site;
  const size_t i = protocol::read_harmonizer(in, harmonizers.size());
  Harmonizer& h = *harmonizers[i];
  if (!h.learned())
    throw Error("harmonizers[" + std::to_string(i) + "] is not learned: no '" + in.type +
                "' requests");
  const auto kind = protocol::request_kind(in);
  if (ctx.begun && kind != protocol::Request::LearnBegin && !ctx.begun->count(i))
    throw Error("refusing '" + in.type + "' for harmonizer " + std::to_string(i) +
                ": this site process had no learn-begin for it (did it start during the "
                "harmonizer's stage?)");
  switch (kind) {
    case protocol::Request::LearnBegin: {
      auto st = config_stage(ctx, i);
      in.scalars.erase(protocol::kHarmonizer);
      LearnedSiteData d;
      d.site = site;
      d.train = &ctx.data->train;
      d.num_classes = ctx.num_classes;
      d.seed = ctx.config->seed;
      d.settings = st;
      d.output_dir = ctx.output_dir;
      h.learn_begin(stats_from_message(std::move(in)), d);
      if (ctx.begun) ctx.begun->insert(i);
      return protocol::ack(site, 0);
    }
    case protocol::Request::Learn: {
      protocol::LearnRequest r = protocol::read_learn_request(std::move(in), harmonizers.size());
      LearnedRound lr;
      lr.phase = r.phase;
      lr.round = r.round;
      lr.rounds = r.rounds;
      lr.local_epochs = r.local_epochs;
      lr.global = &r.global;
      lr.finals = &r.finals;
      LearnedUpdate u = h.learn_round(lr);
      if (u.num_samples <= 0) return protocol::empty_update(site, r.round);
      Message m = protocol::update(site, r.round, std::move(u.shared), u.num_samples, u.loss, 0);
      for (const auto& [k, v] : u.scalars)
        if (!m.scalars.count(k)) m.scalars[k] = v;
      return m;
    }
    case protocol::Request::LearnResult: {
      NamedArrays final_global = std::move(in.arrays);
      return protocol::statistics(site, h.learn_result(final_global));
    }
    case protocol::Request::LearnExport:
      return protocol::learn_state(site, in.round, h.learned_state());
    case protocol::Request::LearnRestore: {
      if (std::string bad = protocol::non_finite_entry(in.arrays); !bad.empty())
        throw Error("the learned state to restore has non-finite values in '" + bad + "'");
      NamedArrays st;
      for (auto& [k, v] : in.arrays) st[k] = v.clone();
      h.load_learned_state(st);
      return protocol::ack(site, in.round);
    }
    default:
      throw Error("not a learned-stage request: '" + in.type + "'");
  }
}

}  // namespace concord
