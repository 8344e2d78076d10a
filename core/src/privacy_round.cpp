// Differential privacy in a run (see privacy_round.h).
#include "privacy_round.h"

#include <concord/batchnorm.h>
#include <concord/checked.h>
#include <concord/error.h>
#include <concord/seed.h>

#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>

#include <cmath>

namespace concord {

namespace {

dp::DpSettings settings_of(const PipelineConfig::Privacy& p) {
  dp::DpSettings s;
  s.level = dp::Level::Client;
  s.placement = p.mode == "local" ? dp::Placement::Local : dp::Placement::Central;
  s.sampling = p.sampling == "poisson" ? dp::Sampling::Poisson : dp::Sampling::None;
  s.clip = p.clip;
  return s;
}

// Updates with non-float entries as the global model has them (DP cannot protect counters).
void keep_global_non_float(NamedArrays& state, const NamedArrays& global) {
  for (auto& [name, a] : state)
    if (a.dtype() != DType::F32)
      if (auto it = global.find(name); it != global.end()) a = it->second;
}

// The pipeline's aggregator seen through DP-FedAvg: every update weighs the same (one site's
// influence on the mean is bounded by C / m), is clipped again to C (central mode: the
// coordinator does not rely on the sites for the bound), and carries its share of the central
// noise, N(0, (z C)^2 / m), so the mean of the m updates carries N(0, (z C / m)^2). The inner
// aggregator depends on the updates only through their sum (checked at set-up), so what it makes
// of the noised mean is post-processing.
class DpAggregator : public Aggregator {
 public:
  DpAggregator(Aggregator& inner, dp::DpSettings settings, uint64_t seed)
      : inner_(inner), settings_(settings), seed_(seed) {}

  bool aggregates_by_sum() const override { return true; }
  NamedArrays state() const override { return inner_.state(); }
  void load_state(const NamedArrays& state) override { inner_.load_state(state); }

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    const bool central = settings_.placement == dp::Placement::Central;
    const double share = updates.empty() ? 0.0 : settings_.local_share_std(int64_t(updates.size()));
    std::vector<SiteUpdate> equal;
    equal.reserve(updates.size());
    for (const auto& u : updates) {
      SiteUpdate c = u;
      c.num_samples = 1;
      if (central) {
        for (auto& [name, a] : c.state) a = a.clone();  // the noise must not write into the upload
        keep_global_non_float(c.state, global);
        dp::clip_update(c.state, global, settings_.clip);
        dp::add_gaussian_noise(c.state, share,
                               derive_seed(seed_, "dp-central/" + u.site, round.round));
      }
      equal.push_back(std::move(c));
    }
    return inner_.aggregate(global, equal, round);
  }

 private:
  Aggregator& inner_;
  dp::DpSettings settings_;
  uint64_t seed_;
};

}  // namespace

bool sample_level(const PipelineConfig& config) {
  return config.privacy && config.privacy->level == "sample";
}

SampleLevelPlan sample_level_plan(const PipelineConfig& config, int64_t train_samples,
                                  const std::string& site) {
  const PipelineConfig::Privacy& p = *config.privacy;
  const std::string at = p.where.str() + ": privacy (sample level) at site '" + site + "': ";
  if (train_samples < 1) throw Error(at + "the site has no training samples");
  const int64_t batch = config.training.batch_size;
  SampleLevelPlan plan;
  plan.q = std::min(1.0, double(batch) / double(train_samples));
  plan.steps_per_epoch = (train_samples + batch - 1) / batch;
  plan.planned_steps = checked_mul(int64_t(config.federation.rounds) * config.training.local_epochs,
                                   plan.steps_per_epoch, at + "planned steps");
  plan.clip = p.clip;
  plan.expected_batch = plan.q * double(train_samples);
  try {
    plan.noise_multiplier =
        p.noise_multiplier > 0
            ? p.noise_multiplier
            : dp::noise_multiplier_for(p.epsilon, p.delta, plan.q, plan.planned_steps);
  } catch (const std::exception& e) {
    throw Error(at + e.what());
  }
  return plan;
}

