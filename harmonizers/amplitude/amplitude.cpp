// amplitude: Fourier amplitude-spectrum harmonization. Phase (structure) is kept, amplitude
// (style) is moved towards a reference inside a centred low-frequency band:
//   normalize   — HarmoFL (Jiang et al., AAAI 2022): the federated, sample-weighted mean spectrum
//   interpolate — FedDG-ELCFS (Liu et al., CVPR 2021): another site's spectrum, random λ per
//                 sample (an augmentation)
//   swap        — FDA (Yang & Soatto, CVPR 2020): one site's spectrum or a saved spectrum file
// Formulas, the band window and the statistics layout are in README.md.
#include <concord/durable_output.h>
#include <concord/harmonizer.h>
#include <concord/message.h>
#include <concord/seed.h>

#include "paired_rfft2.h"

#include <fftw3.h>
#include <immintrin.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>

namespace concord {
namespace {

constexpr const char* kSitePrefix = "site/";
constexpr const char* kWeightPrefix = "weight/";

std::string where(const BuildContext& ctx) {
  return ctx.instance.empty() ? "harmonizer 'amplitude'"
                              : "harmonizer 'amplitude' (" + ctx.instance + ")";
}

// The shape of one image: spatial sizes (nz == 1 for 2D) and channel count.
struct Grid {
  int dim = 2;
  int channels = 1;
  int64_t nx = 0, ny = 0, nz = 1;

  int64_t voxels() const { return nx * ny * nz; }
  int64_t nxh() const { return nx / 2 + 1; }        // r2c last axis
  int64_t half() const { return nz * ny * nxh(); }  // half-spectrum bins per channel
  bool operator==(const Grid& o) const {
    return dim == o.dim && channels == o.channels && nx == o.nx && ny == o.ny && nz == o.nz;
  }
  bool operator!=(const Grid& o) const { return !(*this == o); }
  bool operator<(const Grid& o) const {
    return std::tie(dim, channels, nz, ny, nx) < std::tie(o.dim, o.channels, o.nz, o.ny, o.nx);
  }
  std::string str() const {
    std::ostringstream s;
    s << nx << "x" << ny;
    if (dim == 3) s << "x" << nz;
    s << " (" << channels << (channels == 1 ? " channel)" : " channels)");
    return s.str();
  }
};

Grid grid_of(const Image& im, const std::string& who) {
  if (im.dim != 2 && im.dim != 3)
    throw Error(who + ": images must be 2D or 3D, got dim " + std::to_string(im.dim));
  if (im.dim == 2 && im.size[2] != 1) throw Error(who + ": a 2D image must have size z == 1");
  if (im.channels < 1 || im.size[0] < 1 || im.size[1] < 1 || im.size[2] < 1)
    throw Error(who + ": empty image");
  Grid g;
  g.dim = im.dim;
  g.channels = im.channels;
  g.nx = im.size[0];
  g.ny = im.size[1];
  g.nz = im.size[2];
  if (int64_t(im.data.size()) != g.channels * g.voxels())
    throw Error(who + ": image data holds " + std::to_string(im.data.size()) +
                " values, its size says " + std::to_string(g.channels * g.voxels()));
  return g;
}

// Half-width b of the centred low-frequency window: floor(min(sizes) * beta), over the axes
// of size > 1 (a 1-voxel axis has only its DC bin). beta = 1 is the whole spectrum whatever the
// aspect ratio: b = max(sizes) / 2 (floor(min * 1) would leave out the high frequencies of an
// axis more than twice as long as the shortest). `g` is the reference's grid, so that images of
// every size get the same band in cycles per image.
int64_t band_halfwidth(const Grid& g, double beta) {
  if (beta >= 1) return std::max({g.nx / 2, g.ny / 2, g.nz / 2});
  int64_t m = std::numeric_limits<int64_t>::max();
  for (int64_t n : {g.nx, g.ny, g.nz})
    if (n > 1) m = std::min(m, n);
  if (m == std::numeric_limits<int64_t>::max()) return 0;
  return int64_t(std::floor(double(m) * beta));
}

// The band on one image, per axis: |k_d| <= b_d with b_d = min(b, the reference grid's highest
// frequency n_ref/2, the image's n/2). Frequencies above the reference's (an image larger than
// the grid the spectra were fitted on) are never changed: the reference knows nothing there.
struct Band {
  int64_t x = 0, y = 0, z = 0;
  bool dc_only() const { return x == 0 && y == 0 && z == 0; }
  // True when the window holds every bin of the image grid g.
  bool whole(const Grid& g) const { return x >= g.nx / 2 && y >= g.ny / 2 && z >= g.nz / 2; }
};
Band band_of(const Grid& image, const Grid& ref, double beta) {
  const int64_t b = band_halfwidth(ref, beta);
  return {std::min({b, ref.nx / 2, image.nx / 2}), std::min({b, ref.ny / 2, image.ny / 2}),
          std::min({b, ref.nz / 2, image.nz / 2})};
}

// Indices i of an axis of size n whose signed frequency k (numpy.fft.fftfreq * n) has |k| <= b.
std::vector<int64_t> band_indices(int64_t n, int64_t b) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i)
    if (std::min(i, n - i) <= b) out.push_back(i);
  return out;
}

