#!/usr/bin/env bash
# `make demo`: builds and runs the demo (demo/demo.ml): a parallel prefix
# sum over shared memory with OCamlnet's Netmcore, on shmpool's drop-in
# Netmcore_mempool and on OCamlnet's original, compared. Arguments are
# passed to the demo (`make demo ARGS="-workers 8 -mib 256"`, `-help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
dune build ./demo/demo.exe
exec ./_build/default/demo/demo.exe "$@"
