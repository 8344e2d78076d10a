// End-to-end tests of `concord harmonize`: they run the built `concord` binary on a small tree
// of NIfTI, PNG and DICOM inputs written here.
//
// Needs the targets concord-cli and the harmonizer plugins (identity, zscore,
// histogram-match, amplitude) built in the same build folder; fails with a clear message when
// they are missing.
#include <concord/dataset.h>
#include <concord/engine.h>
#include <concord/harmonizer.h>
#include <concord/image_io.h>
#include <concord/pipeline.h>

#include "testing.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <set>

namespace fs = std::filesystem;
using namespace concord;

namespace {

struct Result {
  int code;
  std::string out;
};

Result run_concord(const std::string& args) {
  Result r;
  r.code = testkit::run_command(testkit::concord_exe() + " " + args, &r.out);
  return r;
}

// A clear failure when the binary or a plugin this test drives was not built.
bool have_tools(const std::vector<std::string>& plugins) {
  if (!fs::exists(testkit::concord_exe())) {
    ADD_FAILURE() << testkit::concord_exe()
                  << " is missing: build the target concord-cli before test_harmonize";
    return false;
  }
  for (const auto& p : plugins) {
    const fs::path lib = fs::path(testkit::build_dir()) / "lib/concord/plugins" /
                         ("libconcord-harmonizer-" + p + ".so");
    if (!fs::exists(lib)) {
      ADD_FAILURE() << lib << " is missing: build the target concord-harmonizer-" << p
                    << " before test_harmonize";
      return false;
    }
  }
  return true;
}

Image volume(uint64_t seed, float scale, float offset) {
  Image im(3, 1, {16, 14, 6});
  im.pixel_type = PixelType::I16;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0, 1);
  for (int64_t z = 0; z < 6; ++z)
    for (int64_t y = 0; y < 14; ++y)
      for (int64_t x = 0; x < 16; ++x)
        im.at(x, y, z) = std::round(offset + scale * (float(x + y) / 30.f + 0.2f * n(rng)));
  im.geometry.spacing = {0.9, 1.1, 3.0};
  im.geometry.origin = {-20, 15.5, 7};
  return im;
}

Image picture(uint64_t seed, PixelType t, float scale) {
  Image im(2, 1, {40, 32, 1});
  im.pixel_type = t;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  for (int64_t y = 0; y < 32; ++y)
    for (int64_t x = 0; x < 40; ++x)
      im.at(x, y) = std::round(scale * (0.3f + 0.5f * x / 40.f + 0.2f * u(rng)));
  return im;
}

// in/siteA: NIfTI, 8-bit PNG, DICOM series, a mask; in/siteB: NIfTI, 16-bit PNG, DICOM series,
// a corrupt NIfTI. The two sites differ in intensity scale.
struct Tree {
  testkit::TempDir tmp;
  fs::path in = tmp.path() / "in";
  Tree() {
    for (const char* s : {"siteA", "siteB"}) fs::create_directories(in / s);
    fs::create_directories(in / "siteA" / "mask");
    write_image(volume(1, 300, 100), (in / "siteA/vol1.nii.gz").string());
    write_image(volume(2, 900, 400), (in / "siteB/vol2.nii.gz").string());
    write_image(picture(3, PixelType::U8, 120), (in / "siteA/img1.png").string());
    write_image(picture(4, PixelType::U16, 20000), (in / "siteB/img2.png").string());
    Image dicom = volume(5, 250, 50);
    dicom.meta["0010|0010"] = "Harmonize^Test";
    write_image(dicom, (in / "siteA/ct").string());
    Image dicom_b = volume(6, 700, 300);
    dicom_b.meta["0010|0010"] = "Harmonize^TestB";
    write_image(dicom_b, (in / "siteB/ct").string());
    Image mask = picture(7, PixelType::U8, 1);
    write_image(mask, (in / "siteA/mask/img1.png").string());
    std::ofstream(in / "siteB/bad.nii.gz") << "not a NIfTI file at all";
  }
  std::string str(const char* rel) const { return (tmp.path() / rel).string(); }
};

fs::file_time_type mtime(const fs::path& p) {
  return fs::last_write_time(p);
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST(Harmonize, FitApplyKeepsFormatsGeometryAndReportsCorruptInput) {
  if (!have_tools({"identity"})) return;
  Tree t;
  const std::string stats = t.str("identity.stats");
  Result fit = run_concord("harmonize fit --method identity " + t.in.string() + " --stats " +
                           stats + " -j 2 --no-progress");
  EXPECT_NE(fit.code, 0) << "a corrupt input must make fit exit non-zero\n" << fit.out;
  EXPECT_NE(fit.out.find("bad.nii.gz"), std::string::npos) << fit.out;
  ASSERT_TRUE(fs::exists(stats)) << "fit must still write statistics from the readable inputs\n"
                                 << fit.out;

  const fs::path out = t.tmp.path() / "out";
  Result ap = run_concord("harmonize apply --stats " + stats + " " + t.in.string() + " --out " +
                          out.string() + " -j 2 --no-progress --preview " + t.str("preview.png") +
                          " --report " + t.str("report.json"));
  EXPECT_NE(ap.code, 0) << ap.out;
  EXPECT_NE(ap.out.find("bad.nii.gz"), std::string::npos) << ap.out;
  EXPECT_NE(ap.out.find("1 of "), std::string::npos) << "summary lists the failure\n" << ap.out;

  // Every other input was written, mirroring the tree, in its own format and pixel type.
  Image v = read_image((out / "siteA/vol1.nii.gz").string());
  Image v0 = read_image((t.in / "siteA/vol1.nii.gz").string());
  EXPECT_EQ(v.pixel_type, PixelType::I16);
  EXPECT_EQ(v.size, v0.size);
  EXPECT_EQ(v.data, v0.data);  // identity
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(v.geometry.spacing[i], v0.geometry.spacing[i], 1e-5);
    EXPECT_NEAR(v.geometry.origin[i], v0.geometry.origin[i], 1e-4);
  }
  EXPECT_EQ(read_image((out / "siteA/img1.png").string()).pixel_type, PixelType::U8);
  EXPECT_EQ(read_image((out / "siteB/img2.png").string()).pixel_type, PixelType::U16);
  ASSERT_TRUE(is_dicom_dir((out / "siteA/ct").string()));
  Image d = read_image((out / "siteA/ct").string());
  Image d0 = read_image((t.in / "siteA/ct").string());
  EXPECT_EQ(d.data, d0.data);
  EXPECT_EQ(d.pixel_type, PixelType::I16);
  EXPECT_NE(d.meta["0010|0010"].find("Harmonize^Test"), std::string::npos);
  // Pixel data unchanged (identity): the series keeps its UID.
  EXPECT_EQ(d.meta["0020|000e"], d0.meta["0020|000e"]);
  // The mask is copied byte for byte, never harmonized.
  EXPECT_EQ(slurp(out / "siteA/mask/img1.png"), slurp(t.in / "siteA/mask/img1.png"));
  EXPECT_FALSE(fs::exists(out / "siteB/bad.nii.gz"));

  // Preview and report.
  Image preview = read_image(t.str("preview.png"));
  EXPECT_EQ(preview.dim, 2);
  EXPECT_GT(preview.size[1], 2 * 128);  // two site rows
  auto report = nlohmann::json::parse(slurp(t.str("report.json")));
  EXPECT_EQ(report["written"], 6);
  EXPECT_EQ(report["masks_copied"], 1);
  ASSERT_EQ(report["failed"].size(), 1u);
  EXPECT_NE(report["failed"][0].get<std::string>().find("bad.nii.gz"), std::string::npos);
  EXPECT_EQ(report["site_shift"]["sites"], 2);
  EXPECT_NE(ap.out.find("site shift over 2 sites"), std::string::npos) << ap.out;
}

