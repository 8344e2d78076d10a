// Experiment: a simulated federation built from a pipeline, run as a real one would be. The sites
// (site.cpp) sit behind an in-process Channel; this file is the coordinator's side: set-up, the
// harmonizer phase, then rounds of the five steps (select, local training, upload, aggregate,
// broadcast), evaluation, checkpoints through the Channel, and the run record.
#include <concord/adapter.h>
#include <concord/engine.h>
#include <concord/protocol.h>

#include "checkpointing.h"
#include "federation_load.h"
#include "harmonization_phase.h"
#include "learned_stage.h"
#include "local_training.h"
#include "privacy_round.h"
#include "run_record.h"
#include "secure_round.h"
#include "site.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

namespace fs = std::filesystem;

namespace concord {

struct Experiment::Impl {
  PipelineConfig config;
  const Registry& registry;
  // The federation: sites behind the in-process channel (optionally wrapped), the coordinator.
  InProcessChannel channel;
  std::function<std::unique_ptr<Channel>(Channel&)> wrap;
  std::unique_ptr<Channel> wrapped;
  std::unique_ptr<ModelPool> pool;  // the process's model, scratch for the simulated sites
  std::unique_ptr<SimulatedSites> sites;
  std::optional<RemoteSites> remote;  // concord server: the sites run elsewhere
  std::unique_ptr<Coordinator> coordinator;
  // The coordinator's own plugin instances.
  std::unique_ptr<Adapter> adapter;  // what is shared, whether sites personalise
  std::unique_ptr<Aggregator> aggregator;
  std::unique_ptr<PrivacyBudget> privacy;  // the pipeline's `privacy:` (privacy_round.h)
  std::vector<std::string> metric_names;
  Federation data_info;  // task, classes, channels, notes (the images live in the sites)
  Roster roster;
  FailureLog failures;
  // The run's state on the coordinator's side.
  SiteMetrics last_eval;
  std::map<std::string, protocol::SiteState> kept_states;  // each site's last exported state
  NamedArrays final_global;
  // Remote sites: the statistics each harmonizer broadcast, and each site's process count
  // (RemoteSites::starts) when it was last brought up to date.
  std::vector<Stats> harmonizer_stats;
  std::map<std::string, uint64_t> starts_seen;

  Impl(PipelineConfig c, const Registry& r) : config(std::move(c)), registry(r) {}

  void progress(const RunOptions& o, const std::string& phase, int done, int total) {
    if (o.on_progress) o.on_progress(phase, done, total);
  }

  // Builds one Site per hospital (with the model, or for the harmonizer phase only) behind the
  // channel, and the coordinator on the channel.
  void connect(std::vector<SiteData>&& site_data, ModelPool* model_pool) {
    Channel* inner = &channel;
    if (remote)
      inner = remote->channel;
    else
      sites = std::make_unique<SimulatedSites>(config, registry, std::move(site_data), model_pool,
                                               channel);
    if (wrap) wrapped = wrap(*inner);
    coordinator = std::make_unique<Coordinator>(wrapped ? *wrapped : *inner, config.seed);
  }

  // A federation whose sites run elsewhere: the pipeline's data.sites, data of the shape they
  // reported, no images here.
  Federation remote_federation() {
    if (config.data.sites.empty())
      throw Error(config.file +
                  ": data.sites must list the federation's sites (each site's certificate name) "
                  "to run with remote sites");
    fill_roster(config, config.data.sites, roster);
    Federation fed;
    fed.task = remote->shape.task;
    fed.channels = remote->shape.channels;
    fed.num_classes = remote->shape.num_classes;
    return fed;
  }

