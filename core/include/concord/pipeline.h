// Pipeline files: one YAML file describes a whole experiment; validated before anything runs.
#pragma once

#include <concord/args.h>
#include <concord/federation_tools.h>
#include <concord/registry.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace concord {

struct Component {
  std::string type;
  Args args;
  SourceLoc where;
};

struct Diagnostic {
  SourceLoc where;
  std::string message;
  std::string str() const { return where.str() + ": error: " + message; }
};

// Every problem found in a pipeline, reported together.
class ValidationError : public Error {
 public:
  explicit ValidationError(std::vector<Diagnostic> diags);
  const std::vector<Diagnostic>& diagnostics() const { return diags_; }

 private:
  std::vector<Diagnostic> diags_;
};

struct PipelineConfig {
  std::string file;
  std::string name;
  uint64_t seed = 0;
  struct Data {
    Component dataset;
    std::vector<std::string> sites;  // empty: all the dataset has
    PartitionSpec partition;
    double scanner_shift = 0;  // 0 = off
  } data;
  Component model;
  std::vector<Component> harmonizers;
  // harmonizers[i].stage of each learned harmonizer (harmonizer.h), keyed by i, every default
  // filled in (the plugin's default_stage(), the default aggregator).
  struct LearnedStage {
    int rounds = 1;
    int local_epochs = 1;
    double lr = 1e-3;
    Component aggregator;
    SourceLoc where;
  };
  std::map<size_t, LearnedStage> learned_stages;
  std::optional<Component> adapter;
  struct Training {
    int local_epochs = 1;
    int batch_size = 32;
    std::string optimizer = "adam";  // sgd | adam
    double lr = 1e-3;
    double momentum = 0.9;
    double weight_decay = 0;
    int threads = 0;  // 0: LibTorch default
    // Re-estimate BatchNorm running statistics with the final local weights after local
    // training ("precise BN"): the running averages kept during training lag fast-moving
    // weights, and eval-mode predictions collapse to one class without this.
    bool precise_bn = true;
  } training;
  struct Federation {
    int rounds = 5;
    double fraction = 1.0;                            // of available sites selected per round
    int min_sites = 1;                                // k: a round needs at least k replies
    double availability = 1.0;                        // probability a site is available in a round
    std::map<std::string, double> site_availability;  // per-site override
  } federation;
  Component aggregator;
  std::vector<Component> filters;
  struct Evaluation {
    std::vector<Component> metrics;
    int every = 1;
    std::vector<std::string> held_out;  // sites that only evaluate
  } evaluation;
  // Differential privacy with an accountant (docs/privacy.md): absent = off.
  struct Privacy {
    double epsilon = 8;  // the budget for the whole run, at delta
    double delta = 1e-5;
    std::string level = "client";   // client (one site's data) | sample (one sample: DP-SGD)
    std::string mode = "central";   // client level: central (the coordinator) | local (each site)
    std::string sampling = "none";  // client level: none (q = 1) | poisson (sample: always)
    double clip = 1.0;              // C: L2 bound on one site's delta / one sample's gradient
    double noise_multiplier = 0;    // z; 0 = the smallest z the budget allows for the rounds
    SourceLoc where;                // the `privacy` key (errors at set-up name it)
  };
  std::optional<Privacy> privacy;
  // Secure aggregation (SecAgg+, secagg.h): the coordinator sees masked uploads and their sum only.
  struct SecureAggregation {
    int threshold = 0;   // t: shares that rebuild a secret; 0 = k / 2 + 1
    int neighbours = 0;  // k: each site's neighbours; 0 = n - 1 up to 11 sites, else ~2 log2 n
    double range = 64;   // each value of a delta is clipped to [-range, range] and quantized
    int bits = 24;       // quantization levels 2^bits
    std::string weights = "samples";  // samples (weighted FedAvg) | equal
    // random (the operating system's, for deployments) | seeded (from the pipeline seed:
    // reproducible, and known to whoever holds the pipeline file: simulation studies only)
    std::string secrets = "random";
    SourceLoc where;
  };
  std::optional<SecureAggregation> secure_aggregation;
  std::string output = "runs";
  std::string resolved_yaml;  // the whole pipeline with every default filled in
};

// Reads, applies `overrides` ("a.b=value"), validates against the registry and builds the
// config. Throws ValidationError listing every problem with FILE:LINE:COL.
PipelineConfig load_pipeline(const std::string& file, const std::vector<std::string>& overrides,
                             const Registry& registry);
// Same, from text (for tests); `file` is only used in messages.
PipelineConfig parse_pipeline(const std::string& text, const std::string& file,
                              const std::vector<std::string>& overrides, const Registry& registry);

}  // namespace concord
