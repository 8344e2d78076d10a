// `concord harmonize fit|apply`: offline, parallel, resumable harmonization of image folders
// with any harmonizer plugin.
//
//   fit   --method M [--arg k=v]... INPUTS... --stats FILE      statistics from the inputs
//   apply --stats FILE INPUTS... --out DIR                      applies saved statistics
//   apply --method M [--arg k=v]... INPUTS... --out DIR         one shot: fit, then apply
//
// Sites: with one input, each top-level subfolder is a site; with several, each input is one
// (--site-depth overrides). Masks (folders mask/masks/label/labels/seg..., or --mask-glob) are
// never harmonized: apply copies them unchanged (--masks skip leaves them out). --exclude globs
// are skipped entirely. See docs/harmonize.md.
#include "commands.h"

#include <sstream>

#include <iomanip>

#include <concord/durable_output.h>
#include <concord/pipeline.h>
#include "harmonize_apply.h"
#include "harmonize_common.h"
#include "harmonize_evaluate.h"
#include "harmonize_inputs.h"
#include "harmonize_report.h"
#include "harmonize_shard.h"
#include "harmonize_sites.h"
#include "harmonize_worker.h"
#include "progress.h"
#include "report_html.h"

#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/image_io.h>
#include <concord/message.h>
#include <concord/registry.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <future>
#include <iostream>
#include <limits>
#include <optional>
#include <random>
#include <thread>
#include <unordered_set>

namespace concord::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Options {
  std::string method;
  std::string pipeline;      // take method and arguments from a pipeline file
  int harmonizer_index = 0;  // ... its harmonizers[N]
  std::vector<std::string> pipeline_sets;
  bool sites = false;                  // the pipeline's sites are the inputs
  std::vector<std::string> arg_pairs;  // "key=value"
  std::vector<std::string> inputs;
  std::string stats;       // fit: output; apply: input
  std::string save_stats;  // apply one-shot: also save the fitted statistics
  std::string out;
  int jobs = 0;
  int site_depth = -1;
  std::vector<std::string> exclude, mask_globs;
  std::string masks = "copy";
  std::string pixel_type = "keep";   // keep | keep-strict | float32
  std::string channels = "auto";     // auto | grey | keep
  std::string non_finite = "error";  // error | zero
  bool overwrite = false;
  std::string preview;
  int preview_per_site = 4;
  std::string report;
  uint64_t seed = 0;
  bool no_progress = false;
  std::string shard;              // --shard I/N: this process's share of the inputs
  std::string shard_by = "site";  // fit: whole sites per shard, or split by path
  std::string inputs_digest;      // with --shard: the digest of the whole input list
  std::string worker_state;  // hidden: this process is a supervised worker (harmonize_worker.h)
  std::string probe;         // hidden: with worker_state, decode and harmonize this input alone
};

const PluginDesc& harmonizer_desc(const Globals& g, const std::string& method) {
  load_all_plugins(g);
  if (method.empty()) throw Error("no harmonization method given (--method)");
  return global_registry().get(Kind::Harmonizer, method);  // throws with did-you-mean
}

std::unique_ptr<Harmonizer> make_harmonizer(const std::string& method, const Args& args,
                                            uint64_t seed) {
  BuildContext ctx;
  ctx.seed = seed;
  ctx.instance = "harmonize";
  return global_registry().create<Harmonizer>(Kind::Harmonizer, method, args, ctx);
}

// read_image with the --non-finite and --channels policies (the reader applies both; NaN/Inf
// voxels refuse the file unless --non-finite zero).
Image read_input(const std::string& path, const Options& o) {
  ReadOptions r;
  r.non_finite = o.non_finite == "zero" ? NonFinite::Zero : NonFinite::Error;
  r.channels = o.channels == "grey"   ? ChannelPolicy::Grey
               : o.channels == "keep" ? ChannelPolicy::Keep
                                      : ChannelPolicy::Auto;
  return read_image(path, r);
}

// Marks an input in progress in the supervisor's journal for the lifetime of the object.
struct InProgress {
  const WorkerState& state;
  std::string path;
  InProgress(const WorkerState& s, std::string p) : state(s), path(std::move(p)) {
    state.begin(path);
  }
  ~InProgress() { state.end(path); }
};

// ---------------------------------------------------------------------------------------------
// Fit: one fit_site() per site, as a federated site would compute it, sites on worker threads.
// (Chunks within a site are not combined: harmonizers that key statistics by site, such as
// amplitude, refuse two parts of one site.) Each site reads its next image on a helper thread
// while the harmonizer works on the current one.

struct FitResult {
  Stats stats;
  size_t images = 0;
  std::vector<std::string> sites;
  std::vector<Stats> parts;  // per site, before combine (only with `partial`)
};

