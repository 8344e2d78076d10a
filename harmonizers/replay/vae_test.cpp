// Conditional VAE on a small synthetic two-class case: class 0 a horizontal bar, class 1 a
// vertical bar, random position, thickness and brightness, 16 x 16.
#include "vae.h"
#include "montage.h"

#include <concord/error.h>
#include <concord/image_io.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "testing.h"

namespace concord::replay {
namespace {

constexpr int64_t kSize = 16;

Image bar(SeededRandom& rng, int64_t label) {
  Image im(2, 1, {kSize, kSize, 1});
  const int64_t pos = 2 + rng.below(kSize - 6), thick = 2 + rng.below(2);
  const float v = float(rng.uniform(0.6, 1.0));
  for (int64_t y = 0; y < kSize; ++y)
    for (int64_t x = 0; x < kSize; ++x) {
      const int64_t along = label == 0 ? y : x;
      im.at(x, y) = (along >= pos && along < pos + thick) ? v : 0.0f;
    }
  return im;
}

struct Bars {
  std::vector<Image> images;
  std::vector<int64_t> labels;
  Bars(int64_t n, uint64_t seed) {
    SeededRandom rng(seed);
    for (int64_t i = 0; i < n; ++i) {
      labels.push_back(i % 2);
      images.push_back(bar(rng, i % 2));
    }
  }
};

VaeOptions small() {
  VaeOptions o;
  o.size = kSize;
  o.latent = 8;
  o.width = 16;
  o.batch_size = 16;
  return o;
}

// A tiny CNN classifier trained on real images only.
struct Classifier : torch::nn::Module {
  torch::nn::Conv2d conv{nullptr};
  torch::nn::Linear fc{nullptr};
  Classifier() {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)));
    fc = register_module("fc", torch::nn::Linear(8 * kSize * kSize, 2));
  }
  at::Tensor forward(const at::Tensor& x) { return fc(torch::relu(conv(x)).flatten(1)); }
};

at::Tensor stack(const std::vector<Image>& ims) {
  at::Tensor t = at::empty({int64_t(ims.size()), 1, kSize, kSize});
  for (size_t i = 0; i < ims.size(); ++i)
    std::memcpy(t[int64_t(i)].data_ptr<float>(), ims[i].data.data(), ims[i].data.size() * 4);
  return t;
}

TEST(ReplayVae, LossFallsAndConditionalSamplesCarryTheirLabels) {
  Bars train(256, 1), test(64, 2);
  ConditionalVae vae(small(), 3);
  SeededRandom rng(derive_seed(3, "test/vae"));
  const double start = vae.evaluate(test.images, test.labels).loss;
  std::vector<double> losses;
  for (int e = 0; e < 25; ++e)
    losses.push_back(vae.train_epoch(train.images, train.labels, rng).loss);
  const double end = vae.evaluate(test.images, test.labels).loss;
  EXPECT_LT(losses.back(), 0.5 * losses.front());
  EXPECT_LT(end, 0.5 * start) << "held-out negative ELBO " << start << " -> " << end;

  // A classifier trained on real data only labels the VAE's conditional samples.
  torch::manual_seed(0);  // the classifier is test scaffolding, not part of the VAE
  Classifier clf;
  torch::optim::Adam opt(clf.parameters(), 1e-2);
  const at::Tensor x = stack(train.images), y = at::tensor(train.labels, at::kLong);
  for (int it = 0; it < 60; ++it) {
    opt.zero_grad();
    at::Tensor loss = torch::nn::functional::cross_entropy(clf.forward(x), y);
    loss.backward();
    opt.step();
  }
  auto accuracy = [&](const std::vector<Image>& ims, const std::vector<int64_t>& labels) {
    at::Tensor pred = clf.forward(stack(ims)).argmax(1);
    return pred.eq(at::tensor(labels, at::kLong)).to(at::kFloat).mean().item<double>();
  };
  ASSERT_GT(accuracy(test.images, test.labels), 0.95) << "the classifier itself must work";
  std::vector<int64_t> want;
  for (int i = 0; i < 100; ++i) want.push_back(i % 2);
  SeededRandom srng(5);
  const std::vector<Image> samples = vae.sample(want, srng);
  ASSERT_EQ(samples.size(), 100u);
  EXPECT_GT(accuracy(samples, want), 0.8);

  // Reconstructions are close to their inputs; a montage is written as a PNG.
  const std::vector<Image> rec = vae.reconstruct(test.images, test.labels);
  double err = 0;
  for (size_t i = 0; i < rec.size(); ++i)
    for (size_t k = 0; k < rec[i].data.size(); ++k)
      err += std::abs(rec[i].data[k] - test.images[i].data[k]) /
             double(rec.size() * rec[i].data.size());
  EXPECT_LT(err, 0.15);
  testkit::TempDir dir;
  const std::string png = dir.str() + "/montage.png";
  write_montage(png,
                {std::vector<Image>(test.images.begin(), test.images.begin() + 8),
                 std::vector<Image>(rec.begin(), rec.begin() + 8),
                 std::vector<Image>(samples.begin(), samples.begin() + 5)},
                0, 1);
  const Image m = read_image(png);
  EXPECT_EQ(m.size[0], 2 + 8 * (kSize + 2));
  EXPECT_EQ(m.size[1], 2 + 3 * (kSize + 2));
  EXPECT_NEAR(m.at(2, 2 + 2 * (kSize + 2)),
              std::round(std::clamp(samples[0].at(0, 0), 0.f, 1.f) * 255), 1.0);
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename(), "montage.png");  // no temporary left behind
}