int64_t signed_freq(int64_t i, int64_t n) {
  return i < (n + 1) / 2 ? i : i - n;
}

// ---------------------------------------------------------------------------------------------
// FFTW plans: one (r2c, c2r) pair per (shape, planner flag), made once under a mutex and cached
// for the process. Execution uses the new-array interface, which is thread-safe.

struct Plans {
  fftwf_plan r2c = nullptr;
  fftwf_plan c2r = nullptr;
  // 2D, AVX-512 CPU, power-of-two height, even width: the faster paired transform (same layout
  // and scaling as r2c / c2r); null otherwise.
  std::unique_ptr<PairedRfft2> paired;
  int alignment = 0;  // fftwf_alignment_of of the planning arrays
};

std::string wisdom_file() {
  if (const char* w = std::getenv("CONCORD_FFTW_WISDOM")) return w;  // "" disables
  std::string base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x)
    base = x;
  else if (const char* h = std::getenv("HOME"); h && *h)
    base = std::string(h) + "/.cache";
  else
    return "";
  return base + "/concord/fftw-wisdom-f32";
}

class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache* cache = new PlanCache;  // never destroyed: plans live for the process
    return *cache;
  }

  const Plans& get(const Grid& g, unsigned flags) {
    Key key{g.dim, g.nx, g.ny, g.nz, flags};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return *it->second;
    if (!wisdom_loaded_) {
      wisdom_loaded_ = true;
      // Other plugins in the process may plan too: make FFTW's planner itself thread-safe.
      fftwf_make_planner_thread_safe();
      const std::string file = wisdom_file();
      if (!file.empty() && std::filesystem::exists(file) &&
          !fftwf_import_wisdom_from_filename(file.c_str()))
        spdlog::debug("amplitude: could not read FFTW wisdom '{}'", file);
    }
    int n[3];
    int rank = g.dim;
    if (rank == 3) {
      n[0] = int(g.nz), n[1] = int(g.ny), n[2] = int(g.nx);
    } else {
      n[0] = int(g.ny), n[1] = int(g.nx);
    }
    // MEASURE overwrites its arrays while planning: plan on scratch arrays of the right size.
    float* real = fftwf_alloc_real(size_t(g.voxels()));
    fftwf_complex* spec = fftwf_alloc_complex(size_t(g.half()));
    auto p = std::make_unique<Plans>();
    p->r2c = fftwf_plan_dft_r2c(rank, n, real, spec, flags);
    p->c2r = fftwf_plan_dft_c2r(rank, n, spec, real, flags);
    p->alignment = fftwf_alignment_of(real);
    const bool aligned_same = fftwf_alignment_of(reinterpret_cast<float*>(spec)) == p->alignment;
    fftwf_free(real);
    fftwf_free(spec);
    if (!p->r2c || !p->c2r || !aligned_same)
      throw Error("amplitude: FFTW could not plan a transform of size " + g.str());
    if (g.dim == 2 && PairedRfft2::preferred(g.nx, g.ny))
      p->paired = std::make_unique<PairedRfft2>(g.nx, g.ny, flags);
    if (!(flags & FFTW_ESTIMATE)) save_wisdom();
    return *(plans_[key] = std::move(p));
  }

 private:
  using Key = std::tuple<int, int64_t, int64_t, int64_t, unsigned>;
  std::mutex mutex_;
  std::map<Key, std::unique_ptr<Plans>> plans_;
  bool wisdom_loaded_ = false;

  // Best effort: a read-only home only costs the next process its planning time.
  static void save_wisdom() {
    const std::string file = wisdom_file();
    if (file.empty()) return;
    char* text = fftwf_export_wisdom_to_string();
    if (!text) return;
    std::string s(text);
    std::free(text);
    try {
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::path(file).parent_path(), ec);
      write_file_atomic(file, s);
    } catch (const std::exception& e) {
      spdlog::debug("amplitude: could not write FFTW wisdom '{}': {}", file, e.what());
    }
  }
};

// Per-thread scratch arrays from fftwf_malloc (the alignment the plans were made with).
struct Scratch {
  float* real = nullptr;
  fftwf_complex* spec = nullptr;
  size_t real_cap = 0, spec_cap = 0;
  ~Scratch() {
    fftwf_free(real);
    fftwf_free(spec);
  }
  void reserve(const Grid& g) {
    if (size_t(g.voxels()) > real_cap) {
      fftwf_free(real);
      real_cap = size_t(g.voxels());
      real = fftwf_alloc_real(real_cap);
    }
    if (size_t(g.half()) > spec_cap) {
      fftwf_free(spec);
      spec_cap = size_t(g.half());
      spec = fftwf_alloc_complex(spec_cap);
    }
    if (!real || !spec) throw Error("amplitude: out of memory for a transform of " + g.str());
  }
};

