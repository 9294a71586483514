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
    /// The memory is not a pool of this layout (wrong magic, version, page
    /// size, or a header whose geometry does not fit the mapping).
    NotAPool(String),
    /// The shared metadata is inconsistent in a way recovery cannot repair.
    Corrupt(String),
    /// A system call failed.
    Io(String, nix::errno::Errno),
}

impl Error {
    /// Stable negative codes used across the FFI.
    pub fn code(&self) -> isize {
        match self {
            Error::OutOfMemory => -1,
            Error::BadSize => -2,
            Error::NotABlock => -3,
            Error::NotAPool(_) => -4,
            Error::Corrupt(_) => -5,
            Error::Io(..) => -6,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfMemory => write!(f, "out of pool memory"),
            Error::BadSize => write!(f, "bad size"),
            Error::NotABlock => write!(f, "memory block not found"),
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
