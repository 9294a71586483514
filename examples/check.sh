#!/usr/bin/env bash
# The examples' test (dune alias runtest): every program run as built on
# OCamlnet's modules and as built with `open Shmpool_netmcore` prepended must
# print the same answers, and the known ones. Each run gets a private TMPDIR
# (Netmcore's socket directories).
set -u
cd "$(dirname "$0")"
tmp=$(mktemp -d)
ls /dev/shm > "$tmp/shm_before" 2>/dev/null
fail=0
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

# run NAME ARGS...: prints the program's answer lines (not its timings)
run() {
  local exe=$1; shift
  TMPDIR=$tmp timeout 120 "./$exe.exe" "$@" 2>"$tmp/err" | grep -v '^time=\|^throughput=' ||
    { echo "FAIL: $exe $* exited badly"; cat "$tmp/err"; }
}

expect() { # expect WHAT GOT WANT
  if [ "$2" = "$3" ]; then echo "ok   $1: $2"
  else echo "FAIL $1: got '$2', want '$3'"; fail=1; fi
}

declare -A known=([8]="distinct=12 total=92" [9]="distinct=46 total=352" [10]="distinct=92 total=724")
for n in 8 9 10; do
  for mode in -seq -sht -sht2 -cond; do
    for exe in nqueens nqueens_shm; do
      expect "$exe $mode -n $n" "$(run $exe $mode -n $n)" "n=$n ${known[$n]}"
    done
  done
done

# The pipeline: same byte count and checksum on both, both ends agreeing.
a=$(run pipeline -mib 16)
b=$(run pipeline_shm -mib 16)
expect "pipeline (OCamlnet) -mib 16" "$(echo "$a" | grep -o 'match$')" match
expect "pipeline (shmpool) -mib 16 = OCamlnet's" "$b" "$a"
# The copying consumer, on ours (OCamlnet's worker died once in this mode)
c=$(run pipeline_shm -mib 16 -copy)
expect "pipeline (shmpool) -copy = OCamlnet's" "$c" "$a"

# Other sessions' tests make pools too: new names are only reported.
new=$(ls /dev/shm | grep '^mempool_' | grep -vxF -f "$tmp/shm_before" || true)
[ -z "$new" ] || echo "warning: new pools in /dev/shm (ours or another test's): $new"

exit $fail
