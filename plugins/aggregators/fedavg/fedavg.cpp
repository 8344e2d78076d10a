// fedavg: w = sum_i n_i w_i / sum_i n_i (McMahan et al., AISTATS 2017), or the plain mean.
#include <concord/aggregator.h>
#include <concord/error.h>

namespace concord {
namespace {

class FedAvg : public Aggregator {
 public:
  FedAvg(const Args& args, const BuildContext&) : weighted_(args.str("weighting") == "samples") {}

  NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                        const RoundInfo& round) override {
    if (updates.empty()) return global;
    std::vector<double> w(updates.size(), 1.0);
    if (weighted_)
      for (size_t i = 0; i < updates.size(); ++i) w[i] = updates[i].num_samples;
    double total = 0;
    for (double x : w) total += x;
    if (total <= 0)
      throw Error("fedavg: round " + std::to_string(round.round) + ": total weight is zero");
    NamedArrays out;
    for (const auto& [name, g] : global) {
      if (g.dtype() != DType::F32) {  // integer buffers (e.g. BatchNorm counters): take the first
        out[name] = updates.front().state.at(name).clone();
        continue;
      }
      Array acc = Array::uninitialized(DType::F32, g.shape());
      float* a = acc.data<float>();
      const int64_t n = g.numel();
      for (size_t i = 0; i < updates.size(); ++i) {
        auto it = updates[i].state.find(name);
        if (it == updates[i].state.end())
          throw Error("fedavg: site '" + updates[i].site + "' sent no '" + name + "'");
        const float* u = it->second.data<float>();
        const float c = float(w[i] / total);
        if (i == 0)
          for (int64_t k = 0; k < n; ++k) a[k] = c * u[k];
        else
          for (int64_t k = 0; k < n; ++k) a[k] += c * u[k];
      }
      out[name] = std::move(acc);
    }
    return out;
  }

 private:
  bool weighted_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-aggregator-fedavg", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Aggregator, "fedavg", "Federated averaging of the sites' shared state",
                {ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                                 "Weight sites by training samples, or equally")},
                factory_of<FedAvg>()});
}
