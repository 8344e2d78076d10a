// HTML reports: run, comparison, harmonization (see report.h).
#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/message.h>
#include <concord/report.h>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <sstream>

namespace concord::report {

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr size_t kMiB = size_t(1) << 20;
// Run folders may come from elsewhere: every file is read with a size limit.
constexpr size_t kMaxText = 64 * kMiB, kMaxMetrics = 512 * kMiB, kMaxFigure = 16 * kMiB;
constexpr size_t kMaxFigures = 32;

const char* const kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
                                "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8",
                                "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2"};
constexpr size_t kColors = sizeof(kPalette) / sizeof(kPalette[0]);
const char* const kMeanColor = "#000000";
const char* const kWorstColor = "#d62728";

std::string read_text(const fs::path& file, size_t max_bytes) {
  Bytes b = read_file(file.string(), max_bytes);
  return std::string(reinterpret_cast<const char*>(b->data()), b->size());
}

double num(const json& j) {
  return j.is_number() ? j.get<double>() : NAN;
}

std::string fixed(double v, int digits = 3) {
  if (std::isnan(v)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// A scalar of a JSON document as a person reads it.
std::string scalar_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", v.get<double>());
    return buf;
  }
  return json_text(v);
}

const std::string kStyle = R"(
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555}.chart{position:relative;height:340px;margin:12px 0}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums;display:block;
overflow-x:auto;max-width:100%}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right;white-space:nowrap}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}tr.summary td{font-weight:600;background:#fafafa}
pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:.85em}
.fail{color:#b00}.ok{color:#070}img{max-width:100%;border:1px solid #ddd}
.note{color:#666;font-size:.9em}
)";

// Runs before anything else on the page: every error is kept for the check element.
const std::string kErrorCapture = R"(
window.__concordErrors = [];
window.addEventListener('error', function (e) {
  window.__concordErrors.push('error: ' + (e.message || (e.target && e.target.outerHTML) || e));
}, true);
window.addEventListener('unhandledrejection', function (e) {
  window.__concordErrors.push('unhandled rejection: ' + e.reason);
});
document.addEventListener('securitypolicyviolation', function (e) {
  window.__concordErrors.push('blocked by the page policy: ' + e.blockedURI + ' (' + e.violatedDirective + ')');
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__concordErrors.push('console.error: ' + Array.prototype.map.call(arguments, String).join(' '));
    return original.apply(console, arguments);
  };
})();
)";

// Draws data.charts (line charts over rounds, bar charts) and writes the check element.
const std::string kRenderer = R"(
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('concord-data').textContent);
  var charts = [];
  function dataset(s) {
    var d = {label: s.label, borderColor: s.color, backgroundColor: s.color,
             borderWidth: s.width || 1.5, borderDash: s.dash ? [6, 4] : [], pointRadius: 2,
             spanGaps: true, fill: false};
    d.data = s.points ? s.points.map(function (p) { return {x: p[0], y: p[1]}; }) : s.values;
    return d;
  }
  function draw(spec) {
    var target = document.getElementById(spec.target);
    var box = document.createElement('div');
    box.className = 'chart';
    // Many lines: the legend goes below the chart, which grows to hold it.
    var many = spec.series.length > 8;
    if (many) box.style.height = (340 + 22 * Math.ceil(spec.series.length / 3)) + 'px';
    var canvas = document.createElement('canvas');
    canvas.id = spec.id;
    canvas.setAttribute('role', 'img');
    canvas.setAttribute('aria-label', spec.title);
    box.appendChild(canvas);
    target.appendChild(box);
    var line = spec.type === 'line';
    var x = line ? {type: 'linear', ticks: {precision: 0}} : {};
    x.title = {display: !!spec.xlabel, text: spec.xlabel || ''};
    charts.push(new Chart(canvas, {
      type: spec.type,
      data: {labels: spec.labels || [], datasets: spec.series.map(dataset)},
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        plugins: {title: {display: true, text: spec.title}, legend: {position: many ? 'bottom' : 'right'}},
        scales: {x: x, y: {beginAtZero: !line, title: {display: !!spec.ylabel, text: spec.ylabel || ''}}}
      }
    }));
  }
  function check() {
    var out = {charts: [], tables: {}, errors: window.__concordErrors,
               resources: performance.getEntriesByType('resource').map(function (e) { return e.name; })};
    charts.forEach(function (c) {
      var px = c.canvas.getContext('2d').getImageData(0, 0, c.canvas.width, c.canvas.height).data;
      var n = 0;
      for (var i = 3; i < px.length; i += 4) if (px[i] !== 0) ++n;
      var drawn = 0;
      c.data.datasets.forEach(function (d, i) { if (c.getDatasetMeta(i).data.length > 0) ++drawn; });
      out.charts.push({id: c.canvas.id, datasets: c.data.datasets.length, drawn: drawn, pixels: n});
    });
    out.images = Array.prototype.map.call(document.images, function (i) {
      return {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight};
    });
    document.querySelectorAll('table[id]').forEach(function (t) {
      out.tables[t.id] = Array.prototype.map.call(t.rows, function (r) {
        return Array.prototype.map.call(r.cells, function (c) { return c.textContent; });
      });
    });
    document.getElementById('concord-check').textContent = JSON.stringify(out);
  }
  data.charts.forEach(function (spec) {
    try { draw(spec); } catch (e) { window.__concordErrors.push('chart ' + spec.id + ': ' + e); }
  });
  check();
  window.addEventListener('error', check);
})();
)";

