#!/usr/bin/env bash
# `make doc`: OCaml API docs (odoc via dune) and Rust API docs (rustdoc),
# both failing on any warning. Prints where the HTML is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# odoc: dune 2.9 exits 0 on odoc warnings and does not replay them for
# cached rules, so drop the odoc artefacts (cheap to redo) to get every
# warning again, then fail if any shows up.
if [ -d _build/default ]; then
  find _build/default \( -name '*.odoc' -o -name '*.odocl' \) -delete
  rm -rf _build/default/_doc
fi
log=$(mktemp); trap 'rm -f "$log"' EXIT
echo "== dune build @doc"
rc=0; dune build @doc 2>&1 | tee "$log" || rc=$?
if [ "$rc" -ne 0 ]; then echo "doc: FAILED: dune build @doc exited $rc" >&2; exit 1; fi
# "Couldn't find the following modules: Stdlib Netsys_mem ..." is not ours:
# Debian ships no .odoc files for the stdlib and OCamlnet, so links into
# them can't resolve. Every other warning fails.
if grep 'Warning' "$log" | grep -vq "Warning: Couldn't find the following modules"; then
  echo "doc: FAILED: odoc warnings (above)" >&2; exit 1
fi
if grep -q "Warning: Couldn't find the following modules" "$log"; then
  echo "doc: note: links to external libraries without .odoc (stdlib, OCamlnet) left unresolved"
fi

echo "== cargo doc --no-deps"
if ! RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --no-deps --locked; then
  echo "doc: FAILED: cargo doc (warnings are errors)" >&2; exit 1
fi

echo "doc: OK"
echo "  OCaml: $PWD/_build/default/_doc/_html/index.html"
echo "  Rust:  $PWD/target/doc/shmpool/index.html"
