// cyclegan: a learned harmonizer (harmonizer.h) that maps every site's images into one reference
// site's style (Yan et al., "Variation-aware federated learning with multi-source decentralized
// medical image data", IEEE JBHI 2021), trained by the engine's learned stage:
//   survey   each site declares one scalar, its image complexity (below), and its image size
//   plan     the reference is `reference_site`, or with `auto` the least complex site
//   phase 0  "style": the reference site trains StyleGan on its own images; only the
//            generator's weights (and its intensity window) leave it
//   phase 1  "cyclegan": every other site samples reference-style images from those weights
//            locally and trains a CycleGAN between its images and the samples; with
//            generator_sharing: federated the site -> reference generator is averaged by the
//            stage's aggregator, the reverse generator and the discriminators stay local
//   result   each site's generator (local) or the averaged one (federated) and the intensity
//            windows: what set_statistics receives and `harmonize apply --stats` reads
// apply() translates every image of a non-reference site (2D, or 3D slice by slice keeping its
// geometry); the reference site's images are left unchanged. Masks never reach a harmonizer.
//
// Image complexity: the mean absolute difference between neighbouring pixels (x and y, every
// slice and channel) divided by the width of the site's own 0.5-99.5 percentile intensity
// window. It is scale-free (scanners that differ only in gain or offset score alike), cheap, one
// scalar per site, and grows with noise, texture and sharp detail: the style a generator finds
// hardest to imitate. The least complex site is the reference, as the paper's unpublished
// measure intends (a clean reference is easier to map into than a noisy one).
#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/plugin_api.h>
#include <concord/seed.h>

#include "cyclegan.h"
#include "style_gan.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>

namespace concord {
namespace {

using cyclegan::Range;

const char* const kReferencePrefix = "reference/";  // plan: "reference/<site>" = 1

bool starts_with(const std::string& s, const std::string& p) {
  return s.compare(0, p.size(), p) == 0;
}

NamedArrays with_prefix(const NamedArrays& in, const std::string& prefix) {
  NamedArrays out;
  for (const auto& [k, v] : in) out[prefix + k] = v;
  return out;
}

NamedArrays under_prefix(const NamedArrays& in, const std::string& prefix) {
  NamedArrays out;
  for (const auto& [k, v] : in)
    if (starts_with(k, prefix)) out[k.substr(prefix.size())] = v;
  return out;
}

class CycleGanHarmonizer : public Harmonizer {
 public:
  CycleGanHarmonizer(const Args& args, const BuildContext& ctx) : seed_(ctx.seed) {
    reference_ = args.str("reference_site");
    federated_ = args.str("generator_sharing") == "federated";
    opts_.ngf = args.integer("ngf");
    opts_.ndf = args.integer("ndf");
    opts_.n_blocks = args.integer("n_blocks");
    opts_.lambda_cycle = args.real("lambda_cycle");
    opts_.lambda_identity = args.real("lambda_identity");
    opts_.pool_size = args.integer("pool_size");
    opts_.batch_size = args.integer("batch_size");
    opts_.per_image_intensity = args.flag("per_image_intensity");
    style_.latent = args.integer("style_latent");
    style_.ngf = args.integer("style_ngf");
    style_.ndf = args.integer("style_ngf");
    style_.batch_size = args.integer("style_batch");
    style_.dp_clip = args.real("dp_clip");
    style_.dp_noise = args.real("dp_noise");
    style_epochs_ = int(args.integer("style_epochs"));
    samples_ = args.integer("reference_samples");
    opts_.validate();
  }

  bool learned() const override { return true; }
  StageSettings default_stage() const override { return {4, 1, 2e-4}; }

