// split: a model cut into a shared part (federated) and a local part (kept by each site), both
// named by module path prefixes and validated against the built model.
//   fedper  shared body, local head, trained jointly (Arivazhagan et al. 2019)
//   fedrep  local head trained with the body frozen, then the body with the head frozen
//           (Collins et al., ICML 2021)
//   lg      local encoder, shared head, trained jointly (LG-FedAvg, Liang et al. 2020)
// For a UNet, `shared: [encoder]`, `local: [decoder]` keeps a site-specific decoder.
#include <concord/adapter.h>
#include <concord/error.h>

#include "adapter_common.h"

#include <set>

namespace concord {
namespace {

enum class Mode { FedPer, FedRep, LG };

class SplitAdapter : public Adapter {
 public:
  SplitAdapter(const Args& args, const BuildContext& ctx)
      : mode_name_(args.str("mode")),
        shared_(args.strings("shared")),
        local_(args.strings("local")),
        head_epochs_(int(args.integer("head_epochs"))),
        body_epochs_(int(args.integer("body_epochs"))),
        who_(ctx.instance.empty() ? "split" : "split (" + ctx.instance + ")") {
    mode_ = mode_name_ == "fedrep" ? Mode::FedRep : mode_name_ == "lg" ? Mode::LG : Mode::FedPer;
    if (shared_.empty() && local_.empty())
      throw Error(who_ +
                  ": give the module paths of the shared part, the local part or both "
                  "(e.g. shared: [encoder], local: [decoder])");
    const std::set<std::string> s(shared_.begin(), shared_.end());
    for (const std::string& p : local_)
      if (s.count(p)) throw Error(who_ + ": module path '" + p + "' is both shared and local");
  }

  void attach(Model& model) override {
    adapters::check_module_paths(model, shared_, who_, "shared");
    adapters::check_module_paths(model, local_, who_, "local");
    std::vector<std::string> uncovered;
    const StateEntry* first_param = nullptr;
    int n_shared = 0, n_local = 0;
    const std::vector<StateEntry> entries = model.state();  // first_param points into it
    for (const StateEntry& e : entries) {
      const Side side = side_of(e.module_path);
      if (side == Side::None) {
        const std::string shown = e.module_path.empty() ? "<root>" : e.module_path;
        if (uncovered.empty() || uncovered.back() != shown) uncovered.push_back(shown);
        continue;
      }
      if (!e.is_parameter) continue;
      if (!first_param) first_param = &e;
      (side == Side::Shared ? n_shared : n_local)++;
    }
    if (!uncovered.empty()) {
      std::string msg = who_ + ": modules with state are in neither shared nor local: ";
      for (size_t i = 0; i < uncovered.size(); ++i) msg += (i ? ", " : "") + uncovered[i];
      throw Error(msg + " (list them, or give only one of shared/local so the rest is the other)");
    }
    if (n_shared == 0 || n_local == 0)
      throw Error(who_ + ": no parameter is " + (n_shared == 0 ? "shared" : "local") +
                  "; the split must leave parameters on both sides");
    // The input layer tells which side is the encoder/body: catches a swapped configuration
    // (fedper with the body declared local is lg, and vice versa).
    const bool first_local = side_of(first_param->module_path) == Side::Local;
    if (mode_ != Mode::LG && first_local)
      throw Error(who_ + ": mode " + mode_name_ +
                  " keeps the head local, but the model's first "
                  "layer '" +
                  first_param->module_path +
                  "' is declared local; for a local "
                  "encoder and a shared head use mode: lg");
    if (mode_ == Mode::LG && !first_local)
      throw Error(who_ + ": mode lg keeps the encoder local, but the model's first layer '" +
                  first_param->module_path +
                  "' is declared shared; for a local head use "
                  "mode: fedper or fedrep");
  }

  bool is_shared(const StateEntry& e) const override {
    return side_of(e.module_path) != Side::Local;
  }

  TrainResult train_local(LocalTrainer& trainer, int epochs) override {
    if (mode_ != Mode::FedRep) return trainer.train(epochs);
    // FedRep: fit the local head to the current shared body, then update the body.
    const TrainResult head =
        trainer.train(head_epochs_, [this](const StateEntry& e) { return !is_shared(e); });
    TrainResult body = trainer.train(body_epochs_ > 0 ? body_epochs_ : epochs,
                                     [this](const StateEntry& e) { return is_shared(e); });
    body.samples += head.samples;
    body.steps += head.steps;
    return body;
  }

 private:
  enum class Side { None, Shared, Local };

  // The longest matching prefix decides, so `shared: [encoder], local: [encoder.bn1]` works;
  // with one list only, everything else is on the other side.
  Side side_of(const std::string& module_path) const {
    size_t best = 0;
    Side side = Side::None;
    for (const std::string& p : shared_)
      if (adapters::under_path(module_path, p) && (side == Side::None || p.size() > best))
        best = p.size(), side = Side::Shared;
    for (const std::string& p : local_)
      if (adapters::under_path(module_path, p) && (side == Side::None || p.size() > best))
        best = p.size(), side = Side::Local;
    if (side == Side::None && (shared_.empty() || local_.empty()))
      return shared_.empty() ? Side::Shared : Side::Local;
    return side;
  }

  std::string mode_name_;
  Mode mode_;
  std::vector<std::string> shared_, local_;
  int head_epochs_, body_epochs_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-adapter-split", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Adapter,
       "split",
       "Shared and site-local model parts by module path: FedPer, FedRep or LG-FedAvg",
       {ArgSpec::choice("mode", {"fedper", "fedrep", "lg"}, "fedper",
                        "fedper: shared body, local head, joint training; fedrep: local head "
                        "trained with the body frozen, then the body; lg: local encoder, shared "
                        "head (LG-FedAvg)"),
        ArgSpec::list("shared", ArgType::String, {},
                      "Module paths (prefixes) of the federated part, e.g. [encoder]; empty: "
                      "everything not local"),
        ArgSpec::list("local", ArgType::String, {},
                      "Module paths (prefixes) kept at each site, e.g. [decoder]; empty: "
                      "everything not shared"),
        ArgSpec::integer("head_epochs", 1, "fedrep: epochs on the local part, shared part frozen")
            .at_least(1),
        ArgSpec::integer("body_epochs", 0,
                         "fedrep: epochs on the shared part, local part frozen; 0: the "
                         "pipeline's training.local_epochs")
            .at_least(0)},
       factory_of<SplitAdapter>()});
}