std::string page(const std::string& title, const std::string& body, const json& charts,
                 const std::string& chart_js) {
  std::string lower = chart_js;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return char(std::tolower(c)); });
  // Inside <script>, only these sequences could end or confuse the element.
  if (lower.find("</script") != std::string::npos || lower.find("<!--") != std::string::npos)
    throw Error("the Chart.js library text holds '</script' or '<!--': it cannot be inlined");
  std::string h;
  h.reserve(chart_js.size() + body.size() + 16384);
  h += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  // Self-contained: no request of any kind leaves the page.
  h += "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
       "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">\n";
  h += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  h += "<title>" + html_escape(title) + "</title>\n<style>" + kStyle + "</style>\n";
  h += "<script>" + kErrorCapture + "</script>\n";
  h += "<script>\n" + chart_js + "\n</script>\n";
  h += "<script type=\"application/json\" id=\"concord-data\">" +
       script_json(json{{"charts", charts}}) + "</script>\n</head>\n<body>\n";
  h += body;
  h += "<pre id=\"concord-check\" hidden></pre>\n";
  h += "<script>" + kRenderer + "</script>\n</body>\n</html>\n";
  return h;
}

json series(const std::string& label, const json& points, const std::string& color,
            double width = 1.5, bool dash = false) {
  json s{{"label", label}, {"points", points}, {"color", color}, {"width", width}};
  if (dash) s["dash"] = true;
  return s;
}

json line_chart(const std::string& target, const std::string& id, const std::string& title,
                const std::string& ylabel, json series_list) {
  return json{{"type", "line"},
              {"target", target},
              {"id", id},
              {"title", title},
              {"xlabel", "round"},
              {"ylabel", ylabel},
              {"series", std::move(series_list)}};
}

json point(double x, double y) {
  return json::array({x, std::isnan(y) ? json(nullptr) : json(y)});
}

// Chart ids are built from metric names, which come from files: keep them to [a-z0-9-].
std::string slug(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += std::isalnum(c) ? char(std::tolower(c)) : '-';
  return out;
}

std::string site_shift_table_and_chart(const json& shift, const std::string& target,
                                       const std::string& id, json& charts) {
  // shift: {sites, images, histogram_before, histogram_after, spectrum_before, spectrum_after}
  std::string h;
  auto pct = [](double a, double b) { return a > 0 ? fixed(100.0 * (b - a) / a, 1) + "%" : "-"; };
  const double hb = num(shift.value("histogram_before", json())),
               ha = num(shift.value("histogram_after", json())),
               sb = num(shift.value("spectrum_before", json())),
               sa = num(shift.value("spectrum_after", json()));
  h += "<p class=\"meta\">over " + html_escape(scalar_text(shift.value("sites", json("?")))) +
       " sites, " + html_escape(scalar_text(shift.value("images", json("?")))) + " images</p>\n";
  h += "<table id=\"" + id +
       "-table\"><tr><th>measure</th><th>before</th><th>after</th><th>change</th></tr>\n";
  h += "<tr><td>histogram W1</td><td>" + fixed(hb, 4) + "</td><td>" + fixed(ha, 4) + "</td><td>" +
       pct(hb, ha) + "</td></tr>\n";
  h += "<tr><td>amplitude spectrum</td><td>" + fixed(sb, 4) + "</td><td>" + fixed(sa, 4) +
       "</td><td>" + pct(sb, sa) + "</td></tr>\n</table>\n";
  h += "<div id=\"" + target + "\"></div>\n";
  auto v = [](double x) { return std::isnan(x) ? json(nullptr) : json(x); };
  charts.push_back(
      {{"type", "bar"},
       {"target", target},
       {"id", id},
       {"title", "site shift before and after harmonization (lower: sites look more alike)"},
       {"labels", {"histogram W1", "amplitude spectrum"}},
       {"series",
        {{{"label", "before"}, {"values", {v(hb), v(sb)}}, {"color", "#9e9e9e"}},
         {{"label", "after"}, {"values", {v(ha), v(sa)}}, {"color", "#1f77b4"}}}}});
  return h;
}

std::string img_tag(const std::string& png, const std::string& alt) {
  return "<img alt=\"" + html_escape(alt) + "\" src=\"data:image/png;base64," +
         base64(png.data(), png.size()) + "\">";
}

bool is_png(const std::string& bytes) {
  return bytes.size() >= 8 && bytes.compare(0, 8, "\x89PNG\r\n\x1a\n", 8) == 0;
}

// A key/value table of a JSON object's scalars (nested values as JSON text).
std::string object_table(const json& o, const std::string& id) {
  std::string h = "<table id=\"" + id + "\">\n";
  for (const auto& [k, v] : o.items())
    h += "<tr><td>" + html_escape(k) + "</td><td>" + html_escape(scalar_text(v)) + "</td></tr>\n";
  return h + "</table>\n";
}

// What the run's lines say, gathered per site and round.
struct Curves {
  std::vector<std::string> sites;  // in order of appearance
  std::map<std::string, bool> held_out;
  std::vector<std::string> metrics;
  // metric -> site -> round -> value
  std::map<std::string, std::map<std::string, std::map<int, double>>> metric;
  std::map<std::string, std::map<int, std::pair<double, double>>> loss;  // (loss, samples)
  std::map<std::string, std::map<int, double>> epsilon;
};

Curves gather(const RunFolder& run) {
  Curves c;
  std::set<std::string> seen_sites, seen_metrics;
  auto add_site = [&](const std::string& s) {
    if (seen_sites.insert(s).second) c.sites.push_back(s);
  };
  if (run.summary.is_object() && run.summary.contains("sites") && run.summary["sites"].is_array())
    for (const auto& s : run.summary["sites"])
      if (s.is_object() && s.contains("site") && s["site"].is_string()) add_site(s["site"]);
  for (const auto& j : run.lines) {
    if (!j.contains("site") || !j["site"].is_string() || !j.contains("round") ||
        !j["round"].is_number_integer())
      continue;
    const std::string site = j["site"];
    const int round = j["round"].get<int>();
    add_site(site);
    if (j.contains("held_out") && j["held_out"].is_boolean()) c.held_out[site] = j["held_out"];
    const bool global = !j.contains("phase") || j["phase"] == "global";
    if (global && j.contains("metrics") && j["metrics"].is_object())
      for (const auto& [m, v] : j["metrics"].items()) {
        if (seen_metrics.insert(m).second) c.metrics.push_back(m);
        c.metric[m][site][round] = num(v);
      }
    if (j.contains("train_loss") && j["train_loss"].is_number())
      c.loss[site][round] = {num(j["train_loss"]),
                             j.contains("num_samples") ? num(j["num_samples"]) : 1.0};
    double eps = NAN;
    if (j.contains("epsilon")) eps = num(j["epsilon"]);
    if (j.contains("privacy") && j["privacy"].is_object() && j["privacy"].contains("epsilon"))
      eps = num(j["privacy"]["epsilon"]);
    if (!std::isnan(eps)) c.epsilon[site][round] = eps;
  }
  return c;
}

