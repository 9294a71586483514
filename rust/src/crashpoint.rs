//! Test-only crash points between the writes of an operation.
//!
//! With the `crash-points` feature, a test arms one point; the process that
//! reaches it stops itself with `SIGSTOP`, so the parent can `SIGKILL` it at
//! exactly that step while it holds the pool lock. Without the feature,
//! [`hit`] is an empty inline function and costs nothing.

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
}

/// Every crash point, for tests that visit each one.
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
    use std::sync::atomic::{AtomicU32, Ordering};

    static ARMED: AtomicU32 = AtomicU32::new(0);

    /// Arms `p` in this process (after a fork: in the child only).
    pub fn arm(p: Option<CrashPoint>) {
        ARMED.store(p.map_or(0, |p| p as u32), Ordering::SeqCst);
    }

    #[inline]
    pub fn hit(p: CrashPoint) {
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

    #[inline(always)]
    pub fn hit(_p: CrashPoint) {}
}

pub use imp::{arm, hit};
