#!/usr/bin/env bash
# The OCaml torture suites (tests/ocaml/torture/) at a larger size than in
# `dune test`: SHMPOOL_TORTURE (default 35) multiplies their sizes
# (SHMPOOL_TORTURE_SEED fixes their seed). Each suite prints one summary
# line, shown here with its runtime; fails if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export SHMPOOL_TORTURE=${SHMPOOL_TORTURE:-35}
suites="fork_kill netmcore_kill signals fuzz lifecycle"
dir=tests/ocaml/torture
targets=""
for s in $suites; do targets="$targets $dir/torture_$s.exe"; done
# shellcheck disable=SC2086
dune build $targets || { echo "torture-ocaml: build failed" >&2; exit 1; }
failed=""
for s in $suites; do
  t0=$(date +%s.%N)
  out=$("_build/default/$dir/torture_$s.exe")
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\n' "$out" | sed "1s/\$/  [${secs} s]/"
  [ "$rc" -eq 0 ] || failed="$failed $s"
done
if [ -n "$failed" ]; then
  echo "torture-ocaml: FAILED:$failed (SHMPOOL_TORTURE=$SHMPOOL_TORTURE)" >&2
  exit 1
fi
echo "torture-ocaml: all suites passed (SHMPOOL_TORTURE=$SHMPOOL_TORTURE)"