// Per round: the mean and the worst (lowest) value of `metric` over the sites that train, as
// `concord run` summarises the final round.
std::pair<json, json> mean_worst_curves(const Curves& c, const std::string& metric) {
  json mean = json::array(), worst = json::array();
  auto it = c.metric.find(metric);
  if (it == c.metric.end()) return {mean, worst};
  std::set<int> rounds;
  for (const auto& [site, vals] : it->second)
    for (const auto& [r, v] : vals) rounds.insert(r);
  for (int r : rounds) {
    double sum = 0, lo = INFINITY;
    int n = 0;
    for (const auto& [site, vals] : it->second) {
      if (c.held_out.count(site) && c.held_out.at(site)) continue;
      auto v = vals.find(r);
      if (v == vals.end() || std::isnan(v->second)) continue;
      sum += v->second, lo = std::min(lo, v->second), ++n;
    }
    mean.push_back(point(r, n ? sum / n : NAN));
    worst.push_back(point(r, n ? lo : NAN));
  }
  return {mean, worst};
}

// Per round: the training loss over the sites that trained, weighted by their samples (the
// figure the run's log prints).
json mean_loss_curve(const Curves& c) {
  std::map<int, std::pair<double, double>> total;
  for (const auto& [site, rounds] : c.loss)
    for (const auto& [r, ln] : rounds)
      if (!std::isnan(ln.first) && !std::isnan(ln.second))
        total[r].first += ln.first * ln.second, total[r].second += ln.second;
  json pts = json::array();
  for (const auto& [r, t] : total) pts.push_back(point(r, t.second > 0 ? t.first / t.second : NAN));
  return pts;
}

// The paths' common leading folders, component by component ("" when none).
fs::path common_path(const std::vector<fs::path>& paths) {
  if (paths.empty()) return {};
  fs::path common = paths[0];
  for (const auto& other : paths) {
    fs::path next;
    for (auto a = common.begin(), b = other.begin();
         a != common.end() && b != other.end() && *a == *b; ++a, ++b)
      next /= *a;
    common = next;
  }
  return common;
}

std::string status_line(const json& summary) {
  if (!summary.is_object())
    return "<p class=\"fail\">The run has not finished (no summary.json): the results are the "
           "last evaluation in metrics.jsonl.</p>\n";
  const bool ok = summary.value("ok", false);
  std::string h = ok ? "<p class=\"ok\">Completed without failures.</p>\n"
                     : "<p class=\"fail\">Completed with failures:</p>\n";
  if (summary.contains("failures") && summary["failures"].is_array() &&
      !summary["failures"].empty()) {
    h += "<ul class=\"fail\">\n";
    for (const auto& f : summary["failures"]) h += "<li>" + html_escape(scalar_text(f)) + "</li>\n";
    h += "</ul>\n";
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string html_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      case '\0':
        out += "\xEF\xBF\xBD";
        break;  // U+FFFD: HTML parsers drop or replace NUL anyway
      default:
        out += c;
    }
  }
  return out;
}

std::string script_json(const json& j) {
  const std::string text = json_text(j);  // invalid UTF-8 becomes U+FFFD
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    // Outside strings JSON has none of these characters, so each is inside a string literal.
    if (c == '<')
      out += "\\u003c";
    else if (c == '>')
      out += "\\u003e";
    else if (c == '&')
      out += "\\u0026";
    else if (c == '\xE2' && i + 2 < text.size() && text[i + 1] == '\x80' &&
             (text[i + 2] == '\xA8' || text[i + 2] == '\xA9')) {
      out += text[i + 2] == '\xA8' ? "\\u2028" : "\\u2029";
      i += 2;
    } else
      out += c;
  }
  return out;
}

