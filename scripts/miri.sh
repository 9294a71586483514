#!/usr/bin/env bash
# `make miri`: the tests that need no kernel object, under Miri, which
# checks every memory access against Rust's aliasing rules (Stacked
# Borrows) and reports data races between threads:
#   - the library's unit tests (layout, descriptors, owner identities);
#   - tests/heap_pool.rs: a pool in heap memory used by several threads at
#     once, standing in for the processes that share a real pool;
#   - tests/arena_unit.rs: the allocator on a plain Vec, but for the five
#     tests whose pools of thousands of pages take minutes each under Miri
#     (their code paths are all exercised by the others).
# Isolation is off so that the pool can read /proc/self/stat (its owner
# identity), as it does outside Miri.
#
# Not in `make test`: it needs the nightly toolchain with the miri
# component (`rustup toolchain install nightly --component miri rust-src`),
# which a fresh machine lacks, and takes a few minutes. Without it this
# prints that it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo +nightly miri --version >/dev/null 2>&1; then
  echo "make miri: SKIPPED: no nightly toolchain with Miri here" \
    "(rustup toolchain install nightly --component miri rust-src)"
  exit 0
fi

export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"
t0=$SECONDS
failed=""
run() {
  echo "== miri: $*"
  cargo +nightly miri test "$@" || failed="$failed [$*]"
}
run --lib
run --test heap_pool
run --test arena_unit -- \
  --skip check_detects_planted_corruption \
  --skip fill_whole_pool_with_one_page_blocks \
  --skip format_makes_one_free_run \
  --skip not_a_block_leaves_the_pool_unchanged \
  --skip rebuild_after_garbage_reproduces_the_state
echo "== miri took $((SECONDS - t0)) s"
if [ -n "$failed" ]; then
  echo "make miri: FAILED:$failed" >&2
  exit 1
fi
echo "make miri: all passed"
