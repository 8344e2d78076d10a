// The site protocol's builders and readers (see protocol.h). Torch-free.
#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <cmath>

namespace concord {
namespace protocol {

namespace {

const std::string& version_text() {
  static const std::string v = std::to_string(kVersion);
  return v;
}

// At most 40 characters of a peer's text in an error message.
std::string shown(const std::string& s) {
  return "'" + (s.size() > 40 ? s.substr(0, 40) + "..." : s) + "'";
}

Message stamped(const char* type, int64_t round = 0) {
  Message m;
  m.type = type;
  m.round = round;
  m.text[kVersionKey] = version_text();
  return m;
}

// "" when `m` is of this version and of type `want` (the reply to `request`), else why not.
std::string reply_problem(const Message& m, const char* want, const char* request) {
  if (std::string v = version_problem(m); !v.empty()) return v;
  if (m.type != want) return "replied " + shown(m.type) + " to " + request;
  return "";
}

void check(const Message& m) {
  if (std::string v = version_problem(m); !v.empty()) throw Error(v);
}

std::string non_finite_scalar(const std::map<std::string, double>& scalars) {
  for (const auto& [k, v] : scalars)
    if (!std::isfinite(v)) return "non-finite " + k + " (" + std::to_string(v) + ")";
  return "";
}

std::string shape_str(const Array& a) {
  std::string s = std::string(dtype_name(a.dtype())) + " [";
  for (size_t i = 0; i < a.shape().size(); ++i) s += (i ? "," : "") + std::to_string(a.shape()[i]);
  return s + "]";
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace

std::string version_problem(const Message& m) {
  auto it = m.text.find(kVersionKey);
  if (it == m.text.end())
    return "message " + shown(m.type) + " carries no protocol version (this build speaks " +
           "protocol version " + version_text() + ")";
  if (it->second != version_text())
    return "message " + shown(m.type) + " speaks protocol version " + shown(it->second) +
           "; this build speaks protocol version " + version_text();
  return "";
}

// ---- coordinator to site -------------------------------------------------------------------

Request request_kind(const Message& m) {
  check(m);
  static const std::map<std::string, Request> kinds = {{kTrain, Request::Train},
                                                       {kBroadcast, Request::Broadcast},
                                                       {kEvaluate, Request::Evaluate},
                                                       {kFit, Request::Fit},
                                                       {kSetStatistics, Request::SetStatistics},
                                                       {kPersonalize, Request::Personalize},
                                                       {kExportState, Request::ExportState},
                                                       {kRestoreState, Request::RestoreState},
                                                       {kLearnBegin, Request::LearnBegin},
                                                       {kLearn, Request::Learn},
                                                       {kLearnResult, Request::LearnResult},
                                                       {kLearnExport, Request::LearnExport},
                                                       {kLearnRestore, Request::LearnRestore}};
  auto it = kinds.find(m.type);
  if (it == kinds.end()) throw Error("unknown request " + shown(m.type));
  return it->second;
}

Message train_request(int64_t round, const std::map<std::string, double>& settings) {
  Message m = stamped(kTrain, round);
  m.scalars = settings;
  return m;
}

TrainSettings read_train_request(const Message& m) {
  check(m);
  if (m.type != kTrain) throw Error("expected a train request, got " + shown(m.type));
  TrainSettings t;
  t.all = m.scalars;
  if (auto it = m.scalars.find(kLocalEpochs); it != m.scalars.end()) {
    const double e = it->second;
    if (!(e >= 1 && e <= 100000) || e != std::floor(e))
      throw Error(std::string(kLocalEpochs) + " " + std::to_string(e) +
                  " is not a whole number in [1, 100000]");
    t.local_epochs = int(e);
  }
  return t;
}

Message broadcast(int64_t round, NamedArrays global) {
  Message m = stamped(kBroadcast, round);
  m.arrays = std::move(global);
  return m;
}

Message evaluate_request(int64_t round, const std::string& phase) {
  Message m = stamped(kEvaluate, round);
  m.text[kPhase] = phase;
  return m;
}

std::string read_evaluate_request(const Message& m) {
  check(m);
  auto it = m.text.find(kPhase);
  if (it == m.text.end() || (it->second != kPhaseGlobal && it->second != kPhasePersonalized))
    throw Error("evaluate request without a phase ('" + std::string(kPhaseGlobal) + "' or '" +
                kPhasePersonalized + "')");
  return it->second;
}

Message fit_request(size_t harmonizer) {
  Message m = stamped(kFit);
  m.scalars[kHarmonizer] = double(harmonizer);
  return m;
}

size_t read_harmonizer(const Message& m, size_t count) {
  check(m);
  auto it = m.scalars.find(kHarmonizer);
  if (it == m.scalars.end()) throw Error(shown(m.type) + " request names no harmonizer");
  const double i = it->second;
  if (!(i >= 0 && i < double(count)) || i != std::floor(i))
    throw Error(shown(m.type) + " request names harmonizer " + std::to_string(i) + "; there are " +
                std::to_string(count) + ", numbered from 0");
  return size_t(i);
}

Message set_statistics(size_t harmonizer, Stats global) {
  Message m = stats_message(std::move(global), kSetStatistics);
  m.text[kVersionKey] = version_text();
  m.scalars[kHarmonizer] = double(harmonizer);
  return m;
}

SetStatistics read_set_statistics(Message&& m, size_t count) {
  SetStatistics out;
  out.harmonizer = read_harmonizer(m, count);
  m.scalars.erase(kHarmonizer);
  out.stats = stats_from_message(std::move(m));
  return out;
}

Message personalize_request(int64_t round) {
  return stamped(kPersonalize, round);
}

// ---- site to coordinator -------------------------------------------------------------------

Message ack(const std::string& site, int64_t round) {
  Message m = stamped(kAck, round);
  m.site = site;
  return m;
}

std::string ack_problem(const Message& reply) {
  if (std::string v = version_problem(reply); !v.empty()) return v;
  if (reply.type != kAck) return "replied " + shown(reply.type) + " instead of '" + kAck + "'";
  return "";
}

Message update(const std::string& site, int64_t round, NamedArrays state, double num_samples,
               double train_loss, int64_t steps) {
  Message m = stamped(kUpdate, round);
  m.site = site;
  m.arrays = std::move(state);
  m.scalars[kNumSamples] = num_samples;
  m.scalars[kTrainLoss] = train_loss;
  m.scalars[kSteps] = double(steps);
  return m;
}

Message empty_update(const std::string& site, int64_t round) {
  Message m = stamped(kUpdate, round);
  m.site = site;
  m.scalars[kNumSamples] = 0;
  return m;
}

Checked<Upload> read_update(Message&& reply, const NamedArrays& global) {
  using R = Checked<Upload>;
  if (std::string p = reply_problem(reply, kUpdate, kTrain); !p.empty()) return R::fail(p);
  auto n = reply.scalars.find(kNumSamples);
  if (n == reply.scalars.end()) return R::fail(std::string("no ") + kNumSamples);
  const double samples = n->second;
  if (!(samples >= 0 && samples <= kMaxUploadSamples) || samples != std::floor(samples))
    return R::fail(std::string(kNumSamples) + " " + std::to_string(samples) +
                   " is not a whole number in [0, " + std::to_string(int64_t(kMaxUploadSamples)) +
                   "]");
  Upload u;
  if (samples > 0) {  // a site with nothing trained sends nothing else to check
    auto loss = reply.scalars.find(kTrainLoss);
    if (loss == reply.scalars.end()) return R::fail(std::string("no ") + kTrainLoss);
    if (std::string s = non_finite_scalar(reply.scalars); !s.empty()) return R::fail(s);
    if (std::string s = state_mismatch(global, reply.arrays); !s.empty())
      return R::fail("update " + s);
    if (std::string bad = non_finite_entry(reply.arrays); !bad.empty())
      return R::fail("non-finite values in '" + bad + "'");
    u.train_loss = loss->second;
    u.state = std::move(reply.arrays);
  }
  u.num_samples = samples;
  u.scalars = std::move(reply.scalars);
  return R::of(std::move(u));
}

Message statistics(const std::string& site, Stats stats) {
  Message m = stats_message(std::move(stats), kStats);
  m.text[kVersionKey] = version_text();
  m.site = site;
  return m;
}

Checked<Stats> read_statistics(Message&& reply) {
  using R = Checked<Stats>;
  if (std::string p = reply_problem(reply, kStats, kFit); !p.empty()) return R::fail(p);
  if (std::string s = non_finite_scalar(reply.scalars); !s.empty())
    return R::fail("statistics: " + s);
  auto w = reply.scalars.find(kWeight);
  if (w == reply.scalars.end())
    return R::fail(std::string("statistics lack scalar '") + kWeight + "'");
  if (w->second < 0) return R::fail("statistics: negative weight " + std::to_string(w->second));
  if (std::string bad = non_finite_entry(reply.arrays); !bad.empty())
    return R::fail("statistics: non-finite values in '" + bad + "'");
  try {
    return R::of(stats_from_message(std::move(reply)));
  } catch (const std::exception& e) {
    return R::fail(e.what());
  }
}

std::string statistics_mismatch(const Stats& stats, const Stats& reference) {
  if (std::string s = state_mismatch(reference.arrays, stats.arrays); !s.empty())
    return "statistics " + s + " (as the other sites send them)";
  for (const auto& [k, v] : reference.scalars)
    if (!stats.scalars.count(k)) return "statistics lack scalar '" + k + "'";
  for (const auto& [k, v] : stats.scalars)
    if (!reference.scalars.count(k)) return "statistics have unexpected scalar '" + k + "'";
  return "";
}

Message metrics(const std::string& site, int64_t round, const std::string& phase, int64_t num_test,
                const std::map<std::string, double>& values) {
  Message m = stamped(kMetrics, round);
  m.site = site;
  m.text[kPhase] = phase;
  m.scalars = values;
  m.scalars[kNumTest] = double(num_test);
  return m;
}

Checked<Metrics> read_metrics(Message&& reply) {
  using R = Checked<Metrics>;
  if (std::string p = reply_problem(reply, kMetrics, kEvaluate); !p.empty()) return R::fail(p);
  Metrics out;
  for (const auto& [k, v] : reply.scalars)
    if (std::isinf(v)) return R::fail("metric " + k + " is infinite");
  if (auto n = reply.scalars.find(kNumTest); n != reply.scalars.end()) {
    out.num_test = n->second;
    reply.scalars.erase(n);
  }
  out.phase = reply.text[kPhase];
  out.values = std::move(reply.scalars);
  return R::of(std::move(out));
}

// ---- site state -----------------------------------------------------------------------------

namespace {
const std::string kLocalPrefix = "local/", kStorePrefix = "store/";

Message with_state(const char* type, int64_t round, SiteState state) {
  Message m = stamped(type, round);
  for (auto& [k, v] : state.local) m.arrays[kLocalPrefix + k] = std::move(v);
  for (auto& [k, v] : state.store) m.arrays[kStorePrefix + k] = std::move(v);
  m.scalars[kTrained] = state.trained ? 1 : 0;
  return m;
}

// The state in `m`'s arrays; throws Error on an entry outside local/ and store/. Arrays are
// copied (they do not pin the message's buffer).
SiteState state_of(Message& m) {
  SiteState st;
  for (auto& [k, v] : m.arrays) {
    if (starts_with(k, kLocalPrefix))
      st.local[k.substr(kLocalPrefix.size())] = v.clone();
    else if (starts_with(k, kStorePrefix))
      st.store[k.substr(kStorePrefix.size())] = v.clone();
    else
      throw Error("unexpected entry " + shown(k) + " (neither local/ nor store/)");
  }
  auto it = m.scalars.find(kTrained);
  st.trained = it != m.scalars.end() && it->second > 0;
  return st;
}
}  // namespace

Message export_state_request(int64_t round) {
  return stamped(kExportState, round);
}

Message restore_state_request(int64_t round, SiteState state) {
  return with_state(kRestoreState, round, std::move(state));
}

SiteState read_restore_state(Message&& m) {
  check(m);
  if (m.type != kRestoreState)
    throw Error("expected a restore-state request, got " + shown(m.type));
  return state_of(m);
}

Message site_state(const std::string& site, int64_t round, SiteState state) {
  Message m = with_state(kSiteState, round, std::move(state));
  m.site = site;
  return m;
}

Checked<SiteState> read_site_state(Message&& reply) {
  using R = Checked<SiteState>;
  if (std::string p = reply_problem(reply, kSiteState, kExportState); !p.empty()) return R::fail(p);
  try {
    SiteState st = state_of(reply);
    for (const auto* part : {&st.local, &st.store})
      if (std::string bad = non_finite_entry(*part); !bad.empty())
        return R::fail("its state has non-finite values in '" + bad + "'");
    return R::of(std::move(st));
  } catch (const Error& e) {
    return R::fail(e.what());
  }
}

// ---- files -----------------------------------------------------------------------------------

namespace {
const std::string kGlobalPrefix = "global/", kAggregatorPrefix = "aggregator/",
                  kSitePrefix = "site/", kLocal = "/local/", kStore = "/store/",
                  kTrainedSuffix = "/trained";
}  // namespace

namespace {
// The checkpoint's text field `failures` (a JSON list); checkpoints from before failures were
// stored have none.
std::vector<std::string> failure_list(Message& m) {
  const std::string& stored = m.text[kFailures];
  nlohmann::json past =
      stored.empty() ? nlohmann::json::array() : nlohmann::json::parse(stored, nullptr, false);
  if (!past.is_array()) throw Error("no readable failure list");
  std::vector<std::string> out;
  for (const auto& f : past) out.push_back(f.is_string() ? f.get<std::string>() : json_text(f));
  return out;
}
}  // namespace

Message checkpoint(const Checkpoint& c) {
  Message m = stamped(kCheckpoint, c.round);
  for (const auto& [k, v] : c.global) m.arrays[kGlobalPrefix + k] = v;
  for (const auto& [k, v] : c.aggregator) m.arrays[kAggregatorPrefix + k] = v;
  for (const auto& [name, s] : c.sites) {
    for (const auto& [k, v] : s.local) m.arrays[kSitePrefix + name + kLocal + k] = v;
    for (const auto& [k, v] : s.store) m.arrays[kSitePrefix + name + kStore + k] = v;
    m.scalars[kSitePrefix + name + kTrainedSuffix] = s.trained ? 1 : 0;
  }
  m.text[kPipeline] = c.pipeline;
  m.text[kFailures] = json_text(nlohmann::json(c.failures));
  return m;
}

Checkpoint read_checkpoint(Message&& m, const std::vector<std::string>& sites) {
  if (m.type != kCheckpoint) throw Error("not a checkpoint (message type " + shown(m.type) + ")");
  check(m);
  Checkpoint c;
  c.round = m.round;
  c.pipeline = m.text[kPipeline];
  for (const auto& name : sites) c.sites[name];
  for (auto& [k, v] : m.arrays) {
    Array copy = v.clone();  // do not pin the whole file buffer
    if (starts_with(k, kGlobalPrefix)) {
      c.global[k.substr(kGlobalPrefix.size())] = copy;
    } else if (starts_with(k, kAggregatorPrefix)) {
      c.aggregator[k.substr(kAggregatorPrefix.size())] = copy;
    } else if (starts_with(k, kSitePrefix)) {
      const std::string rest = k.substr(kSitePrefix.size());
      bool known = false;
      for (const auto& name : sites) {
        if (starts_with(rest, name + kLocal)) {
          c.sites[name].local[rest.substr(name.size() + kLocal.size())] = copy;
          known = true;
        } else if (starts_with(rest, name + kStore)) {
          c.sites[name].store[rest.substr(name.size() + kStore.size())] = copy;
          known = true;
        }
      }
      if (!known) throw Error("entry '" + k + "' names no site of this run");
    } else {
      throw Error("unexpected entry '" + k + "'");
    }
  }
  for (auto& [name, s] : c.sites) {
    auto it = m.scalars.find(kSitePrefix + name + kTrainedSuffix);
    s.trained = it != m.scalars.end() && it->second > 0;
  }
  c.failures = failure_list(m);
  return c;
}

Message global_state(int64_t round, NamedArrays global) {
  Message m = stamped(kGlobalState, round);
  m.arrays = std::move(global);
  return m;
}

// ---- the learned-harmonizer stage -------------------------------------------------------------

namespace {
const std::string kFinalPrefix = "final/";

// A whole number in [lo, hi] under `key`, else Error naming the request.
int64_t whole(const Message& m, const char* key, double lo, double hi) {
  auto it = m.scalars.find(key);
  if (it == m.scalars.end()) throw Error(shown(m.type) + " request lacks '" + key + "'");
  const double v = it->second;
  if (!(v >= lo && v <= hi) || v != std::floor(v))
    throw Error(shown(m.type) + " request: '" + key + "' " + std::to_string(v) +
                " is not a whole number in [" + std::to_string(int64_t(lo)) + ", " +
                std::to_string(int64_t(hi)) + "]");
  return int64_t(v);
}
// The phase k of an entry "final/<k>/<name>" (at most 4 digits), with `slash` at the '/' after
// k; `phase` (not an earlier phase) when the entry is not of that form.
size_t final_phase(const std::string& k, size_t phase, size_t& slash) {
  slash = k.find('/', kFinalPrefix.size());
  if (!starts_with(k, kFinalPrefix) || slash == std::string::npos || slash == kFinalPrefix.size() ||
      slash - kFinalPrefix.size() > 4 ||
      k.find_first_not_of("0123456789", kFinalPrefix.size()) != slash)
    return phase;
  return size_t(std::stoul(k.substr(kFinalPrefix.size(), slash - kFinalPrefix.size())));
}
}  // namespace

Message learn_begin(size_t harmonizer, Stats plan) {
  Message m = stats_message(std::move(plan), kLearnBegin);
  m.text[kVersionKey] = version_text();
  m.scalars[kHarmonizer] = double(harmonizer);
  return m;
}

Message learn_request(const LearnRequest& r) {
  Message m = stamped(kLearn, r.round);
  m.scalars[kHarmonizer] = double(r.harmonizer);
  m.scalars[kPhaseIndex] = double(r.phase);
  m.scalars[kRounds] = double(r.rounds);
  m.scalars[kLocalEpochs] = double(r.local_epochs);
  for (const auto& [k, v] : r.global) m.arrays[kGlobalPrefix + k] = v;
  for (size_t p = 0; p < r.finals.size(); ++p)
    for (const auto& [k, v] : r.finals[p]) m.arrays[kFinalPrefix + std::to_string(p) + "/" + k] = v;
  return m;
}

LearnRequest read_learn_request(Message&& m, size_t count) {
  check(m);
  if (m.type != kLearn) throw Error("expected a learn request, got " + shown(m.type));
  LearnRequest r;
  r.harmonizer = read_harmonizer(m, count);
  r.phase = size_t(whole(m, kPhaseIndex, 0, 1000));
  r.rounds = int(whole(m, kRounds, 1, 100000));
  r.local_epochs = int(whole(m, kLocalEpochs, 1, 100000));
  if (!(m.round >= 1 && m.round <= r.rounds))
    throw Error("learn request for round " + std::to_string(m.round) + " of " +
                std::to_string(r.rounds));
  r.round = int(m.round);
  r.finals.resize(r.phase);
  for (auto& [k, v] : m.arrays) {
    if (starts_with(k, kGlobalPrefix)) {
      r.global[k.substr(kGlobalPrefix.size())] = std::move(v);
      continue;
    }
    size_t slash = 0;
    const size_t p = final_phase(k, r.phase, slash);
    if (p >= r.phase)
      throw Error("learn request: unexpected entry " + shown(k) +
                  " (neither global/ nor final/<earlier phase>/)");
    r.finals[p][k.substr(slash + 1)] = std::move(v);
  }
  return r;
}

Message learn_result_request(size_t harmonizer, NamedArrays final_global) {
  Message m = stamped(kLearnResult);
  m.scalars[kHarmonizer] = double(harmonizer);
  m.arrays = std::move(final_global);
  return m;
}

Message learn_export_request(size_t harmonizer, int64_t round) {
  Message m = stamped(kLearnExport, round);
  m.scalars[kHarmonizer] = double(harmonizer);
  return m;
}

Message learn_state(const std::string& site, int64_t round, NamedArrays state) {
  Message m = stamped(kLearnState, round);
  m.site = site;
  m.arrays = std::move(state);
  return m;
}

Checked<NamedArrays> read_learn_state(Message&& reply) {
  using R = Checked<NamedArrays>;
  if (std::string p = reply_problem(reply, kLearnState, kLearnExport); !p.empty())
    return R::fail(p);
  if (std::string bad = non_finite_entry(reply.arrays); !bad.empty())
    return R::fail("its learned state has non-finite values in '" + bad + "'");
  NamedArrays out;
  for (auto& [k, v] : reply.arrays) out[k] = v.clone();
  return R::of(std::move(out));
}

Message learn_restore_request(size_t harmonizer, int64_t round, NamedArrays state) {
  Message m = stamped(kLearnRestore, round);
  m.scalars[kHarmonizer] = double(harmonizer);
  m.arrays = std::move(state);
  return m;
}

Message learned_checkpoint(const LearnedCheckpoint& c) {
  Message m = stamped(kLearnedCheckpoint, c.round);
  m.scalars[kHarmonizer] = double(c.harmonizer);
  m.scalars[kPhaseIndex] = double(c.phase);
  for (const auto& [k, v] : c.global) m.arrays[kGlobalPrefix + k] = v;
  for (const auto& [k, v] : c.aggregator) m.arrays[kAggregatorPrefix + k] = v;
  for (size_t p = 0; p < c.finals.size(); ++p)
    for (const auto& [k, v] : c.finals[p]) m.arrays[kFinalPrefix + std::to_string(p) + "/" + k] = v;
  for (const auto& [name, st] : c.sites)
    for (const auto& [k, v] : st) m.arrays[kSitePrefix + name + "/" + k] = v;
  m.text[kPipeline] = c.pipeline;
  m.text[kFailures] = json_text(nlohmann::json(c.failures));
  return m;
}

LearnedCheckpoint read_learned_checkpoint(Message&& m, const std::vector<std::string>& sites) {
  if (m.type != kLearnedCheckpoint)
    throw Error("not a learned-stage checkpoint (message type " + shown(m.type) + ")");
  check(m);
  LearnedCheckpoint c;
  c.harmonizer = size_t(whole(m, kHarmonizer, 0, 1000));
  c.phase = size_t(whole(m, kPhaseIndex, 0, 1000));
  c.round = m.round;
  c.pipeline = m.text[kPipeline];
  c.finals.resize(c.phase);
  for (auto& [k, v] : m.arrays) {
    Array copy = v.clone();
    if (starts_with(k, kGlobalPrefix)) {
      c.global[k.substr(kGlobalPrefix.size())] = copy;
    } else if (starts_with(k, kAggregatorPrefix)) {
      c.aggregator[k.substr(kAggregatorPrefix.size())] = copy;
    } else if (starts_with(k, kFinalPrefix)) {
      size_t slash = 0;
      const size_t p = final_phase(k, c.phase, slash);
      if (p >= c.phase) throw Error("entry '" + k + "' names no earlier phase");
      c.finals[p][k.substr(slash + 1)] = copy;
    } else if (starts_with(k, kSitePrefix)) {
      const std::string rest = k.substr(kSitePrefix.size());
      bool known = false;
      for (const auto& name : sites)
        if (starts_with(rest, name + "/")) {
          c.sites[name][rest.substr(name.size() + 1)] = copy;
          known = true;
          break;
        }
      if (!known) throw Error("entry '" + k + "' names no site of this run");
    } else {
      throw Error("unexpected entry '" + k + "'");
    }
  }
  c.failures = failure_list(m);
  return c;
}

// ---- checks on named arrays ----------------------------------------------------------------

std::string state_mismatch(const NamedArrays& reference, const NamedArrays& state) {
  for (const auto& [name, want] : reference) {
    auto it = state.find(name);
    if (it == state.end()) return "lacks entry '" + name + "'";
    if (it->second.dtype() != want.dtype() || it->second.shape() != want.shape())
      return "entry '" + name + "' is " + shape_str(it->second) + ", expected " + shape_str(want);
  }
  for (const auto& [name, a] : state)
    if (!reference.count(name)) return "unexpected entry '" + name + "'";
  return "";
}

std::string non_finite_entry(const NamedArrays& state) {
  for (const auto& [name, a] : state) {
    if (a.dtype() == DType::F32) {
      // Exponent bits all ones <=> Inf or NaN; an OR-reduction over integers vectorises.
      const uint32_t* p = static_cast<const uint32_t*>(a.raw());
      uint32_t any = 0;
      for (int64_t i = 0, n = a.numel(); i < n; ++i)
        any |= uint32_t((p[i] & 0x7f800000u) == 0x7f800000u);
      if (any) return name;
    } else if (a.dtype() == DType::F64) {
      const double* p = a.data<double>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i)
        if (!std::isfinite(p[i])) return name;
    }
  }
  return "";
}

}  // namespace protocol
}  // namespace concord
