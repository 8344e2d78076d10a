// Local training at one site: batching, the task loss, the optimizer, BatchNorm re-estimation and
// prediction over the test split. Private to libconcord; the Site drives it (site.h).
#pragma once

#include <concord/dataset.h>
#include <concord/harmonizer.h>
#include <concord/local_trainer.h>
#include <concord/metric.h>
#include <concord/pipeline.h>

#include <map>
#include <string>
#include <vector>

namespace torch::optim {
class Optimizer;
}

namespace concord {

struct SampleLevelPlan;  // privacy_round.h

// The training loss of `task`: classification, cross-entropy; segmentation, cross-entropy + soft
// Dice over the foreground classes.
at::Tensor task_loss(Task task, const at::Tensor& logits, const at::Tensor& y);

// The local optimizers a pipeline may name in training.optimizer, sorted. Defined in pipeline.cpp
// (the validation links without LibTorch: tests/fuzz); local training's table of optimizers
// checks on first use that it has exactly these names.
std::vector<std::string> optimizer_names();

// Seeds LibTorch's global generator (model initialisation; dropout and other draws of the model
// during local training).
void seed_torch(uint64_t seed);
// Prepares the process for training (the engine's set-up): LibTorch's intra-op threads
// (training.threads; 0: every CPU the process may run on, or OMP_NUM_THREADS when set) and
// glibc's allocator keeping freed memory for the next step instead of unmapping it (not when
// GLIBC_TUNABLES tunes malloc). Returns the thread count. See docs/performance.md.
int configure_torch_process(int threads);

// A site's local trainer for one request: the LocalTrainer that adapters and aggregators see.
// Holds references only; the Site owns everything it points to.
class LocalTraining : public LocalTrainer {
 public:
  struct Context {
    const std::string* site = nullptr;
    const PipelineConfig::Training* training = nullptr;
    uint64_t seed = 0;  // the pipeline's
    int rounds = 0;
    Task task = Task::Classification;
    const SiteData* data = nullptr;
    Model* model = nullptr;
    const std::vector<Harmonizer*>* augmenters = nullptr;  // applied per training draw
    const std::vector<Harmonizer*>* replayers = nullptr;   // add synthetic samples per batch
    NamedArrays* store = nullptr;
    const std::map<std::string, at::Tensor>* received = nullptr;
    LossTerm aggregator_term;  // the aggregator's local_loss_term(), or null
    bool trained = false;
    // train() calls since the site's last train request: each call draws its own shuffling
    // stream, (seed, site, round, call), so a resumed run replays it exactly.
    int64_t* calls = nullptr;
  };
  LocalTraining(Context c, int round) : c_(std::move(c)), round_(round) {}
  // The aggregator's term needs this trainer to exist first (it reads model() and received()).
  void set_aggregator_term(LossTerm t) { c_.aggregator_term = std::move(t); }
  // Sample-level DP: every train() call does DP-SGD with `plan` (privacy_round.h) instead of
  // shuffled mini-batches. The plan must outlive this trainer.
  void set_sample_level(const SampleLevelPlan* plan) { sample_plan_ = plan; }

  const std::string& site() const override { return *c_.site; }
  int round() const override { return round_; }
  int rounds() const override { return c_.rounds; }
  Model& model() override { return *c_.model; }
  const std::map<std::string, at::Tensor>& received() const override { return *c_.received; }
  NamedArrays& site_store() override { return *c_.store; }
  int64_t train_samples() const override { return int64_t(c_.data->train.size()); }
  bool has_trained() const override { return c_.trained; }
  TrainResult train(int epochs, const ParamFilter& trainable, const LossTerm& extra) override;
  void recalibrate_batchnorm() override;

  // The model's predictions over the test split (eval mode, no gradients).
  Predictions predict(int num_classes);

 private:
  void add_replay(at::Tensor& x, at::Tensor& y, size_t real, int epoch, int epochs,
                  std::mt19937_64& rng);
  TrainResult train_dp_sgd(torch::optim::Optimizer& opt, const std::vector<at::Tensor>& params,
                           int epochs, const LossTerm& extra, std::mt19937_64& rng, int64_t call);
  Context c_;
  int round_;
  const SampleLevelPlan* sample_plan_ = nullptr;
};

}  // namespace concord
