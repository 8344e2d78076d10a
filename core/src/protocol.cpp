// The site protocol's builders and readers (see protocol.h). Torch-free.
#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

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
                                                       {kSecAggSetup, Request::SecAggSetup},
                                                       {kSecAggShareKeys, Request::SecAggShareKeys},
                                                       {kSecAggTrain, Request::SecAggTrain},
                                                       {kSecAggUnmask, Request::SecAggUnmask},
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
  if (auto it = m.scalars.find(kDpClip); it != m.scalars.end()) {
    if (!(std::isfinite(it->second) && it->second > 0))
      throw Error(std::string(kDpClip) + " " + std::to_string(it->second) +
                  " is not a finite number above 0");
    t.dp_clip = it->second;
  }
  if (auto it = m.scalars.find(kDpNoiseStd); it != m.scalars.end()) {
    if (!(std::isfinite(it->second) && it->second >= 0) || t.dp_clip == 0)
      throw Error(std::string(kDpNoiseStd) + " " + std::to_string(it->second) +
                  " is not a finite number >= 0 sent with " + kDpClip);
    t.dp_noise_std = it->second;
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

// ---- secure aggregation ---------------------------------------------------------------------

namespace {

const char* const kSecAggConfig = "config";  // I64: sites, neighbours, threshold, length,
                                             // quant_bits, modulus_bits, max_weight, index
const char* const kSecAggClip = "clip";
const char* const kGraphSeed = "graph_seed";  // text: 64-bit decimal
const char* const kKeys = "keys";             // U8 [k, 64]: cipher_pk ++ mask_pk
const char* const kKeySites = "key_sites";    // I64 [k]
const char* const kTo = "to";                 // I64 [s]
const char* const kFrom = "from";             // I64 [s]
const char* const kBoxPrefix = "box/";        // U8: one encrypted share box per peer
const char* const kSharing = "sharing";       // I64
const char* const kMasked = "masked";         // I64 (bit pattern of the uint64 words)
const char* const kSurvivors = "survivors";   // I64
const char* const kDropped = "dropped";       // I64
const char* const kOwner = "owner";           // I64 [s]
const char* const kShareX = "x";              // U8 [s]
const char* const kMaskKey = "mask_key";      // U8 [s]
const char* const kShare = "share";           // U8 [s, 32]
constexpr size_t kMaxBox = 4096;

Array ints(const std::vector<uint32_t>& v) {
  std::vector<int64_t> w(v.begin(), v.end());
  return Array::from(w, {int64_t(w.size())});
}

// An I64 array of site numbers below `sites`, distinct; throws Error naming `what`.
std::vector<uint32_t> site_numbers(const NamedArrays& arrays, const char* what, uint32_t sites) {
  auto it = arrays.find(what);
  if (it == arrays.end()) throw Error(std::string("no '") + what + "' entry");
  if (it->second.dtype() != DType::I64 || it->second.shape().size() != 1)
    throw Error(std::string("'") + what + "' is not a list of site numbers");
  std::vector<uint32_t> out;
  for (int64_t v : it->second.to_vector<int64_t>()) {
    if (v < 0 || v >= int64_t(sites))
      throw Error(std::string("'") + what + "' names site number " + std::to_string(v) +
                  " of a round of " + std::to_string(sites));
    out.push_back(uint32_t(v));
  }
  std::vector<uint32_t> sorted = out;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    throw Error(std::string("'") + what + "' names a site twice");
  return out;
}

const Array& entry(const NamedArrays& arrays, const std::string& name, DType dtype) {
  auto it = arrays.find(name);
  if (it == arrays.end()) throw Error("no '" + name + "' entry");
  if (it->second.dtype() != dtype)
    throw Error("'" + name + "' is " + dtype_name(it->second.dtype()) + ", expected " +
                dtype_name(dtype));
  return it->second;
}

// Boxes `box/<peer>` for the peers listed in `peers`.
std::vector<secagg::EncryptedShare> boxes(const NamedArrays& arrays,
                                          const std::vector<uint32_t>& peers, uint32_t self,
                                          bool peers_are_senders) {
  std::vector<secagg::EncryptedShare> out;
  for (uint32_t p : peers) {
    if (p == self) throw Error("a share box addressed from a site to itself");
    const Array& a = entry(arrays, kBoxPrefix + std::to_string(p), DType::U8);
    if (a.nbytes() == 0 || a.nbytes() > kMaxBox)
      throw Error("share box " + std::to_string(p) + " has " + std::to_string(a.nbytes()) +
                  " bytes (1.." + std::to_string(kMaxBox) + " allowed)");
    secagg::EncryptedShare e;
    e.from = peers_are_senders ? p : self;
    e.to = peers_are_senders ? self : p;
    e.box = a.to_vector<uint8_t>();
    out.push_back(std::move(e));
  }
  if (arrays.size() != peers.size() + 1)  // the boxes and the list of peers
    throw Error("unexpected entries beside the share boxes");
  return out;
}

template <class T>
Checked<T> checked_reply(Message&& reply, const char* type, const char* request,
                         const std::function<T(Message&)>& read) {
  if (std::string p = reply_problem(reply, type, request); !p.empty()) return Checked<T>::fail(p);
  try {
    return Checked<T>::of(read(reply));
  } catch (const std::exception& e) {
    return Checked<T>::fail(std::string("malformed ") + type + ": " + e.what());
  }
}

}  // namespace

Message secagg_setup(int64_t round, const secagg::Config& c, uint32_t index) {
  Message m = stamped(kSecAggSetup, round);
  std::vector<int64_t> v{c.sites,      c.neighbours,   c.threshold,           c.length,
                         c.quant_bits, c.modulus_bits, int64_t(c.max_weight), index};
  m.arrays[kSecAggConfig] = Array::from(v, {int64_t(v.size())});
  m.scalars[kSecAggClip] = c.clip;
  m.text[kGraphSeed] = std::to_string(c.graph_seed);
  return m;
}

SecAggSetup read_secagg_setup(const Message& m) {
  check(m);
  if (m.type != kSecAggSetup) throw Error("expected " + std::string(kSecAggSetup));
  const Array& a = entry(m.arrays, kSecAggConfig, DType::I64);
  if (a.numel() != 8) throw Error("'config' must hold 8 numbers");
  const auto v = a.to_vector<int64_t>();
  for (int64_t x : v)
    if (x < 0 || x > (int64_t(1) << 48)) throw Error("'config' holds " + std::to_string(x));
  auto clip = m.scalars.find(kSecAggClip);
  auto seed = m.text.find(kGraphSeed);
  if (clip == m.scalars.end() || seed == m.text.end()) throw Error("no clip or graph seed");
  SecAggSetup s;
  s.config.sites = uint32_t(v[0]);
  s.config.neighbours = uint32_t(v[1]);
  s.config.threshold = uint32_t(v[2]);
  s.config.length = v[3];
  s.config.quant_bits = uint32_t(v[4]);
  s.config.modulus_bits = uint32_t(v[5]);
  s.config.max_weight = uint64_t(v[6]);
  s.config.clip = clip->second;
  try {
    size_t used = 0;
    s.config.graph_seed = std::stoull(seed->second, &used);
    if (used != seed->second.size()) throw Error("");
  } catch (const std::exception&) {
    throw Error("graph seed " + shown(seed->second) + " is not a number");
  }
  s.config.check();
  if (v[7] >= v[0])
    throw Error("site number " + std::to_string(v[7]) + " of a round of " + std::to_string(v[0]));
  s.index = uint32_t(v[7]);
  return s;
}

Message secagg_advert(const std::string& site, int64_t round, const secagg::KeyAdvert& a) {
  Message m = stamped(kSecAggAdvert, round);
  m.site = site;
  m.arrays["cipher_pk"] = Array::from(std::vector<uint8_t>(a.cipher_pk.begin(), a.cipher_pk.end()));
  m.arrays["mask_pk"] = Array::from(std::vector<uint8_t>(a.mask_pk.begin(), a.mask_pk.end()));
  m.scalars["index"] = a.site;
  return m;
}

Checked<secagg::KeyAdvert> read_secagg_advert(Message&& reply, uint32_t index) {
  return checked_reply<secagg::KeyAdvert>(
      std::move(reply), kSecAggAdvert, kSecAggSetup, [&](Message& m) {
        secagg::KeyAdvert a;
        a.site = index;
        for (auto [name, key] :
             {std::pair<const char*, secagg::Bytes32*>{"cipher_pk", &a.cipher_pk},
              {"mask_pk", &a.mask_pk}}) {
          const Array& k = entry(m.arrays, name, DType::U8);
          if (k.numel() != 32) throw Error(std::string(name) + " is not 32 bytes");
          std::copy(k.data<uint8_t>(), k.data<uint8_t>() + 32, key->begin());
        }
        auto it = m.scalars.find("index");
        if (it == m.scalars.end() || it->second != double(index))
          throw Error("the advert is not for site number " + std::to_string(index));
        return a;
      });
}

Message secagg_share_keys(int64_t round, const std::vector<secagg::KeyAdvert>& keys) {
  Message m = stamped(kSecAggShareKeys, round);
  Array k(DType::U8, {int64_t(keys.size()), 64});
  std::vector<uint32_t> sites;
  for (size_t i = 0; i < keys.size(); ++i) {
    std::copy(keys[i].cipher_pk.begin(), keys[i].cipher_pk.end(), k.data<uint8_t>() + 64 * i);
    std::copy(keys[i].mask_pk.begin(), keys[i].mask_pk.end(), k.data<uint8_t>() + 64 * i + 32);
    sites.push_back(keys[i].site);
  }
  m.arrays[kKeys] = k;
  m.arrays[kKeySites] = ints(sites);
  return m;
}

std::vector<secagg::KeyAdvert> read_secagg_share_keys(const Message& m, uint32_t sites) {
  check(m);
  if (m.type != kSecAggShareKeys) throw Error("expected " + std::string(kSecAggShareKeys));
  const auto who = site_numbers(m.arrays, kKeySites, sites);
  const Array& k = entry(m.arrays, kKeys, DType::U8);
  if (k.shape() != std::vector<int64_t>{int64_t(who.size()), 64})
    throw Error("'keys' is not one 64-byte row per site");
  std::vector<secagg::KeyAdvert> out(who.size());
  for (size_t i = 0; i < who.size(); ++i) {
    out[i].site = who[i];
    const uint8_t* row = k.data<uint8_t>() + 64 * i;
    std::copy(row, row + 32, out[i].cipher_pk.begin());
    std::copy(row + 32, row + 64, out[i].mask_pk.begin());
  }
  return out;
}

Message secagg_shares(const std::string& site, int64_t round, const secagg::ShareKeys& shares) {
  Message m = stamped(kSecAggShares, round);
  m.site = site;
  std::vector<uint32_t> to;
  for (const auto& e : shares.shares) {
    to.push_back(e.to);
    m.arrays[kBoxPrefix + std::to_string(e.to)] = Array::from(e.box, {int64_t(e.box.size())});
  }
  m.arrays[kTo] = ints(to);
  return m;
}

Checked<secagg::ShareKeys> read_secagg_shares(Message&& reply, uint32_t index, uint32_t sites) {
  return checked_reply<secagg::ShareKeys>(
      std::move(reply), kSecAggShares, kSecAggShareKeys, [&](Message& m) {
        secagg::ShareKeys k;
        k.site = index;
        k.shares = boxes(m.arrays, site_numbers(m.arrays, kTo, sites), index, false);
        return k;
      });
}

Message secagg_train(int64_t round, const std::map<std::string, double>& settings,
                     const secagg::ShareDelivery& delivery) {
  Message m = stamped(kSecAggTrain, round);
  m.scalars = settings;
  m.arrays[kSharing] = ints(delivery.sharing);
  std::vector<uint32_t> from;
  for (const auto& e : delivery.shares) {
    from.push_back(e.from);
    m.arrays[kBoxPrefix + std::to_string(e.from)] = Array::from(e.box, {int64_t(e.box.size())});
  }
  m.arrays[kFrom] = ints(from);
  return m;
}

SecAggTrain read_secagg_train(const Message& m, uint32_t index, uint32_t sites) {
  if (m.type != kSecAggTrain) throw Error("expected " + std::string(kSecAggTrain));
  Message as_train = m;  // the settings are read as a train request's
  as_train.type = kTrain;
  as_train.arrays.clear();
  SecAggTrain t;
  t.settings = read_train_request(as_train);
  t.delivery.sharing = site_numbers(m.arrays, kSharing, sites);
  NamedArrays rest = m.arrays;
  rest.erase(kSharing);
  t.delivery.shares = boxes(rest, site_numbers(rest, kFrom, sites), index, true);
  return t;
}

Message secagg_masked(const std::string& site, int64_t round, const secagg::MaskedInput& input,
                      double train_loss, int64_t steps) {
  Message m = stamped(kSecAggMasked, round);
  m.site = site;
  Array a(DType::I64, {int64_t(input.values.size())});
  std::memcpy(a.raw(), input.values.data(), a.nbytes());
  m.arrays[kMasked] = a;
  m.scalars[kTrainLoss] = train_loss;
  m.scalars[kSteps] = double(steps);
  return m;
}

Checked<SecAggMasked> read_secagg_masked(Message&& reply, uint32_t index,
                                         const secagg::Config& config) {
  return checked_reply<SecAggMasked>(
      std::move(reply), kSecAggMasked, kSecAggTrain, [&](Message& m) {
        const Array& a = entry(m.arrays, kMasked, DType::I64);
        if (a.shape() != std::vector<int64_t>{config.length + 1})
          throw Error("the masked input holds " + std::to_string(a.numel()) + " words, expected " +
                      std::to_string(config.length + 1));
        SecAggMasked out;
        out.input.site = index;
        out.input.values.resize(size_t(a.numel()));
        std::memcpy(out.input.values.data(), a.raw(), a.nbytes());
        if (config.modulus_bits < 64)
          for (uint64_t w : out.input.values)
            if (w >> config.modulus_bits)
              throw Error("a masked word is not below 2^" + std::to_string(config.modulus_bits));
        auto loss = m.scalars.find(kTrainLoss);
        if (loss == m.scalars.end() || !std::isfinite(loss->second))
          throw Error("no finite train_loss");
        out.train_loss = loss->second;
        return out;
      });
}

Message secagg_unmask(int64_t round, const secagg::UnmaskRequest& request) {
  Message m = stamped(kSecAggUnmask, round);
  m.arrays[kSurvivors] = ints(request.survivors);
  m.arrays[kDropped] = ints(request.dropped);
  return m;
}

secagg::UnmaskRequest read_secagg_unmask(const Message& m, uint32_t sites) {
  check(m);
  if (m.type != kSecAggUnmask) throw Error("expected " + std::string(kSecAggUnmask));
  secagg::UnmaskRequest r;
  r.survivors = site_numbers(m.arrays, kSurvivors, sites);
  r.dropped = site_numbers(m.arrays, kDropped, sites);
  return r;
}

Message secagg_reveal(const std::string& site, int64_t round, const secagg::UnmaskReply& reply) {
  Message m = stamped(kSecAggReveal, round);
  m.site = site;
  const int64_t s = int64_t(reply.shares.size());
  std::vector<int64_t> owner;
  std::vector<uint8_t> x, key;
  Array share(DType::U8, {s, 32});
  for (int64_t i = 0; i < s; ++i) {
    const auto& r = reply.shares[size_t(i)];
    owner.push_back(r.owner);
    x.push_back(r.x);
    key.push_back(r.mask_key ? 1 : 0);
    std::copy(r.share.begin(), r.share.end(), share.data<uint8_t>() + 32 * i);
  }
  m.arrays[kOwner] = Array::from(owner, {s});
  m.arrays[kShareX] = Array::from(x, {s});
  m.arrays[kMaskKey] = Array::from(key, {s});
  m.arrays[kShare] = share;
  return m;
}

Checked<secagg::UnmaskReply> read_secagg_reveal(Message&& reply, uint32_t index, uint32_t sites) {
  return checked_reply<secagg::UnmaskReply>(
      std::move(reply), kSecAggReveal, kSecAggUnmask, [&](Message& m) {
        const Array& owner = entry(m.arrays, kOwner, DType::I64);
        const Array& x = entry(m.arrays, kShareX, DType::U8);
        const Array& key = entry(m.arrays, kMaskKey, DType::U8);
        const Array& share = entry(m.arrays, kShare, DType::U8);
        const int64_t s = owner.numel();
        if (x.numel() != s || key.numel() != s || share.shape() != std::vector<int64_t>{s, 32} ||
            s > int64_t(sites))
          throw Error("the revealed shares' lists differ in length");
        secagg::UnmaskReply r;
        r.site = index;
        for (int64_t i = 0; i < s; ++i) {
          secagg::RevealedShare one;
          const int64_t o = owner.data<int64_t>()[i];
          if (o < 0 || o >= int64_t(sites))
            throw Error("a share of site number " + std::to_string(o));
          one.owner = uint32_t(o);
          one.x = x.data<uint8_t>()[i];
          one.mask_key = key.data<uint8_t>()[i] != 0;
          std::copy(share.data<uint8_t>() + 32 * i, share.data<uint8_t>() + 32 * (i + 1),
                    one.share.begin());
          r.shares.push_back(one);
        }
        return r;
      });
}

namespace {
const std::string kGlobalPrefix = "global/", kAggregatorPrefix = "aggregator/",
                  kPrivacyPrefix = "privacy/", kSitePrefix = "site/", kLocal = "/local/",
                  kStore = "/store/", kTrainedSuffix = "/trained";
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
  for (const auto& [k, v] : c.privacy) m.arrays[kPrivacyPrefix + k] = v;
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
    } else if (starts_with(k, kPrivacyPrefix)) {
      c.privacy[k.substr(kPrivacyPrefix.size())] = copy;
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
