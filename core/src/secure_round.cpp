// Secure aggregation over the site protocol (see secure_round.h): the coordinator's four
// exchanges (Coordinator::secure_train_round) and a site's answers (SecureAggregationSite).
#include "secure_round.h"

#include <concord/engine.h>
#include <concord/error.h>
#include <concord/seed.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace concord {

namespace {

// The largest weight a site may put in its masked vector under weighted FedAvg: larger sample
// counts weigh as much (the modulus must hold n * max_weight * (2^bits - 1)).
constexpr uint64_t kMaxWeight = uint64_t(1) << 20;

int64_t float_values(const NamedArrays& state) {
  int64_t n = 0;
  for (const auto& [name, a] : state)
    if (a.dtype() == DType::F32) n += a.numel();
  return n;
}

}  // namespace

secagg::Config secure_round_config(const PipelineConfig::SecureAggregation& s, uint32_t sites,
                                   int64_t length, uint64_t graph_seed, bool equal_weights) {
  secagg::Config c =
      secagg::Config::defaults(sites, length, graph_seed, equal_weights ? 1 : kMaxWeight);
  if (s.neighbours > 0) c.neighbours = std::min<uint32_t>(uint32_t(s.neighbours), sites - 1);
  if (s.threshold > 0)
    c.threshold = uint32_t(s.threshold);
  else
    c.threshold = c.degree() / 2 + 1;
  c.clip = s.range;
  c.quant_bits = uint32_t(s.bits);
  const unsigned __int128 largest =
      (unsigned __int128)sites * c.max_weight * ((uint64_t(1) << c.quant_bits) - 1);
  c.modulus_bits = largest < ((unsigned __int128)1 << 32) ? 32 : 64;
  try {
    c.check();
  } catch (const std::exception& e) {
    throw Error(s.where.str() + ": secure_aggregation with " + std::to_string(sites) +
                " sites in the round: " + e.what());
  }
  return c;
}

void check_secure_aggregation(const PipelineConfig& config, bool aggregates_by_sum,
                              size_t trainers) {
  const std::string at = config.secure_aggregation->where.str() + ": secure_aggregation: ";
  if (!aggregates_by_sum)
    throw Error(at + "aggregator '" + config.aggregator.type + "' (" +
                config.aggregator.where.str() +
                ") needs the individual updates, which secure aggregation hides from the "
                "coordinator; use an aggregator that works on their sum (fedavg, fedprox, fedopt)");
  if (trainers < 3)
    throw Error(at + "needs at least 3 sites that train (the run has " + std::to_string(trainers) +
                "): with 2, the sum and one's own update give away the other's");
}

Coordinator::RoundOutcome Coordinator::secure_train_round(
    Aggregator& aggregator, int round, int rounds, const std::vector<std::string>& selected,
    const std::map<std::string, double>& settings, int min_sites,
    const PipelineConfig::SecureAggregation& secure, bool equal_weights) {
  RoundOutcome out;
  const auto fail = [&](const std::string& site, const std::string& why) {
    out.failures.push_back("site '" + site + "': " + why);
    spdlog::error("round {}: secure aggregation: {}", round, out.failures.back());
  };
  const auto abort_round = [&](const std::string& why) {
    out.not_aggregated = why;
    spdlog::warn("round {}: not aggregated ({}); global model unchanged", round, why);
    return out;
  };
  if (selected.size() < 3)
    return abort_round("secure aggregation needs at least 3 selected sites, " +
                       std::to_string(selected.size()) + " were");
  const uint32_t n = uint32_t(selected.size());
  secagg::Config config;
  try {
    config = secure_round_config(secure, n, float_values(global_),
                                 derive_seed(seed_, "secagg-graph", round), equal_weights);
  } catch (const std::exception& e) {
    return abort_round(e.what());
  }
  secagg::Coordinator agg(config);
  std::vector<bool> alive(n, true);
  // Each stage asks the sites still in the round; a site that fails or replies badly is out.
  const auto stage = [&](const std::function<std::string(uint32_t)>& ask) {
    for (uint32_t u = 0; u < n; ++u) {
      if (!alive[u]) continue;
      try {
        if (std::string why = ask(u); !why.empty()) {
          alive[u] = false;
          fail(selected[u], why);
        }
      } catch (const secagg::SecAggAbort&) {
        throw;
      } catch (const std::exception& e) {
        alive[u] = false;
        out.failures.push_back(site_failure(selected[u], e));
        spdlog::error("round {}: secure aggregation: {}", round, out.failures.back());
      }
    }
  };
  std::map<uint32_t, double> losses;
  secagg::Aggregate sum;
  try {
    // 0. advertise keys
    stage([&](uint32_t u) {
      auto a = protocol::read_secagg_advert(
          decode(channel_.call(selected[u], encode(protocol::secagg_setup(round, config, u)))), u);
      if (!a.ok()) return a.problem;
      agg.add_advert(*a.value);
      return std::string();
    });
    // 1. share keys (encrypted to each neighbour; the coordinator only relays them)
    stage([&](uint32_t u) {
      const Bytes request = encode(protocol::secagg_share_keys(round, agg.keys_for(u)));
      auto s = protocol::read_secagg_shares(decode(channel_.call(selected[u], request)), u, n);
      if (!s.ok()) return s.problem;
      agg.add_shares(*s.value);
      return std::string();
    });
    // 2. local training and the masked input: only the running sum is kept
    stage([&](uint32_t u) {
      const Bytes request = encode(protocol::secagg_train(round, settings, agg.delivery_for(u)));
      auto m = protocol::read_secagg_masked(decode(channel_.call(selected[u], request)), u, config);
      if (!m.ok()) return m.problem;
      agg.add_masked_input(m.value->input);
      losses[u] = m.value->train_loss;
      return std::string();
    });
    // 3. unmask: survivors reveal their shares of the survivors' self masks and of the dropped
    // sites' mask keys
    const secagg::UnmaskRequest unmask = agg.unmask_request();
    if (!unmask.dropped.empty())
      spdlog::warn(
          "round {}: secure aggregation: {} site(s) dropped after sharing keys; their "
          "masks are removed with their neighbours' shares",
          round, unmask.dropped.size());
    const Bytes request = encode(protocol::secagg_unmask(round, unmask));
    for (uint32_t u : unmask.survivors) {
      try {
        auto r = protocol::read_secagg_reveal(decode(channel_.call(selected[u], request)), u, n);
        if (!r.ok())
          fail(selected[u], r.problem);
        else
          agg.add_unmask_reply(*r.value);
      } catch (const std::exception& e) {
        out.failures.push_back(site_failure(selected[u], e));
      }
    }
    sum = agg.finish();
  } catch (const std::exception& e) {
    return abort_round(e.what());
  }
  NamedArrays mean;
  try {
    mean = secagg::apply_delta(global_, sum.mean());
  } catch (const std::exception& e) {
    return abort_round(std::string("secure aggregation: ") + e.what());
  }
  if (std::string bad = protocol::non_finite_entry(mean); !bad.empty())
    return abort_round("the securely aggregated mean has non-finite values in '" + bad + "'");
  // The aggregator sees the survivors' mean once per survivor: what it makes of m equal updates
  // is what it makes of their sum (aggregates_by_sum), and m is the round's count for privacy.
  for (uint32_t u : sum.survivors) {
    SiteUpdate update;
    update.site = selected[u];
    update.state = mean;
    update.num_samples = 1;
    update.train_loss = losses[u];
    update.scalars[kSecureRound] = 1;
    if (!equal_weights) update.scalars[kRoundNumSamples] = double(sum.total_weight);
    out.updates.push_back(std::move(update));
  }
  aggregate_updates(aggregator, round, rounds, selected, min_sites, out);
  return out;
}

