//! Free space inside the areas: exact lists and a first-fit list.
//!
//! A free block is an OCaml-looking block: a black header of tag
//! `Abstract_tag` whose wosize is its length minus one, and, when it has a
//! field, the offset (from the pool base) of the next free block of its
//! list in field 0 (0 ends the list). A one-word gap is a header of wosize
//! 0 on no list (a "hole"). OCaml never sees free blocks: nothing reachable
//! points to them.
//!
//! Invariants (under the heap lock; verified by `check.rs`):
//! - A1: a block of n words (header included) with 2 <= n <= SMALL_WORDS is
//!   on list `free_heads[n]`, a longer one on `free_heads[0]`.
//! - A2: bit n of `free_mask` is set exactly when list n is non-empty.
//! - A3: `free_words` is the sum of the lengths of the listed blocks.
//!
//! All of it is derived: the sweep (`gc.rs`) rebuilds it from the mark
//! bitmap, and recovery runs a sweep, so no step here needs to be atomic
//! with respect to a crash.
//!
//! Allocation takes the exact list first, then carves from the *end* of
//! the first large block that fits (so a large block acts as a bump region
//! whose header stays in place), then splits the smallest larger exact
//! class.

use super::layout::SMALL_WORDS;
use super::value::*;
use super::Heap;
use std::sync::atomic::Ordering::Relaxed;

/// The list a free block of `words` words belongs on.
#[inline]
fn class_of(words: u64) -> usize {
    if words <= SMALL_WORDS as u64 {
        words as usize
    } else {
        0
    }
}

impl Heap<'_> {
    /// Makes the `words` words at byte offset `off` a free block (lock held;
    /// the words are inside an area and unreachable).
    pub(crate) fn push_free(&self, off: u64, words: u64) {
        debug_assert!(words >= 1);
        // SAFETY: the caller hands over `words` unreachable words of an
        // area of this heap, under the lock.
        unsafe {
            self.wr(off, make_header(words - 1, ABSTRACT_TAG));
            if words < 2 {
                return;
            }
            let d = self.desc();
            let c = class_of(words);
            self.wr(off + 8, d.free_heads[c].load(Relaxed));
            d.free_heads[c].store(off, Relaxed);
            d.free_mask.fetch_or(1 << c, Relaxed);
            d.free_words
                .store(d.free_words.load(Relaxed) + words, Relaxed);
        }
    }

    /// Pops the first block of exact list `c` (non-empty).
    fn pop(&self, c: usize) -> u64 {
        let d = self.desc();
        let off = d.free_heads[c].load(Relaxed);
        // SAFETY: list heads hold free blocks of our areas (A1), which have
        // a next field; lock held.
        let (next, words) = unsafe { (self.rd(off + 8), wosize(self.rd(off)) + 1) };
        d.free_heads[c].store(next, Relaxed);
        if next == 0 {
            d.free_mask.fetch_and(!(1 << c), Relaxed);
        }
        d.free_words
            .store(d.free_words.load(Relaxed).saturating_sub(words), Relaxed);
        off
    }

    /// Takes `words` contiguous free words; their byte offset, or `None`
    /// when no free block is large enough. The words still hold free-block
    /// garbage: the caller formats them.
    pub(crate) fn take(&self, words: u64) -> Option<u64> {
        let d = self.desc();
        let mask = d.free_mask.load(Relaxed);
        let c = class_of(words);
        if c != 0 && mask & (1 << c) != 0 {
            return Some(self.pop(c));
        }
        if mask & 1 != 0 {
            if let Some(off) = self.take_large(words) {
                return Some(off);
            }
        }
        if c != 0 {
            // The smallest larger exact class; the remainder (at least one
            // word) stays at the start of the block.
            let above = mask & u64::MAX.checked_shl(c as u32 + 1).unwrap_or(0);
            if above != 0 {
                let bc = above.trailing_zeros() as usize;
                let off = self.pop(bc);
                crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapAllocSplit);
                let rem = bc as u64 - words;
                self.push_free(off, rem);
                return Some(off + rem * 8);
            }
        }
        None
    }

    /// First fit on the large list, carving from the end of the block.
    fn take_large(&self, words: u64) -> Option<u64> {
        let d = self.desc();
        let mut prev: Option<u64> = None;
        let mut cur = d.free_heads[0].load(Relaxed);
        while cur != 0 {
            // SAFETY: blocks on the large list are free blocks of our
            // areas with a next field (A1); lock held.
            let (hd, next) = unsafe { (self.rd(cur), self.rd(cur + 8)) };
            let have = wosize(hd) + 1;
            if have >= words {
                let rem = have - words;
                if rem > SMALL_WORDS as u64 {
                    // Still large: only its header changes.
                    // SAFETY: as above.
                    unsafe { self.wr(cur, make_header(rem - 1, ABSTRACT_TAG)) };
                    d.free_words
                        .store(d.free_words.load(Relaxed) - words, Relaxed);
                } else {
                    match prev {
                        // SAFETY: as above.
                        Some(p) => unsafe { self.wr(p + 8, next) },
                        None => d.free_heads[0].store(next, Relaxed),
                    }
                    if d.free_heads[0].load(Relaxed) == 0 {
                        d.free_mask.fetch_and(!1, Relaxed);
                    }
                    d.free_words
                        .store(d.free_words.load(Relaxed) - have, Relaxed);
                    crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapAllocSplit);
                    if rem > 0 {
                        self.push_free(cur, rem);
                    }
                }
                return Some(cur + rem * 8);
            }
            prev = Some(cur);
            cur = next;
        }
        None
    }

    /// Empties every list (before a sweep refills them).
    pub(crate) fn clear_free_lists(&self) {
        let d = self.desc();
        for h in &d.free_heads {
            h.store(0, Relaxed);
        }
        d.free_mask.store(0, Relaxed);
        d.free_words.store(0, Relaxed);
    }
}
