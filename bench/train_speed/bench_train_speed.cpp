// One local training epoch of the built-in `cnn` or `unet` (the plugins, built through the
// registry) timed at two levels, as bench/train_speed/pytorch_mirror.py times the same network in
// PyTorch; run.sh prints the ratios and adds the `concord run` level.
//   libtorch_loop: the images pre-stacked in one tensor, each batch an index into it (the
//                  pytorch_mirror.py loop, in C++): what LibTorch itself costs.
//   local_training: LocalTraining::train(1 epoch) over Samples, as a site trains in a round:
//                  Concord's batching, Image -> tensor conversion and per-step work included.
// Plus precise-BN re-estimation (LocalTraining::recalibrate_batchnorm) and evaluation
// (LocalTraining::predict) over the same images, timed separately, and sample-level DP-SGD
// (per-sample gradients: one backward pass per image, Poisson batches of the same expected size)
// with its ratio to local_training.
// Usage: bench_train_speed MODEL SIZE THREADS [BATCH (32)] [IMAGES (160)] [EPOCHS (5)]
#include "local_training.h"
#include "privacy_round.h"

#include <concord/registry.h>
#include <concord/seed.h>
#include <concord/torch_model.h>

#include <ATen/Parallel.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

using namespace concord;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double seconds_of(const std::function<void()>& fn) {
  const double t0 = now();
  fn();
  return now() - t0;
}

// Images per second of the best and the median of `epochs` runs of `fn`, after one warm-up run.
std::pair<double, double> rates(const std::function<void()>& fn, double images, int epochs) {
  fn();
  std::vector<double> r;
  for (int e = 0; e < epochs; ++e) r.push_back(images / seconds_of(fn));
  std::sort(r.begin(), r.end());
  return {r.back(), r[r.size() / 2]};
}

void print(const char* key, double value) {
  std::printf("%s %.2f\n", key, value);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr,
                 "usage: bench_train_speed cnn|unet SIZE THREADS [BATCH] [IMAGES] [EPOCHS]\n");
    return 2;
  }
  const std::string name = argv[1];
  const int64_t size = std::atoll(argv[2]);
  const int threads = std::atoi(argv[3]);
  const int64_t batch = argc > 4 ? std::atoll(argv[4]) : 32;
  const int64_t n = argc > 5 ? std::atoll(argv[5]) : 160;
  const int epochs = argc > 6 ? std::atoi(argv[6]) : 5;
  const bool seg = name == "unet";
  try {
    configure_torch_process(threads);
    const auto exe = std::filesystem::canonical("/proc/self/exe");
    const auto lib = exe.parent_path().parent_path() / "lib" / "concord" / "plugins" /
                     ("libconcord-model-" + name + ".so");
    Registry reg;
    PluginLoader(reg).load_file(lib.string());
    ModelSpec spec;
    spec.task = seg ? Task::Segmentation : Task::Classification;
    spec.image_size = {size, size};
    seed_torch(1);
    auto model = reg.create<Model>(
        Kind::Model, name, make_args(name, reg.get(Kind::Model, name).args), BuildContext{1, ""});
    model->build(spec);

    // The same images as Samples (Concord) and as one stacked tensor (the plain loop).
    SeededRandom rng(7);
    std::vector<Sample> samples(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      Sample& s = samples[size_t(i)];
      s.id = "img" + std::to_string(i);
      s.image = Image(2, 1, {size, size, 1});
      for (float& v : s.image.data) v = float(rng.uniform());
      if (seg) {
        s.mask = Image(2, 1, {size, size, 1});
        for (size_t k = 0; k < s.image.data.size(); ++k)
          s.mask->data[k] = s.image.data[k] > 0.7f ? 1.f : 0.f;
      } else {
        s.label = i % 2;
      }
    }
    at::Tensor x_all = torch::rand({n, 1, size, size});
    at::Tensor y_all =
        seg ? (x_all.select(1, 0) > 0.7).to(torch::kLong) : torch::randint(0, 2, {n}, torch::kLong);

    std::vector<at::Tensor> params;
    for (auto& e : model->state())
      if (e.is_parameter) params.push_back(e.tensor);
    torch::optim::Adam opt(params, torch::optim::AdamOptions(2e-3));
    model->set_training(true);
    auto loop = [&] {
      at::Tensor order = torch::randperm(n, torch::kLong);
      for (int64_t s = 0; s < n; s += batch) {
        at::Tensor idx = order.slice(0, s, std::min(n, s + batch));
        if (idx.size(0) < 2) break;
        at::Tensor xb = x_all.index_select(0, idx), yb = y_all.index_select(0, idx);
        opt.zero_grad();
        at::Tensor loss = task_loss(spec.task, model->forward(xb), yb);
        loss.backward();
        opt.step();
        (void)loss.item<double>();
      }
    };
    auto [loop_best, loop_median] = rates(loop, double(n), epochs);
    print("libtorch_loop_img_per_s", loop_best);
    print("libtorch_loop_median_img_per_s", loop_median);

    // LocalTraining as a Site builds it (site.cpp), without aggregator term or augmenters.
    const std::string site = "site-A";
    PipelineConfig::Training training;
    training.batch_size = int(batch);
    training.optimizer = "adam";
    training.lr = 2e-3;
    training.threads = threads;
    SiteData data;
    data.name = site;
    data.train = samples;
    data.test = samples;
    const std::vector<Harmonizer*> augmenters;
    NamedArrays store;
    const std::map<std::string, at::Tensor> received;
    int64_t calls = 0;
    LocalTraining::Context c;
    c.site = &site;
    c.training = &training;
    c.seed = 1;
    c.rounds = 1;
    c.task = spec.task;
    c.data = &data;
    c.model = model.get();
    c.augmenters = &augmenters;
    c.store = &store;
    c.received = &received;
    c.calls = &calls;
    LocalTraining trainer(c, 1);
    auto [lt_best, lt_median] =
        rates([&] { trainer.train(1, nullptr, nullptr); }, double(n), epochs);
    print("local_training_img_per_s", lt_best);
    print("local_training_median_img_per_s", lt_median);
    print("precise_bn_img_per_s",
          rates([&] { trainer.recalibrate_batchnorm(); }, double(n), 3).first);
    print("eval_img_per_s", rates([&] { trainer.predict(2); }, double(n), 3).first);
    PipelineConfig dp_config;  // sample-level DP-SGD at sigma 1, C 1, this batch size
    dp_config.training = training;
    dp_config.privacy = PipelineConfig::Privacy{};
    dp_config.privacy->level = "sample";
    dp_config.privacy->noise_multiplier = 1;
    dp_config.privacy->clip = 1;
    const SampleLevelPlan plan = sample_level_plan(dp_config, int64_t(n), "bench");
    trainer.set_sample_level(&plan);
    const double dp_best =
        rates([&] { trainer.train(1, nullptr, nullptr); }, double(n), epochs).first;
    print("dp_sgd_img_per_s", dp_best);
    print("dp_sgd_over_local_training", dp_best / lt_best);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_speed: %s\n", e.what());
    return 1;
  }
  return 0;
}
