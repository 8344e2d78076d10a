// The coordinator's five steps over a Channel. Torch-free: it only moves named arrays.
#include <concord/engine.h>
#include <concord/protocol.h>
#include <concord/seed.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <system_error>
#include <thread>

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

namespace {

// Runs work(i) for every i in [0, n): on up to channel.max_concurrent_calls() threads at once
// (sites in other processes), else one after another. `work` must not throw. Results are kept
// per index, so what the caller does with them afterwards is in site order either way.
template <class Work>
void for_each_site(const Channel& channel, size_t n, Work work) {
  const size_t lanes = std::min(n, std::max<size_t>(channel.max_concurrent_calls(), 1));
  if (lanes < 2) {
    for (size_t i = 0; i < n; ++i) work(i);
    return;
  }
  std::atomic<size_t> next{0};
  auto lane = [&] {
    for (size_t i; (i = next++) < n;) work(i);
  };
  std::vector<std::thread> threads;
  threads.reserve(lanes - 1);
  try {
    while (threads.size() + 1 < lanes) threads.emplace_back(lane);
  } catch (const std::system_error& e) {  // fewer threads: the lanes started share the work
    spdlog::warn("cannot start more threads ({}): {} calls at once", e.what(), threads.size() + 1);
  }
  lane();
  for (auto& t : threads) t.join();
}

}  // namespace

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
  // Step 2 (local training) runs at the sites; step 3 (upload) is each one's reply, read and
  // checked (concurrently when the channel allows), then taken in site order.
  std::vector<protocol::Checked<protocol::Upload>> uploads(selected.size());
  std::vector<std::string> errors(selected.size());
  const bool parallel = channel_.max_concurrent_calls() > 1;
  if (on_site && parallel)
    for (size_t k = 0; k < selected.size(); ++k) on_site(selected[k], k, selected.size());
  for_each_site(channel_, selected.size(), [&](size_t k) {
    const std::string& site = selected[k];
    if (on_site && !parallel) on_site(site, k, selected.size());
    try {
      uploads[k] = protocol::read_update(decode(channel_.call(site, request)), global_);
    } catch (const std::exception& e) {
      errors[k] = site_failure(site, e);
    }
  });
  for (size_t k = 0; k < selected.size(); ++k) {
    const std::string& site = selected[k];
    if (!errors[k].empty()) {
      out.failures.push_back(errors[k]);
      spdlog::error("round {}: {}", round, out.failures.back());
      continue;
    }
    auto& upload = uploads[k];
    if (!upload.ok()) {
      spdlog::error("round {}: rejected the update of site '{}': {}", round, site, upload.problem);
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
  }
  aggregate_updates(aggregator, round, rounds, selected, min_sites, out);
  return out;
}

void Coordinator::aggregate_updates(Aggregator& aggregator, int round, int rounds,
                                    const std::vector<std::string>& selected, int min_sites,
                                    RoundOutcome& out) {
  // Step 4: aggregate, only with enough usable uploads.
  if (out.updates.empty() || int(out.updates.size()) < min_sites) {
    out.not_aggregated = selected.empty() ? "no site was available"
                                          : std::to_string(out.updates.size()) + " of " +
                                                std::to_string(selected.size()) +
                                                " selected sites sent a usable update; at least " +
                                                std::to_string(std::max(min_sites, 1)) + " needed";
    spdlog::warn("round {}: not aggregated ({}); global model unchanged", round,
                 out.not_aggregated);
    return;
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
}

namespace {

// Asks each of `sites` with the same request bytes (encoded once; concurrently when the channel
// allows); `take(site, reply)` reads a reply and returns "" or why it is unusable, in site order.
// Failures (thrown or refused) are added to `failures`, by site; the caller reports them.
template <class Take>
void ask_each(Channel& channel, const Bytes& request, const std::vector<std::string>& sites,
              Coordinator::Failures& failures, Take take) {
  std::vector<Bytes> replies(sites.size());
  std::vector<std::string> errors(sites.size());
  for_each_site(channel, sites.size(), [&](size_t i) {
    try {
      replies[i] = channel.call(sites[i], request);
    } catch (const std::exception& e) {
      errors[i] = site_failure(sites[i], e);
    }
  });
  for (size_t i = 0; i < sites.size(); ++i) {
    const std::string& site = sites[i];
    if (!errors[i].empty()) {
      failures.push_back({site, errors[i]});
      continue;
    }
    try {
      Bytes reply = std::move(replies[i]);
      if (std::string why = take(site, decode(reply)); !why.empty()) throw SiteError(site, why);
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
  // One request per site (each its own state), concurrently when the channel allows.
  std::vector<const std::pair<const std::string, protocol::SiteState>*> each;
  for (const auto& entry : states) each.push_back(&entry);
  std::vector<Failures> failed(each.size());
  for_each_site(channel_, each.size(), [&](size_t i) {
    ask_each(channel_, encode(protocol::restore_state_request(round, each[i]->second)),
             {each[i]->first}, failed[i], acked);
  });
  Failures failures;
  for (auto& f : failed) failures.insert(failures.end(), f.begin(), f.end());
  return failures;
}

}  // namespace concord
