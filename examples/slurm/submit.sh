#!/usr/bin/env bash
# Submits batch harmonization as three Slurm jobs: the fit array, the merge (afterok on every
# fit task) and the apply array (afterok on the merge). Prints the three job ids.
#
#   WORK=/shared/run1 INPUTS=/shared/archive OUT=/shared/harmonized METHOD=nyul SHARDS=32 \
#     examples/slurm/submit.sh [extra sbatch options, e.g. --partition=cpu --time=02:00:00]
#
# Variables: see README.md (CONCORD, FIT_ARGS, APPLY_ARGS, THROTTLE, STRICT).
set -euo pipefail
: "${WORK:?set WORK: a folder on a shared file system for parts, statistics and logs}"
: "${INPUTS:?set INPUTS}"
: "${OUT:?set OUT}"
: "${SHARDS:?set SHARDS: the number of shards (array tasks) of fit and apply}"
[ "$SHARDS" -ge 1 ] 2>/dev/null || { echo "SHARDS must be a positive number" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK/logs"
last=$((SHARDS - 1))
array="0-$last${THROTTLE:+%$THROTTLE}"
# Every variable goes to the jobs (--export=ALL); a failed dependency cancels the jobs after it.
# shellcheck disable=SC2054  # --export takes a comma-separated list
common=(--parsable --export=ALL,SHARDS="$SHARDS" --chdir="$WORK" --kill-on-invalid-dep=yes "$@")
id() { cut -d';' -f1; }
fit=$(sbatch "${common[@]}" --array="$array" --output="$WORK/logs/fit-%A_%a.out" \
  "$here/fit.sbatch" | id)
merge=$(sbatch "${common[@]}" --dependency="afterok:$fit" --output="$WORK/logs/merge-%j.out" \
  "$here/merge.sbatch" | id)
apply=$(sbatch "${common[@]}" --array="$array" --dependency="afterok:$merge" \
  --output="$WORK/logs/apply-%A_%a.out" "$here/apply.sbatch" | id)
echo "fit=$fit merge=$merge apply=$apply"
