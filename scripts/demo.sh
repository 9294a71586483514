#!/usr/bin/env bash
# `make demo`: builds and runs the demo (demo/demo.ml): a parallel prefix
# sum over shared memory with OCamlnet's Netmcore, on shmpool's drop-in
# Netmcore_mempool and on OCamlnet's original, compared. Arguments are
# passed to the demo (`make demo ARGS="-workers 8 -mib 256"`, `-help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
dune build ./demo/demo.exe ./demo/wordfreq.exe ./demo/wordfreq_shm.exe
./_build/default/demo/demo.exe "$@"

echo
echo "== Part 2: an existing OCamlnet program, switched by one line"
echo "   demo/wordfreq.ml: 600 generated documents (600,000 words) pushed into a"
echo "   Netmcore_queue; 2 workers pop them and add their word counts into a"
echo "   Netmcore_hashtbl under a Netmcore_mutex, and report in a Netmcore_ref."
echo "   Built twice: as is, and with \`open Shmpool_netmcore\` as its first line."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() { # run NAME: the program's output, or the demo fails
  if ! TMPDIR=$tmp timeout 120 "./_build/default/demo/$1.exe" >"$tmp/$1.out" 2>"$tmp/$1.err"; then
    echo "FAILED: $1"; cat "$tmp/$1.out" "$tmp/$1.err"; exit 2
  fi
}
run wordfreq
run wordfreq_shm
echo
echo "-- on OCamlnet's modules:"
sed 's/^/   /' "$tmp/wordfreq.out"
echo "-- with open Shmpool_netmcore:"
sed 's/^/   /' "$tmp/wordfreq_shm.out"
# the answers (not the timing, nor how the documents fell to the workers)
answers() { grep -v '^time=\|^per worker' "$tmp/$1.out"; }
t_orig=$(sed -n 's/^time=//p' "$tmp/wordfreq.out")
t_ours=$(sed -n 's/^time=//p' "$tmp/wordfreq_shm.out")
echo
if [ "$(answers wordfreq)" = "$(answers wordfreq_shm)" ] && grep -qx 'verified=true' "$tmp/wordfreq.out" &&
  grep -qx 'verified=true' "$tmp/wordfreq_shm.out"; then
  echo "Same answers (counts, digest), both verified against a sequential count."
  awk -v a="$t_orig" -v b="$t_ours" \
    'BEGIN { printf "Parallel phase: OCamlnet %.3f s, shmpool %.3f s (%.1fx as fast)\n", a, b, a / b }'
else
  echo "MISMATCH between the two builds (or a failed verification)"
  exit 1
fi
