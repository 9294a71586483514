#!/bin/bash
# Builds and runs the copy-in cost experiment.
set -e
cd "$(dirname "$0")"
D=$(mktemp -d)
cp copy_stubs.c copybench.ml "$D"
(cd "$D" && ocamlfind ocamlopt -ccopt -O2 -package unix -linkpkg copy_stubs.c copybench.ml -o cb.exe && ./cb.exe)
rm -rf "$D"