  // Data, model, the coordinator's plugins, the sites.
  void setup(const RunOptions& options) {
    spdlog::debug("LibTorch threads: {}", configure_torch_process(config.training.threads));
    progress(options, "loading data", 0, 1);
    Federation fed = remote ? remote_federation() : load_federation(config, registry, roster);
    ModelSpec spec;
    if (remote)
      spec = {remote->shape.task, remote->shape.channels, remote->shape.num_classes,
              remote->shape.image_size};
    pool = std::make_unique<ModelPool>(remote ? build_model_pool(config, registry, spec)
                                              : build_model_pool(config, registry, fed));
    adapter = build_adapter(config, registry, *pool->model, "adapter");
    NamedArrays global;
    for (auto& e : pool->model->state())
      if (adapter->is_shared(e)) global[e.name] = pool->initial.at(e.name);
    aggregator = registry.create<Aggregator>(Kind::Aggregator, config.aggregator.type,
                                             config.aggregator.args, {config.seed, "aggregator"});
    for (const auto& [name, metric] : build_metrics(config, registry, fed.task, "metric"))
      metric_names.push_back(name);

    for (const auto& [k, v] : fed.notes)
      if (k.rfind("scanner.", 0) == 0) spdlog::info("{} scanner: {}", k.substr(8), v);
    for (const auto& sd : fed.sites)
      if (sd.test.empty() && (roster.held.count(sd.name) || sd.train.empty()))
        spdlog::warn("site '{}' has no {}images: it will report nothing", sd.name,
                     roster.held.count(sd.name) ? "test " : "");
    const size_t trainers = roster.names(false).size();
    if (trainers == 0)
      throw Error(config.file + ": evaluation.held_out names every site: none is left to train");
    if (size_t(config.federation.min_sites) > trainers)
      throw Error(
          config.file + ": federation.min_sites = " + std::to_string(config.federation.min_sites) +
          " but only " + std::to_string(trainers) + " sites train: no round could ever aggregate");

    if (config.secure_aggregation)
      check_secure_aggregation(config, aggregator->aggregates_by_sum(), trainers);
    if (config.privacy) {
      const size_t per_round = std::clamp<size_t>(
          size_t(std::ceil(config.federation.fraction * double(trainers) - 1e-9)), 1, trainers);
      if (sample_level(config)) {
        std::vector<std::string> types;
        for (const auto& m : pool->model->modules()) types.push_back(m.type);
        check_sample_level_model(config, types);
      }
      privacy = std::make_unique<PrivacyBudget>(config, *aggregator, trainers, per_round);
      std::map<std::string, int64_t> sizes;  // simulation: known now (remote: from uploads)
      for (const auto& sd : fed.sites)
        if (!roster.held.count(sd.name)) sizes[sd.name] = int64_t(sd.train.size());
      privacy->set_site_sizes(sizes);
    }

    connect(take_sites(fed), pool.get());
    coordinator->set_global(std::move(global));
  }

  // Moves the images out of `fed`, leaving its description (task, classes, notes) in data_info.
  std::vector<SiteData> take_sites(Federation& fed) {
    std::vector<SiteData> out = std::move(fed.sites);
    fed.sites.clear();
    data_info = std::move(fed);
    return out;
  }

  void harmonize_sites(const RunOptions& options, RunRecord& record) {
    // Remote sites: the processes registered before the phase take part in it. A process that
    // registers from here on is brought up to date before the first round (catch_up), even if
    // it took the statistics in the phase: a site acknowledges statistics it already applied,
    // so bringing it up to date twice costs a message and changes nothing, while missing one
    // would leave it refusing to train on unharmonized images. (Counting at the end of the
    // phase missed a process that registered after its last statistics were sent.)
    if (remote && remote->starts)
      for (const auto& site : roster.order) starts_seen[site] = remote->starts(site);
    HarmonizationPhase phase{config, registry, *coordinator, roster, failures, nullptr, nullptr};
    phase.on_harmonizer = [&](const std::string& p, int i, int n) { progress(options, p, i, n); };
    // Learned harmonizers train here, before the task stage (learned_stage.h).
    LearnedStageOptions learned;
    learned.run_dir = record.dir();
    learned.resume = options.resume;
    learned.add_metrics_line = [&](const std::string& line) { record.append_line(line); };
    if (options.stop_after) learned.stop = [&] { return options.stop_after(0); };
    learned.on_progress = [&](const std::string& p, int i, int n) { progress(options, p, i, n); };
    if (remote && remote->starts) {  // a site process that restarts during a learned stage
      learned.restarted = [this](const std::string& site) { return restarted(site); };
      learned.caught_up = [this](const std::string& site) {
        starts_seen[site] = remote->starts(site);
      };
    }
    phase.learned = &learned;
    harmonizer_stats = phase.run();
  }