  // The survey: complexity, size and count of the site's training images.
  Stats fit_site(const ImageSource& images) override {
    std::vector<Image> all;
    images([&](const Image& im) { all.push_back(im); });
    Stats s;
    if (all.empty()) return s;
    const Range r = cyclegan::fit_site_range(all);
    const double width = std::max(1e-12, double(r.hi) - double(r.lo));
    double sum = 0, n = 0;
    for (const Image& im : all)
      for (int c = 0; c < im.channels; ++c)
        for (int64_t z = 0; z < im.size[2]; ++z)
          for (int64_t y = 0; y < im.size[1]; ++y)
            for (int64_t x = 0; x < im.size[0]; ++x) {
              const float v = im.at(x, y, z, c);
              if (x + 1 < im.size[0]) sum += std::fabs(im.at(x + 1, y, z, c) - v), n += 1;
              if (y + 1 < im.size[1]) sum += std::fabs(im.at(x, y + 1, z, c) - v), n += 1;
            }
    s.scalars["complexity"] = n > 0 ? sum / n / width : 0;
    s.scalars["width"] = double(all[0].size[0]);
    s.scalars["height"] = double(all[0].size[1]);
    s.scalars["channels"] = double(all[0].channels);
    s.weight = double(all.size());
    return s;
  }

  LearnedPlan plan(const std::vector<Stats>& survey, const StageSettings& settings) override {
    const Stats* ref = nullptr;
    std::string names;
    for (const auto& s : survey) {
      names += " " + s.site;
      if (reference_ == "auto") {
        if (!ref || s.scalars.at("complexity") < ref->scalars.at("complexity")) ref = &s;
      } else if (s.site == reference_) {
        ref = &s;
      }
    }
    if (!ref)
      throw Error("cyclegan: reference_site '" + reference_ +
                  "' is not a training site of this run (sites:" + names + ")");
    for (const auto& s : survey)
      spdlog::info("cyclegan: site '{}' image complexity {:.4f}{}", s.site,
                   s.scalars.at("complexity"), &s == ref ? " (reference)" : "");
    const int64_t w = int64_t(ref->scalars.at("width")), h = int64_t(ref->scalars.at("height"));
    const int64_t c = int64_t(ref->scalars.at("channels"));
    if (w != h || w < 8 || (w & (w - 1)) != 0)
      throw Error("cyclegan: the reference site '" + ref->site + "' has " + std::to_string(w) +
                  "x" + std::to_string(h) +
                  " images; the style generator needs square images with a power-of-two side "
                  "(resample the data, e.g. brainsim size 32 or 64)");
    for (const auto& s : survey)
      if (int64_t(s.scalars.at("width")) != w || int64_t(s.scalars.at("height")) != h ||
          int64_t(s.scalars.at("channels")) != c)
        throw Error("cyclegan: site '" + s.site + "' has images of another size or channel count " +
                    "than the reference site '" + ref->site + "' (" + std::to_string(w) + "x" +
                    std::to_string(h) + ", " + std::to_string(c) + " channel(s)): resample first");
    configure(w, c, settings);
    LearnedPlan p;
    p.shared.scalars[kReferencePrefix + ref->site] = 1;
    p.shared.scalars["size"] = double(w);
    p.shared.scalars["channels"] = double(c);
    p.shared.weight = 1;
    LearnedPhase style;
    style.name = "style";
    style.sites = {ref->site};
    style.initial = cyclegan::StyleGan(style_, derive_seed(seed_, "cyclegan/style")).shared_state();
    style.rounds = settings.rounds;
    style.local_epochs = style_epochs_;
    LearnedPhase cycle;
    cycle.name = "cyclegan";
    for (const auto& s : survey)
      if (s.site != ref->site) cycle.sites.push_back(s.site);
    if (federated_)
      cycle.initial =
          cyclegan::SiteTrainer(opts_, derive_seed(seed_, "cyclegan/trainer")).shared_state();
    cycle.rounds = settings.rounds;
    cycle.local_epochs = settings.local_epochs;
    p.phases = {style, cycle};
    return p;
  }

  void learn_begin(const Stats& plan, const LearnedSiteData& data) override {
    site_ = data.site;
    output_dir_ = data.output_dir;
    reference_site_.clear();
    for (const auto& [k, v] : plan.scalars)
      if (starts_with(k, kReferencePrefix)) reference_site_ = k.substr(strlen(kReferencePrefix));
    if (reference_site_.empty()) throw Error("cyclegan: the stage's plan names no reference site");
    configure(int64_t(plan.scalars.at("size")), int64_t(plan.scalars.at("channels")),
              data.settings);
    images_.clear();
    for (const auto& s : *data.train) images_.push_back(s.image);
    if (images_.empty()) throw Error("cyclegan: site '" + site_ + "' has no training images");
    own_range_ = cyclegan::fit_site_range(images_);
    gan_.reset();
    trainer_.reset();
    reference_images_.clear();
  }

