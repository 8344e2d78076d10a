#!/bin/sh
# `concord harmonize apply` end to end on N NIfTI 128^3 volumes (generated once into
# $WORK, default /tmp/concord-bench-harmonize). Prints throughput and ratios measured in this run:
#   amplitude / identity      (harmonization cost over the read+write floor; identity = I/O only)
#   2 threads / 1 thread      (scaling; target >= 1.7x on 2 free cores)
# Usage: bench/harmonize/run.sh [BUILD_DIR] [N]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=${1:-$HERE/../../build}
N=${2:-200}
WORK=${WORK:-/tmp/concord-bench-harmonize}
CONCORD="$BUILD/bin/concord"
[ -x "$CONCORD" ] || { echo "missing $CONCORD: build concord-cli" >&2; exit 1; }
METHOD=amplitude
[ -f "$BUILD/lib/concord/plugins/libconcord-harmonizer-amplitude.so" ] || METHOD=identity
IN="$WORK/in-$N"
if [ ! -f "$IN/.complete" ]; then
  echo "generating $N volumes into $IN ..."
  /usr/bin/python3 "$HERE/make_volumes.py" "$IN" "$N" 4 128
  touch "$IN/.complete"
fi
MB=$(du -sm "$IN" | cut -f1)

"$CONCORD" -q harmonize fit --method identity "$IN" --stats "$WORK/identity.stats" --no-progress >/dev/null
"$CONCORD" -q harmonize fit --method "$METHOD" "$IN" --stats "$WORK/$METHOD.stats" -j 2 --no-progress >/dev/null

# run METHOD JOBS -> prints "elapsed cpu" seconds (cpu = user + sys, all threads)
run() {
  out="$WORK/out-$1-j$2"
  rm -rf "$out"
  sync
  /usr/bin/time -f "%e %U %S" -o "$WORK/time.txt" \
    "$CONCORD" -q harmonize apply --stats "$WORK/$1.stats" "$IN" --out "$out" -j "$2" --no-progress >/dev/null
  rm -rf "$out"
  awk '{printf "%.3f %.3f", $1, $2 + $3}' "$WORK/time.txt"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
i1=$(run identity 1); a1=$(run "$METHOD" 1); i2=$(run identity 2); a2=$(run "$METHOD" 2)
echo "harmonize apply on $N volumes 128^3 int16 NIfTI ($MB MB in), method $METHOD"
echo "$i1 $a1 $i2 $a2" | awk -v n="$N" -v m="$METHOD" '{
  i1 = $1; i1c = $2; a1 = $3; a1c = $4; i2 = $5; i2c = $6; a2 = $7; a2c = $8
  printf "  %-22s %8s %8s %10s\n", "run", "wall s", "cpu s", "volumes/s"
  printf "  %-22s %8.2f %8.2f %10.2f\n", "identity  -j 1 (I/O)", i1, i1c, n / i1
  printf "  %-22s %8.2f %8.2f %10.2f\n", m "  -j 1", a1, a1c, n / a1
  printf "  %-22s %8.2f %8.2f %10.2f\n", "identity  -j 2 (I/O)", i2, i2c, n / i2
  printf "  %-22s %8.2f %8.2f %10.2f\n", m "  -j 2", a2, a2c, n / a2
  printf "ratios: %s/identity wall -j1 %.2fx, cpu %.2fx; 2-thread speedup (wall) %s %.2fx, identity %.2fx (target >= 1.7x)\n",
         m, a1 / i1, a1c / i1c, m, a1 / a2, i1 / i2
}'
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg) (speedups are only meaningful on idle cores)"