// `partial` (fit --shard): the per-site statistics are kept, not combined, and a share without
// images (or whose every input failed) is no error: the merge decides.
FitResult fit(const std::string& method, const Args& args, const Options& o,
              const std::vector<InputItem>& items, Failures& failures, const WorkerState& state,
              bool partial = false) {
  if (make_harmonizer(method, args, o.seed)->learned())
    throw Error("harmonizer '" + method +
                "' is learned: it trains in a federated stage, not from files. Fit it with "
                "`concord harmonize fit --pipeline P --sites --stats FILE` or take "
                "learned/harmonizer-<i>-" +
                method +
                ".stats from a run folder, then apply with "
                "--stats FILE");
  std::map<std::string, std::vector<const InputItem*>> by_site;
  size_t total = 0;
  for (const auto& it : items)
    if (it.role == InputItem::Role::Image) by_site[it.site].push_back(&it), ++total;
  if (total == 0 && partial) return {};
  if (total == 0) throw Error("no images to fit '" + method + "' on");
  std::vector<std::pair<std::string, std::vector<const InputItem*>>> sites(by_site.begin(),
                                                                           by_site.end());
  FitResult result;
  for (const auto& [site, list] : sites) result.sites.push_back(site);

  ProgressBar bar("fit " + method, int64_t(total), !o.no_progress);
  std::vector<std::optional<Stats>> parts(sites.size());
  std::atomic<size_t> read_ok{0};
  const bool serial = state.serial();
  parallel_for(sites.size(), serial ? 1 : worker_count(o.jobs), [&](size_t k) {
    const auto& [site, list] = sites[k];
    // Begun in the journal before decoding, ended once the harmonizer has seen the image.
    auto load = [&](size_t i) -> std::optional<Image> {
      state.begin(list[i]->path);
      try {
        return read_input(list[i]->path, o);
      } catch (const std::exception& e) {
        failures.add(list[i]->path, with_path(list[i]->path, e.what()), &bar);
        return std::nullopt;
      }
    };
    try {
      auto h = make_harmonizer(method, args, o.seed);
      ImageSource source = [&](const ImageVisitor& visit) {
        // Serial (finding which input crashes a worker): no read-ahead.
        auto start = [&](size_t i) {
          return std::async(serial ? std::launch::deferred : std::launch::async, load, i);
        };
        std::future<std::optional<Image>> next = start(0);
        for (size_t i = 0; i < list.size(); ++i) {
          std::optional<Image> im = next.get();
          if (i + 1 < list.size()) next = start(i + 1);
          struct End {
            const WorkerState& s;
            const std::string& p;
            ~End() { s.end(p); }
          } end{state, list[i]->path};
          if (im) {
            try {
              visit(*im);
              ++read_ok;
            } catch (const std::exception& e) {
              failures.add(list[i]->path,
                           list[i]->path + ": harmonizer '" + method + "' (fit): " + e.what(),
                           &bar);
            }
          }
          bar.advance();
          if (failures.size()) bar.set_status(std::to_string(failures.size()) + " failed");
        }
      };
      Stats s = h->fit_site(source);
      s.site = site;
      parts[k] = std::move(s);
    } catch (const std::exception& e) {
      failures.add("site " + site,
                   "harmonizer '" + method + "' failed to fit site '" + site + "': " + e.what(),
                   &bar);
    }
  });
  bar.finish();
  std::vector<Stats> ok;
  for (auto& p : parts)
    if (p) ok.push_back(std::move(*p));
  result.images = read_ok;
  if (partial) {
    result.parts = std::move(ok);
    return result;
  }
  if (ok.empty() || read_ok == 0)
    throw Error("harmonizer '" + method +
                "': no statistics could be computed (every input failed)");
  auto h = make_harmonizer(method, args, o.seed);
  try {
    result.stats = h->combine(ok);
  } catch (const std::exception& e) {
    throw Error("harmonizer '" + method + "': combine failed: " + e.what());
  }
  result.images = read_ok;
  return result;
}

// The stats file and its sidecar recording the arguments it was fitted with.
void save_fit(const FitResult& r, const std::string& file, const std::string& method,
              const Options& o, size_t failed) {
  save_stats_with_sidecar(r.stats, file, method, o.arg_pairs, r.images, failed, r.sites);
}

// ---------------------------------------------------------------------------------------------
// Apply

// Integer pixel types whose range the harmonized values left (they will be clamped).
bool clamps(const Image& im) {
  double lo, hi;
  switch (im.pixel_type) {
    case PixelType::U8:
      lo = 0, hi = 255;
      break;
    case PixelType::I8:
      lo = -128, hi = 127;
      break;
    case PixelType::U16:
      lo = 0, hi = 65535;
      break;
    case PixelType::I16:
      lo = -32768, hi = 32767;
      break;
    default:
      return false;
  }
  const float below = float(lo - 0.5), above = float(hi + 0.5);  // exact in float
  size_t out = 0;
  for (float v : im.data) out += (v < below || v > above);
  return out * 1000 > im.data.size();  // more than 0.1% of the voxels
}

// PNG, JPEG and BMP hold integers only: a float32 policy still rounds there.
bool is_integer_only_format(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp";
}

bool is_integer_type(PixelType t) {
  return t == PixelType::U8 || t == PixelType::I8 || t == PixelType::U16 || t == PixelType::I16 ||
         t == PixelType::U32 || t == PixelType::I32;
}

