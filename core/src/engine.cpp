// Experiment: builds data, model, harmonizers, adapter and aggregator from a pipeline, connects
// one Site per hospital to the Coordinator through an in-process Channel, and runs the rounds.
#include <concord/adapter.h>
#include <concord/dataset.h>
#include <concord/engine.h>
#include <concord/filter.h>
#include <concord/harmonizer.h>
#include <concord/json_text.h>
#include <concord/metric.h>
#include <concord/model.h>
#include <concord/protocol.h>
#include <concord/tensor_bridge.h>
#include <concord/torch_model.h>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace concord {

namespace {

// Settings every site receives with a train request.
struct LocalConfig {
  const PipelineConfig* config = nullptr;
  Task task = Task::Classification;
  int num_classes = 2;
};

// A site's harmonizers over its own images: the site's side of the harmonizer fit phase. Fits on
// the training split; the global statistics then transform both splits once, or are kept for
// training draws by augmenting harmonizers.
class SiteHarmonizers {
 public:
  SiteHarmonizers(std::string site, std::vector<std::unique_ptr<Harmonizer>> harmonizers)
      : site_(std::move(site)), harmonizers_(std::move(harmonizers)) {}

  // Answers the coordinator's fit and harmonizer-stats requests; nothing for other types.
  std::optional<Message> handle(Message& in, SiteData& data) {
    const protocol::Request kind = protocol::request_kind(in);
    if (kind == protocol::Request::Fit) {
      Harmonizer& h = *harmonizers_[protocol::read_harmonizer(in, harmonizers_.size())];
      Stats s = h.fit_site([&](const ImageVisitor& visit) {
        for (const auto& sample : data.train) visit(sample.image);
      });
      return protocol::statistics(site_, std::move(s));
    }
    if (kind == protocol::Request::SetStatistics) {
      protocol::SetStatistics set =
          protocol::read_set_statistics(std::move(in), harmonizers_.size());
      Harmonizer& h = *harmonizers_[set.harmonizer];
      h.set_statistics(set.stats, site_);
      if (h.augments()) {
        augmenters_.push_back(&h);
      } else {
        for (auto* split : {&data.train, &data.test})
          for (auto& sample : *split) h.apply(sample.image);
      }
      return protocol::ack(site_, 0);
    }
    return std::nullopt;
  }

  const std::vector<Harmonizer*>& augmenters() const { return augmenters_; }

 private:
  std::string site_;
  std::vector<std::unique_ptr<Harmonizer>> harmonizers_;
  std::vector<Harmonizer*> augmenters_;
};

// One hospital: holds its images (never sent), its local state, and answers the coordinator.
class Site : public LocalTrainer {
 public:
  Site(std::string name, SiteData data, bool held_out, Model& model, Adapter& adapter,
       const std::set<std::string>& shared, const NamedArrays& initial, LocalConfig cfg,
       std::vector<std::unique_ptr<Harmonizer>> harmonizers,
       std::vector<std::unique_ptr<Filter>> filters,
       const std::vector<std::pair<std::string, std::unique_ptr<Metric>>>& metrics,
       const FaultPlan& faults)
      : name_(std::move(name)),
        data_(std::move(data)),
        held_out_(held_out),
        model_(model),
        adapter_(adapter),
        shared_(shared),
        initial_(initial),
        cfg_(cfg),
        harmonization_(name_, std::move(harmonizers)),
        filters_(std::move(filters)),
        metrics_(metrics),
        faults_(faults) {}

  Bytes handle(const Bytes& request) {
    Message in = decode(request);
    round_ = int(in.round);
    const protocol::Request kind = protocol::request_kind(in);
    auto fault = faults_.fail.find({name_, round_});
    if (fault != faults_.fail.end() && kind == protocol::Request::Train)
      throw SiteError(name_, fault->second);
    Message out;
    if (auto reply = harmonization_.handle(in, data_)) {
      out = std::move(*reply);
    } else if (kind == protocol::Request::Broadcast) {
      global_ = std::move(in.arrays);  // views into the one broadcast buffer
      out = protocol::ack(name_, in.round);
    } else if (kind == protocol::Request::Train) {
      out = train_round(in);
    } else if (kind == protocol::Request::Evaluate) {
      out = evaluate(protocol::read_evaluate_request(in));
    } else if (kind == protocol::Request::Personalize) {
      load_model_state();
      adapter_.personalize(*this);
      save_local_state();
      out = protocol::ack(name_, in.round);
    } else {
      throw SiteError(name_, "unexpected request '" + in.type + "'");
    }
    out.round = in.round;
    if (faults_.tamper) faults_.tamper(name_, out);
    return encode(out);
  }

  // --- LocalTrainer ---
  const std::string& site() const override { return name_; }
  int round() const override { return round_; }
  int rounds() const override { return cfg_.config->federation.rounds; }
  Model& model() override { return model_; }
  const std::map<std::string, at::Tensor>& received() const override { return received_; }
  NamedArrays& site_store() override { return store_; }
  int64_t train_samples() const override { return int64_t(data_.train.size()); }
  bool has_trained() const override { return trained_; }

