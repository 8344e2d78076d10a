// Tests of the amplitude harmonizer against float64 numpy references (fixtures/, made by
// make_fixtures.py), a naive DFT, hand-computed statistics and real multi-site prostate MRI.
#include <concord/harmonizer.h>

#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <cmath>
#include <complex>
#include <fstream>
#include <iostream>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "paired_rfft2.h"
#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

// ----- .npy (little-endian float32/float64, C order) ------------------------------------------

struct Npy {
  std::vector<int64_t> shape;
  std::vector<double> values;
};

Npy read_npy(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error("cannot open " + file);
  char magic[8];
  in.read(magic, 8);
  if (std::string(magic + 1, 5) != "NUMPY") throw Error(file + ": not a .npy file");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t h;
    in.read(reinterpret_cast<char*>(&h), 2);
    hlen = h;
  } else {
    in.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, ' ');
  in.read(header.data(), hlen);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr': '<f([48])'")))
    throw Error(file + ": unsupported dtype in " + header);
  const int bytes = m[1] == "4" ? 4 : 8;
  if (header.find("'fortran_order': False") == std::string::npos)
    throw Error(file + ": Fortran order");
  std::regex_search(header, m, std::regex("'shape': \\(([0-9, ]*)\\)"));
  Npy out;
  std::stringstream ss(m[1].str());
  std::string item;
  int64_t count = 1;
  while (std::getline(ss, item, ','))
    if (item.find_first_not_of(' ') != std::string::npos) {
      out.shape.push_back(std::stoll(item));
      count *= out.shape.back();
    }
  out.values.resize(size_t(count));
  if (bytes == 4) {
    std::vector<float> f(static_cast<size_t>(count));
    in.read(reinterpret_cast<char*>(f.data()), count * 4);
    std::copy(f.begin(), f.end(), out.values.begin());
  } else {
    in.read(reinterpret_cast<char*>(out.values.data()), count * 8);
  }
  if (!in) throw Error(file + ": truncated");
  return out;
}

// (C, nz, ny, nx) array -> Image.
Image image_from(const Npy& a, int dim) {
  Image im(dim, int(a.shape[0]), {a.shape[3], a.shape[2], a.shape[1]});
  for (size_t i = 0; i < a.values.size(); ++i) im.data[i] = float(a.values[i]);
  return im;
}

std::map<std::string, std::string> read_params(const std::string& file) {
  std::map<std::string, std::string> p;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) p[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return p;
}

// ----- plugin helpers ----------------------------------------------------------------------------

std::unique_ptr<Harmonizer> make(const std::map<std::string, Value>& given = {}) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Harmonizer, "amplitude");
  return reg.create<Harmonizer>(Kind::Harmonizer, "amplitude",
                                make_args("amplitude", desc.args, given), {1, "test"});
}

ImageSource source(const std::vector<Image>& images) {
  return [&images](const ImageVisitor& visit) {
    for (const Image& im : images) visit(im);
  };
}

Stats fit(Harmonizer& h, const std::vector<Image>& images, const std::string& site) {
  Stats s = h.fit_site(source(images));
  s.site = site;
  return s;
}

// The federated fit flow over named sites; `local` receives the global statistics.
void fit_federation(Harmonizer& h, const std::map<std::string, std::vector<Image>>& sites,
                    const std::string& local) {
  std::vector<Stats> parts;
  for (const auto& [name, images] : sites) parts.push_back(fit(h, images, name));
  h.set_statistics(h.combine(parts), local);
}

// max |a - b| / max |b|: relative to the image's scale (voxels near zero make a per-voxel
// relative error meaningless).
double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  return rel_error(a, std::vector<double>(b.begin(), b.end()));
}

// A structured random image (smooth field + texture) with a site "style" (gain, offset).
Image random_image(int dim, int channels, std::array<int64_t, 3> size, uint64_t seed,
                   float gain = 20, float offset = 100) {
  Image im(dim, channels, size);
  std::mt19937_64 rng(seed);
  auto u = [&] { return double(rng() >> 11) * 0x1.0p-53; };
  for (int c = 0; c < channels; ++c)
    for (int64_t z = 0; z < size[2]; ++z)
      for (int64_t y = 0; y < size[1]; ++y)
        for (int64_t x = 0; x < size[0]; ++x)
          im.at(x, y, z, c) = float(offset + gain * (2 * std::sin(0.21 * x + 0.1 * c) +
                                                     std::cos(0.13 * y + 0.05 * z) + u() - 0.5));
  return im;
}

std::vector<Image> random_images(int n, int dim, int channels, std::array<int64_t, 3> size,
                                 uint64_t seed, float gain, float offset) {
  std::vector<Image> v;
  for (int i = 0; i < n; ++i)
    v.push_back(random_image(dim, channels, size, seed * 1000 + i, gain, offset));
  return v;
}

}  // namespace

// ----- numpy references ----------------------------------------------------------------------

TEST(Amplitude, MatchesFloat64NumpyReferences) {
  const fs::path root = AMPLITUDE_FIXTURES;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path d = entry.path();
    SCOPED_TRACE(d.filename().string());
    auto p = read_params((d / "params.txt").string());
    const int dim = std::stoi(p["dim"]);
    std::map<std::string, std::vector<Image>> sites;
    for (const auto& f : fs::directory_iterator(d)) {
      const std::string name = f.path().filename().string();
      if (name.size() > 2 && name[1] == '_')
        sites[name.substr(0, 1)].push_back(image_from(read_npy(f.path().string()), dim));
    }
    ASSERT_EQ(sites.size(), 2u);
    std::map<std::string, Value> args{{"mode", make_value(p["mode"])},
                                      {"beta", make_value(std::stod(p["beta"]))},
                                      {"clip", make_value(p["clip"])}};
    const double lam = std::stod(p["lambda"]);
    if (p["mode"] == "interpolate") {
      args["lambda_min"] = make_value(lam);
      args["lambda_max"] = make_value(lam);
    } else {
      args["lambda"] = make_value(lam);
    }
    if (p.count("reference_site")) args["reference_site"] = make_value(p["reference_site"]);
    auto h = make(args);
    fit_federation(*h, sites, p["local"]);

    Image target = image_from(read_npy((d / "target.npy").string()), dim);
    const Npy expected = read_npy((d / "expected.npy").string());
    if (p["mode"] == "interpolate") {
      ASSERT_TRUE(h->augments());
      std::mt19937_64 rng(5);
      h->augment(target, rng);
    } else {
      h->apply(target);
    }
    const double err = rel_error(target.data, expected.values);
    std::cout << d.filename().string() << ": max relative error " << err << "\n";
    EXPECT_LE(err, 1e-4);
    ++cases;
  }
  EXPECT_GE(cases, 9);
}

