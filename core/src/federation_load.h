// The dataset as every run builds it, checked: plugin and arguments, pipeline seed, partition,
// scanner shift, data.sites; unknown site names and non-uniform sample sizes are errors.
#pragma once

#include "harmonization_phase.h"

#include <concord/dataset.h>
#include <concord/pipeline.h>

namespace concord {

// The first sample (train split first): the one every other sample must match in size; null when
// the federation has none.
const Sample* first_sample(const Federation& fed);

// Also fills `roster` (the dataset's site order, evaluation.held_out).
Federation load_federation(const PipelineConfig& config, const Registry& registry, Roster& roster);

// `roster` for the run's sites `sites` (in order), with evaluation.held_out and
// federation.site_availability checked against them.
void fill_roster(const PipelineConfig& config, const std::vector<std::string>& sites,
                 Roster& roster);

// One site's data for a site process (StandaloneSite): its samples (checked as load_federation
// checks them); `description` gets the federation's task, classes, channels and notes.
SiteData load_site_data(const PipelineConfig& config, const Registry& registry,
                        const std::string& site, Federation& description);

}  // namespace concord