  TrainResult train(int epochs, const ParamFilter& trainable, const LossTerm& extra) override {
    const auto& t = cfg_.config->training;
    auto entries = model_.state();
    std::vector<at::Tensor> params;
    std::vector<std::pair<at::Tensor, bool>> saved_grad;
    for (auto& e : entries) {
      if (!e.is_parameter) continue;
      bool on = !trainable || trainable(e);
      saved_grad.emplace_back(e.tensor, e.tensor.requires_grad());
      e.tensor.set_requires_grad(on);
      if (on) params.push_back(e.tensor);
    }
    TrainResult result;
    if (params.empty() || data_.train.empty()) return restore_grad(saved_grad), result;
    std::unique_ptr<torch::optim::Optimizer> opt;
    if (t.optimizer == "sgd")
      opt = std::make_unique<torch::optim::SGD>(
          params, torch::optim::SGDOptions(t.lr).momentum(t.momentum).weight_decay(t.weight_decay));
    else
      opt = std::make_unique<torch::optim::Adam>(
          params, torch::optim::AdamOptions(t.lr).weight_decay(t.weight_decay));
    // FedProx-style proximal term, when the aggregator asks for one.
    const double mu = settings_.proximal_mu;
    std::vector<std::pair<at::Tensor, at::Tensor>> prox;
    if (mu > 0)
      for (auto& e : entries)
        if (e.is_parameter && received_.count(e.name) && e.tensor.requires_grad())
          prox.emplace_back(e.tensor, received_.at(e.name));
    model_.set_training(true);
    std::mt19937_64 rng(
        derive_seed(cfg_.config->seed, "shuffle/" + name_, round_ * 1000 + calls_++));
    for (int ep = 0; ep < epochs; ++ep) {
      std::vector<size_t> order(data_.train.size());
      std::iota(order.begin(), order.end(), 0);
      shuffle(order, rng);
      double loss_sum = 0;
      int64_t seen = 0;
      for (size_t start = 0; start < order.size(); start += size_t(t.batch_size)) {
        size_t end = std::min(order.size(), start + size_t(t.batch_size));
        if (end - start < 2 && order.size() >= 2) break;  // BatchNorm needs 2+ samples
        std::vector<size_t> idx(order.begin() + long(start), order.begin() + long(end));
        auto [x, y] = batch(data_.train, idx, &rng);
        opt->zero_grad();
        at::Tensor loss = task_loss(model_.forward(x), y);
        if (extra) loss = loss + extra();
        if (!prox.empty()) {
          at::Tensor p = torch::zeros({}, torch::kFloat);
          for (auto& [w, g] : prox) p = p + (w - g).pow(2).sum();
          loss = loss + 0.5 * mu * p;
        }
        loss.backward();
        opt->step();
        loss_sum += loss.item<double>() * double(idx.size());
        seen += int64_t(idx.size());
        result.steps++;
      }
      result.samples += seen;
      result.loss = seen ? loss_sum / double(seen) : 0;
    }
    restore_grad(saved_grad);
    return result;
  }

  void recalibrate_batchnorm() override {
    torch::NoGradGuard ng;
    // Fresh running statistics estimated from this site's images alone (labels unused). With
    // LibTorch modules the momentum is switched off during the passes (a cumulative average, as
    // PyTorch does with momentum=None); other models get enough passes for the default
    // momentum 0.1 to forget the reset values (0.9^50 < 1%).
    std::vector<std::pair<torch::nn::BatchNormOptions*, c10::optional<double>>> saved_momentum;
    if (auto* tm = dynamic_cast<TorchModuleModel*>(&model_)) {
      for (const auto& m : tm->module().modules(/*include_self=*/true)) {
        torch::nn::BatchNormOptions* o = nullptr;
        if (auto* b = m->as<torch::nn::BatchNorm1d>()) o = &b->options;
        if (auto* b = m->as<torch::nn::BatchNorm2d>()) o = &b->options;
        if (auto* b = m->as<torch::nn::BatchNorm3d>()) o = &b->options;
        if (!o) continue;
        saved_momentum.emplace_back(o, o->momentum());
        o->momentum(c10::nullopt);
      }
    }
    const bool cumulative = !saved_momentum.empty();
    for (auto& e : model_.state()) {
      if (e.module_type.find("BatchNorm") == std::string::npos || e.is_parameter) continue;
      const std::string leaf = e.name.substr(e.name.rfind('.') + 1);
      if (leaf == "running_mean" || leaf == "num_batches_tracked") e.tensor.zero_();
      if (leaf == "running_var") e.tensor.fill_(1);
    }
    model_.set_training(true);
    std::vector<size_t> idx(data_.train.size());
    std::iota(idx.begin(), idx.end(), 0);
    const size_t bs = size_t(cfg_.config->training.batch_size);
    int passes = 0;
    for (int epoch = 0; epoch < 1000 && (epoch == 0 || (!cumulative && passes < 50)); ++epoch) {
      for (size_t s = 0; s < idx.size(); s += bs) {
        std::vector<size_t> part(idx.begin() + long(s),
                                 idx.begin() + long(std::min(idx.size(), s + bs)));
        if (part.size() < 2) break;
        model_.forward(batch(data_.train, part, nullptr).first);
        ++passes;
      }
      if (passes == 0) break;
    }
    for (auto& [o, m] : saved_momentum) o->momentum(m);
    model_.set_training(false);
  }

  // --- state ---
  void load_model_state() {
    torch::NoGradGuard ng;
    received_.clear();
    for (auto& e : model_.state()) {
      const Array* src = nullptr;
      if (shared_.count(e.name)) {
        auto it = global_.find(e.name);
        if (it == global_.end()) throw SiteError(name_, "no global value for '" + e.name + "'");
        src = &it->second;
        received_[e.name] = to_tensor(it->second).clone();
      } else {
        auto it = local_.find(e.name);
        src = it != local_.end() ? &it->second : &initial_.at(e.name);
      }
      e.tensor.copy_(to_tensor(*src));
    }
  }
  bool has_local_buffers() {
    for (auto& e : model_.state())
      if (!e.is_parameter && !shared_.count(e.name)) return true;
    return false;
  }
  void restore_shared() {
    torch::NoGradGuard ng;
    for (auto& e : model_.state())
      if (shared_.count(e.name)) e.tensor.copy_(to_tensor(global_.at(e.name)));
  }
  void save_local_state() {
    for (auto& e : model_.state())
      if (!shared_.count(e.name)) local_[e.name] = to_array(e.tensor.detach().clone());
  }
  NamedArrays& local_state() { return local_; }
  void set_trained(bool t) { trained_ = t; }
  bool held_out() const { return held_out_; }
  const SiteData& data() const { return data_; }

 private:
  Message train_round(const Message& in) {
    settings_ = protocol::read_train_request(in);
    if (data_.train.empty()) {
      // Nothing to learn from: no upload to weigh, and no loss to claim (the coordinator skips
      // the site). The local state is left as it was: re-estimating BatchNorm statistics from no
      // images would reset them.
      return protocol::empty_update(name_, round_);
    }
    calls_ = 0;  // per-round stream of shuffling seeds: a resumed run replays it exactly
    load_model_state();
    const int epochs = settings_.local_epochs;
    torch::manual_seed(derive_seed(cfg_.config->seed, "torch/" + name_, round_));
    TrainResult r = adapter_.train_local(*this, epochs);
    if (cfg_.config->training.precise_bn) recalibrate_batchnorm();
    trained_ = true;
    save_local_state();
    NamedArrays upload;
    for (auto& e : model_.state())
      if (shared_.count(e.name)) upload[e.name] = to_array(e.tensor.detach().clone());
    if (!filters_.empty()) {
      std::mt19937_64 rng(derive_seed(cfg_.config->seed, "filter/" + name_, round_));
      FilterContext ctx{name_, round_, &rng};
      for (auto& f : filters_) f->apply(upload, global_, ctx);
    }
    return protocol::update(name_, round_, std::move(upload), double(data_.train.size()), r.loss,
                            r.steps);
  }

