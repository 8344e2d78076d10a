#include <concord/metric.h>

#include "testing.h"

#include <cmath>

using namespace concord;

namespace {

std::unique_ptr<Metric> dice(const std::string& empty = "one") {
  const Registry& reg = testkit::builtin_registry();
  return reg.create<Metric>(
      Kind::Metric, "dice",
      make_args("dice", reg.get(Kind::Metric, "dice").args, {{"empty", make_value(empty)}}));
}

Predictions segmentation(int classes, std::vector<std::vector<uint8_t>> pred,
                         std::vector<std::vector<uint8_t>> truth) {
  Predictions p;
  p.task = Task::Segmentation;
  p.num_classes = classes;
  p.pred_masks = std::move(pred);
  p.true_masks = std::move(truth);
  return p;
}

}  // namespace

TEST(Dice, BinaryOverlap) {
  auto d = dice();
  EXPECT_TRUE(d->supports(Task::Segmentation));
  EXPECT_FALSE(d->supports(Task::Classification));
  // |P| = 3, |T| = 2, |P n T| = 2 -> 4/5. Second sample perfect -> 1. Mean 0.9.
  auto p = segmentation(2, {{1, 1, 1, 0, 0}, {0, 1, 1, 0}}, {{1, 1, 0, 0, 0}, {0, 1, 1, 0}});
  EXPECT_DOUBLE_EQ(d->compute(p), (0.8 + 1.0) / 2);
}

TEST(Dice, MulticlassAveragesForegroundClassesPerSample) {
  // Class 1: P {0,1}, T {0}: 2*1/3. Class 2: P {3}, T {2,3}: 2*1/3. Background ignored.
  auto p = segmentation(3, {{1, 1, 0, 2}}, {{1, 0, 2, 2}});
  EXPECT_DOUBLE_EQ(dice()->compute(p), 2.0 / 3.0);
}

TEST(Dice, EmptyMaskConventions) {
  // Sample 0: class 1 matches perfectly (1), class 2 absent from both masks.
  // Sample 1: both masks all background. Sample 2: prediction on an empty truth.
  auto p = segmentation(3, {{1, 1, 0}, {0, 0, 0}, {0, 1, 0}}, {{1, 1, 0}, {0, 0, 0}, {0, 0, 0}});
  // "one": sample 0 = (1 + 1)/2, sample 1 = 1, sample 2 = (0 + 1)/2 -> (1 + 1 + 0.5)/3.
  EXPECT_DOUBLE_EQ(dice("one")->compute(p), 2.5 / 3.0);
  // "skip": sample 0 = 1 (class 2 left out), sample 1 left out, sample 2 = 0 -> 0.5.
  EXPECT_DOUBLE_EQ(dice("skip")->compute(p), 0.5);
  // Nothing to score at all.
  EXPECT_TRUE(std::isnan(dice("skip")->compute(segmentation(2, {{0, 0}}, {{0, 0}}))));
  EXPECT_DOUBLE_EQ(dice("one")->compute(segmentation(2, {{0, 0}}, {{0, 0}})), 1.0);
  EXPECT_TRUE(std::isnan(dice()->compute(segmentation(2, {}, {}))));
}

TEST(Dice, RejectsMismatchedMasks) {
  try {
    dice()->compute(segmentation(2, {{0, 1}, {1}}, {{0, 1}, {1, 0}}));
    FAIL() << "sample 1 has 1 predicted and 2 true pixels";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sample 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(dice()->compute(segmentation(2, {{0, 3}}, {{0, 1}})), Error);
  EXPECT_THROW(make_args("dice", testkit::builtin_registry().get(Kind::Metric, "dice").args,
                         {{"empty", make_value("zero")}}),
               Error);
}
