#include "aggregation.h"

#include <concord/error.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace concord::agg {

// ---- kernels --------------------------------------------------------------------------------

CONCORD_AGG_KERNEL bool all_finite(const float* x, int64_t n) {
  // Exponent all ones = inf or NaN. Bit test, so the loop vectorises without fast-math.
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t b;
    std::memcpy(&b, x + k, sizeof b);
    bad |= (b & 0x7f800000u) == 0x7f800000u;
  }
  return bad == 0;
}

CONCORD_AGG_KERNEL void scale_into(float* __restrict out, const float* __restrict x, float c,
                                   int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = c * x[k];
}

CONCORD_AGG_KERNEL void add_scaled(float* __restrict out, const float* __restrict x, float c,
                                   int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] += c * x[k];
}

// Sixteen independent float lanes: vectorisable without reassociation, and deterministic.
// Chunks of kBlock go to a double total so long arrays keep their precision.
CONCORD_AGG_KERNEL double squared_distance(const float* a, const float* b, int64_t n) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float acc[16] = {};
    int64_t k = start;
    for (; k + 16 <= end; k += 16)
      for (int l = 0; l < 16; ++l) {
        const float d = a[k + l] - b[k + l];
        acc[l] += d * d;
      }
    for (; k < end; ++k) {
      const float d = a[k] - b[k];
      acc[0] += d * d;
    }
    for (float v : acc) total += v;
  }
  return total;
}

CONCORD_AGG_KERNEL double sum(const float* x, int64_t n) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float acc[16] = {};
    int64_t k = start;
    for (; k + 16 <= end; k += 16)
      for (int l = 0; l < 16; ++l) acc[l] += x[k + l];
    for (; k < end; ++k) acc[0] += x[k];
    for (float v : acc) total += v;
  }
  return total;
}

std::vector<std::pair<int, int>> sorting_network(int n) {
  std::vector<std::pair<int, int>> net;
  int size = 1;
  while (size < n) size <<= 1;
  // Knuth's iterative form of Batcher's odd-even merge sort (TAOCP 5.3.4, exercise 5.2.2-12).
  for (int p = 1; p < size; p <<= 1)
    for (int k = p; k >= 1; k >>= 1)
      for (int j = k % p; j + k < size; j += 2 * k)
        for (int i = 0; i < k && i + j + k < size; ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n)
            net.emplace_back(i + j, i + j + k);
  return net;
}

// Restrict-qualified parameters (not locals) let GCC prove a and b disjoint and vectorise.
static inline void compare_exchange(float* __restrict a, float* __restrict b, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const float x = a[k], y = b[k];
    a[k] = y < x ? y : x;
    b[k] = y < x ? x : y;
  }
}

CONCORD_AGG_KERNEL void sort_columns(float* rows, int64_t stride, int64_t len,
                                     const std::vector<std::pair<int, int>>& network) {
  for (const auto& [i, j] : network) compare_exchange(rows + i * stride, rows + j * stride, len);
}

CONCORD_AGG_KERNEL void mean_of_rows(const float* rows, int64_t stride, int from, int to,
                                     int64_t len, float* __restrict out) {
  const float* first = rows + from * stride;
  for (int64_t k = 0; k < len; ++k) out[k] = first[k];
  for (int r = from + 1; r < to; ++r) {
    const float* row = rows + r * stride;
    for (int64_t k = 0; k < len; ++k) out[k] += row[k];
  }
  if (to - from > 1) {
    const float inv = 1.0f / static_cast<float>(to - from);
    for (int64_t k = 0; k < len; ++k) out[k] *= inv;
  }
}

// ---- validation, weights, logging ----------------------------------------------------------

static std::string where(const char* plugin, const RoundInfo& round) {
  return std::string(plugin) + ": round " + std::to_string(round.round);
}

static std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

void check_structure(const char* plugin, const NamedArrays& global,
                     const std::vector<SiteUpdate>& updates, const RoundInfo& round) {
  for (const SiteUpdate& u : updates) {
    for (const auto& [name, g] : global) {
      auto it = u.state.find(name);
      const std::string at = where(plugin, round) + ": site '" + u.site + "': tensor '" + name;
      if (it == u.state.end()) throw Error(at + "' is missing from the update");
      if (it->second.dtype() != g.dtype())
        throw Error(at + "' has dtype " + dtype_name(it->second.dtype()) + ", the global has " +
                    dtype_name(g.dtype()));
      if (it->second.shape() != g.shape())
        throw Error(at + "' has shape " + shape_str(it->second.shape()) + ", the global has " +
                    shape_str(g.shape()));
    }
  }
}

void log_rejected(const char* plugin, const SiteUpdate& update, const RoundInfo& round,
                  const std::string& why) {
  spdlog::error(
      "{}: round {}: rejected the update of site '{}': {}; it does not reach the global "
      "model",
      plugin, round.round, update.site, why);
}

