// A site's side of the protocol (see site.h).
#include "site.h"

#include "federation_load.h"
#include "learned_stage.h"
#include "local_training.h"
#include "privacy_round.h"
#include "secure_round.h"

#include <concord/error.h>
#include <concord/seed.h>
#include <concord/tensor_bridge.h>

#include <c10/core/GradMode.h>

#include <cstring>
#include <optional>
#include <random>
#include <set>

namespace concord {

namespace {

BuildContext context(const PipelineConfig& config, const std::string& instance) {
  return {config.seed, instance};
}

// A site's harmonizers over its own images: the site's side of the harmonizer phase. Fits on the
// training split; the global statistics then transform both splits once, or are kept for
// training draws by augmenting harmonizers.
class SiteHarmonizers {
 public:
  SiteHarmonizers(const PipelineConfig& config, const Registry& registry, const std::string& site)
      : site_(site) {
    for (const auto& h : config.harmonizers)
      harmonizers_.push_back(
          registry.create<Harmonizer>(Kind::Harmonizer, h.type, h.args, context(config, site)));
  }

  Message fit(const Message& in, const SiteData& data, int num_classes) {
    Harmonizer& h = *harmonizers_[protocol::read_harmonizer(in, harmonizers_.size())];
    LearnedSiteData survey;
    survey.site = site_;
    survey.train = &data.train;
    survey.num_classes = num_classes;
    Stats s = h.learned() ? h.survey(survey) : h.fit_site([&](const ImageVisitor& visit) {
      for (const auto& sample : data.train) visit(sample.image);
    });
    return protocol::statistics(site_, std::move(s));
  }

  Message set_statistics(Message&& in, SiteData& data) {
    protocol::SetStatistics set = protocol::read_set_statistics(std::move(in), harmonizers_.size());
    // The same statistics again (the coordinator brings a process up to date whenever it cannot
    // tell that it took them already): nothing to do.
    Bytes canonical = encode(protocol::set_statistics(set.harmonizer, set.stats));
    if (set.harmonizer < applied_) {
      const Bytes& had = applied_stats_[set.harmonizer];
      if (had->size() == canonical->size() &&
          std::memcmp(had->data(), canonical->data(), had->size()) == 0)
        return protocol::ack(site_, 0);
    }
    // Applying a harmonizer twice would harmonize the images twice; out of order, the next
    // harmonizer would see images its statistics were not fitted on.
    if (set.harmonizer != applied_)
      throw SiteError(site_, "statistics for harmonizer " + std::to_string(set.harmonizer) + " (" +
                                 std::to_string(applied_) + " applied so far): " +
                                 (set.harmonizer < applied_ ? "already applied" : "out of order"));
    Harmonizer& h = *harmonizers_[set.harmonizer];
    h.set_statistics(set.stats, site_);
    ++applied_;
    applied_stats_.push_back(std::move(canonical));
    if (h.replays()) replayers_.push_back(&h);  // adds samples to training batches instead
    if (h.augments()) {
      augmenters_.push_back(&h);
    } else if (!h.replays()) {
      for (auto* split : {&data.train, &data.test})
        for (auto& sample : *split) h.apply(sample.image);
    }
    return protocol::ack(site_, 0);
  }

  // Throws SiteError unless every harmonizer's statistics were applied: a site process that
  // started after the harmonizer phase must not train or evaluate on unharmonized images.
  void check_harmonized(const char* request) const {
    if (applied_ < harmonizers_.size())
      throw SiteError(site_, std::string("refusing '") + request +
                                 "': " + std::to_string(applied_) + " of " +
                                 std::to_string(harmonizers_.size()) +
                                 " harmonizers' statistics applied at this site (did this site "
                                 "process start after the harmonizer phase?)");
  }

  const std::vector<Harmonizer*>& augmenters() const { return augmenters_; }
  const std::vector<Harmonizer*>& replayers() const { return replayers_; }
  const std::vector<std::unique_ptr<Harmonizer>>& all() const { return harmonizers_; }

