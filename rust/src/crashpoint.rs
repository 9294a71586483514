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

/// Declares the crash points once: the enum, [`ALL`] and
/// [`CrashPoint::name`] all come from this one list, and the OCaml test
/// library reads names and numbers from it (`shmpool_ml_crash_points`;
/// `tests/ocaml/test_crash_points.ml` fails if its own list differs).
macro_rules! crash_points {
    (
        locked { $($(#[doc = $doc:literal])* $point:ident = $n:literal,)* }
        unlocked { $($(#[doc = $udoc:literal])* $upoint:ident = $un:literal,)* }
        heap { $($(#[doc = $hdoc:literal])* $hpoint:ident = $hn:literal,)* }
    ) => {
        /// The steps of alloc and free, then of the shared heaps'
        /// operations, in the order they happen.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum CrashPoint {
            $($(#[doc = $doc])* $point = $n,)*
            $($(#[doc = $udoc])* $upoint = $un,)*
            $($(#[doc = $hdoc])* $hpoint = $hn,)*
        }

        /// Every crash point reached with the pool lock held, in order, for
        /// the staged-death tests that visit each one (Rust and OCaml).
        pub const ALL: [CrashPoint; [$($n),*].len()] = [$(CrashPoint::$point),*];

        /// The points reached without the pool lock (the race tests pause a
        /// thread there through [`on_hit`]).
        pub const UNLOCKED: [CrashPoint; [$($un),*].len()] = [$(CrashPoint::$upoint),*];

        /// The points of the shared heaps (`crate::heap`), in the order
        /// of the operations' steps: every one but `HeapDestroyUnlocked`
        /// is reached holding the heap's lock (never the pool's).
        pub const HEAP: [CrashPoint; [$($hn),*].len()] = [$(CrashPoint::$hpoint),*];

        impl CrashPoint {
            /// The point's name, as written here (`"AllocUnlinked"`).
            pub fn name(self) -> &'static str {
                match self {
                    $(CrashPoint::$point => stringify!($point),)*
                    $(CrashPoint::$upoint => stringify!($upoint),)*
                    $(CrashPoint::$hpoint => stringify!($hpoint),)*
                }
            }
        }
    };
}

crash_points! {
  locked {
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
    /// Large refill: the block and the spare run after it are committed
    /// (`Arena::alloc_spare`), the remainder not yet filed.
    AllocSpareCached = 34,
    /// Free of a block that may hold ghost words (`large_cache.rs`, L3):
    /// its first ghost is cleared, the others and the head not yet.
    LargeScrubbing = 38,
    /// Large give-back (`large_cache.rs`): one of the owner's runs is
    /// freed to the free runs (committed), its slot's counters not yet
    /// lowered.
    LargeGiveBack = 39,
    /// Take-back (`cache.rs`): every cached block of the slots taken is
    /// freed, their records (counters, lists, `taken`) not yet cleared.
    TakeBackFreed = 40,
  }
  unlocked {
    /// Free: the block's `ALLOC` word is read, nothing written, no lock
    /// held (every later step requires exactly that word; see `pool.rs`).
    FreeLoaded = 9,
    /// Cache push: the owner holds its slot lock, the block is not yet
    /// flipped to CACHED (a process frozen here holds its slot lock).
    CachePushLocked = 10,
    /// Remote free: the freer holds the owner's inbox lock, the block is
    /// not yet flipped to CACHED.
    InboxPushLocked = 11,
    /// Remote free: the block is flipped to CACHED (committed), not yet
    /// linked into the inbox's list nor counted.
    InboxPushCommitted = 12,
    /// Drain: the owner holds its slot lock and its inbox lock, and has
    /// spliced the inbox's list onto its chain and counted it in its slot,
    /// the inbox not yet emptied.
    InboxDrainMoving = 13,
    /// Remote free: the block is committed and linked at the inbox's tail,
    /// the inbox's counters not yet updated.
    InboxPushLinked = 14,
    /// Alloc miss: the owner holds its slot lock and has taken a block off
    /// its chain (chain head and length updated), not yet into its stacks.
    ChainTaking = 15,
    /// Large split (`large_cache.rs`): the tail's CACHED word is written
    /// inside the cached run, the head not yet committed.
    LargeSplitTailWritten = 35,
    /// Large split: the head is committed live, `extra` and the counters
    /// not yet updated.
    LargeSplitCommitted = 36,
    /// Large merge: the first run's head covers both runs (committed), the
    /// absorbed head word not yet cleared, counters not yet updated. (Also
    /// reached with the pool lock held: a give-back merges the pending runs
    /// first, `large_cache.rs`.)
    LargeMergeCommitted = 37,
  }
  heap {
    /// Create: descriptor and first chunk formatted, magic stored, lock
    /// held, root not yet set; the block is still owned by the creator.
    HeapCreateFormatted = 16,
    /// Create: root set, heap lock released, block not yet disowned.
    HeapCreateBeforeDisown = 17,
    /// Allocation: a larger free block unlinked, its remainder not yet filed.
    HeapAllocSplit = 18,
    /// Copy-in: the span is allocated and half of its blocks written.
    HeapCopyHalfDone = 19,
    /// `modify`: a new root stored (committed), lock still held.
    HeapRootStored = 20,
    /// GC: bitmaps cleared and the root's first blocks marked.
    HeapMidMark = 21,
    /// GC: the free lists emptied and partly rebuilt.
    HeapMidSweep = 22,
    /// Grow: the new chunk is owned by nobody, not yet in the table.
    HeapChunkDisowned = 23,
    /// Grow: the chunk is in the table (committed), its area not yet free.
    HeapChunkAppended = 24,
    /// Sweep: the last table entry copied over the removed one, the count
    /// not yet lowered (one chunk listed twice).
    HeapChunkEntryMoved = 25,
    /// Sweep: an empty chunk's entry removed, its pool block not yet freed.
    HeapChunkRemoved = 26,
    /// A pin is written (`with_value` between `find` and `process`).
    HeapPinWritten = 27,
    /// A pin is unlinked (`with_value` after `process`), lock still held.
    HeapPinRemoved = 28,
    /// Recovery: chunk table sanitised and dead pins dropped, no GC yet.
    HeapMidRecovery = 29,
    /// Destroy: state DESTROYING stored (the commit), nothing freed.
    HeapDestroyCommitted = 30,
    /// Destroy: an extension chunk dropped from the table, not yet freed.
    HeapDestroyChunkForgotten = 31,
    /// Destroy: every extension chunk freed, the first block's pool word
    /// recorded, lock still held.
    HeapDestroyChunksFreed = 32,
    /// Destroy: heap lock released, the first block not yet freed (the
    /// only heap point reached without the heap lock).
    HeapDestroyUnlocked = 33,
  }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_distinct_and_nonzero_and_names_unique() {
        // 0 means "disarmed" to `arm` and to the OCaml stub.
        let every: Vec<CrashPoint> = ALL
            .iter()
            .chain(UNLOCKED.iter())
            .chain(HEAP.iter())
            .copied()
            .collect();
        for (i, a) in every.iter().enumerate() {
            assert_ne!(*a as u32, 0, "{a:?}");
            for b in &every[i + 1..] {
                assert_ne!(*a as u32, *b as u32, "{a:?} and {b:?}");
                assert_ne!(a.name(), b.name());
            }
        }
        assert_eq!(CrashPoint::AllocUnlinked.name(), "AllocUnlinked");
    }
}
