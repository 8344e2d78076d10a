// PairedRfft2: see paired_rfft2.h and README.md ("Transform").
#include "paired_rfft2.h"

#include <concord/error.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

namespace concord {
namespace {

bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}

// v * (c + i s) for eight interleaved complex values and one scalar complex.
__attribute__((target("avx512f"))) inline __m512 cmul(__m512 v, float c, float s) {
  const __m512 swapped = _mm512_shuffle_ps(v, v, 0xB1);  // (im, re) pairs
  return _mm512_fmaddsub_ps(v, _mm512_set1_ps(c), _mm512_mul_ps(swapped, _mm512_set1_ps(s)));
}

// Radix-2 FFT of length n over x[0..n), each element eight independent complex columns.
// Forward: decimation in frequency, natural order in, bit-reversed order out.
__attribute__((target("avx512f"))) void fft_dif(__m512* x, int64_t n, const float* tc,
                                                const float* ts) {
  for (int64_t len = n; len >= 2; len >>= 1) {
    const int64_t half = len >> 1, step = n / len;
    for (int64_t st = 0; st < n; st += len) {
      const __m512 a0 = x[st], b0 = x[st + half];
      x[st] = _mm512_add_ps(a0, b0);
      x[st + half] = _mm512_sub_ps(a0, b0);
      for (int64_t j = 1; j < half; ++j) {
        const __m512 a = x[st + j], b = x[st + j + half];
        x[st + j] = _mm512_add_ps(a, b);
        x[st + j + half] = cmul(_mm512_sub_ps(a, b), tc[j * step], ts[j * step]);
      }
    }
  }
}

// Inverse (conjugate twiddles, unnormalized): decimation in time, bit-reversed in, natural out.
__attribute__((target("avx512f"))) void fft_dit_inverse(__m512* x, int64_t n, const float* tc,
                                                        const float* ts) {
  for (int64_t len = 2; len <= n; len <<= 1) {
    const int64_t half = len >> 1, step = n / len;
    for (int64_t st = 0; st < n; st += len) {
      const __m512 a0 = x[st], b0 = x[st + half];
      x[st] = _mm512_add_ps(a0, b0);
      x[st + half] = _mm512_sub_ps(a0, b0);
      for (int64_t j = 1; j < half; ++j) {
        const __m512 a = x[st + j], b = cmul(x[st + j + half], tc[j * step], -ts[j * step]);
        x[st + j] = _mm512_add_ps(a, b);
        x[st + j + half] = _mm512_sub_ps(a, b);
      }
    }
  }
}

// Blocks of eight columns of z (ny rows of m complex): copied into a contiguous buffer (rows
// 1 KB apart would collide in the L1 cache), transformed along y, copied back.
__attribute__((target("avx512f"))) void columns_avx512(fftwf_complex* z, int64_t ny, int64_t m,
                                                       float* block, bool forward, const float* tc,
                                                       const float* ts) {
  __m512* buf = reinterpret_cast<__m512*>(block);
  for (int64_t c0 = 0; c0 < m; c0 += 8) {
    const int64_t w = std::min<int64_t>(8, m - c0);
    const __mmask16 mask = __mmask16((1u << (2 * w)) - 1u);
    for (int64_t r = 0; r < ny; ++r)
      buf[r] = _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(z + r * m + c0));
    if (forward)
      fft_dif(buf, ny, tc, ts);
    else
      fft_dit_inverse(buf, ny, tc, ts);
    for (int64_t r = 0; r < ny; ++r)
      _mm512_mask_storeu_ps(reinterpret_cast<float*>(z + r * m + c0), mask, buf[r]);
  }
}

// Sixteen complex values as separate real and imaginary lanes.
struct Lanes {
  __m512 re, im;
};

// p[0..32): 16 interleaved complex values, lane l = value l.
__attribute__((target("avx512f"))) inline Lanes load_ascending(const float* p) {
  const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return {_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi)};
}

// p[0..32): 16 interleaved complex values, lane l = value 15 - l.
__attribute__((target("avx512f"))) inline Lanes load_descending(const float* p) {
  const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
  const __m512i even = _mm512_set_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_set_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return {_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi)};
}

// Interleaves re / im lanes into p[0..32).
__attribute__((target("avx512f"))) inline void store_interleaved(float* p, __m512 re, __m512 im) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(re, lo, im));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(re, hi, im));
}

