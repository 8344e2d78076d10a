// `concord harmonize fit|apply --shard I/N` and `concord harmonize merge`: the merged statistics
// against a single-machine fit for every built-in harmonizer that fits statistics, refused
// merges, and sharded apply against one machine's outputs. Runs the built `concord` binary.
#include <concord/harmonizer.h>
#include <concord/image_io.h>

#include "testing.h"

#include <cmath>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <tuple>

namespace fs = std::filesystem;
using namespace concord;

namespace {

struct Result {
  int code;
  std::string out;
};

Result run(const std::string& args) {
  Result r;
  r.code = testkit::run_command(testkit::concord_exe() + " " + args + " 2>&1", &r.out);
  return r;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool have_tools() {
  if (!fs::exists(testkit::concord_exe())) {
    ADD_FAILURE() << testkit::concord_exe() << " is missing: build concord-cli";
    return false;
  }
  for (const char* p : {"identity", "histogram-match", "nyul", "amplitude", "zscore"}) {
    const fs::path lib = fs::path(testkit::build_dir()) / "lib/concord/plugins" /
                         (std::string("libconcord-harmonizer-") + p + ".so");
    if (!fs::exists(lib)) {
      ADD_FAILURE() << lib << " is missing: build concord-plugins";
      return false;
    }
  }
  return true;
}

// in/site-K/vol-N.nii.gz: 5 sites of 3 int16 volumes, sites differing in scale and offset;
// site-4's volumes are larger (amplitude resamples spectra to a common grid).
struct Inputs {
  testkit::TempDir tmp;
  fs::path in = tmp.path() / "in";
  Inputs() {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> n(0, 1);
    for (int s = 0; s < 5; ++s) {
      const fs::path dir = in / ("site-" + std::to_string(s));
      fs::create_directories(dir);
      const int64_t nx = s == 4 ? 20 : 16;
      for (int k = 0; k < 3; ++k) {
        Image im(3, 1, {nx, 14, 5});
        im.pixel_type = PixelType::I16;
        const float scale = 200.f + 150.f * float(s), offset = 30.f * float(s);
        for (int64_t z = 0; z < 5; ++z)
          for (int64_t y = 0; y < 14; ++y)
            for (int64_t x = 0; x < nx; ++x)
              im.at(x, y, z) = std::round(
                  offset + scale * (float(x + y + z) / 35.f + 0.15f * n(rng) + 0.1f * float(k)));
        write_image(im, (dir / ("vol-" + std::to_string(k) + ".nii.gz")).string());
      }
    }
  }
  std::string path(const std::string& rel) const { return (tmp.path() / rel).string(); }
};

// Fits `method_args` on all inputs (once per tag) and as N shards merged (parts given in reverse
// order); returns {single, merged} statistics file contents.
std::pair<std::string, std::string> single_and_merged(const Inputs& t, const std::string& tag,
                                                      const std::string& method_args, int n,
                                                      const std::string& shard_by = "site") {
  const std::string common =
      "harmonize fit " + method_args + " -j 1 --no-progress " + t.in.string();
  const std::string single = t.path(tag + ".single");
  const std::string merged = t.path(tag + "." + std::to_string(n) + ".merged");
  if (!fs::exists(single)) {
    Result r = run(common + " --stats " + single);
    EXPECT_EQ(r.code, 0) << r.out;
  }
  std::string parts;
  for (int i = n - 1; i >= 0; --i) {
    const std::string part = t.path(tag + ".part" + std::to_string(i));
    Result r = run(common + " --shard " + std::to_string(i) + "/" + std::to_string(n) +
                   " --shard-by " + shard_by + " --stats " + part);
    EXPECT_EQ(r.code, 0) << r.out;
    parts += " " + part;
  }
  Result r = run("harmonize merge" + parts + " --stats " + merged);
  EXPECT_EQ(r.code, 0) << r.out;
  return {slurp(single), slurp(merged)};
}

double max_relative_difference(const std::string& a_file, const std::string& b_file) {
  Stats a = load_stats(a_file), b = load_stats(b_file);
  EXPECT_EQ(a.arrays.size(), b.arrays.size());
  EXPECT_EQ(a.weight, b.weight);
  double worst = 0;
  for (const auto& [name, x] : a.arrays) {
    const Array& y = b.arrays.at(name);
    EXPECT_EQ(x.shape(), y.shape()) << name;
    EXPECT_EQ(x.dtype(), y.dtype()) << name;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double u = x.dtype() == DType::F64 ? x.data<double>()[i] : x.data<float>()[i];
      const double v = y.dtype() == DType::F64 ? y.data<double>()[i] : y.data<float>()[i];
      worst = std::max(worst, std::abs(u - v) / std::max(1e-30, std::abs(u)));
    }
  }
  return worst;
}

}  // namespace

