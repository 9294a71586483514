//! The heap's lock: the core's robust, process-shared mutex (`lock.rs`),
//! one per heap in its descriptor. It is held across calls (OCaml's
//! `modify` locks in one stub, runs OCaml code, unlocks in another), which
//! a scoped `LockGuard` cannot express: the guard is forgotten once the
//! lock is taken, and `release` unlocks the mutex directly. The heap's own
//! bookkeeping (`Heap::holder`, checked by every operation) stands in for
//! the guard. This file is the only place the heap touches `lock.rs`.

use crate::error::Result;
use crate::lock::{Acquired, MutexStorage, RobustMutex};

/// The pthread mutex inside `m`.
fn raw(m: &MutexStorage) -> *mut libc::pthread_mutex_t {
    m.bytes.get().cast()
}

/// Initialises the mutex in `m`.
///
/// # Safety
/// Nobody else may use `m` until the heap's magic is published.
pub(crate) unsafe fn init(m: &MutexStorage) -> Result<()> {
    // SAFETY: contract above.
    unsafe { RobustMutex::at(m).init() }
}

/// Locks `m`; `Acquired::OwnerDied` when the holder died with it. The
/// caller holds the mutex until [`release`].
pub(crate) fn acquire(m: &MutexStorage) -> Result<Acquired> {
    let mutex = RobustMutex::at(m);
    let (guard, how) = mutex.lock()?;
    // Held until `release`, in another call.
    std::mem::forget(guard);
    Ok(how)
}

/// Locks `m` if it is free, without waiting: `None` when it is held.
pub(crate) fn try_acquire(m: &MutexStorage) -> Option<Result<Acquired>> {
    // SAFETY: `m` holds a mutex initialised by `init` before the heap was
    // published, mapped for the borrow.
    match unsafe { libc::pthread_mutex_trylock(raw(m)) } {
        0 => Some(Ok(Acquired::Clean)),
        libc::EOWNERDEAD => Some(Ok(Acquired::OwnerDied)),
        libc::EBUSY => None,
        // Anything else: let the blocking path report it.
        _ => Some(acquire(m)),
    }
}

/// Declares the heap repaired after `OwnerDied` (holder only).
pub(crate) fn mark_consistent(m: &MutexStorage) {
    RobustMutex::at(m).mark_consistent()
}

/// Unlocks `m` (holder only: the thread that acquired it).
pub(crate) fn release(m: &MutexStorage) {
    // SAFETY: as in `try_acquire`; the calling thread holds the mutex
    // (checked by the heap through `Heap::holder`).
    unsafe {
        libc::pthread_mutex_unlock(raw(m));
    }
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