TEST(Harmonize, ResumeSkipsCompleteOutputs) {
  if (!have_tools({"identity"})) return;
  Tree t;
  fs::remove(t.in / "siteB/bad.nii.gz");
  const fs::path out = t.tmp.path() / "out";
  const std::string cmd = "harmonize apply --method identity " + t.in.string() + " --out " +
                          out.string() + " -j 2 --no-progress";
  Result first = run_concord(cmd);
  ASSERT_EQ(first.code, 0) << first.out;
  const fs::path a = out / "siteA/vol1.nii.gz", b = out / "siteB/img2.png";
  const auto ta = mtime(a), tb = mtime(b);
  fs::remove(b);
  Result second = run_concord(cmd);
  ASSERT_EQ(second.code, 0) << second.out;
  EXPECT_EQ(mtime(a), ta) << "a complete output was rewritten";
  ASSERT_TRUE(fs::exists(b)) << "a missing output was not redone";
  EXPECT_NE(second.out.find("1 written"), std::string::npos) << second.out;
  EXPECT_NE(second.out.find("6 already complete"), std::string::npos) << second.out;
  (void)tb;
  // No temporary file or folder is left in the output tree.
  for (const auto& e : fs::recursive_directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().find("concord-tmp"), std::string::npos) << e.path();
}

TEST(Harmonize, StatsOfAnotherMethodAndBadArgumentsAreRefused) {
  if (!have_tools({"identity", "zscore"})) return;
  Tree t;
  fs::remove(t.in / "siteB/bad.nii.gz");
  const std::string stats = t.str("identity.stats");
  ASSERT_EQ(run_concord("harmonize fit --method identity " + t.in.string() + " --stats " + stats +
                        " --no-progress")
                .code,
            0);
  Result r = run_concord("harmonize apply --method zscore --stats " + stats + " " + t.in.string() +
                         " --out " + t.str("out") + " --no-progress");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("'identity'"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("zscore"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(t.str("out/siteA/vol1.nii.gz")));

  Result bad = run_concord("harmonize fit --method identity --arg nope=1 " + t.in.string() +
                           " --stats " + t.str("x.stats") + " --no-progress");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("harmonizer 'identity' has no argument 'nope'"), std::string::npos)
      << bad.out;
  Result unknown = run_concord("harmonize fit --method idenity " + t.in.string() + " --stats " +
                               t.str("x.stats") + " --no-progress");
  EXPECT_NE(unknown.code, 0);
  EXPECT_NE(unknown.out.find("identity"), std::string::npos) << "did-you-mean\n" << unknown.out;
}

TEST(Harmonize, ChangingMethodWritesFloatAndRenewsDicomUids) {
  if (!have_tools({"zscore"})) return;
  Tree t;
  fs::remove(t.in / "siteB/bad.nii.gz");
  // zscore's output cannot be stored in PNG's integers (HarmonizePixelType tests that).
  fs::remove(t.in / "siteA/img1.png");
  fs::remove(t.in / "siteB/img2.png");
  const fs::path out = t.tmp.path() / "out";
  Result r = run_concord("harmonize apply --method zscore " + t.in.string() + " --out " +
                         out.string() + " --pixel-type float32 -j 2 --no-progress");
  ASSERT_EQ(r.code, 0) << r.out;
  Image v = read_image((out / "siteB/vol2.nii.gz").string());
  EXPECT_EQ(v.pixel_type, PixelType::F32);
  Image v0 = read_image((t.in / "siteB/vol2.nii.gz").string());
  EXPECT_NE(v.data, v0.data);
  Image d = read_image((out / "siteB/ct").string());
  Image d0 = read_image((t.in / "siteB/ct").string());
  EXPECT_NE(d.meta["0020|000e"], d0.meta["0020|000e"]) << "pixel data changed: new series UID";
  EXPECT_NE(d.meta["0010|0010"].find("Harmonize^TestB"), std::string::npos);
  EXPECT_EQ(d.size, d0.size);
  // A second run into the same folder with other statistics is refused (no silent mixing).
  Result again = run_concord("harmonize apply --method identity " + t.in.string() + " --out " +
                             out.string() + " --no-progress");
  EXPECT_NE(again.code, 0);
  EXPECT_NE(again.out.find("different harmonization"), std::string::npos) << again.out;
}

