// `concord harmonize fit|apply --pipeline P --sites`: see harmonize_sites.h and docs/harmonize.md.
#include "harmonize_sites.h"

#include "harmonize_apply.h"
#include "harmonize_common.h"
#include "report_html.h"

#include <concord/durable_output.h>
#include <concord/engine.h>
#include <concord/error.h>
#include <concord/image_io.h>
#include <concord/message.h>
#include <concord/registry.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>

namespace concord::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string sample_file_stem(const std::string& id) {
  std::string name =
      id.substr(id.find_last_of("/:") == std::string::npos ? 0 : id.find_last_of("/:") + 1);
  std::string suffix;  // "#z=3" of a slice of a volume
  if (auto hash = name.find('#'); hash != std::string::npos) {
    suffix = name.substr(hash);
    name = name.substr(0, hash);
  }
  for (const char* ext : {".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
                          ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".npz", ".npy"}) {
    const std::string e = ext;
    if (name.size() > e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0) {
      name.resize(name.size() - e.size());
      break;
    }
  }
  name += suffix;
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  return name.empty() || name[0] == '.' ? "sample" + name : name;
}

namespace {

// The pipeline with harmonizers[N]'s arguments overridden by --arg, and what names them.
struct Prepared {
  PipelineConfig config;
  std::string method;
  Args args;
  std::vector<std::string> pairs;  // the effective arguments, as key=value
};

Prepared prepare(const Globals& g, const SitesOptions& o) {
  Prepared p;
  p.config = load_or_report(g, o.pipeline, o.sets);  // loads the plugins
  const Component& chosen = pipeline_harmonizer(p.config, o.harmonizer);
  Component& target = p.config.harmonizers[size_t(o.harmonizer)];
  const PluginDesc& desc = global_registry().get(Kind::Harmonizer, chosen.type);
  p.args = build_args(desc, o.arg_pairs, chosen.args.values());
  target.args = Args(chosen.type, p.args.values(), chosen.args.where());
  p.method = target.type;
  p.pairs = arg_pairs_of(p.args);
  spdlog::info("{}: harmonizers[{}] = {}, over the pipeline's sites", o.pipeline, o.harmonizer,
               p.method);
  return p;
}

std::unique_ptr<Harmonizer> probe(const Prepared& p) {
  return global_registry().create<Harmonizer>(Kind::Harmonizer, p.method, p.args,
                                              BuildContext{p.config.seed, "coordinator"});
}

// Experiment::harmonize with a progress bar over the site fits.
HarmonizeResult harmonize(const Prepared& p, const SitesOptions& o, std::optional<Stats> stats,
                          bool keep_unharmonized) {
  Experiment experiment(p.config, global_registry());
  HarmonizeOptions h;
  h.last = o.harmonizer;
  h.last_stats = std::move(stats);
  h.keep_unharmonized = keep_unharmonized;
  std::unique_ptr<ProgressBar> bar;
  h.on_progress = [&](const std::string& phase, int, int total) {
    if (!bar) bar = std::make_unique<ProgressBar>("fit", total, !o.no_progress);
    bar->set_status(phase);
    bar->advance();
  };
  HarmonizeResult r = experiment.harmonize(h);
  if (bar) bar->finish();
  return r;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

// One sample to write: its site, split and output paths relative to --out.
struct Item {
  const SiteData* site;
  const char* split;
  const Sample* sample;
  const Sample* before;  // unharmonized, for the report
  std::string image, mask;
};

std::vector<Item> plan(const HarmonizeResult& r, bool masks) {
  std::vector<Item> items;
  for (size_t k = 0; k < r.federation.sites.size(); ++k) {
    const SiteData& site = r.federation.sites[k];
    const SiteData& before = r.unharmonized->sites.at(k);
    for (const char* split : {"train", "test"}) {
      const auto& samples = std::string(split) == "train" ? site.train : site.test;
      const auto& originals = std::string(split) == "train" ? before.train : before.test;
      std::set<std::string> taken;  // names in this folder: a repeated stem gets -2, -3, ...
      for (size_t i = 0; i < samples.size(); ++i) {
        const std::string base = sample_file_stem(samples[i].id);
        std::string stem = base;
        for (int n = 2; !taken.insert(stem).second; ++n) stem = base + "-" + std::to_string(n);
        const fs::path dir = fs::path(site.name) / split;
        Item it{&site, split, &samples[i], &originals.at(i), (dir / (stem + ".nii.gz")).string(),
                ""};
        if (masks && samples[i].mask) it.mask = (dir / "masks" / (stem + ".nii.gz")).string();
        items.push_back(std::move(it));
      }
    }
  }
  return items;
}

}  // namespace

void run_sites_fit(const Globals& g, const SitesOptions& o) {
  Prepared p = prepare(g, o);
  if (!probe(p)->needs_fit())
    throw Error("harmonizer '" + p.method +
                "' needs no statistics (it is site-local); use `concord harmonize apply "
                "--pipeline " +
                o.pipeline + " --sites`");
  HarmonizeResult r = harmonize(p, o, std::nullopt, false);
  json extra = {{"pipeline", o.pipeline},
                {"harmonizer", o.harmonizer},
                {"inputs", "sites"},
                {"seed", p.config.seed}};
  save_stats_with_sidecar(r.stats.at(size_t(o.harmonizer)), o.stats, p.method, p.pairs,
                          size_t(r.fitted_images), 0, r.fitted_sites, extra);
  std::cout << "fitted '" << p.method << "' (harmonizers[" << o.harmonizer << "] of " << o.pipeline
            << ") on " << r.fitted_images << " training images from " << r.fitted_sites.size()
            << " sites -> " << o.stats << "\n";
}

void run_sites_apply(const Globals& g, const SitesOptions& o) {
  Prepared p = prepare(g, o);
  if (probe(p)->augments())
    throw Error("harmonizer '" + p.method +
                "' is an augmentation (applied per training draw); it has no fixed transform to "
                "apply offline");
  std::optional<Stats> stats;
  std::string stats_id = "fitted in place";
  if (!o.stats.empty()) {
    std::string saved;
    stats = load_stats(o.stats, &saved);
    if (saved != p.method)
      throw Error(o.stats + ": statistics of method '" + saved + "', but harmonizers[" +
                  std::to_string(o.harmonizer) + "] of " + o.pipeline + " is '" + p.method + "'");
    stats_id = file_checksum(o.stats);
  }
  HarmonizeResult r = harmonize(p, o, stats, true);
  if (!o.stats.empty())
    spdlog::info("harmonizers[{}] ({}) applied with the statistics of {}", o.harmonizer, p.method,
                 o.stats);
  else
    std::cout << "fitted '" << p.method << "' on " << r.fitted_images << " training images from "
              << r.fitted_sites.size() << " sites\n";
  if (!o.save_stats.empty() && o.stats.empty())
    save_stats_with_sidecar(r.stats.at(size_t(o.harmonizer)), o.save_stats, p.method, p.pairs,
                            size_t(r.fitted_images), 0, r.fitted_sites,
                            {{"pipeline", o.pipeline}, {"harmonizer", o.harmonizer}});

  json mine;
  mine["method"] = p.method;
  mine["args"] = p.pairs;
  mine["stats"] = stats_id;
  mine["pixel_type"] = "float32";
  mine["pipeline"] = checksum(p.config.resolved_yaml.data(), p.config.resolved_yaml.size());
  mine["harmonizer"] = o.harmonizer;
  claim_output_folder(o.out, mine, o.overwrite);

  const std::vector<Item> items = plan(r, o.masks == "copy");
  Failures failures;
  ApplyLoopOptions lo;
  lo.label = "write " + p.method;
  lo.jobs = worker_count(o.jobs);
  lo.progress = !o.no_progress;
  for (const auto& it : items) lo.site_of.push_back(it.site->name);
  lo.seed = p.config.seed;
  ApplyLoop loop(std::move(lo), failures);
  auto name_of = [&](size_t i) {
    return items[i].site->name + "/" + items[i].split + " sample '" + items[i].sample->id + "'";
  };
  loop.run(name_of, [&](size_t i) {
    const Item& it = items[i];
    const fs::path image = fs::path(o.out) / it.image;
    if (fs::exists(image) && !o.overwrite) {
      ++loop.skipped;
    } else {
      Image im = it.sample->image;
      im.pixel_type = PixelType::F32;
      WriteOptions wo;
      wo.keep_pixel_type = false;
      loop.write(im, image.string(), wo, loop.written);
    }
    if (!it.mask.empty()) {
      const fs::path mask = fs::path(o.out) / it.mask;
      if (!fs::exists(mask) || o.overwrite) {
        Image m = *it.sample->mask;
        float top = 0;
        for (float v : m.data) top = std::max(top, v);
        m.pixel_type = top <= 255 ? PixelType::U8 : PixelType::U16;
        loop.write(m, mask.string(), WriteOptions{}, loop.masks);
      }
    }
    if (loop.in_report(i))
      loop.report.add(it.site->name, it.image, it.before->image, it.sample->image);
  });

  // The manifest lists every sample whose files are complete, in the federation's order.
  const bool seg = r.federation.task == Task::Segmentation;
  std::string manifest;
  if (seg && o.masks != "copy") {
    spdlog::warn("no manifest written: a segmentation manifest needs the masks (--masks skip)");
  } else {
    std::string text = std::string("path,") + (seg ? "mask" : "label") + ",site,split,id\n";
    for (const auto& it : items) {
      if (!fs::exists(fs::path(o.out) / it.image)) continue;
      if (seg && (it.mask.empty() || !fs::exists(fs::path(o.out) / it.mask))) continue;
      if (!seg && it.sample->label < 0)
        throw Error("site '" + it.site->name + "': sample '" + it.sample->id +
                    "' has no label: no classification manifest can list it");
      text += csv_field(it.image) + "," +
              (seg ? csv_field(it.mask) : std::to_string(it.sample->label)) + "," +
              csv_field(it.site->name) + "," + it.split + "," + csv_field(it.sample->id) + "\n";
    }
    manifest = (fs::path(o.out) / "manifest.csv").string();
    write_file_atomic(manifest, text);
  }

  loop.print_summary();
  json rep;
  rep["method"] = p.method;
  rep["pipeline"] = o.pipeline;
  rep["harmonizer"] = o.harmonizer;
  rep["manifest"] = manifest;
  loop.add_to_report(rep, o.preview, o.preview_per_site);
  if (!manifest.empty())
    std::cout << "manifest: " << manifest << " (train on it with the csv dataset: {type: csv, "
              << "args: {file: " << manifest << ", normalize: none}})\n";
  if (!o.report.empty()) write_file_atomic(o.report, json_text(rep, 2) + "\n");
  if (!o.report.empty())
    write_harmonize_report_html(o.report, rep, loop.report, o.preview_per_site);
  if (failures.size()) {
    print_failures(failures, items.size(), "write");
    throw Exit{1};
  }
}

}  // namespace concord::cli
