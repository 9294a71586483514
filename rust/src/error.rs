//! The one error type of the core. Every fallible operation returns it as a
//! value; nothing in the core panics on bad input.

use std::fmt;

/// What went wrong. The OCaml stubs map each variant to a small negative
/// integer (see [`Error::code`]) and raise the matching exception on the
/// OCaml side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No free run is large enough for the request.
    OutOfMemory,
    /// A size of zero, a negative size, or one larger than the format allows.
    BadSize,
    /// The address is not the first byte of a live block of this pool
    /// (double free, interior address, foreign memory, another pool).
    NotABlock,
    /// Not a POSIX shm name this crate accepts (see
    /// [`crate::mapping::check_name`]), with the reason.
    BadName(String),
    /// The memory is not a pool of this layout (wrong magic, version, page
    /// size, or a header whose geometry does not fit the mapping).
    NotAPool(String),
    /// The shared metadata is inconsistent in a way recovery cannot repair.
    Corrupt(String),
    /// A system call failed.
    Io(String, nix::errno::Errno),
}

impl Error {
    /// Stable negative codes used across the FFI (see [`code`]).
    pub fn code(&self) -> isize {
        match self {
            Error::OutOfMemory => code::OUT_OF_MEMORY,
            Error::BadSize => code::BAD_SIZE,
            Error::NotABlock => code::NOT_A_BLOCK,
            Error::NotAPool(_) => code::NOT_A_POOL,
            Error::Corrupt(_) => code::CORRUPT,
            Error::Io(..) => code::IO,
            Error::BadName(_) => code::BAD_NAME,
        }
    }
}

/// The negative codes the OCaml stubs return instead of a result. This is
/// their only definition: the OCaml side reads [`code::ALL`] through a stub
/// when it starts (by name, failing loudly if one is missing), so the two
/// sides cannot drift apart.
pub mod code {
    pub const OUT_OF_MEMORY: isize = -1;
    pub const BAD_SIZE: isize = -2;
    pub const NOT_A_BLOCK: isize = -3;
    pub const NOT_A_POOL: isize = -4;
    pub const CORRUPT: isize = -5;
    pub const IO: isize = -6;
    /// The pool handle is closed (or was never opened): FFI only.
    pub const CLOSED: isize = -7;
    /// A panic was caught at the FFI boundary (an internal error).
    pub const INTERNAL: isize = -8;
    pub const BAD_NAME: isize = -9;
    // Shared heaps (`crate::heap`, FFI only).
    /// A value that cannot be copied into a heap (closure, object, ...).
    pub const UNCOPYABLE: isize = -10;
    pub const NOT_A_HEAP: isize = -11;
    pub const HEAP_DESTROYED: isize = -12;
    /// A heap operation that needs the heap's lock, called without it.
    pub const NOT_LOCKED: isize = -13;
    pub const HEAP_IN_USE: isize = -14;

    /// Every code with the name the OCaml side looks it up by.
    pub const ALL: [(&str, isize); 14] = [
        ("out_of_memory", OUT_OF_MEMORY),
        ("bad_size", BAD_SIZE),
        ("not_a_block", NOT_A_BLOCK),
        ("not_a_pool", NOT_A_POOL),
        ("corrupt", CORRUPT),
        ("io", IO),
        ("closed", CLOSED),
        ("internal", INTERNAL),
        ("bad_name", BAD_NAME),
        ("uncopyable", UNCOPYABLE),
        ("not_a_heap", NOT_A_HEAP),
        ("heap_destroyed", HEAP_DESTROYED),
        ("not_locked", NOT_LOCKED),
        ("heap_in_use", HEAP_IN_USE),
    ];
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfMemory => write!(f, "out of pool memory"),
            Error::BadSize => write!(f, "bad size"),
            Error::NotABlock => write!(f, "memory block not found"),
            Error::BadName(why) => write!(f, "bad shm name: {why}"),
            Error::NotAPool(why) => write!(f, "not a shmpool pool: {why}"),
            Error::Corrupt(why) => write!(f, "pool metadata corrupt: {why}"),
            Error::Io(what, e) => write!(f, "{what}: {}", e.desc()),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(what: &str) -> impl FnOnce(nix::errno::Errno) -> Error + '_ {
    move |e| Error::Io(what.to_string(), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_negative_and_cover_every_error() {
        let mut seen = std::collections::HashSet::new();
        for (name, c) in code::ALL {
            assert!(c < 0, "{name}");
            assert!(seen.insert(c), "{name}: duplicate code {c}");
        }
        let errors = [
            Error::OutOfMemory,
            Error::BadSize,
            Error::NotABlock,
            Error::BadName(String::new()),
            Error::NotAPool(String::new()),
            Error::Corrupt(String::new()),
            Error::Io(String::new(), nix::errno::Errno::EIO),
        ];
        for e in errors {
            assert!(seen.contains(&e.code()), "{e:?} has no entry in code::ALL");
        }
    }
}
