//! shmpool: a crash-safe, constant-time shared-memory page pool.
//!
//! The crate reads like its architecture, bottom up:
//!
//! | module | mechanism |
//! |---|---|
//! | [`mapping`] | the shared memory: named shm, memfd, or borrowed |
//! | [`layout`] | every on-shm type, its byte layout, and the geometry (offsets only) |
//! | [`lock`] | the robust process-shared mutex |
//! | [`owner`] | process identities (pid + start time + PID namespace) |
//! | [`liveness`] | whether a slot's process lives: keeper threads holding robust mutexes |
//! | [`desc`] | page descriptors: the truth and the derived words |
//! | [`arena`], `treap`, `recovery`, `check` | the allocator, pure logic |
//! | `cache` | the per-process cache of small freed blocks |
//! | [`pool`] | the safe API tying them together |
//! | [`heap`] | shared heaps of OCaml values on a pool (`Netmcore_heap`) |
//! | `ocaml_stubs` | the OCaml FFI (feature `ocaml-stubs`) |

// Every unsafe operation sits in its own block with a `// SAFETY:` note,
// also inside `unsafe fn`s (see the README's "Soundness" rules).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

// `liveness.rs` and `lock.rs` read the first word of a pthread mutex (the
// lock word, with the holder's TID and the kernel's OWNER_DIED bit) without
// taking the mutex: that is glibc's layout. Another C library would need
// its own reading; refuse to build rather than misjudge liveness.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
compile_error!("shmpool supports Linux with glibc only (it reads glibc's robust mutex word)");

pub mod arena;
mod cache;
mod check;
pub mod crashpoint;
pub mod desc;
pub mod error;
pub mod heap;
mod large_cache;
pub mod layout;
pub mod liveness;
pub mod lock;
pub mod mapping;
pub mod owner;
pub mod pool;
mod recovery;
mod treap;

#[cfg(feature = "ocaml-stubs")]
mod ocaml_heap_stubs;
#[cfg(feature = "ocaml-stubs")]
mod ocaml_stubs;
#[cfg(feature = "ocaml-stubs")]
mod ocaml_sync_stubs;

pub use arena::{AllocState, Arena, PageStats};
pub use error::{Error, Result};
pub use pool::{CreateOptions, OwnerInfo, Pool, Reclaimed, Stats};
pub use recovery::RebuildReport;
