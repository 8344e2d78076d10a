// Secure aggregation over the site protocol (the pipeline's `secure_aggregation:`; secagg.h has
// the cryptography). The coordinator's side is Coordinator::secure_train_round (engine.h), whose
// body is in secure_round.cpp; a site's side is SecureAggregationSite, which the Site hands the
// four secagg-* requests. Torch-free.
#pragma once

#include <concord/pipeline.h>
#include <concord/protocol.h>
#include <concord/secagg.h>

#include <functional>
#include <memory>
#include <string>

namespace concord {

// What the coordinator knows of a secure round's sample counts, as SiteUpdate scalars (and
// metrics.jsonl fields): kSecureRound on every survivor's update (its num_samples is the
// aggregator's equal weight 1, not a count: metrics.jsonl leaves it out) and, under weighted
// FedAvg, kRoundNumSamples: the sum of the survivors' weights (their training samples, each at
// most 2^20), decoded with the masked sum. The individual counts stay inside the masks.
inline constexpr const char* kSecureRound = "secure_aggregation";
inline constexpr const char* kRoundNumSamples = "round_num_samples";

// What local training gives the masked-input stage.
struct TrainedUpload {
  NamedArrays upload;  // the shared state after filters and privacy (privatize_upload)
  double num_samples = 0;
  double train_loss = 0;
  int64_t steps = 0;
};

// A site's secure-aggregation state for the current round, between its four requests.
class SecureAggregationSite {
 public:
  SecureAggregationSite(const PipelineConfig& config, std::string site);
  ~SecureAggregationSite();

  Message setup(const Message& request);
  Message share_keys(const Message& request);
  // Trains with `train` (given the request's settings) and replies with the masked delta from
  // `global`, weighted by min(num_samples, max_weight) (1 when max_weight is 1).
  Message masked_input(const Message& request, const NamedArrays& global,
                       const std::function<TrainedUpload(const protocol::TrainSettings&)>& train);
  Message unmask(const Message& request);

 private:
  struct State;
  const PipelineConfig& config_;
  std::string site_;
  std::unique_ptr<State> state_;
};

// The secure-aggregation settings of one round with `sites` selected sites and `length` float32
// values in the global state. Throws Error (naming the pipeline location) when they do not fit.
secagg::Config secure_round_config(const PipelineConfig::SecureAggregation& settings,
                                   uint32_t sites, int64_t length, uint64_t graph_seed,
                                   bool equal_weights);

// Throws Error, naming both pipeline locations, when secure aggregation cannot be used with the
// run's aggregator (it needs individual updates) or with fewer than 3 training sites.
void check_secure_aggregation(const PipelineConfig& config, bool aggregates_by_sum,
                              size_t trainers);

}  // namespace concord
