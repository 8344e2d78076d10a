// `concord audit PIPELINE`: a leakage audit. A gradient-inversion attack (gradient_inversion.h)
// against one site's real update on the pipeline's model and data, as a coordinator would see it
// with plain FedAvg, with DP noise at the pipeline's budget (client or sample level), and with
// secure aggregation (only the sum of every site's update); SSIM and PSNR of the reconstructions to
// the true images, against random images as the baseline; audit.json and montage.png.
#include <concord/dataset.h>
#include <concord/dp_accountant.h>
#include <concord/durable_output.h>
#include <concord/federation_tools.h>
#include <concord/json_text.h>
#include <concord/model.h>
#include <concord/seed.h>
#include <concord/tensor_bridge.h>

#include "commands.h"
#include "gradient_inversion.h"
#include "image_quality.h"
#include "privacy_round.h"  // core/src: sample_level_plan, as a site computes it

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <numeric>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace concord::cli {

namespace {

struct AuditOptions {
  std::string file;
  std::vector<std::string> overrides;
  std::string site;  // empty: the first site with enough training images
  int images = 1;
  int iterations = 300;
  double epsilon = 8;  // when the pipeline has no privacy key
  std::string out = "audit";
  std::string model = "mlp";  // mlp | pipeline
};

// The audit's default victim: a small fully connected network (as in DLG, Zhu et al. 2019), the
// case where an update leaks most (the first layer's gradient rows are multiples of the input).
struct Mlp : torch::nn::Module {
  Mlp(int64_t in, int64_t hidden, int64_t classes)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, classes))) {}
  at::Tensor forward(const at::Tensor& x) { return fc2(torch::sigmoid(fc1(x.flatten(1)))); }
  torch::nn::Linear fc1, fc2;
};

struct Batch {
  std::string site;
  at::Tensor x, y;
};

Image channel0(const at::Tensor& chw) {
  const at::Tensor c = chw[0].contiguous();
  Image im(2, 1, {c.size(1), c.size(0), 1});
  std::copy(c.data_ptr<float>(), c.data_ptr<float>() + c.numel(), im.data.begin());
  return im;
}

struct Score {
  double ssim = 0, psnr = 0;
};

// Mean SSIM / PSNR of `recovered` to `truth` (channel 0, intensity range `range`), matching
// images by the best permutation (the loss does not tell the images of a batch apart).
Score score(const at::Tensor& truth, const at::Tensor& recovered, double range) {
  const int64_t n = truth.size(0);
  std::vector<int> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  Score best{-2, 0};
  do {
    Score s;
    for (int64_t i = 0; i < n; ++i) {
      const Image a = channel0(truth[i]), b = channel0(recovered[perm[size_t(i)]]);
      s.ssim += ssim(a, b, range) / double(n);
      s.psnr += std::min(psnr(a, b, range), 99.0) / double(n);
    }
    if (s.ssim > best.ssim) best = s;
  } while (std::next_permutation(perm.begin(), perm.end()));
  return best;
}

// One tile row of the montage: the images scaled from [low, high] to 8 bits, at least 96 px.
cv::Mat row_of(const at::Tensor& images, float low, float high) {
  std::vector<cv::Mat> tiles;
  for (int64_t i = 0; i < images.size(0); ++i) {
    const at::Tensor c = images[i][0].contiguous();
    cv::Mat m(int(c.size(0)), int(c.size(1)), CV_32F, c.data_ptr<float>());
    cv::Mat u8;
    m.convertTo(u8, CV_8U, 255.0 / std::max(1e-6f, high - low), -255.0 * low / (high - low));
    const int scale = std::max(1, 96 / std::max(1, u8.rows));
    cv::resize(u8, u8, cv::Size(), scale, scale, cv::INTER_NEAREST);
    cv::copyMakeBorder(u8, u8, 2, 2, 2, 2, cv::BORDER_CONSTANT, 255);
    tiles.push_back(u8);
  }
  cv::Mat row;
  cv::hconcat(tiles, row);
  return row;
}