TEST(ReplayVae, SameSeedIsBitIdenticalAndStateRoundTrips) {
  Bars data(40, 1);
  auto bytes = [](const NamedArrays& s) {
    std::string b;
    for (const auto& [name, a] : s)
      b += name + std::string(static_cast<const char*>(a.raw()), a.nbytes());
    return b;
  };
  ConditionalVae a(small(), 7), b(small(), 7), c(small(), 8);
  SeededRandom ra(1), rb(1);
  a.train_epoch(data.images, data.labels, ra);
  b.train_epoch(data.images, data.labels, rb);
  EXPECT_EQ(bytes(a.state()), bytes(b.state()));
  EXPECT_EQ(bytes(a.optimizer_state()), bytes(b.optimizer_state()));
  EXPECT_NE(bytes(a.state()), bytes(c.state()));
  c.load_state(a.state());
  c.load_optimizer_state(a.optimizer_state());
  SeededRandom r2a(2), r2c(2);
  a.train_epoch(data.images, data.labels, r2a);
  c.train_epoch(data.images, data.labels, r2c);
  EXPECT_EQ(bytes(a.state()), bytes(c.state()));
  SeededRandom s1(3), s2(3);
  EXPECT_EQ(a.sample({0, 1}, s1)[1].data, c.sample({0, 1}, s2)[1].data);
  for (const auto& [name, arr] : a.state()) EXPECT_EQ(name.rfind("vae.", 0), 0u) << name;
}

TEST(ReplayVae, SiteConditioningAndBadInputsAreChecked) {
  VaeOptions o = small();
  o.num_sites = 3;
  ConditionalVae vae(o, 1);
  Bars data(6, 1);
  SeededRandom rng(1);
  EXPECT_NE(testkit::error_of([&] {
              vae.train_epoch(data.images, data.labels, rng);
            }).find("one site index per image"),
            std::string::npos);
  EXPECT_NO_THROW(vae.train_epoch(data.images, data.labels, rng, {0, 1, 2, 0, 1, 2}));
  EXPECT_NE(testkit::error_of([&] {
              vae.sample({0, 2}, rng, {0, 0});
            }).find("label 2 of sample 1"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] { vae.sample({0}, rng, {3}); }).find("site 3"),
            std::string::npos);
  Image big(2, 1, {32, 32, 1});
  EXPECT_NE(testkit::error_of([&] { vae.reconstruct({big}, {0}, {0}); }).find("resample"),
            std::string::npos);
  NamedArrays s = vae.state();
  s.erase(s.begin());
  EXPECT_NE(testkit::error_of([&] { vae.load_state(s); }).find("is missing"), std::string::npos);
  VaeOptions bad = small();
  bad.size = 12;
  EXPECT_NE(testkit::error_of([&] { ConditionalVae x(bad, 1); }).find("multiple of 8"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([] {
              write_montage("/nonexistent-dir/x.png", {}, 0, 1);
            }).find("no images"),
            std::string::npos);
}

}  // namespace
}  // namespace concord::replay
