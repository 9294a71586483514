//! The memory a pool lives in: a `MAP_SHARED` mapping of a named POSIX shm
//! object, of an anonymous memfd (shared with children forked later), or of
//! memory someone else mapped (the Netmcore shim: Netmcore creates and maps
//! the object, we only get its address and length).

use crate::error::{io, Error, Result};
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};
use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr::NonNull;
use std::sync::Arc;

/// The system page size (`sysconf(_SC_PAGESIZE)`), never assumed.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// A mapped region: the pool's view of its memory.
///
/// Memory this process mapped is unmapped only when both the `Mapping` and
/// every [`KeepAlive`] taken from it are dropped: the OCaml stubs hand a
/// `KeepAlive` to the bigarrays over the pool, so that a block used after
/// `close` still reads and writes the old pool's pages instead of whatever
/// the kernel maps next at that address.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// `None` for memory mapped by someone else (never unmapped by us).
    region: Option<Arc<Region>>,
}

/// The `mmap`ed range itself; `munmap`ed when the last holder lets go.
#[derive(Debug)]
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

/// Keeps a [`Mapping`]'s memory mapped after the `Mapping` itself is gone.
#[derive(Debug, Clone)]
pub struct KeepAlive(#[allow(dead_code)] Arc<Region>); // held for its Drop only

// SAFETY: a Mapping is an address and a length: it reads or writes none of
// the memory itself, only hands out raw pointers (whose users synchronise,
// see `Pool`), and unmapping on drop works from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as for Send; `&Mapping` only gives the address and length.
unsafe impl Sync for Mapping {}
// SAFETY: a Region is only an address range; nothing reads through it, and
// its Drop (munmap) runs once, for the last Arc.
unsafe impl Send for Region {}
// SAFETY: as for Send: `&Region` gives access to nothing.
unsafe impl Sync for Region {}

/// Longest name component glibc's `shm_open` accepts (below `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 254;

/// Checks a POSIX shm name: a '/' then 1 to [`MAX_NAME_BYTES`] bytes, none
/// of them '/' or NUL. Any other byte is fine (names are bytes, not text).
/// glibc would also take names without the slash or with several, but
/// those alias other names ("//a" is "/a"), so they are refused here.
pub fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    let why = match b.split_first() {
        None => Some("empty"),
        Some((&c, _)) if c != b'/' => Some("does not start with '/'"),
        Some((_, [])) => Some("nothing after '/'"),
        Some((_, rest)) if rest.len() > MAX_NAME_BYTES => Some("longer than 254 bytes after '/'"),
        Some((_, rest)) if rest.contains(&b'/') => Some("a '/' after the first byte"),
        Some((_, rest)) if rest.contains(&0) => Some("contains a NUL byte"),
        Some(_) => None,
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::BadName(format!("{why}: \"{}\"", b.escape_ascii()))),
    }
}

fn map_fd(fd: &OwnedFd, len: usize) -> Result<Mapping> {
    let nz = NonZeroUsize::new(len).ok_or(Error::BadSize)?;
    // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address),
    // so it cannot alias any Rust object.
    let p = unsafe {
        mmap(
            None,
            nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .map_err(io("mmap"))?;
    let ptr = p.cast();
    Ok(Mapping {
        ptr,
        len,
        region: Some(Arc::new(Region { ptr, len })),
    })
}

/// Sets the object's length and reserves the backing pages of its first
/// `reserve` bytes now: ENOSPC here instead of a SIGBUS at first touch, and
/// far cheaper than writing a byte per page.
fn size_and_reserve(fd: &OwnedFd, len: usize, reserve: usize) -> Result<()> {
    nix::unistd::ftruncate(fd, len as libc::off_t).map_err(io("ftruncate"))?;
    if reserve > 0 {
        fallocate_whole(fd.as_fd(), reserve.min(len) as libc::off_t)
            .map_err(io("posix_fallocate"))?;
    }
    Ok(())
}

/// `posix_fallocate(fd, 0, len)` with the catchable signals blocked. Before
/// Linux 6.10, tmpfs abandons a fallocate with `EINTR` as soon as any
/// signal is pending (a SIGCHLD, a timer tick), and under a periodic timer
/// shorter than the call even a retry loop never ends; a blocked signal is
/// not pending for it, and waits until the mask is restored. A fatal
/// signal still ends the call.
fn fallocate_whole(fd: std::os::fd::BorrowedFd, len: libc::off_t) -> nix::Result<()> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))?;
    let r = loop {
        match nix::fcntl::posix_fallocate(fd, 0, len) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r,
        }
    };
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    r
}

