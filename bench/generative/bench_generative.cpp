// CycleGAN training step and translation throughput at 128 x 128 (harmonizers/cyclegan), timed
// like bench/generative/pytorch_mirror.py times the same network in PyTorch; run.sh prints the
// ratios. Usage: bench_generative [threads (2)] [seconds per block (2)] [size (128)]
#include "cyclegan.h"

#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

using namespace concord;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best of `blocks` blocks of >= `seconds` each, after one warm-up call: items per second.
double best_rate(const std::function<void()>& fn, double items, double seconds, int blocks = 3) {
  fn();
  double best = 0;
  for (int b = 0; b < blocks; ++b) {
    int n = 0;
    const double t0 = now();
    double dt;
    do {
      fn();
      ++n;
      dt = now() - t0;
    } while (dt < seconds);
    best = std::max(best, n * items / dt);
  }
  return best;
}

Image noise_image(SeededRandom& rng, int64_t size, int64_t depth) {
  Image im(depth > 1 ? 3 : 2, 1, {size, size, depth});
  for (float& v : im.data) v = float(rng.uniform());
  return im;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 2.0;
  at::set_num_threads(threads);
  const int64_t size = argc > 3 ? std::atoll(argv[3]) : 128;
  cyclegan::Options opt;  // defaults: ngf 32, ndf 32, 6 blocks, pool 50
  opt.epochs_constant = 1000000;
  SeededRandom data_rng(1);
  std::vector<Image> pool_a, pool_b;
  for (int i = 0; i < 16; ++i) pool_a.push_back(noise_image(data_rng, size, 1));
  for (int i = 0; i < 16; ++i) pool_b.push_back(noise_image(data_rng, size, 1));

  for (int64_t batch : {1, 4}) {
    opt.batch_size = batch;
    cyclegan::SiteTrainer trainer(opt, 1);
    SeededRandom rng(2);
    // One epoch over `batch` own images is exactly one optimisation step.
    std::vector<Image> a(pool_a.begin(), pool_a.begin() + batch),
        b(pool_b.begin(), pool_b.begin() + batch);
    const double r = best_rate([&] { trainer.train_epoch(a, b, rng); }, double(batch), seconds);
    std::printf("train_b%lld_img_per_s %.4f\n", (long long)batch, r);
    std::fflush(stdout);
  }

  cyclegan::SiteTrainer trainer(opt, 1);
  cyclegan::Translator translator(opt, trainer.shared_state(), {0, 1}, {0, 1});
  const Image image = noise_image(data_rng, size, 1);
  std::printf("translate_2d_img_per_s %.4f\n",
              best_rate([&] { translator.translate(image); }, 1, seconds));
  std::fflush(stdout);
  const Image volume = noise_image(data_rng, size, size);
  const double t0 = now();
  const Image out = translator.translate(volume);
  std::printf("volume_s %.4f\n", now() - t0);
  return out.size == volume.size ? 0 : 1;
}
