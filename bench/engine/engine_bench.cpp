// Engine overhead of one federated round with no-op local training, as a ratio to memcpy of the
// same bytes measured in the same run; and peak memory with 1000 sites, 1% sampled per round.
//
//   bench_engine [--sites 8] [--params 10000000] [--reps 5]
//   bench_engine --scale [--sites 1000] [--params 1000000] [--fraction 0.01] [--rounds 10]
//
// The coordinator side is the real engine (Coordinator: select, train request, upload decode,
// non-finite check, fedavg plugin, broadcast) over the real in-process Channel (encode/decode).
// Sites are real Channel endpoints whose local training is a no-op: they upload what they got.
#include <concord/engine.h>
#include <concord/protocol.h>
#include <concord/registry.h>

#include "../common/noop_federation.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace concord;
using Clock = std::chrono::steady_clock;

namespace {

using bench::NoopSite;

std::vector<std::string> connect_sites(InProcessChannel& ch, int sites,
                                       std::vector<std::unique_ptr<NoopSite>>& owned) {
  std::vector<std::string> names;
  for (int i = 0; i < sites; ++i) {
    owned.push_back(std::make_unique<NoopSite>());
    NoopSite* s = owned.back().get();
    s->name = "site-" + std::to_string(i);
    ch.connect(s->name, [s](const Bytes& b) { return s->handle(b); });
    names.push_back(s->name);
  }
  return names;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

long peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024;
}

using bench::fedavg;
using bench::model;

int overhead(int sites, int64_t params, int reps) {
  Registry reg;
  auto agg = fedavg(reg);
  InProcessChannel ch;
  std::vector<std::unique_ptr<NoopSite>> ss;
  std::vector<std::string> names = connect_sites(ch, sites, ss);
  Coordinator c(ch, 1);
  c.set_global(model(params));
  const size_t bytes = size_t(params) * 4;

  // Baseline: memcpy of every upload's bytes (sites x model), into fresh-but-touched buffers.
  std::vector<std::vector<float>> src(sites, std::vector<float>(size_t(params), 1.f));
  std::vector<std::vector<float>> dst(sites, std::vector<float>(size_t(params), 0.f));
  double best_memcpy = 1e9, best_round = 1e9;
  c.broadcast(0, names);
  for (int r = 1; r <= reps; ++r) {
    auto t = Clock::now();
    for (int i = 0; i < sites; ++i) std::memcpy(dst[i].data(), src[i].data(), bytes);
    best_memcpy = std::min(best_memcpy, seconds_since(t));

    t = Clock::now();
    auto sel = c.select(r, names, 1.0, 1.0, {});
    auto out = c.train_round(*agg, r, reps, sel, {}, 1);
    double t_train = seconds_since(t);
    c.broadcast(r, names);
    best_round = std::min(best_round, seconds_since(t));
    if (getenv("BENCH_VERBOSE"))
      std::fprintf(stderr, "train_round %.1f ms, total %.1f ms\n", t_train * 1e3,
                   seconds_since(t) * 1e3);
    if (!out.aggregated || out.updates.size() != size_t(sites)) {
      std::fprintf(stderr, "round %d failed\n", r);
      return 1;
    }
  }
  double ratio = best_round / best_memcpy;
  std::printf("engine round: %d sites x %lld float32 params (%.0f MB per site)\n", sites,
              (long long)params, bytes / 1e6);
  std::printf("  memcpy of %d x %.0f MB (baseline): %8.1f ms\n", sites, bytes / 1e6,
              best_memcpy * 1e3);
  std::printf(
      "  round (select, train request, %d uploads encoded/decoded, finite check, fedavg,\n"
      "         broadcast encoded once to %d sites):   %8.1f ms\n",
      sites, sites, best_round * 1e3);
  std::printf("  ratio round / memcpy: %.2fx (target <= 3x): %s\n", ratio,
              ratio <= 3 ? "met" : "MISSED");
  std::printf("  peak RSS: %ld MB\n", peak_rss_mb());
  return 0;
}

int scale(int sites, int64_t params, double fraction, int rounds) {
  Registry reg;
  auto agg = fedavg(reg);
  InProcessChannel ch;
  std::vector<std::unique_ptr<NoopSite>> ss;
  std::vector<std::string> names = connect_sites(ch, sites, ss);
  Coordinator c(ch, 1);
  c.set_global(model(params));
  auto t = Clock::now();
  c.broadcast(0, names);
  size_t trained = 0;
  for (int r = 1; r <= rounds; ++r) {
    auto sel = c.select(r, names, fraction, 1.0, {});
    auto out = c.train_round(*agg, r, rounds, sel, {}, 1);
    trained += out.updates.size();
    c.broadcast(r, names);
  }
  long rss = peak_rss_mb();
  std::printf(
      "scale: %d sites, %lld params (%.1f MB model), %.0f%% sampled, %d rounds: "
      "%zu site updates, %.2f s\n",
      sites, (long long)params, params * 4 / 1e6, fraction * 100, rounds, trained,
      seconds_since(t));
  std::printf("  peak RSS: %ld MB (target < 2048 MB): %s\n", rss, rss < 2048 ? "met" : "MISSED");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool scale_mode = false;
  int sites = -1, reps = 5, rounds = 10;
  int64_t params = -1;
  double fraction = 0.01;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--scale")
      scale_mode = true;
    else if (a == "--sites")
      sites = std::stoi(next());
    else if (a == "--params")
      params = std::stoll(next());
    else if (a == "--reps")
      reps = std::stoi(next());
    else if (a == "--rounds")
      rounds = std::stoi(next());
    else if (a == "--fraction")
      fraction = std::stod(next());
    else {
      std::fprintf(stderr,
                   "usage: bench_engine [--scale] [--sites N] [--params N] [--reps N] "
                   "[--rounds N] [--fraction F]\n");
      return 2;
    }
  }
  if (scale_mode)
    return scale(sites < 0 ? 1000 : sites, params < 0 ? 1000000 : params, fraction, rounds);
  return overhead(sites < 0 ? 8 : sites, params < 0 ? 10000000 : params, reps);
}
