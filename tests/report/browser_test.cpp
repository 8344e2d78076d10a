// The reports as a person sees them: headless Chromium (Debian's `chromium`) loads each page
// with the network off, and the assertions read the rendered DOM: the check element the page's
// script fills in (charts drawn, their datasets and non-blank pixels, the tables' cells, the
// errors seen, the resources loaded). A screenshot of each page is written to
// build/test-output/report/ for people to look at.
#include <concord/report.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include <unistd.h>

#include "report_testing.h"
#include "testing.h"

using namespace concord;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string find_chromium() {
  if (const char* env = std::getenv("CONCORD_CHROMIUM"); env && *env) return env;
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/bin:/bin");
  std::string d;
  while (std::getline(dirs, d, ':'))
    for (const char* name : {"chromium", "chromium-browser", "google-chrome"})
      if (!d.empty() && ::access((fs::path(d) / name).c_str(), X_OK) == 0)
        return (fs::path(d) / name).string();
  return "";
}

#define REQUIRE_CHROMIUM()                                                                    \
  const std::string chromium = find_chromium();                                               \
  if (chromium.empty())                                                                       \
  GTEST_SKIP() << "chromium not found (install Debian's chromium: apt-get install "           \
                  "--no-install-recommends chromium, or set CONCORD_CHROMIUM); skipping the " \
                  "browser test"

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string unescape_text(std::string s) {
  const std::pair<const char*, const char*> ents[] = {{"&lt;", "<"},          {"&gt;", ">"},
                                                      {"&quot;", "\""},       {"&#39;", "'"},
                                                      {"&nbsp;", "\xC2\xA0"}, {"&amp;", "&"}};
  std::string out;
  for (size_t i = 0; i < s.size();) {
    bool hit = false;
    if (s[i] == '&')
      for (const auto& [e, c] : ents)
        if (s.compare(i, std::strlen(e), e) == 0) {
          out += c, i += std::strlen(e), hit = true;
          break;
        }
    if (!hit) out += s[i++];
  }
  return out;
}

fs::path output_dir() {
  fs::path d = fs::path(testkit::build_dir()) / "test-output" / "report";
  fs::create_directories(d);
  return d;
}

// Chromium with no network: every host resolves to nothing and every request goes to a proxy
// that does not exist. The page's own policy forbids requests as well; this makes sure.
std::string chromium_command(const std::string& chromium, const fs::path& profile) {
  return chromium +
         " --headless --disable-gpu --no-sandbox --no-first-run --no-default-browser-check"
         " --disable-extensions --disable-background-networking --disable-sync"
         " --user-data-dir=" +
         profile.string() +
         " --proxy-server=socks5://127.0.0.1:9 --proxy-bypass-list='<-loopback>'"
         " --host-resolver-rules='MAP * ~NOTFOUND' --hide-scrollbars --window-size=1280,2600"
         " --virtual-time-budget=5000";
}

struct Rendered {
  std::string dom;
  json check;
};

// Loads `page` and returns its rendered DOM and check; writes `<name>.png` into output_dir().
Rendered render(const std::string& chromium, const fs::path& page, const std::string& name) {
  testkit::TempDir profile;
  const fs::path err = profile.path() / "stderr.txt";
  const std::string url = "file://" + fs::absolute(page).string();
  std::string dom;
  int rc = testkit::run_command("{ " + chromium_command(chromium, profile.path() / "p") +
                                    " --dump-dom '" + url + "' 2>" + err.string() + "; }",
                                &dom);
  EXPECT_EQ(rc, 0) << read(err);
  Rendered r;
  r.dom = dom;
  std::smatch m;
  static const std::regex check_re("<pre id=\"concord-check\" hidden=\"\">([^<]*)</pre>");
  if (!std::regex_search(dom, m, check_re)) {
    ADD_FAILURE() << "no check element in the rendered page (did its script run?)\n"
                  << dom.substr(0, 2000) << "\n"
                  << read(err);
    return r;
  }
  r.check = json::parse(unescape_text(m[1].str()), nullptr, false);
  EXPECT_TRUE(r.check.is_object()) << m[1].str();
  const fs::path png = output_dir() / (name + ".png");
  fs::remove(png);
  rc = testkit::run_command("{ " + chromium_command(chromium, profile.path() / "s") +
                                " --screenshot=" + png.string() + " '" + url + "' 2>" +
                                err.string() + "; }",
                            nullptr);
  EXPECT_EQ(rc, 0) << read(err);
  const std::string bytes = read(png);
  EXPECT_GT(bytes.size(), 10000u) << png;
  EXPECT_EQ(bytes.substr(0, 4), "\x89PNG") << png;
  std::cout << "screenshot: " << png.string() << "\n";
  return r;
}