  // Remote sites: a site process that registered since the site was last brought up to date (a
  // restarted process, or a site that was late for the harmonizer phase) has none of the run's
  // state. Before round `round` it gets, in order, what the run gave its predecessor: each
  // harmonizer's statistics, its state from the last checkpoint, the global model of round
  // round - 1. A restart between two rounds then changes nothing in the results. If that
  // fails, the site stays out of the run (named in the failures) until it starts again.
  void catch_up(int round) {
    if (!remote || !remote->starts) return;
    const std::string at = "round " + std::to_string(round) + ": site '";
    for (const auto& site : roster.order) {
      if (!restarted(site)) continue;
      starts_seen[site] = remote->starts(site);
      std::string why = resend_statistics(*coordinator, harmonizer_stats, site);
      if (auto st = kept_states.find(site); why.empty() && st != kept_states.end())
        for (const auto& f : coordinator->restore_states(round - 1, {{site, st->second}}))
          why = f.what;
      if (why.empty())
        for (const auto& f : coordinator->broadcast(round - 1, {site})) why = f;
      if (!why.empty()) {  // `why` names the site
        roster.dropped.insert(site);
        failures.add("round " + std::to_string(round) + ": " + why +
                     " (a new process of the site could not be brought up to date: left out "
                     "until it starts again)");
        continue;
      }
      const bool was_out = roster.dropped.erase(site) > 0;
      spdlog::info(
          "{}{}': a new process of the site registered: brought up to date ({} "
          "harmonizer statistics, {}the global model of round {}){}",
          at, site, harmonizer_stats.size(),
          kept_states.count(site) ? "its checkpointed state, " : "", round - 1,
          was_out ? "; it rejoins the run" : "");
    }
  }

  SiteMetrics evaluate(int round, const std::string& phase) {
    Coordinator::Failures refused;
    SiteMetrics out = coordinator->evaluate(round, phase, roster.names(true), refused);
    for (const auto& f : refused)
      failures.add("round " + std::to_string(round) + ": evaluate (" + phase + "): " + f.what);
    for (auto it = out.begin(); it != out.end();)  // answered by a process not yet up to date
      it = restarted(it->first) ? out.erase(it) : std::next(it);
    return out;
  }

  // True when a new process of remote `site` registered since the site was last brought up to
  // date (catch_up): what it answers does not describe the run's state. The count grows at
  // registration, before the new process can get any request, so asking after a call is safe.
  bool restarted(const std::string& site) const {
    if (!remote || !remote->starts) return false;
    auto seen = starts_seen.find(site);
    return remote->starts(site) > (seen == starts_seen.end() ? 0 : seen->second);
  }