 private:
  std::string site_;
  std::vector<std::unique_ptr<Harmonizer>> harmonizers_;
  std::vector<Harmonizer*> augmenters_, replayers_;
  size_t applied_ = 0;                // harmonizers[0 .. applied_) have their statistics applied
  std::vector<Bytes> applied_stats_;  // their statistics, encoded (a repeat is recognised)
};

}  // namespace

ModelPool build_model_pool(const PipelineConfig& config, const Registry& registry,
                           const Federation& fed) {
  const Sample* first = first_sample(fed);
  if (!first) throw Error("dataset '" + config.data.dataset.type + "' has no samples");
  ModelSpec spec;
  spec.task = fed.task;
  spec.in_channels = fed.channels;
  spec.num_classes = fed.num_classes;
  spec.image_size = {first->image.size[0], first->image.size[1]};
  return build_model_pool(config, registry, spec);
}

ModelPool build_model_pool(const PipelineConfig& config, const Registry& registry,
                           const ModelSpec& spec) {
  ModelPool pool;
  seed_torch(derive_seed(config.seed, "model-init"));
  pool.model = registry.create<Model>(Kind::Model, config.model.type, config.model.args,
                                      context(config, "model"));
  pool.model->build(spec);
  for (auto& e : pool.model->state()) pool.initial[e.name] = to_array(e.tensor.detach().clone());
  pool.task = spec.task;
  pool.num_classes = spec.num_classes;
  return pool;
}

std::unique_ptr<Adapter> build_adapter(const PipelineConfig& config, const Registry& registry,
                                       Model& model, const std::string& instance) {
  std::unique_ptr<Adapter> adapter =
      config.adapter ? registry.create<Adapter>(Kind::Adapter, config.adapter->type,
                                                config.adapter->args, context(config, instance))
                     : std::make_unique<Adapter>();
  try {
    adapter->attach(model);
  } catch (const std::exception& e) {
    throw Error((config.adapter
                     ? config.adapter->where.str() + ": adapter '" + config.adapter->type + "': "
                     : "") +
                e.what());
  }
  return adapter;
}

std::vector<std::pair<std::string, std::unique_ptr<Metric>>> build_metrics(
    const PipelineConfig& config, const Registry& registry, Task task,
    const std::string& instance) {
  std::vector<Component> comps = config.evaluation.metrics;
  if (comps.empty()) {
    for (const PluginDesc* d : registry.defaults(Kind::Metric, task_name(task)))
      comps.push_back({d->name, make_args(d->name, d->args), {}});
    if (comps.empty())
      throw Error(config.file +
                  ": evaluation.metrics names none and no loaded metric plugin "
                  "declares itself a default for " +
                  task_name(task) + " data: name the metrics (concord plugins --kind metric)");
  }
  std::vector<std::pair<std::string, std::unique_ptr<Metric>>> out;
  for (const auto& m : comps) {
    auto metric = registry.create<Metric>(Kind::Metric, m.type, m.args, context(config, instance));
    if (!metric->supports(task))
      throw Error(m.where.str() + ": metric '" + m.type + "' does not support " + task_name(task) +
                  " data");
    out.emplace_back(m.type, std::move(metric));
  }
  return out;
}

struct Site::Impl {
  const PipelineConfig& config;
  std::string name;
  SiteData data;
  ModelPool* pool;
  SiteHarmonizers harmonization;
  SecureAggregationSite secure;  // between the secagg-* requests of a round
  // With a model only:
  std::unique_ptr<Adapter> adapter;
  std::unique_ptr<Aggregator> aggregator;  // its local_loss_term() only
  std::vector<std::unique_ptr<Filter>> filters;
  std::vector<std::pair<std::string, std::unique_ptr<Metric>>> metrics;
  std::set<std::string> shared;  // entries the adapter shares: the rest are the site's own
  // The site's state.
  NamedArrays global;  // the last broadcast (views into its buffer)
  NamedArrays local;   // entries kept at the site, after its last training
  NamedArrays store;   // the adapter's store
  bool trained = false;
  bool has_global = false;  // a broadcast arrived
  // Per request.
  std::map<std::string, at::Tensor> received;
  int round = 0;
  int64_t calls = 0;
  std::optional<SampleLevelPlan> sample_plan;  // sample-level DP: this site's DP-SGD plan
  std::string output_dir;        // where the site may write figures (learned harmonizers)
  std::set<size_t> learn_begun;  // learned harmonizers this process had learn-begin for

  Impl(const PipelineConfig& c, const Registry& registry, SiteData d, ModelPool* p)
      : config(c),
        name(d.name),
        data(std::move(d)),
        pool(p),
        harmonization(c, registry, name),
        secure(c, name) {
    if (!pool) return;
    adapter = build_adapter(config, registry, *pool->model, "adapter");
    for (auto& e : pool->model->state())
      if (adapter->is_shared(e)) shared.insert(e.name);
    aggregator = registry.create<Aggregator>(Kind::Aggregator, config.aggregator.type,
                                             config.aggregator.args, context(config, "aggregator"));
    for (const auto& f : config.filters)
      filters.push_back(
          registry.create<Filter>(Kind::Filter, f.type, f.args, context(config, name)));
    metrics = build_metrics(config, registry, pool->task, "metric");
  }

  Model& model() {
    if (!pool) throw SiteError(name, "this site runs the harmonizer phase only (no model)");
    return *pool->model;
  }