// No error, no request: the page is self-contained and its script ran cleanly.
void expect_clean(const Rendered& r) {
  EXPECT_EQ(r.check.value("errors", json::array()), json::array()) << r.check.dump(2);
  EXPECT_EQ(r.check.value("resources", json::array()), json::array()) << r.check.dump(2);
}

const json* chart(const Rendered& r, const std::string& id) {
  if (r.check.contains("charts"))
    for (const auto& c : r.check.at("charts"))
      if (c.value("id", "") == id) return &c;
  ADD_FAILURE() << "no chart " << id << " in " << r.check.dump(2);
  return nullptr;
}

void expect_chart(const Rendered& r, const std::string& id, int datasets) {
  const json* c = chart(r, id);
  if (!c) return;
  EXPECT_EQ(c->value("datasets", -1), datasets) << id;
  EXPECT_EQ(c->value("drawn", -1), datasets) << id;
  EXPECT_GT(c->value("pixels", 0), 2000) << id << ": the canvas is (nearly) blank";
}

// The site-shift table and chart as drawn, against the measure in `shift`; one montage image.
void expect_site_shift(const Rendered& r, const json& shift) {
  expect_chart(r, "chart-site-shift", 2);  // before, after
  const json table = r.check["tables"]["chart-site-shift-table"];
  ASSERT_EQ(table.size(), 3u) << r.check.dump();
  char cell[32];
  std::snprintf(cell, sizeof cell, "%.4f", shift["histogram_before"].get<double>());
  EXPECT_EQ(table[1][1], cell);
  std::snprintf(cell, sizeof cell, "%.4f", shift["spectrum_after"].get<double>());
  EXPECT_EQ(table[2][2], cell);
  ASSERT_EQ(r.check["images"].size(), 1u) << r.check.dump();
  EXPECT_GT(r.check["images"][0].value("width", 0), 200);  // the montage decoded
}

std::string fixed3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

// A small real run: 3 brainsim sites, 3 rounds, evaluated every round.
std::string run_pipeline(const fs::path& run_dir, const std::string& extra = "") {
  std::string out;
  const int rc = testkit::run_command(
      "cd " + testkit::source_dir() + " && " + testkit::concord_exe() +
          " run pipelines/quickstart.yaml --no-progress --run-dir " + run_dir.string() +
          " --set federation.rounds=3 --set evaluation.every=1 --set data.dataset.args.sites=3"
          " --set federation.min_sites=2 --set data.dataset.args.train_per_site=48"
          " --set data.dataset.args.test_per_site=24 --set data.dataset.args.size=32"
          " --set model.args.width=8" +
          extra,
      &out);
  EXPECT_EQ(rc, 0) << out;
  return out;
}

}  // namespace

TEST(ReportBrowser, RunReportDrawsEveryChartAndHoldsTheRunsNumbers) {
  REQUIRE_CHROMIUM();
  testkit::TempDir dir;
  const fs::path run = dir.path() / "run";
  const std::string out = run_pipeline(run);
  const fs::path page = run / "report.html";
  ASSERT_TRUE(fs::exists(page)) << out;
  EXPECT_NE(out.find("report: " + page.string()), std::string::npos) << out;
  const json summary = json::parse(read(run / "summary.json"));

  const Rendered r = render(chromium, page, "run-report");
  expect_clean(r);
  const std::vector<std::string> metrics{"accuracy", "balanced-accuracy", "roc-auc"};
  for (const auto& m : metrics) expect_chart(r, "chart-metric-" + m, 3 + 2);  // sites, mean, worst
  expect_chart(r, "chart-loss", 3 + 1);
  EXPECT_EQ(r.check["charts"].size(), 4u);

  // The final table as rendered: header, a row per site, mean, worst site.
  const json table = r.check["tables"]["final-table"];
  ASSERT_EQ(table.size(), 1u + 3 + 2) << table.dump();
  EXPECT_EQ(table[0], json::array({"site", "accuracy", "balanced-accuracy", "roc-auc"}));
  for (size_t i = 0; i < 3; ++i) {
    const json& s = summary["sites"][i];
    EXPECT_EQ(table[i + 1][0], s["site"]);
    for (size_t k = 0; k < metrics.size(); ++k)
      EXPECT_EQ(table[i + 1][k + 1], fixed3(s["metrics"][metrics[k]].get<double>()))
          << s["site"] << " " << metrics[k];
  }
  for (size_t k = 0; k < metrics.size(); ++k) {
    EXPECT_EQ(table[4][k + 1], fixed3(summary["mean"][metrics[k]].get<double>())) << metrics[k];
    EXPECT_EQ(table[5][k + 1], fixed3(summary["worst"][metrics[k]].get<double>())) << metrics[k];
  }
  // Scanner signatures of the simulated sites, and the resolved pipeline.
  const json scanner = r.check["tables"]["scanner-table"];
  ASSERT_EQ(scanner.size(), 4u) << r.check.dump();
  EXPECT_EQ(scanner[1][0], "site-A");
  EXPECT_NE(r.dom.find("model:"), std::string::npos);

  // `concord report` writes the same page again (the run's files have not changed).
  const std::string first = read(page);
  fs::remove(page);
  std::string o;
  ASSERT_EQ(testkit::run_command(testkit::concord_exe() + " report " + run.string(), &o), 0) << o;
  EXPECT_EQ(read(page), first);
  EXPECT_NE(testkit::run_command(testkit::concord_exe() + " report " + dir.str(), &o), 0);
  EXPECT_NE(o.find("is not a run folder: no pipeline.yaml and no metrics.jsonl"), std::string::npos)
      << o;
}