// ----- exact identities ----------------------------------------------------------------------

// Zero bins (a constant image has nothing but DC; FFTW returns exact zeros or rounding noise
// elsewhere): every bin must still leave with the reference amplitude N a(k) (X' = A' where
// X = 0). Checked with a direct double-precision DFT of the output. Rows of 17 bins run both
// the vector (8 bins) and the scalar path.
TEST(Amplitude, ZeroBinsTakeTheReferenceAmplitude) {
  const int64_t nx = 32, ny = 12, n = nx * ny;
  std::mt19937_64 rng(5);
  std::vector<Image> site;
  for (int i = 0; i < 3; ++i) {
    Image im(2, 1, {nx, ny, 1});
    for (float& v : im.data) v = float(50 + 20 * double(rng() >> 11) * 0x1.0p-53);
    site.push_back(std::move(im));
  }
  auto h = make({{"beta", make_value(1.0)}});  // every bin
  Stats st = h->fit_site(source(site));
  st.site = "a";
  const Stats global = h->combine({st});
  h->set_statistics(global, "a");
  const std::vector<float> a = global.arrays.at("mean").to_vector<float>();  // [y][x < 17]
  const int64_t nxh = nx / 2 + 1;
  Image flat(2, 1, {nx, ny, 1});
  std::fill(flat.data.begin(), flat.data.end(), 7.0f);
  h->apply(flat);
  double worst = 0;
  const double dc = double(n) * a[0];
  for (int64_t ky = 0; ky < ny; ++ky)
    for (int64_t kx = 0; kx < nxh; ++kx) {
      std::complex<double> X = 0;
      for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x)
          X += double(flat.data[size_t(y * nx + x)]) *
               std::polar(1.0, -2 * M_PI * (double(kx * x) / nx + double(ky * y) / ny));
      const double want = double(n) * a[size_t(ky * nxh + kx)];
      worst = std::max(worst, std::abs(std::abs(X) - want) / dc);
    }
  EXPECT_LT(worst, 1e-5) << "amplitude error relative to DC";
}

// The paired 2D real FFT against FFTW's r2c / c2r: same layout and scaling, float rounding
// apart. Sizes cover a partial last block of eight columns (nx = 20: M = 10), one row, and a
// width of two.
TEST(PairedRfft2, EqualsFftwR2cAndC2r) {
  std::mt19937_64 rng(11);
  int own = 0;
  for (auto [nx, ny, allow_own] : std::vector<std::tuple<int, int, bool>>{{256, 256, true},
                                                                          {256, 256, false},
                                                                          {20, 16, true},
                                                                          {64, 8, true},
                                                                          {30, 4, true},
                                                                          {128, 1, true},
                                                                          {2, 2, true},
                                                                          {96, 32, true},
                                                                          {96, 32, false},
                                                                          {240, 240, true},
                                                                          {30, 7, true},
                                                                          {200, 160, true},
                                                                          {2, 3, true},
                                                                          {34, 1, true}}) {
    PairedRfft2 paired(nx, ny, FFTW_ESTIMATE, allow_own);
    own += paired.own_columns();
    SCOPED_TRACE(std::to_string(nx) + "x" + std::to_string(ny) +
                 (paired.own_columns() ? " (own y pass)" : " (FFTW complex)"));
    const int h = nx / 2 + 1;
    float* x = fftwf_alloc_real(size_t(nx * ny));
    float* back = fftwf_alloc_real(size_t(nx * ny));
    float* want_back = fftwf_alloc_real(size_t(nx * ny));
    fftwf_complex* want = fftwf_alloc_complex(size_t(ny * h));
    fftwf_complex* got = fftwf_alloc_complex(size_t(ny * h));
    for (int i = 0; i < nx * ny; ++i) x[i] = float(10 + 5 * (double(rng() >> 11) * 0x1.0p-53));
    fftwf_plan r2c = fftwf_plan_dft_r2c_2d(ny, nx, x, want, FFTW_ESTIMATE);
    fftwf_plan c2r = fftwf_plan_dft_c2r_2d(ny, nx, want, want_back, FFTW_ESTIMATE);
    fftwf_execute(r2c);
    paired.forward(x, got);
    double err = 0, scale = 0;
    for (int i = 0; i < ny * h; ++i) {
      err = std::max(err, double(std::hypot(got[i][0] - want[i][0], got[i][1] - want[i][1])));
      scale = std::max(scale, double(std::hypot(want[i][0], want[i][1])));
    }
    EXPECT_LT(err / scale, 1e-6) << "forward";
    // Self-conjugate bins (ky in {0, ny/2}, kx in {0, nx/2}) are exactly real, as r2c's.
    for (int ky : {0, ny % 2 ? 0 : ny / 2})
      for (int kx : {0, nx / 2}) EXPECT_EQ(got[ky * h + kx][1], 0.0f) << ky << "," << kx;
    paired.inverse(got, back);  // leaves `got` as it was
    fftwf_execute(c2r);         // destroys `want`
    err = 0, scale = 0;
    for (int i = 0; i < nx * ny; ++i) {
      err = std::max(err, double(std::abs(back[i] - want_back[i])));
      scale = std::max(scale, double(std::abs(want_back[i])));
      EXPECT_NEAR(back[i] / float(nx * ny), x[i], 1e-4f * 15) << "round trip at " << i;
    }
    EXPECT_LT(err / scale, 1e-6) << "inverse";
    fftwf_destroy_plan(r2c);
    fftwf_destroy_plan(c2r);
    for (float* p : {x, back, want_back}) fftwf_free(p);
    fftwf_free(want);
    fftwf_free(got);
  }
  EXPECT_FALSE(PairedRfft2::supported(255, 256)) << "odd width";
  EXPECT_FALSE(PairedRfft2::own_columns_possible(96)) << "height not a power of two";
  if (PairedRfft2::own_columns_possible(256))
    EXPECT_EQ(own, 6) << "the AVX-512 y pass was not used where it could be";
  else
    std::cout << "[ NOTE     ] this CPU has no AVX-512F: only the FFTW complex form was tested\n";
}