  // Steps 1-5 of one round, then evaluation (every evaluation.every rounds and at the end) and
  // the round's metric lines. False: the privacy budget refused the round (nothing ran).
  bool run_round(int round, const RunOptions& options, RunRecord& record) {
    const auto& fed = config.federation;
    const std::string phase = "round " + std::to_string(round) + "/" + std::to_string(fed.rounds);
    const std::string at = "round " + std::to_string(round) + ": ";
    const auto train_sites = roster.names(false);
    const auto all_sites = roster.names(true);
    progress(options, phase, 0, 3);
    // 1. select
    auto selected = coordinator->select(round, train_sites, fed.fraction, fed.availability,
                                        fed.site_availability);
    spdlog::debug("{}: selected {} of {} sites", phase, selected.size(), train_sites.size());
    std::map<std::string, double> settings{{protocol::kLocalEpochs, config.training.local_epochs}};
    if (privacy)
      if (std::string why = privacy->plan(round, selected, settings); !why.empty()) {
        spdlog::error("{}{}", at, why);
        failures.lines.push_back(at + why);
        return false;
      }
    // 2-4. local training, upload, aggregation
    Aggregator& aggregate_with = privacy ? privacy->aggregator() : *aggregator;
    auto outcome = config.secure_aggregation
                       ? coordinator->secure_train_round(
                             aggregate_with, round, fed.rounds, selected, settings, fed.min_sites,
                             *config.secure_aggregation,
                             config.privacy || config.secure_aggregation->weights == "equal")
                       : coordinator->train_round(
                             aggregate_with, round, fed.rounds, selected, settings, fed.min_sites,
                             [&](const std::string& site, size_t k, size_t n) {
                               progress(options,
                                        phase + ": " + site + " training (" +
                                            std::to_string(k + 1) + "/" + std::to_string(n) + ")",
                                        int(k), int(n));
                             });
    if (privacy) privacy->record(round, selected.size(), outcome);
    for (const auto& f : outcome.failures) failures.lines.push_back(at + f);
    if (!outcome.aggregated)
      failures.lines.push_back(at + "not aggregated: " + outcome.not_aggregated);
    if (!outcome.updates.empty()) {
      double loss = 0, n = 0;
      for (const auto& u : outcome.updates)
        loss += u.train_loss * u.num_samples, n += u.num_samples;
      spdlog::info("{}: {} sites trained, mean train loss {:.4f}{}", phase, outcome.updates.size(),
                   n > 0 ? loss / n : 0.0, outcome.aggregated ? "" : " (not aggregated)");
    }
    progress(options, phase, 1, 3);
    // 5. broadcast
    for (const auto& f : coordinator->broadcast(round, all_sites))
      failures.lines.push_back(at + "broadcast: " + f);
    progress(options, phase, 2, 3);
    const bool eval_now = round % config.evaluation.every == 0 || round == fed.rounds;
    if (eval_now) last_eval = evaluate(round, protocol::kPhaseGlobal);
    const PrivacyStatus spent = privacy ? privacy->status() : PrivacyStatus{};
    record.add_round({round, &all_sites, &train_sites, &selected, &outcome,
                      eval_now ? &last_eval : nullptr, privacy ? &spent : nullptr});
    if (privacy) spdlog::info("{}: privacy: {}", phase, privacy->describe());
    if (eval_now) {
      std::string msg;  // the first metric of each site keeps the line short
      for (const auto& [site, m] : last_eval)
        if (!m.empty())
          msg +=
              " " + site + " " + m.begin()->first + "=" + fmt::format("{:.3f}", m.begin()->second);
      spdlog::info("{}:{}", phase, msg);
    }
    progress(options, phase, 3, 3);
    return true;
  }

  // The coordinator's checkpoint: the global and aggregator state, and each site's own state,
  // asked for through the Channel. A site that does not answer keeps its last exported state.
  void checkpoint(const fs::path& dir, int round) {
    Coordinator::Failures refused;
    for (auto& [site, st] : coordinator->export_states(round, roster.names(true), refused))
      if (!restarted(site)) kept_states[site] = std::move(st);
    for (const auto& f : refused)
      failures.add("round " + std::to_string(round) + ": checkpoint: " + f.what +
                   " (its last saved state is kept)");
    protocol::Checkpoint c;
    c.round = round;
    c.global = coordinator->global();
    c.aggregator = aggregator->state();
    if (privacy) c.privacy = privacy->save();
    c.sites = kept_states;
    c.pipeline = config.resolved_yaml;
    c.failures = failures.lines;  // the summary of a resumed run keeps them
    write_checkpoint(dir, c);
  }

  // Installs the newest usable checkpoint: global and aggregator state here, each site's state
  // sent back to it through the Channel. Returns its round (0: none yet).
  int resume(const fs::path& dir) {
    return int(resume_from_checkpoints(dir, roster.order, [&](protocol::Checkpoint&& c) {
      // run() checked that the stored pipeline.yaml is this pipeline.
      if (c.pipeline != config.resolved_yaml)
        throw Error("written for another pipeline than the run folder's pipeline.yaml");
      if (c.round < 1 || c.round > config.federation.rounds)
        throw Error("round " + std::to_string(c.round) + " is outside 1.." +
                    std::to_string(config.federation.rounds));
      if (std::string why = protocol::state_mismatch(coordinator->global(), c.global); !why.empty())
        throw Error("global state " + why);
      if (std::string bad = protocol::non_finite_entry(c.global); !bad.empty())
        throw Error("global state: non-finite values in '" + bad + "'");
      std::map<std::string, protocol::SiteState> states;
      for (const auto& name : roster.names(true)) states[name] = c.sites[name];
      for (const auto& f : coordinator->restore_states(int(c.round), states)) throw Error(f.what);
      aggregator->load_state(c.aggregator);
      if (privacy) privacy->load(c.privacy);
      failures.lines = std::move(c.failures);  // the replayed fit phase logged its failures again
      kept_states = std::move(c.sites);
      coordinator->set_global(std::move(c.global));
    }));
  }