TEST(ReportBrowser, RunWithAHarmonizerShowsSiteShiftAndMontage) {
  REQUIRE_CHROMIUM();
  testkit::TempDir dir;
  const fs::path run = dir.path() / "run";
  std::string out;
  ASSERT_EQ(testkit::run_command(
                "cd " + testkit::source_dir() + " && " + testkit::concord_exe() +
                    " run pipelines/harmonization-brainsim-histogram-match.yaml --no-progress"
                    " --run-dir " +
                    run.string() +
                    " --set federation.rounds=1 --set data.dataset.args.train_per_site=24"
                    " --set data.dataset.args.test_per_site=8",
                &out),
            0)
      << out;
  ASSERT_TRUE(fs::exists(run / "harmonization.png")) << out;
  const json h = json::parse(read(run / "harmonization.json"));
  EXPECT_EQ(h["harmonizers"], json::array({"histogram-match"}));
  const Rendered r = render(chromium, run / "report.html", "run-report-harmonizer");
  expect_clean(r);
  expect_site_shift(r, h["site_shift"]);
  EXPECT_EQ(r.check["images"][0]["alt"], "harmonization.png");
}

TEST(ReportBrowser, HostileSiteNamesStayText) {
  REQUIRE_CHROMIUM();
  testkit::TempDir dir;
  const std::string evil = testing_report::kHostileName;
  testing_report::FakeRun run(dir.path() / "run", 7, "name: hostile\nseed: {SEED}\n");
  run.site(evil, 0.625).site("site-B", 0.5);
  run.notes["scanner." + evil] = {{"gamma", 1.25}};
  run.summary_extra["site_shift"] = {{"sites", 2},
                                     {"images", 8},
                                     {"histogram_before", 0.2},
                                     {"histogram_after", 0.05},
                                     {"spectrum_before", 0.01},
                                     {"spectrum_after", 0.008}};
  run.summary_extra["privacy"] = {{"epsilon", 1.5}, {"delta", 1e-5}, {"level", evil}};
  run.write();
  // A montage whose file name is markup.
  std::ofstream(run.dir / "<img src=y onerror=x>montage.png", std::ios::binary)
      .write(reinterpret_cast<const char*>(testing_report::kTinyPng),
             sizeof testing_report::kTinyPng);
  std::ofstream(run.dir / "metrics.jsonl", std::ios::app)
      << R"({"round":2,"site":"site-B","epsilon":1.5})"
      << "\n";
  report::write_run_report(run.dir.string());
  const Rendered r = render(chromium, run.dir / "report.html", "hostile-names");
  // An injected <img src=x> would be a CSP violation and an injected script would set __pwned:
  // both would show in the errors or the DOM.
  expect_clean(r);
  EXPECT_EQ(r.dom.find("<script>window.__pwned"), std::string::npos);
  EXPECT_EQ(r.dom.find("<img src=\"x\""), std::string::npos);
  EXPECT_NE(r.dom.find("&lt;img src=x"), std::string::npos);  // the name, as text
  const json table = r.check["tables"]["final-table"];
  ASSERT_EQ(table.size(), 5u) << r.check.dump();
  EXPECT_EQ(table[1][0], evil);  // the name, shown as text
  EXPECT_EQ(table[1][1], "0.625");
  EXPECT_EQ(r.check["tables"]["scanner-table"][1][0], evil);
  expect_chart(r, "chart-metric-accuracy", 2 + 2);
  expect_chart(r, "chart-epsilon", 1);     // the privacy budget, when present
  expect_chart(r, "chart-site-shift", 2);  // harmonization, when present
  EXPECT_EQ(r.check["tables"]["privacy-table"][2][1], evil);
  EXPECT_EQ(r.check["tables"]["chart-site-shift-table"][1][2], "0.0500");
  ASSERT_EQ(r.check["images"].size(), 1u) << r.check.dump();
  EXPECT_EQ(r.check["images"][0]["alt"], "<img src=y onerror=x>montage.png");
  EXPECT_EQ(r.check["images"][0]["width"], 1);
  EXPECT_EQ(r.dom.find("<img src=\"y\""), std::string::npos);
}

