// batchnorm: which BatchNorm state is federated. BatchNorm modules are found by module type
// (BatchNorm1d/2d/3d, TorchScript included), never by parameter names.
//   shared       everything averaged (FedAvg, McMahan et al. 2017)
//   stats-local  gamma/beta shared, running mean/var/count local (SiloBN, Andreux et al. 2020)
//   local        every BatchNorm parameter and statistic local (FedBN, Li et al. ICLR 2021)
// Sites that never trained either keep the statistics they were given (`unseen: global`) or
// re-estimate them on their own images without labels (`unseen: adapt`, adaptive BN).
#include <concord/adapter.h>
#include <concord/error.h>

#include "adapter_common.h"

namespace concord {
namespace {

enum class Policy { Shared, StatsLocal, Local };

class BatchNormAdapter : public Adapter {
 public:
  BatchNormAdapter(const Args& args, const BuildContext& ctx)
      : policy_(parse_policy(args.str("policy"))),
        adapt_(args.str("unseen") == "adapt"),
        instance_(ctx.instance.empty() ? "batchnorm" : "batchnorm (" + ctx.instance + ")") {
    // Under stats-local and local the coordinator never receives BatchNorm statistics, so
    // "global statistics" would silently mean the untrained initial values (mean 0, var 1).
    if (!adapt_ && policy_ != Policy::Shared)
      throw Error(instance_ +
                  ": unseen: global needs policy: shared; under policy: " + args.str("policy") +
                  " the coordinator holds no BatchNorm statistics (they never leave the sites), "
                  "so a site that never trained can only re-estimate them: use unseen: adapt");
  }

  void attach(Model& model) override {
    if (policy_ == Policy::Shared) return;
    for (const ModuleEntry& m : model.modules())
      if (adapters::is_batchnorm_type(m.type)) return;
    std::string types;
    for (const ModuleEntry& m : model.modules())
      if (types.find(adapters::short_type_name(m.type)) == std::string::npos)
        types += (types.empty() ? "" : ", ") + adapters::short_type_name(m.type);
    throw Error(instance_ + ": the model has no BatchNorm module (module types: " + types +
                "), so a local BatchNorm policy would federate nothing differently");
  }

  bool is_shared(const StateEntry& e) const override {
    if (!adapters::is_batchnorm(e)) return true;
    switch (policy_) {
      case Policy::Shared:
        return true;
      case Policy::StatsLocal:
        return e.is_parameter;  // gamma/beta travel, statistics stay
      case Policy::Local:
        return false;
    }
    return true;
  }

  TrainResult train_local(LocalTrainer& trainer, int epochs) override {
    // A site joining late starts from statistics that are not its own (initial values under
    // the local policies): re-estimate them first so training starts from its own domain.
    if (adapt_ && policy_ != Policy::Shared && !trainer.has_trained())
      trainer.recalibrate_batchnorm();
    return trainer.train(epochs);
  }

  void prepare_unseen_site(LocalTrainer& trainer) override {
    if (adapt_) trainer.recalibrate_batchnorm();
  }

 private:
  static Policy parse_policy(const std::string& s) {
    if (s == "shared") return Policy::Shared;
    if (s == "stats-local") return Policy::StatsLocal;
    return Policy::Local;
  }

  Policy policy_;
  bool adapt_;
  std::string instance_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-adapter-batchnorm", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Adapter,
       "batchnorm",
       "BatchNorm federation policy: shared (FedAvg), stats-local (SiloBN) or local (FedBN)",
       {ArgSpec::choice("policy", {"shared", "stats-local", "local"}, "",
                        "shared: everything averaged; stats-local: gamma/beta shared, running "
                        "statistics local (SiloBN); local: all BatchNorm state local (FedBN)")
            .required(),
        ArgSpec::choice("unseen", {"adapt", "global"}, "adapt",
                        "Sites that never trained (held-out, late): adapt re-estimates BatchNorm "
                        "statistics on their own images without labels; global keeps the "
                        "federated statistics (policy shared only)")},
       factory_of<BatchNormAdapter>()});
}
