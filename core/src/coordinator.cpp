// The coordinator's five steps over a Channel. Torch-free: it only moves named arrays.
#include <concord/engine.h>
#include <concord/protocol.h>
#include <concord/seed.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

namespace concord {

Coordinator::Coordinator(Channel& channel, uint64_t seed) : channel_(channel), seed_(seed) {}

std::vector<std::string> Coordinator::select(
    int round, const std::vector<std::string>& candidates, double fraction, double availability,
    const std::map<std::string, double>& site_availability) const {
  std::vector<std::string> available;
  for (const auto& site : candidates) {
    auto it = site_availability.find(site);
    double p = it == site_availability.end() ? availability : it->second;
    SeededRandom rng(derive_seed(seed_, "availability/" + site, round));
    if (p >= 1.0 || rng.uniform() < p) available.push_back(site);
  }
  if (available.empty()) return available;
  size_t want = size_t(std::ceil(fraction * double(available.size()) - 1e-9));
  want = std::clamp<size_t>(want, 1, available.size());
  SeededRandom rng(derive_seed(seed_, "select", round));
  rng.shuffle(available);
  available.resize(want);
  // Keep the candidates' order so logs and training order are stable.
  std::vector<std::string> out;
  for (const auto& s : candidates)
    if (std::find(available.begin(), available.end(), s) != available.end()) out.push_back(s);
  return out;
}

std::string site_failure(const std::string& site, const std::exception& e) {
  if (auto* se = dynamic_cast<const SiteError*>(&e); se && se->site() == site) return e.what();
  return "site '" + site + "': " + e.what();
}

Coordinator::RoundOutcome Coordinator::train_round(
    Aggregator& aggregator, int round, int rounds, const std::vector<std::string>& selected,
    const std::map<std::string, double>& settings, int min_sites,
    const std::function<void(const std::string&, size_t, size_t)>& on_site) {
  return train_round_with(aggregator, round, rounds, selected,
                          protocol::train_request(round, settings), min_sites, on_site);
}

Coordinator::RoundOutcome Coordinator::train_round_with(
    Aggregator& aggregator, int round, int rounds, const std::vector<std::string>& selected,
    const Message& request_message, int min_sites,
    const std::function<void(const std::string&, size_t, size_t)>& on_site) {
  RoundOutcome out;
  Bytes request = encode(request_message);
  for (size_t k = 0; k < selected.size(); ++k) {
    const std::string& site = selected[k];
    if (on_site) on_site(site, k, selected.size());
    // Step 2 (local training) runs at the site; step 3 (upload) is its reply.
    try {
      auto upload = protocol::read_update(decode(channel_.call(site, request)), global_);
      if (!upload.ok()) {
        spdlog::error("round {}: rejected the update of site '{}': {}", round, site,
                      upload.problem);
        out.failures.push_back("site '" + site + "': " + upload.problem + " (rejected)");
        continue;
      }
      if (upload.value->num_samples == 0) {
        spdlog::warn("round {}: site '{}' has no training samples; skipped", round, site);
        out.skipped.push_back(site);
        continue;
      }
      SiteUpdate u;
      u.site = site;
      u.state = std::move(upload.value->state);
      u.num_samples = upload.value->num_samples;
      u.train_loss = upload.value->train_loss;
      u.scalars = std::move(upload.value->scalars);
      out.updates.push_back(std::move(u));
    } catch (const std::exception& e) {
      out.failures.push_back(site_failure(site, e));
      spdlog::error("round {}: {}", round, out.failures.back());
    }
  }
  // Step 4: aggregate, only with enough usable uploads.
  if (out.updates.empty() || int(out.updates.size()) < min_sites) {
    out.not_aggregated = selected.empty() ? "no site was available"
                                          : std::to_string(out.updates.size()) + " of " +
                                                std::to_string(selected.size()) +
                                                " selected sites sent a usable update; at least " +
                                                std::to_string(std::max(min_sites, 1)) + " needed";
    spdlog::warn("round {}: not aggregated ({}); global model unchanged", round,
                 out.not_aggregated);
    return out;
  }
  // The aggregator is a plugin: whatever it throws or returns, a bad result costs this round
  // only, never the run or the global model; its server state (e.g. FedOpt's moments) is put
  // back as it was, so a resumed run and this one agree.
  NamedArrays server_state;
  for (const auto& [k, v] : aggregator.state()) server_state[k] = v.clone();
  try {
    NamedArrays next = aggregator.aggregate(global_, out.updates, RoundInfo{round, rounds, seed_});
    if (std::string s = protocol::state_mismatch(global_, next); !s.empty())
      throw Error("its result " + s);
    if (std::string bad = protocol::non_finite_entry(next); !bad.empty())
      throw Error("its result has non-finite values in '" + bad + "'");
    global_ = std::move(next);
    out.aggregated = true;
  } catch (const std::exception& e) {
    out.not_aggregated = std::string("aggregation failed: ") + e.what();
    try {
      if (!server_state.empty()) aggregator.load_state(server_state);
    } catch (const std::exception& again) {
      out.not_aggregated += std::string("; restoring its state failed too: ") + again.what();
    }
    spdlog::error("round {}: {}; global model unchanged", round, out.not_aggregated);
  }
  return out;
}

namespace {

// Asks each of `sites` with the same request bytes (encoded once); `take(site, reply)` reads a
// reply and returns "" or why it is unusable. Failures (thrown or refused) are added to
// `failures`, by site; the caller reports them.
template <class Take>
void ask_each(Channel& channel, const Bytes& request, const std::vector<std::string>& sites,
              Coordinator::Failures& failures, Take take) {
  for (const auto& site : sites) {
    try {
      if (std::string why = take(site, decode(channel.call(site, request))); !why.empty())
        throw SiteError(site, why);
    } catch (const std::exception& e) {
      failures.push_back({site, site_failure(site, e)});
    }
  }
}

// The reader of replies that only acknowledge.
std::string acked(const std::string&, Message&& reply) {
  return protocol::ack_problem(reply);
}

}  // namespace

Coordinator::Failures Coordinator::ask(
    const Message& request, const std::vector<std::string>& sites,
    const std::function<std::string(const std::string& site, Message&& reply)>& take) {
  Failures failures;
  ask_each(channel_, encode(request), sites, failures, take);
  return failures;
}

std::vector<std::string> Coordinator::broadcast(int round, const std::vector<std::string>& sites) {
  Failures failed;
  ask_each(channel_, encode(protocol::broadcast(round, global_)), sites, failed, acked);
  std::vector<std::string> failures;
  for (const auto& f : failed) {
    failures.push_back(f.what);
    spdlog::error("round {}: broadcast: {}", round, f.what);
  }
  return failures;
}

std::vector<std::pair<std::string, Stats>> Coordinator::fit_statistics(
    size_t index, const std::vector<std::string>& sites, Failures& failures,
    const std::function<void(const std::string&)>& after_each) {
  std::vector<std::pair<std::string, Stats>> out;
  ask_each(channel_, encode(protocol::fit_request(index)), sites, failures,
           [&](const std::string& site, Message&& reply) {
             auto stats = protocol::read_statistics(std::move(reply));
             if (after_each) after_each(site);
             if (!stats.ok()) return stats.problem;
             out.emplace_back(site, std::move(*stats.value));
             return std::string();
           });
  return out;
}

Coordinator::Failures Coordinator::set_statistics(size_t index, Stats global,
                                                  const std::vector<std::string>& sites) {
  Failures failures;
  ask_each(channel_, encode(protocol::set_statistics(index, std::move(global))), sites, failures,
           acked);
  return failures;
}

std::map<std::string, std::map<std::string, double>> Coordinator::evaluate(
    int round, const std::string& phase, const std::vector<std::string>& sites,
    Failures& failures) {
  std::map<std::string, std::map<std::string, double>> out;
  ask_each(channel_, encode(protocol::evaluate_request(round, phase)), sites, failures,
           [&](const std::string& site, Message&& reply) {
             auto m = protocol::read_metrics(std::move(reply));
             if (!m.ok()) return m.problem;
             out[site] = std::move(m.value->values);
             return std::string();
           });
  return out;
}

Coordinator::Failures Coordinator::personalize(int round, const std::vector<std::string>& sites) {
  Failures failures;
  ask_each(channel_, encode(protocol::personalize_request(round)), sites, failures, acked);
  return failures;
}

std::map<std::string, protocol::SiteState> Coordinator::export_states(
    int round, const std::vector<std::string>& sites, Failures& failures) {
  std::map<std::string, protocol::SiteState> out;
  ask_each(channel_, encode(protocol::export_state_request(round)), sites, failures,
           [&](const std::string& site, Message&& reply) {
             auto st = protocol::read_site_state(std::move(reply));
             if (!st.ok()) return st.problem;
             out[site] = std::move(*st.value);
             return std::string();
           });
  return out;
}

Coordinator::Failures Coordinator::restore_states(
    int round, const std::map<std::string, protocol::SiteState>& states) {
  Failures failures;
  for (const auto& [site, st] : states)
    ask_each(channel_, encode(protocol::restore_state_request(round, st)), {site}, failures, acked);
  return failures;
}

}  // namespace concord
