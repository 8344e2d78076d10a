// fedadam, fedyogi, fedadagrad: adaptive server optimisers over the averaged update
// (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).
//
//   delta_t = sum_i p_i (x_i - x_t)                  p_i: samples or uniform weights
//   m_t     = b1 m_{t-1} + (1 - b1) delta_t
//   v_t     = v_{t-1} + delta_t^2                                        (adagrad)
//           = v_{t-1} - (1 - b2) delta_t^2 sign(v_{t-1} - delta_t^2)     (yogi)
//           = b2 v_{t-1} + (1 - b2) delta_t^2                            (adam)
//   x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)       m_{-1} = 0, v_{-1} = tau^2, no bias
//   correction
//
// Applies to every float32 array of the shared state (BatchNorm running statistics included);
// other dtypes are merged by element-wise maximum. m and v are the server state (checkpointed).
#include <concord/aggregator.h>
#include <concord/error.h>

#include <cmath>

#include "aggregation.h"

namespace concord {
namespace {

enum class Variant { Adam, Yogi, Adagrad };

struct StepParams {
  float eta, beta1, beta2, tau;
};

// x = mean on entry, the new global on exit; reads m0/v0, writes m1/v1 (never in place, so a
// pass restarted after a rejected site computes the same moments again).
CONCORD_AGG_KERNEL void server_step(Variant variant, float* __restrict x, const float* __restrict g,
                                    const float* __restrict m0, const float* __restrict v0,
                                    float* __restrict m1, float* __restrict v1, int64_t n,
                                    StepParams p) {
  const float b1 = p.beta1, c1 = 1.0f - p.beta1, b2 = p.beta2, c2 = 1.0f - p.beta2;
  switch (variant) {
    case Variant::Adam:
      for (int64_t k = 0; k < n; ++k) {
        const float d = x[k] - g[k];
        const float m = b1 * m0[k] + c1 * d;
        const float v = b2 * v0[k] + c2 * (d * d);
        m1[k] = m;
        v1[k] = v;
        x[k] = g[k] + p.eta * m / (std::sqrt(v) + p.tau);
      }
      break;
    case Variant::Yogi:
      for (int64_t k = 0; k < n; ++k) {
        const float d = x[k] - g[k];
        const float m = b1 * m0[k] + c1 * d;
        const float d2 = d * d;
        const float diff = v0[k] - d2;
        const float sign = static_cast<float>((diff > 0.0f) - (diff < 0.0f));
        const float v = v0[k] - c2 * d2 * sign;
        m1[k] = m;
        v1[k] = v;
        x[k] = g[k] + p.eta * m / (std::sqrt(v) + p.tau);
      }
      break;
    case Variant::Adagrad:
      for (int64_t k = 0; k < n; ++k) {
        const float d = x[k] - g[k];
        const float m = b1 * m0[k] + c1 * d;
        const float v = v0[k] + d * d;
        m1[k] = m;
        v1[k] = v;
        x[k] = g[k] + p.eta * m / (std::sqrt(v) + p.tau);
      }
      break;
  }
}

class FedOpt : public Aggregator {
 public:
  FedOpt(Variant variant, const char* name, const Args& args)
      : variant_(variant),
        name_(name),
        weighting_(args.str("weighting")),
        params_{static_cast<float>(args.real("eta")), static_cast<float>(args.real("beta1")),
                args.has("beta2") ? static_cast<float>(args.real("beta2")) : 0.0f,
                static_cast<float>(args.real("tau"))} {}

  bool aggregates_by_sum() const override { return true; }

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    agg::check_structure(name_, global, updates, round);
    // Per float32 tensor, in the order weighted_mean visits them.
    std::vector<const float*> g, m0, v0;
    std::vector<float*> m1, v1;
    for (const auto& [name, a] : global) {
      if (a.dtype() != DType::F32) continue;
      Array& m = moment(m_, name, a, 0.0f, round);
      Array& v = moment(v_, name, a, params_.tau * params_.tau, round);
      g.push_back(a.data<float>());
      m0.push_back(m.data<float>());
      v0.push_back(v.data<float>());
      m1.push_back(scratch(m_next_, name, a).data<float>());
      v1.push_back(scratch(v_next_, name, a).data<float>());
    }
    NamedArrays out;
    const auto used = agg::weighted_mean(
        name_, global, updates, agg::base_weights(name_, weighting_, updates, round), round,
        agg::initial_selection(name_, global, updates, round), out,
        [&](size_t i, int64_t off, int64_t len, float* x) {
          server_step(variant_, x, g[i] + off, m0[i] + off, v0[i] + off, m1[i] + off, v1[i] + off,
                      len, params_);
        });
    if (used.empty()) return out;  // nothing usable: moments untouched
    std::swap(m_, m_next_);
    std::swap(v_, v_next_);
    ++steps_;
    return out;
  }

