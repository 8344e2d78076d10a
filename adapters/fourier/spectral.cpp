#include "spectral.h"

#include <concord/error.h>

#include <fftw3.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

namespace concord::fourier {

double Schedule::fraction(int round) const {
  if (!linear) return start;
  const int64_t ramp = ramp_rounds > 0 ? ramp_rounds : planned_rounds;
  if (ramp <= 1) return end;
  const double t = std::clamp((round - 1) / double(ramp - 1), 0.0, 1.0);
  return start + (end - start) * t;
}

int64_t low_extent(double r, int64_t n) {
  return std::min<int64_t>(n, static_cast<int64_t>(std::ceil(r * n - 1e-9)));
}

void merge(const float* received, const float* own, float* out, int64_t rows, int64_t cols,
           double r) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  const int64_t ku = low_extent(r, rows), kv = low_extent(r, cols);
  if (ku == rows && kv == cols) {  // everything low: the received tensor
    std::copy(received, received + n, out);
    return;
  }
  if (ku == 0 || kv == 0) {  // nothing low: the site's own tensor
    std::copy(own, own + n, out);
    return;
  }
  // FFTW's planner is not re-entrant; sites (and other plugins) may plan concurrently.
  static std::once_flag once;
  std::call_once(once, [] { fftwf_make_planner_thread_safe(); });
  // By linearity: W = W_received + IDCT(1_high . DCT(W_own - W_received)).
  std::vector<float> delta(static_cast<size_t>(n)), coef(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) delta[size_t(k)] = own[k] - received[k];
  fftwf_plan forward = fftwf_plan_r2r_2d(int(rows), int(cols), delta.data(), coef.data(),
                                         FFTW_REDFT10, FFTW_REDFT10, FFTW_ESTIMATE);
  fftwf_plan inverse = fftwf_plan_r2r_2d(int(rows), int(cols), coef.data(), delta.data(),
                                         FFTW_REDFT01, FFTW_REDFT01, FFTW_ESTIMATE);
  if (!forward || !inverse) {
    if (forward) fftwf_destroy_plan(forward);
    if (inverse) fftwf_destroy_plan(inverse);
    throw Error("fourier (adapter): FFTW could not plan a " + std::to_string(rows) + "x" +
                std::to_string(cols) + " DCT");
  }
  fftwf_execute(forward);
  for (int64_t u = 0; u < ku; ++u)
    for (int64_t v = 0; v < kv; ++v) coef[size_t(u * cols + v)] = 0.0f;  // low: the received
  fftwf_execute(inverse);
  fftwf_destroy_plan(forward);
  fftwf_destroy_plan(inverse);
  // DCT-III after DCT-II scales by 2R * 2C in FFTW's unnormalised convention.
  const float scale = 1.0f / static_cast<float>(4 * rows * cols);
  for (int64_t k = 0; k < n; ++k) out[k] = received[k] + delta[size_t(k)] * scale;
}

}  // namespace concord::fourier