// Killed mid-run (SIGKILL), the output tree holds only complete files; a rerun finishes the
// rest and clears the temporaries the killed run left.
TEST(Harmonize, KilledRunLeavesOnlyCompleteOutputsAndResumes) {
  if (!have_tools({"identity"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in", out = tmp.path() / "out";
  for (int i = 0; i < 24; ++i) {
    Image v = volume(uint64_t(100 + i), 400, 100);
    Image big(3, 1, {64, 64, 48});
    big.pixel_type = PixelType::I16;
    for (size_t k = 0; k < big.data.size(); ++k) big.data[k] = v.data[k % v.data.size()] + float(i);
    write_image(
        big, (in / ("s" + std::to_string(i % 2)) / ("v" + std::to_string(i) + ".nii.gz")).string());
  }
  const std::string cmd = "harmonize apply --method identity " + in.string() + " --out " +
                          out.string() + " -j 2 --no-progress";
  // Kill it once a couple of outputs exist, i.e. while it is writing the others.
  testkit::run_command("sh -c '" + testkit::concord_exe() + " " + cmd +
                       " & pid=$!; i=0; while [ $i -lt 400 ]; do "
                       "[ $(find " +
                       out.string() +
                       " -name \"*.gz\" | wc -l) -ge 2 ] && break; "
                       "sleep 0.02; i=$((i+1)); done; kill -9 $pid; wait $pid'");
  size_t complete = 0;
  for (const auto& e : fs::recursive_directory_iterator(out)) {
    if (!e.is_regular_file() || e.path().extension() != ".gz") continue;
    // Temporaries of the killed run (hidden scratch folders) are not outputs.
    if (e.path().string().find("concord-tmp") != std::string::npos) continue;
    const std::string rel = e.path().lexically_relative(out).string();
    Image a = read_image(e.path().string());  // throws on a partial file
    EXPECT_EQ(a.data, read_image((in / rel).string()).data) << rel;
    ++complete;
  }
  std::cout << "killed run left " << complete << " of 24 outputs, all complete\n";
  Result rerun = run_concord(cmd);
  ASSERT_EQ(rerun.code, 0) << rerun.out;
  EXPECT_NE(rerun.out.find(std::to_string(complete) + " already complete"), std::string::npos)
      << rerun.out;
  size_t files = 0;
  for (const auto& e : fs::recursive_directory_iterator(out)) {
    EXPECT_EQ(e.path().filename().string().find("tmp-"), std::string::npos) << e.path();
    files += e.is_regular_file() && e.path().extension() == ".gz";
  }
  EXPECT_EQ(files, 24u);
}

// The acceptance check on real data: harmonization lowers the site shift of the six prostate
// sites (histogram distance for histogram-match, spectrum distance for amplitude).
TEST(Harmonize, RealProstateSitesShiftDecreases) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  if (!have_tools({"histogram-match", "amplitude"})) return;
  testkit::TempDir tmp;
  const std::string data = testkit::shared_data() + "/multisite-prostate";
  for (const char* method : {"histogram-match", "amplitude"}) {
    SCOPED_TRACE(method);
    const std::string rep = tmp.str() + "/" + method + ".json";
    // amplitude over the whole band (beta 1, HarmoFL), where the spectra must come together.
    const std::string arg = std::string(method) == "amplitude" ? " --arg beta=1" : "";
    Result r = run_concord(std::string("harmonize apply --method ") + method + arg + " " + data +
                           " --out " + tmp.str() + "/" + method + " --pixel-type float32 " +
                           "--no-progress -j 2 --report " + rep);
    ASSERT_EQ(r.code, 0) << r.out;
    auto j = nlohmann::json::parse(slurp(rep));
    EXPECT_EQ(j["site_shift"]["sites"], 6);
    EXPECT_EQ(j["masks_copied"], 12);
    const auto& s = j["site_shift"];
    if (std::string(method) == "histogram-match")
      EXPECT_LT(s["histogram_after"].get<double>(), s["histogram_before"].get<double>()) << r.out;
    else
      EXPECT_LT(s["spectrum_after"].get<double>(), s["spectrum_before"].get<double>()) << r.out;
  }
}

// ---------------------------------------------------------------------------------------------
// `--pipeline P --sites`: a pipeline's sites as the inputs.

namespace {

// Three small brainsim sites, site-C held out (it does not fit, but is harmonized); zscore
// (site-local: no statistics) first, then histogram-match fitted on what zscore left.
const char* kSitesPipeline =
    "name: sites-test\nseed: 7\n"
    "data:\n  dataset: {type: brainsim, args: {sites: 3, train_per_site: 6, test_per_site: 3, "
    "size: 24, task: segmentation, shift: 1.5}}\n"
    "model: {type: cnn}\n"
    "harmonizers:\n  - {type: zscore}\n  - {type: histogram-match, args: {quantiles: 21}}\n"
    "evaluation: {held_out: [site-C]}\n";

PipelineConfig sites_config(const std::string& text) {
  return parse_pipeline(text, "sites-test.yaml", {}, testkit::builtin_registry());
}

// The federated fit phase written out by hand on an in-memory copy of the dataset: each fitting
// site's fit_site over its training images, combine, then set_statistics + apply at every site.
// Returns the global statistics of each harmonizer; `fed` ends harmonized.
std::vector<Stats> fit_by_hand(const PipelineConfig& c, Federation& fed) {
  const Registry& reg = testkit::builtin_registry();
  std::vector<Stats> out;
  for (const auto& hc : c.harmonizers) {
    auto make = [&](const std::string& who) {
      return reg.create<Harmonizer>(Kind::Harmonizer, hc.type, hc.args, {c.seed, who});
    };
    Stats global;
    if (make("coordinator")->needs_fit()) {
      std::vector<Stats> parts;
      for (const auto& site : fed.sites) {
        if (site.name == "site-C") continue;  // held out
        Stats s = make(site.name)->fit_site([&](const ImageVisitor& visit) {
          for (const auto& smp : site.train) visit(smp.image);
        });
        s.site = site.name;
        parts.push_back(std::move(s));
      }
      global = make("coordinator")->combine(parts);
    }
    for (auto& site : fed.sites) {
      auto h = make(site.name);
      h->set_statistics(global, site.name);
      for (auto* split : {&site.train, &site.test})
        for (auto& smp : *split) h->apply(smp.image);
    }
    out.push_back(global);
  }
  return out;
}

Federation brainsim_of(const PipelineConfig& c) {
  auto ds = testkit::builtin_registry().create<Dataset>(Kind::Dataset, c.data.dataset.type,
                                                        c.data.dataset.args);
  return ds->load(DataRequest{c.seed, {}});
}

void expect_same_stats(const Stats& a, const Stats& b) {
  EXPECT_DOUBLE_EQ(a.weight, b.weight);
  EXPECT_EQ(a.scalars, b.scalars);
  ASSERT_EQ(a.arrays.size(), b.arrays.size());
  for (const auto& [name, x] : a.arrays) {
    ASSERT_TRUE(b.arrays.count(name)) << name;
    const Array& y = b.arrays.at(name);
    EXPECT_EQ(x.shape(), y.shape()) << name;
    ASSERT_EQ(x.nbytes(), y.nbytes()) << name;
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << name << " differs";
  }
}

void expect_near_image(const Image& a, const Image& b, const std::string& what) {
  ASSERT_EQ(a.data.size(), b.data.size()) << what;
  EXPECT_EQ(a.size, b.size) << what;
  double worst = 0;
  for (size_t i = 0; i < a.data.size(); ++i)
    worst = std::max(worst, double(std::abs(a.data[i] - b.data[i])));
  EXPECT_LE(worst, 1e-6) << what;
}

}  // namespace

TEST(HarmonizeSites, ExperimentHarmonizeIsTheFederatedFitPhase) {
  const PipelineConfig c = sites_config(kSitesPipeline);
  Federation expected = brainsim_of(c);
  const std::vector<Stats> want = fit_by_hand(c, expected);
  ASSERT_FALSE(want[1].arrays.empty()) << "histogram-match must have fitted statistics";

  Experiment exp(c, testkit::builtin_registry());
  HarmonizeOptions o;
  o.keep_unharmonized = true;
  int calls = 0, total = 0;
  o.on_progress = [&](const std::string&, int done, int t) { calls = done, total = t; };
  HarmonizeResult r = exp.harmonize(o);
  ASSERT_EQ(r.stats.size(), 2u);
  EXPECT_TRUE(r.stats[0].arrays.empty()) << "zscore is site-local";
  expect_same_stats(r.stats[1], want[1]);
  EXPECT_EQ(r.fitted_sites, (std::vector<std::string>{"site-A", "site-B"}));
  EXPECT_EQ(r.fitted_images, 12);
  EXPECT_EQ(calls, 2);  // histogram-match at the two fitting sites
  EXPECT_EQ(total, 2);
  ASSERT_EQ(r.federation.sites.size(), 3u);
  ASSERT_TRUE(r.unharmonized);
  const Federation raw = brainsim_of(c);
  for (size_t k = 0; k < 3; ++k) {
    const auto& got = r.federation.sites[k];
    ASSERT_EQ(got.test.size(), 3u);
    for (size_t i = 0; i < got.test.size(); ++i) {
      expect_near_image(got.test[i].image, expected.sites[k].test[i].image, got.test[i].id);
      EXPECT_EQ(r.unharmonized->sites[k].test[i].image.data, raw.sites[k].test[i].image.data);
    }
  }

  // Given statistics replace the last fit; `last` stops the phase early.
  Stats fake = want[1];
  HarmonizeOptions given;
  given.last = 1;
  given.last_stats = fake;
  HarmonizeResult g = Experiment(c, testkit::builtin_registry()).harmonize(given);
  expect_same_stats(g.stats[1], want[1]);
  HarmonizeOptions first;
  first.last = 0;
  EXPECT_EQ(Experiment(c, testkit::builtin_registry()).harmonize(first).stats.size(), 1u);
  first.last = 2;
  EXPECT_NE(testkit::error_of([&] {
              Experiment(c, testkit::builtin_registry()).harmonize(first);
            }).find("has 2 harmonizer(s)"),
            std::string::npos);
}

TEST(HarmonizeSites, FitAndApplyFromAPipelinesSites) {
  if (!have_tools({"zscore", "histogram-match"})) return;
  testkit::TempDir tmp;
  const std::string pipe = tmp.str() + "/p.yaml";
  std::ofstream(pipe) << kSitesPipeline;
  const PipelineConfig c = sites_config(kSitesPipeline);
  Federation expected = brainsim_of(c);
  const std::vector<Stats> want = fit_by_hand(c, expected);

  // fit: harmonizers[1]'s global statistics, fitted after harmonizers[0] was applied.
  const std::string stats = tmp.str() + "/hm.stats";
  Result fit = run_concord("harmonize fit --no-progress --pipeline " + pipe +
                           " --sites --harmonizer 1 --stats " + stats);
  ASSERT_EQ(fit.code, 0) << fit.out;
  std::string method;
  expect_same_stats(load_stats(stats, &method), want[1]);
  EXPECT_EQ(method, "histogram-match");
  auto side = nlohmann::json::parse(slurp(stats + ".json"));
  EXPECT_EQ(side["images"], 12);
  EXPECT_EQ(side["sites"], nlohmann::json({"site-A", "site-B"}));
  EXPECT_NE(slurp(stats + ".json").find("quantiles=21"), std::string::npos);

  // apply with the saved statistics: float32 NIfTI per site and split, masks, a csv manifest.
  const fs::path out = tmp.path() / "out";
  Result ap =
      run_concord("harmonize apply --no-progress -j 2 --pipeline " + pipe +
                  " --sites --harmonizer 1 --stats " + stats + " --out " + out.string() +
                  " --report " + tmp.str() + "/rep.json --preview " + tmp.str() + "/prev.png");
  ASSERT_EQ(ap.code, 0) << ap.out;
  EXPECT_NE(ap.out.find("27 written"), std::string::npos) << ap.out;
  EXPECT_NE(ap.out.find("site shift over 3 sites"), std::string::npos) << ap.out;
  EXPECT_TRUE(fs::exists(tmp.str() + "/prev.png"));
  Image first = read_image((out / "site-A/train/0000.nii.gz").string());
  EXPECT_EQ(first.dim, 2);
  EXPECT_EQ(first.pixel_type, PixelType::F32);
  expect_near_image(first, expected.sites[0].train[0].image, "site-A/train/0000");
  ASSERT_TRUE(fs::exists(out / "site-C/test/masks/0002.nii.gz"));

  // The manifest loads with the csv dataset: same sites, samples, values and masks.
  const Registry& reg = testkit::builtin_registry();
  auto csv = reg.create<Dataset>(Kind::Dataset, "csv",
                                 make_args("csv", reg.get(Kind::Dataset, "csv").args,
                                           {{"file", make_value((out / "manifest.csv").string())},
                                            {"normalize", make_value("none")}}));
  Federation back = csv->load(DataRequest{});
  EXPECT_EQ(back.task, Task::Segmentation);
  ASSERT_EQ(back.sites.size(), expected.sites.size());
  for (size_t k = 0; k < back.sites.size(); ++k) {
    const SiteData &b = back.sites[k], &e = expected.sites[k];
    EXPECT_EQ(b.name, e.name);
    ASSERT_EQ(b.train.size(), e.train.size()) << b.name;
    ASSERT_EQ(b.test.size(), e.test.size()) << b.name;
    for (size_t i = 0; i < b.test.size(); ++i) {
      expect_near_image(b.test[i].image, e.test[i].image, b.name + " test " + e.test[i].id);
      ASSERT_TRUE(b.test[i].mask && e.test[i].mask);
      EXPECT_EQ(b.test[i].mask->data, e.test[i].mask->data) << e.test[i].id;
    }
  }

  // Fitting in place gives the same files; a rerun resumes; the statistics serve file inputs too.
  const fs::path again = tmp.path() / "again";
  Result fly = run_concord("harmonize apply --no-progress --pipeline " + pipe +
                           " --sites --harmonizer 1 --out " + again.string());
  ASSERT_EQ(fly.code, 0) << fly.out;
  EXPECT_EQ(read_image((again / "site-B/test/0001.nii.gz").string()).data,
            read_image((out / "site-B/test/0001.nii.gz").string()).data);
  Result resume = run_concord("harmonize apply --no-progress --pipeline " + pipe +
                              " --sites --harmonizer 1 --out " + again.string());
  EXPECT_NE(resume.out.find("27 already complete"), std::string::npos) << resume.out;
  Result files = run_concord("harmonize apply --no-progress --stats " + stats + " " + out.string() +
                             " --out " + tmp.str() + "/files");
  EXPECT_EQ(files.code, 0) << files.out;
}

TEST(HarmonizeSites, WrongCombinationsAreRefused) {
  if (!have_tools({"zscore"})) return;
  testkit::TempDir tmp;
  const std::string pipe = tmp.str() + "/p.yaml", none = tmp.str() + "/none.yaml";
  std::ofstream(pipe) << kSitesPipeline;
  std::ofstream(none) << "data: {dataset: {type: brainsim}}\nmodel: {type: cnn}\n";
  const std::string stats = " --stats " + tmp.str() + "/x.stats --no-progress";
  struct Case {
    std::string args, message;
  } cases[] = {
      {"fit --sites" + stats, "give --pipeline FILE"},
      {"fit --pipeline " + pipe + " --sites " + tmp.str() + stats, "give no INPUTS"},
      {"fit --pipeline " + pipe + " --sites --harmonizer 2" + stats,
       "--harmonizer 2 is out of range"},
      {"fit --pipeline " + pipe + " --sites --harmonizer -1" + stats, "out of range"},
      {"fit --pipeline " + none + " --sites" + stats, "the pipeline has no harmonizers"},
      {"fit --pipeline " + pipe + " --sites --harmonizer 0" + stats, "needs no statistics"},
      {"fit --pipeline " + pipe + " --sites --harmonizer 1 --arg quantiles=2" + stats,
       "'quantiles' = 2 is out of range"},
      {"fit" + stats, "no inputs"},
      {"apply --pipeline " + pipe + " --sites --out " + tmp.str() + "/o --seed 3 --no-progress",
       "--set seed=N"},
  };
  for (const auto& c : cases) {
    Result r = run_concord("harmonize " + c.args);
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
  }
  EXPECT_FALSE(fs::exists(tmp.str() + "/x.stats"));
}

// ---------------------------------------------------------------------------------------------
// Issue 8: every input is written or listed as failed, and the exit code says which.

namespace {

// No temporary (scratch folder, partial file) is left anywhere below `out`.
void expect_no_temporaries(const fs::path& out) {
  if (!fs::exists(out)) return;
  for (const auto& e : fs::recursive_directory_iterator(out)) {
    const std::string name = e.path().filename().string();
    EXPECT_EQ(name.find("concord-tmp"), std::string::npos) << e.path();
    EXPECT_EQ(name.find(".tmp-"), std::string::npos) << e.path();
  }
}

// Every image output below `out` (files, and DICOM folders as one).
size_t count_outputs(const fs::path& out) {
  size_t n = 0;
  for (auto it = fs::recursive_directory_iterator(out); it != fs::recursive_directory_iterator();
       ++it) {
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_directory() && is_dicom_dir(it->path().string())) {
      it.disable_recursion_pending();
      ++n;
    } else if (it->is_regular_file() && is_image_file(it->path().string())) {
      ++n;
    }
  }
  return n;
}

nlohmann::json read_json(const fs::path& p) {
  return nlohmann::json::parse(slurp(p));
}

}  // namespace

// A .dcm file used to make its whole folder one DICOM series: the NIfTI beside it and the
// subfolder below it were neither written nor reported (exit 0).
TEST(HarmonizeInputs, DicomFolderWithOtherImagesKeepsEveryImage) {
  if (!have_tools({"identity"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in", mixed = in / "siteA" / "mixed";
  Image ct = volume(5, 250, 50);
  write_image(ct, mixed.string());  // a DICOM series in mixed/
  ASSERT_TRUE(is_dicom_dir(mixed.string()));
  write_image(volume(1, 300, 100), (mixed / "vol.nii.gz").string());
  write_image(picture(3, PixelType::U8, 120), (mixed / "sub" / "img.png").string());
  std::ofstream(mixed / "notes.txt") << "not an image";
  write_image(volume(2, 900, 400), (in / "siteB" / "v.nii.gz").string());
  const fs::path out = tmp.path() / "out";
  Result r = run_concord("harmonize apply --method identity " + in.string() + " --out " +
                         out.string() + " --no-progress --report " + tmp.str() + "/r.json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("4 images"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1 other files ignored"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(out / "siteA/mixed/vol.nii.gz"));
  EXPECT_TRUE(fs::exists(out / "siteA/mixed/sub/img.png"));
  ASSERT_TRUE(is_dicom_dir((out / "siteA/mixed/dicom-series").string()));
  EXPECT_EQ(read_image((out / "siteA/mixed/dicom-series").string()).data,
            read_image(mixed.string()).data);
  EXPECT_EQ(read_json(tmp.path() / "r.json")["written"], 4);
  EXPECT_EQ(read_json(tmp.path() / "r.json")["ignored"],
            nlohmann::json({(mixed / "notes.txt").string()}));
  EXPECT_EQ(count_outputs(out), 4u);

  // Two series in one folder: that folder fails by name, the others are written.
  const fs::path two = in / "siteB" / "two", other = tmp.path() / "other";
  Image ct2 = volume(8, 500, 10);
  ct2.meta["0010|0010"] = "Second^Series";
  write_image(ct, two.string());
  write_image(ct2, other.string());
  for (const auto& e : fs::directory_iterator(other))
    fs::copy_file(e.path(), two / ("b-" + e.path().filename().string()));
  const fs::path out2 = tmp.path() / "out2";
  Result r2 = run_concord("harmonize apply --method identity " + in.string() + " --out " +
                          out2.string() + " --no-progress");
  EXPECT_NE(r2.code, 0) << r2.out;
  EXPECT_NE(r2.out.find(two.string()), std::string::npos) << r2.out;
  EXPECT_NE(r2.out.find("DICOM series"), std::string::npos) << r2.out;
  EXPECT_FALSE(fs::exists(out2 / "siteB/two"));
  EXPECT_EQ(count_outputs(out2), 4u);
  expect_no_temporaries(out2);
}

// Depends on the `readers` change (read_image refuses a DICOM whose PixelData is shorter than
// rows x cols x bits): until it is merged, the truncated series is written and this test fails.
TEST(HarmonizeInputs, TruncatedDicomIsAFailureNotAnOutput) {
  if (!have_tools({"identity"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in";
  write_image(volume(5, 250, 50), (in / "s/ct").string());
  write_image(volume(1, 300, 100), (in / "s/v.nii.gz").string());
  std::vector<fs::path> slices;
  for (const auto& e : fs::directory_iterator(in / "s/ct")) slices.push_back(e.path());
  ASSERT_FALSE(slices.empty());
  std::sort(slices.begin(), slices.end());
  fs::resize_file(slices[2], fs::file_size(slices[2]) - 200);  // PixelData cut short
  const fs::path out = tmp.path() / "out";
  Result r = run_concord("harmonize apply --method identity " + in.string() + " --out " +
                         out.string() + " --no-progress");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find((in / "s/ct").string()), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out / "s/ct"));
  EXPECT_TRUE(fs::exists(out / "s/v.nii.gz"));
  expect_no_temporaries(out);
}

// --out equal to, inside or around an input (also one listed in a manifest) is refused before
// anything is written, naming both paths.
TEST(HarmonizeInputs, OutputFolderOverlappingAnInputIsRefused) {
  if (!have_tools({"identity"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in";
  write_image(volume(1, 300, 100), (in / "a/v1.nii.gz").string());
  write_image(volume(2, 300, 100), (in / "b/v2.nii.gz").string());
  fs::create_directories(tmp.path() / "elsewhere");
  fs::create_symlink(in, tmp.path() / "link");
  const fs::path manifest = tmp.path() / "elsewhere/list.txt";
  std::ofstream(manifest) << (in / "a/v1.nii.gz").string() << "\n";
  struct Case {
    std::string inputs, out, how;
  } cases[] = {
      {in.string(), in.string(), "is the input"},
      {in.string(), (in / "a/out").string(), "lies inside the input"},
      {in.string() + "/", (tmp.path() / "link/new").string(), "lies inside the input"},
      {(in / "a").string(), tmp.path().string(), "contains the input"},
      {manifest.string(), (in / "a").string(), "contains the input"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.inputs + " -> " + c.out);
    Result r = run_concord("harmonize apply --method identity " + c.inputs + " --out " + c.out +
                           " --no-progress");
    EXPECT_NE(r.code, 0) << r.out;
    EXPECT_NE(r.out.find(c.how), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("--out " + c.out), std::string::npos) << r.out;
  }
  EXPECT_EQ(count_outputs(in), 2u) << "nothing may be written into the inputs";
  EXPECT_FALSE(fs::exists(in / "a/out"));
  EXPECT_FALSE(fs::exists(in / ".concord-harmonize.json"));
}

// A rerun into the same --out: an input that changed is redone (the others are kept); new
// statistics (an input added, refitted in place) are refused unless --overwrite.
TEST(HarmonizeResume, ChangedInputsAreRedoneAndChangedStatisticsRefused) {
  if (!have_tools({"identity"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in", out = tmp.path() / "out";
  for (int i = 0; i < 3; ++i)
    write_image(
        volume(uint64_t(i), 300, 100),
        (in / ("s" + std::to_string(i % 2)) / ("v" + std::to_string(i) + ".nii.gz")).string());
  const std::string stats = tmp.str() + "/fixed.stats";
  ASSERT_EQ(run_concord("harmonize fit --method identity " + in.string() + " --stats " + stats +
                        " --no-progress")
                .code,
            0);
  const std::string with_stats = "harmonize apply --stats " + stats + " " + in.string() +
                                 " --out " + out.string() + " --no-progress";
  ASSERT_EQ(run_concord(with_stats).code, 0);
  const auto t0 = mtime(out / "s0/v0.nii.gz");
  // A changed input (same name, other content) is redone; the unchanged ones are not.
  Image changed = volume(77, 50, 5);
  write_image(changed, (in / "s1/v1.nii.gz").string());
  Result again = run_concord(with_stats);
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("1 written, 2 already complete"), std::string::npos) << again.out;
  EXPECT_EQ(read_image((out / "s1/v1.nii.gz").string()).data, changed.data);
  EXPECT_EQ(mtime(out / "s0/v0.nii.gz"), t0);

  // Fitted in place: an input added since changes the statistics.
  const fs::path out2 = tmp.path() / "out2";
  const std::string one_shot = "harmonize apply --method identity " + in.string() + " --out " +
                               out2.string() + " --no-progress";
  ASSERT_EQ(run_concord(one_shot).code, 0);
  EXPECT_NE(run_concord(one_shot).out.find("3 already complete"), std::string::npos);
  write_image(volume(9, 2000, 900), (in / "s0/v9.nii.gz").string());
  Result refit = run_concord(one_shot);
  EXPECT_NE(refit.code, 0) << refit.out;
  EXPECT_NE(refit.out.find("the statistics changed"), std::string::npos) << refit.out;
  EXPECT_FALSE(fs::exists(out2 / "s0/v9.nii.gz"));
  Result redo = run_concord(one_shot + " --overwrite");
  ASSERT_EQ(redo.code, 0) << redo.out;
  EXPECT_NE(redo.out.find("4 written"), std::string::npos) << redo.out;

  // An input that became unreadable is listed as failed, and its old output is gone.
  std::ofstream(in / "s0/v2.nii.gz", std::ios::trunc) << "no longer a NIfTI file";
  Result broken = run_concord(with_stats);
  EXPECT_NE(broken.code, 0) << broken.out;
  EXPECT_NE(broken.out.find("v2.nii.gz"), std::string::npos) << broken.out;
  EXPECT_FALSE(fs::exists(out / "s0/v2.nii.gz"));
  EXPECT_TRUE(fs::exists(out / "s0/v0.nii.gz"));
}

// zscore on int16 with the default --pixel-type keep left 9 distinct values: such a file is
// written as float32 with a warning (keep-strict: it fails; PNG cannot hold float32: it fails).
TEST(HarmonizePixelType, IntegerTypeThatWouldDestroyTheImageIsNotKept) {
  if (!have_tools({"zscore"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in";
  const Image v = volume(1, 300, 100);
  write_image(v, (in / "s/vol.nii.gz").string());
  write_image(picture(3, PixelType::U8, 200), (in / "s/img.png").string());
  const fs::path out = tmp.path() / "out";
  Result r = run_concord("harmonize apply --method zscore " + in.string() + " --out " +
                         out.string() + " --no-progress --report " + tmp.str() + "/r.json");
  EXPECT_NE(r.code, 0) << "the PNG cannot be written without destroying it\n" << r.out;
  EXPECT_NE(r.out.find("written as float32"), std::string::npos) << r.out;
  Image w = read_image((out / "s/vol.nii.gz").string());
  EXPECT_EQ(w.pixel_type, PixelType::F32);
  std::set<float> levels(w.data.begin(), w.data.end());
  EXPECT_GT(levels.size(), 100u) << "the harmonized image keeps its detail";
  EXPECT_FALSE(fs::exists(out / "s/img.png"));
  auto rep = read_json(tmp.path() / "r.json");
  EXPECT_EQ(rep["written_as_float32"], nlohmann::json({"s/vol.nii.gz"}));
  ASSERT_EQ(rep["failed"].size(), 1u);
  EXPECT_NE(rep["failed"][0].get<std::string>().find("img.png"), std::string::npos);
  // float32 cannot help a PNG (it holds integers only): still a failure, not 9 grey levels.
  Result f = run_concord("harmonize apply --method zscore " + in.string() + " --out " + tmp.str() +
                         "/f --pixel-type float32 --no-progress");
  EXPECT_NE(f.code, 0) << f.out;
  EXPECT_NE(f.out.find("img.png"), std::string::npos) << f.out;
  EXPECT_FALSE(fs::exists(tmp.path() / "f/s/img.png"));
  EXPECT_TRUE(fs::exists(tmp.path() / "f/s/vol.nii.gz"));

  fs::remove(in / "s/img.png");
  const fs::path strict = tmp.path() / "strict";
  Result s = run_concord("harmonize apply --method zscore " + in.string() + " --out " +
                         strict.string() + " --pixel-type keep-strict --no-progress");
  EXPECT_NE(s.code, 0) << s.out;
  EXPECT_NE(s.out.find("levels of int16"), std::string::npos) << s.out;
  EXPECT_FALSE(fs::exists(strict / "s/vol.nii.gz"));
  expect_no_temporaries(strict);
}

// A decoder or plugin that crashes the process on one file: that file is listed as failed
// (exit non-zero), every other file is written, the statistics are those of a run without the
// file, and a rerun redoes no good output.
TEST(HarmonizeCrash, CrashingFileIsIsolatedAndTheBatchGoesOn) {
  if (!have_tools({})) return;
  const fs::path lib = fs::path(FIXTURE_HARMONIZER_DIR) / "libfixture_harmonizer_crash.so";
  ASSERT_TRUE(fs::exists(lib)) << lib << " missing: build fixture_harmonizer_crash";
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in", clean = tmp.path() / "clean";
  for (int i = 0; i < 8; ++i) {
    const std::string rel = "s" + std::to_string(i % 2) + "/v" + std::to_string(i) + ".nii.gz";
    Image v = volume(uint64_t(i), 300, 100);
    write_image(v, (in / rel).string());
    write_image(v, (clean / rel).string());
  }
  Image abort_fit = volume(20, 300, 100), segv_apply = volume(21, 300, 100);
  abort_fit.data[0] = 12345;
  segv_apply.data[0] = 23456;
  write_image(abort_fit, (in / "s0/boom.nii.gz").string());
  write_image(segv_apply, (in / "s1/segv.nii.gz").string());
  write_image(segv_apply, (clean / "s1/segv.nii.gz").string());  // fitted, crashes in apply only

  const std::string plugin = "--plugin-path " + lib.string() + " ";
  const fs::path out = tmp.path() / "out";
  const std::string cmd = plugin + "harmonize apply --method test-crash " + in.string() +
                          " --out " + out.string() + " -j 2 --no-progress --save-stats " +
                          tmp.str() + "/crash.stats --report " + tmp.str() + "/r.json";
  Result r = run_concord(cmd);
  std::cout << r.out;  // the supervisor's account of the crashes, for people reading the log
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("boom.nii.gz: decoder crashed: SIGABRT"), std::string::npos) << r.out;
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer catches the SIGSEGV and aborts the worker (abort_on_error=1).
  const std::string segv_signal = "SIGABRT";
#else
  const std::string segv_signal = "SIGSEGV";
#endif
  EXPECT_NE(r.out.find("segv.nii.gz: decoder crashed: " + segv_signal), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("2 of "), std::string::npos) << r.out;
  for (int i = 0; i < 8; ++i)
    EXPECT_TRUE(
        fs::exists(out / ("s" + std::to_string(i % 2)) / ("v" + std::to_string(i) + ".nii.gz")))
        << i;
  EXPECT_FALSE(fs::exists(out / "s0/boom.nii.gz"));
  EXPECT_FALSE(fs::exists(out / "s1/segv.nii.gz"));
  EXPECT_EQ(count_outputs(out), 8u);
  expect_no_temporaries(out);
  auto rep = read_json(tmp.path() / "r.json");
  EXPECT_EQ(rep["failed"].size(), 2u) << rep.dump(2);

  // The statistics are those of the same inputs without the crashing file.
  Result ref = run_concord(plugin + "harmonize fit --method test-crash " + clean.string() +
                           " --stats " + tmp.str() + "/clean.stats --no-progress");
  ASSERT_EQ(ref.code, 0) << ref.out;
  expect_same_stats(load_stats(tmp.str() + "/crash.stats"), load_stats(tmp.str() + "/clean.stats"));

  // `fit` alone survives the crash too.
  Result fit = run_concord(plugin + "harmonize fit --method test-crash " + in.string() +
                           " --stats " + tmp.str() + "/fit.stats -j 2 --no-progress");
  EXPECT_NE(fit.code, 0) << fit.out;
  EXPECT_NE(fit.out.find("boom.nii.gz: decoder crashed: SIGABRT"), std::string::npos) << fit.out;
  expect_same_stats(load_stats(tmp.str() + "/fit.stats"), load_stats(tmp.str() + "/clean.stats"));

  // A rerun redoes no good output.
  const auto t0 = mtime(out / "s0/v0.nii.gz");
  Result rerun = run_concord(cmd);
  EXPECT_NE(rerun.code, 0) << rerun.out;
  EXPECT_NE(rerun.out.find("0 written, 8 already complete"), std::string::npos) << rerun.out;
  EXPECT_EQ(mtime(out / "s0/v0.nii.gz"), t0);
}

// A non-UTF-8 byte in a failing file's name, a symbolic link loop, NaN values, colour files
// among grey ones: each is one listed failure (or handled), the others are written, and the
// report is still written.
TEST(HarmonizeInputs, OddFilesNeverSinkTheOthers) {
  if (!have_tools({"identity", "amplitude"})) return;
  testkit::TempDir tmp;
  const fs::path in = tmp.path() / "in", out = tmp.path() / "out";
  write_image(volume(1, 300, 100), (in / "s/good.nii.gz").string());
  std::ofstream(in / "s" / "bad\xff\xfe.nii.gz") << "not a NIfTI";
  fs::create_directory_symlink(in, in / "s" / "loop");
  {  // MetaImage by hand: Concord's own writers never write NaN
    std::ofstream mha(in / "s/nan.mha", std::ios::binary);
    mha << "ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_FLOAT\n"
           "ElementDataFile = LOCAL\n";
    std::vector<float> v(16, 1.f);
    v[3] = std::nanf("");
    v[5] = INFINITY;
    mha.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(float)));
  }
  Result r = run_concord("harmonize apply --method identity " + in.string() + " --out " +
                         out.string() + " --no-progress --report " + tmp.str() + "/r.json");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(out / "s/good.nii.gz"));
  EXPECT_FALSE(fs::exists(out / "s/nan.mha"));
  EXPECT_NE(r.out.find("symbolic link loop"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("nan.mha"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("not finite"), std::string::npos) << r.out;
  ASSERT_TRUE(fs::exists(tmp.path() / "r.json")) << r.out;
  auto rep = read_json(tmp.path() / "r.json");
  EXPECT_EQ(rep["failed"].size(), 3u) << rep.dump(2);
  EXPECT_NE(rep.dump().find("bad\xef\xbf\xbd"), std::string::npos) << "U+FFFD replaces the byte";
  // --non-finite zero: the NaN becomes 0 and the file is written.
  Result z = run_concord("harmonize apply --method identity " + in.string() + " --out " +
                         tmp.str() + "/z --no-progress --non-finite zero");
  ASSERT_TRUE(fs::exists(tmp.path() / "z/s/nan.mha")) << z.out;
  const Image zeroed = read_image((tmp.path() / "z/s/nan.mha").string());
  EXPECT_EQ(zeroed.data[3], 0.f);
  EXPECT_EQ(zeroed.data[5], 0.f);
  EXPECT_EQ(zeroed.data[6], 1.f);
  expect_no_temporaries(out);

  // Grey stored as RGB is grey (--channels auto); three true colour files among grey ones fail
  // alone (amplitude needs one channel count per site), reported as one cause.
  const fs::path xr = tmp.path() / "xr", xout = tmp.path() / "xout";
  for (int i = 0; i < 3; ++i) {
    Image g = picture(uint64_t(i), PixelType::U8, 200);
    write_image(g, (xr / "h1" / ("a" + std::to_string(i) + ".png")).string());
    Image rgb(2, 3, g.size);
    rgb.pixel_type = PixelType::U8;
    for (int c = 0; c < 3; ++c) std::copy(g.data.begin(), g.data.end(), rgb.channel(c));
    write_image(rgb, (xr / "h2" / ("b" + std::to_string(i) + ".png")).string());
    Image colour = rgb;
    for (int64_t k = 0; k < colour.voxels(); ++k)
      colour.channel(1)[k] = std::fmod(colour.channel(1)[k] * 7, 255.f);
    std::fill(colour.channel(2), colour.channel(2) + colour.voxels(), 9.f);
    write_image(colour, (xr / "h1" / ("c" + std::to_string(i) + ".png")).string());
  }
  Result x = run_concord("harmonize apply --method amplitude " + xr.string() + " --out " +
                         xout.string() + " --no-progress --report " + tmp.str() + "/x.json");
  EXPECT_NE(x.code, 0) << x.out;
  EXPECT_NE(x.out.find("3 inputs: "), std::string::npos) << "one line for one cause\n" << x.out;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(fs::exists(xout / "h1" / ("a" + std::to_string(i) + ".png"))) << x.out;
    EXPECT_EQ(read_image((xout / "h2" / ("b" + std::to_string(i) + ".png")).string()).channels, 1)
        << "grey stored as RGB is grey";
    EXPECT_FALSE(fs::exists(xout / "h1" / ("c" + std::to_string(i) + ".png")));
  }
  auto xrep = read_json(tmp.path() / "x.json");
  ASSERT_EQ(xrep["failure_causes"].size(), 1u) << xrep.dump(2);
  EXPECT_EQ(xrep["failure_causes"][0]["count"], 3);
  expect_no_temporaries(xout);

  // A manifest line naming a missing file is one failed input; the listed others are written.
  const fs::path list = tmp.path() / "list.txt";
  std::ofstream(list) << (in / "s/good.nii.gz").string() << "\n"
                      << (tmp.path() / "gone.nii.gz").string() << "\n"
                      << (xr / "h1/a0.png").string() << "\n";
  const fs::path mout = tmp.path() / "mout";
  Result m = run_concord("harmonize apply --method identity " + list.string() + " --out " +
                         mout.string() + " --no-progress");
  EXPECT_NE(m.code, 0) << m.out;
  EXPECT_NE(m.out.find("list.txt:2: " + (tmp.path() / "gone.nii.gz").string() + " does not exist"),
            std::string::npos)
      << m.out;
  EXPECT_EQ(count_outputs(mout), 2u) << m.out;
}