Scratch& scratch(const Grid& g) {
  thread_local Scratch s;
  s.reserve(g);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Amplitude spectra: per-voxel amplitude a(k) = |X(k)| / N on the r2c half layout
// [channel][z][y][x < nx/2+1], in float32 (what crosses the wire).

struct Spectrum {
  Grid grid;
  std::vector<float> a;  // channels * grid.half()

  // Value at full-spectrum indices (any integers: wrapped periodically), using the Hermitian
  // symmetry a(-k) = a(k) of real images for the half that r2c does not store.
  float at(int c, int64_t z, int64_t y, int64_t x) const {
    const Grid& g = grid;
    z = ((z % g.nz) + g.nz) % g.nz;
    y = ((y % g.ny) + g.ny) % g.ny;
    x = ((x % g.nx) + g.nx) % g.nx;
    if (x >= g.nxh()) {
      x = g.nx - x;
      z = (g.nz - z) % g.nz;
      y = (g.ny - y) % g.ny;
    }
    return a[size_t(((c * g.nz + z) * g.ny + y) * g.nxh() + x)];
  }
};

// Spectra of images of different sizes are compared at the same frequency in cycles per image
// (bin k of an n-voxel axis, whatever n): images of one field of view at different resolutions
// (X-rays of 640 and 1024 pixels, ROI crops resized) then have the same per-voxel amplitude
// a(k) = |X(k)| / N ~ |G(k)|, the continuous image's Fourier coefficient. (Comparing at the same
// k / n instead, as before, laid the steep low-frequency spectrum of one size onto other bins
// of the other: it raised the site shift it should lower on real data.)
//
// The common grid of several spectra: the smallest size on each axis, so that every spectrum
// holds every bin of it (no frequency is invented above a spectrum's Nyquist).
Grid common_grid(const Grid& a, const Grid& b) {
  Grid g = a;
  g.nx = std::min(a.nx, b.nx);
  g.ny = std::min(a.ny, b.ny);
  g.nz = std::min(a.nz, b.nz);
  return g;
}

// Where one target axis reads the source: per target index, the source frequencies and their
// weights. Bin k reads bin k; none above the source's highest frequency |k| > n_source / 2. The
// Nyquist bin of an even target (|k| = n / 2 stands for +k and -k at once) averages the
// source's +k and -k when the source holds them apart, which keeps the target Hermitian.
struct AxisMap {
  std::vector<std::vector<std::pair<int64_t, double>>> from;
};
AxisMap axis_map(int64_t n_target, int64_t count, int64_t n_source, bool half_axis) {
  AxisMap m;
  m.from.resize(size_t(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = half_axis ? i : signed_freq(i, n_target);
    if (std::abs(k) > n_source / 2) continue;
    const bool nyquist = n_target % 2 == 0 && std::abs(k) == n_target / 2;
    const bool apart = nyquist && std::abs(k) <= (n_source - 1) / 2;
    if (apart)
      m.from[size_t(i)] = {{k, 0.5}, {-k, 0.5}};
    else
      m.from[size_t(i)] = {{k, 1.0}};
  }
  return m;
}

// The spectrum on another grid (axis_map on each axis); the identity on the same grid.
Spectrum resample(const Spectrum& s, const Grid& target) {
  if (s.grid == target) return s;
  Spectrum out;
  out.grid = target;
  const Grid& t = target;
  out.a.assign(size_t(t.channels * t.half()), 0.0f);
  const AxisMap mz = axis_map(t.nz, t.nz, s.grid.nz, false);
  const AxisMap my = axis_map(t.ny, t.ny, s.grid.ny, false);
  const AxisMap mx = axis_map(t.nx, t.nxh(), s.grid.nx, true);
  size_t o = 0;
  for (int c = 0; c < t.channels; ++c)
    for (int64_t z = 0; z < t.nz; ++z)
      for (int64_t y = 0; y < t.ny; ++y)
        for (int64_t x = 0; x < t.nxh(); ++x, ++o) {
          double v = 0;
          for (const auto& [kz, wz] : mz.from[size_t(z)])
            for (const auto& [ky, wy] : my.from[size_t(y)])
              for (const auto& [kx, wx] : mx.from[size_t(x)])
                v += wz * wy * wx * s.at(c, kz, ky, kx);
          out.a[o] = float(v);
        }
  return out;
}

Grid grid_from_scalars(const Stats& s, const std::string& who) {
  for (const char* k : {"dim", "channels", "nx", "ny", "nz"})
    if (!s.scalars.count(k))
      throw Error(who + ": statistics lack the scalar '" + k +
                  "' (not amplitude statistics, or from an incompatible version)");
  Grid g;
  g.dim = int(s.scalars.at("dim"));
  g.channels = int(s.scalars.at("channels"));
  g.nx = int64_t(s.scalars.at("nx"));
  g.ny = int64_t(s.scalars.at("ny"));
  g.nz = int64_t(s.scalars.at("nz"));
  if ((g.dim != 2 && g.dim != 3) || g.channels < 1 || g.nx < 1 || g.ny < 1 || g.nz < 1 ||
      (g.dim == 2 && g.nz != 1))
    throw Error(who + ": statistics hold an invalid grid " + g.str());
  return g;
}

void put_grid(Stats& s, const Grid& g) {
  s.scalars["dim"] = g.dim;
  s.scalars["channels"] = g.channels;
  s.scalars["nx"] = double(g.nx);
  s.scalars["ny"] = double(g.ny);
  s.scalars["nz"] = double(g.nz);
}

Spectrum spectrum_from(const Stats& s, const Grid& g, const std::string& key,
                       const std::string& who) {
  auto it = s.arrays.find(key);
  if (it == s.arrays.end()) throw Error(who + ": statistics lack the spectrum '" + key + "'");
  const Array& arr = it->second;
  const std::vector<int64_t> want{g.channels, g.nz, g.ny, g.nxh()};
  if (arr.shape() != want)
    throw Error(who + ": spectrum '" + key + "' does not match the grid " + g.str());
  Array f = arr.dtype() == DType::F32 ? arr : arr.to_f32();
  Spectrum sp;
  sp.grid = g;
  sp.a = f.to_vector<float>();
  return sp;
}

Array to_array(const Spectrum& s) {
  const Grid& g = s.grid;
  return Array::from(s.a, {g.channels, g.nz, g.ny, g.nxh()});
}

std::vector<std::string> site_names(const Stats& s) {
  std::vector<std::string> out;
  const std::string p = kSitePrefix;
  for (const auto& [k, v] : s.arrays)
    if (k.compare(0, p.size(), p) == 0) out.push_back(k.substr(p.size()));
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return "[" + s + "]";
}

// One row of the band: X' = X * (keep + t / |X|) with t = lam * ref, and X' = t where X = 0.
// The caller folds the inverse transform's 1/N into keep and lam when the band is the whole
// spectrum. Amplitudes below FLT_MIN (~1e-19, far under float32 FFT rounding) count as zero.
void mix_row_scalar(float* __restrict v, const float* __restrict ref, int64_t count, float keep,
                    float lam) {
  for (int64_t i = 0; i < count; ++i) {
    const float re = v[2 * i], im = v[2 * i + 1];
    const float a2 = re * re + im * im;
    const float target = lam * ref[i];
    const float f = keep + target / std::sqrt(std::max(a2, std::numeric_limits<float>::min()));
    const float at_zero = a2 > 0.0f ? 0.0f : target;  // re = im = 0 there: X' = A'
    v[2 * i] = re * f + at_zero;
    v[2 * i + 1] = im * f;
  }
}

// The same with AVX2 + FMA, eight bins per step. 1/|X| comes from the hardware reciprocal square
// root refined by one Newton step (relative error ~3e-7, the order of float32 FFT rounding)
// instead of a square root and a division, which cost as much as a third of the FFT round trip.
__attribute__((target("avx2,fma"))) void mix_row_avx2(float* __restrict v,
                                                      const float* __restrict ref, int64_t count,
                                                      float keep, float lam) {
  const __m256 vkeep = _mm256_set1_ps(keep), vlam = _mm256_set1_ps(lam);
  const __m256 tiny = _mm256_set1_ps(std::numeric_limits<float>::min());
  const __m256 half = _mm256_set1_ps(0.5f), three_halves = _mm256_set1_ps(1.5f);
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 lo = _mm256_loadu_ps(v + 2 * i), hi = _mm256_loadu_ps(v + 2 * i + 8);
    // Split interleaved (re, im): per 128-bit lane, bins in the order 0 1 4 5 | 2 3 6 7.
    const __m256 re = _mm256_shuffle_ps(lo, hi, 0x88), im = _mm256_shuffle_ps(lo, hi, 0xdd);
    const __m256 a2 = _mm256_fmadd_ps(re, re, _mm256_mul_ps(im, im));
    const __m256 m = _mm256_max_ps(a2, tiny);
    __m256 r = _mm256_rsqrt_ps(m);
    // Newton: r (1.5 - (m r) r / 2), in this order: m / 2 would be subnormal for m = FLT_MIN
    // (a zero bin), and subnormal operands cost a microcode assist each (25x slower mixes on
    // images with many zero bins).
    r = _mm256_mul_ps(r,
                      _mm256_fnmadd_ps(_mm256_mul_ps(half, _mm256_mul_ps(m, r)), r, three_halves));
    // The reference in the same 0 1 4 5 | 2 3 6 7 order.
    const __m256 rf =
        _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(ref + i)), 0xd8));
    const __m256 t = _mm256_mul_ps(vlam, rf);
    const __m256 f = _mm256_fmadd_ps(t, r, vkeep);
    const __m256 at_zero = _mm256_and_ps(_mm256_cmp_ps(a2, zero, _CMP_EQ_OQ), t);
    const __m256 nre = _mm256_fmadd_ps(re, f, at_zero), nim = _mm256_mul_ps(im, f);
    _mm256_storeu_ps(v + 2 * i, _mm256_unpacklo_ps(nre, nim));
    _mm256_storeu_ps(v + 2 * i + 8, _mm256_unpackhi_ps(nre, nim));
  }
  mix_row_scalar(v + 2 * i, ref + i, count - i, keep, lam);
}

