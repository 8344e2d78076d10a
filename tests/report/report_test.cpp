// HTML reports without a browser: escaping, base64, run folders, compare's mean ± sd.
#include <concord/error.h>
#include <concord/report.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "report_testing.h"
#include "testing.h"

using namespace concord;
using namespace concord::report;
using nlohmann::json;
namespace fs = std::filesystem;

TEST(ReportEscape, HtmlEscapesEveryMarkupCharacter) {
  EXPECT_EQ(html_escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
  EXPECT_EQ(html_escape("site-A"), "site-A");
  EXPECT_EQ(html_escape("</script><script>alert(1)</script>"),
            "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;");
  EXPECT_EQ(html_escape(std::string("a\0b", 3)),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(html_escape("\xC3\xA9t\xC3\xA9"), "\xC3\xA9t\xC3\xA9");  // UTF-8 passes through
}

TEST(ReportEscape, ScriptJsonCannotEndTheScriptElementAndParsesBack) {
  const json j{{"site", "</script><script>alert(1)</script><!--"},
               {"amp", "a&b"},
               {"sep", "x\xE2\x80\xA8y\xE2\x80\xA9z"}};
  const std::string s = script_json(j);
  EXPECT_EQ(s.find('<'), std::string::npos) << s;
  EXPECT_EQ(s.find('>'), std::string::npos) << s;
  EXPECT_EQ(s.find('&'), std::string::npos) << s;
  EXPECT_EQ(s.find("\xE2\x80\xA8"), std::string::npos) << s;
  EXPECT_NE(s.find("\\u003c/script\\u003e"), std::string::npos) << s;
  EXPECT_EQ(json::parse(s), j);  // the same document for the page's JSON.parse
}

TEST(ReportEscape, Base64MatchesRfc4648) {
  const std::pair<std::string, std::string> vectors[] = {{"", ""},
                                                         {"f", "Zg=="},
                                                         {"fo", "Zm8="},
                                                         {"foo", "Zm9v"},
                                                         {"foob", "Zm9vYg=="},
                                                         {"fooba", "Zm9vYmE="},
                                                         {"foobar", "Zm9vYmFy"}};
  for (const auto& [in, out] : vectors) EXPECT_EQ(base64(in.data(), in.size()), out) << in;
  const unsigned char high[] = {0xff, 0xfe, 0x00};
  EXPECT_EQ(base64(high, 3), "//4A");
}

TEST(ReportCompare, MeanAndSampleStandardDeviation) {
  MeanSd m = mean_sd({0.70, 0.74, 0.78});
  EXPECT_EQ(m.n, 3);
  EXPECT_NEAR(m.mean, 0.74, 1e-12);
  EXPECT_NEAR(m.sd, 0.04, 1e-12);  // sqrt((0.04^2 + 0 + 0.04^2) / 2)
  EXPECT_EQ(format_mean_sd(m), "0.740 \xC2\xB1 0.040");
  m = mean_sd({1, 2, 3, 4});
  EXPECT_NEAR(m.sd, std::sqrt(5.0 / 3.0), 1e-12);
  m = mean_sd({0.5, NAN});  // undefined values are left out
  EXPECT_EQ(m.n, 1);
  EXPECT_EQ(m.sd, 0);
  EXPECT_EQ(format_mean_sd(m), "0.500");
  EXPECT_EQ(format_mean_sd(mean_sd({})), "-");
  EXPECT_EQ(format_mean_sd(mean_sd({NAN})), "-");
}

TEST(ReportCompare, PipelineIdentityIgnoresSeedAndOutputOnly) {
  const std::string a = "name: x\nseed: 1\noutput: runs\ntraining: {lr: 0.1}\n";
  const std::string b = "name: x\nseed: 2\noutput: elsewhere\ntraining: {lr: 0.1}\n";
  const std::string c = "name: x\nseed: 1\noutput: runs\ntraining: {lr: 0.2}\n";
  EXPECT_EQ(pipeline_identity(a), pipeline_identity(b));
  EXPECT_NE(pipeline_identity(a), pipeline_identity(c));
  EXPECT_THROW(pipeline_identity("a: [1, 2"), Error);
}

TEST(ReportCompare, SeedsOfOnePipelineAreOneRowWithMeanAndSd) {
  testkit::TempDir dir;
  using testing_report::FakeRun;
  const std::string base = "name: p\nseed: {SEED}\ntraining: {lr: 0.1}\n";
  std::vector<RunFolder> runs;
  // Three seeds of one pipeline, one other pipeline.
  const double a[3][2] = {{0.70, 0.60}, {0.74, 0.50}, {0.78, 0.40}};
  for (int s = 0; s < 3; ++s) {
    FakeRun r(dir.path() / "p" / ("seed" + std::to_string(s + 1)), s + 1, base);
    r.site("site-A", a[s][0]).site("site-B", a[s][1]).write();
    runs.push_back(read_run_folder(r.dir.string()));
  }
  FakeRun other(dir.path() / "q", 1, "name: q\nseed: {SEED}\ntraining: {lr: 0.2}\n");
  other.site("site-A", 0.9).site("site-B", 0.8).write();
  runs.push_back(read_run_folder(other.dir.string()));

  const auto groups = group_runs(runs);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].runs, (std::vector<size_t>{0, 1, 2}));
  EXPECT_EQ(groups[0].seeds, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(groups[0].label, (dir.path() / "p").string() + " (3 seeds: 1, 2, 3)");
  EXPECT_EQ(groups[1].label, other.dir.string());

  const CompareTable t = compare_table(runs, groups, "accuracy", false);
  ASSERT_EQ(t.sites, (std::vector<std::string>{"site-A", "site-B"}));
  ASSERT_EQ(t.rows.size(), 2u);
  EXPECT_NEAR(t.rows[0].sites[0].mean, 0.74, 1e-12);
  EXPECT_NEAR(t.rows[0].sites[0].sd, 0.04, 1e-12);
  EXPECT_NEAR(t.rows[0].sites[1].mean, 0.50, 1e-12);
  EXPECT_NEAR(t.rows[0].sites[1].sd, 0.10, 1e-12);
  // Per-run means 0.65, 0.62, 0.59; per-run worst 0.60, 0.50, 0.40.
  EXPECT_NEAR(t.rows[0].mean.mean, 0.62, 1e-12);
  EXPECT_NEAR(t.rows[0].mean.sd, 0.03, 1e-12);
  EXPECT_NEAR(t.rows[0].worst.mean, 0.50, 1e-12);
  EXPECT_NEAR(t.rows[0].worst.sd, 0.10, 1e-12);
  EXPECT_EQ(t.rows[1].mean.n, 1);
  EXPECT_NEAR(t.rows[1].mean.mean, 0.85, 1e-12);
  const std::string text = format_compare_table(t);
  EXPECT_NE(text.find("0.740 \xC2\xB1 0.040"), std::string::npos) << text;
  EXPECT_NE(text.find("0.620 \xC2\xB1 0.030"), std::string::npos) << text;
  EXPECT_NE(text.find("0.850"), std::string::npos) << text;

  EXPECT_EQ(compare_metrics(runs, ""), (std::vector<std::string>{"accuracy"}));
  EXPECT_NE(testkit::error_of([&] {
              compare_metrics(runs, "dice");
            }).find("has no metric 'dice' (it has: accuracy)"),
            std::string::npos);
}

TEST(ReportRunFolder, ClearErrorsForWhatIsNotARun) {
  testkit::TempDir dir;
  EXPECT_NE(testkit::error_of([&] {
              read_run_folder(dir.str() + "/nope");
            }).find("is not a run folder: it does not exist"),
            std::string::npos);
  EXPECT_NE(testkit::error_of([&] {
              read_run_folder(dir.str());
            }).find("no pipeline.yaml and no metrics.jsonl"),
            std::string::npos);
  std::ofstream(dir.path() / "pipeline.yaml") << "name: x\n";
  std::ofstream(dir.path() / "metrics.jsonl") << "{\"round\":1,\"site\":\"a\"}\n{\"round\":2,\n";
  EXPECT_NE(testkit::error_of([&] {
              read_run_folder(dir.str());
            }).find("metrics.jsonl:2: not a JSON object"),
            std::string::npos);
}

TEST(ReportRunFolder, UnfinishedRunTakesTheLastEvaluation) {
  testkit::TempDir dir;
  std::ofstream(dir.path() / "pipeline.yaml") << "name: x\nseed: 5\n";
  std::ofstream(dir.path() / "metrics.jsonl")
      << R"({"round":1,"site":"a","held_out":false,"train_loss":0.7,"num_samples":10,"metrics":{"accuracy":0.5}})"
      << "\n"
      << R"({"round":2,"site":"a","held_out":false,"train_loss":0.6,"num_samples":10,"metrics":{"accuracy":0.75}})"
      << "\n"
      << R"({"round":2,"site":"b","held_out":true,"metrics":{"accuracy":0.25}})"
      << "\n";
  const RunFolder run = read_run_folder(dir.str());
  const FinalResults r = final_results(run);
  EXPECT_FALSE(r.finished);
  ASSERT_EQ(r.sites.size(), 2u);
  EXPECT_EQ(r.sites[0].global.at("accuracy"), 0.75);
  EXPECT_TRUE(r.sites[1].held_out);
  EXPECT_EQ(site_mean(r, "accuracy", false), 0.75);  // held-out sites are not averaged
  EXPECT_EQ(run_seed(run), 5);
  const std::string html = render_run_report(run, "/* chart */");
  EXPECT_NE(html.find("has not finished"), std::string::npos);
}

TEST(ReportRunFolder, MissingChartJsIsAClearError) {
  testkit::TempDir dir;
  setenv("CONCORD_CHART_JS", (dir.str() + "/none.js").c_str(), 1);
  const std::string e = testkit::error_of([] { chart_js(); });
  unsetenv("CONCORD_CHART_JS");
  EXPECT_NE(e.find(dir.str() + "/none.js was not found"), std::string::npos) << e;
  EXPECT_NE(e.find("libjs-chart.js"), std::string::npos) << e;
}

TEST(ReportRunFolder, HostileNamesReachThePageOnlyEscaped) {
  testkit::TempDir dir;
  const std::string evil = testing_report::kHostileName;
  testing_report::FakeRun r(dir.path() / "run", 1,
                            "name: \"" + std::string("x") + "\"\nseed: {SEED}\n");
  r.site(evil, 0.5).site("site-B", 0.25);
  r.notes["scanner." + evil] = {{"gamma", 1.5}, {"<b>param</b>", "</pre><script>"}};
  r.write();
  // The pipeline text and a figure name come from files too.
  std::ofstream(r.dir / "pipeline.yaml", std::ios::app) << "# </pre><script>alert(2)</script>\n";
  const std::string html = render_run_report(read_run_folder(r.dir.string()), "/* chart */");
  EXPECT_EQ(html.find("<img src=x"), std::string::npos);
  EXPECT_EQ(html.find("<script>alert"), std::string::npos);
  EXPECT_EQ(html.find("</pre><script>"), std::string::npos);
  EXPECT_EQ(html.find("<b>param"), std::string::npos);
  EXPECT_NE(html.find(html_escape(evil)), std::string::npos);  // shown, as text
  EXPECT_THROW(render_run_report(read_run_folder(r.dir.string()), "x = '</script>';"), Error);
}

TEST(ReportEscape, HarmonizeReportEscapesFileNamesAndCauses) {
  const std::string evil = testing_report::kHostileName;
  const json rep{
      {"method", evil},
      {"written", 3},
      {"failed", {evil + "/a.nii.gz: cannot read"}},
      {"failure_causes", {{{"cause", "<i>bad</i>"}, {"count", 1}, {"examples", {evil}}}}},
      {"ignored", {"<svg onload=x>"}}};
  const std::string html = render_harmonize_report(rep, "", "/* chart */");
  EXPECT_EQ(html.find("<img src=x"), std::string::npos);
  EXPECT_EQ(html.find("<script>window"), std::string::npos);
  EXPECT_EQ(html.find("<i>bad"), std::string::npos);
  EXPECT_EQ(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find(html_escape(evil) + "/a.nii.gz: cannot read"), std::string::npos);
  EXPECT_NE(html.find("No image was harmonized"), std::string::npos);  // no site_shift
  EXPECT_EQ(html.find("data:image/png"), std::string::npos);           // no montage
}