impl Mapping {
    /// Creates the shm object `name` (`O_EXCL`, mode 0600) of `len` bytes,
    /// its first `reserve` bytes backed now (`len` to prefault it all).
    /// On failure nothing is left behind.
    pub fn create_named(name: &OsStr, len: usize, reserve: usize) -> Result<Mapping> {
        check_name(name)?;
        let fd = shm_open(
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(io("shm_open"))?;
        let r = size_and_reserve(&fd, len, reserve).and_then(|()| map_fd(&fd, len));
        if r.is_err() {
            let _ = shm_unlink(name);
        }
        r
    }

    /// Creates an anonymous shared object (memfd): visible to this process
    /// and to children forked after this call, to nobody else. `reserve`
    /// as for [`Mapping::create_named`].
    pub fn create_anonymous(len: usize, reserve: usize) -> Result<Mapping> {
        let fd = nix::sys::memfd::memfd_create(c"shmpool", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(io("memfd_create"))?;
        size_and_reserve(&fd, len, reserve)?;
        map_fd(&fd, len)
    }

    /// Maps the existing shm object `name` whole.
    pub fn open_named(name: &OsStr) -> Result<Mapping> {
        check_name(name)?;
        let fd = shm_open(name, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(io("shm_open"))?;
        let st = fstat(&fd).map_err(io("fstat"))?;
        if st.st_size <= 0 {
            return Err(Error::NotAPool(format!(
                "{} is empty",
                name.as_bytes().escape_ascii()
            )));
        }
        map_fd(&fd, st.st_size as usize)
    }

    /// Views memory mapped by someone else; never unmapped by us.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a readable and writable shared mapping that
    /// outlives the returned value (and every pool built on it).
    pub unsafe fn borrowed(ptr: *mut u8, len: usize) -> Result<Mapping> {
        let ptr = NonNull::new(ptr).ok_or(Error::NotAPool("null address".into()))?;
        Ok(Mapping {
            ptr,
            len,
            region: None,
        })
    }

    /// A handle that keeps this memory mapped after `self` is dropped;
    /// `None` for memory someone else mapped (see [`Mapping::borrowed`]).
    pub fn keep_alive(&self) -> Option<KeepAlive> {
        self.region.clone().map(KeepAlive)
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range in map_fd, and this is the
        // last holder: the Mapping and every KeepAlive (whose owners, the
        // OCaml bigarrays, are all gone) have let go of it.
        unsafe {
            let _ = munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Removes the name `name`; existing mappings stay valid.
pub fn unlink(name: impl AsRef<OsStr>) -> Result<()> {
    let name = name.as_ref();
    check_name(name)?;
    shm_unlink(name).map_err(io("shm_unlink"))
}

/// Reserves the backing store of the first `len` bytes (all of it for
/// `None`) of the existing shm object `name` (`posix_fallocate`), so that
/// touching those pages later cannot SIGBUS.
pub fn prefault_named(name: impl AsRef<OsStr>, len: Option<usize>) -> Result<()> {
    let name = name.as_ref();
    check_name(name)?;
    let fd =
        shm_open(name, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()).map_err(io("shm_open"))?;
    let st = fstat(&fd).map_err(io("fstat"))?;
    let len = len.map_or(st.st_size, |l| (l as libc::off_t).min(st.st_size));
    fallocate_whole(fd.as_fd(), len).map_err(io("posix_fallocate"))
}
