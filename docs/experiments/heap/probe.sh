#!/bin/bash
# Builds and runs the probes of OCamlnet's own Netmcore_heap / Netmcore_ref
# (original_probe.ml -> original_probe.out) and its compaction crash
# (original_compact.ml). Needs libocamlnet-ocaml-dev.
set -e
cd "$(dirname "$0")"
D=$(mktemp -d)
cp original_probe.ml original_compact.ml "$D"
cd "$D"
ocamlfind ocamlopt -package threads.posix,netmulticore -linkpkg original_probe.ml -o probe.exe 2>/dev/null
ocamlfind ocamlopt -package threads.posix,netmulticore -linkpkg original_compact.ml -o compact.exe
timeout 60 ./probe.exe || true
./compact.exe one || echo "exit=$?"
timeout 120 ./compact.exe loop || echo "exit=$?"
rm -rf "$D"
