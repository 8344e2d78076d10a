// Helpers for the aggregator tests: build plugins through the real loader, make updates.
#pragma once

#include <concord/aggregator.h>

#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "testing.h"

namespace concord::aggtest {

inline std::unique_ptr<Aggregator> make(const std::string& name,
                                        const std::map<std::string, Value>& args = {}) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Aggregator, name);
  return reg.create<Aggregator>(Kind::Aggregator, name, make_args(name, desc.args, args));
}

inline Array vec(std::vector<float> v) {
  return Array::from(std::move(v));
}

inline SiteUpdate update(const std::string& site, NamedArrays state, double samples = 1,
                         double loss = 0) {
  SiteUpdate u;
  u.site = site;
  u.state = std::move(state);
  u.num_samples = samples;
  u.train_loss = loss;
  return u;
}

inline std::vector<float> values(const NamedArrays& s, const std::string& name) {
  return s.at(name).to_vector<float>();
}

// Bitwise equality of two states (names, dtypes, shapes, bytes).
inline bool identical(const NamedArrays& a, const NamedArrays& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, x] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second.dtype() != x.dtype() || it->second.shape() != x.shape())
      return false;
    if (std::memcmp(x.raw(), it->second.raw(), x.nbytes()) != 0) return false;
  }
  return true;
}

// A small model-like state: a conv kernel, a bias, and an int64 counter.
inline NamedArrays random_state(std::mt19937& rng, float centre, float spread) {
  std::normal_distribution<float> noise(0.0f, spread);
  NamedArrays s;
  Array w(DType::F32, {4, 3, 3, 3});
  for (int64_t k = 0; k < w.numel(); ++k) w.data<float>()[k] = centre + noise(rng);
  Array b(DType::F32, {4});
  for (int64_t k = 0; k < b.numel(); ++k) b.data<float>()[k] = centre + noise(rng);
  s["conv.weight"] = std::move(w);
  s["conv.bias"] = std::move(b);
  s["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{10});
  return s;
}

}  // namespace concord::aggtest
