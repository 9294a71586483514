# The two commands of the README: `make demo` and `make test`.
# Both install what is missing first (scripts/setup.sh).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build test demo bench torture miri doc opam-test test-ocaml414 clean

all: build

setup:
	@scripts/setup.sh

build: setup
	dune build

test:
	@scripts/test.sh

demo: build
	@scripts/demo.sh $(ARGS)

bench: setup
	@scripts/bench.sh

torture: setup
	@scripts/torture.sh

miri:
	@scripts/miri.sh

doc: setup
	@scripts/doc.sh

opam-test: setup
	@scripts/opam-test.sh

# Not part of `make test` (the first run builds OCaml 4.14, findlib and
# OCamlnet: 20-30 min; later runs reuse them from the cache).
test-ocaml414: setup
	@scripts/test-ocaml414.sh

clean:
	dune clean || true
	cargo clean