  LearnedUpdate learn_round(const LearnedRound& r) override {
    LearnedUpdate u;
    if (r.phase == 0) {  // the reference site's style GAN
      if (!gan_) gan_ = std::make_unique<cyclegan::StyleGan>(style_, style_seed());
      gan_->load_shared_state(*r.global);
      gan_->set_range(own_range_);
      cyclegan::StyleGanLosses l;
      for (int e = 0; e < r.local_epochs; ++e) {
        SeededRandom rng(derive_seed(seed_, "cyclegan/style/" + site_, r.round * 1000 + e));
        l = gan_->train_epoch(images_, rng);
      }
      u.shared = gan_->shared_state();
      u.loss = l.g;
      u.scalars["d_loss"] = l.d;
      for (const auto& [k, v] : gan_->privacy_settings()) u.scalars["privacy_" + k] = v;
    } else {  // a CycleGAN between this site and the reference style
      ensure_reference_images(r.finals->at(0));
      if (!trainer_) {
        trainer_ = std::make_unique<cyclegan::SiteTrainer>(opts_, trainer_seed());
        trainer_->set_ranges(own_range_, ref_range_);
      }
      if (federated_) trainer_->load_shared_state(*r.global);
      cyclegan::Losses l;
      for (int e = 0; e < r.local_epochs; ++e) {
        SeededRandom rng(derive_seed(seed_, "cyclegan/train/" + site_, r.round * 1000 + e));
        l = trainer_->train_epoch(images_, reference_images_, rng);
      }
      if (federated_) u.shared = trainer_->shared_state();
      u.loss = l.g;
      u.scalars["cycle_loss"] = l.cycle;
      u.scalars["identity_loss"] = l.identity;
      u.scalars["d_loss"] = l.d;
      u.scalars["lr"] = l.lr;
    }
    u.num_samples = double(images_.size());
    return u;
  }

  // Everything but the history pools, which are images (generated in the site's and the
  // reference's style): they never cross the Channel, not even into the coordinator's
  // checkpoint. They go to a file of the site's own (pools_file), keyed by the epoch count.
  NamedArrays learned_state() const override {
    NamedArrays out;
    if (gan_) out = with_prefix(gan_->local_state(), "style/");
    if (trainer_) {
      Stats pools;
      for (auto& [k, v] : trainer_->local_state()) {
        if (starts_with(k, "pool_"))
          pools.arrays[k] = v;
        else
          out["trainer/" + k] = v;
      }
      if (!output_dir_.empty()) {
        const int64_t epochs = trainer_->epochs_done();
        std::filesystem::create_directories(output_dir_ + "/site-state");
        save_stats(pools, pools_file(epochs), "cyclegan-pools");
        std::error_code ec;  // keep this file and the previous one
        for (int64_t old = epochs - 2; old >= 0 && std::filesystem::exists(pools_file(old), ec);
             --old)
          std::filesystem::remove(pools_file(old), ec);
      }
      for (auto& [k, v] : with_prefix(trainer_->shared_state(), "trainer_shared/")) out[k] = v;
      out["ref_range"] = Array::from(std::vector<float>{ref_range_.lo, ref_range_.hi});
    }
    return out;
  }