std::string base64(const void* data, size_t size) {
  static const char* const k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const auto* p = static_cast<const unsigned char*>(data);
  std::string out;
  out.reserve((size + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= size; i += 3) {
    const uint32_t v = uint32_t(p[i]) << 16 | uint32_t(p[i + 1]) << 8 | p[i + 2];
    out += k[v >> 18 & 63], out += k[v >> 12 & 63], out += k[v >> 6 & 63], out += k[v & 63];
  }
  if (size - i == 1) {
    const uint32_t v = uint32_t(p[i]) << 16;
    out += k[v >> 18 & 63], out += k[v >> 12 & 63], out += "==";
  } else if (size - i == 2) {
    const uint32_t v = uint32_t(p[i]) << 16 | uint32_t(p[i + 1]) << 8;
    out += k[v >> 18 & 63], out += k[v >> 12 & 63], out += k[v >> 6 & 63], out += '=';
  }
  return out;
}

std::string chart_js() {
  const char* env = std::getenv("CONCORD_CHART_JS");
  const std::string path = env && *env ? env : "/usr/share/javascript/chart.js/chart.min.js";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error("cannot write an HTML report: the Chart.js library " + path +
                " was not found (install Debian's libjs-chart.js: apt-get install libjs-chart.js, "
                "or set CONCORD_CHART_JS to chart.min.js)");
  return read_text(path, kMaxText);
}

RunFolder read_run_folder(const std::string& dir) {
  RunFolder run;
  run.dir = dir;
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec))
    throw Error(dir + " is not a run folder: " +
                (fs::exists(d, ec) ? "it is not a folder" : "it does not exist"));
  std::vector<std::string> missing;
  for (const char* f : {"pipeline.yaml", "metrics.jsonl"})
    if (!fs::is_regular_file(d / f, ec)) missing.push_back(f);
  if (!missing.empty())
    throw Error(dir + " is not a run folder: no " + missing[0] +
                (missing.size() > 1 ? " and no " + missing[1] : std::string()) +
                " (`concord run` writes pipeline.yaml, metrics.jsonl and summary.json there)");
  run.pipeline_yaml = read_text(d / "pipeline.yaml", kMaxText);
  const std::string metrics = read_text(d / "metrics.jsonl", kMaxMetrics);
  std::istringstream in(metrics);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object())
      throw Error((d / "metrics.jsonl").string() + ":" + std::to_string(n) +
                  ": not a JSON object (is the file cut short or edited?)");
    run.lines.push_back(std::move(j));
  }
  if (fs::is_regular_file(d / "summary.json", ec)) {
    run.summary = json::parse(read_text(d / "summary.json", kMaxText), nullptr, false);
    if (!run.summary.is_object())
      throw Error((d / "summary.json").string() + ": not a JSON object");
  }
  if (fs::is_regular_file(d / "harmonization.json", ec)) {
    run.harmonization = json::parse(read_text(d / "harmonization.json", kMaxText), nullptr, false);
    if (!run.harmonization.is_object())
      throw Error((d / "harmonization.json").string() + ": not a JSON object");
  }
  std::vector<fs::path> pngs;
  for (const auto& e : fs::directory_iterator(d, ec))
    if (e.path().extension() == ".png" && e.is_regular_file(ec)) pngs.push_back(e.path());
  std::sort(pngs.begin(), pngs.end());
  for (const auto& p : pngs) {
    if (run.figures.size() == kMaxFigures) break;
    if (fs::file_size(p, ec) > kMaxFigure) continue;  // a figure for a page, not an archive
    std::string bytes = read_text(p, kMaxFigure);
    if (is_png(bytes)) run.figures.push_back({p.filename().string(), std::move(bytes)});
  }
  return run;
}

FinalResults final_results(const RunFolder& run) {
  FinalResults r;
  std::set<std::string> seen;
  auto note_metrics = [&](const std::map<std::string, double>& m) {
    for (const auto& [k, v] : m)
      if (seen.insert(k).second) r.metrics.push_back(k);
  };
  auto to_map = [](const json& o) {
    std::map<std::string, double> m;
    if (o.is_object())
      for (const auto& [k, v] : o.items()) m[k] = num(v);
    return m;
  };
  if (run.summary.is_object() && run.summary.contains("sites") && run.summary["sites"].is_array()) {
    r.finished = true;
    for (const auto& s : run.summary["sites"]) {
      if (!s.is_object() || !s.contains("site") || !s["site"].is_string()) continue;
      SiteResult x;
      x.site = s["site"];
      x.held_out = s.value("held_out", false);
      x.global = to_map(s.value("metrics", json()));
      x.personalized = to_map(s.value("personalized", json()));
      note_metrics(x.global);
      r.sites.push_back(std::move(x));
    }
    return r;
  }
  // Unfinished: the last evaluation of each site.
  std::map<std::string, size_t> index;
  for (const auto& j : run.lines) {
    if (!j.contains("site") || !j["site"].is_string()) continue;
    const std::string site = j["site"];
    if (!index.count(site)) {
      index[site] = r.sites.size();
      r.sites.push_back({site, false, {}, {}});
    }
    SiteResult& x = r.sites[index[site]];
    if (j.contains("held_out") && j["held_out"].is_boolean()) x.held_out = j["held_out"];
    if (!j.contains("metrics")) continue;
    if (j.value("phase", std::string("global")) == "personalized")
      x.personalized = to_map(j["metrics"]);
    else
      x.global = to_map(j["metrics"]);
    note_metrics(x.global);
  }
  return r;
}

static std::vector<double> site_values(const FinalResults& r, const std::string& metric,
                                       bool personalized) {
  std::vector<double> v;
  for (const auto& s : r.sites) {
    const auto& m = personalized ? s.personalized : s.global;
    auto it = m.find(metric);
    if (!s.held_out && it != m.end() && !std::isnan(it->second)) v.push_back(it->second);
  }
  return v;
}

double site_mean(const FinalResults& r, const std::string& metric, bool personalized) {
  const auto v = site_values(r, metric, personalized);
  if (v.empty()) return NAN;
  double s = 0;
  for (double x : v) s += x;
  return s / double(v.size());
}

double site_worst(const FinalResults& r, const std::string& metric, bool personalized) {
  const auto v = site_values(r, metric, personalized);
  return v.empty() ? NAN : *std::min_element(v.begin(), v.end());
}

// ---------------------------------------------------------------------------------------------

