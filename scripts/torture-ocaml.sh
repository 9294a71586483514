#!/usr/bin/env bash
# The OCaml torture suites (tests/ocaml/torture/, and the Netmcore worker
# kills of tests/ocaml/test_worker_kills.ml) at a larger size than in
# `dune test`: SHMPOOL_TORTURE (default 35) multiplies their sizes
# (SHMPOOL_TORTURE_SEED fixes their seed). Each suite prints one summary
# line, shown here with its runtime; fails if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export SHMPOOL_TORTURE=${SHMPOOL_TORTURE:-35}
dir=tests/ocaml/torture
targets=""
for s in fork_kill netmcore_kill handoff signals fuzz lifecycle; do targets="$targets $dir/torture_$s.exe"; done
targets="$targets tests/ocaml/test_worker_kills.exe"
# shellcheck disable=SC2086
dune build $targets || { echo "torture-ocaml: build failed" >&2; exit 1; }
failed=""
for t in $targets; do
  s=$(basename "$t" .exe)
  t0=$(date +%s.%N)
  out=$("_build/default/$t" 2>&1)
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