  void load_learned_state(const NamedArrays& state) override {
    const NamedArrays style = under_prefix(state, "style/");
    if (!style.empty()) {
      gan_ = std::make_unique<cyclegan::StyleGan>(style_, style_seed());
      gan_->load_local_state(style);
    }
    NamedArrays local = under_prefix(state, "trainer/");
    if (!local.empty()) {
      trainer_ = std::make_unique<cyclegan::SiteTrainer>(opts_, trainer_seed());
      // The pools from the site's own file of the same epoch count.
      auto e = local.find("epochs_done");
      if (e == local.end() || e->second.dtype() != DType::I64 || e->second.numel() != 1)
        throw Error("cyclegan: the learned state to restore lacks 'epochs_done'");
      const int64_t epochs = e->second.to_vector<int64_t>()[0];
      if (opts_.pool_size > 0) {
        if (output_dir_.empty() || !std::filesystem::exists(pools_file(epochs)))
          throw Error("cyclegan: site '" + site_ + "' cannot resume: its image pools of epoch " +
                      std::to_string(epochs) + " (" + pools_file(epochs) +
                      ") are missing; they never leave the site");
        for (auto& [k, v] : load_stats(pools_file(epochs)).arrays) local[k] = v;
      }
      trainer_->load_local_state(local);
      trainer_->load_shared_state(under_prefix(state, "trainer_shared/"));
      auto it = state.find("ref_range");
      if (it == state.end() || it->second.numel() != 2 || it->second.dtype() != DType::F32)
        throw Error("cyclegan: the learned state to restore lacks 'ref_range'");
      auto v = it->second.to_vector<float>();
      ref_range_ = {v[0], v[1]};
    }
  }

  Stats learn_result(const NamedArrays& final_global) override {
    Stats s;
    s.weight = double(images_.size());
    if (site_ == reference_site_) {
      s.scalars["site/" + site_ + "/reference"] = 1;
      return s;
    }
    if (!trainer_) throw Error("cyclegan: site '" + site_ + "' has not trained its CycleGAN");
    if (federated_)
      s.arrays = final_global;
    else
      s.arrays = with_prefix(trainer_->shared_state(), "site/" + site_ + "/");
    s.scalars["site/" + site_ + "/range_lo"] = own_range_.lo;
    s.scalars["site/" + site_ + "/range_hi"] = own_range_.hi;
    s.scalars["ref_lo"] = ref_range_.lo;
    s.scalars["ref_hi"] = ref_range_.hi;
    return s;
  }

  // The union of the sites' results (per-site entries are disjoint; shared ones identical).
  Stats combine(const std::vector<Stats>& parts) override {
    Stats out;
    for (const auto& p : parts) {
      for (const auto& [k, v] : p.arrays) {
        auto it = out.arrays.find(k);
        if (it == out.arrays.end())
          out.arrays[k] = v.clone();
        else if (it->second.shape() != v.shape() || it->second.dtype() != v.dtype())
          throw Error("cyclegan: entry '" + k + "' differs in shape between sites");
      }
      for (const auto& [k, v] : p.scalars) out.scalars.emplace(k, v);
      out.weight += p.weight;
    }
    return out;
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    translator_.reset();
    site_ = site;
    if (global.scalars.count("site/" + site + "/reference")) return;  // the reference: unchanged
    NamedArrays gen = under_prefix(global.arrays, "site/" + site + "/");
    if (gen.empty())
      for (const auto& [k, v] : global.arrays)
        if (starts_with(k, "g_site2ref.")) gen[k] = v;
    auto lo = global.scalars.find("site/" + site + "/range_lo");
    auto hi = global.scalars.find("site/" + site + "/range_hi");
    const bool have_range = lo != global.scalars.end() && hi != global.scalars.end();
    if (gen.empty() || (!have_range && !opts_.per_image_intensity)) {
      std::string known;
      for (const auto& [k, v] : global.scalars)
        if (starts_with(k, "site/")) known += " " + k.substr(5, k.rfind('/') - 5);
      spdlog::warn(
          "cyclegan: site '{}' took no part in the stage (statistics for:{}); its images are left "
          "unchanged",
          site, known);
      return;
    }
    const Range in = have_range ? Range{float(lo->second), float(hi->second)} : Range{};
    const Range out{float(global.scalars.at("ref_lo")), float(global.scalars.at("ref_hi"))};
    translator_ = std::make_unique<cyclegan::Translator>(opts_, gen, in, out);
  }

  void apply(Image& image) const override {
    if (translator_) image = translator_->translate(image);
  }

 private:
  uint64_t style_seed() const { return derive_seed(seed_, "cyclegan/style"); }
  std::string pools_file(int64_t epochs) const {
    return output_dir_ + "/site-state/cyclegan-pools-" + site_ + "-" + std::to_string(epochs) +
           ".stats";
  }
  uint64_t trainer_seed() const { return derive_seed(seed_, "cyclegan/trainer"); }

