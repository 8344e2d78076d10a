// The coordinator's five steps over a Channel. Torch-free: it only moves named arrays.
#include <concord/engine.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <random>

namespace concord {

uint64_t derive_seed(uint64_t seed, const std::string& label, int64_t n) {
  // FNV-1a over the label, mixed with splitmix64: stable across platforms and runs.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : label) h = (h ^ c) * 1099511628211ull;
  uint64_t z = seed ^ h ^ (uint64_t(n) * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Coordinator::Coordinator(Channel& channel, Aggregator& aggregator, uint64_t seed)
    : channel_(channel), aggregator_(aggregator), seed_(seed) {}

std::vector<std::string> Coordinator::select(
    int round, const std::vector<std::string>& candidates, double fraction, double availability,
    const std::map<std::string, double>& site_availability) const {
  std::vector<std::string> available;
  for (const auto& site : candidates) {
    auto it = site_availability.find(site);
    double p = it == site_availability.end() ? availability : it->second;
    std::mt19937_64 rng(derive_seed(seed_, "availability/" + site, round));
    if (p >= 1.0 || std::uniform_real_distribution<double>(0, 1)(rng) < p)
      available.push_back(site);
  }
  if (available.empty()) return available;
  size_t want = size_t(std::ceil(fraction * double(available.size()) - 1e-9));
  want = std::clamp<size_t>(want, 1, available.size());
  std::mt19937_64 rng(derive_seed(seed_, "select", round));
  std::shuffle(available.begin(), available.end(), rng);
  available.resize(want);
  // Keep the candidates' order so logs and training order are stable.
  std::vector<std::string> out;
  for (const auto& s : candidates)
    if (std::find(available.begin(), available.end(), s) != available.end()) out.push_back(s);
  return out;
}

static bool all_finite(const NamedArrays& state, std::string* bad) {
  for (const auto& [name, a] : state) {
    if (a.dtype() == DType::F32) {
      // Exponent bits all ones <=> Inf or NaN; an OR-reduction over integers vectorises.
      const uint32_t* p = static_cast<const uint32_t*>(a.raw());
      uint32_t any = 0;
      for (int64_t i = 0, n = a.numel(); i < n; ++i)
        any |= uint32_t((p[i] & 0x7f800000u) == 0x7f800000u);
      if (any) return *bad = name, false;
    } else if (a.dtype() == DType::F64) {
      const double* p = a.data<double>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i)
        if (!std::isfinite(p[i])) return *bad = name, false;
    }
  }
  return true;
}

Coordinator::RoundOutcome Coordinator::train_round(
    int round, int rounds, const std::vector<std::string>& selected,
    const std::map<std::string, double>& settings, int min_sites,
    const std::function<void(const std::string&, size_t, size_t)>& on_site) {
  RoundOutcome out;
  Message req;
  req.type = "train";
  req.round = round;
  req.scalars = settings;
  Bytes request = encode(req);
  for (size_t k = 0; k < selected.size(); ++k) {
    const std::string& site = selected[k];
    if (on_site) on_site(site, k, selected.size());
    // Step 2 (local training) runs at the site; step 3 (upload) is its reply.
    try {
      Message reply = decode(channel_.call(site, request));
      if (reply.type != "update") throw SiteError(site, "replied '" + reply.type + "' to train");
      std::string bad;
      if (!all_finite(reply.arrays, &bad)) {
        spdlog::error("round {}: rejected the update of site '{}': non-finite values in '{}'",
                      round, site, bad);
        out.failures.push_back("site '" + site + "': non-finite values in '" + bad +
                               "' (rejected)");
        continue;
      }
      for (const auto& [name, g] : global_)
        if (!reply.arrays.count(name))
          throw SiteError(site, "update lacks shared entry '" + name + "'");
      SiteUpdate u;
      u.site = site;
      u.state = std::move(reply.arrays);
      u.num_samples = reply.scalars["num_samples"];
      u.train_loss = reply.scalars["train_loss"];
      u.scalars = std::move(reply.scalars);
      out.updates.push_back(std::move(u));
    } catch (const std::exception& e) {
      std::string what = e.what();
      spdlog::error("round {}: {}", round, what);
      out.failures.push_back(what);
    }
  }
  // Step 4: aggregate, only with enough replies.
  if (int(out.updates.size()) < min_sites) {
    spdlog::warn("round {}: only {} of the required {} sites replied; global model unchanged",
                 round, out.updates.size(), min_sites);
    return out;
  }
  global_ = aggregator_.aggregate(global_, out.updates, RoundInfo{round, rounds, seed_});
  out.aggregated = true;
  return out;
}

void Coordinator::broadcast(int round, const std::vector<std::string>& sites) {
  Message m;
  m.type = "broadcast";
  m.round = round;
  m.arrays = global_;
  Bytes bytes = encode(m);  // encoded once, the same bytes go to every site
  for (const auto& site : sites) {
    try {
      channel_.call(site, bytes);
    } catch (const std::exception& e) {
      spdlog::error("round {}: broadcast to {}", round, e.what());
    }
  }
}

Message Coordinator::call(const std::string& site, const Message& request) {
  return decode(channel_.call(site, encode(request)));
}

}  // namespace concord