void run_audit(const Globals& g, const AuditOptions& o) {
  const PipelineConfig cfg = load_or_report(g, o.file, o.overrides);
  const Registry& reg = global_registry();
  auto dataset = reg.create<Dataset>(Kind::Dataset, cfg.data.dataset.type, cfg.data.dataset.args,
                                     {cfg.seed, "dataset"});
  Federation fed = dataset->load(DataRequest{cfg.seed, cfg.data.sites});
  if (cfg.data.partition.scheme != "none") fed = partition(fed, cfg.data.partition, cfg.seed);
  if (fed.task != Task::Classification)
    throw Error("concord audit: the attack needs a classification task");
  // One batch per site: the first `images` training images.
  std::vector<Batch> batches;
  std::vector<int64_t> train_sizes;  // each batch's site: its training images (DP-SGD's n)
  for (const auto& sd : fed.sites) {
    if (int(sd.train.size()) < o.images) continue;
    train_sizes.push_back(int64_t(sd.train.size()));
    std::vector<at::Tensor> xs, ys;
    for (int i = 0; i < o.images; ++i) {
      xs.push_back(image_to_tensor(sd.train[size_t(i)].image));
      ys.push_back(torch::tensor({sd.train[size_t(i)].label}, torch::kLong));
    }
    batches.push_back({sd.name, torch::stack(xs), torch::cat(ys)});
  }
  if (batches.empty())
    throw Error("concord audit: no site has " + std::to_string(o.images) + " training images");
  size_t victim = 0;
  if (!o.site.empty()) {
    while (victim < batches.size() && batches[victim].site != o.site) ++victim;
    if (victim == batches.size()) throw Error("concord audit: no site '" + o.site + "'");
  }
  const Batch& truth = batches[victim];

  torch::manual_seed(derive_seed(cfg.seed, "model-init"));
  std::unique_ptr<Model> pipeline_model;
  std::shared_ptr<Mlp> mlp;
  std::vector<at::Tensor> params;
  audit::Forward forward;
  if (o.model == "pipeline") {
    pipeline_model =
        reg.create<Model>(Kind::Model, cfg.model.type, cfg.model.args, {cfg.seed, "model"});
    ModelSpec spec;
    spec.task = fed.task;
    spec.in_channels = fed.channels;
    spec.num_classes = fed.num_classes;
    spec.image_size = {truth.x.size(3), truth.x.size(2)};
    pipeline_model->build(spec);
    pipeline_model->set_training(true);
    for (auto& e : pipeline_model->state())
      if (e.is_parameter) params.push_back(e.tensor);
    forward = [&](const at::Tensor& x) { return pipeline_model->forward(x); };
  } else {
    mlp = std::make_shared<Mlp>(truth.x[0].numel(), 64, fed.num_classes);
    params = mlp->parameters();
    forward = [&](const at::Tensor& x) { return mlp->forward(x); };
  }

  // Every site's gradient at the global model: its update is one local step, -lr * gradient.
  std::vector<std::vector<at::Tensor>> grads;
  for (const auto& b : batches) {
    auto gr = audit::loss_gradient(forward, params, b.x, b.y, false);
    for (auto& t : gr) t = t.detach();
    grads.push_back(gr);
  }
  const double lr = cfg.training.lr;
  const int64_t m = int64_t(batches.size());
  json report_dp;

  // DP at the pipeline's budget, as the coordinator sees one upload.
  //  - client level (default): the site's delta clipped to C with its local noise share
  //    z C / sqrt(m) (local mode), z for the planned rounds;
  //  - sample level (`privacy: {level: sample}`): one DP-SGD step on the batch, as the site's
  //    local training takes it: each image's gradient clipped to C, N(0, (sigma C)^2) on the sum,
  //    divided by the expected batch size, with the site's plan (its q, steps and sigma).
  const bool sample = sample_level(cfg);
  const double eps = cfg.privacy ? cfg.privacy->epsilon : o.epsilon;
  const double delta = cfg.privacy ? cfg.privacy->delta : 1e-5;
  double clip = cfg.privacy ? cfg.privacy->clip : 1.0, z = 0, noise_std = 0;
  std::vector<at::Tensor> dp_target;
  // The factor that clips `factor` x `grads` (one vector over all tensors) to L2 norm `clip`.
  const auto clip_factor = [&clip](const std::vector<at::Tensor>& grads, double factor) {
    double norm2 = 0;
    for (const auto& t : grads) norm2 += (factor * t).pow(2).sum().item<double>();
    return std::min(1.0, clip / std::max(std::sqrt(norm2), 1e-12));
  };
  torch::manual_seed(derive_seed(cfg.seed, "audit-dp-noise"));
  if (sample) {
    const SampleLevelPlan plan = sample_level_plan(cfg, train_sizes[victim], truth.site);
    z = plan.noise_multiplier;
    clip = plan.clip;
    noise_std = z * clip / plan.expected_batch;
    std::vector<at::Tensor> sum;
    for (int64_t i = 0; i < truth.x.size(0); ++i) {
      auto g = audit::loss_gradient(forward, params, truth.x.slice(0, i, i + 1),
                                    truth.y.slice(0, i, i + 1), false);
      const double scale = clip_factor(g, 1.0);
      for (size_t k = 0; k < g.size(); ++k) {
        const at::Tensor c = g[k].detach() * scale;
        if (sum.size() <= k)
          sum.push_back(c);
        else
          sum[k] = sum[k] + c;
      }
    }
    for (const auto& t : sum)  // the step's noised mean gradient: the update is -lr times it
      dp_target.push_back((t + torch::randn_like(t) * (z * clip)) / plan.expected_batch);
    report_dp = {{"level", "sample"},
                 {"q", plan.q},
                 {"planned_steps", plan.planned_steps},
                 {"expected_batch", plan.expected_batch}};
  } else {
    const double q = cfg.privacy && cfg.privacy->sampling == "poisson"
                         ? std::min(1.0, std::ceil(cfg.federation.fraction * double(m)) / double(m))
                         : 1.0;
    z = cfg.privacy && cfg.privacy->noise_multiplier > 0
            ? cfg.privacy->noise_multiplier
            : dp::noise_multiplier_for(eps, delta, q, cfg.federation.rounds);
    noise_std = z * clip / std::sqrt(double(m));
    const double scale = clip_factor(grads[victim], lr);  // the delta is -lr times the gradient
    for (const auto& t : grads[victim]) {
      const at::Tensor d = -lr * t * scale + torch::randn_like(t) * noise_std;
      dp_target.push_back(-d / lr);
    }
    report_dp = {{"level", "client"}, {"q", q}, {"rounds", cfg.federation.rounds}};
  }
  // SecAgg: the coordinator sees only the sum of the m sites' updates.
  std::vector<at::Tensor> sum_target;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor s = torch::zeros_like(grads[0][i]);
    for (const auto& gr : grads) s = s + gr[i];
    sum_target.push_back(s / double(m));
  }

  const float low = truth.x.min().item<float>(), high = truth.x.max().item<float>();
  const double range = std::max(1e-6, double(high - low));
  audit::AttackOptions ao;
  ao.iterations = o.iterations;
  ao.seed = derive_seed(cfg.seed, "audit-start");
  ao.low = low;
  ao.high = high;
  const std::vector<int64_t> shape(truth.x.sizes().begin(), truth.x.sizes().end());

  json report{{"pipeline", o.file},
              {"site", truth.site},
              {"images", o.images},
              {"iterations", o.iterations},
              {"sites", m},
              {"model", o.model == "pipeline" ? cfg.model.type : "mlp (64 sigmoid units)"},
              {"attack",
               "inverting gradients (Geiping et al. 2020), labels known, one local "
               "SGD step"}};
  std::vector<std::pair<std::string, at::Tensor>> rows{{"truth", truth.x}};
  const auto attack = [&](const std::string& name, const std::vector<at::Tensor>& target) {
    spdlog::info("audit: attacking the {} view ({} iterations)", name, o.iterations);
    const at::Tensor rec = audit::invert_gradients(forward, params, target, truth.y, shape, ao);
    const Score s = score(truth.x, rec, range);
    report["scenarios"][name] = {{"ssim", s.ssim}, {"psnr", s.psnr}};
    rows.emplace_back(name, rec);
  };
  attack("fedavg", grads[victim]);
  attack("dp", dp_target);
  report["scenarios"]["dp"]["epsilon"] = eps;
  report["scenarios"]["dp"]["delta"] = delta;
  report["scenarios"]["dp"]["noise_multiplier"] = z;
  report["scenarios"]["dp"]["clip"] = clip;
  report["scenarios"]["dp"]["noise_std"] = noise_std;
  for (const auto& [k, v] : report_dp.items()) report["scenarios"]["dp"][k] = v;
  attack("secagg", sum_target);
  {
    torch::manual_seed(derive_seed(cfg.seed, "audit-random"));
    const at::Tensor random = torch::rand(shape) * (high - low) + low;
    const Score s = score(truth.x, random, range);
    report["scenarios"]["random"] = {{"ssim", s.ssim}, {"psnr", s.psnr}};
    rows.emplace_back("random", random);
  }

  if (batches.size() > 1) {
    // What an attacker knows without any update: what images of this kind look like (the mean
    // of the other sites' batches). A reconstruction from a sum is judged against it.
    at::Tensor mean = torch::zeros_like(truth.x);
    for (size_t i = 0; i < batches.size(); ++i)
      if (i != victim) mean = mean + batches[i].x / double(batches.size() - 1);
    const Score s = score(truth.x, mean, range);
    report["scenarios"]["population-mean"] = {{"ssim", s.ssim}, {"psnr", s.psnr}};
    rows.emplace_back("population-mean", mean);
  }

  fs::create_directories(o.out);
  std::vector<cv::Mat> mats;
  for (const auto& [name, t] : rows) mats.push_back(row_of(t, low, high));
  cv::Mat montage;
  cv::vconcat(mats, montage);
  std::vector<uchar> png;
  cv::imencode(".png", montage, png);
  write_file_atomic((fs::path(o.out) / "montage.png").string(), png.data(), png.size());
  report["montage_rows"] = json::array();
  for (const auto& r : rows) report["montage_rows"].push_back(r.first);
  write_file_atomic((fs::path(o.out) / "audit.json").string(), json_text(report, 2) + "\n");

  std::cout << "\nleakage audit: site '" << truth.site << "', " << o.images << " image(s), "
            << o.iterations << " iterations\n";
  std::cout << std::left << std::setw(16) << "view" << std::right << std::setw(8) << "SSIM"
            << std::setw(10) << "PSNR dB"
            << "\n";
  for (const char* v : {"fedavg", "dp", "secagg", "random", "population-mean"}) {
    if (!report["scenarios"].contains(v)) continue;
    const json& s = report["scenarios"][v];
    std::cout << std::left << std::setw(16) << v << std::right << std::fixed << std::setprecision(3)
              << std::setw(8) << s["ssim"].get<double>() << std::setprecision(2) << std::setw(10)
              << s["psnr"].get<double>() << "\n";
  }
  std::cout.unsetf(std::ios::fixed);
  std::cout << std::setprecision(6) << "dp (" << report_dp["level"].get<std::string>()
            << " level): epsilon " << eps << " at delta " << delta << ", z = " << z
            << (sample ? ", noise std on the step's mean gradient " : ", per-upload noise std ")
            << noise_std << "\n"
            << "results: " << (fs::path(o.out) / "audit.json").string() << ", "
            << (fs::path(o.out) / "montage.png").string() << "\n";
}

}  // namespace

