// Aggregation throughput of every aggregator plugin, as a ratio to the memory-bandwidth floor:
// one summing pass over all site updates (each float read once), measured in the same run.
//
//   bench_aggregation [--sites 8] [--params 10000000] [--reps 5] [--krum-only] [--no-krum]
//
// Prints one table row per aggregator (best of --reps after one warm-up call), then Krum's
// O(n^2 d) cost at 8, 32 and 128 sites (128 with d = 1e6 to fit memory).
#include <concord/aggregator.h>
#include <concord/registry.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "aggregation.h"

using namespace concord;
using Clock = std::chrono::steady_clock;

namespace {

// A conv-net-like shared state of about `params` floats: 10 kernels [rows, cols, 3, 3] and a
// BatchNorm counter. Values are a cheap hash of (site, index), so building 1e8 floats is fast.
NamedArrays make_state(int64_t params, uint64_t site) {
  NamedArrays s;
  const int64_t per = params / 10, rows = 1000, cols = std::max<int64_t>(1, per / (rows * 9));
  for (int t = 0; t < 10; ++t) {
    Array a = Array::uninitialized(DType::F32, {rows, cols, 3, 3});
    float* p = a.data<float>();
    uint64_t x = 0x9E3779B97F4A7C15ull * (site + 1) + t;
    for (int64_t k = 0; k < a.numel(); ++k) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      p[k] = 1.0f + 0.01f * (float((x >> 40) & 0xFFFF) / 65536.0f - 0.5f);
    }
    s["layer" + std::to_string(t) + ".weight"] = std::move(a);
  }
  s["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{int64_t(site)});
  return s;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

template <class F>
double best_of(int reps, F&& f) {
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

volatile double sink;

double floor_seconds(const std::vector<SiteUpdate>& ups, int reps) {
  return best_of(reps, [&] {
    double total = 0;
    for (const auto& u : ups)
      for (const auto& [name, a] : u.state)
        if (a.dtype() == DType::F32) total += agg::sum(a.data<float>(), a.numel());
    sink = total;
  });
}

std::vector<SiteUpdate> make_updates(int sites, int64_t params) {
  std::vector<SiteUpdate> ups(sites);
  for (int s = 0; s < sites; ++s) {
    ups[s].site = "site" + std::to_string(s);
    ups[s].state = make_state(params, s + 1);
    ups[s].num_samples = 100 + s;
    ups[s].train_loss = 0.5 + 0.01 * s;
  }
  return ups;
}

int64_t float_count(const NamedArrays& s) {
  int64_t n = 0;
  for (const auto& [name, a] : s)
    if (a.dtype() == DType::F32) n += a.numel();
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  int sites = 8, reps = 5;
  int64_t params = 10000000;
  bool krum_only = false, no_krum = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--sites" && i + 1 < argc)
      sites = std::stoi(argv[++i]);
    else if (a == "--params" && i + 1 < argc)
      params = std::stoll(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::stoi(argv[++i]);
    else if (a == "--krum-only")
      krum_only = true;
    else if (a == "--no-krum")
      no_krum = true;
    else {
      std::fprintf(stderr,
                   "usage: %s [--sites N] [--params D] [--reps R] [--krum-only|--no-krum]\n",
                   argv[0]);
      return 2;
    }
  }
  spdlog::set_level(spdlog::level::warn);  // krum logs its selection every call
  Registry registry;
  for (const auto& f : load_plugins(registry, {}))
    std::fprintf(stderr, "warning: could not load %s: %s\n", f.file.c_str(), f.reason.c_str());
  auto build = [&](const std::string& name) {
    const auto& desc = registry.get(Kind::Aggregator, name);
    return registry.create<Aggregator>(Kind::Aggregator, name, make_args(name, desc.args));
  };

  if (!krum_only) {
    const auto ups = make_updates(sites, params);
    const NamedArrays global = make_state(params, 0);
    const int64_t d = float_count(global);
    const double floor_s = floor_seconds(ups, reps);
    const double gbps = double(sites) * d * 4 / floor_s / 1e9;
    std::printf("%d sites x %lld float parameters (%.0f MB of updates), best of %d\n", sites,
                (long long)d, double(sites) * d * 4 / 1e6, reps);
    std::printf("floor (one summing pass over every update): %.1f ms = %.1f GB/s\n\n",
                floor_s * 1e3, gbps);
    std::printf("%-20s %10s %8s %8s\n", "aggregator", "ms", "x floor", "target");
    const std::vector<std::pair<std::string, const char*>> rows = {
        {"fedavg", "3"},       {"fedprox", "3"},    {"fedadam", "3"},
        {"fedyogi", "3"},      {"fedadagrad", "3"}, {"loss-weighted", "3"},
        {"trimmed-mean", "3"}, {"median", "10"},    {"outlier-suppression", "-"},
        {"krum", "-"},         {"multi-krum", "-"}, {"fourier", "-"}};
    for (const auto& [name, target] : rows) {
      auto agg = build(name);
      RoundInfo round{1, 10, 0};
      NamedArrays out = agg->aggregate(global, ups, round);  // warm-up (fedopt allocates moments)
      const double t = best_of(reps, [&] { out = agg->aggregate(global, ups, round); });
      std::printf("%-20s %10.1f %8.2f %8s\n", name.c_str(), t * 1e3, t / floor_s, target);
      std::fflush(stdout);
    }
  }

  if (!no_krum) {
    std::printf("\nkrum: n(n-1)/2 pairwise distances, O(n^2 d)\n");
    std::printf("%6s %10s %10s %10s %12s\n", "sites", "d", "ms", "x floor", "ns/(n^2 d/2)");
    const std::vector<std::pair<int, int64_t>> sizes = {
        {8, params}, {32, params}, {128, std::min<int64_t>(params, 1000000)}};
    for (const auto& [n, dd] : sizes) {
      const auto ups = make_updates(n, dd);
      const NamedArrays global = make_state(dd, 0);
      const int64_t d = float_count(global);
      const int r = n >= 32 ? std::min(reps, 2) : reps;
      const double floor_s = floor_seconds(ups, r);
      auto agg = build("krum");
      const double t = best_of(r, [&] { agg->aggregate(global, ups, {1, 1, 0}); });
      std::printf("%6d %10lld %10.1f %10.2f %12.3f\n", n, (long long)d, t * 1e3, t / floor_s,
                  t * 1e9 / (double(n) * (n - 1) / 2 * d));
      std::fflush(stdout);
    }
  }
  return 0;
}
