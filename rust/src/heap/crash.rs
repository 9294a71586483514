//! Test-only death points between the writes of heap operations (feature
//! `crash-points`): a test arms one in a forked child, which SIGKILLs
//! itself when it gets there, holding the heap lock. Without the feature
//! `hit` is empty and costs nothing. Kept apart from `crate::crashpoint`
//! (the pool's points, whose list the OCaml tests mirror).

/// Where a heap operation can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum HeapPoint {
    /// Copy-in: the span is allocated and half of its blocks written.
    CopyHalfDone = 1,
    /// GC: bitmaps cleared and the root's first blocks marked.
    MidMark = 2,
    /// GC: the free lists emptied and partly rebuilt.
    MidSweep = 3,
    /// Grow: the new chunk is owned by nobody, not yet in the table.
    ChunkDisowned = 4,
    /// Sweep: an empty chunk's entry removed, its pool block not yet freed.
    ChunkRemoved = 5,
    /// A pin is written (`with_value` between `find` and `process`).
    PinWritten = 6,
}

/// Every point, for tests that visit each.
pub const ALL: [HeapPoint; 6] = [
    HeapPoint::CopyHalfDone,
    HeapPoint::MidMark,
    HeapPoint::MidSweep,
    HeapPoint::ChunkDisowned,
    HeapPoint::ChunkRemoved,
    HeapPoint::PinWritten,
];

#[cfg(feature = "crash-points")]
mod imp {
    use super::HeapPoint;
    use std::sync::atomic::{AtomicU32, Ordering};

    static ARMED: AtomicU32 = AtomicU32::new(0);

    /// Arms `p` in this process (after a fork: in the child only).
    pub fn arm(p: Option<HeapPoint>) {
        ARMED.store(p.map_or(0, |p| p as u32), Ordering::SeqCst);
    }

    #[inline]
    pub fn hit(p: HeapPoint) {
        if ARMED.load(Ordering::Relaxed) == p as u32 {
            // SAFETY: raise() only sends a signal to the calling process.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
    }
}

#[cfg(not(feature = "crash-points"))]
mod imp {
    use super::HeapPoint;

    /// Without the `crash-points` feature there is nothing to arm.
    pub fn arm(_p: Option<HeapPoint>) {}

    #[inline(always)]
    pub fn hit(_p: HeapPoint) {}
}

pub use imp::{arm, hit};
