// A 2D real FFT (r2c and c2r, FFTW's layout and scaling) for images of even width, built from
// a complex transform of half the width; faster than Debian's FFTW r2c/c2r for most sizes, and
// with an own AVX-512 y pass for power-of-two heights. Used by the amplitude harmonizer
// (`transform: auto`) where it measured faster; README.md has the algorithm.
//
//   z[y][k] = x[y][2k] + i x[y][2k+1]          (the real image read as M = nx/2 complex columns)
//   Z = DFT_y(DFT_x(z))                         (FFTW; or FFTW along x and this file's AVX-512
//                                                radix-2 FFT along y, 8 columns at once)
//   X(ky, kx) = E + w^kx O,  E = (Z(k) + conj Z(-k)) / 2,  O = (Z(k) - conj Z(-k)) / 2i,
//   w = exp(-2 pi i / nx), 0 <= kx <= M; the inverse undoes each step (unnormalized, like c2r).
// The own y transform runs forward by decimation in frequency and back by decimation in time, so
// its rows stay in bit-reversed order in between and no reordering pass is needed.
#pragma once

#include <fftw3.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace concord {

class PairedRfft2 {
 public:
  // Sizes it handles: an even width (any height).
  static bool supported(int64_t nx, int64_t ny);
  // Sizes where it measured faster than FFTW's r2c + c2r (bench: 28x28 to 512x512, 1.01x to
  // 1.5x; 1024x1024 0.81x, tiny images slower): supported, 1024 <= nx * ny <= 512 * 512. A fixed
  // rule, not a timing, so that every run on a machine makes the same choice (runs resumed
  // from a checkpoint stay bit-identical).
  static bool preferred(int64_t nx, int64_t ny);
  // True when the y pass can be this file's AVX-512 FFT: the CPU has AVX-512F and ny is a power
  // of two (>= 2). Otherwise FFTW does the whole ny x nx/2 complex transform.
  static bool own_columns_possible(int64_t ny);
  // Plans the FFTW transforms with `fftw_flags` (FFTW_MEASURE, ...); the planner must be guarded
  // by the caller (FFTW's planner is not thread-safe). Throws if !supported(nx, ny).
  PairedRfft2(int64_t nx, int64_t ny, unsigned fftw_flags, bool allow_own_columns = true);
  ~PairedRfft2();
  PairedRfft2(const PairedRfft2&) = delete;
  PairedRfft2& operator=(const PairedRfft2&) = delete;

  // x: ny * nx reals, X: ny * (nx/2 + 1) complex, as fftwf r2c. Thread-safe (per-thread
  // scratch).
  void forward(const float* x, fftwf_complex* X) const;
  // X -> x, unnormalized (nx * ny times the image), as fftwf c2r; X is left unchanged.
  void inverse(const fftwf_complex* X, float* x) const;
  bool own_columns() const { return own_columns_; }

 private:
  int64_t nx_, ny_, m_;
  bool avx512_ = false, own_columns_ = false;
  std::vector<float> tw_cos_, tw_sin_;  // exp(-2 pi i j / ny), j < ny / 2 (own y pass)
  std::vector<float> wx_re_, wx_im_;    // exp(-2 pi i k / nx), k <= M
  std::vector<int32_t> rows_;           // storage row of each ky (bit-reversed with own y pass)
  fftwf_plan forward_ = nullptr, backward_ = nullptr;
  struct Scratch;
  Scratch& scratch() const;
};

}  // namespace concord
