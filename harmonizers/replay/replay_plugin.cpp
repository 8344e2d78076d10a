// replay: VAE generative replay (Qu et al., "Handling data heterogeneity with generative replay in
// collaborative learning for medical imaging", Medical Image Analysis 2022) as a learned
// harmonizer (harmonizer.h), trained by the engine's learned stage:
//   survey   each site declares its label counts, image size and intensity window (scalars)
//   plan     one phase "vae": every site trains the label-conditional VAE (vae.h) on its own
//            images; the stage's aggregator (FedAvg by default) averages its weights
//   result   the final VAE weights and the federation's label mix: what set_statistics receives
// Then, in the task stage, every training batch of `n` real samples gets round(ratio * n)
// samples decoded on the site from the global VAE, their labels drawn from the federation's label
// mix (or uniformly), so a site with few samples of a class trains on others' class styles too.
// Synthetic samples are made on the site and never leave it. apply() leaves images unchanged.
// Reconstruction and sample montages (PNG) are written to the run folder at the end of the stage.
#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/plugin_api.h>
#include <concord/seed.h>

#include "generative_common.h"
#include "montage.h"
#include "vae.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <memory>
#include <numeric>

namespace concord {
namespace {

class ReplayHarmonizer : public Harmonizer {
 public:
  ReplayHarmonizer(const Args& args, const BuildContext& ctx) : seed_(ctx.seed) {
    opts_.latent = args.integer("latent");
    opts_.width = args.integer("width");
    opts_.beta = args.real("beta");
    opts_.batch_size = args.integer("batch_size");
    site_conditional_ = args.flag("site_conditional");
    ratio_ = args.real("ratio");
    schedule_ = args.str("schedule");
    uniform_labels_ = args.str("label_mix") == "uniform";
    montage_ = args.flag("montage");
  }

  bool learned() const override { return true; }
  StageSettings default_stage() const override { return {5, 1, 1e-3}; }

  Stats fit_site(const ImageSource&) override {
    throw Error("replay: the survey needs labels (it runs in the learned stage)");
  }

  Stats survey(const LearnedSiteData& d) override {
    if (d.num_classes < 2)
      throw Error("replay: needs a classification task (labels of 2 or more classes)");
    Stats s;
    std::vector<double> counts(size_t(d.num_classes), 0.0);
    std::vector<const Image*> images;
    for (const auto& sample : *d.train) {
      if (sample.label < 0 || sample.label >= d.num_classes)
        throw Error("replay: sample '" + sample.id + "' has label " + std::to_string(sample.label));
      counts[size_t(sample.label)] += 1;
      images.push_back(&sample.image);
    }
    if (images.empty()) return s;
    const auto r = generative::fit_range(images);
    const Image& first = *images.front();
    s.arrays["label_counts"] = Array::from(counts);
    s.scalars["width"] = double(first.size[0]);
    s.scalars["height"] = double(first.size[1]);
    s.scalars["depth"] = double(first.size[2]);
    s.scalars["channels"] = double(first.channels);
    s.scalars["range_lo"] = r.lo;
    s.scalars["range_hi"] = r.hi;
    s.weight = double(images.size());
    return s;
  }

  LearnedPlan plan(const std::vector<Stats>& survey, const StageSettings& settings) override {
    LearnedPlan p;
    Stats& sh = p.shared;
    std::vector<double> counts;
    double lo = INFINITY, hi = -INFINITY;
    const Stats& first = survey.front();
    for (size_t i = 0; i < survey.size(); ++i) {
      const Stats& s = survey[i];
      for (const char* k : {"width", "height", "depth", "channels"})
        if (s.scalars.at(k) != first.scalars.at(k))
          throw Error("replay: site '" + s.site + "' has images of another " + k + " than site '" +
                      first.site + "': resample first");
      auto c = s.arrays.at("label_counts").to_vector<double>();
      if (counts.empty()) counts.assign(c.size(), 0.0);
      for (size_t k = 0; k < c.size() && k < counts.size(); ++k) counts[k] += c[k];
      lo = std::min(lo, s.scalars.at("range_lo"));
      hi = std::max(hi, s.scalars.at("range_hi"));
      sh.scalars["site/" + s.site] = double(i);
    }
    if (first.scalars.at("depth") != 1) throw Error("replay: 2D images only");
    const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
    for (size_t k = 0; k < counts.size(); ++k)
      sh.scalars["mix/" + std::to_string(k)] = total > 0 ? counts[k] / total : 0;
    sh.scalars["num_classes"] = double(counts.size());
    sh.scalars["num_sites"] = double(survey.size());
    sh.scalars["size"] = first.scalars.at("width");
    if (first.scalars.at("width") != first.scalars.at("height"))
      throw Error("replay: the VAE needs square images");
    sh.scalars["channels"] = first.scalars.at("channels");
    sh.scalars["range_lo"] = lo;
    sh.scalars["range_hi"] = hi > lo ? hi : lo + 1;
    sh.weight = 1;
    configure(sh, settings.lr);
    LearnedPhase vae;
    vae.name = "vae";
    for (const auto& s : survey) vae.sites.push_back(s.site);
    vae.initial = replay::ConditionalVae(opts_, vae_seed()).state();
    vae.rounds = settings.rounds;
    vae.local_epochs = settings.local_epochs;
    p.phases = {vae};
    return p;
  }