// Distinct integer values (after rounding) among up to 65536 evenly spaced values, counted up
// to 4096: how many levels an integer pixel type keeps of an image.
size_t integer_levels(const Image& im) {
  std::unordered_set<float> seen;
  const size_t step = std::max<size_t>(1, im.data.size() / 65536);
  for (size_t i = 0; i < im.data.size() && seen.size() < 4096; i += step)
    seen.insert(std::nearbyint(im.data[i]));
  return seen.size();
}

// Stored in the input's integer type, the harmonized image would keep almost nothing of the
// input (zscore leaves values in [-4, 4]: 9 levels of int16 where the input had hundreds).
bool integer_type_destroys(size_t levels_in, size_t levels_out) {
  return levels_out < 64 && levels_out * 4 < levels_in;
}

const char* pixel_type_name(PixelType t) {
  switch (t) {
    case PixelType::U8:
      return "uint8";
    case PixelType::I8:
      return "int8";
    case PixelType::U16:
      return "uint16";
    case PixelType::I16:
      return "int16";
    case PixelType::U32:
      return "uint32";
    case PixelType::I32:
      return "int32";
    case PixelType::F32:
      return "float32";
    case PixelType::F64:
      return "float64";
  }
  return "?";
}

// `failures` holds, on entry, the inputs that already failed (discovery, crashed workers): they
// are left out. `fit_failures` are merged into the report.
void apply(const std::string& method, const Args& args, const std::vector<std::string>& arg_pairs,
           const Stats& stats, const std::string& stats_id, const Options& o,
           const Discovery& found, Failures& failures, const Failures& fit_failures,
           const WorkerState& state, size_t* processed) {
  const std::vector<InputItem>& items = found.items;
  const size_t failed_before = failures.size();
  const bool keep = o.pixel_type != "float32", strict = o.pixel_type == "keep-strict";
  json mine;
  mine["method"] = method;
  mine["args"] = arg_pairs;
  mine["stats"] = stats_id;
  mine["pixel_type"] = o.pixel_type;
  const Shard shard = o.shard.empty() ? Shard{} : parse_shard(o.shard);
  claim_output_folder(o.out, mine, o.overwrite, shard.active());
  OutputRecords records(o.out, shard.active() ? "shard-" + std::to_string(shard.index) + "-of-" +
                                                    std::to_string(shard.count)
                                              : "");

  ApplyLoopOptions lo;
  lo.label = "apply " + method;
  lo.jobs = state.serial() ? 1 : worker_count(o.jobs);
  lo.progress = !o.no_progress;
  for (const auto& it : items)
    lo.site_of.push_back(it.role == InputItem::Role::Image ? it.site : "");
  lo.seed = o.seed;
  lo.masks_verb = "copied";
  ApplyLoop loop(std::move(lo), failures);
  std::atomic<size_t> clamped{0}, rounded{0};
  std::mutex switched_mutex;
  std::vector<std::string> switched;  // outputs written as float32 instead of the input's type

  // One harmonizer per worker thread, its site statistics set when the site changes.
  struct Worker {
    std::unique_ptr<Harmonizer> h;
    std::optional<std::string> site;
  };
  std::mutex workers_mutex;
  std::map<std::thread::id, Worker> workers;
  auto worker = [&]() -> Worker& {
    std::lock_guard<std::mutex> lock(workers_mutex);
    Worker& w = workers[std::this_thread::get_id()];
    if (!w.h) w.h = make_harmonizer(method, args, o.seed);
    return w;
  };

  // Per input: skip it when it failed already or its output is complete, copy a mask, or
  // harmonize an image and hand its output to the loop (counted as written once in place).
  auto name_of = [&](size_t i) { return items[i].path; };
  loop.run(name_of, [&](size_t i) {
    const InputItem& it = items[i];
    if (failures.has(it.path)) return;
    const std::string out = (fs::path(o.out) / it.relative).string();
    InProgress busy(state, it.path);
    // An output is complete when it exists and its record names the input as it is now; a
    // stale output (also one of another harmonization, --overwrite) goes before the new record,
    // so that the record never vouches for it, and an input that now fails has no output.
    const std::string identity = input_identity(it.path);
    const bool done = fs::exists(out) && !o.overwrite && records.matches(it.relative, identity);
    if (!done && (it.role == InputItem::Role::Image || o.masks == "copy")) {
      if (fs::exists(out)) fs::remove_all(out);
      records.record(it.relative, identity);
    }
    if (it.role == InputItem::Role::Mask) {
      if (o.masks == "copy") {
        if (done)
          ++loop.skipped;
        else
          copy_atomic(it.path, out), ++loop.masks;
      }
      return;
    }
    if (done) {
      ++loop.skipped;
      if (loop.in_report(i))
        loop.report.add(it.site, it.relative, read_input(it.path, o), read_image(out));
      return;
    }
    Worker& w = worker();
    if (w.site != it.site) {
      w.h->set_statistics(stats, it.site);
      w.site = it.site;
    }
    Image im = read_input(it.path, o);
    std::optional<Image> before;
    if (loop.in_report(i) || it.dicom) before = im;
    // Written as integers: the input's integer type (keep), or a format that has no floats.
    const bool integer_only = is_integer_only_format(out);
    const bool integer = (keep && is_integer_type(im.pixel_type)) || integer_only;
    const PixelType in_type = im.pixel_type;
    const size_t levels_in = integer ? integer_levels(im) : 0;
    w.h->apply(im);
    if (im.data.size() != size_t(im.channels) * size_t(im.voxels()))
      throw Error("harmonizer '" + method +
                  "' returned an image whose buffer does not match "
                  "its size");
    WriteOptions wo;
    wo.keep_pixel_type = keep;
    const size_t levels_out = integer ? integer_levels(im) : 0;
    if (integer && integer_type_destroys(levels_in, levels_out)) {
      const std::string what =
          "harmonized values span " + std::to_string(levels_out) + " levels of " +
          (keep ? pixel_type_name(in_type) : "the format's integers") + " (the input " +
          std::to_string(levels_in) + (levels_in >= 4096 ? "+" : "") +
          "): stored as integers the image is destroyed";
      if (integer_only)
        throw Error(it.path + ": " + what +
                    "; PNG, JPEG and BMP hold integers only: convert the inputs to NIfTI "
                    "(then float32 is written), or use a harmonizer whose output keeps the "
                    "intensity range (e.g. histogram-match)");
      if (strict)
        throw Error(it.path + ": " + what +
                    " (--pixel-type keep-strict); use --pixel-type keep or float32");
      wo.keep_pixel_type = false;
      loop.bar().print("warning: " + it.path + ": " + what + "; written as float32");
      std::lock_guard<std::mutex> lock(switched_mutex);
      switched.push_back(it.relative);
    }
    if (wo.keep_pixel_type && clamps(im)) ++clamped;
    if (!keep && is_integer_only_format(out)) ++rounded;
    wo.new_uids = !before || before->data != im.data;
    loop.write(im, out, wo, loop.written);
    if (loop.in_report(i)) loop.report.add(it.site, it.relative, *before, im);
  });
  records.compact();
  *processed = items.size() + failed_before;
  // An input that failed only while fitting is still a failed input.
  for (const auto& [what, reason] : fit_failures.list())
    if (!failures.has(what)) failures.add(what, reason, nullptr);

  loop.print_summary();
  if (clamped)
    spdlog::warn(
        "{} outputs had more than 0.1% of their values clamped to the input pixel type's "
        "range; consider --pixel-type float32",
        size_t(clamped));
  if (rounded)
    spdlog::warn(
        "{} outputs are PNG/JPEG/BMP, which cannot hold float32: their values were "
        "rounded (and clamped) to 16-bit (PNG) or 8-bit integers",
        size_t(rounded));
  std::sort(switched.begin(), switched.end());
  if (!switched.empty())
    spdlog::warn(
        "{} outputs were written as float32 instead of the input's integer pixel type, which "
        "would have destroyed them (--pixel-type keep-strict refuses them instead)",
        switched.size());
  json rep;
  rep["method"] = method;
  rep["written_as_float32"] = switched;
  rep["ignored"] = found.ignored;  // files that are not images: neither written nor failed
  loop.add_to_report(rep, o.preview, o.preview_per_site);
  if (!o.report.empty()) write_file_atomic(o.report, json_text(rep, 2) + "\n");
  if (!o.report.empty())
    write_harmonize_report_html(o.report, rep, loop.report, o.preview_per_site);
}

