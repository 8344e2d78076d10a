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

namespace {

// The dataset plugin's federation for `request`, then the pipeline's partition and scanner shift.
Federation load_dataset(const PipelineConfig& config, const Registry& registry,
                        const std::vector<std::string>& request) {
  auto dataset =
      registry.create<Dataset>(Kind::Dataset, config.data.dataset.type, config.data.dataset.args,
                               BuildContext{config.seed, "data.dataset"});
  Federation fed;
  try {
    fed = dataset->load(DataRequest{config.seed, request});
  } catch (const std::exception& e) {
    throw Error(config.data.dataset.where.str() + ": dataset '" + config.data.dataset.type +
                "': " + e.what());
  }
  if (config.data.partition.scheme != "none")
    fed = partition(std::move(fed), config.data.partition, derive_seed(config.seed, "partition"));
  if (config.data.scanner_shift > 0)
    apply_scanner_shift(fed, config.data.scanner_shift, derive_seed(config.seed, "scanner"));
  return fed;
}

// Every sample of `fed` the size and channel count of `first`.
void check_sample_sizes(const Federation& fed, const Sample& first) {
  for (const auto& s : fed.sites)
    for (const auto* split : {&s.train, &s.test})
      for (const auto& smp : *split)
        if (smp.image.size != first.image.size || smp.image.channels != first.image.channels)
          throw Error("site '" + s.name + "': sample '" + smp.id + "' is " +
                      std::to_string(smp.image.size[0]) + "x" + std::to_string(smp.image.size[1]) +
                      "x" + std::to_string(smp.image.channels) + ", others " +
                      std::to_string(first.image.size[0]) + "x" +
                      std::to_string(first.image.size[1]) + "x" +
                      std::to_string(first.image.channels) + " (set the dataset's size/channels)");
}

}  // namespace

void fill_roster(const PipelineConfig& config, const std::vector<std::string>& sites,
                 Roster& roster) {
  const std::set<std::string> names(sites.begin(), sites.end());
  roster.order = sites;
  roster.held =
      std::set<std::string>(config.evaluation.held_out.begin(), config.evaluation.held_out.end());
  for (const auto& h : config.evaluation.held_out)
    if (!names.count(h))
      throw Error(config.file + ": evaluation.held_out names unknown site '" + h + "'");
  for (const auto& [s, p] : config.federation.site_availability)
    if (!names.count(s))
      throw Error(config.file + ": federation.site_availability names unknown site '" + s + "'");
}

SiteData load_site_data(const PipelineConfig& config, const Registry& registry,
                        const std::string& site, Federation& description) {
  // A simulated federation (partition, scanner shift) is built whole, as the simulation builds
  // it, so this site gets exactly its part; otherwise the dataset is asked for this site only.
  const bool whole = config.data.partition.scheme != "none" || config.data.scanner_shift > 0;
  Federation fed =
      load_dataset(config, registry, whole ? config.data.sites : std::vector<std::string>{site});
  auto it = std::find_if(fed.sites.begin(), fed.sites.end(),
                         [&](const SiteData& s) { return s.name == site; });
  if (it == fed.sites.end()) {
    std::string have;
    for (const auto& s : fed.sites) have += " " + s.name;
    throw Error(config.data.dataset.where.str() + ": dataset '" + config.data.dataset.type +
                "' has no site '" + site + "' (it has:" + (have.empty() ? " none" : have) + ")");
  }
  SiteData mine = std::move(*it);
  fed.sites.clear();
  fed.sites.push_back(std::move(mine));
  const Sample* first = first_sample(fed);
  if (!first) throw Error("site '" + site + "': the dataset gives it no samples");
  check_sample_sizes(fed, *first);
  SiteData out = std::move(fed.sites.front());
  fed.sites.clear();
  description = std::move(fed);
  return out;
}

Federation load_federation(const PipelineConfig& config, const Registry& registry, Roster& roster) {
  Federation fed = load_dataset(config, registry, config.data.sites);
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
  std::vector<std::string> names;
  for (const auto& s : fed.sites) names.push_back(s.name);
  fill_roster(config, names, roster);
  const Sample* first = first_sample(fed);
  if (!first) throw Error("dataset '" + config.data.dataset.type + "' has no samples");
  check_sample_sizes(fed, *first);

  return fed;
}
}  // namespace concord
