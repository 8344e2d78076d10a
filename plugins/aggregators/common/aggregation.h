// Building blocks shared by the aggregator plugins: structural checks, the non-finite guard,
// blocked traversal of the float32 tensors of all sites, and the per-block kernels.
//
// Layout: a "block" is up to kBlock consecutive coordinates of one float32 tensor. Every kernel
// works on one block of every selected site at a time, so the n site rows of a block (8 sites x
// 8 KiB) stay in L2 while the finiteness check, the sort or the accumulation touch them.
//
// The non-finite guard is fused with the traversal: each block of each site is checked just
// before it is used. A hit aborts the pass; run_finite() logs the site and round, drops the site
// and runs the pass again from scratch. Passes therefore write only their own outputs.
#pragma once

#include <concord/aggregator.h>
#include <concord/error.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

// Hot loops get an AVX2 clone chosen at load time, and the SSE2 baseline elsewhere.
#define CONCORD_AGG_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))

namespace concord::agg {

constexpr int64_t kBlock = 2048;

// ---- kernels (contiguous float arrays; no aliasing between outputs and inputs) -------------

bool all_finite(const float* x, int64_t n);
void scale_into(float* out, const float* x, float c, int64_t n);  // out = c x
void add_scaled(float* out, const float* x, float c, int64_t n);  // out += c x
// Sum of squared differences, accumulated in 16 float lanes per block and returned as double.
double squared_distance(const float* a, const float* b, int64_t n);
double sum(const float* x, int64_t n);

// Comparators (i < j) of Batcher's odd-even merge sort for n items: the network for the next
// power of two with every comparator that touches a padding position dropped (padding acts as
// +inf, which never moves, so the result still sorts).
std::vector<std::pair<int, int>> sorting_network(int n);
// Sorts each column of an n-row table in place (row r starts at rows + r * stride).
void sort_columns(float* rows, int64_t stride, int64_t len,
                  const std::vector<std::pair<int, int>>& network);
// out[k] = mean of rows [from, to) at column k.
void mean_of_rows(const float* rows, int64_t stride, int from, int to, int64_t len, float* out);

// ---- validation, weights, logging ----------------------------------------------------------

// Throws Error (naming plugin, round, site, tensor) when an update lacks a tensor of `global`
// or carries it with another dtype or shape.
void check_structure(const char* plugin, const NamedArrays& global,
                     const std::vector<SiteUpdate>& updates, const RoundInfo& round);
// The update was rejected: one spdlog error line naming plugin, site and round.
void log_rejected(const char* plugin, const SiteUpdate& update, const RoundInfo& round,
                  const std::string& why);
// Indices of every update, minus those with a non-finite value in a non-float32 floating array
// (float32 tensors are checked block by block during the passes).
std::vector<size_t> initial_selection(const char* plugin, const NamedArrays& global,
                                      const std::vector<SiteUpdate>& updates,
                                      const RoundInfo& round);
// Base weight of each update: num_samples ("samples") or 1 ("uniform"). Throws on a negative or
// non-finite num_samples.
std::vector<double> base_weights(const char* plugin, const std::string& weighting,
                                 const std::vector<SiteUpdate>& updates, const RoundInfo& round);
// weights[selected[s]] / total, as float coefficients; throws when the total is not positive.
std::vector<float> coefficients(const char* plugin, const std::vector<double>& weights,
                                const std::vector<size_t>& selected, const RoundInfo& round);

// ---- the float32 tensors of one aggregate() call -------------------------------------------

struct Tensors {
  std::vector<const std::string*> names;
  std::vector<const Array*> global;
  std::vector<float*> out;  // freshly allocated outputs, placed in the caller's NamedArrays
  std::vector<int64_t> numel;
  std::vector<std::vector<const float*>> site;  // [tensor][selected site]
};
// Allocates an output for every float32 tensor of `global` in `out` and gathers the selected
// sites' data pointers. Non-float32 arrays are merged into `out` by element-wise maximum.
// With with_outputs = false nothing is allocated (passes that only read, like Krum's distances).
Tensors gather(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
               const std::vector<size_t>& selected, NamedArrays& out, bool with_outputs = true);
// Element-wise maximum over the selected updates of every non-float32 array of `global`
// (BatchNorm's int64 num_batches_tracked: the most trained site's count).
void merge_non_float(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                     const std::vector<size_t>& selected, NamedArrays& out);
// Deep copy of `global`, logged: what aggregate() returns when no update is usable.
NamedArrays keep_global(const char* plugin, const NamedArrays& global, const RoundInfo& round);

// A non-finite value met during a pass: the selected position of the site, and the tensor.
struct Hit {
  int pos = -1;
  std::string tensor;
};

// Visits every block of every tensor: visit(tensor, offset, len, rows) with rows[s] pointing at
// selected site s's values at `offset`. Each row is checked finite first; returns the first hit.
template <class Visit>
Hit visit_blocks(const Tensors& t, Visit&& visit) {
  const size_t n = t.site.empty() ? 0 : t.site.front().size();
  std::vector<const float*> rows(n);
  for (size_t i = 0; i < t.numel.size(); ++i) {
    for (int64_t off = 0; off < t.numel[i]; off += kBlock) {
      const int64_t len = std::min(kBlock, t.numel[i] - off);
      for (size_t s = 0; s < n; ++s) {
        rows[s] = t.site[i][s] + off;
        if (!all_finite(rows[s], len)) return {static_cast<int>(s), *t.names[i]};
      }
      visit(i, off, len, rows.data());
    }
  }
  return {};
}

// Like visit_blocks, but first copies the block of every site into a scratch table (row s at
// table + s * kBlock) and sorts its columns: visit(tensor, offset, len, table, rows).
template <class Visit>
Hit visit_sorted(const Tensors& t, Visit&& visit) {
  const int n = t.site.empty() ? 0 : static_cast<int>(t.site.front().size());
  const auto network = sorting_network(n);
  std::vector<float> table(static_cast<size_t>(n) * kBlock);
  return visit_blocks(t, [&](size_t i, int64_t off, int64_t len, const float* const* rows) {
    for (int s = 0; s < n; ++s) std::copy(rows[s], rows[s] + len, table.data() + s * kBlock);
    sort_columns(table.data(), kBlock, len, network);
    visit(i, off, len, static_cast<const float*>(table.data()), rows);
  });
}

// Coordinate-wise mean of the sorted values at ranks [ranks(n).first, ranks(n).second) over the
// finite updates (median, trimmed mean). Returns the sites used; empty: `out` is global's copy.
std::vector<size_t> rank_mean(const char* plugin, const NamedArrays& global,
                              const std::vector<SiteUpdate>& updates, const RoundInfo& round,
                              std::pair<int, int> (*ranks)(int n, double param), double param,
                              NamedArrays& out);

// Runs pass(selected) -> Hit until a pass meets no non-finite value; each site met is logged
// (plugin, site, round) and dropped first. Returns the final selection, empty when no update was
// usable (then the last pass did not complete and its outputs must be discarded).
template <class Pass>
std::vector<size_t> run_finite(const char* plugin, const std::vector<SiteUpdate>& updates,
                               const RoundInfo& round, std::vector<size_t> selected, Pass&& pass) {
  while (!selected.empty()) {
    const Hit hit = pass(selected);
    if (hit.pos < 0) return selected;
    log_rejected(plugin, updates[selected[hit.pos]], round,
                 "non-finite value in '" + hit.tensor + "'");
    selected.erase(selected.begin() + hit.pos);
  }
  return selected;
}

// Weighted mean of the finite updates among `selected` (weights: one per update, normalised over
// the sites that survive). finish(tensor, offset, len, mean_block) runs on each block right after
// its mean is computed, while it is in cache (FedOpt's server step); it must be restartable.
// Returns the sites used; empty when none was usable (then `out` is a copy of global).
struct NoFinish {
  void operator()(size_t, int64_t, int64_t, float*) const {}
};
template <class Finish = NoFinish>
std::vector<size_t> weighted_mean(const char* plugin, const NamedArrays& global,
                                  const std::vector<SiteUpdate>& updates,
                                  const std::vector<double>& weights, const RoundInfo& round,
                                  std::vector<size_t> selected, NamedArrays& out,
                                  Finish&& finish = Finish()) {
  selected = run_finite(plugin, updates, round, std::move(selected), [&](const auto& sel) {
    out.clear();
    const Tensors t = gather(global, updates, sel, out);
    const std::vector<float> c = coefficients(plugin, weights, sel, round);
    return visit_blocks(t, [&](size_t i, int64_t off, int64_t len, const float* const* rows) {
      float* o = t.out[i] + off;
      scale_into(o, rows[0], c[0], len);
      for (size_t s = 1; s < c.size(); ++s) add_scaled(o, rows[s], c[s], len);
      finish(i, off, len, o);
      // Finite inputs can still overflow; such a result must not become the global model.
      if (!all_finite(o, len))
        throw Error(std::string(plugin) + ": round " + std::to_string(round.round) +
                    ": aggregated '" + *t.names[i] + "' overflowed to a non-finite value");
    });
  });
  if (selected.empty()) out = keep_global(plugin, global, round);
  return selected;
}

}  // namespace concord::agg
