// Adapter plugins decide which parts of the model are shared and how a site trains locally.
//
// The engine keeps, per site, every state entry the adapter marks local (between rounds and in
// checkpoints) and only ever uploads the shared ones.
#pragma once

#include <concord/local_trainer.h>
#include <concord/registry.h>

namespace concord {

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