void add_audit_command(CLI::App& app, Globals& g) {
  auto o = std::make_shared<AuditOptions>();
  CLI::App* cmd = app.add_subcommand(
      "audit",
      "Leakage audit: a gradient-inversion attack on one site's update, as the coordinator sees "
      "it with plain FedAvg, DP noise and secure aggregation (SSIM/PSNR, montage)");
  cmd->add_option("pipeline", o->file, "Pipeline file (its data, model, lr and privacy budget)")
      ->required();
  cmd->add_option("--set", o->overrides, "Override a pipeline value (KEY=VALUE)");
  cmd->add_option("--site", o->site, "The attacked site (default: the first)");
  cmd->add_option("--images", o->images, "Images in the attacked batch")->check(CLI::Range(1, 4));
  cmd->add_option("--iterations", o->iterations, "Attack iterations")->check(CLI::Range(1, 100000));
  cmd->add_option("--epsilon", o->epsilon,
                  "Budget for the DP view when the pipeline has no privacy key")
      ->check(CLI::Range(1e-3, 1e6));
  cmd->add_option("--model", o->model,
                  "Victim network: mlp (a small fully connected net, the worst case) or the "
                  "pipeline's model")
      ->check(CLI::IsMember({"mlp", "pipeline"}));
  cmd->add_option("--out", o->out, "Output folder (audit.json, montage.png)");
  cmd->callback([&g, o] { run_audit(g, *o); });
}

}  // namespace concord::cli