void check_sample_level_model(const PipelineConfig& config,
                              const std::vector<std::string>& module_types) {
  for (const auto& type : module_types)
    if (is_batchnorm_type(type))
      throw Error(config.model.where.str() + ": model '" + config.model.type + "' has " +
                  short_type_name(type) + " layers, which sample-level DP (" +
                  config.privacy->where.str() +
                  ") cannot use: batch statistics mix the samples of a batch, so one sample's "
                  "gradient is not its own. Use a model without BatchNorm (cnn: norm: group or "
                  "norm: none) or privacy level: client");
}

struct PrivacyBudget::Impl {
  explicit Impl(const PipelineConfig& c) : config_all(c), config(*config_all.privacy) {}
  PipelineConfig config_all;
  const PipelineConfig::Privacy& config;  // config_all's `privacy:`
  dp::DpSettings settings;
  size_t population = 0;
  dp::RdpAccountant accountant;
  double last_q = 0;
  std::unique_ptr<DpAggregator> aggregator;
  // Sample level: one accountant per site (its own optimizer steps at its own q and sigma).
  bool sample = false;
  Aggregator* inner = nullptr;
  struct SiteAccount {
    int64_t train_samples = 0;
    SampleLevelPlan plan;
    dp::RdpAccountant accountant;
  };
  std::map<std::string, SiteAccount> sites;
  int64_t sample_rounds = 0;  // rounds with at least one site accounted

  double sampling_rate(size_t selected) const {
    return settings.sampling_rate(int64_t(selected), int64_t(population));
  }
  SiteAccount& account(const std::string& site, int64_t train_samples) {
    auto it = sites.find(site);
    if (it != sites.end()) return it->second;
    SiteAccount a;
    a.train_samples = train_samples;
    a.plan = sample_level_plan(config_all, train_samples, site);
    spdlog::info(
        "privacy: site '{}': {} training samples, Poisson sampling q = {:.4g}, {} planned steps: "
        "noise multiplier sigma = {:.4g}, clip C = {}",
        site, train_samples, a.plan.q, a.plan.planned_steps, a.plan.noise_multiplier, a.plan.clip);
    return sites.emplace(site, std::move(a)).first->second;
  }
  // The site with the largest epsilon so far (sites.end() when none has trained).
  std::map<std::string, SiteAccount>::const_iterator worst() const {
    auto best = sites.end();
    double eps = -1;
    for (auto it = sites.begin(); it != sites.end(); ++it) {
      const double e = it->second.accountant.epsilon(config.delta).epsilon;
      if (e > eps) eps = e, best = it;
    }
    return best;
  }
};

