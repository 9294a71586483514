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
for mode in one loop; do
  timeout 120 ./compact.exe $mode > out.txt 2>&1 || echo "exit=$?" >> out.txt
  cat out.txt
  # the crash leaves the pool's shm object behind
  name=$(sed -n 's/^shm //p' out.txt); [ -n "$name" ] && rm -f "/dev/shm/${name#/}"
done
rm -rf "$D"
