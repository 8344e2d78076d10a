// A 2D real FFT (r2c and c2r, FFTW's layout and scaling) for images whose height is a power of
// two and width is even, faster than Debian's FFTW on AVX-512 CPUs. Used by the amplitude
// harmonizer when the CPU has AVX-512F (`transform: auto`); README.md has the algorithm.
//
//   z[y][k] = x[y][2k] + i x[y][2k+1]          (the real image read as M = nx/2 complex columns)
//   Z = DFT_y(DFT_x(z))                         (FFTW along x, contiguous rows; this file's
//                                                AVX-512 radix-2 FFT along y, 8 columns at once)
//   X(ky, kx) = E + w^kx O,  E = (Z(k) + conj Z(-k)) / 2,  O = (Z(k) - conj Z(-k)) / 2i,
//   w = exp(-2 pi i / nx), 0 <= kx <= M; the inverse undoes each step (unnormalized, like c2r).
// The y transform runs forward by decimation in frequency and back by decimation in time, so its
// rows stay in bit-reversed order in between and no reordering pass is needed.
#pragma once

#include <fftw3.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace concord {

class PairedRfft2 {
 public:
  // True when this CPU can run it (AVX-512F) and the size qualifies: ny a power of two, nx even.
  static bool supported(int64_t nx, int64_t ny);
  // Plans the FFTW row transforms with `fftw_flags` (FFTW_MEASURE, ...); the planner must be
  // guarded by the caller (FFTW's planner is not thread-safe). Throws if !supported(nx, ny).
  PairedRfft2(int64_t nx, int64_t ny, unsigned fftw_flags);
  ~PairedRfft2();
  PairedRfft2(const PairedRfft2&) = delete;
  PairedRfft2& operator=(const PairedRfft2&) = delete;

  // x: ny * nx reals (8-byte aligned), X: ny * (nx/2 + 1) complex, as fftwf r2c. Thread-safe
  // (per-thread scratch).
  void forward(const float* x, fftwf_complex* X) const;
  // X -> x, unnormalized (nx * ny times the image), as fftwf c2r; X is left unchanged.
  void inverse(const fftwf_complex* X, float* x) const;

 private:
  int64_t nx_, ny_, m_;
  int bits_;
  std::vector<float> tw_cos_, tw_sin_;  // exp(-2 pi i j / ny), j < ny / 2
  std::vector<float> wx_re_, wx_im_;    // exp(-2 pi i k / nx), k <= M
  std::vector<int32_t> bitrev_;
  fftwf_plan rows_forward_ = nullptr, rows_backward_ = nullptr;
  struct Scratch;
  Scratch& scratch() const;
  void columns(fftwf_complex* z, bool forward) const;
};

}  // namespace concord
