// One hospital's side of the protocol: a Site owns everything of its own (images, harmonizers,
// adapter, the aggregator's client-side term, filters, metrics, local model state, adapter store)
// and answers the coordinator's typed requests (protocol.h) with typed replies. Nothing outside
// reads or writes a Site's state: checkpoints ask for it (export-state) and give it back
// (restore-state) through the Channel, so a Site can run in its own process.
//
// The live Model is the one thing sites in one process share (a ModelPool): it is scratch space
// that a site loads its full state into at the start of every request, never state.
#pragma once

#include <concord/adapter.h>
#include <concord/aggregator.h>
#include <concord/channel.h>
#include <concord/dataset.h>
#include <concord/filter.h>
#include <concord/harmonizer.h>
#include <concord/metric.h>
#include <concord/pipeline.h>
#include <concord/protocol.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace concord {

// The model as a process builds it from the pipeline (seeded initialisation), shared as scratch
// by the sites the process runs one request at a time.
struct ModelPool {
  std::unique_ptr<Model> model;
  NamedArrays initial;  // every entry's initial value: the start of a site's local entries
  Task task = Task::Classification;
  int num_classes = 2;
};
// Builds the pipeline's model for data like `fed`'s (task, channels, classes, first image size).
ModelPool build_model_pool(const PipelineConfig& config, const Registry& registry,
                           const Federation& fed);
// The same for a model spec (a coordinator without data: concord server).
ModelPool build_model_pool(const PipelineConfig& config, const Registry& registry,
                           const ModelSpec& spec);

// The pipeline's adapter (the default one, everything shared, when it names none), attached to
// `model`; errors name the pipeline location.
std::unique_ptr<Adapter> build_adapter(const PipelineConfig& config, const Registry& registry,
                                       Model& model, const std::string& instance);

// The metrics a run reports: the pipeline's, or the plugins that declare themselves defaults for
// the task (PluginDesc::default_for). Throws when none does or one does not support the task.
std::vector<std::pair<std::string, std::unique_ptr<Metric>>> build_metrics(
    const PipelineConfig& config, const Registry& registry, Task task, const std::string& instance);

class Site {
 public:
  // `pool` null: the site answers the harmonizer phase only (concord harmonize --sites).
  Site(const PipelineConfig& config, const Registry& registry, SiteData data, ModelPool* pool);
  ~Site();
  // One request in, one reply out (both encoded); throws SiteError naming the site.
  Bytes handle(const Bytes& request);
  // Gives up the site's images (for the offline harmonize tool, which writes them).
  SiteData take_data();
  // Where the site may write figures (a learned harmonizer's montages); default: nowhere.
  void set_output_dir(const std::string& dir);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The sites of a simulated federation, each connected to `channel` under its name.
class SimulatedSites {
 public:
  SimulatedSites(const PipelineConfig& config, const Registry& registry,
                 std::vector<SiteData>&& sites, ModelPool* pool, InProcessChannel& channel);
  ~SimulatedSites();
  // Every site's images, in the dataset's order (their harmonized form after the fit phase).
  std::vector<SiteData> take_data();
  void set_output_dir(const std::string& dir);  // every site's (Site::set_output_dir)

 private:
  std::vector<std::unique_ptr<Site>> sites_;
};

}  // namespace concord