TEST(ReportBrowser, CompareOverlaysRunsAndGroupsSeeds) {
  REQUIRE_CHROMIUM();
  testkit::TempDir dir;
  const fs::path s1 = dir.path() / "fedbn" / "seed1", s2 = dir.path() / "fedbn" / "seed2",
                 other = dir.path() / "fedavg";
  run_pipeline(s1, " --set seed=1");
  run_pipeline(s2, " --set seed=2");
  run_pipeline(other, " --set seed=1 --set adapter.args.policy=shared");
  const fs::path html = dir.path() / "compare.html";
  std::string out;
  ASSERT_EQ(
      testkit::run_command(testkit::concord_exe() + " compare " + s1.string() + " " + s2.string() +
                               " " + other.string() + " --metric accuracy --html " + html.string(),
                           &out),
      0)
      << out;
  // The seeds' row: mean ± sd of the two runs' values, as computed from their summaries.
  const json a = json::parse(read(s1 / "summary.json")), b = json::parse(read(s2 / "summary.json"));
  const double x = a["mean"]["accuracy"], y = b["mean"]["accuracy"];
  const std::string cell =
      fixed3((x + y) / 2) + " \xC2\xB1 " + fixed3(std::fabs(x - y) / std::sqrt(2.0));
  EXPECT_NE(out.find((dir.path() / "fedbn").string() + " (2 seeds: 1, 2)"), std::string::npos)
      << out;
  EXPECT_NE(out.find(cell), std::string::npos) << cell << "\n" << out;

  const Rendered r = render(chromium, html, "compare");
  expect_clean(r);
  expect_chart(r, "chart-compare-accuracy", 3 * 2);  // mean and worst site per run
  expect_chart(r, "chart-compare-loss", 3);
  const json table = r.check["tables"]["compare-0"];
  ASSERT_EQ(table.size(), 3u) << r.check.dump();
  EXPECT_EQ(table[1][4], cell);  // run, 3 sites, mean

  EXPECT_NE(testkit::run_command(
                testkit::concord_exe() + " compare " + s1.string() + " " + dir.str(), &out),
            0);
  EXPECT_NE(out.find(dir.str() + " is not a run folder"), std::string::npos) << out;
}

TEST(ReportBrowser, HarmonizeReportShowsCountsShiftAndMontage) {
  REQUIRE_CHROMIUM();
  testkit::TempDir dir;
  std::string out;
  ASSERT_EQ(
      testkit::run_command(
          "cd " + testkit::source_dir() + " && " + testkit::concord_exe() +
              " harmonize apply --pipeline pipelines/harmonization-brainsim-histogram-match.yaml"
              " --sites --set data.dataset.args.train_per_site=24"
              " --set data.dataset.args.test_per_site=8 --out " +
              dir.str() + "/out --report " + dir.str() + "/report.json",
          &out),
      0)
      << out;
  const fs::path page = dir.path() / "report.html";
  ASSERT_TRUE(fs::exists(page)) << out;
  const json rep = json::parse(read(dir.path() / "report.json"));
  const Rendered r = render(chromium, page, "harmonize-report");
  expect_clean(r);
  const json counts = r.check["tables"]["counts-table"];
  bool written = false;
  for (const auto& row : counts)
    if (row[0] == "written") written = row[1] == std::to_string(rep["written"].get<size_t>());
  EXPECT_TRUE(written) << counts.dump();
  expect_site_shift(r, rep["site_shift"]);
}