// ---- the site's side ------------------------------------------------------------------------

struct SecureAggregationSite::State {
  protocol::SecAggSetup setup;
  int64_t round = 0;
  std::optional<secagg::Site> machine;
};

SecureAggregationSite::SecureAggregationSite(const PipelineConfig& config, std::string site)
    : config_(config), site_(std::move(site)) {}
SecureAggregationSite::~SecureAggregationSite() = default;

Message SecureAggregationSite::setup(const Message& request) {
  if (!config_.secure_aggregation)
    throw SiteError(site_, "the pipeline does not ask for secure aggregation");
  state_ = std::make_unique<State>();
  state_->setup = protocol::read_secagg_setup(request);
  state_->round = request.round;
  const secagg::Bytes32 secret = config_.secure_aggregation->secrets == "seeded"
                                     ? secagg::simulation_secret(config_.seed, site_, request.round)
                                     : secagg::random_secret();
  state_->machine.emplace(state_->setup.config, state_->setup.index, secret);
  return protocol::secagg_advert(site_, request.round, state_->machine->advertise());
}

Message SecureAggregationSite::share_keys(const Message& request) {
  if (!state_ || state_->round != request.round)
    throw SiteError(site_, "secure aggregation: share keys without a setup for round " +
                               std::to_string(request.round));
  const auto keys = protocol::read_secagg_share_keys(request, state_->setup.config.sites);
  return protocol::secagg_shares(site_, request.round, state_->machine->share_keys(keys));
}

Message SecureAggregationSite::masked_input(
    const Message& request, const NamedArrays& global,
    const std::function<TrainedUpload(const protocol::TrainSettings&)>& train) {
  if (!state_ || state_->round != request.round)
    throw SiteError(site_, "secure aggregation: train without a setup for round " +
                               std::to_string(request.round));
  const secagg::Config& c = state_->setup.config;
  protocol::SecAggTrain t = protocol::read_secagg_train(request, state_->setup.index, c.sites);
  TrainedUpload trained = train(t.settings);
  const std::vector<float> delta = secagg::flatten_delta(trained.upload, global);
  const int64_t clipped = std::count_if(delta.begin(), delta.end(),
                                        [&](float v) { return std::fabs(double(v)) > c.clip; });
  if (clipped > 0)
    spdlog::warn(
        "site '{}': round {}: {} of {} delta values lie outside secure_aggregation.range {} and "
        "are clipped to it (raise the range: BatchNorm running variances move the most)",
        site_, request.round, clipped, delta.size(), c.clip);
  const uint64_t weight =
      c.max_weight == 1
          ? (trained.num_samples > 0 ? 1 : 0)
          : uint64_t(std::clamp(std::floor(trained.num_samples), 0.0, double(c.max_weight)));
  const secagg::MaskedInput input =
      state_->machine->masked_input(t.delivery, delta.data(), int64_t(delta.size()), weight);
  return protocol::secagg_masked(site_, request.round, input, trained.train_loss, trained.steps);
}

Message SecureAggregationSite::unmask(const Message& request) {
  if (!state_ || state_->round != request.round)
    throw SiteError(site_, "secure aggregation: unmask without a setup for round " +
                               std::to_string(request.round));
  const auto req = protocol::read_secagg_unmask(request, state_->setup.config.sites);
  Message out = protocol::secagg_reveal(site_, request.round, state_->machine->unmask(req));
  state_.reset();  // one round's secrets are not kept
  return out;
}

}  // namespace concord