PrivacyBudget::PrivacyBudget(const PipelineConfig& config, Aggregator& aggregator, size_t trainers,
                             size_t planned_per_round)
    : impl_(std::make_unique<Impl>(config)) {
  Impl& x = *impl_;
  x.settings = settings_of(x.config);
  x.population = trainers;
  const std::string at = x.config.where.str() + ": privacy: ";
  if (x.config.level == "sample") {
    // Each site's upload is already (epsilon, delta)-DP for its samples: whatever the coordinator
    // makes of the uploads (any aggregator) is post-processing.
    x.sample = true;
    x.inner = &aggregator;
    x.settings.level = dp::Level::Sample;
    x.settings.placement = dp::Placement::Local;
    x.settings.sampling = dp::Sampling::Poisson;
    spdlog::info(
        "privacy: sample-level DP-SGD at every site, budget epsilon {} at delta {} per site over "
        "{} rounds of {} local epoch(s), batch {} (Poisson sampling), clip C = {} per sample",
        x.config.epsilon, x.config.delta, config.federation.rounds, config.training.local_epochs,
        config.training.batch_size, x.config.clip);
    return;
  }
  if (!aggregator.aggregates_by_sum())
    throw Error(at + "aggregator '" + config.aggregator.type + "' (" +
                config.aggregator.where.str() +
                ") needs the individual updates; client-level DP bounds one site's influence on "
                "a mean, so it needs an aggregator that averages (fedavg, fedprox, fedopt)");
  const int rounds = config.federation.rounds;
  const double q = x.sampling_rate(std::max<size_t>(planned_per_round, 1));
  if (x.config.noise_multiplier > 0) {
    x.settings.noise_multiplier = x.config.noise_multiplier;
    const double planned =
        x.accountant.epsilon_after(x.settings.noise_multiplier, q, rounds, x.config.delta).epsilon;
    if (planned > x.config.epsilon)
      spdlog::warn(
          "{}noise_multiplier {} spends epsilon {:.3g} over the {} planned rounds, above the "
          "budget {}: rounds that would exceed it will be refused",
          at, x.settings.noise_multiplier, planned, rounds, x.config.epsilon);
  } else {
    try {
      x.settings.noise_multiplier =
          dp::noise_multiplier_for(x.config.epsilon, x.config.delta, q, rounds);
    } catch (const std::exception& e) {
      throw Error(at + e.what());
    }
  }
  x.settings.check();
  x.aggregator = std::make_unique<DpAggregator>(aggregator, x.settings, config.seed);
  spdlog::info(
      "privacy: client-level DP, {} noise, budget epsilon {} at delta {} over {} rounds, q = "
      "{:.4g} "
      "(sampling {}): noise multiplier z = {:.4g}, clip C = {}",
      x.config.mode, x.config.epsilon, x.config.delta, rounds, q, x.config.sampling,
      x.settings.noise_multiplier, x.config.clip);
  if (x.settings.placement == dp::Placement::Local)
    spdlog::warn(
        "privacy: local noise without secure aggregation: the coordinator sees each upload with "
        "noise multiplier z / sqrt(m) only; epsilon is the guarantee of the released model");
}

PrivacyBudget::~PrivacyBudget() = default;

void PrivacyBudget::set_site_sizes(const std::map<std::string, int64_t>& train_samples) {
  if (!impl_->sample) return;
  for (const auto& [site, n] : train_samples)
    if (n > 0) impl_->account(site, n);
}

std::string PrivacyBudget::plan(int round, const std::vector<std::string>& sites,
                                std::map<std::string, double>& settings) {
  Impl& x = *impl_;
  if (x.sample) {
    const int64_t epochs = x.config_all.training.local_epochs;
    for (const auto& site : sites) {
      auto it = x.sites.find(site);
      if (it == x.sites.end()) {
        if (x.config_all.secure_aggregation)
          return fmt::format(
              "privacy budget: round {}: site '{}''s training-set size is unknown, and secure "
              "aggregation hides it from the coordinator: sample-level accounting needs it; the "
              "round is refused",
              round, site);
        continue;  // learnt from its first upload; its own plan keeps it within the budget
      }
      const auto& a = it->second;
      const dp::Epsilon after = a.accountant.epsilon_after(
          a.plan.noise_multiplier, a.plan.q, epochs * a.plan.steps_per_epoch, x.config.delta);
      if (after.epsilon > x.config.epsilon)
        return fmt::format(
            "privacy budget: round {} would spend epsilon {:.4g} at site '{}' (sample level), "
            "above the budget {} (delta {}); the round is refused",
            round, after.epsilon, site, x.config.epsilon, x.config.delta);
    }
    return "";
  }
  const size_t selected = sites.size();
  if (selected == 0) return "";
  const double q = x.sampling_rate(selected);
  const dp::Epsilon after =
      x.accountant.epsilon_after(x.settings.noise_multiplier, q, 1, x.config.delta);
  if (after.epsilon > x.config.epsilon)
    return fmt::format(
        "privacy budget: round {} would spend epsilon {:.4g} in all, above the budget {} (delta "
        "{}); the round is refused",
        round, after.epsilon, x.config.epsilon, x.config.delta);
  settings[protocol::kDpClip] = x.settings.clip;
  if (x.settings.placement == dp::Placement::Local)
    settings[protocol::kDpNoiseStd] = x.settings.local_share_std(int64_t(selected));
  return "";
}

Aggregator& PrivacyBudget::aggregator() {
  return impl_->sample ? *impl_->inner : *impl_->aggregator;
}