  Message evaluate(const std::string& phase) {
    load_model_state();
    if (cfg_.config->training.precise_bn && trained_ && has_local_buffers()) {
      // Site-local statistics (FedBN, SiloBN) were estimated with the site's own weights before
      // aggregation; re-estimate them for the weights just received. Shared entries stay global.
      recalibrate_batchnorm();
      restore_shared();
    }
    if (!trained_) adapter_.prepare_unseen_site(*this);
    adapter_.before_evaluate(*this);
    Predictions p;
    p.task = cfg_.task;
    p.num_classes = cfg_.num_classes;
    model_.set_training(false);
    {
      torch::NoGradGuard ng;
      const size_t bs = 64;
      for (size_t s = 0; s < data_.test.size(); s += bs) {
        std::vector<size_t> idx;
        for (size_t i = s; i < std::min(data_.test.size(), s + bs); ++i) idx.push_back(i);
        auto [x, y] = batch(data_.test, idx, nullptr);
        at::Tensor prob = torch::softmax(model_.forward(x), 1);
        if (cfg_.task == Task::Classification) {
          auto pc = prob.contiguous();
          const float* pp = pc.data_ptr<float>();
          p.probs.insert(p.probs.end(), pp, pp + pc.numel());
          auto yc = y.contiguous();
          const int64_t* yy = yc.data_ptr<int64_t>();
          p.labels.insert(p.labels.end(), yy, yy + yc.numel());
        } else {
          at::Tensor pred = prob.argmax(1).to(torch::kUInt8).contiguous();
          at::Tensor truth = y.to(torch::kUInt8).contiguous();
          const int64_t per = pred[0].numel();
          for (int64_t i = 0; i < pred.size(0); ++i) {
            const uint8_t* a = pred[i].data_ptr<uint8_t>();
            const uint8_t* b = truth[i].data_ptr<uint8_t>();
            p.pred_masks.emplace_back(a, a + per);
            p.true_masks.emplace_back(b, b + per);
          }
        }
      }
    }
    std::map<std::string, double> values;
    for (const auto& [mname, metric] : metrics_)
      if (metric->supports(cfg_.task) && p.size() > 0) values[mname] = metric->compute(p);
    return protocol::metrics(name_, round_, phase, int64_t(data_.test.size()), values);
  }

  // Builds an NCHW batch; training batches get the augmenting harmonizers.
  std::pair<at::Tensor, at::Tensor> batch(const std::vector<Sample>& samples,
                                          const std::vector<size_t>& idx, std::mt19937_64* rng) {
    std::vector<at::Tensor> xs, ys;
    for (size_t i : idx) {
      const Sample& s = samples[i];
      if (rng && !harmonization_.augmenters().empty()) {
        Image im = s.image;
        for (Harmonizer* h : harmonization_.augmenters()) h->augment(im, *rng);
        xs.push_back(image_to_tensor(im));
      } else {
        xs.push_back(image_to_tensor(s.image));
      }
      if (cfg_.task == Task::Classification) {
        ys.push_back(torch::tensor({s.label}, torch::kLong));
      } else {
        if (!s.mask) throw SiteError(name_, "sample '" + s.id + "' has no mask");
        ys.push_back(image_to_tensor(*s.mask)[0].round().to(torch::kLong));
      }
    }
    at::Tensor x = torch::stack(xs);
    at::Tensor y = cfg_.task == Task::Classification ? torch::cat(ys) : torch::stack(ys);
    return {x, y};
  }

  at::Tensor task_loss(const at::Tensor& logits, const at::Tensor& y) {
    at::Tensor ce = torch::nn::functional::cross_entropy(logits, y);
    if (cfg_.task == Task::Classification) return ce;
    // Segmentation: cross-entropy + soft Dice over foreground classes.
    at::Tensor prob = torch::softmax(logits, 1);
    at::Tensor onehot = torch::one_hot(y, logits.size(1)).permute({0, 3, 1, 2}).to(torch::kFloat);
    at::Tensor inter = (prob * onehot).sum({0, 2, 3});
    at::Tensor denom = prob.sum({0, 2, 3}) + onehot.sum({0, 2, 3});
    at::Tensor dice = (2 * inter + 1) / (denom + 1);
    return ce + (1 - dice.slice(0, 1).mean());
  }

  static void restore_grad(std::vector<std::pair<at::Tensor, bool>>& saved) {
    for (auto& [t, g] : saved) t.set_requires_grad(g);
  }

  std::string name_;
  SiteData data_;
  bool held_out_;
  Model& model_;
  Adapter& adapter_;
  const std::set<std::string>& shared_;
  const NamedArrays& initial_;
  LocalConfig cfg_;
  SiteHarmonizers harmonization_;
  std::vector<std::unique_ptr<Filter>> filters_;
  const std::vector<std::pair<std::string, std::unique_ptr<Metric>>>& metrics_;
  const FaultPlan& faults_;
  NamedArrays global_, local_, store_;
  std::map<std::string, at::Tensor> received_;
  protocol::TrainSettings settings_;
  bool trained_ = false;
  int round_ = 0;
  int64_t calls_ = 0;
};

// The whole text of `file`, or "" when it cannot be read.
std::string read_text_or_empty(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string jsonl_line(const json& j) {
  return json_text(j) + "\n";
}

// Metric values as JSON: NaN (undefined, e.g. AUC with one class) as null.
json metrics_json(const std::map<std::string, double>& m) {
  json o = json::object();
  for (const auto& [k, v] : m) o[k] = std::isnan(v) ? json(nullptr) : json(v);
  return o;
}

}  // namespace

struct Experiment::Impl {
  PipelineConfig config;
  const Registry& registry;
  FaultPlan faults;
  std::unique_ptr<Model> model;
  std::unique_ptr<Adapter> adapter;
  std::unique_ptr<Aggregator> aggregator;
  std::vector<std::pair<std::string, std::unique_ptr<Metric>>> metrics;
  std::set<std::string> shared;
  NamedArrays initial;
  std::vector<std::unique_ptr<Site>> sites;
  std::vector<std::string> site_order;  // every site, in the dataset's order
  std::set<std::string> held;           // evaluation.held_out
  InProcessChannel channel;
  std::unique_ptr<Coordinator> coordinator;
  Federation federation_info;  // task, classes, notes (images live in the sites)
  NamedArrays final_global;
  // Everything that went wrong at a site or in a round, in order (RunSummary::failures).
  std::vector<std::string> failures;
  // Sites that could not take the harmonizer statistics: out of the rest of the run.
  std::set<std::string> dropped;

