#!/bin/sh
# Training speed: one local epoch of the built-in cnn and unet at 64x64 and 128x128 in Concord
# against the same network, batch size, optimizer (Adam) and thread count in PyTorch from Python
# (Debian's python3-torch, the same 1.13 as LibTorch; scripts/bench-packages.txt), in one run.
# Three Concord figures per case:
#   loop    bench_train_speed's plain LibTorch loop (pre-stacked tensors, the Python loop in C++)
#   local   LocalTraining::train, as a site trains in a round (Concord's batching included)
#   round   `concord run` as a user runs it (evaluation and precise BN off): the wall time of a
#           run of 1 + R rounds minus that of a 1-round run, over R rounds of 2 sites x IMAGES
#           images (brainsim data; aggregation, broadcast and checkpoints included)
# plus precise-BN re-estimation and evaluation (images per second, bench_train_speed).
# Ratios are Concord / PyTorch (>= 1: parity or better). Sides alternate, REPEATS times, and the
# best figure of each side is kept: the machine's load changes over minutes.
# Usage: bench/train_speed/run.sh [build (build)] [threads (2)] [repeats (2)] [cases]
#   cases: space-separated MODEL:SIZE:IMAGES (default "cnn:64:160 cnn:128:96 unet:64:96 unet:128:48")
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build}
threads=${2:-2}
repeats=${3:-2}
cases=${4:-"cnn:64:160 cnn:128:96 unet:64:96 unet:128:48"}
bench=$build/bin/bench_train_speed
concord=$build/bin/concord
for exe in "$bench" "$concord"; do
  if [ ! -x "$exe" ]; then
    echo "run.sh: $exe not found: build it first (cmake --build $build --target bench_train_speed concord-cli)" >&2
    exit 1
  fi
done
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "run.sh: python3-torch missing: apt-get install \$(cat scripts/bench-packages.txt)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The same environment for both sides: passive OpenMP waiting (what `concord` sets for itself).
export OMP_WAIT_POLICY=passive
unset OMP_NUM_THREADS MKL_NUM_THREADS
extra_rounds=2
sites=2

now() { date +%s.%N; }

# Seconds of `concord run` for a pipeline like the quickstart's, brainsim data of the case.
concord_run() { # model size images rounds
  model=$1 size=$2 images=$3 rounds=$4
  if [ "$model" = unet ]; then task=segmentation metric=dice; else task=classification metric=accuracy; fi
  cat >"$tmp/p.yaml" <<EOF
name: train-speed
seed: 42
data:
  dataset:
    type: brainsim
    args: {sites: $sites, train_per_site: $images, test_per_site: 8, size: $size, task: $task}
model:
  type: $model
adapter:
  type: batchnorm
  args: {policy: local}
training: {local_epochs: 1, batch_size: 32, optimizer: adam, lr: 0.002, threads: $threads, precise_bn: false}
federation: {rounds: $rounds, min_sites: $sites}
aggregator: {type: fedavg}
evaluation: {metrics: [$metric], every: 1000000}
output: $tmp/runs
EOF
  rm -rf "$tmp/runs"
  t0=$(now)
  "$concord" run "$tmp/p.yaml" -q >"$tmp/run.log" 2>&1 || { cat "$tmp/run.log" >&2; exit 1; }
  awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }'
}

out=$tmp/figures
: >"$out"
echo "threads $threads, batch 32, Adam; best of $repeats alternating repeats; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for c in $cases; do
  model=${c%%:*} rest=${c#*:}
  size=${rest%%:*} images=${rest#*:}
  for r in $(seq "$repeats"); do
    "$bench" "$model" "$size" "$threads" 32 "$images" 3 | sed "s/^/$c concord /" >>"$out"
    /usr/bin/python3 "$here/pytorch_mirror.py" "$model" "$size" "$threads" 32 "$images" 3 |
      sed "s/^/$c pytorch /" >>"$out"
    t1=$(concord_run "$model" "$size" "$images" 1)
    tn=$(concord_run "$model" "$size" "$images" $((1 + extra_rounds)))
    awk -v c="$c" -v n=$((extra_rounds * sites * images)) -v a="$tn" -v b="$t1" \
      'BEGIN { print c " concord round_img_per_s " n / (a - b) }' >>"$out"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
awk -v cases="$cases" '
  { k = $1 " " $2 " " $3; if (!(k in v) || $4 > v[k]) v[k] = $4 }
  END {
    printf "%-13s %8s %8s %8s %8s %8s %8s %8s %9s %8s %8s\n", "case", "pytorch", "loop", "local", \
      "round", "loop/pt", "local/pt", "round/pt", "preciseBN", "eval", "eval/pt"
    n = split(cases, cs, " ")
    for (i = 1; i <= n; i++) {
      c = cs[i]; pt = v[c " pytorch train_img_per_s"]
      lo = v[c " concord libtorch_loop_img_per_s"]; lt = v[c " concord local_training_img_per_s"]
      ro = v[c " concord round_img_per_s"]
      ev = v[c " concord eval_img_per_s"]
      printf "%-13s %8.1f %8.1f %8.1f %8.1f %8.2f %8.2f %8.2f %9.1f %8.1f %8.2f\n", c, pt, lo, lt, \
        ro, lo / pt, lt / pt, ro / pt, v[c " concord precise_bn_img_per_s"], ev, \
        ev / v[c " pytorch eval_img_per_s"]
    }
    print "(img/s; case = model:size:images per epoch; ratios >= 1: Concord at parity or faster)"
  }' "$out"
if [ -n "${KEEP_FIGURES:-}" ]; then cp "$out" "$KEEP_FIGURES"; fi
