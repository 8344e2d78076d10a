// Classification metrics: accuracy, balanced accuracy (Brodersen et al., ICPR 2010) and ROC AUC
// as the Mann-Whitney statistic with average ranks for ties (Hanley & McNeil, Radiology 1982);
// multiclass AUC is the macro mean of one-vs-rest AUCs.
#include <concord/error.h>
#include <concord/metric.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace concord {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Checks the predictions' layout; throws Error naming the metric and the first problem.
void check(const std::string& metric, const Predictions& p) {
  if (p.task != Task::Classification)
    throw Error("metric '" + metric + "': needs classification predictions");
  if (p.num_classes < 2)
    throw Error("metric '" + metric + "': needs at least 2 classes, got " +
                std::to_string(p.num_classes));
  if (p.probs.size() != p.labels.size() * size_t(p.num_classes))
    throw Error("metric '" + metric + "': " + std::to_string(p.labels.size()) + " labels and " +
                std::to_string(p.num_classes) + " classes need " +
                std::to_string(p.labels.size() * p.num_classes) + " probabilities, got " +
                std::to_string(p.probs.size()));
  for (size_t i = 0; i < p.labels.size(); ++i)
    if (p.labels[i] < 0 || p.labels[i] >= p.num_classes)
      throw Error("metric '" + metric + "': sample " + std::to_string(i) + " has label " +
                  std::to_string(p.labels[i]) + ", outside [0, " +
                  std::to_string(p.num_classes - 1) + "]");
}

// Index of the largest probability (the first one on ties).
int64_t predicted(const Predictions& p, size_t i) {
  const float* row = p.probs.data() + i * p.num_classes;
  return std::max_element(row, row + p.num_classes) - row;
}

class Accuracy : public Metric {
 public:
  Accuracy(const Args&, const BuildContext&) {}
  bool supports(Task task) const override { return task == Task::Classification; }
  double compute(const Predictions& p) const override {
    check("accuracy", p);
    if (p.labels.empty()) return kNaN;
    size_t correct = 0;
    for (size_t i = 0; i < p.labels.size(); ++i) correct += predicted(p, i) == p.labels[i];
    return double(correct) / double(p.labels.size());
  }
};

// Mean recall over the classes present in the labels.
class BalancedAccuracy : public Metric {
 public:
  BalancedAccuracy(const Args&, const BuildContext&) {}
  bool supports(Task task) const override { return task == Task::Classification; }
  double compute(const Predictions& p) const override {
    check("balanced-accuracy", p);
    std::vector<size_t> count(p.num_classes, 0), correct(p.num_classes, 0);
    for (size_t i = 0; i < p.labels.size(); ++i) {
      ++count[p.labels[i]];
      correct[p.labels[i]] += predicted(p, i) == p.labels[i];
    }
    double sum = 0;
    int present = 0;
    for (int c = 0; c < p.num_classes; ++c)
      if (count[c] > 0) {
        sum += double(correct[c]) / double(count[c]);
        ++present;
      }
    return present ? sum / present : kNaN;
  }
};

// AUC of `score` separating positives from negatives: (R+ - n+(n+ + 1)/2) / (n+ n-), where R+
// is the sum of the positives' ranks and tied scores share their average rank. NaN when a
// side is empty or a score is NaN.
double auc(const std::vector<double>& score, const std::vector<bool>& positive) {
  const size_t n = score.size();
  size_t n_pos = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(score[i])) return kNaN;
    n_pos += positive[i];
  }
  const size_t n_neg = n - n_pos;
  if (n_pos == 0 || n_neg == 0) return kNaN;
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return score[a] < score[b]; });
  double rank_sum = 0;
  for (size_t start = 0; start < n;) {
    size_t end = start;
    while (end < n && score[order[end]] == score[order[start]]) ++end;
    const double rank = 0.5 * double(start + 1 + end);  // mean of ranks start+1 .. end
    for (size_t k = start; k < end; ++k)
      if (positive[order[k]]) rank_sum += rank;
    start = end;
  }
  const double np = double(n_pos), nn = double(n_neg);
  return (rank_sum - np * (np + 1) / 2) / (np * nn);
}

class RocAuc : public Metric {
 public:
  RocAuc(const Args&, const BuildContext&) {}
  bool supports(Task task) const override { return task == Task::Classification; }
  double compute(const Predictions& p) const override {
    check("roc-auc", p);
    const size_t n = p.labels.size();
    std::vector<double> score(n);
    std::vector<bool> positive(n);
    auto one_vs_rest = [&](int c) {
      for (size_t i = 0; i < n; ++i) {
        score[i] = p.probs[i * p.num_classes + c];
        positive[i] = p.labels[i] == c;
      }
      return auc(score, positive);
    };
    if (p.num_classes == 2) return one_vs_rest(1);
    double sum = 0;
    for (int c = 0; c < p.num_classes; ++c) sum += one_vs_rest(c);  // NaN if a class is absent
    return sum / p.num_classes;
  }
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-metrics-classification", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Metric,
                "accuracy",
                "Fraction of samples whose most probable class is right",
                {},
                factory_of<Accuracy>(),
                {"classification"}});
  registry.add({Kind::Metric,
                "balanced-accuracy",
                "Mean per-class recall over the classes present in the labels",
                {},
                factory_of<BalancedAccuracy>(),
                {"classification"}});
  registry.add({Kind::Metric,
                "roc-auc",
                "ROC AUC (binary: class-1 probability; multiclass: macro one-vs-rest); "
                "NaN when a class is absent",
                {},
                factory_of<RocAuc>(),
                {"classification"}});
}