using MixRow = void (*)(float*, const float*, int64_t, float, float);
MixRow pick_mix_row() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? mix_row_avx2
                                                                         : mix_row_scalar;
}
const MixRow mix_row = pick_mix_row();

enum class Mode { Normalize, Interpolate, Swap };
enum class Clip { None, Nonnegative, Input };

// ---------------------------------------------------------------------------------------------

class Amplitude : public Harmonizer {
 public:
  Amplitude(const Args& args, const BuildContext& ctx) : who_(where(ctx)) {
    const std::string& mode = args.str("mode");
    mode_ = mode == "normalize" ? Mode::Normalize : mode == "swap" ? Mode::Swap : Mode::Interpolate;
    beta_ = args.has("beta")             ? args.real("beta")
            : mode_ == Mode::Normalize   ? 0.01
            : mode_ == Mode::Interpolate ? 0.1
                                         : 0.01;
    lambda_ = float(args.real("lambda"));
    lambda_min_ = args.real("lambda_min");
    lambda_max_ = args.real("lambda_max");
    if (lambda_min_ > lambda_max_)
      throw Error(who_ + ": lambda_min (" + std::to_string(lambda_min_) +
                  ") is larger than lambda_max (" + std::to_string(lambda_max_) + ")");
    const std::string& clip = args.str("clip");
    clip_ = clip == "none" ? Clip::None : clip == "nonnegative" ? Clip::Nonnegative : Clip::Input;
    const std::string& planner = args.str("fftw_planner");
    flags_ = planner == "estimate"  ? FFTW_ESTIMATE
             : planner == "patient" ? FFTW_PATIENT
                                    : FFTW_MEASURE;
    dc_fast_path_ = args.flag("dc_fast_path");
    paired_ = args.str("transform") == "auto";
    if (args.has("reference_site")) reference_site_ = args.str("reference_site");
    if (args.has("reference_file")) reference_file_ = args.str("reference_file");
    if (mode_ != Mode::Swap && (!reference_site_.empty() || !reference_file_.empty()))
      throw Error(who_ + ": reference_site / reference_file are only used by mode 'swap'");
    if (mode_ == Mode::Swap && reference_site_.empty() && reference_file_.empty())
      throw Error(who_ + ": mode 'swap' needs reference_site or reference_file");
    if (!reference_file_.empty()) {
      std::string method;
      Stats s = load_stats(reference_file_, &method);
      if (!method.empty() && method != "amplitude")
        throw Error(who_ + ": '" + reference_file_ + "' holds statistics of harmonizer '" + method +
                    "', not 'amplitude'");
      const std::string who = who_ + ", reference file '" + reference_file_ + "'";
      const Grid g = grid_from_scalars(s, who);
      std::string key = "mean";
      if (!reference_site_.empty()) {
        key = kSitePrefix + reference_site_;
        if (!s.arrays.count(key))
          throw Error(who + ": no spectrum for site '" + reference_site_ + "'; it holds sites " +
                      join(site_names(s)));
      }
      references_.push_back(std::make_shared<Reference>(spectrum_from(s, g, key, who)));
      ready_ = true;
    }
  }

