// `concord harmonize fit|apply --pipeline P --sites`: a pipeline's sites as the inputs. The
// dataset is built and harmonizers[0..N] are fitted exactly as `concord run` does it
// (Experiment::harmonize); fit saves harmonizers[N]'s global statistics, apply writes every
// site's harmonized images as float32 NIfTI with a manifest the `csv` dataset plugin loads.
#pragma once

#include "commands.h"

#include <string>
#include <vector>

namespace concord::cli {

struct SitesOptions {
  std::string pipeline;
  std::vector<std::string> sets;       // --set key=value on the pipeline
  int harmonizer = 0;                  // harmonizers[N]
  std::vector<std::string> arg_pairs;  // --arg: overrides of harmonizers[N]'s arguments
  std::string stats;                   // fit: output; apply: input (empty: fit first)
  std::string save_stats;              // apply: also save the statistics fitted in place
  std::string out;
  std::string masks = "copy";  // copy (write) or skip
  bool overwrite = false;
  std::string preview;
  int preview_per_site = 4;
  std::string report;
  int jobs = 0;
  bool no_progress = false;
};

void run_sites_fit(const Globals& g, const SitesOptions& o);
void run_sites_apply(const Globals& g, const SitesOptions& o);

// The file name (no extension) a sample's id gives: its last ':' or '/' component, without an
// image extension, characters other than [A-Za-z0-9._-] replaced by '_'
// ("brainsim:site-B:train:0012" -> "0012", "/d/case01.nii.gz#z=3" -> "case01_z_3").
std::string sample_file_stem(const std::string& id);

}  // namespace concord::cli
