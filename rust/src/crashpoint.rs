//! Test-only crash points between the writes of an operation.
//!
//! With the `crash-points` feature, a test arms one point; the process that
//! reaches it stops itself with `SIGSTOP`, so the parent can `SIGKILL` it at
//! exactly that step while it holds the pool lock. Without the feature,
//! [`hit`] is an empty inline function and costs nothing.

/// Declares the crash points once: the enum, [`ALL`] and
/// [`CrashPoint::name`] all come from this one list, and the OCaml test
/// library reads names and numbers from it (`shmpool_ml_crash_points`;
/// `tests/ocaml/test_crash_points.ml` fails if its own list differs).
macro_rules! crash_points {
    ($($(#[doc = $doc:literal])* $point:ident = $n:literal,)*) => {
        /// The steps of alloc and free, in the order they happen.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum CrashPoint {
            $($(#[doc = $doc])* $point = $n,)*
        }

        /// Every crash point, in order, for tests that visit each one.
        pub const ALL: [CrashPoint; [$($n),*].len()] = [$(CrashPoint::$point),*];

        impl CrashPoint {
            /// The point's name, as written here (`"AllocUnlinked"`).
            pub fn name(self) -> &'static str {
                match self {
                    $(CrashPoint::$point => stringify!($point),)*
                }
            }
        }
    };
}

crash_points! {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_distinct_and_nonzero_and_names_unique() {
        // 0 means "disarmed" to `arm` and to the OCaml stub.
        for (i, a) in ALL.iter().enumerate() {
            assert_ne!(*a as u32, 0, "{a:?}");
            for b in &ALL[i + 1..] {
                assert_ne!(*a as u32, *b as u32, "{a:?} and {b:?}");
                assert_ne!(a.name(), b.name());
            }
        }
        assert_eq!(CrashPoint::AllocUnlinked.name(), "AllocUnlinked");
    }
}
