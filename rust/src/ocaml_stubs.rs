//! OCaml stubs (feature `ocaml-stubs`).
