// Client-level differential privacy in a run (see privacy_round.h).
#include "privacy_round.h"

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

struct PrivacyBudget::Impl {
  PipelineConfig::Privacy config;
  dp::DpSettings settings;
  size_t population = 0;
  dp::RdpAccountant accountant;
  double last_q = 0;
  std::unique_ptr<DpAggregator> aggregator;

  double sampling_rate(size_t selected) const {
    return settings.sampling_rate(int64_t(selected), int64_t(population));
  }
};

PrivacyBudget::PrivacyBudget(const PipelineConfig& config, Aggregator& aggregator, size_t trainers,
                             size_t planned_per_round)
    : impl_(std::make_unique<Impl>()) {
  Impl& x = *impl_;
  x.config = *config.privacy;
  x.settings = settings_of(x.config);
  x.population = trainers;
  const std::string at = x.config.where.str() + ": privacy: ";
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

std::string PrivacyBudget::plan(int round, size_t selected,
                                std::map<std::string, double>& settings) {
  Impl& x = *impl_;
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
  return *impl_->aggregator;
}

void PrivacyBudget::record(int round, size_t selected, const Coordinator::RoundOutcome& outcome) {
  Impl& x = *impl_;
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
  return s;
}

std::string PrivacyBudget::describe() const {
  const PrivacyStatus s = status();
  return fmt::format(
      "epsilon {:.4g} of {} at delta {} ({} level, {} noise, z = {:.4g}, C = {}, sampling {}, {} "
      "rounds accounted)",
      s.epsilon, s.budget, s.delta, s.level, s.mode, s.noise_multiplier, s.clip, s.sampling,
      s.rounds_accounted);
}

NamedArrays PrivacyBudget::save() const {
  NamedArrays out;
  impl_->accountant.save(out, "");
  return out;
}

void PrivacyBudget::load(const NamedArrays& saved) {
  impl_->accountant = dp::RdpAccountant::load(saved, "");
  const auto& h = impl_->accountant.history();
  impl_->last_q = h.empty() ? 0 : h.back().q;
}

void privatize_upload(NamedArrays& upload, const NamedArrays& global,
                      const protocol::TrainSettings& settings, const PipelineConfig& config,
                      const std::string& site, int round) {
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