// The harmonizer gives the same images with either transform (band part or whole).
TEST(Amplitude, PairedTransformEqualsFftw) {
  std::mt19937_64 rng(3);
  auto image = [&](float gain) {
    Image im(2, 1, {64, 32, 1});
    for (float& v : im.data) v = float(40 + gain * double(rng() >> 11) * 0x1.0p-53);
    return im;
  };
  const std::vector<Image> a{image(10), image(12)}, b{image(40), image(45)};
  for (double beta : {1.0, 0.2}) {
    SCOPED_TRACE("beta " + std::to_string(beta));
    std::vector<std::unique_ptr<Harmonizer>> hs;
    for (const char* t : {"auto", "fftw"}) {
      hs.push_back(make({{"transform", make_value(std::string(t))}, {"beta", make_value(beta)}}));
      Stats sa = hs.back()->fit_site(source(a)), sb = hs.back()->fit_site(source(b));
      sa.site = "a", sb.site = "b";
      hs.back()->set_statistics(hs.back()->combine({sa, sb}), "a");
    }
    const Image original = image(10);
    Image x = original, y = original;
    hs[0]->apply(x);
    hs[1]->apply(y);
    EXPECT_LT(rel_error(x.data, y.data), 1e-5);
    EXPECT_GT(rel_error(x.data, original.data), 1e-3) << "the image did change";
  }
}

TEST(Amplitude, LambdaZeroReturnsTheInput) {
  const std::vector<std::pair<int, std::array<int64_t, 3>>> shapes = {
      {2, {53, 37, 1}}, {3, {11, 14, 9}}, {2, {30, 24, 1}}};
  for (const auto& [dim, size] : shapes)
    for (int channels : {1, 3}) {
      SCOPED_TRACE(std::to_string(size[0]) + "x" + std::to_string(size[1]) + "x" +
                   std::to_string(size[2]) + " c" + std::to_string(channels));
      std::map<std::string, std::vector<Image>> sites{
          {"A", random_images(2, dim, channels, size, 1, 20, 100)},
          {"B", random_images(2, dim, channels, size, 2, 60, 10)}};
      auto h = make({{"lambda", make_value(0.0)}, {"beta", make_value(1.0)}});
      fit_federation(*h, sites, "A");
      Image im = random_image(dim, channels, size, 99);
      const std::vector<float> before = im.data;
      h->apply(im);
      EXPECT_LE(rel_error(im.data, before), 1e-5);

      auto mix = make({{"mode", make_value("interpolate")},
                       {"lambda_min", make_value(0.0)},
                       {"lambda_max", make_value(0.0)},
                       {"beta", make_value(1.0)}});
      fit_federation(*mix, sites, "A");
      Image im2 = random_image(dim, channels, size, 99);
      std::mt19937_64 rng(3);
      mix->augment(im2, rng);
      EXPECT_LE(rel_error(im2.data, before), 1e-5);
    }
}

TEST(Amplitude, DcOnlyFastPathEqualsFftPath) {
  // beta = 0, and a beta small enough that b = floor(min(size) * beta) = 0.
  for (double beta : {0.0, 0.02})
    for (int dim : {2, 3}) {
      const std::array<int64_t, 3> size =
          dim == 2 ? std::array<int64_t, 3>{53, 37, 1} : std::array<int64_t, 3>{11, 14, 9};
      std::map<std::string, std::vector<Image>> sites{
          {"A", random_images(2, dim, 2, size, 4, 20, 100)},
          {"B", random_images(3, dim, 2, size, 5, 60, -40)}};
      std::vector<float> out[2];
      for (bool fast : {true, false}) {
        auto h = make({{"beta", make_value(beta)},
                       {"lambda", make_value(0.8)},
                       {"dc_fast_path", make_value(fast)}});
        fit_federation(*h, sites, "A");
        Image im = random_image(dim, 2, size, 7);
        h->apply(im);
        out[fast] = im.data;
      }
      EXPECT_LE(rel_error(out[1], out[0]), 1e-5) << "beta " << beta << " dim " << dim;
      EXPECT_NE(out[1], random_image(dim, 2, size, 7).data);  // the mean did move
    }
}

TEST(Amplitude, ClipPolicies) {
  const std::array<int64_t, 3> size{40, 33, 1};
  // Site B has a much wider contrast: full replacement overshoots site A's range and zero.
  std::map<std::string, std::vector<Image>> sites{{"A", random_images(2, 2, 1, size, 8, 5, 20)},
                                                  {"B", random_images(2, 2, 1, size, 9, 80, 0)}};
  std::map<std::string, std::vector<float>> out;
  for (const char* clip : {"none", "nonnegative", "input"}) {
    auto h = make({{"mode", make_value("swap")},
                   {"reference_site", make_value("B")},
                   {"beta", make_value(1.0)},
                   {"clip", make_value(clip)}});
    fit_federation(*h, sites, "A");
    Image im = random_image(2, 1, size, 10, 5, 20);
    h->apply(im);
    out[clip] = im.data;
  }
  const std::vector<float> input = random_image(2, 1, size, 10, 5, 20).data;
  const auto [lo, hi] = std::minmax_element(input.begin(), input.end());
  const auto& none = out["none"];
  EXPECT_LT(*std::min_element(none.begin(), none.end()), 0.0f);
  EXPECT_GT(*std::max_element(none.begin(), none.end()), *hi);
  for (size_t i = 0; i < none.size(); ++i) {
    EXPECT_EQ(out["nonnegative"][i], std::max(none[i], 0.0f));
    EXPECT_EQ(out["input"][i], std::min(std::max(none[i], *lo), *hi));
  }
}

