#!/usr/bin/env bash
# `make opam-test`: install shmpool with opam (offline, from the local stub
# repository opam/ describing the Debian-installed tools) into a throwaway
# OPAMROOT, run its tests there, then build and run a downstream consumer
# (opam/consumer) against the installed libraries, with dune and with
# ocamlfind. Everything lives in a mktemp dir removed on exit.
# Works from a fresh clone, as root, without a TTY; touches nothing in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
export PATH="$HOME/.cargo/bin:$PATH"   # cargo/rustc (rustup), also for opam's build

t0=$SECONDS
current=init
fail() { echo "opam-test: FAIL at step '$current' ($((SECONDS - t0)) s)" >&2; }
trap fail ERR
step() { current=$1; echo "== $1"; }

for c in opam dune ocamlfind cargo git; do
  command -v "$c" >/dev/null || { echo "opam-test: FAIL: '$c' not on PATH (run scripts/setup.sh)" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/shmpool-opam-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# A clean, non-interactive opam: nothing from an outer opam env leaks in.
unset OPAMSWITCH OPAM_SWITCH_PREFIX OPAMROOT OPAMREPOSITORY OCAMLFIND_CONF OCAMLFIND_DESTDIR
export OPAMROOT=$TMP/root OPAMYES=1 OPAMCOLOR=never OPAMROOTISOK=1 \
       OPAMNODEPEXTS=1 OPAMDOWNLOADJOBS=1 OPAMKEEPBUILDDIR=0
exec </dev/null

step "opam init (local repo $SRC/opam)"
opam init --bare --disable-sandboxing -n local "$SRC/opam" >/dev/null

step "opam switch create sys ocaml-system"
opam switch create sys ocaml-system

# A git checkout is pinned as git+file (committed files only): --working-dir
# makes opam take the working tree, so uncommitted edits are tested too.
wd=--working-dir
git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1 || wd=
step "opam install --with-test $wd . (build + dune runtest + install)"
opam install --switch=sys --with-test $wd "$SRC"

envs=$(opam env --switch=sys --set-switch)
eval "$envs"
step "installed libraries"
ocamlfind list 2>/dev/null | grep -E '^shmpool(\.| )'
ocamlfind query shmpool shmpool.netmcore >/dev/null

step "consumer: dune build + run"
cp -R "$SRC/opam/consumer" "$TMP/consumer"
cd "$TMP/consumer"
dune build --root . ./consumer.exe
./_build/default/consumer.exe

step "consumer: ocamlfind ocamlopt + run"
ocamlfind ocamlopt -package threads.posix,shmpool,shmpool.netmcore -linkpkg \
  consumer.ml -o consumer-findlib.exe
./consumer-findlib.exe

cd "$SRC"
step "opam remove shmpool"
opam remove --switch=sys shmpool >/dev/null

trap - ERR
echo "opam-test: PASS (opam install --with-test, dune + ocamlfind consumer) in $((SECONDS - t0)) s"