void PrivacyBudget::record(int round, size_t selected, const Coordinator::RoundOutcome& outcome) {
  Impl& x = *impl_;
  if (x.sample) {
    // Every upload the coordinator received was released, aggregated or not. Secure rounds send
    // no sample count (the sizes were set up front) and no step count: the plan's steps.
    const int64_t epochs = x.config_all.training.local_epochs;
    bool any = false;
    for (const auto& u : outcome.updates) {
      if (!x.sites.count(u.site) && x.config_all.secure_aggregation) continue;
      auto& a = x.account(u.site, int64_t(u.num_samples));
      int64_t steps = epochs * a.plan.steps_per_epoch;
      if (auto it = u.scalars.find(protocol::kSteps); it != u.scalars.end())
        steps = std::max(steps, int64_t(it->second));  // an adapter may train more than planned
      a.accountant.step(a.plan.noise_multiplier, a.plan.q, steps);
      any = true;
      const double eps = a.accountant.epsilon(x.config.delta).epsilon;
      if (eps > x.config.epsilon)
        spdlog::warn(
            "round {}: privacy: site '{}' took {} steps: epsilon {:.4g} is above the "
            "budget {}",
            round, u.site, steps, eps, x.config.epsilon);
    }
    if (any) ++x.sample_rounds;
    return;
  }
  if (!outcome.aggregated || selected == 0) return;  // nothing released
  const double z = x.settings.placement == dp::Placement::Local
                       ? x.settings.effective_noise_multiplier(int64_t(selected),
                                                               int64_t(outcome.updates.size()))
                       : x.settings.noise_multiplier;
  x.last_q = x.sampling_rate(selected);
  x.accountant.step(z, x.last_q);
  const double eps = x.accountant.epsilon(x.config.delta).epsilon;
  if (eps > x.config.epsilon)
    spdlog::warn(
        "round {}: privacy: {} of {} sites' noise shares arrived (effective z = {:.4g}): epsilon "
        "{:.4g} is above the budget {}",
        round, outcome.updates.size(), selected, z, eps, x.config.epsilon);
}

PrivacyStatus PrivacyBudget::status() const {
  const Impl& x = *impl_;
  PrivacyStatus s;
  const dp::Epsilon e = x.accountant.epsilon(x.config.delta);
  s.epsilon = e.epsilon;
  s.order = e.order;
  s.delta = x.config.delta;
  s.budget = x.config.epsilon;
  s.noise_multiplier = x.settings.noise_multiplier;
  s.q = x.last_q;
  s.clip = x.settings.clip;
  s.rounds_accounted = x.accountant.total_steps();
  s.level = x.config.level;
  s.mode = x.config.mode;
  s.sampling = x.config.sampling;
  if (x.sample) {
    s.mode = "local";  // the noise is added in each site's training
    s.sampling = "poisson";
    s.rounds_accounted = x.sample_rounds;
    s.epsilon = s.order = s.noise_multiplier = s.q = 0;
    for (const auto& [site, a] : x.sites)
      s.site_epsilon[site] = a.accountant.epsilon(x.config.delta).epsilon;
    auto w = x.worst();
    if (w != x.sites.end()) {
      const dp::Epsilon e = w->second.accountant.epsilon(x.config.delta);
      s.epsilon = e.epsilon;
      s.order = e.order;
      s.site = w->first;
      s.noise_multiplier = w->second.plan.noise_multiplier;
      s.q = w->second.plan.q;
      s.steps_accounted = w->second.accountant.total_steps();
    }
  }
  return s;
}

std::string PrivacyBudget::describe() const {
  const PrivacyStatus s = status();
  if (impl_->sample)
    return fmt::format(
        "epsilon {:.4g} of {} at delta {} (sample level, DP-SGD, Poisson sampling q = {:.4g}, "
        "sigma = {:.4g}, C = {}, largest at site '{}' after {} steps, {} rounds accounted)",
        s.epsilon, s.budget, s.delta, s.q, s.noise_multiplier, s.clip, s.site, s.steps_accounted,
        s.rounds_accounted);
  return fmt::format(
      "epsilon {:.4g} of {} at delta {} ({} level, {} noise, z = {:.4g}, C = {}, sampling {}, {} "
      "rounds accounted)",
      s.epsilon, s.budget, s.delta, s.level, s.mode, s.noise_multiplier, s.clip, s.sampling,
      s.rounds_accounted);
}

