#!/usr/bin/env bash
# A networked federation on a real single-node Slurm cluster: scripts/slurm-local starts munged,
# slurmctld and slurmd in a temporary folder (the partition oversubscribed, so a server job and
# three site jobs share the cores); examples/slurm/federation.sbatch provisions kits, runs
# `concord server` as the job and submits one `concord site` per array task. Checks that the jobs
# completed and that the run's global state is byte for byte that of `concord run` of the same
# pipeline. The daemons are stopped afterwards, also on failure.
#
#   tests/slurm/federation_test.sh SOURCE_DIR BUILD_DIR
#
# Exit 77 (ctest: skipped) only when the Slurm/munge programs are missing (slurm_test.sh
# installs them as root when it can; this test runs after it).
set -euo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
concord="$build/bin/concord"
[ -x "$concord" ] || { echo "FAIL: $concord is missing: build concord-cli first" >&2; exit 1; }

export SLURM_LOCAL_OVERSUBSCRIBE=FORCE:4  # a server job and three site jobs on 2 cores
# shellcheck source=tests/slurm/local_cluster.sh
. "$src/tests/slurm/local_cluster.sh"

mkdir -p "$tmp/work"
cat >"$tmp/work/pipeline.yaml" <<'PIPELINE'
name: fedslurm
seed: 7
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 8, test_per_site: 4, size: 24}}
  sites: [site-A, site-B, site-C]
model: {type: cnn, args: {width: 6, depth: 2}}
harmonizers:
  - type: histogram-match
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 2, min_sites: 2}
aggregator: {type: fedadam}
output: runs-unused
PIPELINE
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export WORK="$tmp/work" PIPELINE="$tmp/work/pipeline.yaml" SITES="site-A site-B site-C"
export CONCORD="$concord" PORT="$port" SITE_OPTIONS="--cpus-per-task=1"
export SITE_ARGS="--out $tmp/work/sites"
server=$(cd "$tmp/work" && sbatch --parsable --export=ALL --cpus-per-task=1 --time=10 \
  --output="$tmp/work/logs-server.out" "$src/examples/slurm/federation.sbatch") ||
  fail "sbatch failed"
echo "server job $server"

deadline=$((SECONDS + 600))
while squeue -h -o '%T' 2>/dev/null | grep -qE 'PENDING|RUNNING|CONFIGURING|COMPLETING'; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the federation did not finish within 10 minutes"
  sleep 2
done
state=$(scontrol -o show job "$server" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)
[ -z "$state" ] || [ "$state" = "JobState=COMPLETED" ] || fail "server job: $state"
[ -f "$tmp/work/run/global.state" ] || fail "the server wrote no run/global.state"
grep -q "site 'site-C' disconnected" "$tmp/work/logs-server.out" ||
  fail "the server log does not show the sites"

(cd "$tmp/work" && "$concord" run "$PIPELINE" --run-dir "$tmp/work/sim" --no-progress \
  >"$tmp/work/sim.log" 2>&1) || fail "concord run failed: $(tail -n 5 "$tmp/work/sim.log")"
cmp "$tmp/work/run/global.state" "$tmp/work/sim/global.state" ||
  fail "the Slurm federation's global state differs from concord run's"
echo "PASS: federation.sbatch on Slurm (server + 3 site jobs) ends byte-identical to concord run"