  // After the last round: the adapter's personalisation (evaluated again), the summary, the model.
  // `rounds`: the rounds run (fewer than planned when the privacy budget refused one).
  RunSummary finish(RunRecord& record, double seconds_so_far, int rounds) {
    RunSummary summary;
    summary.run_dir = record.dir().string();
    summary.rounds_completed = rounds;
    if (last_eval.empty()) last_eval = evaluate(rounds, protocol::kPhaseGlobal);
    SiteMetrics personalized;
    if (adapter->personalizes()) {
      for (const auto& f : coordinator->personalize(rounds, roster.names(true)))
        failures.add("personalize: " + f.what);
      personalized = evaluate(rounds, protocol::kPhasePersonalized);
      record.add_personalized(rounds, personalized);
    }
    for (const auto& name : roster.names(true)) {
      SiteResult r;
      r.site = name;
      r.held_out = roster.held.count(name) > 0;
      r.metrics = last_eval[name];
      r.personalized = personalized[name];
      summary.sites.push_back(r);
    }
    summarise(summary);
    summary.failures = failures.lines;
    const PrivacyStatus spent = privacy ? privacy->status() : PrivacyStatus{};
    if (privacy) summary.privacy = privacy->describe();
    final_global = coordinator->global();
    record.write_final_model(rounds, final_global, *pool->model, pool->initial);
    record.write_summary(config, summary, data_info.notes, data_info.task, seconds_so_far,
                         privacy ? &spent : nullptr);
    return summary;
  }

  // Mean and worst site per metric, over the sites that train (NaN values left out).
  void summarise(RunSummary& summary) const {
    for (const auto& m : metric_names) {
      double sum = 0, worst = INFINITY;
      int n = 0;
      for (const auto& s : summary.sites) {
        if (s.held_out || !s.metrics.count(m) || std::isnan(s.metrics.at(m))) continue;
        sum += s.metrics.at(m);
        worst = std::min(worst, s.metrics.at(m));
        ++n;
      }
      if (n) {
        summary.mean[m] = sum / n;
        summary.worst[m] = worst;
      }
    }
  }

