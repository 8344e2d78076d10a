#!/bin/sh
# CycleGAN benchmark: the built bench_generative against the same network in PyTorch from Python
# (Debian's python3-torch, the same 1.13; scripts/bench-packages.txt), same thread count, in one
# run; prints each figure and the Concord/PyTorch ratio (target >= 1: parity or better).
# Usage: bench/generative/run.sh [build-dir (build)] [threads (2)] [seconds per block (2)] [size (128)]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../../build}
threads=${2:-2}
seconds=${3:-2}
size=${4:-128}
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
echo "CycleGAN ${size}x${size}, ngf 32, ndf 32, 6 blocks, $threads threads (best of 3 blocks of ${seconds}s)"
# Two interleaved rounds, the best figure of each side kept: the machine's load changes over
# minutes, and alternating keeps one side from getting all the quiet periods.
: >"$out"
for round in 1 2; do
  "$exe" "$threads" "$seconds" "$size" | sed 's/^/concord /' | tee -a "$out"
  /usr/bin/python3 "$here/pytorch_mirror.py" "$threads" "$seconds" "$size" | sed 's/^/pytorch /' | tee -a "$out"
done
awk -v size="$size" '
  { k = $1 " " $2
    if (!(k in v) || ($2 ~ /_s$/ && $2 !~ /per_s$/ ? $3 < v[k] : $3 > v[k])) v[k] = $3 }
  END {
    split("train_b1_img_per_s train_b4_img_per_s translate_2d_img_per_s", keys, " ")
    for (i = 1; i <= 3; i++) {
      k = keys[i]; r = v["concord " k] / v["pytorch " k]
      printf "%s: Concord/PyTorch %.3f (target >= 1: %s)\n", k, r, (r >= 1 ? "met" : "MISSED")
    }
    r = v["pytorch volume_s"] / v["concord volume_s"]
    printf "volume %d^3 slice by slice: Concord %.2f s, PyTorch %.2f s (speed ratio %.3f)\n", \
      size, v["concord volume_s"], v["pytorch volume_s"], r
  }' "$out"
