#!/usr/bin/env bash
# Installs what shmpool needs on Debian 12 + Rust, only if something is
# missing. Idempotent and quiet when everything is there.
set -euo pipefail
PKGS=(ocaml-nox ocaml-dune ocaml-findlib libocamlnet-ocaml-dev
      libalcotest-ocaml-dev libqcheck-ocaml-dev ocaml-odoc opam gnuplot-nox)
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
for c in ocamlfind dune opam odoc gnuplot; do
  command -v "$c" >/dev/null 2>&1 || missing+=("command $c")
done
if command -v ocamlfind >/dev/null 2>&1; then
  for l in netmulticore alcotest qcheck-core; do
    ocamlfind query "$l" >/dev/null 2>&1 || missing+=("library $l")
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: missing ${missing[*]}; installing Debian packages"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PKGS[@]}" >/dev/null
fi
