// What a site's local training offers the plugins that shape it: adapters (which parameters train,
// extra loss terms, personalisation) and aggregators (a client-side term such as FedProx's).
#pragma once

#include <concord/array.h>
#include <concord/model.h>

#include <functional>
#include <map>
#include <string>

namespace concord {

using ParamFilter = std::function<bool(const StateEntry&)>;
using LossTerm = std::function<at::Tensor()>;  // added to the loss at every step

struct TrainResult {
  double loss = 0;      // mean loss of the last epoch
  int64_t samples = 0;  // samples seen over all epochs
  int64_t steps = 0;
};

// Provided by the engine to plugins at one site.
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
  // loss, as is the aggregator's local_loss_term(). A fresh optimizer is made per call.
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

// weight/2 * sum of ||w - target[w]||^2 over the model's parameters that `target` names, on the
// live tensors; parameters that do not require a gradient when the term is evaluated (frozen by
// the trainable filter) are left out. Null when weight is 0 or nothing matches. FedProx's
// proximal term (Li et al. 2020) and Ditto's (Li et al. 2021) are this term.
LossTerm proximal_term(Model& model, const std::map<std::string, at::Tensor>& target,
                       double weight);

}  // namespace concord