std::string render_run_report(const RunFolder& run, const std::string& chart_js) {
  const json& s = run.summary;
  const bool has_summary = s.is_object();
  std::string name = has_summary && s.contains("name") ? scalar_text(s["name"]) : "";
  if (name.empty()) name = fs::path(run.dir).filename().string();
  const FinalResults fr = final_results(run);
  const Curves c = gather(run);
  std::map<std::string, std::string> color;
  for (size_t i = 0; i < c.sites.size(); ++i) color[c.sites[i]] = kPalette[i % kColors];
  json charts = json::array();
  std::string b;

  b += "<h1>Run " + html_escape(name) + "</h1>\n<p class=\"meta\">folder " + html_escape(run.dir);
  if (has_summary)
    for (const char* k : {"seed", "rounds", "task"})
      if (s.contains(k)) b += " &middot; " + std::string(k) + " " + html_escape(scalar_text(s[k]));
  if (has_summary && s.contains("seconds") && s["seconds"].is_number())
    b += " &middot; " + fixed(num(s["seconds"]), 1) + " s";
  b += "</p>\n" + status_line(s);

  // Final table.
  bool personalized = false;
  for (const auto& x : fr.sites) personalized = personalized || !x.personalized.empty();
  b += "<h2>Final results per site</h2>\n";
  if (personalized)
    b += "<p class=\"note\">Each metric for the global model, then (pers.) for each site's "
         "personalized model.</p>\n";
  b += "<table id=\"final-table\">\n<tr><th>site</th>";
  for (const auto& m : fr.metrics) {
    b += "<th>" + html_escape(m) + "</th>";
    if (personalized) b += "<th>" + html_escape(m) + " (pers.)</th>";
  }
  b += "</tr>\n";
  auto cell = [](const std::map<std::string, double>& m, const std::string& k) {
    auto it = m.find(k);
    return "<td>" + (it == m.end() ? std::string("-") : fixed(it->second)) + "</td>";
  };
  for (const auto& x : fr.sites) {
    b += "<tr><td>" + html_escape(x.site) + (x.held_out ? " (held out)" : "") + "</td>";
    for (const auto& m : fr.metrics) {
      b += cell(x.global, m);
      if (personalized) b += cell(x.personalized, m);
    }
    b += "</tr>\n";
  }
  for (int worst = 0; worst < 2; ++worst) {
    b += std::string("<tr class=\"summary\"><td>") + (worst ? "worst site" : "mean") + "</td>";
    for (const auto& m : fr.metrics) {
      for (int p = 0; p < (personalized ? 2 : 1); ++p)
        b += "<td>" + fixed(worst ? site_worst(fr, m, p) : site_mean(fr, m, p)) + "</td>";
    }
    b += "</tr>\n";
  }
  b += "</table>\n";

  // Metric curves: every site, then the mean and the worst site over the sites that train.
  b += "<h2>Metrics over rounds</h2>\n<div id=\"metric-charts\"></div>\n";
  for (const auto& m : c.metrics) {
    const auto& by_site = c.metric.at(m);
    json list = json::array();
    for (const auto& site : c.sites) {
      auto it = by_site.find(site);
      if (it == by_site.end()) continue;
      json pts = json::array();
      for (const auto& [r, v] : it->second) pts.push_back(point(r, v));
      const bool held = c.held_out.count(site) && c.held_out.at(site);
      list.push_back(series(site + (held ? " (held out)" : ""), pts, color[site], 1.5, held));
    }
    auto [mean, worst] = mean_worst_curves(c, m);
    list.push_back(series("mean", mean, kMeanColor, 3));
    list.push_back(series("worst site", worst, kWorstColor, 3, true));
    charts.push_back(line_chart("metric-charts", "chart-metric-" + slug(m), m + " per site", m,
                                std::move(list)));
  }
  if (c.metrics.empty()) b += "<p class=\"note\">No evaluation in metrics.jsonl yet.</p>\n";

  // Training loss: every site that trained, and the sample-weighted mean as the log prints it.
  b += "<h2>Training loss per round</h2>\n<div id=\"loss-charts\"></div>\n";
  if (!c.loss.empty()) {
    json list = json::array();
    for (const auto& site : c.sites) {
      auto it = c.loss.find(site);
      if (it == c.loss.end()) continue;
      json pts = json::array();
      for (const auto& [r, ln] : it->second) pts.push_back(point(r, ln.first));
      list.push_back(series(site, pts, color[site]));
    }
    const json mean = mean_loss_curve(c);
    list.push_back(series("mean (weighted by samples)", mean, kMeanColor, 3));
    charts.push_back(line_chart("loss-charts", "chart-loss", "training loss per site", "train loss",
                                std::move(list)));
  } else {
    b += "<p class=\"note\">No site reported a training loss.</p>\n";
  }

  // Privacy budget, when a DP filter accounted for it.
  const json privacy = has_summary && s.contains("privacy") ? s["privacy"] : json();
  if (!c.epsilon.empty() || privacy.is_object()) {
    b += "<h2>Privacy budget</h2>\n";
    if (privacy.is_object()) b += object_table(privacy, "privacy-table");
    if (!c.epsilon.empty()) {
      b += "<div id=\"privacy-charts\"></div>\n";
      // One curve when every site spent the same (client-level accounting), else one per site.
      bool same = true;
      const auto& first = c.epsilon.begin()->second;
      for (const auto& [site, e] : c.epsilon) same = same && e == first;
      json list = json::array();
      if (same) {
        json pts = json::array();
        for (const auto& [r, e] : first) pts.push_back(point(r, e));
        list.push_back(series("epsilon", pts, kMeanColor, 3));
      } else {
        for (const auto& site : c.sites) {
          auto it = c.epsilon.find(site);
          if (it == c.epsilon.end()) continue;
          json pts = json::array();
          for (const auto& [r, e] : it->second) pts.push_back(point(r, e));
          list.push_back(series(site, pts, color[site]));
        }
      }
      charts.push_back(line_chart("privacy-charts", "chart-epsilon",
                                  "privacy budget spent (epsilon) after each round", "epsilon",
                                  std::move(list)));
    }
  }

  // Harmonization: site shift and montages, when the run wrote them.
  json shift = has_summary && s.contains("site_shift") ? s["site_shift"] : json();
  if (!shift.is_object() && run.harmonization.is_object() &&
      run.harmonization.contains("site_shift"))
    shift = run.harmonization["site_shift"];
  if (shift.is_object() || !run.figures.empty()) {
    b += "<h2>Harmonization and figures</h2>\n";
    const json hs =
        run.harmonization.is_object() ? run.harmonization.value("harmonizers", json()) : json();
    if (hs.is_array() && !hs.empty()) {
      std::string names;
      for (const auto& h : hs) names += (names.empty() ? "" : ", ") + html_escape(scalar_text(h));
      b += "<p class=\"meta\">harmonizers, in order: " + names +
           "; site shift measured on up to 16 training images per site, before and after "
           "them (the montage: harmonization.png)</p>\n";
    }
    if (shift.is_object()) {
      if (shift.contains("histogram_before")) {
        b += site_shift_table_and_chart(shift, "shift-chart", "chart-site-shift", charts);
      } else {
        int i = 0;
        for (const auto& [h, m] : shift.items()) {
          if (!m.is_object()) continue;
          b += "<h3>" + html_escape(h) + "</h3>\n";
          const std::string n = std::to_string(i++);
          b += site_shift_table_and_chart(m, "shift-chart-" + n, "chart-site-shift-" + n, charts);
        }
      }
    }
    for (const auto& f : run.figures)
      b += "<figure>" + img_tag(f.png, f.name) + "<figcaption>" + html_escape(f.name) +
           "</figcaption></figure>\n";
  }

  // Simulated sites' scanner signatures and the other data notes.
  const json notes = has_summary && s.contains("data_notes") ? s["data_notes"] : json();
  if (notes.is_object() && !notes.empty()) {
    std::vector<std::pair<std::string, json>> scanners;
    std::vector<std::string> params;
    std::set<std::string> seen;
    json others = json::object();
    for (const auto& [k, v] : notes.items()) {
      if (k.rfind("scanner.", 0) == 0 && v.is_object()) {
        scanners.emplace_back(k.substr(8), v);
        for (const auto& [p, x] : v.items())
          if (seen.insert(p).second) params.push_back(p);
      } else {
        others[k] = v;
      }
    }
    if (!scanners.empty()) {
      b += "<h2>Scanner signatures of the simulated sites</h2>\n<table id=\"scanner-table\">\n"
           "<tr><th>site</th>";
      for (const auto& p : params) b += "<th>" + html_escape(p) + "</th>";
      b += "</tr>\n";
      for (const auto& [site, v] : scanners) {
        b += "<tr><td>" + html_escape(site) + "</td>";
        for (const auto& p : params)
          b += "<td>" + (v.contains(p) ? html_escape(scalar_text(v[p])) : "-") + "</td>";
        b += "</tr>\n";
      }
      b += "</table>\n";
    }
    if (!others.empty())
      b += "<h2>Data</h2>\n<pre>" + html_escape(json_text(others, 2)) + "</pre>\n";
  }

  b += "<h2>Pipeline (resolved)</h2>\n<pre id=\"pipeline\">" + html_escape(run.pipeline_yaml) +
       "</pre>\n";
  return page("Concord run " + name, b, charts, chart_js);
}