// `--probe PATH` in a worker: that input alone, one thread, as fit and apply would treat it.
// The supervisor only asks whether this process crashes; errors are not its business.
void probe_input(const std::string& method, const Args& args, const Options& o,
                 const std::vector<InputItem>& items, const Stats* stats) {
  for (const auto& it : items) {
    if (it.path != o.probe || it.role != InputItem::Role::Image) continue;
    try {
      Image im = read_input(it.path, o);
      auto h = make_harmonizer(method, args, o.seed);
      if (h->needs_fit()) h->fit_site([&](const ImageVisitor& visit) { visit(im); });
      if (stats || !h->needs_fit()) {
        auto a = make_harmonizer(method, args, o.seed);
        a->set_statistics(stats ? *stats : Stats{}, it.site);
        a->apply(im);
      }
    } catch (const std::exception&) {
    }
  }
}

// ---------------------------------------------------------------------------------------------

void add_common(CLI::App* sub, Options& o) {
  sub->add_option("--pipeline", o.pipeline,
                  "Take the method and its arguments from this pipeline file's harmonizers");
  sub->add_option("--harmonizer", o.harmonizer_index,
                  "With --pipeline: which harmonizers[N] (default 0)");
  sub->add_option("--set", o.pipeline_sets, "With --pipeline: override a pipeline key (repeatable)")
      ->allow_extra_args(false);
  sub->add_flag("--sites", o.sites,
                "With --pipeline: the inputs are the pipeline's sites, built as `concord run` "
                "builds them (no INPUTS)");
  sub->add_option("inputs", o.inputs,
                  "Input folders, image files or manifests (.txt/.csv); none with --sites");
  sub->add_option("-j,--jobs", o.jobs, "Worker threads (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--site-depth", o.site_depth,
                  "Path components below each input that name the site (default: 1 for one input, "
                  "0 for several)");
  sub->add_option("--exclude", o.exclude, "Glob on relative paths to skip entirely (repeatable)")
      ->allow_extra_args(false);
  sub->add_option("--mask-glob", o.mask_globs,
                  "Glob on relative paths of masks: never harmonized (repeatable; folders named "
                  "mask(s)/label(s)/seg are masks already)")
      ->allow_extra_args(false);
  sub->add_option("--seed", o.seed, "Seed for the plugins and for choosing report images");
  sub->add_option("--channels", o.channels,
                  "Colour inputs: auto (equal channels are grey), grey (every colour file to "
                  "grey), keep")
      ->check(CLI::IsMember({"auto", "grey", "keep"}));
  sub->add_option("--non-finite", o.non_finite,
                  "NaN/Inf values: error (the file fails) or zero (replaced by 0)")
      ->check(CLI::IsMember({"error", "zero"}));
  // The supervisor's worker (harmonize_worker.h); not for people.
  sub->add_option("--worker-state", o.worker_state)->group("");
  sub->add_option("--probe", o.probe)->group("");
  sub->add_option("--shard", o.shard,
                  "I/N: only this shard's share of the inputs (0 <= I < N; by a stable hash of "
                  "the path, or of the site for fit); see `harmonize merge`");
  sub->add_flag("--no-progress", o.no_progress, "No progress bar");
}

