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
trap 'rm -f "$shm_before"' EXIT
scripts/check-shm.sh snapshot "$shm_before"
step cargo-fmt        cargo fmt --all -- --check
step cargo-clippy     cargo clippy --all-targets --features crash-points -- -D warnings
step clippy-stubs     cargo clippy --lib --features ocaml-stubs -- -D warnings
step cargo-test       cargo test --release --features crash-points
step dune-build       dune build
step dune-test        dune test --force
step docs             scripts/doc.sh
step opam-test        scripts/opam-test.sh
step no-shm-leftovers scripts/check-shm.sh compare "$shm_before"
echo "make test: all steps passed"
