#include <concord/metric.h>

#include "testing.h"

#include <cmath>

using namespace concord;

namespace {

std::unique_ptr<Metric> metric(const std::string& name) {
  const Registry& reg = testkit::builtin_registry();
  return reg.create<Metric>(Kind::Metric, name, make_args(name, reg.get(Kind::Metric, name).args));
}

Predictions classification(int classes, std::vector<int64_t> labels, std::vector<float> probs) {
  Predictions p;
  p.task = Task::Classification;
  p.num_classes = classes;
  p.labels = std::move(labels);
  p.probs = std::move(probs);
  return p;
}

}  // namespace

TEST(Accuracy, CountsArgmaxHits) {
  auto acc = metric("accuracy");
  EXPECT_TRUE(acc->supports(Task::Classification));
  EXPECT_FALSE(acc->supports(Task::Segmentation));
  EXPECT_TRUE(acc->higher_is_better());
  // Predicted: 1, 0, 2, 2 -> hits on samples 0, 2 (and a tie 0.5/0.5 goes to class 0: sample 1).
  auto p = classification(3, {1, 0, 2, 1},
                          {0.1f, 0.8f, 0.1f, 0.5f, 0.5f, 0.0f, 0.2f, 0.3f, 0.5f, 0.3f, 0.3f, 0.4f});
  EXPECT_DOUBLE_EQ(acc->compute(p), 3.0 / 4.0);
  EXPECT_TRUE(std::isnan(acc->compute(classification(2, {}, {}))));
}

TEST(BalancedAccuracy, AveragesRecallOverPresentClasses) {
  auto bacc = metric("balanced-accuracy");
  // Labels 0,0,0,1 ; predictions 0,0,1,1: recall class 0 = 2/3, class 1 = 1 -> 5/6.
  auto p = classification(2, {0, 0, 0, 1}, {0.9f, 0.1f, 0.6f, 0.4f, 0.3f, 0.7f, 0.2f, 0.8f});
  EXPECT_DOUBLE_EQ(bacc->compute(p), (2.0 / 3.0 + 1.0) / 2.0);
  // Class 2 of 3 never appears in the labels: left out of the mean.
  auto q = classification(3, {0, 1}, {0.6f, 0.2f, 0.2f, 0.1f, 0.1f, 0.8f});
  EXPECT_DOUBLE_EQ(bacc->compute(q), 0.5);
}

TEST(RocAuc, BinaryWithTiesUsesAverageRanks) {
  auto auc = metric("roc-auc");
  // Class-1 scores: neg {0.1, 0.4, 0.35}, pos {0.8, 0.4}. Pairs (pos > neg): 0.8 beats all 3,
  // 0.4 beats 0.1 and 0.35 and ties 0.4 (counts 1/2): (3 + 2.5) / 6.
  auto p = classification(2, {0, 0, 1, 1, 0},
                          {0.9f, 0.1f, 0.6f, 0.4f, 0.2f, 0.8f, 0.6f, 0.4f, 0.65f, 0.35f});
  EXPECT_DOUBLE_EQ(auc->compute(p), 5.5 / 6.0);
  // All scores tied: 0.5.
  auto flat = classification(2, {0, 1, 0, 1}, {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f});
  EXPECT_DOUBLE_EQ(auc->compute(flat), 0.5);
  // Perfectly inverted: 0.
  auto inverted = classification(2, {0, 1}, {0.1f, 0.9f, 0.8f, 0.2f});
  EXPECT_DOUBLE_EQ(auc->compute(inverted), 0.0);
}

TEST(RocAuc, NanWhenAClassIsAbsent) {
  auto auc = metric("roc-auc");
  EXPECT_TRUE(std::isnan(auc->compute(classification(2, {1, 1}, {0.2f, 0.8f, 0.4f, 0.6f}))));
  // Multiclass with class 2 absent.
  EXPECT_TRUE(std::isnan(auc->compute(
      classification(3, {0, 1, 0}, {0.5f, 0.3f, 0.2f, 0.1f, 0.8f, 0.1f, 0.3f, 0.3f, 0.4f}))));
}

TEST(RocAuc, MulticlassIsTheMacroMeanOfOneVsRest) {
  auto auc = metric("roc-auc");
  // Labels 0, 1, 2, 0. Class 0 scores {0.6, 0.2, 0.1, 0.3}: pos {0.6, 0.3} vs neg {0.2, 0.1}
  // -> 1. Class 1 scores {0.3, 0.5, 0.6, 0.4}: pos {0.5} vs neg {0.3, 0.6, 0.4} -> 2/3.
  // Class 2 scores {0.1, 0.3, 0.3, 0.3}: pos {0.3} vs neg {0.1, 0.3, 0.3} -> (1 + 0.5 + 0.5)/3.
  auto p = classification(3, {0, 1, 2, 0},
                          {0.6f, 0.3f, 0.1f, 0.2f, 0.5f, 0.3f, 0.1f, 0.6f, 0.3f, 0.3f, 0.4f, 0.3f});
  EXPECT_NEAR(auc->compute(p), (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0, 1e-12);
}

TEST(ClassificationMetrics, RejectMalformedPredictions) {
  auto acc = metric("accuracy");
  try {
    acc->compute(classification(2, {0, 1}, {0.5f, 0.5f, 0.5f}));
    FAIL() << "3 probabilities for 2 samples x 2 classes must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("accuracy"), std::string::npos) << e.what();
  }
  EXPECT_THROW(metric("roc-auc")->compute(classification(2, {0, 2}, {0.5f, 0.5f, 0.5f, 0.5f})),
               Error);
  Predictions seg;
  seg.task = Task::Segmentation;
  EXPECT_THROW(metric("balanced-accuracy")->compute(seg), Error);
}