std::string write_run_report(const std::string& dir, const std::string& out) {
  const std::string js = chart_js();
  const RunFolder run = read_run_folder(dir);
  const std::string path = out.empty() ? (fs::path(dir) / "report.html").string() : out;
  write_file_atomic(path, render_run_report(run, js));
  return path;
}

// ---------------------------------------------------------------------------------------------

MeanSd mean_sd(const std::vector<double>& values) {
  MeanSd r;
  double sum = 0;
  for (double v : values)
    if (!std::isnan(v)) sum += v, ++r.n;
  if (r.n == 0) {
    r.mean = NAN;
    return r;
  }
  r.mean = sum / r.n;
  if (r.n > 1) {
    double ss = 0;
    for (double v : values)
      if (!std::isnan(v)) ss += (v - r.mean) * (v - r.mean);
    r.sd = std::sqrt(ss / (r.n - 1));
  }
  return r;
}

std::string format_mean_sd(const MeanSd& m, int digits) {
  if (m.n == 0) return "-";
  std::string s = fixed(m.mean, digits);
  if (m.n > 1) s += " \xC2\xB1 " + fixed(m.sd, digits);  // ±
  return s;
}

std::string pipeline_identity(const std::string& yaml) {
  YAML::Node n;
  try {
    n = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    throw Error(std::string("pipeline.yaml: ") + e.what());
  }
  if (n.IsMap()) {
    n.remove("seed");
    n.remove("output");
  }
  YAML::Emitter out;
  out << n;
  return out.c_str();
}

int64_t run_seed(const RunFolder& run) {
  if (run.summary.is_object() && run.summary.contains("seed") &&
      run.summary["seed"].is_number_integer())
    return run.summary["seed"].get<int64_t>();
  try {
    YAML::Node n = YAML::Load(run.pipeline_yaml);
    if (n.IsMap() && n["seed"]) return n["seed"].as<int64_t>();
  } catch (const YAML::Exception&) {
  }
  return 0;
}

std::vector<RunGroup> group_runs(const std::vector<RunFolder>& runs) {
  std::vector<RunGroup> groups;
  std::vector<std::string> ids;
  for (size_t i = 0; i < runs.size(); ++i) {
    std::string id;
    try {
      id = pipeline_identity(runs[i].pipeline_yaml);
    } catch (const Error& e) {
      throw Error(runs[i].dir + "/" + e.what());
    }
    auto it = std::find(ids.begin(), ids.end(), id);
    if (it == ids.end()) {
      ids.push_back(id);
      groups.push_back({runs[i].dir, {}, {}});
      it = ids.end() - 1;
    }
    RunGroup& g = groups[size_t(it - ids.begin())];
    g.runs.push_back(i);
    g.seeds.push_back(run_seed(runs[i]));
  }
  for (auto& g : groups) {
    if (g.runs.size() < 2) continue;
    std::vector<fs::path> paths;
    for (size_t i : g.runs) paths.push_back(fs::path(runs[i].dir).lexically_normal());
    const fs::path common = common_path(paths);
    std::string label =
        common.empty() || common == "." || common == "/" ? runs[g.runs[0]].dir : common.string();
    while (label.size() > 1 && label.back() == '/') label.pop_back();
    label += " (" + std::to_string(g.runs.size()) + " seeds:";
    for (size_t k = 0; k < g.seeds.size(); ++k)
      label += (k ? ", " : " ") + std::to_string(g.seeds[k]);
    g.label = label + ")";
  }
  return groups;
}