// Split: Z (its rows in the order `rows` gives) -> X, the r2c half spectrum:
// X(kx) = E + w^kx O, E = (z + conj zm) / 2, O = (z - conj zm) / 2i, z = Z(ky, kx),
// zm = Z(-ky, -kx). One bin; a[], b[] are the rows of ky and -ky, o[] the output row.
inline void split_bin(float* o, int64_t kx, float zr, float zi, float mr, float mi, const float* wr,
                      const float* wi) {
  const float er = 0.5f * (zr + mr), ei = 0.5f * (zi - mi);
  const float odr = 0.5f * (zi + mi), odi = -0.5f * (zr - mr);
  o[2 * kx] = er + wr[kx] * odr - wi[kx] * odi;
  o[2 * kx + 1] = ei + wr[kx] * odi + wi[kx] * odr;
}
inline void split_bins(const float* a, const float* b, float* o, int64_t m, int64_t k0,
                       const float* wr, const float* wi) {
  if (k0 == 0) split_bin(o, 0, a[0], a[1], b[0], b[1], wr, wi), k0 = 1;
  for (int64_t kx = k0; kx < m; ++kx)
    split_bin(o, kx, a[2 * kx], a[2 * kx + 1], b[2 * (m - kx)], b[2 * (m - kx) + 1], wr, wi);
  split_bin(o, m, a[0], a[1], b[0], b[1], wr, wi);  // kx = M: Z(., M) = Z(., 0)
}

// Merge: X -> Z: Z = E' + i O' with E' = X(k) + Xu, O' = (X(k) - Xu) conj(w^kx),
// Xu = conj X(-ky, M - kx) (the upper half X(ky, kx + M)); twice the split's E and O, which gives
// c2r's scaling after the unnormalized inverse transforms. Bins [k0, m) of one row.
inline void merge_bins(const float* a, const float* b, float* o, int64_t m, int64_t k0,
                       const float* wr, const float* wi) {
  for (int64_t kx = k0; kx < m; ++kx) {
    const float xr = a[2 * kx], xi = a[2 * kx + 1];
    const float ur = b[2 * (m - kx)], ui = -b[2 * (m - kx) + 1];
    const float er = xr + ur, ei = xi + ui, dr = xr - ur, di = xi - ui;
    const float cr = wr[kx], ci = -wi[kx];
    const float odr = dr * cr - di * ci, odi = dr * ci + di * cr;
    o[2 * kx] = er - odi;
    o[2 * kx + 1] = ei + odr;
  }
}

// The same with AVX-512, 16 bins per step (z ascending from kx, its partner descending).
__attribute__((target("avx512f"))) void split_row_avx512(const float* a, const float* b, float* o,
                                                         int64_t m, const float* wr,
                                                         const float* wi) {
  split_bin(o, 0, a[0], a[1], b[0], b[1], wr, wi);
  int64_t kx = 1;
  const __m512 half = _mm512_set1_ps(0.5f);
  for (; kx + 16 <= m; kx += 16) {
    const Lanes zl = load_ascending(a + 2 * kx), ml = load_descending(b + 2 * (m - kx - 15));
    const __m512 er = _mm512_mul_ps(half, _mm512_add_ps(zl.re, ml.re));
    const __m512 ei = _mm512_mul_ps(half, _mm512_sub_ps(zl.im, ml.im));
    const __m512 odr = _mm512_mul_ps(half, _mm512_add_ps(zl.im, ml.im));
    const __m512 odi = _mm512_mul_ps(half, _mm512_sub_ps(ml.re, zl.re));
    const __m512 c = _mm512_loadu_ps(wr + kx), sn = _mm512_loadu_ps(wi + kx);
    store_interleaved(o + 2 * kx, _mm512_fmadd_ps(c, odr, _mm512_fnmadd_ps(sn, odi, er)),
                      _mm512_fmadd_ps(c, odi, _mm512_fmadd_ps(sn, odr, ei)));
  }
  split_bins(a, b, o, m, kx, wr, wi);
}

