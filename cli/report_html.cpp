// HTML reports written by `concord run` and `concord harmonize apply --report`.
#include "report_html.h"

#include <concord/message.h>
#include <concord/report.h>

#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

namespace concord::cli {

void write_run_report_after_run(const std::string& run_dir) {
  try {
    std::cout << "report: " << report::write_run_report(run_dir) << "\n";
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