  // Sizes and the schedule from the plan: constant lr for the first half of the site's epochs,
  // then linear decay (the reference's "linear" policy).
  void configure(int64_t size, int64_t channels, const StageSettings& settings) {
    opts_.channels = channels;
    opts_.lr = settings.lr;
    const int64_t epochs = int64_t(settings.rounds) * settings.local_epochs;
    opts_.epochs_decay = epochs / 2;
    opts_.epochs_constant = epochs - opts_.epochs_decay;
    style_.size = size;
    style_.channels = channels;
    style_.lr = settings.lr;
    opts_.validate();
    style_.validate();
  }

  // Reference-style images drawn on this site from the style generator's final weights
  // (deterministic: regenerated identically after a resume).
  void ensure_reference_images(const NamedArrays& style_state) {
    if (!reference_images_.empty()) return;
    cyclegan::StyleGan g(style_, style_seed());
    g.load_shared_state(style_state);
    SeededRandom rng(derive_seed(seed_, "cyclegan/reference-samples/" + site_));
    reference_images_ = g.sample(samples_, rng);
    if (!trainer_) ref_range_ = g.range();
  }

  uint64_t seed_;
  std::string reference_, site_, reference_site_, output_dir_;
  bool federated_ = false;
  cyclegan::Options opts_;
  cyclegan::StyleGanOptions style_;
  int style_epochs_ = 1;
  int64_t samples_ = 64;
  // Site side of the stage.
  std::vector<Image> images_, reference_images_;
  Range own_range_, ref_range_;
  std::unique_ptr<cyclegan::StyleGan> gan_;
  std::unique_ptr<cyclegan::SiteTrainer> trainer_;
  // After set_statistics.
  std::unique_ptr<cyclegan::Translator> translator_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-cyclegan", "0.1.0") {
  using concord::ArgSpec;
  registry.add(
      {concord::Kind::Harmonizer,
       "cyclegan",
       "Learned: CycleGAN from each site to a reference site's style, trained "
       "federatedly (Yan et al. 2021)",
       {ArgSpec::string("reference_site", "auto",
                        "Reference site's name, or auto: the site of least image "
                        "complexity (mean neighbour difference / intensity window)"),
        ArgSpec::choice("generator_sharing", {"local", "federated"}, "local",
                        "local: each site its own generator pair; federated: the "
                        "site-to-reference generator averaged by the stage's aggregator"),
        ArgSpec::integer("ngf", 32, "Generator width").range(1, 256),
        ArgSpec::integer("ndf", 32, "Discriminator width").range(1, 256),
        ArgSpec::integer("n_blocks", 6, "ResNet blocks of the generators").range(0, 32),
        ArgSpec::real("lambda_cycle", 10, "Cycle-consistency weight").range(0, 1000),
        ArgSpec::real("lambda_identity", 0.5, "Identity weight, times lambda_cycle").range(0, 100),
        ArgSpec::integer("pool_size", 50, "History pool of generated images").range(0, 10000),
        ArgSpec::integer("batch_size", 1, "CycleGAN batch size").range(1, 1024),
        ArgSpec::boolean("per_image_intensity", false,
                         "Map each image's own percentile window to [-1, 1] instead of "
                         "the site's"),
        ArgSpec::integer("style_epochs", 2, "Style GAN epochs per round at the reference site")
            .range(1, 10000),
        ArgSpec::integer("style_latent", 64, "Style GAN latent size").range(1, 4096),
        ArgSpec::integer("style_ngf", 32, "Style GAN width").range(1, 1024),
        ArgSpec::integer("style_batch", 16, "Style GAN batch size").range(1, 4096),
        ArgSpec::real("dp_clip", 0,
                      "DP-SGD per-sample clip of the style discriminator "
                      "(0: off)")
            .range(0, 1e6),
        ArgSpec::real("dp_noise", 0, "DP-SGD noise multiplier (std = dp_noise * dp_clip)")
            .range(0, 1e6),
        ArgSpec::integer("reference_samples", 64,
                         "Reference-style images each site samples from the style "
                         "generator")
            .range(1, 100000)},
       [](const concord::Args& a, const concord::BuildContext& c) {
         return std::make_unique<concord::CycleGanHarmonizer>(a, c);
       }});
}
