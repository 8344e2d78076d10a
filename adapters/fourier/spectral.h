// The frequency split shared by the fourier adapter and its tests: the fourier aggregator's
// schedule and low-frequency block, and the site-side merge
//   W = IDCT( 1_low . DCT(W_received) + (1 - 1_low) . DCT(W_own) )
// with the 2-D DCT-II of FFTW (REDFT10) over the tensor viewed as R = shape[0] rows by
// C = numel / R columns, exactly as plugins/aggregators/fourier does.
#pragma once

#include <cstdint>

namespace concord::fourier {

// The fourier aggregator's r_t (same arguments, same formula). `planned_rounds` stands for
// RoundInfo::rounds, which the aggregator reads and a site cannot see.
struct Schedule {
  double start = 0.25;
  double end = 1.0;
  bool linear = true;
  int64_t ramp_rounds = 0;     // 0: planned_rounds
  int64_t planned_rounds = 0;  // federation.rounds
  double fraction(int round) const;
};

// Rows (or columns) of the low block for an axis of length n: min(n, ceil(r n)).
int64_t low_extent(double r, int64_t n);

// out = IDCT(low_r(DCT(received)) + high_r(DCT(own))), all three rows x cols (row-major);
// `out` may alias neither input. r = 1 gives `received`, r = 0 gives `own`.
void merge(const float* received, const float* own, float* out, int64_t rows, int64_t cols,
           double r);

}  // namespace concord::fourier