Discovery discover(const Options& o) {
  DiscoveryOptions d;
  d.site_depth = o.site_depth;
  d.exclude = o.exclude;
  d.mask_globs = o.mask_globs;
  Discovery found = discover_inputs(o.inputs, d);
  size_t images = 0, masks = 0;
  std::vector<std::string> sites;
  for (const auto& it : found.items) {
    (it.role == InputItem::Role::Image ? images : masks) += 1;
    if (sites.empty() || sites.back() != it.site) sites.push_back(it.site);
  }
  std::string list;
  for (const auto& s : sites) list += (list.empty() ? "" : ", ") + s;
  std::string ignored;
  for (size_t i = 0; i < found.ignored.size() && i < 3; ++i)
    ignored += (i ? ", " : " (") + found.ignored[i];
  if (!ignored.empty()) ignored += found.ignored.size() > 3 ? ", ...)" : ")";
  spdlog::info("{} images, {} masks in {} sites ({}); {} other files ignored{}", images, masks,
               sites.size(), list, found.ignored.size(), ignored);
  return found;
}

// `--pipeline FILE [--harmonizer N]`: the method and arguments of the pipeline's harmonizers[N]
// (validated like `concord validate`); --arg pairs given on the command line still override.
void use_pipeline(const Globals& g, Options& o) {
  if (o.pipeline.empty()) return;
  if (!o.method.empty())
    throw Error("give --method or --pipeline, not both (the pipeline names the method)");
  PipelineConfig c = load_or_report(g, o.pipeline, o.pipeline_sets);
  const Component& h = pipeline_harmonizer(c, o.harmonizer_index);
  o.method = h.type;
  std::vector<std::string> pairs = arg_pairs_of(h.args);
  pairs.insert(pairs.end(), o.arg_pairs.begin(), o.arg_pairs.end());
  o.arg_pairs = pairs;
  spdlog::info("{}: harmonizers[{}] = {}", o.pipeline, o.harmonizer_index, o.method);
}

// --sites: checks the combination, and the options of the sites form.
SitesOptions sites_options(const Options& o) {
  if (o.pipeline.empty())
    throw Error("--sites harmonizes the sites of a pipeline: give --pipeline FILE");
  if (!o.inputs.empty())
    throw Error("--sites takes the pipeline's sites as the inputs: give no INPUTS (" +
                o.inputs.front() + (o.inputs.size() > 1 ? ", ..." : "") +
                "), or leave out --sites to harmonize files");
  if (!o.method.empty())
    throw Error("give --method or --pipeline, not both (the pipeline names the method)");
  if (o.site_depth >= 0 || !o.exclude.empty() || !o.mask_globs.empty())
    throw Error(
        "--site-depth, --exclude and --mask-glob select files; with --sites the "
        "pipeline's dataset names the sites and samples");
  if (o.seed != 0)
    throw Error("with --sites the pipeline's seed is used: change it with --set seed=N");
  if (!o.shard.empty())
    throw Error(
        "--shard splits files and folders; with --sites the whole federation is built "
        "in one process (shard the files: give INPUTS instead of --sites)");
  if (o.channels != "auto" || o.non_finite != "error")
    throw Error(
        "--channels and --non-finite choose how files are read; with --sites the pipeline's "
        "dataset plugin reads the images (set its own arguments with --set)");
  SitesOptions s;
  s.pipeline = o.pipeline;
  s.sets = o.pipeline_sets;
  s.harmonizer = o.harmonizer_index;
  s.arg_pairs = o.arg_pairs;
  s.stats = o.stats;
  s.save_stats = o.save_stats;
  s.out = o.out;
  s.masks = o.masks;
  s.overwrite = o.overwrite;
  s.preview = o.preview;
  s.preview_per_site = o.preview_per_site;
  s.report = o.report;
  s.jobs = o.jobs;
  s.no_progress = o.no_progress;
  return s;
}

