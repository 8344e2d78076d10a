// finetune: plain FedAvg during federation; after the last round each site fine-tunes the global
// model for k epochs on its own training split, and is evaluated again ("personalized").
// The fine-tuned weights live in the site store: the engine reloads the global model before
// every evaluation, so before_evaluate() puts them back for the personalised one.
#include <concord/adapter.h>
#include <concord/error.h>

#include "adapter_common.h"

namespace concord {
namespace {

const char* const kTuned = "finetune.model/";  // site-store prefix of the fine-tuned model
const char* const kPhase = "finetune.phase";   // 1 after personalize()

class FineTune : public Adapter {
 public:
  FineTune(const Args& args, const BuildContext& ctx)
      : epochs_(int(args.integer("epochs"))),
        modules_(args.strings("modules")),
        who_(ctx.instance.empty() ? "finetune" : "finetune (" + ctx.instance + ")") {}

  void attach(Model& model) override {
    adapters::check_module_paths(model, modules_, who_, "modules");
  }

  bool personalizes() const override { return true; }

  void personalize(LocalTrainer& trainer) override {
    if (trainer.train_samples() <= 0)
      throw Error(who_ + ": site '" + trainer.site() + "' has no training samples to fine-tune on");
    ParamFilter only;
    if (!modules_.empty())
      only = [this](const StateEntry& e) {
        for (const std::string& p : modules_)
          if (adapters::under_path(e.module_path, p)) return true;
        return false;
      };
    trainer.train(epochs_, only);
    adapters::put_prefixed(trainer.site_store(), kTuned, adapters::snapshot(trainer.model()));
    adapters::set_flag(trainer.site_store(), kPhase, true);
  }

  void before_evaluate(LocalTrainer& trainer) override {
    if (!adapters::flag(trainer.site_store(), kPhase)) return;  // global evaluations
    adapters::restore(trainer.model(), adapters::take_prefixed(trainer.site_store(), kTuned), who_);
  }

 private:
  int epochs_;
  std::vector<std::string> modules_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-adapter-finetune", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Adapter,
                "finetune",
                "After federation, each site fine-tunes the global model on its own data",
                {ArgSpec::integer("epochs", 1, "k: local fine-tuning epochs after the last round")
                     .at_least(1),
                 ArgSpec::list("modules", ArgType::String, {},
                               "Module paths (prefixes) to fine-tune, e.g. [classifier]; empty: "
                               "the whole model")},
                factory_of<FineTune>()});
}
