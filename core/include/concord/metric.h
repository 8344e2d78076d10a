// Metric plugins score a site's predictions.
#pragma once

#include <concord/image.h>
#include <concord/registry.h>

namespace concord {

struct Predictions {
  Task task = Task::Classification;
  int num_classes = 2;
  // Classification: one label and num_classes probabilities (row-major) per sample.
  std::vector<int64_t> labels;
  std::vector<float> probs;
  // Segmentation: per-sample predicted and true class maps (same length per sample).
  std::vector<std::vector<uint8_t>> pred_masks, true_masks;
  size_t size() const { return task == Task::Classification ? labels.size() : true_masks.size(); }
};

class Metric : public Plugin {
 public:
  virtual bool supports(Task task) const = 0;
  // NaN when undefined (e.g. ROC AUC with a single class present).
  virtual double compute(const Predictions& p) const = 0;
  // True when larger is better (for worst-site reporting).
  virtual bool higher_is_better() const { return true; }
};

}  // namespace concord