void check_inputs(const Options& o) {
  if (o.inputs.empty())
    throw Error("no inputs: give folders, image files or manifests, or --pipeline FILE --sites");
}

// Inputs that failed before any work: found but not taken (discovery), or known to crash a
// worker process (supervised runs). They are removed from `items`.
void add_early_failures(const Discovery& found, const WorkerState& state,
                        std::vector<InputItem>& items, Failures& failures) {
  for (const auto& [path, reason] : found.skipped) failures.add(path, reason, nullptr);
  for (const auto& [path, sig] : state.crashed())
    failures.add(path,
                 path + ": decoder crashed: " + sig +
                     " (the worker process died on this input; the others went on without it)",
                 nullptr);
  items.erase(std::remove_if(items.begin(), items.end(),
                             [&](const InputItem& it) { return state.crashed().count(it.path); }),
              items.end());
}

// --shard I/N: keeps this shard's share of the inputs (whole sites with `by_site`), after
// recording the digest of the whole list in `o.inputs_digest`.
Shard take_share(Options& o, Discovery& found, bool by_site) {
  if (o.shard.empty()) return {};
  const Shard shard = parse_shard(o.shard);
  o.inputs_digest = inputs_digest(found.items);
  const size_t all = found.items.size();
  shard_discovery(found, shard, by_site);
  spdlog::info("shard {}: {} of {} inputs (by {})", shard.str(), found.items.size(), all,
               by_site ? "site" : "path");
  return shard;
}

// fit --shard: the per-site statistics of this share, not combined, as a part for `merge`.
void fit_part(const Options& o, const Args& args, const Discovery& found, const Shard& shard,
              Failures& failures, const WorkerState& state) {
  FitResult r = fit(o.method, args, o, found.items, failures, state, /*partial=*/true);
  PartInfo info;
  info.method = o.method;
  info.args = arg_pairs_of(args);
  std::sort(info.args.begin(), info.args.end());
  info.seed = std::to_string(o.seed);
  info.shard_by = o.shard_by;
  info.shard = shard;
  info.inputs = o.inputs_digest;
  info.images = r.images;
  info.failed = failures.list();
  std::sort(info.failed.begin(), info.failed.end());
  save_part(o.stats, info, r.parts);
  std::cout << "fitted shard " << shard.str() << " of '" << o.method << "' on " << r.images
            << " images from " << r.parts.size() << " sites -> " << o.stats
            << " (combine all parts with `concord harmonize merge`)\n";
  if (failures.size()) {
    print_failures(failures, r.images + failures.size(), "fit");
    throw Exit{1};
  }
}

// `harmonize merge PARTS... --stats OUT`: the parts of every shard combined as a single fit
// combines its sites, written like `fit --stats` (with the sidecar).
void run_merge(const Globals& g, const std::vector<std::string>& files, const std::string& out) {
  std::vector<Part> parts;
  for (const auto& f : files) parts.push_back(load_part(f));
  const PartInfo& info = parts.front().info;
  const PluginDesc& desc = harmonizer_desc(g, info.method);
  Args args = build_args(desc, info.args);
  auto h = make_harmonizer(info.method, args, std::stoull(info.seed));
  std::vector<Stats> sites = merge_chunks(parts, *h);
  Failures failures;
  size_t images = 0;
  for (const Part& p : parts) {
    images += p.info.images;
    for (const auto& [what, reason] : p.info.failed) failures.add(what, reason, nullptr);
  }
  if (sites.empty() || images == 0)
    throw Error("harmonizer '" + info.method +
                "': no statistics could be computed (every input of every shard failed)");
  std::vector<std::string> names;
  for (const Stats& s : sites) names.push_back(s.site);
  Stats stats;
  try {
    stats = h->combine(sites);
  } catch (const std::exception& e) {
    throw Error("harmonizer '" + info.method + "': combine failed: " + e.what());
  }
  json extra;
  extra["merged_from"] = files;
  extra["shards"] = info.shard.count;
  extra["shard_by"] = info.shard_by;
  save_stats_with_sidecar(stats, out, info.method, info.args, images, failures.size(), names,
                          extra);
  std::cout << "merged " << parts.size() << " parts of '" << info.method << "': " << images
            << " images from " << names.size() << " sites -> " << out << "\n";
  if (failures.size()) {
    print_failures(failures, images + failures.size(), "fit");
    throw Exit{1};
  }
}