  bool needs_fit() const override { return reference_file_.empty(); }
  bool augments() const override { return mode_ == Mode::Interpolate; }

  Stats fit_site(const ImageSource& images) override {
    // Sum of per-voxel amplitudes per image shape, in double.
    std::map<Grid, std::pair<std::vector<double>, int64_t>> groups;
    std::vector<Grid> order;                    // first-seen order, for a deterministic tie break
    std::vector<std::array<double, 3>> fields;  // per shape: size x spacing of its first image
    bool spacing_known = false;
    int channels = -1, dim = -1;
    images([&](const Image& im) {
      const Grid g = grid_of(im, who_ + " fit");
      if (channels < 0) channels = g.channels, dim = g.dim;
      if (g.channels != channels || g.dim != dim)
        throw Error(who_ + " fit: images mix shapes " + g.str() + " and " + std::to_string(dim) +
                    "D with " + std::to_string(channels) + " channels");
      auto [it, fresh] = groups.try_emplace(g);
      if (fresh) {
        it->second.first.assign(size_t(g.channels * g.half()), 0.0);
        order.push_back(g);
        const auto& sp = im.geometry.spacing;
        fields.push_back({double(g.nx) * sp[0], double(g.ny) * sp[1], double(g.nz) * sp[2]});
        spacing_known = spacing_known || sp != std::array<double, 3>{1, 1, 1};
      }
      accumulate(im, g, it->second.first.data());
      ++it->second.second;
    });
    Stats out;
    if (groups.empty()) return out;  // a site without images: weight 0, ignored by combine
    warn_if_fields_differ(order, fields, spacing_known);
    // The site's grid: the smallest size on each axis over its image shapes (common_grid).
    Grid best = order.front();
    for (const Grid& g : order) best = common_grid(best, g);
    std::vector<double> mean(size_t(best.channels * best.half()), 0.0);
    int64_t total = 0;
    for (const Grid& g : order) {
      const auto& [sum, count] = groups[g];
      Spectrum s;
      s.grid = g;
      s.a.resize(sum.size());
      if (g == best) {  // no float rounding before the division on the common grid
        for (size_t i = 0; i < sum.size(); ++i) mean[i] += sum[i];
      } else {
        for (size_t i = 0; i < sum.size(); ++i) s.a[i] = float(sum[i] / double(count));
        const Spectrum r = resample(s, best);
        for (size_t i = 0; i < mean.size(); ++i) mean[i] += double(r.a[i]) * double(count);
      }
      total += count;
    }
    Spectrum m;
    m.grid = best;
    m.a.resize(mean.size());
    for (size_t i = 0; i < mean.size(); ++i) m.a[i] = float(mean[i] / double(total));
    out.arrays["mean"] = to_array(m);
    put_grid(out, best);
    out.weight = double(total);
    return out;
  }

