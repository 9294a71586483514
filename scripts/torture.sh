#!/usr/bin/env bash
# `make torture`: the kill, hand-off kill, signal, fuzz and exhaustion suites at
# SHMPOOL_TORTURE times the size they run at in `make test` (default 35):
# the Rust ones (tests/torture_*.rs), then the OCaml ones
# (scripts/torture-ocaml.sh) if present. Each suite prints one summary
# line; they are repeated at the end. Fails if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export SHMPOOL_TORTURE=${SHMPOOL_TORTURE:-35}
rust_log=$(mktemp)
ocaml_log=$(mktemp)
# Parts that cannot run here say so in this file (see scripts/test.sh).
SHMPOOL_SKIP_LOG=$(mktemp)
export SHMPOOL_SKIP_LOG
trap 'rm -f "$rust_log" "$ocaml_log" "$SHMPOOL_SKIP_LOG"' EXIT
t0=$SECONDS
failed=""

echo "== Rust torture suites (SHMPOOL_TORTURE=$SHMPOOL_TORTURE)"
cargo test --release --features crash-points \
  --test torture_kill --test torture_handoff --test torture_signals --test torture_fuzz --test torture_exhaustion \
  --test liveness --test double_free \
  -- --nocapture --test-threads=1 2>&1 | tee "$rust_log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed="$failed rust"
rust_secs=$((SECONDS - t0))

ocaml_secs=0
if [ -x scripts/torture-ocaml.sh ]; then
  echo "== OCaml torture suites"
  t1=$SECONDS
  # Summary lines are on stdout; diagnostics go straight to stderr.
  scripts/torture-ocaml.sh | tee "$ocaml_log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed="$failed ocaml"
  ocaml_secs=$((SECONDS - t1))
else
  echo "== no scripts/torture-ocaml.sh: OCaml suites skipped"
fi

echo
echo "== torture summary (SHMPOOL_TORTURE=$SHMPOOL_TORTURE)"
echo "-- Rust (${rust_secs} s)"
# (the test harness may print "test <name> ... " before a line: cut it off)
grep -oE 'torture (kill|handoff|signals|fuzz|exhaustion|liveness|double-free): .*' "$rust_log" || echo "(no summary lines)"
if [ -x scripts/torture-ocaml.sh ]; then
  echo "-- OCaml (${ocaml_secs} s)"
  grep -E '^torture[ -]' "$ocaml_log" || echo "(no summary lines)"
fi
if [ -s "$SHMPOOL_SKIP_LOG" ]; then
  echo "-- SKIPPED (could not run here):"
  sort -u "$SHMPOOL_SKIP_LOG"
fi
if [ -n "$failed" ]; then
  echo "make torture: FAILED:$failed ($((SECONDS - t0)) s)" >&2
  exit 1
fi
echo "make torture: all suites passed ($((SECONDS - t0)) s)"
