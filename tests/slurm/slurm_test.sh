#!/usr/bin/env bash
# Batch harmonization on a real single-node Slurm cluster: scripts/slurm-local starts munged,
# slurmctld and slurmd in a temporary folder; examples/slurm/submit.sh submits the fit array,
# the dependent merge and the apply array (3 shards, histogram-match, 16 PNG images in 4 sites).
# Checks that every job completed, that the merged statistics are byte for byte those of a
# single-machine `harmonize fit`, and that every output is written, byte for byte as a
# single-machine `harmonize apply` writes it. The daemons are stopped afterwards, also on
# failure.
#
#   tests/slurm/slurm_test.sh SOURCE_DIR BUILD_DIR
#
# Exit 77 (ctest: skipped) only when the Slurm/munge packages are missing and cannot be
# installed (not root, no apt-get, or the installation failed).
set -euo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
concord="$build/bin/concord"
[ -x "$concord" ] || { echo "FAIL: $concord is missing: build concord-cli first" >&2; exit 1; }

have_slurm() {
  for p in munged slurmctld slurmd sbatch; do
    command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || return 1
  done
}
if ! have_slurm; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Slurm is not installed: installing munge slurmctld slurmd slurm-client" \
      "(scripts/debian-packages.txt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      munge slurmctld slurmd slurm-client >/dev/null 2>&1 || true
  fi
  if ! have_slurm; then
    echo "SKIP: the Debian packages munge, slurmctld, slurmd and slurm-client are not installed" \
      "and could not be installed here (needs root and apt-get); this test needs a real Slurm"
    exit 77
  fi
fi

# shellcheck source=tests/slurm/local_cluster.sh
. "$src/tests/slurm/local_cluster.sh"

python3 "$src/tests/slurm/make_inputs.py" "$tmp/in" 4
export WORK="$tmp/work" INPUTS="$tmp/in" OUT="$tmp/out" METHOD=histogram-match SHARDS=3
export CONCORD="$concord"
ids=$("$src/examples/slurm/submit.sh" --time=10) || fail "sbatch failed"
echo "submitted: $ids"
read -r fit merge apply < <(echo "$ids" | sed 's/[a-z]*=//g')  # "fit=ID merge=ID apply=ID"

# Wait until no job of the three is pending or running (at most 10 minutes).
deadline=$((SECONDS + 600))
while squeue -h -o '%T' -j "$fit,$merge,$apply" 2>/dev/null |
  grep -qE 'PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUE'; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the jobs did not finish within 10 minutes"
  sleep 2
done
for id in "$fit" "$merge" "$apply"; do
  states=$(scontrol -o show job "$id" | grep -o 'JobState=[A-Z_]*' | sort -u | tr '\n' ' ')
  [ "$states" = "JobState=COMPLETED " ] || fail "job $id: $states(expected COMPLETED)"
done
tasks=$(scontrol -o show job "$apply" | grep -c 'JobState=COMPLETED')
[ "$tasks" = 3 ] || fail "apply array: $tasks tasks completed, expected 3"
echo "fit array, merge and apply array completed"

# The merged statistics are those of a single-machine fit, byte for byte.
"$concord" harmonize fit --method histogram-match --stats "$tmp/single.stats" --no-progress \
  -j 1 "$tmp/in" >/dev/null
cmp "$tmp/single.stats" "$WORK/harmonize.stats" ||
  fail "merged statistics differ from a single-machine fit"
echo "merged statistics == single-machine fit (cmp)"

# Every input has its output, equal to what one machine writes.
(cd "$tmp/in" && find . -name '*.png' | sort) >"$tmp/inputs.txt"
(cd "$OUT" && find . -name '*.png' -not -path '*/.*' | sort) >"$tmp/outputs.txt"
diff "$tmp/inputs.txt" "$tmp/outputs.txt" || fail "outputs missing or extra (diff above)"
[ "$(wc -l <"$tmp/outputs.txt")" = 16 ] || fail "expected 16 outputs"
"$concord" harmonize apply --stats "$tmp/single.stats" --out "$tmp/out1" --no-progress -j 1 \
  "$tmp/in" >/dev/null
diff -r --exclude='.*' "$tmp/out1" "$OUT" || fail "sharded outputs differ from one machine's"
for i in 0 1 2; do
  [ -s "$WORK/reports/apply-$i-of-3.json" ] || fail "no report of apply shard $i"
done
echo "16 outputs written, equal to a single-machine apply; 3 shard reports"
echo "PASS"
