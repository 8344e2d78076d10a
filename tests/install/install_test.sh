#!/usr/bin/env bash
# Installs Concord into a scratch prefix, builds examples/custom-harmonizer against it with
# find_package(Concord), loads the plugin with --plugin-path and runs a pipeline that uses it.
# Every installed executable and library, and the out-of-tree plugin, must have only absolute
# or $ORIGIN-relative RPATH/RUNPATH entries (never one ld.so reads as the current folder).
set -euo pipefail
src="$1"
build="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
"$build/bin/check-runpath" "$work/prefix" || { echo "FAIL: unsafe RUNPATH in the installed tree"; exit 1; }
test -f "$work/prefix/bin/concord" || { echo "FAIL: concord not installed"; exit 1; }
# The attack itself: a libfmt.so.9 (built by tests/CMakeLists.txt) in the current folder.
planted="$build/test-fixtures/elf/cwd"
rm -f "$planted/PLANTED-LIBRARY-RAN"
(cd "$planted" && "$work/prefix/bin/concord" --version >/dev/null)
test ! -e "$planted/PLANTED-LIBRARY-RAN" || { echo "FAIL: installed concord loaded $planted/libfmt.so.9"; exit 1; }
export CCACHE_BASEDIR="$src"
cmake -S "$src/examples/custom-harmonizer" -B "$work/example" -G Ninja \
  -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$work/example" >/dev/null
plugin="$work/example/libexample-mean-scale.so"
test -f "$plugin" || { echo "FAIL: $plugin was not built"; exit 1; }
"$build/bin/check-runpath" "$plugin" || { echo "FAIL: unsafe RUNPATH in the example plugin"; exit 1; }
out="$("$work/prefix/bin/concord" plugins mean-scale --plugin-path "$work/example")"
echo "$out"
grep -q "harmonizer mean-scale" <<<"$out" || { echo "FAIL: plugin not listed"; exit 1; }
grep -q "libexample-mean-scale.so" <<<"$out" || { echo "FAIL: library path not shown"; exit 1; }
grep -q "min_mean : float" <<<"$out" || { echo "FAIL: argument not listed"; exit 1; }
# Without --plugin-path the pipeline must fail validation and name the unknown plugin.
if "$work/prefix/bin/concord" validate "$src/examples/custom-harmonizer/pipeline.yaml" 2>"$work/err"; then
  echo "FAIL: validation passed without the plugin"; exit 1
fi
grep -q "unknown harmonizer plugin 'mean-scale'" "$work/err" || { cat "$work/err"; echo "FAIL: no error naming the plugin"; exit 1; }
cd "$work"
"$work/prefix/bin/concord" run "$src/examples/custom-harmonizer/pipeline.yaml" \
  --plugin-path "$work/example" --run-dir "$work/run" --no-progress 2>&1 | tail -n 12
test -f "$work/run/summary.json" || { echo "FAIL: no summary.json"; exit 1; }
grep -q "mean-scale" "$work/run/pipeline.yaml" || { echo "FAIL: resolved pipeline lacks the harmonizer"; exit 1; }
echo "install_and_example: PASS"
