#!/usr/bin/env bash
# Test of `make demo` part 2 (dune alias runtest): wordfreq as built on
# OCamlnet's modules and as built with `open Shmpool_netmcore` prepended give
# the same answers, each verified against a sequential count (small corpus;
# 3 workers so that more processes contend for the table's mutex).
set -u
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for exe in wordfreq wordfreq_shm; do
  if ! TMPDIR=$tmp timeout 120 "./$exe.exe" -docs 120 -words 500 -workers 3 >"$tmp/$exe.out" 2>&1; then
    echo "FAIL: $exe exited badly"; fail=1
  fi
  cat "$tmp/$exe.out"
  grep -qx 'verified=true' "$tmp/$exe.out" || { echo "FAIL: $exe not verified"; fail=1; }
  grep -v '^time=\|^per worker' "$tmp/$exe.out" >"$tmp/$exe.answers"
done
if ! cmp -s "$tmp/wordfreq.answers" "$tmp/wordfreq_shm.answers"; then
  echo "FAIL: the two builds' answers differ"; diff "$tmp/wordfreq.answers" "$tmp/wordfreq_shm.answers"; fail=1
fi
[ $fail = 0 ] && echo "ok: same answers on both builds, both verified"
exit $fail