namespace {
// Sample level's entries in a checkpoint: site/<name>/{orders,q,sigma,steps,train_samples},
// sample_rounds.
const std::string kSitePrefix = "site/", kTrainSamples = "train_samples",
                  kSampleRounds = "sample_rounds";
}  // namespace

NamedArrays PrivacyBudget::save() const {
  const Impl& x = *impl_;
  NamedArrays out;
  if (!x.sample) {
    x.accountant.save(out, "");
    return out;
  }
  for (const auto& [site, a] : x.sites) {
    const std::string prefix = kSitePrefix + site + "/";
    a.accountant.save(out, prefix);
    out[prefix + kTrainSamples] = Array::from(std::vector<int64_t>{a.train_samples}, {1});
  }
  out[kSampleRounds] = Array::from(std::vector<int64_t>{x.sample_rounds}, {1});
  return out;
}

void PrivacyBudget::load(const NamedArrays& saved) {
  Impl& x = *impl_;
  if (!x.sample) {
    x.accountant = dp::RdpAccountant::load(saved, "");
    const auto& h = x.accountant.history();
    x.last_q = h.empty() ? 0 : h.back().q;
    return;
  }
  // One int64 value, checked (untrusted input).
  auto count = [&](const std::string& key) {
    auto it = saved.find(key);
    if (it == saved.end() || it->second.dtype() != DType::I64 || it->second.numel() != 1 ||
        it->second.data<int64_t>()[0] < 0)
      throw Error("privacy accountant state: entry '" + key +
                  "' is missing or not one int64 value >= 0");
    return it->second.data<int64_t>()[0];
  };
  // Sites known from set_site_sizes that had not trained by the checkpoint start afresh.
  std::map<std::string, Impl::SiteAccount> sites = x.sites;
  for (auto& [site, a] : sites) a.accountant = dp::RdpAccountant();
  const std::string orders = "/orders";
  for (const auto& [key, value] : saved) {
    if (key.compare(0, kSitePrefix.size(), kSitePrefix) != 0 || key.size() <= orders.size() ||
        key.compare(key.size() - orders.size(), orders.size(), orders) != 0)
      continue;
    const std::string site =
        key.substr(kSitePrefix.size(), key.size() - orders.size() - kSitePrefix.size());
    const std::string prefix = kSitePrefix + site + "/";
    const int64_t n = count(prefix + kTrainSamples);
    Impl::SiteAccount a;
    a.train_samples = n;
    a.plan = sample_level_plan(x.config_all, n, site);
    a.accountant = dp::RdpAccountant::load(saved, prefix);
    sites[site] = std::move(a);
  }
  x.sites = std::move(sites);
  x.sample_rounds = count(kSampleRounds);
}

void privatize_upload(NamedArrays& upload, const NamedArrays& global,
                      const protocol::TrainSettings& settings, const PipelineConfig& config,
                      const std::string& site, int round) {
  if (sample_level(config)) {
    if (settings.dp_clip != 0)
      throw SiteError(site,
                      "the train request asks for client-level clipping but this site's pipeline "
                      "asks for sample-level privacy: the pipelines differ");
    return;  // local training did DP-SGD
  }
  if (settings.dp_clip == 0) {
    if (config.privacy)
      throw SiteError(site,
                      "the pipeline asks for differential privacy but the train request carries "
                      "no clipping bound: refusing to upload an unclipped update");
    return;
  }
  if (config.privacy && settings.dp_clip > config.privacy->clip)
    throw SiteError(site, fmt::format("the train request's clipping bound {} exceeds the "
                                      "pipeline's privacy.clip {}",
                                      settings.dp_clip, config.privacy->clip));
  keep_global_non_float(upload, global);
  dp::clip_update(upload, global, settings.dp_clip);
  dp::add_gaussian_noise(upload, settings.dp_noise_std,
                         derive_seed(config.seed, "dp-noise/" + site, round));
}

}  // namespace concord