  Stats combine(const std::vector<Stats>& parts) override {
    struct Part {
      Spectrum mean;
      double weight;
    };
    std::vector<Part> means;
    std::map<std::string, Part> sites;
    for (size_t i = 0; i < parts.size(); ++i) {
      const Stats& p = parts[i];
      if (p.weight <= 0 && p.arrays.empty()) continue;  // a site without images
      const std::string who =
          who_ + " combine, " +
          (p.site.empty() ? "part " + std::to_string(i) : "site '" + p.site + "'");
      if (p.weight <= 0) throw Error(who + ": non-positive weight " + std::to_string(p.weight));
      const Grid g = grid_from_scalars(p, who);
      means.push_back({spectrum_from(p, g, "mean", who), p.weight});
      if (mode_ == Mode::Normalize) continue;  // only the mean is broadcast
      auto add_site = [&](const std::string& name, Spectrum s, double w) {
        if (!sites.emplace(name, Part{std::move(s), w}).second)
          throw Error(who + ": site '" + name + "' appears twice among the statistics combined");
      };
      const std::vector<std::string> named = site_names(p);
      for (const std::string& name : named) {
        auto w = p.scalars.find(kWeightPrefix + name);
        if (w == p.scalars.end()) throw Error(who + ": no weight for site '" + name + "'");
        add_site(name, spectrum_from(p, g, kSitePrefix + name, who), w->second);
      }
      if (named.empty() && !p.site.empty()) add_site(p.site, means.back().mean, p.weight);
    }
    if (means.empty())
      throw Error(who_ + " combine: no site contributed any image to the amplitude statistics");
    // The common grid: the smallest size on each axis over the parts (common_grid).
    Grid grid = means.front().mean.grid;
    for (const Part& p : means) {
      const Grid& g = p.mean.grid;
      if (g.dim != grid.dim || g.channels != grid.channels)
        throw Error(who_ + " combine: statistics of grids " + g.str() + " and " + grid.str() +
                    " cannot be combined (dimension or channel count differ)");
      grid = common_grid(grid, g);
    }
    for (const auto& [name, p] : sites)
      if (p.mean.grid.dim != grid.dim || p.mean.grid.channels != grid.channels)
        throw Error(who_ + " combine: site '" + name + "' has grid " + p.mean.grid.str() +
                    ", others " + grid.str());
    Stats out;
    double total = 0;
    std::vector<double> acc(size_t(grid.channels * grid.half()), 0.0);
    for (const Part& p : means) {
      const Spectrum r = resample(p.mean, grid);
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += p.weight * double(r.a[i]);
      total += p.weight;
    }
    Spectrum m;
    m.grid = grid;
    m.a.resize(acc.size());
    for (size_t i = 0; i < acc.size(); ++i) m.a[i] = float(acc[i] / total);
    out.arrays["mean"] = to_array(m);
    for (const auto& [name, p] : sites) {
      out.arrays[kSitePrefix + name] = to_array(resample(p.mean, grid));
      out.scalars[kWeightPrefix + name] = p.weight;
    }
    put_grid(out, grid);
    out.weight = total;
    return out;
  }

  void set_statistics(const Stats& global, const std::string& site) override {
    local_site_ = site;
    if (!reference_file_.empty()) return;  // swap against a saved spectrum: nothing to learn
    const std::string who = who_ + " at site '" + site + "'";
    const Grid g = grid_from_scalars(global, who);
    references_.clear();
    reference_names_.clear();
    if (mode_ == Mode::Normalize) {
      references_.push_back(std::make_shared<Reference>(spectrum_from(global, g, "mean", who)));
    } else if (mode_ == Mode::Swap) {
      const std::string key = kSitePrefix + reference_site_;
      if (!global.arrays.count(key))
        throw Error(who + ": the global statistics hold no spectrum of reference_site '" +
                    reference_site_ + "'; sites: " + join(site_names(global)) +
                    " (the caller must set Stats::site on each fit result)");
      references_.push_back(std::make_shared<Reference>(spectrum_from(global, g, key, who)));
    } else {
      for (const std::string& name : site_names(global)) {
        if (name == site) continue;
        references_.push_back(
            std::make_shared<Reference>(spectrum_from(global, g, kSitePrefix + name, who)));
        reference_names_.push_back(name);
      }
      if (references_.empty())
        throw Error(who +
                    ": mode 'interpolate' needs another site's spectrum; the global "
                    "statistics hold sites " +
                    join(site_names(global)) +
                    " (the caller must set Stats::site on each fit result)");
      spdlog::debug("{}: interpolate draws from sites {}", who, join(reference_names_));
    }
    ready_ = true;
  }

  void apply(Image& image) const override {
    if (mode_ == Mode::Interpolate) return;  // an augmentation: fixed transform is identity
    require_ready();
    transform(image, *references_.front(), lambda_);
  }

  void augment(Image& image, std::mt19937_64& rng) const override {
    if (mode_ != Mode::Interpolate) return;
    require_ready();
    // Draw order (documented): the other site first, then λ.
    const size_t pick =
        std::min(references_.size() - 1, size_t(uniform01(rng) * double(references_.size())));
    const double lam = lambda_min_ + (lambda_max_ - lambda_min_) * uniform01(rng);
    transform(image, *references_[pick], float(lam));
  }