void run_fit(const Globals& g, Options o) {
  if (o.sites) return run_sites_fit(g, sites_options(o));
  if (o.worker_state.empty()) throw Exit{supervise_worker()};
  const WorkerState state(o.worker_state);
  enter_worker(state);
  if (!o.probe.empty()) spdlog::set_level(spdlog::level::warn);  // only whether it crashes
  check_inputs(o);
  use_pipeline(g, o);
  if (o.method.empty()) throw Error("fit needs --method M or --pipeline FILE");
  const PluginDesc& desc = harmonizer_desc(g, o.method);
  Args args = build_args(desc, o.arg_pairs);
  if (!make_harmonizer(o.method, args, o.seed)->needs_fit())
    throw Error("harmonizer '" + o.method +
                "' needs no statistics (it is site-local); use "
                "`concord harmonize apply --method " +
                o.method + "`");
  Discovery found = discover(o);
  const Shard shard = take_share(o, found, o.shard_by == "site");
  if (!o.probe.empty()) return probe_input(o.method, args, o, found.items, nullptr);
  Failures failures;
  add_early_failures(found, state, found.items, failures);
  if (shard.active()) return fit_part(o, args, found, shard, failures, state);
  FitResult r = fit(o.method, args, o, found.items, failures, state);
  save_fit(r, o.stats, o.method, o, failures.size());
  std::cout << "fitted '" << o.method << "' on " << r.images << " images from " << r.sites.size()
            << " sites -> " << o.stats << "\n";
  if (failures.size()) {
    print_failures(failures, r.images + failures.size(), "fit");
    throw Exit{1};
  }
}

void run_apply(const Globals& g, Options o) {
  if (o.sites) return run_sites_apply(g, sites_options(o));
  if (o.worker_state.empty()) throw Exit{supervise_worker()};
  const WorkerState state(o.worker_state);
  enter_worker(state);
  if (!o.probe.empty()) spdlog::set_level(spdlog::level::warn);  // only whether it crashes
  check_inputs(o);
  use_pipeline(g, o);
  if (o.stats.empty() && o.method.empty())
    throw Error("apply needs --stats FILE (from `harmonize fit`) or --method M (fit, then apply)");
  if (o.pixel_type != "keep" && o.pixel_type != "keep-strict" && o.pixel_type != "float32")
    throw Error("--pixel-type must be keep, keep-strict or float32, not '" + o.pixel_type + "'");
  std::string method = o.method;
  Stats stats;
  std::string stats_id;
  std::vector<std::string> arg_pairs = o.arg_pairs;
  if (!o.stats.empty()) {
    std::string saved;
    try {
      stats = load_stats(o.stats, &saved);
    } catch (const Error&) {
      std::optional<Part> part;
      try {
        part = load_part(o.stats);
      } catch (const Error&) {
      }
      if (part)
        throw Error(o.stats + ": partial statistics of shard " + part->info.shard.str() +
                    " of a `harmonize fit --shard`; combine every shard's part first: "
                    "`concord harmonize merge PARTS... --stats FILE`");
      throw;
    }
    if (!method.empty() && method != saved)
      throw Error(o.stats + ": statistics of method '" + saved + "', not '" + method +
                  "'; fit them with --method " + method + " or apply with --method " + saved);
    method = saved;
    // Fitted arguments come from the sidecar; --arg on the command line overrides them.
    const std::string side = o.stats + ".json";
    if (fs::exists(side)) {
      Bytes b = read_file(side);
      json j = json::parse(b->data(), b->data() + b->size());
      std::vector<std::string> fitted = j.value("args", std::vector<std::string>{});
      fitted.insert(fitted.end(), arg_pairs.begin(), arg_pairs.end());
      arg_pairs = fitted;
    }
    stats_id = stats_digest(stats);
  }
  // Later pairs override earlier ones with the same key.
  std::map<std::string, std::string> last;
  for (const auto& p : arg_pairs) last[p.substr(0, p.find('='))] = p;
  arg_pairs.clear();
  for (const auto& [k, p] : last) arg_pairs.push_back(p);

  const PluginDesc& desc = harmonizer_desc(g, method);
  Args args = build_args(desc, arg_pairs);
  auto probe = make_harmonizer(method, args, o.seed);
  if (probe->augments())
    throw Error("harmonizer '" + method +
                "' is an augmentation (applied per training draw); it "
                "has no fixed transform to apply offline");
  Discovery found = discover(o);
  check_output_apart(o.out, o.inputs, found);
  const Shard shard = take_share(o, found, /*by_site=*/false);
  // A worker restarted after a crash in the apply phase applies the statistics its predecessor
  // fitted: the same whether or not a crash happened.
  const std::string fitted = state.fitted_stats_file();
  const bool refit = o.stats.empty() && probe->needs_fit();
  if (refit && shard.active())
    throw Error(
        "apply --shard applies statistics fitted on all the inputs: give --stats FILE "
        "(from `harmonize fit`, or `harmonize fit --shard` and `harmonize merge`); a "
        "one-shot --method would fit each shard on its share alone");
  if (refit && !fitted.empty() && fs::exists(fitted)) stats = load_stats(fitted);
  if (!o.probe.empty())
    return probe_input(method, args, o, found.items,
                       !o.stats.empty() || (refit && fs::exists(fitted)) ? &stats : nullptr);
  Failures failures, apply_failures;
  add_early_failures(found, state, found.items, apply_failures);
  if (refit && !(!fitted.empty() && fs::exists(fitted))) {
    FitResult r = fit(method, args, o, found.items, failures, state);
    stats = r.stats;
    if (!o.save_stats.empty()) save_fit(r, o.save_stats, method, o, failures.size());
    if (!fitted.empty()) save_stats(stats, fitted, method);
    std::cout << "fitted '" << method << "' on " << r.images << " images from " << r.sites.size()
              << " sites\n";
  }
  if (refit) stats_id = stats_digest(stats);
  if (o.stats.empty() && !probe->needs_fit()) stats_id = "site-local";
  // An image that failed during fit fails again in apply: report it once.
  size_t processed = 0;
  apply(method, args, arg_pairs, stats, stats_id, o, found, apply_failures, failures, state,
        &processed);
  if (apply_failures.size()) {
    print_failures(apply_failures, processed, "harmonize");
    throw Exit{1};
  }
}

}  // namespace

