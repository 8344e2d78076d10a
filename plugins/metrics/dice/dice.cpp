// dice: segmentation overlap, Dice = 2|P ∩ T| / (|P| + |T|) (Dice, Ecology 1945), averaged over
// the foreground classes of each sample, then over samples. A class absent from both masks
// scores 1 (empty = "one", as MONAI's DiceMetric with ignore_empty=False) or is left out of
// the sample's mean (empty = "skip", as nnU-Net); a prediction on an empty truth scores 0.
#include <concord/error.h>
#include <concord/metric.h>

#include <limits>

namespace concord {
namespace {

class Dice : public Metric {
 public:
  Dice(const Args& args, const BuildContext&) : skip_empty_(args.str("empty") == "skip") {}
  bool supports(Task task) const override { return task == Task::Segmentation; }

  double compute(const Predictions& p) const override {
    if (p.task != Task::Segmentation) throw Error("metric 'dice': needs segmentation predictions");
    if (p.num_classes < 2)
      throw Error("metric 'dice': needs at least 2 classes (background included), got " +
                  std::to_string(p.num_classes));
    if (p.pred_masks.size() != p.true_masks.size())
      throw Error("metric 'dice': " + std::to_string(p.pred_masks.size()) +
                  " predicted masks for " + std::to_string(p.true_masks.size()) + " true masks");
    const int k = p.num_classes;
    std::vector<size_t> inter(k), pred(k), truth(k);
    double total = 0;
    size_t counted = 0;
    for (size_t s = 0; s < p.true_masks.size(); ++s) {
      const auto& pm = p.pred_masks[s];
      const auto& tm = p.true_masks[s];
      if (pm.size() != tm.size())
        throw Error("metric 'dice': sample " + std::to_string(s) + " has " +
                    std::to_string(pm.size()) + " predicted and " + std::to_string(tm.size()) +
                    " true pixels");
      std::fill(inter.begin(), inter.end(), 0);
      std::fill(pred.begin(), pred.end(), 0);
      std::fill(truth.begin(), truth.end(), 0);
      for (size_t i = 0; i < tm.size(); ++i) {
        if (pm[i] >= k || tm[i] >= k)
          throw Error("metric 'dice': sample " + std::to_string(s) + " has class " +
                      std::to_string(std::max(pm[i], tm[i])) + " at pixel " + std::to_string(i) +
                      ", outside [0, " + std::to_string(k - 1) + "]");
        ++pred[pm[i]];
        ++truth[tm[i]];
        inter[tm[i]] += pm[i] == tm[i];
      }
      double sum = 0;
      int classes = 0;
      for (int c = 1; c < k; ++c) {
        const size_t denom = pred[c] + truth[c];
        if (denom == 0) {
          if (skip_empty_) continue;
          sum += 1.0;
        } else {
          sum += 2.0 * double(inter[c]) / double(denom);
        }
        ++classes;
      }
      if (classes == 0) continue;  // "skip": nothing to score in this sample
      total += sum / classes;
      ++counted;
    }
    return counted ? total / double(counted) : std::numeric_limits<double>::quiet_NaN();
  }

 private:
  bool skip_empty_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-metrics-dice", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Metric,
                "dice",
                "Mean over samples of the mean Dice over foreground classes",
                {ArgSpec::choice("empty", {"one", "skip"}, "one",
                                 "A class absent from both masks scores 1 (one) or is left out "
                                 "(skip; a sample with nothing left is left out)")},
                factory_of<Dice>(),
                {"segmentation"}});
}