  // A site process that started in the middle of a run (a restart, a late registration) holds
  // none of the run's state until the coordinator brought it up to date (harmonizer statistics,
  // its checkpointed state, the global model): until then it refuses work that would use or
  // report that state, rather than answer with unharmonized images or an untrained model.
  void check_ready(const char* request) const {
    harmonization.check_harmonized(request);
    if (!has_global)
      throw SiteError(name, std::string("refusing '") + request +
                                "': no global model received yet (did this site process "
                                "start in the middle of the run?)");
  }

  LocalTraining trainer() {
    LocalTraining::Context c;
    c.site = &name;
    c.training = &config.training;
    c.seed = config.seed;
    c.rounds = config.federation.rounds;
    c.task = pool->task;
    c.data = &data;
    c.model = &model();
    c.augmenters = &harmonization.augmenters();
    c.replayers = &harmonization.replayers();
    c.store = &store;
    c.received = &received;
    c.trained = trained;
    c.calls = &calls;
    return LocalTraining(std::move(c), round);
  }

  Bytes handle(const Bytes& request) {
    Message in = decode(request);
    round = int(in.round);
    Message out;
    switch (protocol::request_kind(in)) {
      case protocol::Request::Fit:
        out = harmonization.fit(in, data, pool ? pool->num_classes : 0);
        break;
      case protocol::Request::SetStatistics:
        out = harmonization.set_statistics(std::move(in), data);
        break;
      case protocol::Request::Broadcast:
        model();
        global = std::move(in.arrays);
        has_global = true;
        out = protocol::ack(name, round);
        break;
      case protocol::Request::Train:
        check_ready("train");
        out = train(in);
        break;
      case protocol::Request::Evaluate:
        check_ready("evaluate");
        out = evaluate(protocol::read_evaluate_request(in));
        break;
      case protocol::Request::Personalize: {
        check_ready("personalize");
        load_model_state();
        LocalTraining t = trainer();
        adapter->personalize(t);
        save_local_state();
        out = protocol::ack(name, round);
        break;
      }
      case protocol::Request::ExportState:
        check_ready("export-state");
        model();
        out = protocol::site_state(name, round, {local, store, trained});
        break;
      case protocol::Request::RestoreState:
        restore(protocol::read_restore_state(std::move(in)));
        out = protocol::ack(name, round);
        break;
      case protocol::Request::SecAggSetup:
        check_ready("secagg-setup");
        model();
        out = secure.setup(in);
        break;
      case protocol::Request::SecAggShareKeys:
        out = secure.share_keys(in);
        break;
      case protocol::Request::SecAggTrain:
        out = secure.masked_input(
            in, global, [&](const protocol::TrainSettings& s) { return train_upload(s); });
        break;
      case protocol::Request::SecAggUnmask:
        out = secure.unmask(in);
        break;
      case protocol::Request::LearnBegin:
      case protocol::Request::Learn:
      case protocol::Request::LearnResult:
      case protocol::Request::LearnExport:
      case protocol::Request::LearnRestore:
        out = answer_learned(
            harmonization.all(), std::move(in),
            {&config, &name, &data, output_dir, pool ? pool->num_classes : 0, &learn_begun});
        break;
    }
    out.round = round;
    return encode(out);
  }

  Message train(const Message& in) {
    const protocol::TrainSettings settings = protocol::read_train_request(in);
    if (config.secure_aggregation)
      throw SiteError(name,
                      "the pipeline asks for secure aggregation: refusing a plain train request "
                      "(the coordinator would see this site's update)");
    if (data.train.empty()) {
      // Nothing to learn from: no upload to weigh, and no loss to claim (the coordinator skips
      // the site). The local state is left as it was: re-estimating BatchNorm statistics from no
      // images would reset them.
      return protocol::empty_update(name, round);
    }
    TrainedUpload t = train_upload(settings);
    return protocol::update(name, round, std::move(t.upload), t.num_samples, t.train_loss, t.steps);
  }

  // Local training and the upload as it leaves the site (filters, then privacy). No training
  // data: the global state back with no samples (secure aggregation weighs it 0).
  TrainedUpload train_upload(const protocol::TrainSettings& settings) {
    if (data.train.empty()) return {global, 0, 0, 0};
    calls = 0;  // per-round stream of shuffling seeds: a resumed run replays it exactly
    load_model_state();
    seed_torch(derive_seed(config.seed, "torch/" + name, round));
    LocalTraining t = trainer();
    if (sample_level(config)) {
      if (!sample_plan) {
        std::vector<std::string> types;
        for (const auto& m : model().modules()) types.push_back(m.type);
        check_sample_level_model(config, types);
        sample_plan = sample_level_plan(config, int64_t(data.train.size()), name);
      }
      t.set_sample_level(&*sample_plan);  // every step DP-SGD: the site's own pipeline says so
    }
    t.set_aggregator_term(aggregator->local_loss_term(t));
    TrainResult r = adapter->train_local(t, settings.local_epochs);
    if (config.training.precise_bn) t.recalibrate_batchnorm();
    trained = true;
    save_local_state();
    NamedArrays upload;
    for (auto& e : model().state())
      if (shared.count(e.name)) upload[e.name] = to_array(e.tensor.detach().clone());
    if (!filters.empty()) {
      std::mt19937_64 rng(derive_seed(config.seed, "filter/" + name, round));
      FilterContext ctx{name, round, &rng};
      for (auto& f : filters) f->apply(upload, global, ctx);
    }
    privatize_upload(upload, global, settings, config, name, round);
    return {std::move(upload), double(data.train.size()), r.loss, r.steps};
  }