__attribute__((target("avx512f"))) void merge_row_avx512(const float* a, const float* b, float* o,
                                                         int64_t m, const float* wr,
                                                         const float* wi) {
  int64_t kx = 0;
  for (; kx + 16 <= m; kx += 16) {
    const Lanes xl = load_ascending(a + 2 * kx), ul = load_descending(b + 2 * (m - kx - 15));
    const __m512 ur = ul.re, ui = _mm512_sub_ps(_mm512_setzero_ps(), ul.im);
    const __m512 er = _mm512_add_ps(xl.re, ur), ei = _mm512_add_ps(xl.im, ui);
    const __m512 dr = _mm512_sub_ps(xl.re, ur), di = _mm512_sub_ps(xl.im, ui);
    const __m512 cr = _mm512_loadu_ps(wr + kx);
    const __m512 ci = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(wi + kx));
    const __m512 odr = _mm512_fmsub_ps(dr, cr, _mm512_mul_ps(di, ci));
    const __m512 odi = _mm512_fmadd_ps(dr, ci, _mm512_mul_ps(di, cr));
    store_interleaved(o + 2 * kx, _mm512_sub_ps(er, odi), _mm512_add_ps(ei, odr));
  }
  merge_bins(a, b, o, m, kx, wr, wi);
}

}  // namespace

struct PairedRfft2::Scratch {
  fftwf_complex* z = nullptr;  // ny * m complex, FFTW-aligned
  float* block = nullptr;      // ny * 16 floats, 64-byte aligned
  float* real = nullptr;       // ny * nx, for inputs without FFTW's alignment
  size_t z_cap = 0, block_cap = 0, real_cap = 0;
  ~Scratch() {
    fftwf_free(z);
    std::free(block);
    fftwf_free(real);
  }
  void reserve(int64_t nx, int64_t ny) {
    const size_t zc = size_t(ny) * size_t(nx / 2), bc = size_t(ny) * 16, rc = size_t(ny * nx);
    if (zc > z_cap) fftwf_free(z), z = fftwf_alloc_complex(zc), z_cap = zc;
    if (bc > block_cap)
      std::free(block), block = static_cast<float*>(std::aligned_alloc(64, bc * sizeof(float))),
                        block_cap = bc;
    if (rc > real_cap) fftwf_free(real), real = fftwf_alloc_real(rc), real_cap = rc;
    if (!z || !block || !real) throw Error("amplitude: out of memory for a 2D transform");
  }
};

PairedRfft2::Scratch& PairedRfft2::scratch() const {
  thread_local Scratch s;
  s.reserve(nx_, ny_);
  return s;
}

bool PairedRfft2::supported(int64_t nx, int64_t ny) {
  return nx >= 2 && nx % 2 == 0 && ny >= 1 && nx <= (int64_t(1) << 24) && ny <= (int64_t(1) << 24);
}

bool PairedRfft2::preferred(int64_t nx, int64_t ny) {
  return supported(nx, ny) && nx * ny >= 1024 && nx * ny <= 512 * 512;
}

bool PairedRfft2::own_columns_possible(int64_t ny) {
  return cpu_has_avx512f() && ny >= 2 && (ny & (ny - 1)) == 0;
}

