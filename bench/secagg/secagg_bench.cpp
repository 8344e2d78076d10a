// Secure aggregation (concord/secagg.h) against plain FedAvg's sum over the same updates, as
// ratios measured in the same run.
//
//   bench_secagg [--params 1000000] [--sites 8,32] [--reps 2] [--config both|library|pipeline]
//
// For each site count: the plain baseline (sum of weight * value over every site in float64, what
// a FedAvg aggregation does per parameter), then one whole SecAgg round with each configuration:
// `library` is Config::defaults (k neighbours, threshold, 16-bit quantization, modulus 2^32 for
// weights up to 1000); `pipeline` is what a pipeline's `secure_aggregation: {}` gives under
// weighted FedAvg (secure_round_config: range 64, 24 bits, weights up to 2^20, modulus 2^64):
// every site's work (keys, shares, quantize + mask), the coordinator's work (running sum,
// rebuilding seeds, removing masks, decoding), and the same round with one site dropping after
// sharing keys (its pairwise masks rebuilt from shares). Sites run one after another on one core
// here; in a deployment they run in parallel, so the per-site column is the added latency at a
// site and the coordinator column the added latency at the server.
#include <concord/pipeline.h>
#include <concord/secagg.h>
#include <concord/seed.h>

#include "secure_round.h"  // core/src: secure_round_config, as a run builds it

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace concord;
using namespace concord::secagg;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Timing {
  double sites = 0;        // all sites' work, summed
  double coordinator = 0;  // the coordinator's work
};

Timing secure_round(const Config& c, const std::vector<std::vector<float>>& x, uint32_t drop,
                    uint64_t seed) {
  Timing t;
  std::vector<Site> sites;
  Coordinator coord(c);
  auto t0 = Clock::now();
  for (uint32_t u = 0; u < c.sites; ++u)
    sites.emplace_back(c, u, simulation_secret(seed, "site-" + std::to_string(u), 1));
  std::vector<KeyAdvert> adverts;
  for (auto& s : sites) adverts.push_back(s.advertise());
  t.sites += since(t0);
  t0 = Clock::now();
  for (const auto& a : adverts) coord.add_advert(a);
  std::vector<std::vector<KeyAdvert>> keys;
  for (uint32_t u = 0; u < c.sites; ++u) keys.push_back(coord.keys_for(u));
  t.coordinator += since(t0);
  for (uint32_t u = 0; u < c.sites; ++u) {
    t0 = Clock::now();
    ShareKeys sk = sites[u].share_keys(keys[u]);
    t.sites += since(t0);
    t0 = Clock::now();
    coord.add_shares(sk);
    t.coordinator += since(t0);
  }
  for (uint32_t u = 0; u < c.sites; ++u) {
    if (u == drop) continue;
    t0 = Clock::now();
    const ShareDelivery d = coord.delivery_for(u);
    t.coordinator += since(t0);
    t0 = Clock::now();
    const MaskedInput in = sites[u].masked_input(d, x[u].data(), c.length, 1 + u);
    t.sites += since(t0);
    t0 = Clock::now();
    coord.add_masked_input(in);
    t.coordinator += since(t0);
  }
  t0 = Clock::now();
  const UnmaskRequest req = coord.unmask_request();
  t.coordinator += since(t0);
  std::vector<UnmaskReply> replies;
  t0 = Clock::now();
  for (uint32_t u : req.survivors) replies.push_back(sites[u].unmask(req));
  t.sites += since(t0);
  t0 = Clock::now();
  for (const auto& r : replies) coord.add_unmask_reply(r);
  const Aggregate a = coord.finish();
  t.coordinator += since(t0);
  if (a.weighted_sum.size() != size_t(c.length)) std::abort();
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t params = 1000000;
  int reps = 2;
  std::vector<uint32_t> site_counts = {8, 32};
  std::string which = "both";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--params")
      params = std::stoll(v);
    else if (a == "--reps")
      reps = std::stoi(v);
    else if (a == "--config" && (v == "both" || v == "library" || v == "pipeline"))
      which = v;
    else if (a == "--sites") {
      site_counts.clear();
      std::stringstream ss(v);
      for (std::string p; std::getline(ss, p, ',');) site_counts.push_back(uint32_t(std::stoul(p)));
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  std::printf("secure aggregation vs plain weighted sum, %lld float parameters, best of %d\n",
              (long long)params, reps);
  std::printf("%-8s %5s %4s %3s %5s %10s %12s %10s %11s %9s %9s %10s %10s\n", "config", "sites",
              "k", "t", "bits", "plain ms", "secagg ms", "x plain", "site ms", "x plain",
              "coord ms", "x plain", "1 drop x");
  for (uint32_t n : site_counts) {
    SeededRandom rng(n);
    std::vector<std::vector<float>> x(n, std::vector<float>(size_t(params)));
    for (auto& v : x)
      for (auto& e : v) e = float(rng.uniform(-0.5, 0.5));
    std::vector<std::pair<std::string, Config>> configs;
    if (which != "pipeline")  // weights 1 + u, as in the plain sum
      configs.emplace_back("library", Config::defaults(n, params, 7, 1000));
    if (which != "library")
      configs.emplace_back("pipeline", secure_round_config(PipelineConfig::SecureAggregation{}, n,
                                                           params, 7, /*equal_weights=*/false));
    double plain = 1e300;
    std::vector<double> sum(static_cast<size_t>(params));
    for (int r = 0; r < 10 * reps; ++r) {  // cheap and noisy: more repetitions
      const auto t0 = Clock::now();
      std::fill(sum.begin(), sum.end(), 0.0);
      for (uint32_t u = 0; u < n; ++u) {
        const double w = 1 + u;
        const float* p = x[u].data();
        for (int64_t j = 0; j < params; ++j) sum[size_t(j)] += w * double(p[j]);
      }
      plain = std::min(plain, since(t0));
    }
    for (const auto& [name, c] : configs) {
      Timing best{1e300, 1e300};
      double best_total = 1e300, drop_total = 1e300;
      for (int r = 0; r < reps; ++r) {
        const Timing t = secure_round(c, x, n, 100 + r);  // n: nobody drops
        if (t.sites + t.coordinator < best_total) best = t, best_total = t.sites + t.coordinator;
        const Timing d = secure_round(c, x, 0, 200 + r);
        drop_total = std::min(drop_total, d.sites + d.coordinator);
      }
      const double per_site = best.sites / n;
      std::printf("%-8s %5u %4u %3u %5u %10.1f %12.1f %10.1f %11.1f %9.1f %9.1f %10.1f %10.1f\n",
                  name.c_str(), n, c.degree(), c.threshold, c.quant_bits, plain * 1e3,
                  best_total * 1e3, best_total / plain, per_site * 1e3, per_site / plain,
                  best.coordinator * 1e3, best.coordinator / plain, drop_total / plain);
    }
  }
  std::printf(
      "x plain: ratio to the plain sum of all n updates; site: one site's work (sites run "
      "in parallel in a deployment); 1 drop: whole round with site 0 dropping after "
      "sharing keys.\nUpload: 4 bytes per value with modulus 2^32 (library), 8 with 2^64 "
      "(pipeline, weighted FedAvg), against 4 for float32.\n");
  return 0;
}