// ----- the federated fit flow ----------------------------------------------------------------

// |DFT(x)|/N on the r2c half layout (z, y, x < nx/2 + 1), by the O(N^2) definition in double.
static std::vector<double> naive_half_amplitude(const Image& im) {
  const int64_t nx = im.size[0], ny = im.size[1], nz = im.size[2], nxh = nx / 2 + 1;
  const double n = double(nx * ny * nz);
  std::vector<double> out;
  for (int64_t kz = 0; kz < nz; ++kz)
    for (int64_t ky = 0; ky < ny; ++ky)
      for (int64_t kx = 0; kx < nxh; ++kx) {
        std::complex<double> acc = 0;
        for (int64_t z = 0; z < nz; ++z)
          for (int64_t y = 0; y < ny; ++y)
            for (int64_t x = 0; x < nx; ++x) {
              const double ph =
                  -2 * M_PI * (double(kz * z) / nz + double(ky * y) / ny + double(kx * x) / nx);
              acc += double(im.at(x, y, z)) * std::polar(1.0, ph);
            }
        out.push_back(std::abs(acc) / n);
      }
  return out;
}

TEST(Amplitude, FitCombineSetStatisticsByHand) {
  const std::array<int64_t, 3> size{5, 4, 1};
  const std::vector<Image> a = random_images(2, 2, 1, size, 11, 10, 50);
  const std::vector<Image> b = random_images(1, 2, 1, size, 12, 30, 5);
  const std::vector<Image> c = random_images(3, 2, 1, size, 13, 3, 7);
  auto h = make({{"mode", make_value("interpolate")}});
  Stats sa = fit(*h, a, "A"), sb = fit(*h, b, "B"), sc = fit(*h, c, "C");
  EXPECT_EQ(sa.weight, 2);
  EXPECT_EQ(sa.arrays.at("mean").shape(), (std::vector<int64_t>{1, 1, 4, 3}));
  EXPECT_EQ(sa.scalars.at("nx"), 5);
  EXPECT_EQ(sa.scalars.at("ny"), 4);

  std::vector<double> ma(12, 0), mb = naive_half_amplitude(b[0]);
  for (const Image& im : a) {
    auto s = naive_half_amplitude(im);
    for (size_t i = 0; i < s.size(); ++i) ma[i] += s[i] / 2;
  }
  const Stats g = h->combine({sa, sb});
  EXPECT_EQ(g.weight, 3);
  EXPECT_EQ(g.scalars.at("weight/A"), 2);
  EXPECT_EQ(g.scalars.at("weight/B"), 1);
  const float* mean = g.arrays.at("mean").data<float>();
  const float* site_a = g.arrays.at("site/A").data<float>();
  const float* site_b = g.arrays.at("site/B").data<float>();
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_NEAR(site_a[i], ma[i], 1e-5 * (1 + ma[i]));
    EXPECT_NEAR(site_b[i], mb[i], 1e-5 * (1 + mb[i]));
    const double w = (2 * ma[i] + 1 * mb[i]) / 3;  // sample-weighted
    EXPECT_NEAR(mean[i], w, 1e-5 * (1 + w));
  }

  // combine accepts its own output: ((A, B), C) == (A, B, C).
  const Stats nested = h->combine({g, sc});
  const Stats flat = h->combine({sa, sb, sc});
  EXPECT_EQ(nested.weight, 6);
  ASSERT_EQ(nested.arrays.size(), 4u);  // mean + three sites
  for (const auto& [name, arr] : flat.arrays) {
    const auto x = nested.arrays.at(name).to_vector<float>(), y = arr.to_vector<float>();
    EXPECT_LE(rel_error(x, y), 1e-6) << name;
  }
  EXPECT_THROW(h->combine({g, sa}), Error);  // site A twice

  // normalize broadcasts only the mean (not every site's spectrum).
  auto n = make();
  const Stats gn = n->combine({fit(*n, a, "A"), fit(*n, b, "B")});
  EXPECT_EQ(gn.arrays.size(), 1u);
  EXPECT_TRUE(gn.arrays.count("mean"));

  // A site without images is ignored; nothing at all is an error naming the plugin.
  const Stats empty = n->fit_site(source({}));
  EXPECT_EQ(empty.weight, 0);
  EXPECT_EQ(n->combine({empty, gn}).weight, 3);
  try {
    n->combine({empty});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("amplitude"), std::string::npos);
  }
}

TEST(Amplitude, DifferentImageSizesShareOneSpectrum) {
  // Constant images have only a DC term, whose per-voxel amplitude is the intensity: the
  // federated spectrum resampled to any size must carry the sample-weighted mean intensity
  // at DC (k = 0 maps to k = 0 exactly; other bins are interpolated, see the fixtures).
  auto constant = [](std::array<int64_t, 3> size, float v) {
    Image im(2, 1, size);
    std::fill(im.data.begin(), im.data.end(), v);
    return im;
  };
  std::map<std::string, std::vector<Image>> sites{
      {"A", {constant({16, 16, 1}, 10), constant({16, 16, 1}, 10), constant({12, 9, 1}, 10)}},
      {"B", {constant({20, 24, 1}, 50)}}};
  for (bool fast : {true, false}) {
    auto h = make({{"beta", make_value(0.0)}, {"dc_fast_path", make_value(fast)}});
    fit_federation(*h, sites, "B");
    Image im = constant({13, 7, 1}, 2);
    h->apply(im);
    for (float v : im.data) EXPECT_NEAR(v, (3 * 10 + 1 * 50) / 4.0, 1e-4);
  }
  auto h = make();
  fit_federation(*h, sites, "A");
  // 3D volumes with a 2D statistics grid are refused with a message.
  Image vol(3, 1, {8, 8, 8});
  EXPECT_THROW(h->apply(vol), Error);
}

