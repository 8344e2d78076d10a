# Sourced by the tests in tests/slurm: a temporary folder $tmp, a throwaway single-node Slurm in
# $tmp/slurm (scripts/slurm-local, stopped on exit, also on failure), SLURM_CONF exported, and
# fail() that prints the job and daemon logs. Needs $src (the source tree). Exits 77 (ctest:
# skipped) when the Slurm programs are missing. SLURM_LOCAL_OVERSUBSCRIBE passes through.
tmp=$(mktemp -d /tmp/concord-slurm.XXXXXX)
cleanup() {
  "$src/scripts/slurm-local" stop "$tmp/slurm" || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$tmp"/work/*.out "$tmp"/work/logs/*.out; do
    [ -f "$f" ] && { echo "---- $f" >&2; tail -n 40 "$f" >&2; }
  done
  for f in "$tmp"/slurm/slurmctld.log "$tmp"/slurm/slurmd.log; do
    [ -f "$f" ] && { echo "---- $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}
rc=0
"$src/scripts/slurm-local" start "$tmp/slurm" || rc=$?
if [ "$rc" = 77 ]; then
  echo "SKIP: Slurm programs missing (see above)"
  exit 77
fi
[ "$rc" = 0 ] || fail "the local Slurm cluster did not start"
export SLURM_CONF="$tmp/slurm/slurm.conf"