  Impl(PipelineConfig c, const Registry& r) : config(std::move(c)), registry(r) {}

  BuildContext ctx(const std::string& instance) const { return {config.seed, instance}; }

  void progress(const RunOptions& o, const std::string& phase, int done, int total) {
    if (o.on_progress) o.on_progress(phase, done, total);
  }

  // The dataset as every run builds it: plugin and arguments, pipeline seed, partition, scanner
  // shift, data.sites; checked for unknown site names and uniform sample sizes. Also fills
  // site_order and held (evaluation.held_out).
  Federation load_federation() {
    auto dataset = registry.create<Dataset>(Kind::Dataset, config.data.dataset.type,
                                            config.data.dataset.args, ctx("data.dataset"));
    Federation fed;
    try {
      fed = dataset->load(DataRequest{config.seed, config.data.sites});
    } catch (const std::exception& e) {
      throw Error(config.data.dataset.where.str() + ": dataset '" + config.data.dataset.type +
                  "': " + e.what());
    }
    if (config.data.partition.scheme != "none")
      fed = partition(std::move(fed), config.data.partition, derive_seed(config.seed, "partition"));
    if (config.data.scanner_shift > 0)
      apply_scanner_shift(fed, config.data.scanner_shift, derive_seed(config.seed, "scanner"));
    if (!config.data.sites.empty()) {
      std::vector<SiteData> keep;
      for (const auto& want : config.data.sites) {
        auto it = std::find_if(fed.sites.begin(), fed.sites.end(),
                               [&](const SiteData& s) { return s.name == want; });
        if (it == fed.sites.end()) {
          std::string have;
          for (const auto& s : fed.sites) have += " " + s.name;
          throw Error(config.file + ": data.sites names '" + want +
                      "', which the dataset does not have (it has:" + have + ")");
        }
        keep.push_back(std::move(*it));
      }
      fed.sites = std::move(keep);
    }
    if (fed.sites.empty())
      throw Error("dataset '" + config.data.dataset.type + "' produced no sites");
    std::set<std::string> names;
    for (const auto& s : fed.sites) names.insert(s.name);
    site_order.clear();
    for (const auto& s : fed.sites) site_order.push_back(s.name);
    held =
        std::set<std::string>(config.evaluation.held_out.begin(), config.evaluation.held_out.end());
    for (const auto& h : config.evaluation.held_out)
      if (!names.count(h))
        throw Error(config.file + ": evaluation.held_out names unknown site '" + h + "'");
    for (const auto& [s, p] : config.federation.site_availability)
      if (!names.count(s))
        throw Error(config.file + ": federation.site_availability names unknown site '" + s + "'");
    const Sample* first = first_sample(fed);
    if (!first) throw Error("dataset '" + config.data.dataset.type + "' has no samples");
    for (const auto& s : fed.sites)
      for (const auto* split : {&s.train, &s.test})
        for (const auto& smp : *split)
          if (smp.image.size != first->image.size || smp.image.channels != first->image.channels)
            throw Error(
                "site '" + s.name + "': sample '" + smp.id + "' is " +
                std::to_string(smp.image.size[0]) + "x" + std::to_string(smp.image.size[1]) + "x" +
                std::to_string(smp.image.channels) + ", others " +
                std::to_string(first->image.size[0]) + "x" + std::to_string(first->image.size[1]) +
                "x" + std::to_string(first->image.channels) + " (set the dataset's size/channels)");

    return fed;
  }

  // The first sample (train split first): the one every other sample must match in size.
  static const Sample* first_sample(const Federation& fed) {
    for (const bool train : {true, false})
      for (const auto& s : fed.sites) {
        const auto& split = train ? s.train : s.test;
        if (!split.empty()) return &split.front();
      }
    return nullptr;
  }