// ----- interpolate ---------------------------------------------------------------------------

TEST(Amplitude, InterpolateDrawsAreSeededAndWithinTheMix) {
  const std::array<int64_t, 3> size{31, 27, 1};
  std::map<std::string, std::vector<Image>> sites{{"A", random_images(2, 2, 1, size, 21, 20, 100)},
                                                  {"B", random_images(2, 2, 1, size, 22, 60, 10)},
                                                  {"C", random_images(2, 2, 1, size, 23, 5, 300)}};
  const double lo = 0.2, hi = 0.6;
  auto h = make({{"mode", make_value("interpolate")},
                 {"lambda_min", make_value(lo)},
                 {"lambda_max", make_value(hi)},
                 {"beta", make_value(0.3)}});
  fit_federation(*h, sites, "A");
  const Image x = random_image(2, 1, size, 24);

  // apply() is the identity: interpolation is a training-time augmentation only.
  Image same = x;
  h->apply(same);
  EXPECT_EQ(same.data, x.data);

  // Full replacement by each other site's spectrum (swap, lambda = 1): x(λ) = x + λ (x1 - x).
  std::map<std::string, std::vector<double>> dir;
  for (const char* s : {"A", "B", "C"}) {
    auto sw = make({{"mode", make_value("swap")},
                    {"reference_site", make_value(s)},
                    {"beta", make_value(0.3)}});
    fit_federation(*sw, sites, "A");
    Image y = x;
    sw->apply(y);
    for (size_t i = 0; i < y.data.size(); ++i) dir[s].push_back(double(y.data[i]) - x.data[i]);
  }

  std::mt19937_64 rng(42), replay(42);
  std::set<std::string> picked;
  for (int draw = 0; draw < 40; ++draw) {
    Image y = x;
    h->augment(y, rng);
    // The documented draw: other site (sorted names, local excluded) first, then λ.
    const double u1 = double(replay() >> 11) * 0x1.0p-53;
    const double u2 = double(replay() >> 11) * 0x1.0p-53;
    const std::string want_site = u1 < 0.5 ? "B" : "C";
    const double want_lam = lo + (hi - lo) * u2;
    int matches = 0;
    for (const auto& [s, d] : dir) {
      double dot = 0, dd = 0;
      for (size_t i = 0; i < d.size(); ++i) {
        dot += (double(y.data[i]) - x.data[i]) * d[i];
        dd += d[i] * d[i];
      }
      const double lam = dot / dd;
      double res = 0;
      for (size_t i = 0; i < d.size(); ++i) {
        const double r = double(y.data[i]) - x.data[i] - lam * d[i];
        res += r * r;
      }
      if (std::sqrt(res / dd) > 1e-4) continue;  // not this site's direction
      ++matches;
      picked.insert(s);
      EXPECT_EQ(s, want_site);
      EXPECT_GE(lam, lo - 1e-4);
      EXPECT_LE(lam, hi + 1e-4);
      EXPECT_NEAR(lam, want_lam, 1e-4);
    }
    EXPECT_EQ(matches, 1) << "draw " << draw;
  }
  EXPECT_EQ(picked, (std::set<std::string>{"B", "C"}));

  // Same seed, same output; another seed, another output.
  Image y1 = x, y2 = x, y3 = x;
  std::mt19937_64 r1(7), r2(7), r3(8);
  h->augment(y1, r1);
  h->augment(y2, r2);
  h->augment(y3, r3);
  EXPECT_EQ(y1.data, y2.data);
  EXPECT_NE(y1.data, y3.data);
}

// ----- concurrency ---------------------------------------------------------------------------

TEST(Amplitude, ApplyFromTwoThreadsGivesIdenticalOutput) {
  // Shapes nobody has planned yet, so the threads also plan concurrently.
  const std::vector<std::array<int64_t, 3>> sizes = {
      {61, 47, 1}, {64, 40, 1}, {47, 61, 1}, {33, 33, 1}, {50, 29, 1}};
  std::map<std::string, std::vector<Image>> sites{
      {"A", random_images(2, 2, 1, {61, 47, 1}, 31, 20, 100)},
      {"B", random_images(2, 2, 1, {64, 40, 1}, 32, 60, 10)}};
  auto h = make({{"beta", make_value(0.4)}, {"lambda", make_value(0.9)}});
  fit_federation(*h, sites, "A");
  auto work = [&](int salt) {
    std::vector<Image> out;
    for (int rep = 0; rep < 4; ++rep)
      for (size_t i = 0; i < sizes.size(); ++i) {
        Image im = random_image(2, 1, sizes[i], 100 + i + salt);
        h->apply(im);
        out.push_back(std::move(im));
      }
    return out;
  };
  std::vector<Image> t1, t2;
  std::thread a([&] { t1 = work(0); });
  std::thread b([&] { t2 = work(0); });
  a.join();
  b.join();
  const std::vector<Image> serial = work(0);
  ASSERT_EQ(t1.size(), serial.size());
  for (size_t i = 0; i < serial.size(); ++i) {
    EXPECT_EQ(t1[i].data, serial[i].data) << i;
    EXPECT_EQ(t2[i].data, serial[i].data) << i;
  }
}

// ----- arguments, errors, saved spectra -------------------------------------------------------

