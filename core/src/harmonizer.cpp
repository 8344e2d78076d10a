// The defaults of the Harmonizer interface (harmonizer.h): a statistics harmonizer is not
// learned. Kept apart from the learned stage so that every user of the interface (the fuzz
// targets' pipeline validation among them) links without the engine.
#include <concord/error.h>
#include <concord/harmonizer.h>

namespace concord {

LearnedPlan Harmonizer::plan(const std::vector<Stats>&, const StageSettings&) {
  throw Error("this harmonizer is not learned: it has no training stage");
}
LearnedUpdate Harmonizer::learn_round(const LearnedRound&) {
  throw Error("this harmonizer is not learned: it has no training stage");
}
Stats Harmonizer::survey(const LearnedSiteData& data) {
  return fit_site([&](const ImageVisitor& visit) {
    for (const auto& sample : *data.train) visit(sample.image);
  });
}
Stats Harmonizer::learn_result(const NamedArrays&) {
  throw Error("this harmonizer is not learned: it has no training stage");
}

}  // namespace concord
