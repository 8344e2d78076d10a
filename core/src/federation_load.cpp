// Loading and checking the dataset (see federation_load.h).
#include "federation_load.h"

#include <concord/error.h>
#include <concord/seed.h>

#include <algorithm>
#include <set>

namespace concord {

const Sample* first_sample(const Federation& fed) {
  for (const bool train : {true, false})
    for (const auto& s : fed.sites) {
      const auto& split = train ? s.train : s.test;
      if (!split.empty()) return &split.front();
    }
  return nullptr;
}

Federation load_federation(const PipelineConfig& config, const Registry& registry, Roster& roster) {
  auto dataset =
      registry.create<Dataset>(Kind::Dataset, config.data.dataset.type, config.data.dataset.args,
                               BuildContext{config.seed, "data.dataset"});
  Federation fed;
  try {
    fed = dataset->load(DataRequest{config.seed, config.data.sites});
  } catch (const std::exception& e) {
    throw Error(config.data.dataset.where.str() + ": dataset '" + config.data.dataset.type +
                "': " + e.what());
  }
  if (config.data.partition.scheme != "none")
    fed = partition(std::move(fed), config.data.partition, derive_seed(config.seed, "partition"));
  if (config.data.scanner_shift > 0)
    apply_scanner_shift(fed, config.data.scanner_shift, derive_seed(config.seed, "scanner"));
  if (!config.data.sites.empty()) {
    std::vector<SiteData> keep;
    for (const auto& want : config.data.sites) {
      auto it = std::find_if(fed.sites.begin(), fed.sites.end(),
                             [&](const SiteData& s) { return s.name == want; });
      if (it == fed.sites.end()) {
        std::string have;
        for (const auto& s : fed.sites) have += " " + s.name;
        throw Error(config.file + ": data.sites names '" + want +
                    "', which the dataset does not have (it has:" + have + ")");
      }
      keep.push_back(std::move(*it));
    }
    fed.sites = std::move(keep);
  }
  if (fed.sites.empty())
    throw Error("dataset '" + config.data.dataset.type + "' produced no sites");
  std::set<std::string> names;
  for (const auto& s : fed.sites) names.insert(s.name);
  roster.order.clear();
  for (const auto& s : fed.sites) roster.order.push_back(s.name);
  roster.held =
      std::set<std::string>(config.evaluation.held_out.begin(), config.evaluation.held_out.end());
  for (const auto& h : config.evaluation.held_out)
    if (!names.count(h))
      throw Error(config.file + ": evaluation.held_out names unknown site '" + h + "'");
  for (const auto& [s, p] : config.federation.site_availability)
    if (!names.count(s))
      throw Error(config.file + ": federation.site_availability names unknown site '" + s + "'");
  const Sample* first = first_sample(fed);
  if (!first) throw Error("dataset '" + config.data.dataset.type + "' has no samples");
  for (const auto& s : fed.sites)
    for (const auto* split : {&s.train, &s.test})
      for (const auto& smp : *split)
        if (smp.image.size != first->image.size || smp.image.channels != first->image.channels)
          throw Error("site '" + s.name + "': sample '" + smp.id + "' is " +
                      std::to_string(smp.image.size[0]) + "x" + std::to_string(smp.image.size[1]) +
                      "x" + std::to_string(smp.image.channels) + ", others " +
                      std::to_string(first->image.size[0]) + "x" +
                      std::to_string(first->image.size[1]) + "x" +
                      std::to_string(first->image.channels) + " (set the dataset's size/channels)");

  return fed;
}
}  // namespace concord