std::vector<std::string> compare_metrics(const std::vector<RunFolder>& runs,
                                         const std::string& wanted) {
  std::vector<FinalResults> fr;
  for (const auto& r : runs) fr.push_back(final_results(r));
  if (!wanted.empty()) {
    for (size_t i = 0; i < runs.size(); ++i)
      if (std::find(fr[i].metrics.begin(), fr[i].metrics.end(), wanted) == fr[i].metrics.end()) {
        std::string have;
        for (const auto& m : fr[i].metrics) have += (have.empty() ? "" : ", ") + m;
        throw Error("run " + runs[i].dir + " has no metric '" + wanted +
                    "' (it has: " + (have.empty() ? "none" : have) + ")");
      }
    return {wanted};
  }
  std::vector<std::string> common;
  if (fr.empty()) return common;
  for (const auto& m : fr[0].metrics) {
    bool all = true;
    for (const auto& f : fr) all = all && std::count(f.metrics.begin(), f.metrics.end(), m);
    if (all) common.push_back(m);
  }
  return common;
}

CompareTable compare_table(const std::vector<RunFolder>& runs, const std::vector<RunGroup>& groups,
                           const std::string& metric, bool personalized) {
  CompareTable t;
  t.metric = metric;
  t.personalized = personalized;
  std::vector<FinalResults> fr;
  std::set<std::string> seen;
  for (const auto& r : runs) {
    fr.push_back(final_results(r));
    for (const auto& s : fr.back().sites)
      if (seen.insert(s.site).second) t.sites.push_back(s.site);
  }
  for (const auto& g : groups) {
    CompareTable::Row row;
    row.label = g.label;
    row.runs = g.runs.size();
    for (const auto& site : t.sites) {
      std::vector<double> v;
      for (size_t i : g.runs)
        for (const auto& s : fr[i].sites) {
          if (s.site != site) continue;
          const auto& m = personalized ? s.personalized : s.global;
          auto it = m.find(metric);
          if (it != m.end()) v.push_back(it->second);
        }
      row.sites.push_back(mean_sd(v));
    }
    std::vector<double> means, worsts;
    for (size_t i : g.runs) {
      means.push_back(site_mean(fr[i], metric, personalized));
      worsts.push_back(site_worst(fr[i], metric, personalized));
    }
    row.mean = mean_sd(means);
    row.worst = mean_sd(worsts);
    t.rows.push_back(std::move(row));
  }
  return t;
}

// Terminal width of UTF-8 text (the ± sign is one column, two bytes).
static size_t columns(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

std::string format_compare_table(const CompareTable& t) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head{"run"};
  for (const auto& s : t.sites) head.push_back(s);
  head.push_back("mean");
  head.push_back("worst site");
  rows.push_back(head);
  for (const auto& r : t.rows) {
    std::vector<std::string> cells{r.label};
    for (const auto& m : r.sites) cells.push_back(format_mean_sd(m));
    cells.push_back(format_mean_sd(r.mean));
    cells.push_back(format_mean_sd(r.worst));
    rows.push_back(cells);
  }
  std::vector<size_t> w(head.size(), 0);
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) w[i] = std::max(w[i], columns(r[i]));
  std::string out =
      t.metric + (t.personalized ? " (final, personalized)" : " (final, global)") + "\n";
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size(); ++i) {
      const std::string pad(w[i] - columns(r[i]), ' ');
      out += i == 0 ? r[i] + pad : "  " + pad + r[i];
    }
    out += "\n";
  }
  return out;
}

std::string render_compare_report(const std::vector<RunFolder>& runs,
                                  const std::vector<RunGroup>& groups,
                                  const std::vector<std::string>& metrics,
                                  const std::string& chart_js) {
  json charts = json::array();
  std::string b = "<h1>Concord: " + std::to_string(runs.size()) + " runs compared</h1>\n";
  b += "<table id=\"runs-table\">\n<tr><th>run</th><th>pipeline</th><th>seed</th><th>group</th>"
       "<th>status</th></tr>\n";
  std::vector<size_t> group_of(runs.size());
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t i : groups[g].runs) group_of[i] = g;
  for (size_t i = 0; i < runs.size(); ++i) {
    const json& s = runs[i].summary;
    const std::string name = s.is_object() && s.contains("name") ? scalar_text(s["name"]) : "";
    const bool done = s.is_object();
    b +=
        "<tr><td>" + html_escape(runs[i].dir) + "</td><td>" + html_escape(name) + "</td><td>" +
        std::to_string(run_seed(runs[i])) + "</td><td>" + std::to_string(group_of[i] + 1) +
        "</td><td>" +
        (done ? (s.value("ok", false) ? "completed" : "completed with failures") : "not finished") +
        "</td></tr>\n";
  }
  b += "</table>\n<p class=\"note\">Runs of the same pipeline that differ only in their seed form "
       "one group: its cells are mean &plusmn; sample standard deviation over the seeds.</p>\n";

  // One colour per group: the seeds of one pipeline read as one family of lines.
  std::vector<std::string> run_color(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) run_color[i] = kPalette[group_of[i] % kColors];
  std::vector<Curves> curves;
  for (const auto& r : runs) curves.push_back(gather(r));
  // Legends name each run by what sets it apart: its folder below the runs' common folder.
  std::vector<fs::path> paths;
  for (const auto& r : runs) paths.push_back(fs::path(r.dir).lexically_normal());
  const fs::path common = common_path(paths);
  std::vector<std::string> legend;
  for (size_t i = 0; i < runs.size(); ++i) {
    std::string rel = common.empty() ? runs[i].dir : paths[i].lexically_relative(common).string();
    if (rel.empty() || rel == ".") rel = runs[i].dir;
    legend.push_back("#" + std::to_string(i + 1) + " " + rel);
  }

  bool any_personalized = false;
  for (const auto& r : runs)
    for (const auto& s : final_results(r).sites) any_personalized |= !s.personalized.empty();

  for (size_t k = 0; k < metrics.size(); ++k) {
    const std::string& m = metrics[k];
    b += "<h2>" + html_escape(m) + "</h2>\n";
    for (int p = 0; p < (any_personalized ? 2 : 1); ++p) {
      const CompareTable t = compare_table(runs, groups, m, p == 1);
      b += "<table id=\"compare-" + std::to_string(k) + (p ? "-personalized" : "") +
           "\">\n<caption>" + html_escape(m) + (p ? " (final, personalized)" : " (final, global)") +
           "</caption>\n<tr><th>run</th>";
      for (const auto& s : t.sites) b += "<th>" + html_escape(s) + "</th>";
      b += "<th>mean</th><th>worst site</th></tr>\n";
      for (const auto& r : t.rows) {
        b += "<tr><td>" + html_escape(r.label) + "</td>";
        for (const auto& c : r.sites) b += "<td>" + html_escape(format_mean_sd(c)) + "</td>";
        b += "<td>" + html_escape(format_mean_sd(r.mean)) + "</td><td>" +
             html_escape(format_mean_sd(r.worst)) + "</td></tr>\n";
      }
      b += "</table>\n";
    }
    // Curves: each run's mean over sites (solid) and worst site (dashed), overlaid.
    const std::string target = "compare-chart-" + std::to_string(k);
    b += "<div id=\"" + target + "\"></div>\n";
    json list = json::array();
    for (size_t i = 0; i < runs.size(); ++i) {
      auto [mean, worst] = mean_worst_curves(curves[i], m);
      list.push_back(series(legend[i] + ": mean", mean, run_color[i], 2.5));
      list.push_back(series(legend[i] + ": worst site", worst, run_color[i], 1.5, true));
    }
    charts.push_back(line_chart(target, "chart-compare-" + slug(m),
                                m + ": mean over sites (solid) and worst site (dashed)", m,
                                std::move(list)));
  }

  b += "<h2>Training loss</h2>\n<div id=\"compare-loss\"></div>\n";
  json list = json::array();
  for (size_t i = 0; i < runs.size(); ++i) {
    const json pts = mean_loss_curve(curves[i]);
    list.push_back(series(legend[i], pts, run_color[i], 2));
  }
  charts.push_back(line_chart("compare-loss", "chart-compare-loss",
                              "training loss (mean over sites, weighted by samples)", "train loss",
                              std::move(list)));
  return page("Concord: runs compared", b, charts, chart_js);
}