  // Experiment::harmonize: the dataset and the harmonizer phase only, through the same Sites and
  // Coordinator exchanges as a run (the sites have no model).
  HarmonizeResult harmonize(const HarmonizeOptions& o) {
    const int count = int(config.harmonizers.size());
    if (count == 0) throw Error(config.file + ": the pipeline has no harmonizers");
    const int last = o.last < 0 ? count - 1 : o.last;
    if (last >= count)
      throw Error(config.file + ": harmonizers[" + std::to_string(last) +
                  "] does not exist: the pipeline has " + std::to_string(count) +
                  " harmonizer(s), numbered from 0");
    // As run() does: a learned harmonizer trains here, and its statistics must be the run's.
    spdlog::debug("LibTorch threads: {}", configure_torch_process(config.training.threads));
    HarmonizeResult result;
    Federation fed = load_federation(config, registry, roster);
    if (o.keep_unharmonized) result.unharmonized = fed;
    result.fitted_sites = roster.names(false);
    for (const auto& sd : fed.sites)
      if (!roster.held.count(sd.name)) result.fitted_images += int64_t(sd.train.size());
    connect(take_sites(fed), nullptr);
    HarmonizationPhase phase{config, registry, *coordinator, roster, failures, nullptr, nullptr};
    std::map<int, Stats> given;
    for (const auto& [i, st] : o.given_stats)
      if (i >= 0 && i <= last) given[i] = st;
    if (o.last_stats) given[last] = *o.last_stats;
    const int total = phase.fits(last, given);
    int fitted = 0;
    phase.on_fit = [&](const std::string& p) {
      if (o.on_progress) o.on_progress(p, ++fitted, total);
    };
    result.stats = phase.run(last, given);
    // Harmonizing files must not leave a site's images out quietly: any site problem is fatal.
    if (!failures.lines.empty()) {
      std::string all;
      for (const auto& f : failures.lines) all += "\n  " + f;
      throw Error("the harmonizer fit failed at some sites:" + all);
    }
    result.federation = data_info;
    result.federation.sites = sites->take_data();
    return result;
  }
};

Experiment::Experiment(PipelineConfig config, const Registry& registry)
    : impl_(std::make_unique<Impl>(std::move(config), registry)) {}
Experiment::Experiment(PipelineConfig config, const Registry& registry, RemoteSites remote)
    : impl_(std::make_unique<Impl>(std::move(config), registry)) {
  if (!remote.channel) throw Error("Experiment: remote sites without a channel");
  impl_->remote = remote;
}
Experiment::~Experiment() = default;

HarmonizeResult Experiment::harmonize(const HarmonizeOptions& options) {
  if (impl_->remote) throw Error("harmonize runs simulated sites only");
  return impl_->harmonize(options);
}

void Experiment::interpose_channel(std::function<std::unique_ptr<Channel>(Channel&)> wrap) {
  impl_->wrap = std::move(wrap);
}

const NamedArrays& Experiment::global_state() const {
  return impl_->final_global;
}

RunSummary Experiment::run(const RunOptions& options) {
  Impl& x = *impl_;
  const auto& cfg = x.config;
  RunRecord record(options.run_dir.empty() ? fs::path(cfg.output) / cfg.name
                                           : fs::path(options.run_dir));
  record.check_folder(options.resume, cfg.resolved_yaml);
  const auto t0 = std::chrono::steady_clock::now();
  const auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // Set-up first: a run that cannot start leaves no run folder behind.
  x.setup(options);
  // A learned harmonizer's stage checkpoints and records into the run folder: open it first.
  const bool learned = has_learned_harmonizer(cfg, x.registry);
  if (learned && !options.resume) record.open(false, cfg.resolved_yaml, 0);
  // Simulated sites write their figures there; a remote site has its own folder (`concord site`).
  if (learned && x.sites) x.sites->set_output_dir(record.dir().string());
  try {
    x.harmonize_sites(options, record);
  } catch (const LearnedStageStopped&) {
    RunSummary summary;
    summary.run_dir = record.dir().string();
    summary.failures = x.failures.lines;
    return summary;
  }
  const int done = options.resume ? x.resume(record.dir() / "checkpoints") : 0;
  if (!learned || options.resume) record.open(options.resume, cfg.resolved_yaml, done);
  if (options.resume && done == 0)
    spdlog::warn("{} has no checkpoint yet: starting again from round 1", record.dir().string());
  else if (options.resume)
    spdlog::info("resuming {} after round {}", record.dir().string(), done);
  for (const auto& f : x.coordinator->broadcast(done, x.roster.names(true)))  // the start model
    x.failures.lines.push_back("round " + std::to_string(done) + ": broadcast: " + f);

  int last = cfg.federation.rounds;
  for (int round = done + 1; round <= cfg.federation.rounds; ++round) {
    x.catch_up(round);
    if (!x.run_round(round, options, record)) {
      last = round - 1;  // refused by the privacy budget: the run ends with what it has
      break;
    }
    x.checkpoint(record.dir() / "checkpoints", round);
    if (options.on_round) options.on_round(round);
    if (options.stop_after && options.stop_after(round) && round < cfg.federation.rounds) {
      spdlog::warn("stopped after round {}; continue with --resume", round);
      x.final_global = x.coordinator->global();
      RunSummary summary;
      summary.run_dir = record.dir().string();
      summary.rounds_completed = round;
      summary.failures = x.failures.lines;
      return summary;
    }
  }
  return x.finish(record, seconds(), last);
}

const char* task_name(Task t) {
  return t == Task::Classification ? "classification" : "segmentation";
}

}  // namespace concord