  NamedArrays state() const override {
    NamedArrays s;
    for (const auto& [name, m] : m_) s["m/" + name] = m.clone();
    for (const auto& [name, v] : v_) s["v/" + name] = v.clone();
    s["steps"] = Array::from(std::vector<int64_t>{steps_});
    return s;
  }

  void load_state(const NamedArrays& state) override {
    NamedArrays m, v;
    int64_t steps = 0;
    for (const auto& [key, a] : state) {
      if (key == "steps" && a.dtype() == DType::I64 && a.numel() == 1) {
        steps = a.data<int64_t>()[0];
      } else if (key.rfind("m/", 0) == 0 && a.dtype() == DType::F32) {
        m[key.substr(2)] = a.clone();
      } else if (key.rfind("v/", 0) == 0 && a.dtype() == DType::F32) {
        v[key.substr(2)] = a.clone();
      } else {
        throw Error(std::string(name_) + ": load_state: unexpected entry '" + key + "' (" +
                    dtype_name(a.dtype()) + ")");
      }
    }
    m_ = std::move(m);
    v_ = std::move(v);
    m_next_.clear();
    v_next_.clear();
    steps_ = steps;
  }

 private:
  // The moment of `name`, created (filled with `init`) on first sight; a stored moment whose
  // shape differs from the global tensor is an error (a checkpoint of another model).
  Array& moment(NamedArrays& store, const std::string& name, const Array& like, float init,
                const RoundInfo& round) {
    auto it = store.find(name);
    if (it == store.end()) {
      Array a = Array::uninitialized(DType::F32, like.shape());
      std::fill(a.data<float>(), a.data<float>() + a.numel(), init);
      return store[name] = std::move(a);
    }
    if (it->second.shape() != like.shape())
      throw Error(std::string(name_) + ": round " + std::to_string(round.round) +
                  ": stored server moment of '" + name +
                  "' has another shape than the global tensor");
    return it->second;
  }
  static Array& scratch(NamedArrays& store, const std::string& name, const Array& like) {
    Array& a = store[name];
    if (a.empty() || a.shape() != like.shape()) a = Array::uninitialized(DType::F32, like.shape());
    return a;
  }

  Variant variant_;
  const char* name_;
  std::string weighting_;
  StepParams params_;
  NamedArrays m_, v_;            // server state
  NamedArrays m_next_, v_next_;  // reused output buffers of the next step
  int64_t steps_ = 0;
};

std::vector<ArgSpec> fedopt_args(bool with_beta2, double eta, double tau) {
  std::vector<ArgSpec> args = {
      ArgSpec::real("eta", eta, "Server learning rate").range(0, 1e3),
      ArgSpec::real("beta1", 0.9, "Decay of the first moment m (0 = no momentum)")
          .range(0, 0.999999),
      ArgSpec::real("tau", tau, "Adaptivity floor: added to sqrt(v); v starts at tau^2")
          .range(1e-12, 10),
      ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                      "Weight sites' updates by training samples, or equally")};
  if (with_beta2)
    args.insert(args.begin() + 2,
                ArgSpec::real("beta2", 0.99, "Decay of the second moment v").range(0, 0.999999));
  return args;
}

template <Variant V>
struct Named;
template <>
struct Named<Variant::Adam> : FedOpt {
  Named(const Args& a, const BuildContext&) : FedOpt(Variant::Adam, "fedadam", a) {}
};
template <>
struct Named<Variant::Yogi> : FedOpt {
  Named(const Args& a, const BuildContext&) : FedOpt(Variant::Yogi, "fedyogi", a) {}
};
template <>
struct Named<Variant::Adagrad> : FedOpt {
  Named(const Args& a, const BuildContext&) : FedOpt(Variant::Adagrad, "fedadagrad", a) {}
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-fedopt", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Aggregator, "fedadam", "Adam on the server over the averaged site update",
                fedopt_args(true, 0.01, 1e-3), factory_of<Named<Variant::Adam>>()});
  registry.add({Kind::Aggregator, "fedyogi", "Yogi on the server over the averaged site update",
                fedopt_args(true, 0.01, 1e-3), factory_of<Named<Variant::Yogi>>()});
  registry.add({Kind::Aggregator, "fedadagrad",
                "Adagrad on the server over the averaged site update",
                fedopt_args(false, 0.01, 1e-3), factory_of<Named<Variant::Adagrad>>()});
}
