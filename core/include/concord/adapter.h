// Adapter plugins decide which parts of the model are shared and how a site trains locally.
//
// The engine keeps, per site, every state entry the adapter marks local (between rounds and in
// checkpoints) and only ever uploads the shared ones.
#pragma once

#include <concord/array.h>
#include <concord/model.h>
#include <concord/registry.h>

#include <functional>
#include <map>

namespace concord {

using ParamFilter = std::function<bool(const StateEntry&)>;
using LossTerm = std::function<at::Tensor()>;  // added to the loss at every step

struct TrainResult {
  double loss = 0;      // mean loss of the last epoch
  int64_t samples = 0;  // samples seen over all epochs
  int64_t steps = 0;
};

// Provided by the engine to adapters at one site.
class LocalTrainer {
 public:
  virtual ~LocalTrainer() = default;
  virtual const std::string& site() const = 0;
  virtual int round() const = 0;
  // Rounds the federation plans (federation.rounds); 0 when unknown.
  virtual int rounds() const { return 0; }
  virtual Model& model() = 0;
  // Shared state received from the coordinator this round (detached copies).
  virtual const std::map<std::string, at::Tensor>& received() const = 0;
  // `epochs` passes over the site's training split with the pipeline's optimizer. Only
  // parameters selected by `trainable` get gradients (all when null); `extra` is added to the
  // loss. A fresh optimizer is made per call.
  virtual TrainResult train(int epochs, const ParamFilter& trainable = nullptr,
                            const LossTerm& extra = nullptr) = 0;
  // Forward passes over the training split in train mode without gradients or labels:
  // re-estimates BatchNorm running statistics (adaptive BN).
  virtual void recalibrate_batchnorm() = 0;
  // Arrays kept at this site across rounds and in checkpoints (e.g. a personal model).
  virtual NamedArrays& site_store() = 0;
  virtual int64_t train_samples() const = 0;
  // True when this site has trained at least once (its local state is its own).
  virtual bool has_trained() const = 0;
};

class Adapter : public Plugin {
 public:
  // Validates the adapter's configuration against the built model (module paths, types).
  virtual void attach(Model& /*model*/) {}
  virtual bool is_shared(const StateEntry& /*entry*/) const { return true; }
  // The local training schedule of one round.
  virtual TrainResult train_local(LocalTrainer& trainer, int epochs) {
    return trainer.train(epochs);
  }
  // Before a site that never trained (held-out, or not yet selected) evaluates.
  virtual void prepare_unseen_site(LocalTrainer& /*trainer*/) {}
  // Before a site evaluates (e.g. swap in a personal model).
  virtual void before_evaluate(LocalTrainer& /*trainer*/) {}
  // After the last round: personalise (e.g. fine-tune); sites then evaluate again and the
  // results are reported as "personalized" next to the global ones.
  virtual bool personalizes() const { return false; }
  virtual void personalize(LocalTrainer& /*trainer*/) {}
};

}  // namespace concord
