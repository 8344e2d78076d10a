// ditto: every site keeps a personal model v next to the federated global model w
// (Li et al., ICML 2021). Each round a site trains its copy of w as in FedAvg (that is what it
// uploads), then trains v on the same data with the proximal loss
//   F_k(v) + lambda/2 * ||v - w_t||^2        (w_t: the global model received this round)
// and keeps v in its site store (persisted across rounds and in checkpoints). Global metrics are
// measured with w; after the last round personalize() swaps v in for the "personalized" ones.
#include <concord/adapter.h>
#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include "adapter_common.h"

#include <ATen/core/Tensor.h>

namespace concord {
namespace {

const char* const kPersonal = "ditto.personal/";  // site-store prefix of v
const char* const kPhase = "ditto.phase";         // 1 after personalize(): evaluations use v

class Ditto : public Adapter {
 public:
  Ditto(const Args& args, const BuildContext& ctx)
      : lambda_(args.real("lambda")),
        epochs_(int(args.integer("epochs"))),
        who_(ctx.instance.empty() ? "ditto" : "ditto (" + ctx.instance + ")") {}

  TrainResult train_local(LocalTrainer& trainer, int epochs) override {
    Model& model = trainer.model();
    NamedArrays& store = trainer.site_store();
    adapters::set_flag(store, kPhase, false);
    const NamedArrays round_start = adapters::snapshot(model);
    std::map<std::string, at::Tensor> global;
    for (const StateEntry& e : model.state())
      if (e.is_parameter) {
        auto it = trainer.received().find(e.name);
        if (it == trainer.received().end())
          throw Error(who_ + ": site '" + trainer.site() + "', round " +
                      std::to_string(trainer.round()) + ": the coordinator sent no '" + e.name +
                      "' (ditto shares the whole model)");
        global[e.name] = it->second;
      }

    // 1. The global update, exactly as FedAvg would make it.
    const TrainResult result = trainer.train(epochs);
    const NamedArrays trained_global = adapters::snapshot(model);

    // 2. The personal model: starts as the first global model this site receives.
    NamedArrays personal = adapters::take_prefixed(store, kPersonal);
    adapters::restore(model, personal.empty() ? round_start : personal, who_);
    trainer.train(epochs_, nullptr, proximal(model, global));
    adapters::put_prefixed(store, kPersonal, adapters::snapshot(model));

    // 3. Upload the global update, not the personal model.
    adapters::restore(model, trained_global, who_);
    return result;
  }

  bool personalizes() const override { return true; }

  void personalize(LocalTrainer& trainer) override {
    Model& model = trainer.model();
    NamedArrays& store = trainer.site_store();
    NamedArrays personal = adapters::take_prefixed(store, kPersonal);
    if (personal.empty()) {
      // A site that never trained (held-out or never selected) fits its personal model now,
      // from the final global model and with the same proximal term.
      if (trainer.train_samples() <= 0)
        throw Error(who_ + ": site '" + trainer.site() +
                    "' never trained and has no training samples for a personal model");
      std::map<std::string, at::Tensor> global;
      for (const StateEntry& e : model.state())
        if (e.is_parameter) global[e.name] = e.tensor.detach().clone();
      trainer.train(epochs_, nullptr, proximal(model, global));
      adapters::put_prefixed(store, kPersonal, adapters::snapshot(model));
    } else {
      adapters::restore(model, personal, who_);
    }
    adapters::set_flag(store, kPhase, true);
  }

  void before_evaluate(LocalTrainer& trainer) override {
    // Regular evaluations measure the global model; after personalize() the personal one, even
    // if the engine reloaded the site's model in between.
    NamedArrays& store = trainer.site_store();
    if (!adapters::flag(store, kPhase)) return;
    adapters::restore(trainer.model(), adapters::take_prefixed(store, kPersonal), who_);
  }

 private:
  // lambda/2 * sum over parameters of ||v - w_t||^2, on the live tensors of the model.
  LossTerm proximal(Model& model, const std::map<std::string, at::Tensor>& global) const {
    return proximal_term(model, global, lambda_);
  }

  double lambda_;
  int epochs_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-adapter-ditto", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Adapter,
       "ditto",
       "Ditto: a personal model per site, trained with a proximal term to the global model",
       {ArgSpec::real("lambda", 0.1,
                      "lambda of the proximal term lambda/2*||v - w||^2 (0: purely local "
                      "personal models; large: personal models stay near the global one)")
            .at_least(0),
        ArgSpec::integer("epochs", 1,
                         "Epochs on the personal model per round (and to fit one for a site "
                         "that never trained)")
            .at_least(1)},
       factory_of<Ditto>()});
}