  void learn_begin(const Stats& plan, const LearnedSiteData& d) override {
    site_ = d.site;
    output_dir_ = d.output_dir;
    configure(plan, d.settings.lr);
    images_.clear();
    labels_.clear();
    for (const auto& s : *d.train) {
      images_.push_back(s.image);
      labels_.push_back(s.label);
    }
    vae_.reset();
  }

  LearnedUpdate learn_round(const LearnedRound& r) override {
    if (!vae_) vae_ = std::make_unique<replay::ConditionalVae>(opts_, vae_seed());
    vae_->load_state(*r.global);
    const std::vector<int64_t> sites(site_conditional_ ? images_.size() : 0, site_index_);
    replay::VaeLosses l;
    for (int e = 0; e < r.local_epochs; ++e) {
      SeededRandom rng(derive_seed(seed_, "replay/train/" + site_, r.round * 1000 + e));
      l = vae_->train_epoch(images_, labels_, rng, sites);
    }
    LearnedUpdate u;
    u.shared = vae_->state();
    u.num_samples = double(images_.size());
    u.loss = l.loss;
    u.scalars["recon"] = l.recon;
    u.scalars["kl"] = l.kl;
    return u;
  }

  NamedArrays learned_state() const override {
    return vae_ ? vae_->optimizer_state() : NamedArrays{};
  }
  void load_learned_state(const NamedArrays& state) override {
    if (state.empty()) return;
    vae_ = std::make_unique<replay::ConditionalVae>(opts_, vae_seed());
    vae_->load_optimizer_state(state);
  }

  Stats learn_result(const NamedArrays& final_global) override {
    if (!vae_) vae_ = std::make_unique<replay::ConditionalVae>(opts_, vae_seed());
    vae_->load_state(final_global);
    if (montage_ && !output_dir_.empty()) write_montage();
    Stats s;
    s.arrays = final_global;
    s.scalars = plan_scalars_;
    s.weight = double(images_.size());
    return s;
  }

  // Every site sends the same final VAE: the first is kept, the weights add up.
  Stats combine(const std::vector<Stats>& parts) override {
    if (parts.empty()) throw Error("replay: no statistics to combine");
    Stats out = parts.front();
    out.site.clear();
    out.weight = 0;
    for (const auto& p : parts) out.weight += p.weight;
    return out;
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    site_ = site;
    configure(global, opts_.lr);
    vae_ = std::make_unique<replay::ConditionalVae>(opts_, vae_seed());
    vae_->load_state(global.arrays);
    mix_.clear();
    for (int64_t k = 0; k < opts_.num_classes; ++k)
      mix_.push_back(uniform_labels_ ? 1.0 / double(opts_.num_classes)
                                     : global.scalars.at("mix/" + std::to_string(k)));
  }

  void apply(Image&) const override {}

  bool replays() const override { return true; }
  void replay(const ReplayRequest& q, std::vector<Image>& images,
              std::vector<int64_t>& labels) const override {
    if (!vae_) throw Error("replay: replay() called before set_statistics()");
    double ratio = ratio_;
    const double progress = q.rounds > 1 ? double(q.round - 1) / double(q.rounds - 1) : 1.0;
    if (schedule_ == "ramp") ratio *= progress;
    if (schedule_ == "decay") ratio *= 1.0 - progress;
    const auto n = int64_t(std::llround(ratio * double(q.real)));
    if (n <= 0) return;
    std::vector<int64_t> want;
    for (int64_t i = 0; i < n; ++i) {
      double u = uniform01(*q.rng), acc = 0;
      int64_t k = 0;
      for (; k + 1 < int64_t(mix_.size()); ++k)
        if (u < (acc += mix_[size_t(k)])) break;
      want.push_back(k);
    }
    SeededRandom rng((*q.rng)());
    const std::vector<int64_t> sites(site_conditional_ ? want.size() : 0, site_index_);
    for (auto& im : vae_->sample(want, rng, sites)) images.push_back(std::move(im));
    labels.insert(labels.end(), want.begin(), want.end());
  }