// Whole sites per shard (the default): merge equals a single-machine fit byte for byte, for
// every built-in harmonizer that fits statistics, with more shards than sites too (empty parts).
TEST(HarmonizeShard, MergeEqualsSingleFitByteForByte) {
  if (!have_tools()) return;
  Inputs t;
  const std::vector<std::pair<std::string, std::string>> methods = {
      {"histogram-match", "--method histogram-match"},
      {"nyul", "--method nyul --arg pc_high=99.5"},
      {"amplitude", "--method amplitude"},
      {"amplitude-swap", "--method amplitude --arg mode=swap --arg reference_site=site-2"},
      {"identity", "--method identity"}};
  for (const auto& [tag, args] : methods) {
    // 3 shards over 5 sites; nyul also with more shards than sites (empty parts).
    for (int n : tag == "nyul" ? std::vector<int>{3, 7} : std::vector<int>{3}) {
      auto [single, merged] = single_and_merged(t, tag, args, n);
      ASSERT_FALSE(single.empty()) << tag;
      EXPECT_TRUE(single == merged) << tag << " with " << n << " shards: merged statistics differ";
    }
  }
  // The merged statistics apply like a fit's (the sidecar names the method and arguments).
  Result r = run("harmonize apply --stats " + t.path("nyul.3.merged") + " --out " + t.path("o") +
                 " -j 1 --no-progress " + t.in.string());
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(t.path("o/site-3/vol-1.nii.gz")));
}

// --shard-by path splits sites over shards: a split site's chunks are combined first, so the
// result equals a single fit only up to floating-point rounding (histogram-match and nyul
// average per-image values in double; amplitude keeps float32 spectra).
TEST(HarmonizeShard, ShardByPathIsEqualUpToRounding) {
  if (!have_tools()) return;
  Inputs t;
  for (const auto& [tag, args, tolerance] :
       std::vector<std::tuple<std::string, std::string, double>>{
           {"hm", "--method histogram-match", 1e-12},
           {"nyul", "--method nyul", 1e-12},
           {"amp", "--method amplitude", 1e-5}}) {
    single_and_merged(t, tag, args, 2, "path");
    const double d = max_relative_difference(t.path(tag + ".single"), t.path(tag + ".2.merged"));
    std::cout << tag << ", --shard-by path, 2 shards: largest relative difference to a single fit "
              << d << "\n";
    EXPECT_LE(d, tolerance) << tag;
  }
}

// Shards depend on the inputs alone: the same parts whatever the order of INPUTS.
TEST(HarmonizeShard, PartsIndependentOfInputOrder) {
  if (!have_tools()) return;
  Inputs t;
  std::string forward, backward;
  for (int s = 0; s < 5; ++s) forward += " " + t.path("in/site-" + std::to_string(s));
  for (int s = 4; s >= 0; --s) backward += " " + t.path("in/site-" + std::to_string(s));
  for (int i = 0; i < 2; ++i) {
    const std::string shard = " --shard " + std::to_string(i) + "/2 -j 1 --no-progress";
    ASSERT_EQ(run("harmonize fit --method nyul" + shard + " --stats " + t.path("f") + forward).code,
              0);
    ASSERT_EQ(
        run("harmonize fit --method nyul" + shard + " --stats " + t.path("b") + backward).code, 0);
    EXPECT_TRUE(slurp(t.path("f")) == slurp(t.path("b"))) << "shard " << i;
  }
}

