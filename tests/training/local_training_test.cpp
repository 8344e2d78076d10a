// LocalTraining's batching and the process set-up for training (core/src/local_training.cpp).
#include "local_training.h"

#include <concord/error.h>

#include <ATen/Parallel.h>

#include "testing.h"
#include "trainer_fixture.h"

#include <cstdlib>
#include <optional>
#include <string>

#include <sched.h>

using namespace concord;

namespace {

// One site with `n` 16x16 segmentation samples whose masks hold class indices as floats.
struct Fixture : testkit::TrainerFixture {
  explicit Fixture(int n) {
    task = Task::Segmentation;
    const Registry& reg = testkit::builtin_registry();
    ModelSpec spec;
    spec.task = Task::Segmentation;
    spec.image_size = {16, 16};
    Value two, one;
    two.type = one.type = ArgType::Int;
    two.i = 2;
    one.i = 1;
    model = reg.create<Model>(
        Kind::Model, "unet",
        make_args("unet", reg.get(Kind::Model, "unet").args, {{"width", two}, {"levels", one}}),
        BuildContext{1, ""});
    model->build(spec);
    for (int i = 0; i < n; ++i) {
      Sample s;
      s.id = "img" + std::to_string(i);
      s.image = Image(2, 1, {16, 16, 1});
      s.mask = Image(2, 1, {16, 16, 1});
      for (size_t k = 0; k < s.mask->data.size(); ++k) {
        s.image.data[k] = float(k % 7) / 7.f;
        s.mask->data[k] = (k + size_t(i)) % 3 == 0 ? 1.f : 0.f;
      }
      data.test.push_back(s);
    }
    data.train = data.test;
  }
};

}  // namespace

TEST(LocalTraining, BatchesCarryEveryMaskAsClassIndices) {
  Fixture f(70);  // two prediction batches: 64 + 6
  Predictions p = f.trainer().predict(2);
  ASSERT_EQ(p.true_masks.size(), 70u);
  for (size_t i = 0; i < 70; ++i) {
    ASSERT_EQ(p.true_masks[i].size(), 256u);
    for (size_t k = 0; k < 256; ++k)
      ASSERT_EQ(p.true_masks[i][k], (k + i) % 3 == 0 ? 1 : 0) << "sample " << i << " pixel " << k;
  }
}

TEST(LocalTraining, AnImageOfAnotherShapeInABatchIsNamed) {
  Fixture f(4);
  f.data.train[2].image = Image(2, 1, {8, 8, 1});
  try {
    f.trainer().train(1, nullptr, nullptr);
    FAIL() << "expected an error";
  } catch (const SiteError& e) {
    EXPECT_EQ(e.site(), "site-A");
    // Shuffled: either img2 comes first and a 16x16 sample is named, or img2 is named.
    const std::string what = e.what();
    EXPECT_NE(what.find("has shape ["), std::string::npos) << what;
    EXPECT_NE(what.find("[1, 8, 8]"), std::string::npos) << what;
    EXPECT_NE(what.find("[1, 16, 16]"), std::string::npos) << what;
  }
}

TEST(LocalTraining, ASegmentationSampleWithoutMaskIsNamed) {
  Fixture f(3);
  f.data.test[1].mask.reset();
  try {
    f.trainer().predict(2);
    FAIL() << "expected an error";
  } catch (const SiteError& e) {
    EXPECT_NE(std::string(e.what()).find("'img1' has no mask"), std::string::npos) << e.what();
  }
}

TEST(ConfigureTorchProcess, ZeroThreadsMeansEveryAvailableCpuUnlessOmpNumThreadsIsSet) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const char* omp = std::getenv("OMP_NUM_THREADS");
  const std::optional<std::string> saved = omp ? std::optional<std::string>(omp) : std::nullopt;
  unsetenv("OMP_NUM_THREADS");
  unsetenv("MKL_NUM_THREADS");
  EXPECT_EQ(configure_torch_process(1), 1);
  EXPECT_EQ(configure_torch_process(0), CPU_COUNT(&set));
  setenv("OMP_NUM_THREADS", "1", 1);
  at::set_num_threads(1);
  EXPECT_EQ(configure_torch_process(0), 1);  // the variable decides, as it does for LibTorch
  if (saved)
    setenv("OMP_NUM_THREADS", saved->c_str(), 1);
  else
    unsetenv("OMP_NUM_THREADS");
}