 private:
  // A reference spectrum and, per image grid, its amplitudes N * a(k) resampled to that grid.
  struct Reference {
    explicit Reference(Spectrum s) : spectrum(std::move(s)) {}
    Spectrum spectrum;
    mutable std::mutex mutex;
    mutable std::map<Grid, std::shared_ptr<const std::vector<float>>> scaled;
  };

  std::string who_;
  Mode mode_ = Mode::Normalize;
  double beta_ = 1;
  float lambda_ = 1;
  double lambda_min_ = 0, lambda_max_ = 1;
  Clip clip_ = Clip::None;
  unsigned flags_ = FFTW_MEASURE;
  bool dc_fast_path_ = true;
  bool paired_ = true;  // transform: auto
  std::string reference_site_, reference_file_, local_site_;
  std::vector<std::shared_ptr<Reference>> references_;
  std::vector<std::string> reference_names_;
  bool ready_ = false;

  // Spectra of different sizes are compared in cycles per image, which assumes one field of
  // view at different resolutions (README). When the images carry a voxel spacing and their
  // fields of view differ by more than 10%, that assumption is wrong: say so.
  void warn_if_fields_differ(const std::vector<Grid>& shapes,
                             const std::vector<std::array<double, 3>>& fields,
                             bool spacing_known) const {
    if (!spacing_known) return;
    for (size_t i = 1; i < shapes.size(); ++i)
      for (int d = 0; d < 3; ++d) {
        const double a = fields[0][size_t(d)], b = fields[i][size_t(d)];
        if (std::abs(a - b) > 0.1 * std::max(a, b)) {
          spdlog::warn(
              "{} fit: images of {} and {} cover different fields of view ({:.1f} vs {:.1f} "
              "along axis {}); amplitude compares spectra of different sizes at the same "
              "frequency in cycles per image, which assumes one field of view at different "
              "resolutions: resample the images to one field of view first",
              who_, shapes[0].str(), shapes[i].str(), a, b, "xyz"[d]);
          return;
        }
      }
  }

  void require_ready() const {
    if (!ready_)
      throw Error(who_ + ": no statistics: run the fit phase (set_statistics) before apply");
  }

  std::shared_ptr<const std::vector<float>> scaled_reference(const Reference& ref,
                                                             const Grid& g) const {
    std::lock_guard<std::mutex> lock(ref.mutex);
    auto it = ref.scaled.find(g);
    if (it != ref.scaled.end()) return it->second;
    const Grid& rg = ref.spectrum.grid;
    if (rg.dim != g.dim || rg.channels != g.channels)
      throw Error(who_ + (local_site_.empty() ? "" : " at site '" + local_site_ + "'") +
                  ": image " + g.str() + " does not match the statistics' " + rg.str());
    Spectrum r = resample(ref.spectrum, g);
    const float n = float(g.voxels());
    for (float& v : r.a) v *= n;
    auto p = std::make_shared<const std::vector<float>>(std::move(r.a));
    ref.scaled.emplace(g, p);
    return p;
  }

  void accumulate(const Image& im, const Grid& g, double* sum) const {
    const Plans& plans = PlanCache::instance().get(g, flags_);
    Scratch& s = scratch(g);
    const double inv_n = 1.0 / double(g.voxels());
    const int64_t h = g.half();
    const PairedRfft2* paired = paired_ ? plans.paired.get() : nullptr;
    for (int c = 0; c < g.channels; ++c) {
      if (paired) {
        paired->forward(im.channel(c), s.spec);  // reads its input without changing it
      } else {
        std::memcpy(s.real, im.channel(c), size_t(g.voxels()) * sizeof(float));
        fftwf_execute_dft_r2c(plans.r2c, s.real, s.spec);
      }
      double* out = sum + c * h;
      for (int64_t i = 0; i < h; ++i) {
        const double re = s.spec[i][0], im_ = s.spec[i][1];
        out[i] += std::sqrt(re * re + im_ * im_) * inv_n;
      }
    }
  }