std::vector<size_t> initial_selection(const char* plugin, const NamedArrays& global,
                                      const std::vector<SiteUpdate>& updates,
                                      const RoundInfo& round) {
  std::vector<size_t> selected;
  for (size_t i = 0; i < updates.size(); ++i) {
    bool ok = true;
    for (const auto& [name, g] : global) {
      if (g.dtype() != DType::F64) continue;
      const Array& a = updates[i].state.at(name);
      const double* p = a.data<double>();
      for (int64_t k = 0; k < a.numel() && ok; ++k) ok = std::isfinite(p[k]);
      if (!ok) {
        log_rejected(plugin, updates[i], round, "non-finite value in '" + name + "'");
        break;
      }
    }
    if (ok) selected.push_back(i);
  }
  return selected;
}

std::vector<double> base_weights(const char* plugin, const std::string& weighting,
                                 const std::vector<SiteUpdate>& updates, const RoundInfo& round) {
  std::vector<double> w(updates.size(), 1.0);
  if (weighting == "uniform") return w;
  if (weighting != "samples")
    throw Error(where(plugin, round) + ": unknown weighting '" + weighting + "'");
  for (size_t i = 0; i < updates.size(); ++i) {
    const double n = updates[i].num_samples;
    if (!std::isfinite(n) || n < 0)
      throw Error(where(plugin, round) + ": site '" + updates[i].site + "' reports num_samples " +
                  std::to_string(n));
    w[i] = n;
  }
  return w;
}

std::vector<float> coefficients(const char* plugin, const std::vector<double>& weights,
                                const std::vector<size_t>& selected, const RoundInfo& round) {
  double total = 0;
  for (size_t i : selected) total += weights[i];
  if (!(total > 0) || !std::isfinite(total))
    throw Error(where(plugin, round) + ": total weight of the " + std::to_string(selected.size()) +
                " usable updates is " + std::to_string(total) + " (num_samples all zero?)");
  std::vector<float> c;
  c.reserve(selected.size());
  for (size_t i : selected) c.push_back(static_cast<float>(weights[i] / total));
  return c;
}

// ---- tensors ---------------------------------------------------------------------------------

Tensors gather(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
               const std::vector<size_t>& selected, NamedArrays& out, bool with_outputs) {
  Tensors t;
  for (const auto& [name, g] : global) {
    if (g.dtype() != DType::F32) continue;
    if (with_outputs) {
      Array& o = out[name] = Array::uninitialized(DType::F32, g.shape());
      t.out.push_back(o.data<float>());
    }
    t.names.push_back(&name);
    t.global.push_back(&g);
    t.numel.push_back(g.numel());
    std::vector<const float*> rows;
    rows.reserve(selected.size());
    for (size_t i : selected) rows.push_back(updates[i].state.at(name).data<float>());
    t.site.push_back(std::move(rows));
  }
  if (with_outputs) merge_non_float(global, updates, selected, out);
  return t;
}

std::vector<size_t> rank_mean(const char* plugin, const NamedArrays& global,
                              const std::vector<SiteUpdate>& updates, const RoundInfo& round,
                              std::pair<int, int> (*ranks)(int n, double param), double param,
                              NamedArrays& out) {
  auto used = run_finite(plugin, updates, round, initial_selection(plugin, global, updates, round),
                         [&](const std::vector<size_t>& sel) {
                           out.clear();
                           const Tensors t = gather(global, updates, sel, out);
                           const auto [lo, hi] = ranks(static_cast<int>(sel.size()), param);
                           return visit_sorted(t, [&](size_t i, int64_t off, int64_t len,
                                                      const float* table, const float* const*) {
                             mean_of_rows(table, kBlock, lo, hi, len, t.out[i] + off);
                           });
                         });
  if (used.empty()) out = keep_global(plugin, global, round);
  return used;
}

template <class T>
static void max_into(Array& acc, const Array& x) {
  T* a = acc.data<T>();
  const T* b = x.data<T>();
  for (int64_t k = 0; k < acc.numel(); ++k) a[k] = std::max(a[k], b[k]);
}

void merge_non_float(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                     const std::vector<size_t>& selected, NamedArrays& out) {
  for (const auto& [name, g] : global) {
    if (g.dtype() == DType::F32) continue;
    if (selected.empty()) {
      out[name] = g.clone();
      continue;
    }
    Array acc = updates[selected.front()].state.at(name).clone();
    for (size_t s = 1; s < selected.size(); ++s) {
      const Array& x = updates[selected[s]].state.at(name);
      visit_dtype(g.dtype(), [&](auto tag) { max_into<decltype(tag)>(acc, x); });
    }
    out[name] = std::move(acc);
  }
}

NamedArrays keep_global(const char* plugin, const NamedArrays& global, const RoundInfo& round) {
  spdlog::error("{}: round {}: no usable update; the global state is kept unchanged", plugin,
                round.round);
  NamedArrays out;
  for (const auto& [name, g] : global) out[name] = g.clone();
  return out;
}

}  // namespace concord::agg
