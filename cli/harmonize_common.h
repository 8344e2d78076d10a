// What the two input forms of `concord harmonize` share: files/folders/manifests
// (harmonize_cmd.cpp) and a pipeline's sites (harmonize_sites.cpp). Statistics files with
// their sidecar, the output folder's marker, failure lists, worker threads, the site-shift
// report's choice of images and its printout.
#pragma once

#include "harmonize_report.h"
#include "progress.h"

#include <concord/harmonizer.h>
#include <concord/json_text.h>
#include <concord/pipeline.h>
#include <concord/registry.h>

#include <nlohmann/json.hpp>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace concord::cli {

// Every input that failed, reported together at the end. Thread-safe.
class Failures {
 public:
  void add(const std::string& what, const std::string& reason, ProgressBar* bar);
  size_t size() const;
  std::vector<std::pair<std::string, std::string>> list() const;
  bool has(const std::string& what) const;

  // Failures grouped by cause (the reason without the input's own name), largest group first:
  // one odd cause repeated over many files is one line of the summary.
  struct Group {
    std::string cause;
    std::vector<std::string> inputs;  // sorted
    std::string reason;               // the full reason of the first input
  };
  std::vector<Group> by_cause() const;

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<std::string, std::string>> list_;
  std::set<std::string> inputs_;  // the `what` of every failure, for has()
};

// Plugin arguments from --arg key=value pairs over `base` values, typed and checked against the
// declared ArgSpecs by the conversion pipeline files use (concord::parse_value); defaults for the
// rest. Errors name the harmonizer and the argument.
Args build_args(const PluginDesc& desc, const std::vector<std::string>& pairs,
                std::map<std::string, Value> base = {});
// Args as key=value pairs that build_args reads back to the same values (sidecars, markers).
std::vector<std::string> arg_pairs_of(const Args& args);
// The pipeline's harmonizers[index]; errors when there is none or the index is out of range.
const Component& pipeline_harmonizer(const PipelineConfig& config, int index);
// A checksum of a file's bytes (16 hex digits): identifies the statistics in output markers.
std::string file_checksum(const std::string& file);
std::string checksum(const void* data, size_t size);

// "N of TOTAL inputs failed to VERB:" and the reasons, on stderr: a cause shared by several
// inputs once, as "37 inputs: CAUSE (e.g. a.png, b.png, c.png, ...)".
void print_failures(const Failures& f, size_t total, const char* verb);
// report["failed"] (every reason) and report["failure_causes"] ({cause, count, examples}).
void add_failures_to_report(const Failures& f, nlohmann::json& report);

// -j: `jobs` when positive, otherwise every core.
int worker_count(int jobs);

// Runs fn(i) for i in [0, n) on `jobs` threads (work stealing by an atomic counter).
template <class F>
void parallel_for(size_t n, int jobs, F fn) {
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < n;) fn(i);
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < std::min<int>(jobs, int(n)); ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
}

// The statistics file (save_stats) and its JSON sidecar FILE.json: method, the `args` pairs it
// was fitted with (apply reuses them), image and failure counts, sites, plus `extra` keys.
void save_stats_with_sidecar(const Stats& stats, const std::string& file, const std::string& method,
                             const std::vector<std::string>& args, size_t images, size_t failed,
                             const std::vector<std::string>& sites,
                             const nlohmann::json& extra = nlohmann::json::object());

// Makes `out` and records `mine` (what is written there) in out/.concord-harmonize.json; refuses
// a folder holding another harmonization unless `overwrite`, naming what differs (method,
// arguments, statistics, pixel type). Removes temporaries an interrupted run left, unless
// `shared` (shards of one apply writing into the folder at the same time: another shard's
// temporaries are work in progress).
void claim_output_folder(const std::string& out, const nlohmann::json& mine, bool overwrite,
                         bool shared = false);

// Files of "KEY<TAB>text<LF>" lines (journals, output records), appended one write() a line:
// escape_line escapes '\\' and LF in the text; read_tab_lines drops a torn last line (a killed
// writer) and sets *torn when there was one.
std::string escape_line(const std::string& s);
std::vector<std::pair<std::string, std::string>> read_tab_lines(const std::string& file,
                                                                bool* torn = nullptr);

// What each output in an --out folder was made from, in OUT/.concord-harmonize.inputs: the
// input's identity (input_identity) per output. A record is appended before its output may
// appear, so an output on disk has its input's record; a rerun redoes an output whose input
// changed since, or that has no record. Thread-safe.
// A shard (`apply --shard I/N`, processes writing into one folder at once, possibly from several
// machines) appends to its own OUT/.concord-harmonize.inputs.shard-I-of-N instead; every run
// reads all of these files, so a rerun with other shards or none resumes what any shard wrote.
class OutputRecords {
 public:
  explicit OutputRecords(const std::string& out, const std::string& shard_tag = "");
  ~OutputRecords();
  OutputRecords(const OutputRecords&) = delete;
  OutputRecords& operator=(const OutputRecords&) = delete;
  bool matches(const std::string& relative, const std::string& identity) const;
  void record(const std::string& relative, const std::string& identity);
  // Rewrites the file atomically with the last record of each output.
  void compact();

 private:
  std::string file_;
  int fd_ = -1;
  mutable std::mutex mutex_;
  std::map<std::string, std::string> records_;  // of every records file: for matches()
  std::map<std::string, std::string> own_;      // of this process's file: for compact()
};

// Size and modification time (ns) of a file; of each file for a folder (a DICOM series).
std::string input_identity(const std::string& path);

// The digest of statistics (of their wire form): identifies them in output markers.
std::string stats_digest(const Stats& stats);

// Which items feed the site-shift measure and preview: up to `per_site` per site, chosen by a
// seeded shuffle so that the choice depends neither on thread timing nor on resumption.
// site_of[i] is item i's site, or "" for items that take no part (masks).
std::vector<bool> pick_report_items(const std::vector<std::string>& site_of, int per_site,
                                    uint64_t seed);

// Prints "site shift over N sites ...", stores the numbers in report["site_shift"] and writes
// the preview PNG when `preview` is set (or warns that nothing was harmonized).
void print_site_shift(const SiteShiftReport& shift, nlohmann::json& report,
                      const std::string& preview, int preview_per_site);

}  // namespace concord::cli