  void setup(const RunOptions& options) {
    if (config.training.threads > 0) torch::set_num_threads(config.training.threads);
    // Data
    progress(options, "loading data", 0, 1);
    Federation fed = load_federation();
    const Sample* first = first_sample(fed);

    // Model, initialised from the seed.
    torch::manual_seed(derive_seed(config.seed, "model-init"));
    model = registry.create<Model>(Kind::Model, config.model.type, config.model.args, ctx("model"));
    ModelSpec spec;
    spec.task = fed.task;
    spec.in_channels = fed.channels;
    spec.num_classes = fed.num_classes;
    spec.image_size = {first->image.size[0], first->image.size[1]};
    model->build(spec);
    for (auto& e : model->state()) initial[e.name] = to_array(e.tensor.detach().clone());

    // Adapter (default: everything shared, plain local training).
    if (config.adapter)
      adapter = registry.create<Adapter>(Kind::Adapter, config.adapter->type, config.adapter->args,
                                         ctx("adapter"));
    else
      adapter = std::make_unique<Adapter>();
    try {
      adapter->attach(*model);
    } catch (const std::exception& e) {
      throw Error((config.adapter
                       ? config.adapter->where.str() + ": adapter '" + config.adapter->type + "': "
                       : "") +
                  e.what());
    }
    NamedArrays global;
    for (auto& e : model->state())
      if (adapter->is_shared(e)) {
        shared.insert(e.name);
        global[e.name] = initial.at(e.name);
      }
    aggregator = registry.create<Aggregator>(Kind::Aggregator, config.aggregator.type,
                                             config.aggregator.args, ctx("aggregator"));

    // Metrics (defaults by task).
    std::vector<Component> mcomps = config.evaluation.metrics;
    if (mcomps.empty()) {
      std::vector<std::string> defaults =
          fed.task == Task::Classification
              ? std::vector<std::string>{"accuracy", "balanced-accuracy", "roc-auc"}
              : std::vector<std::string>{"dice"};
      for (const auto& n : defaults)
        if (const PluginDesc* d = registry.find(Kind::Metric, n))
          mcomps.push_back({n, make_args(n, d->args), {}});
    }
    for (const auto& m : mcomps) {
      auto metric = registry.create<Metric>(Kind::Metric, m.type, m.args, ctx("metric"));
      if (!metric->supports(fed.task))
        throw Error(m.where.str() + ": metric '" + m.type + "' does not support " +
                    task_name(fed.task) + " data");
      metrics.emplace_back(m.type, std::move(metric));
    }

    federation_info.task = fed.task;
    federation_info.num_classes = fed.num_classes;
    federation_info.channels = fed.channels;
    federation_info.notes = fed.notes;
    for (const auto& [k, v] : fed.notes)
      if (k.rfind("scanner.", 0) == 0) spdlog::info("{} scanner: {}", k.substr(8), v);
    LocalConfig lc{&config, fed.task, fed.num_classes};
    for (const auto& sd : fed.sites)
      if (sd.test.empty() && (held.count(sd.name) || sd.train.empty()))
        spdlog::warn("site '{}' has no {}images: it will report nothing", sd.name,
                     held.count(sd.name) ? "test " : "");
    for (auto& sd : fed.sites) {
      std::vector<std::unique_ptr<Harmonizer>> hs = site_harmonizers(sd.name);
      std::vector<std::unique_ptr<Filter>> fs;
      for (const auto& f : config.filters)
        fs.push_back(registry.create<Filter>(Kind::Filter, f.type, f.args, ctx(sd.name)));
      std::string name = sd.name;
      auto site = std::make_unique<Site>(name, std::move(sd), held.count(name) > 0, *model,
                                         *adapter, shared, initial, lc, std::move(hs),
                                         std::move(fs), metrics, faults);
      Site* raw = site.get();
      channel.connect(name, [raw](const Bytes& b) { return raw->handle(b); });
      sites.push_back(std::move(site));
    }
    const size_t trainers = site_names(false).size();
    if (trainers == 0)
      throw Error(config.file + ": evaluation.held_out names every site: none is left to train");
    if (size_t(config.federation.min_sites) > trainers)
      throw Error(
          config.file + ": federation.min_sites = " + std::to_string(config.federation.min_sites) +
          " but only " + std::to_string(trainers) + " sites train: no round could ever aggregate");
    coordinator = std::make_unique<Coordinator>(channel, *aggregator, config.seed);
    coordinator->set_global(std::move(global));
  }

  std::vector<std::string> site_names(bool include_held_out) const {
    std::vector<std::string> out;
    for (const auto& s : site_order)
      if ((include_held_out || !held.count(s)) && !dropped.count(s)) out.push_back(s);
    return out;
  }

  // One site's instances of the pipeline's harmonizers.
  std::vector<std::unique_ptr<Harmonizer>> site_harmonizers(const std::string& site) const {
    std::vector<std::unique_ptr<Harmonizer>> hs;
    for (const auto& h : config.harmonizers)
      hs.push_back(registry.create<Harmonizer>(Kind::Harmonizer, h.type, h.args, ctx(site)));
    return hs;
  }

  // Federated fit phase of harmonizers[0..last] (all when last < 0), in order; `given`
  // replaces the fit of harmonizers[last]. Returns the global statistics each one broadcast.
  // A site whose fit fails or whose statistics protocol::read_statistics() refuses is left out of
  // the combination; a site that cannot take the combined statistics is dropped from the run. Both
  // are listed in `failures`.
  std::vector<Stats> fit_harmonizers(const RunOptions& o, int last = -1,
                                     const std::optional<Stats>& given = std::nullopt) {
    const size_t n = last < 0 ? config.harmonizers.size() : size_t(last) + 1;
    std::vector<Stats> broadcast;
    for (size_t i = 0; i < n; ++i) {
      const auto& hc = config.harmonizers[i];
      const std::string label = "harmonizer " + std::to_string(i) + " (" + hc.type + ")";
      progress(o, "harmonizer " + hc.type, int(i), int(config.harmonizers.size()));
      auto combiner =
          registry.create<Harmonizer>(Kind::Harmonizer, hc.type, hc.args, ctx("coordinator"));
      const bool from_given = given && i + 1 == n;
      const bool fit = !from_given && combiner->needs_fit();
      Stats global;
      size_t contributed = 0;
      if (from_given) {
        global = *given;
      } else if (fit) {
        std::vector<Stats> parts = site_statistics(i, label);
        contributed = parts.size();
        if (parts.empty())
          throw Error(label + ": no site sent usable statistics (see the errors above)");
        try {
          global = combiner->combine(parts);
        } catch (const std::exception& e) {
          throw Error(label + ": combining the statistics of " + std::to_string(parts.size()) +
                      " sites failed: " + e.what());
        }
      }
      broadcast.push_back(global);
      Bytes bytes = encode(protocol::set_statistics(i, std::move(global)));
      for (const auto& name : site_names(true)) {
        try {
          if (std::string why = protocol::ack_problem(decode(channel.call(name, bytes)));
              !why.empty())
            throw Error(why);
        } catch (const std::exception& e) {
          fail("fit: " + label + ": site '" + name +
               "' could not apply the statistics: " + e.what() + " (site dropped from the run)");
          dropped.insert(name);
        }
      }
      const std::string how = from_given ? "given statistics"
                              : fit      ? "fitted on " + std::to_string(contributed) + " sites"
                                         : "site-local (nothing to fit)";
      spdlog::info("{}: {}, applied at {} sites", label, how, site_names(true).size());
    }
    return broadcast;
  }

  // Every training site's fit_site() statistics for harmonizers[i], minus the ones that fail or
  // that protocol::read_statistics() refuses. The entries most sites agree on (names, dtypes,
  // shapes) are the
  // reference, so one odd site cannot make the others look wrong.
  std::vector<Stats> site_statistics(size_t i, const std::string& label) {
    const Bytes request = encode(protocol::fit_request(i));
    std::vector<std::pair<std::string, Stats>> replies;
    for (const auto& name : site_names(false)) {  // held-out sites do not contribute
      try {
        auto stats = protocol::read_statistics(decode(channel.call(name, request)));
        if (!stats.ok()) throw Error(stats.problem);
        replies.emplace_back(name, std::move(*stats.value));
      } catch (const std::exception& e) {
        fail("fit: " + label + ": site '" + name + "': " + e.what() + " (left out)");
      }
    }
    const Stats* reference = nullptr;
    size_t best = 0;
    for (const auto& [name, candidate] : replies) {
      size_t agree = 0;
      for (const auto& [other, s] : replies)
        agree += protocol::statistics_mismatch(s, candidate).empty();
      if (agree > best) best = agree, reference = &candidate;
    }
    std::vector<Stats> parts;
    for (const auto& [name, stats] : replies) {
      if (std::string why = protocol::statistics_mismatch(stats, *reference); !why.empty()) {
        fail("fit: " + label + ": site '" + name + "': " + why + " (left out)");
        continue;
      }
      parts.push_back(stats);
      parts.back().site = name;
    }
    return parts;
  }