TEST(Amplitude, ErrorsNameThePluginAndTheProblem) {
  EXPECT_THROW(make({{"mode", make_value("swap")}}), Error);         // no reference
  EXPECT_THROW(make({{"reference_site", make_value("B")}}), Error);  // not swap
  EXPECT_THROW(make({{"mode", make_value("interpolate")},
                     {"lambda_min", make_value(0.7)},
                     {"lambda_max", make_value(0.2)}}),
               Error);
  EXPECT_THROW(make({{"beta", make_value(1.5)}}), Error);

  auto h = make();
  Image im = random_image(2, 1, {8, 8, 1}, 1);
  try {
    h->apply(im);
    ADD_FAILURE() << "apply before set_statistics did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("amplitude"), std::string::npos) << e.what();
  }
  fit_federation(*h, {{"A", random_images(2, 2, 1, {8, 8, 1}, 2, 1, 1)}}, "A");
  Image rgb = random_image(2, 3, {8, 8, 1}, 3);
  EXPECT_THROW(h->apply(rgb), Error);  // 3 channels against 1-channel statistics

  // interpolate with a single site has nobody to mix with.
  auto mix = make({{"mode", make_value("interpolate")}});
  std::vector<Stats> one{fit(*mix, random_images(2, 2, 1, {8, 8, 1}, 4, 1, 1), "A")};
  const Stats g = mix->combine(one);
  EXPECT_THROW(mix->set_statistics(g, "A"), Error);
  // swap naming a site that is not in the statistics.
  auto sw = make({{"mode", make_value("swap")}, {"reference_site", make_value("Z")}});
  EXPECT_THROW(sw->set_statistics(g, "A"), Error);
  // images of different dimension in one site.
  std::vector<Image> mixed{random_image(2, 1, {8, 8, 1}, 5), random_image(3, 1, {8, 8, 4}, 6)};
  EXPECT_THROW(h->fit_site(source(mixed)), Error);
}

TEST(Amplitude, SwapWithASavedSpectrumFile) {
  const std::array<int64_t, 3> size{40, 33, 1};
  std::map<std::string, std::vector<Image>> sites{{"A", random_images(2, 2, 1, size, 41, 20, 100)},
                                                  {"B", random_images(3, 2, 1, size, 42, 60, 10)}};
  auto fitter = make({{"mode", make_value("swap")}, {"reference_site", make_value("B")}});
  std::vector<Stats> parts;
  for (const auto& [name, images] : sites) parts.push_back(fit(*fitter, images, name));
  const Stats global = fitter->combine(parts);
  testkit::TempDir tmp;
  const std::string file = tmp.str() + "/spectra.stats";
  save_stats(global, file, "amplitude");
  ASSERT_TRUE(fs::exists(file));

  auto run = [&](Harmonizer& h) {
    Image im = random_image(2, 1, size, 43);
    h.apply(im);
    return im.data;
  };
  fitter->set_statistics(global, "A");
  auto from_file = make({{"mode", make_value("swap")},
                         {"reference_file", make_value(file)},
                         {"reference_site", make_value("B")}});
  EXPECT_FALSE(from_file->needs_fit());
  EXPECT_LE(rel_error(run(*from_file), run(*fitter)), 1e-6);

  // Without reference_site the file's federated mean is the reference: normalize, lambda 1.
  auto mean_file = make({{"mode", make_value("swap")},
                         {"reference_file", make_value(file)},
                         {"beta", make_value(0.01)}});
  auto norm = make({{"beta", make_value(0.01)}});
  norm->set_statistics(global, "A");
  EXPECT_LE(rel_error(run(*mean_file), run(*norm)), 1e-6);

  auto missing = [&] {
    make({{"mode", make_value("swap")},
          {"reference_file", make_value(file)},
          {"reference_site", make_value("nowhere")}});
  };
  EXPECT_THROW(missing(), Error);
}

// ----- images of different sizes (same field of view) -------------------------------------

namespace {

// A subject as a continuous scene on the unit square (a soft disc of "anatomy" with a few
// Gaussian blobs), sampled at pixel centres of an n x n image: the same subject at two
// resolutions, as two hospitals' X-ray detectors would record it. Style: v' = gain * v + offset.
Image scene(int subject, int64_t n, float gain = 1, float offset = 0) {
  std::mt19937_64 rng(9000 + uint64_t(subject));
  auto u = [&] { return double(rng() >> 11) * 0x1.0p-53; };
  struct Blob {
    double x, y, s, a;
  };
  std::vector<Blob> blobs;
  for (int i = 0; i < 5; ++i)
    blobs.push_back({0.25 + 0.5 * u(), 0.25 + 0.5 * u(), 0.04 + 0.1 * u(), u() < 0.5 ? -0.4 : 0.6});
  Image im(2, 1, {n, n, 1});
  for (int64_t y = 0; y < n; ++y)
    for (int64_t x = 0; x < n; ++x) {
      const double px = (double(x) + 0.5) / double(n), py = (double(y) + 0.5) / double(n);
      const double r = std::hypot(px - 0.5, py - 0.5);
      double v = 0.5 / (1 + std::exp((r - 0.35) / 0.02));  // soft disc
      for (const Blob& b : blobs)
        v += b.a * std::exp(-(std::pow(px - b.x, 2) + std::pow(py - b.y, 2)) / (2 * b.s * b.s));
      im.at(x, y) = float(gain * v + offset);
    }
  return im;
}

// 1-Wasserstein distance between two sites' pooled intensity distributions (quantiles).
double site_w1(const std::vector<Image>& a, const std::vector<Image>& b) {
  auto quantiles = [](const std::vector<Image>& set) {
    std::vector<float> v;
    for (const Image& im : set) v.insert(v.end(), im.data.begin(), im.data.end());
    std::sort(v.begin(), v.end());
    std::vector<double> q(200);
    for (size_t i = 0; i < q.size(); ++i) q[i] = v[size_t((i + 0.5) / q.size() * v.size())];
    return q;
  };
  const auto qa = quantiles(a), qb = quantiles(b);
  double d = 0;
  for (size_t i = 0; i < qa.size(); ++i) d += std::abs(qa[i] - qb[i]);
  return d / double(qa.size());
}

// Sites A and B fitted federatively (normalize, the given beta), each harmonized.
std::pair<std::vector<Image>, std::vector<Image>> normalize_two_sites(double beta,
                                                                      const std::vector<Image>& a,
                                                                      const std::vector<Image>& b) {
  auto h = make({{"beta", make_value(beta)}});
  std::vector<Stats> parts{fit(*h, a, "A"), fit(*h, b, "B")};
  const Stats global = h->combine(parts);
  std::vector<Image> ha = a, hb = b;
  h->set_statistics(global, "A");
  for (Image& im : ha) h->apply(im);
  h->set_statistics(global, "B");
  for (Image& im : hb) h->apply(im);
  return {ha, hb};
}

double image_mean(const Image& im) {
  double s = 0;
  for (float v : im.data) s += v;
  return s / double(im.data.size());
}

// The strongest single frequency of an image (DC excluded), by a 2D DFT.
double peak_bin(const Image& im) {
  cv::Mat m(int(im.size[1]), int(im.size[0]), CV_32F, const_cast<float*>(im.data.data())), f;
  cv::dft(m, f, cv::DFT_COMPLEX_OUTPUT);
  double peak = 0;
  for (int y = 0; y < f.rows; ++y)
    for (int x = 0; x < f.cols; ++x)
      if (x || y) peak = std::max(peak, double(std::abs(f.at<std::complex<float>>(y, x))));
  return peak;
}

}  // namespace

