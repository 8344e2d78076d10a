// HTML reports written by `concord run` and `concord harmonize apply --report`.
#include "report_html.h"

#include "harmonize_common.h"

#include <concord/engine.h>
#include <concord/json_text.h>
#include <concord/message.h>
#include <concord/report.h>

#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

namespace concord::cli {

void write_run_harmonization(const PipelineConfig& config, const std::string& run_dir) {
  if (config.harmonizers.empty()) return;
  try {
    Experiment exp(config, global_registry());
    HarmonizeOptions ho;
    ho.keep_unharmonized = true;
    // A learned harmonizer is not trained again: its stage left its statistics in the run
    // folder, wherever it stands in the list.
    for (size_t i = 0; i < config.harmonizers.size(); ++i) {
      const auto& h = config.harmonizers[i];
      if (!global_registry()
               .create<Harmonizer>(Kind::Harmonizer, h.type, h.args, {config.seed, "report"})
               ->learned())
        continue;
      const auto file = std::filesystem::path(run_dir) / "learned" /
                        ("harmonizer-" + std::to_string(i) + "-" + h.type + ".stats");
      if (!std::filesystem::exists(file)) {
        spdlog::warn("harmonization figures not written: {} is missing", file.string());
        return;
      }
      ho.given_stats[int(i)] = load_stats(file.string());
    }
    const HarmonizeResult r = exp.harmonize(ho);
    // Every site's training images take part; up to 16 per site, chosen as harmonize apply does.
    std::vector<std::string> site_of;
    std::vector<std::pair<size_t, size_t>> where;
    for (size_t k = 0; k < r.federation.sites.size(); ++k)
      for (size_t i = 0; i < r.federation.sites[k].train.size(); ++i) {
        site_of.push_back(r.federation.sites[k].name);
        where.emplace_back(k, i);
      }
    const std::vector<bool> pick = pick_report_items(site_of, 16, config.seed);
    SiteShiftReport shift;
    for (size_t n = 0; n < where.size(); ++n) {
      if (!pick[n]) continue;
      const auto [k, i] = where[n];
      const Sample& after = r.federation.sites[k].train[i];
      shift.add(site_of[n], after.id, r.unharmonized->sites.at(k).train.at(i).image, after.image);
    }
    nlohmann::json rep;
    rep["harmonizers"] = nlohmann::json::array();
    for (const auto& h : config.harmonizers) rep["harmonizers"].push_back(h.type);
    const std::filesystem::path dir(run_dir);
    print_site_shift(shift, rep, shift.empty() ? "" : (dir / "harmonization.png").string(), 4);
    write_file_atomic((dir / "harmonization.json").string(), json_text(rep, 2) + "\n");
  } catch (const std::exception& e) {
    spdlog::warn("harmonization figures not written: {}", e.what());
  }
}

void write_run_report_after_run(const std::string& run_dir) {
  try {
    const std::string path = report::write_run_report(run_dir);
    std::cout << "report: " << path << "\n";
  } catch (const std::exception& e) {
    spdlog::warn("report.html not written: {} (`concord report {}` writes it later)", e.what(),
                 run_dir);
  }
}

std::string write_harmonize_report_html(const std::string& json_report, const nlohmann::json& rep,
                                        const SiteShiftReport& shift, int per_site) {
  std::filesystem::path html(json_report);
  html.replace_extension(".html");
  if (html == std::filesystem::path(json_report)) html += ".html";
  try {
    const std::string montage = shift.empty() ? "" : shift.preview_png(per_site, html.string());
    write_file_atomic(html.string(),
                      report::render_harmonize_report(rep, montage, report::chart_js()));
  } catch (const std::exception& e) {
    spdlog::warn("{} not written: {}", html.string(), e.what());
    return "";
  }
  std::cout << "report: " << json_report << ", " << html.string() << "\n";
  return html.string();
}

}  // namespace concord::cli
