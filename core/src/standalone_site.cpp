// StandaloneSite: one site of a federation whose coordinator runs in another process
// (`concord site`). The same Site as in simulation, over data this process loads itself.
#include <concord/engine.h>
#include <concord/error.h>

#include "federation_load.h"
#include "local_training.h"
#include "site.h"

#include <spdlog/spdlog.h>

namespace concord {

std::string DataShape::str() const {
  return std::string(task_name(task)) + ", " + std::to_string(num_classes) + " classes, " +
         std::to_string(channels) + " x " + std::to_string(image_size[0]) + " x " +
         std::to_string(image_size[1]);
}

struct StandaloneSite::Impl {
  PipelineConfig config;  // the Site keeps a reference to it
  DataShape shape;
  ModelPool pool;
  std::unique_ptr<Site> site;
};

StandaloneSite::StandaloneSite(const PipelineConfig& config, const Registry& registry,
                               const std::string& site, const std::string& output_dir)
    : impl_(std::make_unique<Impl>()) {
  Impl& x = *impl_;
  x.config = config;
  spdlog::debug("LibTorch threads: {}", configure_torch_process(x.config.training.threads));
  Federation description;
  SiteData data = load_site_data(x.config, registry, site, description);
  const Sample& first = data.train.empty() ? data.test.front() : data.train.front();
  x.shape = {description.task,
             description.channels,
             description.num_classes,
             {first.image.size[0], first.image.size[1]}};
  // The model as every process of the federation builds it: the same seeded initial values.
  x.pool = build_model_pool(
      x.config, registry,
      ModelSpec{x.shape.task, x.shape.channels, x.shape.num_classes, x.shape.image_size});
  x.site = std::make_unique<Site>(x.config, registry, std::move(data), &x.pool);
  x.site->set_output_dir(output_dir);
}

StandaloneSite::~StandaloneSite() = default;

Bytes StandaloneSite::handle(const Bytes& request) {
  return impl_->site->handle(request);
}

const DataShape& StandaloneSite::shape() const {
  return impl_->shape;
}

}  // namespace concord
