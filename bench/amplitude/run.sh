#!/bin/sh
# Amplitude harmonizer benchmark: runs the built bench_amplitude and the numpy baseline (builds
# nothing) and prints images/s and the ratios against the targets.
# Usage: bench/amplitude/run.sh [build-dir (default: build)] [seconds (0.5)] [beta (1)]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../../build}
seconds=${2:-0.5}
beta=${3:-1}
exe=$build/bin/bench_amplitude
if [ ! -x "$exe" ]; then
  echo "run.sh: $exe not found: build it first (ninja -C $build bench_amplitude)" >&2
  exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "amplitude normalize, one thread, beta=$beta (best of 5 blocks of ~${seconds}s; 3D x4)"
"$exe" "$seconds" "$beta" | tee "$out"
/usr/bin/python3 "$here/numpy_baseline.py" "$seconds" "$beta" | tee -a "$out"
awk '
  { v[$1] = $2 }
  END {
    split("2d_256 3d_128", labels, " ")
    target_numpy["2d_256"] = 15; target_numpy["3d_128"] = 10
    for (i = 1; i <= 2; i++) {
      l = labels[i]
      f = v[l "_amplitude"] / v[l "_fftw_floor"]
      n = v[l "_amplitude"] / v[l "_numpy"]
      printf "%s: %.3gx the FFTW r2c+c2r floor (target >= 0.6: %s), %.3gx numpy (target >= %d: %s)\n", \
        l, f, (f >= 0.6 ? "met" : "MISSED"), n, target_numpy[l], (n >= target_numpy[l] ? "met" : "MISSED")
    }
  }' "$out"
