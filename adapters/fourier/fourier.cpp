// fourier (adapter): the site-side half of progressive Fourier aggregation (PFA, Chen et al.,
// MICCAI 2021). The fourier aggregator averages only the low DCT frequencies of each conv kernel
// and broadcasts one global state; this adapter keeps the high frequencies at each site. For
// every tensor the aggregator filters (same arguments, same selection, same DCT):
//   W = IDCT( 1_low(r) . DCT(W_received) + (1 - 1_low(r)) . DCT(W_site) )
// where W_site is the site's own trained tensor of its last round (site store) and r the
// fraction of the aggregation that produced W_received. Done before local training and before
// every evaluation; a site that never trained uses the received weights as they are.
#include <concord/adapter.h>
#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include "adapter_common.h"
#include "spectral.h"

#include <ATen/core/Tensor.h>

namespace concord {
namespace {

const char* const kStore = "fourier/";  // site-store prefix of the site's own trained tensors

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

class FourierAdapter : public Adapter {
 public:
  FourierAdapter(const Args& args, const BuildContext& ctx)
      : min_ndim_(args.str("apply_to") == "conv" ? 3 : 2),
        who_(ctx.instance.empty() ? "fourier (adapter)"
                                  : "fourier (adapter, " + ctx.instance + ")") {
    schedule_.start = args.real("fraction_start");
    schedule_.end = args.real("fraction_end");
    schedule_.linear = args.str("schedule") == "linear";
    schedule_.ramp_rounds = args.integer("ramp_rounds");
    schedule_.planned_rounds = args.integer("planned_rounds");
    // A linear ramp over the planned rounds takes them from the engine (LocalTrainer::rounds())
    // unless planned_rounds is given.
    rounds_from_trainer_ =
        schedule_.linear && schedule_.ramp_rounds == 0 && schedule_.planned_rounds == 0;
  }

  TrainResult train_local(LocalTrainer& trainer, int epochs) override {
    plan_rounds(trainer);
    // The received state comes from the aggregation of the previous round.
    merge_into_model(trainer, schedule_.fraction(trainer.round() - 1));
    const TrainResult result = trainer.train(epochs);
    NamedArrays own;
    for (const StateEntry& e : trainer.model().state())
      if (selected(trainer, e)) own[e.name] = to_array(e.tensor.detach().clone());
    adapters::put_prefixed(trainer.site_store(), kStore, own);
    return result;
  }

  void before_evaluate(LocalTrainer& trainer) override {
    plan_rounds(trainer);
    // Evaluations follow the aggregation of the current round.
    merge_into_model(trainer, schedule_.fraction(trainer.round()));
  }

 private:
  void plan_rounds(const LocalTrainer& trainer) {
    if (!rounds_from_trainer_) return;
    if (trainer.rounds() <= 0)
      throw Error(who_ + ": site '" + trainer.site() +
                  "': schedule linear with ramp_rounds 0 ramps over the planned rounds, which "
                  "this trainer does not report: set ramp_rounds (the same in the fourier "
                  "aggregator) or planned_rounds");
    schedule_.planned_rounds = trainer.rounds();
  }

  // The aggregator's rule: float32 entries of the shared state with ndim >= 3 (conv) or >= 2.
  bool selected(const LocalTrainer& trainer, const StateEntry& e) const {
    return trainer.received().count(e.name) && e.tensor.scalar_type() == at::kFloat &&
           e.tensor.dim() >= min_ndim_;
  }

  void merge_into_model(LocalTrainer& trainer, double r) {
    const NamedArrays own = adapters::take_prefixed(trainer.site_store(), kStore);
    if (own.empty()) return;  // never trained here: the received weights as they are
    NamedArrays merged;
    for (const StateEntry& e : trainer.model().state()) {
      if (!selected(trainer, e)) continue;
      auto it = own.find(e.name);
      if (it == own.end()) continue;
      const Array received = to_array(trainer.received().at(e.name).contiguous());
      const Array& mine = it->second;
      if (mine.dtype() != DType::F32 || mine.shape() != received.shape())
        throw Error(who_ + ": site '" + trainer.site() + "', round " +
                    std::to_string(trainer.round()) + ": the stored '" + e.name + "' has shape " +
                    shape_text(mine.shape()) + ", the received one " +
                    shape_text(received.shape()));
      const int64_t rows = received.shape()[0];
      if (rows == 0 || received.numel() == 0) continue;
      Array out(DType::F32, received.shape());
      fourier::merge(received.data<float>(), mine.data<float>(), out.data<float>(), rows,
                     received.numel() / rows, r);
      merged[e.name] = std::move(out);
    }
    adapters::restore(trainer.model(), merged, who_, /*require_all=*/false);
  }

  fourier::Schedule schedule_;
  bool rounds_from_trainer_ = false;
  int min_ndim_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-adapter-fourier", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Adapter,
       "fourier",
       "Progressive Fourier aggregation, site side: global low DCT frequencies of conv kernels, "
       "the site's own high ones (pair with the fourier aggregator, same arguments)",
       {ArgSpec::real("fraction_start", 0.25,
                      "Low-frequency fraction of each axis averaged in round 1 (as the "
                      "aggregator)")
            .range(0, 1),
        ArgSpec::real("fraction_end", 1.0,
                      "Fraction reached at the end of the ramp (as the "
                      "aggregator)")
            .range(0, 1),
        ArgSpec::choice("schedule", {"linear", "constant"}, "linear",
                        "linear: fraction_start to fraction_end over ramp_rounds; constant: "
                        "fraction_start every round (as the aggregator)"),
        ArgSpec::integer("ramp_rounds", 0,
                         "Rounds of the linear ramp (0 = planned_rounds; as the aggregator)")
            .range(0, 1000000),
        ArgSpec::choice("apply_to", {"conv", "matrices"}, "conv",
                        "Tensors split in frequency: conv kernels (ndim >= 3) or also 2-D "
                        "weights (as the aggregator)"),
        ArgSpec::choice("weighting", {"samples", "uniform"}, "samples",
                        "Accepted so that one args mapping serves the aggregator and the "
                        "adapter; no effect at the site"),
        ArgSpec::integer("planned_rounds", 0,
                         "federation.rounds, needed only with schedule linear and "
                         "ramp_rounds 0 (default: federation.rounds, from the engine)")
            .range(0, 1000000)},
       factory_of<FourierAdapter>()});
}