// merge refuses parts that do not belong together, naming the file.
TEST(HarmonizeShard, MergeRefusesMismatchedMissingAndDuplicateParts) {
  if (!have_tools()) return;
  Inputs t;
  auto fit = [&](const std::string& args, const std::string& shard, const std::string& file) {
    Result r = run("harmonize fit " + args + " --shard " + shard + " -j 1 --no-progress --stats " +
                   t.path(file) + " " + t.in.string());
    EXPECT_EQ(r.code, 0) << r.out;
  };
  fit("--method nyul", "0/2", "a0");
  fit("--method nyul", "1/2", "a1");
  fit("--method histogram-match", "1/2", "hm1");
  fit("--method nyul --arg pc_high=98", "1/2", "args1");
  fit("--method nyul", "1/3", "n3");
  fit("--method nyul --seed 5", "1/2", "seed1");
  auto merge = [&](const std::string& files) {
    std::string list;
    std::istringstream in(files);
    for (std::string f; in >> f;) list += " " + t.path(f);
    return run("harmonize merge" + list + " --stats " + t.path("m"));
  };
  struct Case {
    std::string files, expect;
  };
  for (const Case& c :
       std::vector<Case>{{"a0 hm1", "hm1: method 'histogram-match' differs from 'nyul'"},
                         {"a0 args1", "args1: arguments"},
                         {"a0 n3", "n3: shard count 1/3 differs from 0/2"},
                         {"a0 seed1", "seed1: seed"},
                         {"a0", "shard(s) 1/2 missing"},
                         {"a0 a1 a0", "are both shard 0/2"}}) {
    Result r = merge(c.files);
    EXPECT_NE(r.code, 0) << c.files;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.files << ": " << r.out;
    EXPECT_FALSE(fs::exists(t.path("m"))) << c.files;
  }
  // Inputs that changed between shards.
  fs::copy_file(t.in / "site-0/vol-0.nii.gz", t.in / "site-0/vol-9.nii.gz");
  fit("--method nyul", "1/2", "later1");
  Result r = merge("a0 later1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("later1: input list"), std::string::npos) << r.out;
  // A complete statistics file is no part; a part is no statistics file for apply.
  ASSERT_EQ(run("harmonize fit --method nyul -j 1 --no-progress --stats " + t.path("full") + " " +
                t.in.string())
                .code,
            0);
  r = merge("full a1");
  EXPECT_NE(r.out.find("full: not a partial statistics file"), std::string::npos) << r.out;
  r = run("harmonize apply --stats " + t.path("a0") + " --out " + t.path("o") + " --no-progress " +
          t.in.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("partial statistics of shard 0/2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("harmonize merge"), std::string::npos) << r.out;
  // A truncated part (a copy cut short) is refused, naming it.
  {
    const std::string bytes = slurp(t.path("a1"));
    std::ofstream(t.path("cut1"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  r = merge("a0 cut1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("cut1: not readable as partial statistics"), std::string::npos) << r.out;
  // Malformed --shard values.
  for (const char* bad : {"2/2", "1", "a/3", "0/0", "-1/2"}) {
    r = run(std::string("harmonize fit --method nyul --shard ") + bad + " --stats " + t.path("x") +
            " " + t.in.string());
    EXPECT_NE(r.code, 0) << bad;
    EXPECT_NE(r.out.find("--shard"), std::string::npos) << bad << ": " << r.out;
  }
}

// apply --shard: the shards together write every output, byte for byte as one machine does, into
// one folder; a rerun resumes; fitting on a share alone is refused.
TEST(HarmonizeShard, ShardedApplyEqualsSingleApplyAndResumes) {
  if (!have_tools()) return;
  Inputs t;
  fs::create_directories(t.in / "site-1/masks");
  fs::copy_file(t.in / "site-1/vol-0.nii.gz", t.in / "site-1/masks/vol-0.nii.gz");
  const std::string in = " -j 1 --no-progress " + t.in.string();
  ASSERT_EQ(run("harmonize fit --method histogram-match --stats " + t.path("s") + in).code, 0);
  Result r = run("harmonize apply --stats " + t.path("s") + " --out " + t.path("one") + in);
  ASSERT_EQ(r.code, 0) << r.out;
  for (int i = 0; i < 3; ++i) {
    r = run("harmonize apply --stats " + t.path("s") + " --shard " + std::to_string(i) +
            "/3 --out " + t.path("many") + in);
    ASSERT_EQ(r.code, 0) << r.out;
  }
  size_t outputs = 0;
  for (const auto& e : fs::recursive_directory_iterator(t.path("one"))) {
    if (!e.is_regular_file() || e.path().filename().string()[0] == '.') continue;
    const fs::path rel = fs::relative(e.path(), t.path("one"));
    ASSERT_TRUE(fs::exists(t.path("many") / rel)) << rel;
    EXPECT_TRUE(slurp(e.path()) == slurp(t.path("many") / rel)) << rel;
    ++outputs;
  }
  EXPECT_EQ(outputs, 16u);  // 15 volumes and the mask
  // Each shard keeps its own records; rerunning a shard, or all at once, skips everything.
  EXPECT_TRUE(fs::exists(t.path("many/.concord-harmonize.inputs.shard-2-of-3")));
  r = run("harmonize apply --stats " + t.path("s") + " --shard 1/3 --out " + t.path("many") + in);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("skipped"), std::string::npos) << r.out;
  const auto before = fs::last_write_time(t.path("many/site-0/vol-0.nii.gz"));
  r = run("harmonize apply --stats " + t.path("s") + " --out " + t.path("many") + in);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(fs::last_write_time(t.path("many/site-0/vol-0.nii.gz")), before);
  // A one-shot --method would fit each shard on its share alone.
  r = run("harmonize apply --method nyul --shard 0/2 --out " + t.path("x") + in);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("apply --shard applies statistics fitted on all the inputs"),
            std::string::npos)
      << r.out;
  // A site-local method needs no statistics: it shards like any other.
  r = run("harmonize apply --method zscore --pixel-type float32 --shard 0/2 --out " + t.path("z") +
          in);
  EXPECT_EQ(r.code, 0) << r.out;
  r = run("harmonize fit --method zscore --shard 0/2 --stats " + t.path("zs") + in);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("needs no statistics"), std::string::npos) << r.out;
}

// A corrupt input fails in its shard (status 1, the part still written); merge lists it again
// with the same status, and its statistics equal a single fit's (which skips it likewise).
TEST(HarmonizeShard, FailedInputsAreListedByShardAndMerge) {
  if (!have_tools()) return;
  Inputs t;
  std::ofstream(t.in / "site-2/bad.nii.gz") << "not a NIfTI file";
  const std::string in = " -j 1 --no-progress " + t.in.string();
  Result r = run("harmonize fit --method nyul --stats " + t.path("single") + in);
  EXPECT_EQ(r.code, 1) << r.out;
  std::string parts;
  bool listed = false;
  for (int i = 0; i < 2; ++i) {
    const std::string part = t.path("p" + std::to_string(i));
    r = run("harmonize fit --method nyul --shard " + std::to_string(i) + "/2 --stats " + part + in);
    EXPECT_TRUE(r.code == 0 || r.code == 1) << r.out;
    listed = listed || (r.code == 1 && r.out.find("bad.nii.gz") != std::string::npos);
    EXPECT_TRUE(fs::exists(part));
    parts += " " + part;
  }
  EXPECT_TRUE(listed);
  r = run("harmonize merge" + parts + " --stats " + t.path("merged"));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("bad.nii.gz"), std::string::npos) << r.out;
  EXPECT_TRUE(slurp(t.path("single")) == slurp(t.path("merged")));
}