  void fail(const std::string& what) {
    spdlog::error("{}", what);
    failures.push_back(what);
  }

  // Experiment::harmonize: the dataset and the harmonizer phase only. Each site is its images
  // and its SiteHarmonizers behind the same Channel requests a training Site answers.
  HarmonizeResult harmonize(const HarmonizeOptions& o) {
    const int count = int(config.harmonizers.size());
    if (count == 0) throw Error(config.file + ": the pipeline has no harmonizers");
    const int last = o.last < 0 ? count - 1 : o.last;
    if (last >= count)
      throw Error(config.file + ": harmonizers[" + std::to_string(last) +
                  "] does not exist: the pipeline has " + std::to_string(count) +
                  " harmonizer(s), numbered from 0");
    HarmonizeResult result;
    result.federation = load_federation();
    if (o.keep_unharmonized) result.unharmonized = result.federation;
    result.fitted_sites = site_names(false);
    for (const auto& sd : result.federation.sites)
      if (!held.count(sd.name)) result.fitted_images += int64_t(sd.train.size());
    int fits = 0;
    for (int i = 0; i <= last; ++i)
      if (!(o.last_stats && i == last) &&
          registry
              .create<Harmonizer>(Kind::Harmonizer, config.harmonizers[size_t(i)].type,
                                  config.harmonizers[size_t(i)].args, ctx("coordinator"))
              ->needs_fit())
        fits += int(result.fitted_sites.size());
    int fitted = 0;
    std::vector<std::unique_ptr<SiteHarmonizers>> harmonizers;
    for (auto& sd : result.federation.sites) {
      harmonizers.push_back(std::make_unique<SiteHarmonizers>(sd.name, site_harmonizers(sd.name)));
      SiteHarmonizers* h = harmonizers.back().get();
      SiteData* data = &sd;
      channel.connect(sd.name, [&, h, data](const Bytes& b) {
        Message in = decode(b);
        const bool fit = protocol::request_kind(in) == protocol::Request::Fit;
        const std::string phase =
            fit ? "fit " +
                      config.harmonizers[protocol::read_harmonizer(in, config.harmonizers.size())]
                          .type
                : "";
        const std::string type = in.type;
        std::optional<Message> out = h->handle(in, *data);
        if (!out) throw SiteError(data->name, "unknown request '" + type + "'");
        if (fit && o.on_progress) o.on_progress(phase, ++fitted, fits);
        return encode(*out);
      });
    }
    result.stats = fit_harmonizers(RunOptions{}, last, o.last_stats);
    // Harmonizing files must not leave a site's images out quietly: any site problem is fatal.
    if (!failures.empty()) {
      std::string all;
      for (const auto& f : failures) all += "\n  " + f;
      throw Error("the harmonizer fit failed at some sites:" + all);
    }
    return result;
  }

  std::map<std::string, std::map<std::string, double>> evaluate(int round,
                                                                const std::string& phase) {
    std::map<std::string, std::map<std::string, double>> out;
    for (const auto& name : site_names(true)) {
      try {
        auto rep = protocol::read_metrics(
            coordinator->call(name, protocol::evaluate_request(round, phase)));
        if (!rep.ok()) throw SiteError(name, rep.problem);
        out[name] = std::move(rep.value->values);
      } catch (const std::exception& e) {
        fail("round " + std::to_string(round) + ": evaluate (" + phase +
             "): " + site_failure(name, e));
      }
    }
    return out;
  }

  // --- checkpoints: global state, every site's local state and store, aggregator state ---
  void save_checkpoint(const fs::path& dir, int round) {
    protocol::Checkpoint c;
    c.round = round;
    c.global = coordinator->global();
    c.aggregator = aggregator->state();
    for (auto& s : sites)
      c.sites[s->site()] = {s->local_state(), s->site_store(), s->has_trained()};
    c.pipeline = config.resolved_yaml;
    c.failures = failures;  // the summary of a resumed run keeps them
    Bytes b = encode(protocol::checkpoint(c));
    char fname[64];
    std::snprintf(fname, sizeof(fname), "round-%04d.ckpt", round);
    write_file_atomic((dir / fname).string(), b->data(), b->size());
    write_file_atomic((dir / "latest").string(), std::string(fname) + "\n");
    // Keep the two newest checkpoints.
    std::vector<fs::path> all;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".ckpt") all.push_back(e.path());
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i + 2 < all.size(); ++i) fs::remove(all[i]);
  }

  // Restores the newest readable checkpoint in `dir` and returns its round; 0 when the run
  // has none yet (killed before its first checkpoint: it starts again from round 1). A checkpoint
  // that cannot be read or does not fit this experiment is named in a warning and the previous
  // one is tried; when none can be read, every file and its problem is in the error.
  int load_checkpoint(const fs::path& dir) {
    std::vector<fs::path> candidates;
    {
      std::ifstream latest(dir / "latest");
      std::string fname;
      if (latest >> fname && fs::path(fname).filename() == fs::path(fname))
        candidates.push_back(dir / fname);
    }
    std::vector<fs::path> all;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".ckpt") all.push_back(it->path());
    std::sort(all.rbegin(), all.rend());  // newest first (round-NNNN)
    for (const auto& f : all)
      if (std::find(candidates.begin(), candidates.end(), f) == candidates.end())
        candidates.push_back(f);
    if (candidates.empty() && !fs::exists(dir / "latest")) return 0;
    std::string problems;
    for (const auto& file : candidates) {
      try {
        return restore_checkpoint(file);
      } catch (const std::exception& e) {
        spdlog::warn("checkpoint {} is unusable ({}); trying the previous one", file.string(),
                     e.what());
        problems += "\n  " + file.string() + ": " + e.what();
      }
    }
    if (candidates.empty()) problems = "\n  " + (dir / "latest").string() + " names no checkpoint";
    throw Error("cannot resume: no usable checkpoint in " + dir.string() + ":" + problems);
  }

  // Reads one checkpoint, checks it against this experiment, and only then installs it.
  int restore_checkpoint(const fs::path& file) {
    std::vector<std::string> names;
    for (auto& s : sites) names.push_back(s->site());
    protocol::Checkpoint c = protocol::read_checkpoint(decode(read_file(file.string())), names);
    // run() checked that the stored pipeline.yaml is this pipeline.
    if (c.pipeline != config.resolved_yaml)
      throw Error("written for another pipeline than the run folder's pipeline.yaml");
    if (c.round < 1 || c.round > config.federation.rounds)
      throw Error("round " + std::to_string(c.round) + " is outside 1.." +
                  std::to_string(config.federation.rounds));
    for (const auto& [name, st] : c.sites)
      for (const auto& [entry, a] : st.local) {
        auto init = initial.find(entry);
        if (init == initial.end() || shared.count(entry))
          throw Error("site '" + name + "' has unexpected local entry '" + entry + "'");
        if (std::string why = protocol::state_mismatch({{entry, init->second}}, {{entry, a}});
            !why.empty())
          throw Error("site '" + name + "' local state: " + why);
      }
    if (std::string why = protocol::state_mismatch(coordinator->global(), c.global); !why.empty())
      throw Error("global state " + why);
    if (std::string bad = protocol::non_finite_entry(c.global); !bad.empty())
      throw Error("global state: non-finite values in '" + bad + "'");
    aggregator->load_state(c.aggregator);
    failures = std::move(c.failures);  // the replayed fit phase logged its failures again
    for (auto& s : sites) {
      protocol::SiteState& st = c.sites[s->site()];
      s->local_state() = std::move(st.local);
      s->site_store() = std::move(st.store);
      s->set_trained(st.trained);
    }
    coordinator->set_global(std::move(c.global));
    return int(c.round);
  }
};

