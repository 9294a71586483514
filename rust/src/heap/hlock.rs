//! The heap's lock: the core's robust, process-shared mutex (`lock.rs`),
//! one per heap in its descriptor, held across calls (OCaml's `modify`
//! locks in one stub, runs OCaml code, unlocks in another), so it is used
//! here through explicit acquire/release rather than a scoped guard. This
//! file is the only place the heap touches `lock.rs`.

use crate::error::Result;
use crate::lock::{Acquired, MutexStorage, RobustMutex};

/// Initialises the mutex in `m`.
///
/// # Safety
/// Nobody else may use `m` until the heap's magic is published.
pub(crate) unsafe fn init(m: &MutexStorage) -> Result<()> {
    // SAFETY: `m` lives in the heap's first block, mapped for as long as
    // the borrow.
    unsafe { RobustMutex::at(m) }.init()
}

/// Locks `m`; `Acquired::OwnerDied` when the holder died with it.
pub(crate) fn acquire(m: &MutexStorage) -> Result<Acquired> {
    // SAFETY: as in `init`.
    unsafe { RobustMutex::at(m) }.lock()
}

/// Locks `m` if it is free, without waiting: `None` when it is held.
pub(crate) fn try_acquire(m: &MutexStorage) -> Option<Result<Acquired>> {
    // SAFETY: MutexStorage is #[repr(C)] with the pthread mutex bytes as
    // its only field, at offset 0, initialised by `init` before the heap
    // was published; `m` is mapped for the borrow.
    let r = unsafe {
        libc::pthread_mutex_trylock(m as *const MutexStorage as *mut libc::pthread_mutex_t)
    };
    match r {
        0 => Some(Ok(Acquired::Clean)),
        libc::EOWNERDEAD => Some(Ok(Acquired::OwnerDied)),
        libc::EBUSY => None,
        // Anything else: let the blocking path report it.
        _ => Some(acquire(m)),
    }
}

/// Declares the heap repaired after `OwnerDied` (holder only).
pub(crate) fn mark_consistent(m: &MutexStorage) {
    // SAFETY: as in `init`.
    unsafe { RobustMutex::at(m) }.mark_consistent()
}

/// Unlocks `m` (holder only).
pub(crate) fn release(m: &MutexStorage) {
    // SAFETY: as in `init`.
    unsafe { RobustMutex::at(m) }.unlock()
}

thread_local! {
    /// This thread's id and the fork generation it was read in (a child
    /// of `fork` inherits the cell but runs as another thread).
    static TID: std::cell::Cell<(u64, i64)> = const { std::cell::Cell::new((u64::MAX, 0)) };
}

/// The calling thread's kernel id (what "held by this thread" compares),
/// read once per thread and fork generation: every heap operation asks.
#[inline]
pub(crate) fn tid() -> i64 {
    let gen = crate::owner::fork_generation();
    TID.try_with(|c| {
        let (g, t) = c.get();
        if g == gen {
            t
        } else {
            let t = gettid();
            c.set((gen, t));
            t
        }
    })
    .unwrap_or_else(|_| gettid())
}

fn gettid() -> i64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i64 }
}
