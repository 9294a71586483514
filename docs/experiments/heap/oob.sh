#!/bin/bash
# Builds and runs the out-of-heap experiment (OCaml 4.13/4.14, naked pointers allowed).
set -e
cd "$(dirname "$0")"
D=$(mktemp -d)
cp oob_stubs.c oob.ml "$D"
(cd "$D" && ocamlfind ocamlopt -package unix -linkpkg oob_stubs.c oob.ml -o oob.exe)
for col in white black; do for reg in noreg reg; do for t in gc sem modify; do
  printf '== %s %s %s: ' $col $reg $t
  rc=0; out=$("$D/oob.exe" $col $reg $t 2>&1) || rc=$?; echo "$out" | tr "\n" ";"; echo " exit=$rc"
done; done; done
rm -rf "$D"
