#!/usr/bin/env bash
# `make test`: every check, each step named, the failing one reported.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
step() {
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  if ! "$@"; then
    echo "FAILED step: $name ($*)" >&2
    exit 1
  fi
  echo "== $name: ok ($((SECONDS - t0)) s)"
}
step setup            scripts/setup.sh
shm_before=$(mktemp)
# A test that cannot run here (not root, no mount namespace...) appends a
# line "SKIPPED: <test>: <reason>" to this file (common::skipped in
# tests/common/mod.rs); they are listed at the end, pass or fail,
# so that a skip never reads as a pass.
SHMPOOL_SKIP_LOG=$(mktemp)
export SHMPOOL_SKIP_LOG
report_skips() {
  local n
  n=$(sort -u "$SHMPOOL_SKIP_LOG" | grep -c '^SKIPPED')
  if [ "$n" -gt 0 ]; then
    echo "== $n test(s) SKIPPED (could not run here):"
    sort -u "$SHMPOOL_SKIP_LOG"
  else
    echo "== no test skipped"
  fi
}
trap 'report_skips; rm -f "$shm_before" "$SHMPOOL_SKIP_LOG"' EXIT
scripts/check-shm.sh snapshot "$shm_before"
step cargo-fmt        cargo fmt --all -- --check
step cargo-clippy     cargo clippy --all-targets --features crash-points -- -D warnings
step clippy-stubs     cargo clippy --lib --features ocaml-stubs -- -D warnings
# Twice: the dev profile checks arithmetic overflow and debug assertions
# (the release profile does neither); the release profile runs the code as
# shipped, at full speed.
step cargo-test-dev   cargo test --features crash-points
step cargo-test       cargo test --release --features crash-points
step dune-build       dune build
step dune-test        dune test --force
# `make demo` too (a few seconds once built): it once failed for a whole
# stop with every test green (tests/large_cache.rs,
# long_lived_large_blocks_fill_the_pool).
step demo             scripts/demo.sh
step docs             scripts/doc.sh
step opam-test        scripts/opam-test.sh
step no-shm-leftovers scripts/check-shm.sh compare "$shm_before"
echo "make test: all steps passed"