PairedRfft2::PairedRfft2(int64_t nx, int64_t ny, unsigned fftw_flags, bool allow_own_columns)
    : nx_(nx), ny_(ny), m_(nx / 2) {
  if (!supported(nx, ny))
    throw Error("amplitude: no paired 2D transform for " + std::to_string(nx) + "x" +
                std::to_string(ny) + " (the width must be even)");
  avx512_ = cpu_has_avx512f();
  own_columns_ = allow_own_columns && own_columns_possible(ny);
  for (int64_t k = 0; k <= m_; ++k) {
    wx_re_.push_back(float(std::cos(2 * M_PI * double(k) / double(nx))));
    wx_im_.push_back(float(-std::sin(2 * M_PI * double(k) / double(nx))));
  }
  // Exact at kx = 0 and M (w = 1, -1): the bins there with ky = 0 or ny/2 are their own
  // conjugates and must come out exactly real, as FFTW's r2c gives them. float(-sin(pi)) is not
  // 0, and its imaginary rounding residue would be turned by a phase-keeping step (the
  // amplitude mix) into a full-size imaginary value, which the real inverse then drops.
  wx_re_.front() = 1.0f, wx_im_.front() = 0.0f;
  wx_re_.back() = -1.0f, wx_im_.back() = 0.0f;
  rows_.resize(size_t(ny));
  for (int64_t i = 0; i < ny; ++i) rows_[size_t(i)] = int32_t(i);
  if (own_columns_) {
    for (int64_t j = 0; j < ny / 2; ++j) {
      tw_cos_.push_back(float(std::cos(2 * M_PI * double(j) / double(ny))));
      tw_sin_.push_back(float(-std::sin(2 * M_PI * double(j) / double(ny))));
    }
    int bits = 0;
    while ((int64_t(1) << bits) < ny) ++bits;
    for (int64_t i = 0; i < ny; ++i) {
      int64_t r = 0, v = i;
      for (int b = 0; b < bits; ++b, v >>= 1) r = (r << 1) | (v & 1);
      rows_[size_t(i)] = int32_t(r);
    }
  }
  // Plans on scratch arrays (MEASURE overwrites them) with the alignment of fftwf_malloc: the
  // rows only (length M, ny of them) when the y pass is ours, else the whole ny x M transform.
  fftwf_complex* a = fftwf_alloc_complex(size_t(ny * m_));
  fftwf_complex* b = fftwf_alloc_complex(size_t(ny * m_));
  if (own_columns_) {
    const int n[1] = {int(m_)};
    forward_ = fftwf_plan_many_dft(1, n, int(ny), a, nullptr, 1, int(m_), b, nullptr, 1, int(m_),
                                   FFTW_FORWARD, fftw_flags);
    backward_ = fftwf_plan_many_dft(1, n, int(ny), b, nullptr, 1, int(m_), a, nullptr, 1, int(m_),
                                    FFTW_BACKWARD, fftw_flags | FFTW_DESTROY_INPUT);
  } else {
    forward_ = fftwf_plan_dft_2d(int(ny), int(m_), a, b, FFTW_FORWARD, fftw_flags);
    backward_ =
        fftwf_plan_dft_2d(int(ny), int(m_), b, a, FFTW_BACKWARD, fftw_flags | FFTW_DESTROY_INPUT);
  }
  fftwf_free(a);
  fftwf_free(b);
  if (!forward_ || !backward_)
    throw Error("amplitude: FFTW could not plan the complex transforms of a " + std::to_string(nx) +
                "x" + std::to_string(ny) + " image");
}

PairedRfft2::~PairedRfft2() {
  fftwf_destroy_plan(forward_);
  fftwf_destroy_plan(backward_);
}

void PairedRfft2::forward(const float* x, fftwf_complex* X) const {
  Scratch& s = scratch();
  const float* in = x;
  if (fftwf_alignment_of(const_cast<float*>(x)) != 0) {
    std::memcpy(s.real, x, sizeof(float) * size_t(nx_ * ny_));
    in = s.real;
  }
  fftwf_execute_dft(forward_, reinterpret_cast<fftwf_complex*>(const_cast<float*>(in)), s.z);
  if (own_columns_)  // rows of Z end in bit-reversed order of ky (rows_ maps them)
    columns_avx512(s.z, ny_, m_, s.block, true, tw_cos_.data(), tw_sin_.data());
  const int64_t m = m_, h = m_ + 1;
  for (int64_t ky = 0; ky < ny_; ++ky) {
    const float* a = reinterpret_cast<const float*>(s.z + rows_[size_t(ky)] * m);
    const float* b = reinterpret_cast<const float*>(s.z + rows_[size_t(ky ? ny_ - ky : 0)] * m);
    float* o = reinterpret_cast<float*>(X + ky * h);
    if (avx512_)
      split_row_avx512(a, b, o, m, wx_re_.data(), wx_im_.data());
    else
      split_bins(a, b, o, m, 0, wx_re_.data(), wx_im_.data());
  }
}

void PairedRfft2::inverse(const fftwf_complex* X, float* x) const {
  Scratch& s = scratch();
  const int64_t m = m_, h = m_ + 1;
  for (int64_t ky = 0; ky < ny_; ++ky) {
    const float* a = reinterpret_cast<const float*>(X + ky * h);
    const float* b = reinterpret_cast<const float*>(X + (ky ? ny_ - ky : 0) * h);
    float* o = reinterpret_cast<float*>(s.z + rows_[size_t(ky)] * m);
    if (avx512_)
      merge_row_avx512(a, b, o, m, wx_re_.data(), wx_im_.data());
    else
      merge_bins(a, b, o, m, 0, wx_re_.data(), wx_im_.data());
  }
  if (own_columns_) columns_avx512(s.z, ny_, m_, s.block, false, tw_cos_.data(), tw_sin_.data());
  float* out = fftwf_alignment_of(x) == 0 ? x : s.real;
  fftwf_execute_dft(backward_, s.z, reinterpret_cast<fftwf_complex*>(out));
  if (out != x) std::memcpy(x, out, sizeof(float) * size_t(nx_ * ny_));
}

}  // namespace concord
