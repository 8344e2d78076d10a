// Aggregator plugins turn the sites' uploaded shared state into the next global state.
#pragma once

#include <concord/array.h>
#include <concord/local_trainer.h>
#include <concord/registry.h>

namespace concord {

struct SiteUpdate {
  std::string site;
  NamedArrays state;       // the site's shared state after local training (not a delta)
  double num_samples = 0;  // training samples seen this round
  double train_loss = 0;   // mean training loss of the last local epoch
  std::map<std::string, double> scalars;
};

struct RoundInfo {
  int round = 0;   // 1-based
  int rounds = 0;  // total planned
  uint64_t seed = 0;
};

class Aggregator : public Plugin {
 public:
  // `global` is the shared state broadcast at the start of the round; updates are finite
  // (the engine rejects non-finite ones before this call). Returns the new shared state.
  virtual NamedArrays aggregate(const NamedArrays& global, const std::vector<SiteUpdate>& updates,
                                const RoundInfo& round) = 0;
  // True when aggregate() depends on the updates only through their weighted sum (sum_i w_i x_i
  // with w_i from num_samples, and sum_i w_i): such an aggregator works on a secure aggregate or
  // on a noised mean (client-level DP). False (the default) for anything that needs individual
  // updates (median, Krum, trimmed mean, loss weights): the engine refuses those with secure
  // aggregation and differential privacy.
  virtual bool aggregates_by_sum() const { return false; }
  // Server-side state (optimizer moments); saved in checkpoints for bit-identical resume.
  virtual NamedArrays state() const { return {}; }
  virtual void load_state(const NamedArrays& /*state*/) {}
  // Site side: a term every site adds to its local training loss, or null (the default). FedProx
  // returns proximal_term(trainer.model(), trainer.received(), mu). Each site builds its own
  // instance of the pipeline's aggregator, so the term's settings never travel in a message.
  virtual LossTerm local_loss_term(LocalTrainer& /*trainer*/) const { return nullptr; }
};

}  // namespace concord
