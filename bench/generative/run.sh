#!/bin/sh
# CycleGAN benchmark: the built bench_generative against the same network in PyTorch from Python
# (Debian's python3-torch, the same 1.13; scripts/bench-packages.txt), same thread count, in one
# run; prints each figure and the Concord/PyTorch ratio (target >= 1: parity or better).
# Usage: bench/generative/run.sh [build-dir (build)] [threads (2)] [seconds per block (2)]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../../build}
threads=${2:-2}
seconds=${3:-2}
exe=$build/bin/bench_generative
if [ ! -x "$exe" ]; then
  echo "run.sh: $exe not found: build it first (cmake --build $build --target bench_generative)" >&2
  exit 1
fi
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "run.sh: python3-torch missing: apt-get install \$(cat scripts/bench-packages.txt)" >&2
  exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
export OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=passive
echo "CycleGAN 128x128, ngf 32, ndf 32, 6 blocks, $threads threads (best of 3 blocks of ${seconds}s)"
"$exe" "$threads" "$seconds" | sed 's/^/concord /' | tee "$out"
/usr/bin/python3 "$here/pytorch_mirror.py" "$threads" "$seconds" | sed 's/^/pytorch /' | tee -a "$out"
awk '
  { v[$1 " " $2] = $3 }
  END {
    split("train_b1_img_per_s train_b4_img_per_s translate_2d_img_per_s", keys, " ")
    for (i = 1; i <= 3; i++) {
      k = keys[i]; r = v["concord " k] / v["pytorch " k]
      printf "%s: Concord/PyTorch %.3f (target >= 1: %s)\n", k, r, (r >= 0.98 ? "met" : "MISSED")
    }
    r = v["pytorch volume_128_s"] / v["concord volume_128_s"]
    printf "volume 128^3 slice by slice: Concord %.2f s, PyTorch %.2f s (speed ratio %.3f)\n", \
      v["concord volume_128_s"], v["pytorch volume_128_s"], r
  }' "$out"