TEST(Amplitude, SameSubjectAtTwoSizesIsLeftAlmostUnchanged) {
  // Both sites hold the same subject, one at 60 x 60, the other at 96 x 96: their spectra
  // agree bin for bin in cycles per image, so normalizing to their mean changes nearly nothing.
  // (Comparing spectra at the same k / n, as amplitude did before, moved every low bin onto
  // another frequency and left grid-like ripples at a few strong bins.)
  std::map<std::string, std::vector<Image>> sites{{"A", {scene(0, 60), scene(0, 60)}},
                                                  {"B", {scene(0, 96), scene(0, 96)}}};
  for (double beta : {0.01, 0.1, 1.0}) {
    auto h = make({{"beta", make_value(beta)}});
    fit_federation(*h, sites, "A");
    for (int64_t n : {60, 96}) {
      const Image before = scene(0, n);
      Image after = before;
      h->apply(after);
      Image diff = before;
      for (size_t i = 0; i < diff.data.size(); ++i) diff.data[i] = after.data[i] - before.data[i];
      double ss = 0, sd = 0;
      const double mu = image_mean(before);
      for (size_t i = 0; i < diff.data.size(); ++i) {
        ss += std::pow(before.data[i] - mu, 2);
        sd += std::pow(diff.data[i], 2);
      }
      EXPECT_LT(std::sqrt(sd / ss), 0.1) << "beta " << beta << ", " << n << " px";
      // No artefact concentrated at a few frequencies (a grid or ripple in the image).
      EXPECT_LT(peak_bin(diff), 0.05 * peak_bin(before)) << "beta " << beta << ", " << n << " px";
      EXPECT_NEAR(image_mean(after), image_mean(before), 1e-3) << "beta " << beta;
    }
  }
}

TEST(Amplitude, SiteShiftFallsAcrossImageSizes) {
  // Two hospitals, different subjects, different detectors (60 vs 96 px) and styles.
  std::vector<Image> a, b;
  for (int i = 0; i < 6; ++i) {
    a.push_back(scene(i, 60, 1.0f, 0.1f));
    b.push_back(scene(100 + i, 96, 0.55f, 0.45f));
  }
  double pooled_before = 0;
  for (const auto* set : {&a, &b})
    for (const Image& im : *set) pooled_before += image_mean(im);
  const double before = site_w1(a, b);
  for (double beta : {0.01, 0.1, 1.0}) {
    auto [ha, hb] = normalize_two_sites(beta, a, b);
    const double after = site_w1(ha, hb);
    EXPECT_LT(after, 0.5 * before) << "beta " << beta << ": W1 " << before << " -> " << after;
    // The federation's mean brightness (the image-weighted mean of image means) is kept.
    double pooled_after = 0;
    for (const auto* set : {&ha, &hb})
      for (const Image& im : *set) pooled_after += image_mean(im);
    EXPECT_NEAR(pooled_after / 12, pooled_before / 12, 1e-3) << "beta " << beta;
  }
}

// ----- real data -----------------------------------------------------------------------------