// ---------------------------------------------------------------------------------------------

std::string render_harmonize_report(const json& rep, const std::string& montage_png,
                                    const std::string& chart_js) {
  json charts = json::array();
  const std::string method = rep.contains("method") ? scalar_text(rep["method"]) : "?";
  std::string b = "<h1>Harmonization: " + html_escape(method) + "</h1>\n";
  // Counts and settings: every scalar of the JSON report.
  b += "<h2>Counts</h2>\n<table id=\"counts-table\">\n";
  for (const auto& [k, v] : rep.items())
    if (v.is_primitive() && !(v.is_string() && v.get<std::string>().empty()))
      b += "<tr><td>" + html_escape(k) + "</td><td>" + html_escape(scalar_text(v)) + "</td></tr>\n";
  for (const auto& [k, v] : rep.items())
    if (v.is_array() && k != "failure_causes")
      b += "<tr><td>" + html_escape(k) + "</td><td>" + std::to_string(v.size()) + "</td></tr>\n";
  b += "</table>\n";

  const json failed = rep.value("failed", json::array());
  b += "<h2>Failures</h2>\n";
  if (!failed.is_array() || failed.empty()) {
    b += "<p class=\"ok\">No input failed.</p>\n";
  } else {
    const json causes = rep.value("failure_causes", json::array());
    if (causes.is_array() && !causes.empty()) {
      b +=
          "<table id=\"failure-table\">\n<tr><th>cause</th><th>inputs</th><th>examples</th></tr>\n";
      for (const auto& c : causes) {
        if (!c.is_object()) continue;
        std::string ex;
        for (const auto& e : c.value("examples", json::array()))
          ex += (ex.empty() ? "" : "<br>") + html_escape(scalar_text(e));
        b += "<tr><td>" + html_escape(scalar_text(c.value("cause", json("")))) + "</td><td>" +
             html_escape(scalar_text(c.value("count", json(0)))) + "</td><td>" + ex +
             "</td></tr>\n";
      }
      b += "</table>\n";
    }
    const size_t shown = std::min<size_t>(failed.size(), 200);
    b += "<details><summary>" + std::to_string(failed.size()) + " failed input(s)</summary><ul>\n";
    for (size_t i = 0; i < shown; ++i)
      b += "<li>" + html_escape(scalar_text(failed[i])) + "</li>\n";
    if (shown < failed.size())
      b +=
          "<li>... " + std::to_string(failed.size() - shown) + " more (see the JSON report)</li>\n";
    b += "</ul></details>\n";
  }
  for (const char* k : {"written_as_float32", "ignored"}) {
    const json l = rep.value(k, json::array());
    if (!l.is_array() || l.empty()) continue;
    const size_t shown = std::min<size_t>(l.size(), 200);
    b += "<details><summary>" + html_escape(k) + ": " + std::to_string(l.size()) +
         "</summary><ul>\n";
    for (size_t i = 0; i < shown; ++i) b += "<li>" + html_escape(scalar_text(l[i])) + "</li>\n";
    b += "</ul></details>\n";
  }

  b += "<h2>Site shift</h2>\n";
  if (rep.contains("site_shift") && rep["site_shift"].is_object())
    b += site_shift_table_and_chart(rep["site_shift"], "shift-chart", "chart-site-shift", charts);
  else
    b += "<p class=\"note\">No image was harmonized: no site shift to measure.</p>\n";
  if (!montage_png.empty())
    b += "<h2>Before and after</h2>\n<p class=\"note\">One row per site: pairs of the same image "
         "before and after harmonization, each side on its own pooled intensity range.</p>\n" +
         img_tag(montage_png, "before/after montage");
  return page("Concord harmonization: " + method, b, charts, chart_js);
}

}  // namespace concord::report
