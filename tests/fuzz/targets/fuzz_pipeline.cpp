// The pipeline parser and validator (core/src/pipeline.cpp, args.cpp): YAML text from a user,
// validated against a registry of a few declared plugins (no plugin is built). Leading lines
// "#set a.b=value" become --set overrides, so their parser is fuzzed too.
#include <concord/pipeline.h>
#include <concord/registry.h>

#include "../fuzz_common.h"

using namespace concord;

static const Registry& fuzz_registry() {
  static Registry* r = [] {
    auto* reg = new Registry;
    Factory none = [](const Args&, const BuildContext&) -> std::unique_ptr<Plugin> {
      return nullptr;
    };
    auto add = [&](Kind k, const char* name, std::vector<ArgSpec> args) {
      reg->add({k, name, "fuzz", std::move(args), none});
    };
    add(Kind::Dataset, "brainsim",
        {ArgSpec::integer("sites", 4, "sites").range(1, 64),
         ArgSpec::integer("train_per_site", 64, "n").at_least(1),
         ArgSpec::integer("test_per_site", 32, "n").at_least(0),
         ArgSpec::integer("size", 48, "px").range(8, 512),
         ArgSpec::choice("task", {"classification", "segmentation"}, "classification", "task"),
         ArgSpec::real("shift", 0, "scanner shift").at_least(0)});
    add(Kind::Dataset, "folder",
        {ArgSpec::path("path", "root"), ArgSpec::string("pattern", "*", "glob"),
         ArgSpec::list("sites", ArgType::String, {}, "site names")});
    add(Kind::Model, "cnn",
        {ArgSpec::integer("width", 16, "w").range(1, 1024),
         ArgSpec::integer("depth", 4, "d").range(1, 16), ArgSpec::boolean("bn", true, "bn")});
    add(Kind::Harmonizer, "amplitude",
        {ArgSpec::choice("mode", {"normalize", "augment"}, "normalize", "mode"),
         ArgSpec::real("beta", 1, "band").range(0, 1),
         ArgSpec::real("lambda", 1, "mix").range(0, 1)});
    add(Kind::Harmonizer, "zscore", {ArgSpec::path("mask", "mask").not_required()});
    add(Kind::Adapter, "batchnorm",
        {ArgSpec::list("local", ArgType::String, {"bn"}, "module types kept local")});
    add(Kind::Aggregator, "fedavg",
        {ArgSpec::choice("weighting", {"samples", "uniform"}, "samples", "weights")});
    add(Kind::Aggregator, "krum",
        {ArgSpec::integer("f", 1, "byzantine").at_least(0),
         ArgSpec::list("weights", ArgType::Float, {"1", "2"}, "w")});
    add(Kind::Filter, "clip", {ArgSpec::real("max_norm", 1, "norm").at_least(0)});
    for (const char* m : {"accuracy", "balanced-accuracy", "roc-auc", "dice"})
      add(Kind::Metric, m, {});
    return reg;
  }();
  return *r;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  while (text.rfind("#set ", 0) == 0) {
    size_t eol = text.find('\n');
    overrides.push_back(text.substr(5, eol == std::string::npos ? eol : eol - 5));
    text = eol == std::string::npos ? "" : text.substr(eol + 1);
  }
  concord::fuzz::run([&] { parse_pipeline(text, "fuzz.yaml", overrides, fuzz_registry()); });
  return 0;
}
