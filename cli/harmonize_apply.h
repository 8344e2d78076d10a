// The loop `concord harmonize apply` runs for both input forms, files (harmonize_cmd.cpp) and a
// pipeline's sites (harmonize_sites.cpp): items on worker threads, every output finished on one
// OutputPublisher thread (flushed and renamed while the workers compute), failures recorded
// under the item's name, progress, the seeded choice of site-shift report items, and the summary
// line and report keys both print. What is done per item is the caller's.
#pragma once

#include "harmonize_common.h"
#include "harmonize_report.h"
#include "progress.h"

#include <concord/durable_output.h>
#include <concord/image_io.h>

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace concord::cli {

// A failure reason that names `path`: read_image's errors do already, others get it prepended.
std::string with_path(const std::string& path, const std::string& reason);

struct ApplyLoopOptions {
  std::string label;  // of the progress bar, e.g. "apply zscore"
  int jobs = 1;
  bool progress = true;
  // Item i's site, or "" for items that take no part in the site-shift report (masks); up to 16
  // items per site are chosen by a shuffle seeded with `seed` (pick_report_items).
  std::vector<std::string> site_of;
  uint64_t seed = 0;
  const char* masks_verb = "written";  // "N masks <verb>" in the summary, report "masks_<verb>"
};

class ApplyLoop {
 public:
  // Failures of items and of publishing go to `failures`; items named there already (inputs
  // that failed before the loop) are left to the work function to skip.
  ApplyLoop(ApplyLoopOptions options, Failures& failures);
  ApplyLoop(const ApplyLoop&) = delete;
  ApplyLoop& operator=(const ApplyLoop&) = delete;

  // Runs work(i) for every item i (one per options.site_of entry) on the worker threads. An
  // exception thrown by work(i) is item i's failure, recorded as name_of(i). Returns once every
  // output is in place or failed.
  void run(const std::function<std::string(size_t)>& name_of,
           const std::function<void(size_t)>& work);

  // From work(): writes `image` to `path` (options.publisher is this loop's publisher);
  // `published` counts it once it is in place, a failure to publish is `path`'s failure.
  void write(const Image& image, const std::string& path, WriteOptions options,
             std::atomic<size_t>& published);
  // True for the items chosen for the site-shift report.
  bool in_report(size_t i) const { return report_pick_.at(i); }
  ProgressBar& bar() { return bar_; }

  std::atomic<size_t> written{0}, skipped{0}, masks{0};
  SiteShiftReport report;

  // "harmonize apply: N written, S already complete (skipped), M masks <verb>, F failed, in T
  // (J threads)" on stdout.
  void print_summary() const;
  // The counts ("written", "skipped", "masks_<verb>") and failures into `rep`; then the site
  // shift: printed, stored in rep["site_shift"], and the preview PNG when `preview` is set.
  void add_to_report(nlohmann::json& rep, const std::string& preview, int preview_per_site) const;

 private:
  ApplyLoopOptions options_;
  Failures& failures_;
  std::vector<bool> report_pick_;
  ProgressBar bar_;
  std::mutex pending_mutex_;
  std::map<std::string, std::atomic<size_t>*> pending_;  // output path -> its counter
  OutputPublisher publisher_;  // last: finished (joined) before the members it calls back into
};

}  // namespace concord::cli