void add_harmonize_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand(
      "harmonize", "Harmonize image folders offline with a harmonizer plugin (fit, apply)");
  sub->require_subcommand(1);
  auto fit_opts = std::make_shared<Options>();
  auto* fit_cmd = sub->add_subcommand("fit", "Compute a method's statistics from the inputs");
  fit_cmd->add_option("--method", fit_opts->method,
                      "Harmonizer plugin (concord plugins --kind harmonizer)");
  fit_cmd->add_option("--arg", fit_opts->arg_pairs, "Plugin argument key=value (repeatable)")
      ->allow_extra_args(false);
  fit_cmd->add_option("--stats", fit_opts->stats, "Statistics file to write")->required();
  fit_cmd
      ->add_option("--shard-by", fit_opts->shard_by,
                   "With --shard: site (whole sites per shard; merge equals a single fit byte for "
                   "byte) or path (sites split too; equal up to rounding)")
      ->check(CLI::IsMember({"site", "path"}));
  add_common(fit_cmd, *fit_opts);
  fit_cmd->callback([&g, fit_opts] { run_fit(g, *fit_opts); });

  auto apply_opts = std::make_shared<Options>();
  auto* apply_cmd = sub->add_subcommand(
      "apply", "Apply statistics (--stats) or fit and apply in one go (--method) to the inputs");
  apply_cmd->add_option("--stats", apply_opts->stats, "Statistics file from `harmonize fit`");
  apply_cmd->add_option("--method", apply_opts->method,
                        "Harmonizer plugin: without --stats, fits it on the inputs first");
  apply_cmd->add_option("--arg", apply_opts->arg_pairs, "Plugin argument key=value (repeatable)")
      ->allow_extra_args(false);
  apply_cmd->add_option("--save-stats", apply_opts->save_stats,
                        "With --method: also save the fitted statistics here");
  apply_cmd->add_option("-o,--out", apply_opts->out, "Output folder (mirrors the input tree)")
      ->required();
  apply_cmd
      ->add_option("--pixel-type", apply_opts->pixel_type,
                   "keep: the input's pixel type (rounded, clamped), float32 for a file whose "
                   "harmonized values that type would destroy; keep-strict: such files fail; "
                   "float32")
      ->check(CLI::IsMember({"keep", "keep-strict", "float32"}));
  apply_cmd->add_option("--masks", apply_opts->masks, "copy masks unchanged, or skip them")
      ->check(CLI::IsMember({"copy", "skip"}));
  apply_cmd->add_flag("--overwrite", apply_opts->overwrite,
                      "Redo outputs that already exist (default: resume, skipping them)");
  apply_cmd->add_option("--preview", apply_opts->preview,
                        "Before/after montage PNG, a row per site");
  apply_cmd
      ->add_option("--preview-per-site", apply_opts->preview_per_site,
                   "Image pairs per site in the preview")
      ->check(CLI::Range(1, 16));
  apply_cmd->add_option("--report", apply_opts->report,
                        "JSON report: counts, failures, site shift before/after");
  add_common(apply_cmd, *apply_opts);
  apply_cmd->callback([&g, apply_opts] { run_apply(g, *apply_opts); });
  auto merge_files = std::make_shared<std::vector<std::string>>();
  auto merge_out = std::make_shared<std::string>();
  auto* merge_cmd = sub->add_subcommand(
      "merge", "Combine the partial statistics of `harmonize fit --shard I/N` (every shard once)");
  merge_cmd->add_option("parts", *merge_files, "Partial statistics files, one per shard")
      ->required();
  merge_cmd->add_option("--stats", *merge_out, "Statistics file to write")->required();
  merge_cmd->callback([&g, merge_files, merge_out] { run_merge(g, *merge_files, *merge_out); });
  add_harmonize_evaluate(*sub, g);
}

}  // namespace concord::cli