Experiment::Experiment(PipelineConfig config, const Registry& registry)
    : impl_(std::make_unique<Impl>(std::move(config), registry)) {}
Experiment::~Experiment() = default;
HarmonizeResult Experiment::harmonize(const HarmonizeOptions& options) {
  return impl_->harmonize(options);
}
void Experiment::inject_faults(FaultPlan plan) {
  impl_->faults = std::move(plan);
}
const NamedArrays& Experiment::global_state() const {
  return impl_->final_global;
}

static void summarise(RunSummary& summary, const std::vector<std::string>& metric_names) {
  for (const auto& m : metric_names) {
    double sum = 0, worst = INFINITY;
    int n = 0;
    for (const auto& s : summary.sites) {
      if (s.held_out || !s.metrics.count(m) || std::isnan(s.metrics.at(m))) continue;
      sum += s.metrics.at(m);
      worst = std::min(worst, s.metrics.at(m));
      ++n;
    }
    if (n) {
      summary.mean[m] = sum / n;
      summary.worst[m] = worst;
    }
  }
}

RunSummary Experiment::run(const RunOptions& options) {
  Impl& x = *impl_;
  const auto& cfg = x.config;
  fs::path run_dir =
      options.run_dir.empty() ? fs::path(cfg.output) / cfg.name : fs::path(options.run_dir);
  fs::path ckpt_dir = run_dir / "checkpoints";
  const fs::path stored_pipeline = run_dir / "pipeline.yaml";
  if (!options.resume && (fs::exists(ckpt_dir / "latest") || fs::exists(stored_pipeline)))
    throw Error("run folder " + run_dir.string() +
                " already holds a run; use --resume to continue it or choose another folder");
  if (options.resume && read_text_or_empty(stored_pipeline) != cfg.resolved_yaml)
    throw Error("cannot resume " + run_dir.string() + ": " +
                (fs::exists(stored_pipeline)
                     ? "the pipeline differs from the one the run started with"
                     : std::string("no pipeline.yaml (is it a run folder?)")));

  // Set-up first: a run that cannot start leaves no run folder behind.
  auto t0 = std::chrono::steady_clock::now();
  x.setup(options);
  x.fit_harmonizers(options);
  fs::create_directories(ckpt_dir);
  if (!options.resume) write_file_atomic(stored_pipeline.string(), cfg.resolved_yaml);
  int start_round = 1;
  fs::path metrics_file = run_dir / "metrics.jsonl";
  if (options.resume) {
    const int done = x.load_checkpoint(ckpt_dir);
    start_round = done + 1;
    // Drop metric lines written after the checkpoint (an interrupted round, perhaps cut short).
    std::ifstream in(metrics_file);
    std::string kept, line;
    while (std::getline(in, line)) {
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.value("round", 0) <= done) kept += line + "\n";
    }
    write_file_atomic(metrics_file.string(), kept);
    if (done == 0)
      spdlog::warn("{} has no checkpoint yet: starting again from round 1", run_dir.string());
    else
      spdlog::info("resuming {} after round {}", run_dir.string(), done);
  } else {
    write_file_atomic(metrics_file.string(), std::string());
  }
  std::ofstream metrics_out(metrics_file, std::ios::app);

  RunSummary summary;
  summary.run_dir = run_dir.string();
  const auto train_sites = x.site_names(false);
  const auto all_sites = x.site_names(true);
  for (const auto& f : x.coordinator->broadcast(start_round - 1, all_sites))  // initial model
    x.fail("round " + std::to_string(start_round - 1) + ": broadcast: " + f);

  std::map<std::string, std::map<std::string, double>> last_eval;
  std::map<std::string, double> settings = x.aggregator->client_settings();
  settings[protocol::kLocalEpochs] = cfg.training.local_epochs;
  int round = start_round;
  for (; round <= cfg.federation.rounds; ++round) {
    const std::string phase =
        "round " + std::to_string(round) + "/" + std::to_string(cfg.federation.rounds);
    x.progress(options, phase, 0, 3);
    // 1. select
    auto selected =
        x.coordinator->select(round, train_sites, cfg.federation.fraction,
                              cfg.federation.availability, cfg.federation.site_availability);
    spdlog::debug("{}: selected {} of {} sites", phase, selected.size(), train_sites.size());
    // 2-4. local training, upload, aggregation
    auto outcome = x.coordinator->train_round(
        round, cfg.federation.rounds, selected, settings, cfg.federation.min_sites,
        [&](const std::string& site, size_t k, size_t n) {
          x.progress(options,
                     phase + ": " + site + " training (" + std::to_string(k + 1) + "/" +
                         std::to_string(n) + ")",
                     int(k), int(n));
        });
    for (const auto& f : outcome.failures)
      x.failures.push_back("round " + std::to_string(round) + ": " + f);
    if (!outcome.aggregated)
      x.failures.push_back("round " + std::to_string(round) +
                           ": not aggregated: " + outcome.not_aggregated);
    if (!outcome.updates.empty()) {
      double loss = 0, n = 0;
      for (const auto& u : outcome.updates)
        loss += u.train_loss * u.num_samples, n += u.num_samples;
      spdlog::info("{}: {} sites trained, mean train loss {:.4f}{}", phase, outcome.updates.size(),
                   n > 0 ? loss / n : 0.0, outcome.aggregated ? "" : " (not aggregated)");
    }
    x.progress(options, phase, 1, 3);
    // 5. broadcast
    for (const auto& f : x.coordinator->broadcast(round, all_sites))
      x.failures.push_back("round " + std::to_string(round) + ": broadcast: " + f);
    x.progress(options, phase, 2, 3);
    // evaluation
    bool eval_now = round % cfg.evaluation.every == 0 || round == cfg.federation.rounds;
    if (eval_now) last_eval = x.evaluate(round, protocol::kPhaseGlobal);
    std::map<std::string, const SiteUpdate*> by_site;
    for (const auto& u : outcome.updates) by_site[u.site] = &u;
    const std::set<std::string> skipped(outcome.skipped.begin(), outcome.skipped.end());
    std::string lines;
    for (const auto& name : all_sites) {
      json j{{"round", round},
             {"site", name},
             {"held_out",
              std::find(train_sites.begin(), train_sites.end(), name) == train_sites.end()},
             {"selected", std::find(selected.begin(), selected.end(), name) != selected.end()},
             {"aggregated", outcome.aggregated}};
      if (by_site.count(name)) {
        j[protocol::kTrainLoss] = by_site[name]->train_loss;
        j[protocol::kNumSamples] = by_site[name]->num_samples;
      }
      if (skipped.count(name)) j["skipped"] = "no training samples";
      if (eval_now && last_eval.count(name)) {
        j["metrics"] = metrics_json(last_eval[name]);
      }
      lines += jsonl_line(j);
    }
    metrics_out << lines;
    metrics_out.flush();
    x.save_checkpoint(ckpt_dir, round);
    x.progress(options, phase, 3, 3);
    if (eval_now) {
      std::string msg;  // the first metric of each site keeps the line short
      for (const auto& [site, m] : last_eval)
        if (!m.empty())
          msg +=
              " " + site + " " + m.begin()->first + "=" + fmt::format("{:.3f}", m.begin()->second);
      spdlog::info("{}:{}", phase, msg);
    }
    summary.rounds_completed = round;
    if (options.on_round) options.on_round(round);
    if (options.stop_after_round == round) {
      x.final_global = x.coordinator->global();
      summary.failures = x.failures;
      return summary;
    }
  }
  summary.rounds_completed = cfg.federation.rounds;
  if (last_eval.empty()) last_eval = x.evaluate(cfg.federation.rounds, protocol::kPhaseGlobal);

  // Personalisation (adapter), then evaluate again.
  std::map<std::string, std::map<std::string, double>> personalized;
  if (x.adapter->personalizes()) {
    for (const auto& name : all_sites) {
      try {
        Message reply =
            x.coordinator->call(name, protocol::personalize_request(cfg.federation.rounds));
        if (std::string why = protocol::ack_problem(reply); !why.empty())
          throw SiteError(name, why);
      } catch (const std::exception& e) {
        x.fail("personalize: " + site_failure(name, e));
      }
    }
    personalized = x.evaluate(cfg.federation.rounds, protocol::kPhasePersonalized);
    std::string lines;
    for (const auto& [name, m] : personalized) {
      lines += jsonl_line({{"round", cfg.federation.rounds},
                           {"site", name},
                           {"phase", protocol::kPhasePersonalized},
                           {"metrics", metrics_json(m)}});
    }
    metrics_out << lines;
  }

  std::vector<std::string> metric_names;
  for (const auto& [n, m] : x.metrics) metric_names.push_back(n);
  for (const auto& name : all_sites) {
    SiteResult r;
    r.site = name;
    r.held_out = std::find(train_sites.begin(), train_sites.end(), name) == train_sites.end();
    r.metrics = last_eval[name];
    r.personalized = personalized[name];
    summary.sites.push_back(r);
  }
  summarise(summary, metric_names);
  summary.failures = x.failures;

  // Final model: load the global state (and no site's local part) and write it.
  x.final_global = x.coordinator->global();
  {
    torch::NoGradGuard ng;
    for (auto& e : x.model->state()) {
      const Array& a =
          x.final_global.count(e.name) ? x.final_global.at(e.name) : x.initial.at(e.name);
      e.tensor.copy_(to_tensor(a));
    }
  }
  x.model->save((run_dir / "model.pt").string());
  Bytes gb = encode(protocol::global_state(cfg.federation.rounds, x.final_global));
  write_file_atomic((run_dir / "global.state").string(), gb->data(), gb->size());

  json js;
  js["name"] = cfg.name;
  js["seed"] = cfg.seed;
  js["rounds"] = summary.rounds_completed;
  js["task"] = task_name(x.federation_info.task);
  js["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json jsites = json::array();
  for (const auto& s : summary.sites) {
    json o{{"site", s.site}, {"held_out", s.held_out}, {"metrics", metrics_json(s.metrics)}};
    if (!s.personalized.empty()) o["personalized"] = metrics_json(s.personalized);
    jsites.push_back(o);
  }
  js["sites"] = jsites;
  js["mean"] = metrics_json(summary.mean);
  js["worst"] = metrics_json(summary.worst);
  js["failures"] = summary.failures;
  js["ok"] = summary.failures.empty();
  json notes = json::object();
  for (const auto& [k, v] : x.federation_info.notes) {
    try {
      notes[k] = json::parse(v);
    } catch (...) {
      notes[k] = v;
    }
  }
  js["data_notes"] = notes;
  write_file_atomic((run_dir / "summary.json").string(), json_text(js, 2) + "\n");
  return summary;
}

const char* task_name(Task t) {
  return t == Task::Classification ? "classification" : "segmentation";
}

}  // namespace concord
