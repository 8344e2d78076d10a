#include "harmonize_evaluate.h"

#include <concord/engine.h>
#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/message.h>
#include <concord/pipeline.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>

#include "harmonize_report.h"
#include "image_quality.h"

namespace concord::cli {

namespace {

using json = nlohmann::ordered_json;

// The federation every row is measured on; --set changes it (e.g. data.dataset.args.shift=2).
// `same_test_subjects` is what makes the ground truth: do not turn it off.
constexpr const char* kPipeline = R"(name: harmonize-evaluate
seed: 1
data:
  dataset:
    type: brainsim
    args: {sites: 4, train_per_site: 48, test_per_site: 16, size: 64, shift: 1.5,
           same_test_subjects: true}
model:
  type: cnn
  args: {width: 8, depth: 2}
harmonizers: HARMONIZERS
federation:
  rounds: 1
output: runs
)";

struct Row {
  std::string name, type;  // type empty: no harmonizer
  std::vector<std::pair<std::string, std::string>> args;
};

// "NAME=TYPE[:key=value,key=value...]"; TYPE "none" is no harmonizer.
Row parse_row(const std::string& spec) {
  const size_t eq = spec.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--row '" + spec + "': expected NAME=TYPE[:key=value,...]");
  Row r;
  r.name = spec.substr(0, eq);
  std::string rest = spec.substr(eq + 1);
  const size_t colon = rest.find(':');
  r.type = rest.substr(0, colon);
  if (r.type == "none") r.type.clear();
  if (colon != std::string::npos) {
    std::stringstream ss(rest.substr(colon + 1));
    std::string pair;
    while (std::getline(ss, pair, ',')) {
      const size_t e = pair.find('=');
      if (e == std::string::npos || e == 0)
        throw Error("--row '" + spec + "': argument '" + pair + "' is not key=value");
      r.args.push_back({pair.substr(0, e), pair.substr(e + 1)});
    }
  }
  return r;
}

std::vector<std::string> default_rows() {
  return {"none=none", "amplitude-b0.01=amplitude:beta=0.01", "amplitude-b0.1=amplitude:beta=0.1",
          "amplitude-b1=amplitude:beta=1", "histogram-match=histogram-match", "nyul=nyul",
          // Learned harmonizers: measured when their plugin is installed, listed as skipped
          // otherwise.
          // Networks sized for CPU (ngf 16, 3 blocks): minutes per row on 2 cores at 64 px.
          "cyclegan-local=cyclegan:generator_sharing=local,ngf=16,ndf=16,n_blocks=3,"
          "batch_size=4,style_epochs=10",
          "cyclegan-federated=cyclegan:generator_sharing=federated,ngf=16,ndf=16,n_blocks=3,"
          "batch_size=4,style_epochs=10"};
}

std::string harmonizers_yaml(const Row& r) {
  // No harmonizer: the identity plugin, so the images take the same path as every other row.
  if (r.type.empty()) return "[{type: identity}]";
  std::string s = "[{type: " + r.type + ", args: {";
  for (size_t i = 0; i < r.args.size(); ++i)
    s += (i ? ", " : "") + r.args[i].first + ": " + r.args[i].second;
  return s + "}}]";
}

struct Options {
  std::vector<std::string> rows;
  std::vector<std::string> sets;
  std::string json_out;
  bool no_progress = false;
};

// Robust range (0.5 and 99.5 percentiles) of every voxel of the images.
std::pair<double, double> pooled_range(const std::vector<const Image*>& images) {
  std::vector<float> v;
  for (const Image* im : images) v.insert(v.end(), im->data.begin(), im->data.end());
  if (v.empty()) return {0, 1};
  auto at = [&](double q) {
    const size_t k = size_t(q * double(v.size() - 1));
    std::nth_element(v.begin(), v.begin() + long(k), v.end());
    return double(v[k]);
  };
  const double lo = at(0.005), hi = at(0.995);
  return {lo, hi > lo ? hi : lo + 1};
}

Image rescaled(const Image& im, double lo, double hi) {
  return apply_linear(im, {1 / (hi - lo), -lo / (hi - lo)});
}

// PSNR is +inf for identical images: capped at 100 dB so that means and JSON stay finite.
double capped_psnr(double v) {
  return std::min(v, 100.0);
}

json measure(const Federation& harmonized, const Federation& before) {
  const auto& sites = harmonized.sites;
  if (sites.size() < 2) throw Error("harmonize evaluate: needs at least two sites");
  const size_t subjects = sites.front().test.size();
  for (const auto& s : sites)
    if (s.test.size() != subjects || subjects == 0)
      throw Error(
          "harmonize evaluate: every site needs the same, non-zero number of test "
          "subjects (brainsim same_test_subjects)");
  // Test sample i must be one subject at every site: its neutral renderings are identical.
  for (size_t i = 0; i < subjects; ++i)
    for (const auto& s : sites) {
      const auto& r0 = sites.front().test[i].reference;
      const auto& r = s.test[i].reference;
      if (!r0 || !r || r0->data != r->data)
        throw Error("harmonize evaluate: test sample " + std::to_string(i) + " of site '" + s.name +
                    "' is not the same subject as at the other sites, or has no neutral "
                    "rendering (keep data.dataset.args.same_test_subjects: true)");
    }
  // Cross-site agreement, in units of the row's pooled robust range mapped to [0, 1].
  std::vector<const Image*> all;
  for (const auto& s : sites)
    for (const auto& t : s.test) all.push_back(&t.image);
  const auto [lo, hi] = pooled_range(all);
  double mae = 0, ssim_x = 0;
  int64_t pairs = 0;
  for (size_t i = 0; i < subjects; ++i)
    for (size_t a = 0; a < sites.size(); ++a)
      for (size_t b = a + 1; b < sites.size(); ++b, ++pairs) {
        const Image x = rescaled(sites[a].test[i].image, lo, hi);
        const Image y = rescaled(sites[b].test[i].image, lo, hi);
        double d = 0;
        for (size_t k = 0; k < x.data.size(); ++k) d += std::abs(x.data[k] - y.data[k]);
        mae += d / double(x.data.size());
        ssim_x += ssim(x, y, 1.0);
      }
  // Fidelity to the neutral rendering (in [0, 1]) after a least-squares linear fit.
  double ssim_f = 0, psnr_f = 0;
  int64_t images = 0;
  SiteShiftReport shift;
  for (size_t s = 0; s < sites.size(); ++s)
    for (size_t i = 0; i < subjects; ++i, ++images) {
      const Sample& t = sites[s].test[i];
      const Image fitted = apply_linear(t.image, fit_linear(t.image, *t.reference));
      ssim_f += ssim(fitted, *t.reference, 1.0);
      psnr_f += capped_psnr(psnr(fitted, *t.reference, 1.0));
      char key[32];
      std::snprintf(key, sizeof key, "%06zu", i);
      shift.add(sites[s].name, key, before.sites[s].test[i].image, t.image);
    }
  const ShiftMeasure m = shift.measure();
  json j;
  j["cross_site"] = {{"mae", mae / double(pairs)}, {"ssim", ssim_x / double(pairs)}};
  j["fidelity"] = {{"ssim", ssim_f / double(images)}, {"psnr_db", psnr_f / double(images)}};
  j["site_shift"] = {{"histogram_w1", m.histogram_after},
                     {"spectrum", m.spectrum_after},
                     {"histogram_w1_before", m.histogram_before},
                     {"spectrum_before", m.spectrum_before}};
  j["subjects"] = subjects;
  j["sites"] = sites.size();
  return j;
}

void run_evaluate(const Globals& g, const Options& o) {
  load_all_plugins(g);
  const Registry& reg = global_registry();
  std::vector<Row> rows;
  for (const std::string& spec : o.rows.empty() ? default_rows() : o.rows)
    rows.push_back(parse_row(spec));
  json out;
  out["command"] = "concord harmonize evaluate";
  out["sets"] = o.sets;
  json jrows = json::array();
  for (const Row& r : rows) {
    json jr;
    jr["name"] = r.name;
    jr["method"] = r.type.empty() ? "none" : r.type;
    json args = json::object();
    for (const auto& [k, v] : r.args) args[k] = v;
    jr["args"] = args;
    if (!r.type.empty() && !reg.find(Kind::Harmonizer, r.type)) {
      jr["skipped"] = "harmonizer plugin '" + r.type + "' is not installed";
      spdlog::info("{}: skipped (harmonizer plugin '{}' is not installed)", r.name, r.type);
      jrows.push_back(jr);
      continue;
    }
    std::string text = kPipeline;
    text.replace(text.find("HARMONIZERS"), 11, harmonizers_yaml(r));
    PipelineConfig config =
        parse_pipeline(text, "harmonize evaluate (row " + r.name + ")", o.sets, reg);
    if (!out.contains("seed")) {
      out["seed"] = config.seed;
      out["dataset"] = config.data.dataset.type;
    }
    const auto t0 = std::chrono::steady_clock::now();
    Experiment experiment(config, reg);
    HarmonizeOptions h;
    h.keep_unharmonized = true;
    HarmonizeResult res = experiment.harmonize(h);
    jr.update(measure(res.federation, *res.unharmonized));
    jr["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!o.no_progress) spdlog::info("{}: done in {:.1f} s", r.name, jr["seconds"].get<double>());
    jrows.push_back(jr);
  }
  out["rows"] = jrows;

  std::printf("%-20s %9s %9s %9s %9s %9s %9s\n", "harmonizer", "xsite", "xsite", "fidelity",
              "fidelity", "shift", "shift");
  std::printf("%-20s %9s %9s %9s %9s %9s %9s\n", "", "MAE", "SSIM", "SSIM", "PSNR dB", "W1",
              "spectrum");
  for (const json& jr : jrows) {
    const std::string name = jr["name"];
    if (jr.contains("skipped")) {
      std::printf("%-20s skipped: %s\n", name.c_str(), jr["skipped"].get<std::string>().c_str());
      continue;
    }
    std::printf("%-20s %9.4f %9.4f %9.4f %9.2f %9.4f %9.4f\n", name.c_str(),
                jr["cross_site"]["mae"].get<double>(), jr["cross_site"]["ssim"].get<double>(),
                jr["fidelity"]["ssim"].get<double>(), jr["fidelity"]["psnr_db"].get<double>(),
                jr["site_shift"]["histogram_w1"].get<double>(),
                jr["site_shift"]["spectrum"].get<double>());
  }
  if (!o.json_out.empty()) {
    write_file_atomic(o.json_out, json_text(nlohmann::json(out), 2) + "\n");
    spdlog::info("wrote {}", o.json_out);
  }
}

}  // namespace

void add_harmonize_evaluate(CLI::App& harmonize, Globals& g) {
  auto o = std::make_shared<Options>();
  auto* cmd = harmonize.add_subcommand(
      "evaluate",
      "Compare harmonizers against ground truth: brainsim's same subjects under every site's "
      "scanner and a neutral rendering (cross-site MAE/SSIM, fidelity SSIM/PSNR, site shift)");
  cmd->add_option(
         "--row", o->rows,
         "NAME=TYPE[:key=value,...] (repeatable; TYPE none = no harmonizer); default: "
         "none, amplitude beta 0.01/0.1/1, histogram-match, nyul, cyclegan local/federated")
      ->allow_extra_args(false);
  cmd->add_option("--set", o->sets,
                  "Override the evaluation federation, e.g. data.dataset.args.shift=2, seed=3")
      ->allow_extra_args(false);
  cmd->add_option("--json", o->json_out, "Write the table as JSON here (atomically)");
  cmd->add_flag("--no-progress", o->no_progress, "Do not log each row's time");
  cmd->callback([&g, o] { run_evaluate(g, *o); });
}

}  // namespace concord::cli
