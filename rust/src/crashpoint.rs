//! Test-only crash points between the writes of an operation.
//!
//! With the `crash-points` feature, a test arms one point; the process that
//! reaches it stops itself with `SIGSTOP`, so the parent can `SIGKILL` it at
//! exactly that step while it holds the pool lock. Without the feature,
//! [`hit`] is an empty inline function and costs nothing.
//!
//! A test may also install a hook ([`on_hit`]) that every thread reaching
//! any point calls: that is how the race tests pause one thread between
//! two steps of an operation while another thread or process acts.

/// The steps of alloc and free, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CrashPoint {
    /// Lock held, nothing written yet.
    Locked = 1,
    /// Alloc: the chosen run is unlinked from its list or tree, not committed.
    AllocUnlinked = 2,
    /// Alloc: the `ALLOC` word is written (committed), remainder not yet filed.
    AllocCommitted = 3,
    /// Alloc: the remainder is filed, counters not yet updated.
    AllocRemainderFiled = 4,
    /// Free: the `ALLOC` word is overwritten (committed), nothing coalesced.
    FreeCommitted = 5,
    /// Free: neighbours unlinked, merged run not yet filed.
    FreeNeighboursUnlinked = 6,
    /// Free: merged run filed, counters not yet updated.
    FreeFiled = 7,
    /// Operation complete, lock still held.
    BeforeUnlock = 8,
    /// Free: the block's `ALLOC` word is read, nothing written, no lock
    /// held (every later step requires exactly that word; see `pool.rs`).
    FreeLoaded = 9,
    /// Cache push: the owner holds its slot lock, the block is not yet
    /// flipped to CACHED (a process frozen here holds its slot lock).
    CachePushLocked = 10,
}

/// Every crash point of the locked operations, for tests that visit each
/// one (the later points are reached without the pool lock).
pub const ALL: [CrashPoint; 8] = [
    CrashPoint::Locked,
    CrashPoint::AllocUnlinked,
    CrashPoint::AllocCommitted,
    CrashPoint::AllocRemainderFiled,
    CrashPoint::FreeCommitted,
    CrashPoint::FreeNeighboursUnlinked,
    CrashPoint::FreeFiled,
    CrashPoint::BeforeUnlock,
];

#[cfg(feature = "crash-points")]
mod imp {
    use super::CrashPoint;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    static ARMED: AtomicU32 = AtomicU32::new(0);
    /// The hook, as a `fn(CrashPoint)` cast to usize (0 = none).
    static HOOK: AtomicUsize = AtomicUsize::new(0);

    /// Installs `f`, called by every thread of this process at every point
    /// it reaches (before the `SIGSTOP` of an armed point).
    pub fn on_hit(f: Option<fn(CrashPoint)>) {
        HOOK.store(f.map_or(0, |f| f as usize), Ordering::SeqCst);
    }

    /// Arms `p` in this process (after a fork: in the child only).
    pub fn arm(p: Option<CrashPoint>) {
        ARMED.store(p.map_or(0, |p| p as u32), Ordering::SeqCst);
    }

    #[inline]
    pub fn hit(p: CrashPoint) {
        let h = HOOK.load(Ordering::Relaxed);
        if h != 0 {
            // SAFETY: HOOK only ever holds 0 or a `fn(CrashPoint)` stored
            // by `on_hit`, and function pointers round-trip through usize.
            let f: fn(CrashPoint) = unsafe { std::mem::transmute(h) };
            f(p);
        }
        if ARMED.load(Ordering::Relaxed) == p as u32 {
            // SAFETY: raise() only sends a signal to the calling thread.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
        }
    }
}

#[cfg(not(feature = "crash-points"))]
mod imp {
    use super::CrashPoint;

    /// Without the `crash-points` feature there is nothing to arm.
    pub fn arm(_p: Option<CrashPoint>) {}

    /// Without the `crash-points` feature no hook is ever called.
    pub fn on_hit(_f: Option<fn(CrashPoint)>) {}

    #[inline(always)]
    pub fn hit(_p: CrashPoint) {}
}

pub use imp::{arm, hit, on_hit};