  Message evaluate(const std::string& phase) {
    load_model_state();
    LocalTraining t = trainer();
    if (config.training.precise_bn && trained && has_local_buffers()) {
      // Site-local statistics (FedBN, SiloBN) were estimated with the site's own weights before
      // aggregation; re-estimate them for the weights just received. Shared entries stay global.
      t.recalibrate_batchnorm();
      restore_shared();
    }
    if (!trained) adapter->prepare_unseen_site(t);
    adapter->before_evaluate(t);
    Predictions p = t.predict(pool->num_classes);
    std::map<std::string, double> values;
    for (const auto& [mname, metric] : metrics)
      if (metric->supports(pool->task) && p.size() > 0) values[mname] = metric->compute(p);
    return protocol::metrics(name, round, phase, int64_t(data.test.size()), values);
  }

  // The model as this site sees it: the global shared entries, its own local ones (the initial
  // values until it has trained).
  void load_model_state() {
    c10::NoGradGuard ng;
    received.clear();
    for (auto& e : model().state()) {
      const Array* src = nullptr;
      if (shared.count(e.name)) {
        auto it = global.find(e.name);
        if (it == global.end()) throw SiteError(name, "no global value for '" + e.name + "'");
        src = &it->second;
        received[e.name] = to_tensor(it->second).clone();
      } else {
        auto it = local.find(e.name);
        src = it != local.end() ? &it->second : &pool->initial.at(e.name);
      }
      e.tensor.copy_(to_tensor(*src));
    }
  }
  bool has_local_buffers() {
    for (auto& e : model().state())
      if (!e.is_parameter && !shared.count(e.name)) return true;
    return false;
  }
  void restore_shared() {
    c10::NoGradGuard ng;
    for (auto& e : model().state())
      if (shared.count(e.name)) e.tensor.copy_(to_tensor(global.at(e.name)));
  }
  void save_local_state() {
    for (auto& e : model().state())
      if (!shared.count(e.name)) local[e.name] = to_array(e.tensor.detach().clone());
  }

  // A kept state, checked against this site's model before anything is installed.
  void restore(protocol::SiteState st) {
    model();
    for (const auto& [entry, a] : st.local) {
      auto init = pool->initial.find(entry);
      if (init == pool->initial.end() || shared.count(entry))
        throw SiteError(name, "the state to restore has unexpected local entry '" + entry + "'");
      if (std::string why = protocol::state_mismatch({{entry, init->second}}, {{entry, a}});
          !why.empty())
        throw SiteError(name, "the state to restore: " + why);
    }
    if (std::string bad = protocol::non_finite_entry(st.local); !bad.empty())
      throw SiteError(name, "the state to restore has non-finite values in '" + bad + "'");
    local = std::move(st.local);
    store = std::move(st.store);
    trained = st.trained;
  }
};

Site::Site(const PipelineConfig& config, const Registry& registry, SiteData data, ModelPool* pool)
    : impl_(std::make_unique<Impl>(config, registry, std::move(data), pool)) {}
Site::~Site() = default;

Bytes Site::handle(const Bytes& request) {
  return impl_->handle(request);
}

void Site::set_output_dir(const std::string& dir) {
  impl_->output_dir = dir;
}

SiteData Site::take_data() {
  return std::move(impl_->data);
}

SimulatedSites::SimulatedSites(const PipelineConfig& config, const Registry& registry,
                               std::vector<SiteData>&& sites, ModelPool* pool,
                               InProcessChannel& channel) {
  for (auto& sd : sites) {
    std::string name = sd.name;
    sites_.push_back(std::make_unique<Site>(config, registry, std::move(sd), pool));
    Site* site = sites_.back().get();
    channel.connect(name, [site](const Bytes& b) { return site->handle(b); });
  }
  sites.clear();
}

SimulatedSites::~SimulatedSites() = default;

void SimulatedSites::set_output_dir(const std::string& dir) {
  for (auto& s : sites_) s->set_output_dir(dir);
}

std::vector<SiteData> SimulatedSites::take_data() {
  std::vector<SiteData> out;
  for (auto& s : sites_) out.push_back(s->take_data());
  return out;
}

}  // namespace concord
