// Client-level DP: clipping, noise placement and the accountant's q (see dp_mechanism.h).
#include <concord/dp_mechanism.h>
#include <concord/error.h>

#include <cmath>

namespace concord::dp {
namespace {

// The selected entries of `update` (NamedArrays, const or not) with their global values, checked
// to match.
template <class State>
auto selected(State& update, const NamedArrays& global, const EntrySelector& select) {
  std::vector<std::pair<decltype(&update.begin()->second), const Array*>> out;
  for (auto& [name, a] : update) {
    if (!select(name, a)) continue;
    auto it = global.find(name);
    if (it == global.end()) throw Error("DP clipping: entry '" + name + "' has no global value");
    if (a.dtype() != DType::F32 || it->second.dtype() != DType::F32 ||
        it->second.numel() != a.numel())
      throw Error("DP clipping: entry '" + name + "' is " + dtype_name(a.dtype()) + "[" +
                  std::to_string(a.numel()) + "] in the update but " +
                  dtype_name(it->second.dtype()) + "[" + std::to_string(it->second.numel()) +
                  "] in the global state (float32 of the same size expected)");
    out.push_back({&a, &it->second});
  }
  return out;
}

template <class Entries>
double norm_of(const Entries& entries) {
  double norm2 = 0;
  for (const auto& entry : entries) {
    const Array& u = *entry.first;
    const float* x = u.data<float>();
    const Array& g = *entry.second;
    const float* x0 = g.data<float>();
    for (int64_t k = 0; k < u.numel(); ++k) {
      const double d = double(x[k]) - double(x0[k]);
      norm2 += d * d;
    }
  }
  return std::sqrt(norm2);
}

void check_count(int64_t m, const char* what) {
  if (m < 1) throw Error(std::string("DP settings: ") + what + " must be >= 1");
}

}  // namespace

const char* name(Level level) {
  return level == Level::Client ? "client" : "sample";
}
const char* name(Placement placement) {
  return placement == Placement::Central ? "central" : "local";
}
const char* name(Sampling sampling) {
  return sampling == Sampling::Poisson ? "poisson" : "none";
}

void DpSettings::check() const {
  if (!(clip > 0) || !std::isfinite(clip))
    throw Error("DP settings: clip must be finite and > 0, got " + std::to_string(clip));
  if (!(noise_multiplier >= 0) || !std::isfinite(noise_multiplier))
    throw Error("DP settings: noise_multiplier must be finite and >= 0, got " +
                std::to_string(noise_multiplier));
}

double DpSettings::sampling_rate(int64_t selected, int64_t population) const {
  check_count(selected, "the number of selected members");
  check_count(population, "the population");
  if (selected > population)
    throw Error("DP settings: " + std::to_string(selected) + " selected out of a population of " +
                std::to_string(population));
  return sampling == Sampling::None ? 1.0 : double(selected) / double(population);
}

double DpSettings::central_std(int64_t m) const {
  check_count(m, "the number of aggregated deltas");
  return noise_multiplier * clip / double(m);
}

double DpSettings::local_share_std(int64_t m) const {
  check_count(m, "the number of sites sharing the noise");
  return noise_multiplier * clip / std::sqrt(double(m));
}

double DpSettings::effective_noise_multiplier(int64_t planned, int64_t contributed) const {
  check_count(planned, "the planned number of sites");
  check_count(contributed, "the number of contributing sites");
  if (contributed > planned)
    throw Error("DP settings: " + std::to_string(contributed) + " sites contributed noise but " +
                std::to_string(planned) + " were planned");
  if (placement == Placement::Central) return noise_multiplier;
  return noise_multiplier * std::sqrt(double(contributed) / double(planned));
}

bool every_float32(const std::string&, const Array& value) {
  return value.dtype() == DType::F32;
}

double delta_norm(const NamedArrays& update, const NamedArrays& global,
                  const EntrySelector& select) {
  return norm_of(selected(update, global, select));
}

double clip_update(NamedArrays& update, const NamedArrays& global, double clip,
                   const EntrySelector& select) {
  if (!(clip > 0)) throw Error("DP clipping: clip must be > 0, got " + std::to_string(clip));
  const auto entries = selected(update, global, select);
  const double norm = norm_of(entries);
  if (norm <= clip) return norm;
  const double scale = clip / norm;
  for (const auto& [u, g] : entries) {
    float* x = u->data<float>();
    const float* x0 = g->data<float>();
    for (int64_t k = 0; k < u->numel(); ++k)
      x[k] = float(double(x0[k]) + (double(x[k]) - double(x0[k])) * scale);
  }
  return norm;
}

void add_gaussian_noise(NamedArrays& state, double std, uint64_t seed,
                        const EntrySelector& select) {
  SeededRandom engine(seed);
  add_gaussian_noise(state, std, engine, select);
}

}  // namespace concord::dp