 private:
  uint64_t vae_seed() const { return derive_seed(seed_, "replay/vae"); }

  // The VAE's options from the plan's (or the result's) scalars.
  void configure(const Stats& plan, double lr) {
    plan_scalars_ = plan.scalars;
    opts_.size = int64_t(plan.scalars.at("size"));
    opts_.channels = int64_t(plan.scalars.at("channels"));
    opts_.num_classes = int64_t(plan.scalars.at("num_classes"));
    opts_.num_sites = site_conditional_ ? int64_t(plan.scalars.at("num_sites")) : 0;
    opts_.range_lo = float(plan.scalars.at("range_lo"));
    opts_.range_hi = float(plan.scalars.at("range_hi"));
    opts_.lr = lr;
    plan_scalars_["lr"] = lr;
    auto it = plan.scalars.find("site/" + site_);
    site_index_ = it != plan.scalars.end() ? int64_t(it->second) : 0;
    opts_.validate();
  }

  // Inputs, their reconstructions, and 8 samples of each label, as one PNG per site.
  void write_montage() const {
    const size_t n = std::min<size_t>(8, images_.size());
    std::vector<Image> inputs(images_.begin(), images_.begin() + long(n));
    std::vector<int64_t> labels(labels_.begin(), labels_.begin() + long(n));
    const std::vector<int64_t> sites(site_conditional_ ? n : 0, site_index_);
    std::vector<std::vector<Image>> rows{inputs, vae_->reconstruct(inputs, labels, sites)};
    SeededRandom rng(derive_seed(seed_, "replay/montage/" + site_));
    for (int64_t k = 0; k < opts_.num_classes; ++k) {
      const std::vector<int64_t> want(8, k);
      rows.push_back(
          vae_->sample(want, rng, std::vector<int64_t>(site_conditional_ ? 8 : 0, site_index_)));
    }
    const std::string path = output_dir_ + "/replay-montage-" + site_ + ".png";
    replay::write_montage(path, rows, opts_.range_lo, opts_.range_hi);
    spdlog::info("replay: site '{}': montage (inputs, reconstructions, samples per label) in {}",
                 site_, path);
  }

  uint64_t seed_;
  replay::VaeOptions opts_;
  bool site_conditional_ = false, uniform_labels_ = false, montage_ = true;
  double ratio_ = 0.5;
  std::string schedule_, site_, output_dir_;
  std::map<std::string, double> plan_scalars_;
  int64_t site_index_ = 0;
  std::vector<Image> images_;
  std::vector<int64_t> labels_;
  std::vector<double> mix_;
  std::unique_ptr<replay::ConditionalVae> vae_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-replay", "0.1.0") {
  using concord::ArgSpec;
  registry.add(
      {concord::Kind::Harmonizer,
       "replay",
       "Learned: label-conditional VAE trained federatedly; sites add decoded samples to task "
       "training (Qu et al. 2022)",
       {ArgSpec::integer("latent", 32, "VAE latent size").range(1, 4096),
        ArgSpec::integer("width", 32, "VAE width (channels of its first convolution)")
            .range(1, 1024),
        ArgSpec::real("beta", 1.0, "KL weight of the ELBO").range(0, 1000),
        ArgSpec::integer("batch_size", 32, "VAE batch size").range(1, 4096),
        ArgSpec::boolean("site_conditional", false, "Also condition the VAE on the site index"),
        ArgSpec::real("ratio", 0.5, "Synthetic samples per real sample in each training batch")
            .range(0, 8),
        ArgSpec::choice("schedule", {"constant", "ramp", "decay"}, "constant",
                        "ratio over the task rounds: constant, ramp (0 -> ratio) or decay "
                        "(ratio -> 0)"),
        ArgSpec::choice("label_mix", {"federation", "uniform"}, "federation",
                        "Labels of the synthetic samples: the federation's label mix or uniform"),
        ArgSpec::boolean("montage", true,
                         "Write replay-montage-<site>.png (inputs, reconstructions, samples)")},
       [](const concord::Args& a, const concord::BuildContext& c) {
         return std::make_unique<concord::ReplayHarmonizer>(a, c);
       }});
}