TEST(Amplitude, NormalizeBringsProstateSitesSpectraTogether) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  const fs::path root = fs::path(testkit::shared_data()) / "multisite-prostate";
  auto load = [](const fs::path& folder) {
    std::vector<Image> out;
    std::vector<fs::path> files;
    for (const auto& f : fs::directory_iterator(folder)) files.push_back(f.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      cv::Mat m = cv::imread(f.string(), cv::IMREAD_GRAYSCALE);
      if (m.empty()) throw Error("cannot read " + f.string());
      Image im(2, 1, {m.cols, m.rows, 1});
      for (int y = 0; y < m.rows; ++y)
        for (int x = 0; x < m.cols; ++x) im.at(x, y) = m.at<uint8_t>(y, x);
      out.push_back(std::move(im));
    }
    return out;
  };
  std::map<std::string, std::vector<Image>> train, test;
  for (const char* s : {"RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"}) {
    train[s] = load(root / s / "train" / "image");
    test[s] = load(root / s / "test" / "image");
    ASSERT_FALSE(train[s].empty()) << s;
  }
  // Each site's mean per-voxel amplitude spectrum of its (held-out) test images.
  auto spectra = [&](const std::map<std::string, std::vector<Image>>& sets) {
    auto probe = make();
    std::vector<std::vector<float>> out;
    for (const auto& [name, images] : sets)
      out.push_back(probe->fit_site(source(images)).arrays.at("mean").to_vector<float>());
    return out;
  };
  auto mean_pairwise = [](const std::vector<std::vector<float>>& s) {
    double sum = 0;
    int pairs = 0;
    for (size_t i = 0; i < s.size(); ++i)
      for (size_t j = i + 1; j < s.size(); ++j, ++pairs) {
        double d = 0;
        for (size_t k = 0; k < s[i].size(); ++k) d += std::pow(double(s[i][k]) - s[j][k], 2);
        sum += std::sqrt(d);
      }
    return sum / pairs;
  };
  const double before = mean_pairwise(spectra(test));

  // Federated fit on the training images (HarmoFL: whole spectrum, lambda 1); each site then
  // harmonizes its test images.
  auto h = make({{"beta", make_value(1.0)}});
  std::vector<Stats> parts;
  for (const auto& [name, images] : train) parts.push_back(fit(*h, images, name));
  const Stats global = h->combine(parts);
  for (auto& [name, images] : test) {
    h->set_statistics(global, name);
    for (Image& im : images) h->apply(im);
  }
  const double after = mean_pairwise(spectra(test));
  RecordProperty("distance_before", std::to_string(before));
  RecordProperty("distance_after", std::to_string(after));
  std::cout << "mean pairwise spectrum distance: before " << before << ", after " << after << "\n";
  EXPECT_LT(after, 0.05 * before);
  // The default band (beta 0.01: b = 3 bins at 384 px) changes only the lowest frequencies:
  // the spectra come closer, far less than with the whole band.
  {
    for (const auto& [name, images] : train) test[name] = load(root / name / "test" / "image");
    auto d = make();
    std::vector<Stats> pd;
    for (const auto& [name, images] : train) pd.push_back(fit(*d, images, name));
    const Stats gd = d->combine(pd);
    for (auto& [name, images] : test) {
      d->set_statistics(gd, name);
      for (Image& im : images) d->apply(im);
    }
    const double low = mean_pairwise(spectra(test));
    std::cout << "with the default beta 0.01: " << low << "\n";
    EXPECT_LT(low, before);
  }

  // A partial harmonization (low band, half mix) still brings them closer, less so.
  auto part = make({{"beta", make_value(0.05)}, {"lambda", make_value(0.5)}});
  for (const auto& [name, images] : train) test[name] = load(root / name / "test" / "image");
  std::vector<Stats> parts2;
  for (const auto& [name, images] : train) parts2.push_back(fit(*part, images, name));
  const Stats global2 = part->combine(parts2);
  for (auto& [name, images] : test) {
    part->set_statistics(global2, name);
    for (Image& im : images) part->apply(im);
  }
  const double partial = mean_pairwise(spectra(test));
  std::cout << "with beta 0.05, lambda 0.5: " << partial << "\n";
  EXPECT_LT(partial, before);
  EXPECT_GT(partial, after);
}

TEST(Amplitude, RealProstateAtTwoSizesSiteShiftFalls) {
  // The real case that exposed the defect: two "hospitals" whose images differ in size (here
  // the six prostate sites, three resized to 240 px and three kept at 384 px). Harmonizing must
  // lower the site shift (W1 of pooled intensities, in units of the pooled 1-99% range).
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  const fs::path root = fs::path(testkit::shared_data()) / "multisite-prostate";
  std::vector<Image> a, b;
  for (const char* site : {"RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"})
    for (const char* split : {"train", "test"})
      for (const auto& f : fs::directory_iterator(root / site / split / "image")) {
        cv::Mat m = cv::imread(f.path().string(), cv::IMREAD_GRAYSCALE), r;
        ASSERT_FALSE(m.empty()) << f.path();
        const bool small = std::string(site) == "RUNMC" || std::string(site) == "BMC" ||
                           std::string(site) == "I2CVB";
        if (small)
          cv::resize(m, r, cv::Size(240, 240), 0, 0, cv::INTER_AREA);
        else
          r = m;
        Image im(2, 1, {r.cols, r.rows, 1});
        for (int y = 0; y < r.rows; ++y)
          for (int x = 0; x < r.cols; ++x) im.at(x, y) = r.at<uint8_t>(y, x);
        (small ? a : b).push_back(std::move(im));
      }
  auto range = [](const std::vector<Image>& x, const std::vector<Image>& y) {
    std::vector<float> v;
    for (const auto* set : {&x, &y})
      for (const Image& im : *set) v.insert(v.end(), im.data.begin(), im.data.end());
    std::sort(v.begin(), v.end());
    return double(v[v.size() * 99 / 100] - v[v.size() / 100]);
  };
  const double before = site_w1(a, b) / range(a, b);
  for (double beta : {0.01, 0.1, 1.0}) {
    auto [ha, hb] = normalize_two_sites(beta, a, b);
    const double after = site_w1(ha, hb) / range(ha, hb);
    std::cout << "beta " << beta << ": site W1 " << before << " -> " << after << "\n";
    EXPECT_LT(after, 0.8 * before) << "beta " << beta;
  }
}

TEST(Amplitude, WarnsWhenImagesOfDifferentSizesCoverDifferentFieldsOfView) {
  // Sizes are compared as one field of view at two resolutions. With a voxel spacing that says
  // otherwise (64 x 0.5 mm against 32 x 2 mm), the fit says so; a matching spacing (32 x 1 mm)
  // is silent, and so are images without one (PNG: spacing 1).
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
  auto logger = std::make_shared<spdlog::logger>("capture", sink);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  auto warnings = [&](double small_spacing) {
    Image big = scene(0, 64), small = scene(0, 32);
    big.geometry.spacing = {0.5, 0.5, 1};
    small.geometry.spacing = {small_spacing, small_spacing, 1};
    auto h = make();
    const size_t before = sink->last_formatted().size();
    h->fit_site(source({big, small}));
    return sink->last_formatted().size() - before;
  };
  const size_t differ = warnings(2.0);
  const size_t same = warnings(1.0);
  auto h = make();  // no spacing at all: silent
  h->fit_site(source({scene(0, 64), scene(0, 32)}));
  const size_t total = sink->last_formatted().size();
  spdlog::set_default_logger(previous);
  EXPECT_EQ(differ, 1u);
  EXPECT_EQ(same, 0u);
  EXPECT_EQ(total, 1u);
  ASSERT_FALSE(sink->last_formatted().empty());
  EXPECT_NE(sink->last_formatted().front().find("fields of view"), std::string::npos);
}
