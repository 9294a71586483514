//! shmpool: a crash-safe, constant-time shared-memory page pool.
//!
//! The crate reads like its architecture, bottom up:
//!
//! | module | mechanism |
//! |---|---|
//! | [`mapping`] | the shared memory: named shm, memfd, or borrowed |
//! | [`layout`] | the on-shm header and geometry (offsets only) |
//! | [`lock`] | the robust process-shared mutex |
//! | [`owner`] | process identities (pid + start time) |
//! | [`desc`] | page descriptors: the truth and the derived words |
//! | [`arena`], `treap`, `recovery`, `check` | the allocator, pure logic |
//! | `cache` | the per-process cache of small freed blocks |
//! | [`pool`] | the safe API tying them together |
//! | [`heap`] | shared heaps of OCaml values on a pool (`Netmcore_heap`) |
//! | `ocaml_stubs` | the OCaml FFI (feature `ocaml-stubs`) |

pub mod arena;
mod cache;
mod check;
pub mod crashpoint;
pub mod desc;
pub mod error;
pub mod heap;
pub mod layout;
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