  void transform(Image& image, const Reference& ref, float lam) const {
    const Grid g = grid_of(image, who_);
    const auto rn = scaled_reference(ref, g);
    const Band b = band_of(g, ref.spectrum.grid, beta_);
    const int64_t n = g.voxels(), h = g.half();
    const float keep = 1.0f - lam;
    for (int c = 0; c < g.channels; ++c) {
      float* x = image.channel(c);
      const float* r = rn->data() + c * h;
      float lo = 0, hi = 0;
      if (clip_ == Clip::Input) {
        auto [mn, mx] = std::minmax_element(x, x + n);
        lo = *mn, hi = *mx;
      }
      if (b.dc_only() && dc_fast_path_) {
        // Only the DC bin X(0) = sum(x) changes: shift every voxel by (X'(0) - X(0)) / N.
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += x[i];
        const double a = std::abs(sum);
        const double a2 = (1.0 - double(lam)) * a + double(lam) * double(r[0]);
        const double dc = sum < 0 ? -a2 : a2;  // phase of a real DC: 0 or pi (0 when X(0) = 0)
        const float shift = float((dc - sum) / double(n));
        for (int64_t i = 0; i < n; ++i) x[i] += shift;
        finish(x, x, n, 1.0f, lo, hi);
        continue;
      }
      const Plans& plans = PlanCache::instance().get(g, flags_);
      Scratch& s = scratch(g);
      const bool direct = fftwf_alignment_of(x) == plans.alignment;
      float* in = x;
      if (!direct) {
        std::memcpy(s.real, x, size_t(n) * sizeof(float));
        in = s.real;
      }
      const PairedRfft2* paired = paired_ ? plans.paired.get() : nullptr;
      if (paired)
        paired->forward(in, s.spec);
      else
        fftwf_execute_dft_r2c(plans.r2c, in, s.spec);
      // The inverse transform's 1/N: folded into the mix when it visits every bin (saves a pass
      // over the image), else applied while writing the result.
      const float inv_n = 1.0f / float(n);
      const bool whole = b.whole(g);
      const float fold = whole ? inv_n : 1.0f;
      mix_band(s.spec, r, g, b, keep * fold, lam * fold);
      float* out = direct ? x : s.real;
      if (paired)
        paired->inverse(s.spec, out);
      else
        fftwf_execute_dft_c2r(plans.c2r, s.spec, out);
      finish(out, x, n, whole ? 1.0f : inv_n, lo, hi);
    }
  }

  // Inside the band: A' = (1 - λ)A + λ·N·a_ref, phase kept: X' = X·A'/A (X' = A' where A = 0).
  static void mix_band(fftwf_complex* spec, const float* rn, const Grid& g, const Band& b,
                       float keep, float lam) {
    const int64_t nxh = g.nxh();
    const int64_t xe = std::min(b.x, nxh - 1) + 1;
    if (b.whole(g)) {  // every bin: one sweep
      mix_row(reinterpret_cast<float*>(spec), rn, g.half(), keep, lam);
      return;
    }
    const std::vector<int64_t> zs = band_indices(g.nz, b.z), ys = band_indices(g.ny, b.y);
    for (int64_t z : zs)
      for (int64_t y : ys) {
        const int64_t row = (z * g.ny + y) * nxh;
        mix_row(reinterpret_cast<float*>(spec + row), rn + row, xe, keep, lam);
      }
  }
  // Writes out[i] * scale to x with the clip policy.
  void finish(const float* out, float* x, int64_t n, float scale, float lo, float hi) const {
    switch (clip_) {
      case Clip::None:
        if (scale != 1.0f || out != x)
          for (int64_t i = 0; i < n; ++i) x[i] = out[i] * scale;
        break;
      case Clip::Nonnegative:
        for (int64_t i = 0; i < n; ++i) x[i] = std::max(out[i] * scale, 0.0f);
        break;
      case Clip::Input:
        for (int64_t i = 0; i < n; ++i) x[i] = std::min(std::max(out[i] * scale, lo), hi);
        break;
    }
  }
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-amplitude", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Harmonizer,
       "amplitude",
       "Fourier amplitude-spectrum harmonization: normalize (HarmoFL), interpolate (FedDG), "
       "swap (FDA)",
       {
           ArgSpec::choice("mode", {"normalize", "interpolate", "swap"}, "normalize",
                           "normalize: federated mean spectrum; interpolate: mix with another "
                           "site's spectrum per sample (augmentation); swap: a reference spectrum"),
           ArgSpec::real(
               "beta", 1.0,
               "band: half-width b = floor(min(size) * beta) of the centred "
               "low-frequency window |k_d| <= b; 0 = DC only, 1 = every bin (whole spectrum) "
               "(default by mode: normalize 0.01, interpolate 0.1, swap 0.01; "
               "docs/results-harmonization-eval.md)")
               .range(0, 1)
               .not_required(),
           ArgSpec::real("lambda", 1.0,
                         "normalize/swap: A' = (1-lambda)*A + lambda*A_ref inside the band")
               .range(0, 1),
           ArgSpec::real("lambda_min", 0.0, "interpolate: lower end of the per-sample lambda")
               .range(0, 1),
           ArgSpec::real("lambda_max", 1.0, "interpolate: upper end of the per-sample lambda")
               .range(0, 1),
           ArgSpec::string("reference_site", "",
                           "swap: the site whose mean spectrum is the reference")
               .not_required(),
           ArgSpec::path("reference_file",
                         "swap: statistics file (save_stats of an amplitude fit); its mean "
                         "spectrum, or reference_site's when that is given")
               .not_required(),
           ArgSpec::choice("clip", {"none", "nonnegative", "input"}, "none",
                           "output range: none; nonnegative (max(x, 0)); input (each channel "
                           "clipped to its own input [min, max])"),
           ArgSpec::choice("fftw_planner", {"estimate", "measure", "patient"}, "measure",
                           "FFTW planner effort per image shape (plans and wisdom are cached)"),
           ArgSpec::choice("transform", {"auto", "fftw"}, "auto",
                           "auto: 2D images of even width and 32x32 to 512x512 voxels use the "
                           "paired real FFT (faster than FFTW's r2c/c2r there; equal within "
                           "float rounding); fftw: FFTW's r2c/c2r always"),
           ArgSpec::boolean("dc_fast_path", true,
                            "when b = 0 change the mean directly instead of by FFT (same result)"),
       },
       factory_of<Amplitude>()});
}
