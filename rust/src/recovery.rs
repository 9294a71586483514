//! Rebuilding every derived structure from the truth.
//!
//! Called when the pool lock is acquired with `EOWNERDEAD` (its holder died
//! at some instruction of an operation), when an operation found the
//! metadata inconsistent, and after a panic under the lock. Because each
//! operation commits with a single `ALLOC`-word write (see `desc.rs`), the
//! `ALLOC` words are always the truth: a block whose word was stored is
//! live, any other page is free. Recovery therefore
//!
//! 1. walks the descriptors once, taking each `ALLOC` word in address order
//!    as a live block and clearing every other word a half-finished
//!    operation may have left (stale `FREE`/`AUX` words, a remainder run
//!    not yet filed, ...);
//! 2. files each maximal gap between live blocks as one free run (so runs
//!    that an interrupted free had not yet merged are merged now);
//! 3. recounts free pages, live blocks and per-owner usage.
//!
//! Inside a block it leaves `INTERIOR` words and `ALLOC` words of the
//! block's owner alone (ghosts, or the owner's own splits and merges under
//! way without the pool lock: L2, L4 of `large_cache.rs`), and clears
//! anything else by compare-and-swap from the value read. Per-owner pages
//! are exact (an owner's splits and merges never change which pages it
//! holds); per-owner block counts are exact only for owners that were not
//! splitting or merging meanwhile, so the pool recounts them under their
//! slot locks afterwards (`Pool::after_rebuild`).
//!
//! It only ever writes derived words and never creates an `ALLOC` word, so a
//! process that dies *during* recovery leaves the truth intact and the next
//! locker simply runs it again. It is O(pages): about 1 ms per GiB of pool.

use crate::arena::{Arena, OwnerUsage, MAX_OWNERS, SMALL_MAX};
use crate::desc::*;

/// What one rebuild found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub live_blocks: u64,
    pub free_pages: u64,
    /// `ALLOC` words that could not be true (zero length, past the end, or
    /// inside another block) and were dropped.
    pub bad_alloc_words: u64,
}

impl Arena<'_> {
    /// Rebuilds lists, treap and counters from the `ALLOC` words.
    pub fn rebuild(&mut self) -> RebuildReport {
        self.rebuilt = true;
        let n = self.st.npages;
        self.st.tree_root = NIL;
        self.st.tree_max = 0;
        self.st.small_bitmap = [0; 2];
        self.st.small_head = [NIL; SMALL_MAX as usize + 1];
        self.st.usage = [OwnerUsage::default(); MAX_OWNERS];
        let mut rep = RebuildReport::default();
        let mut gap_start: Option<u32> = None;
        let mut p = 0u32;
        while p < n {
            let w = self.w(p);
            // A head; or, right after a block (never in a gap: an owner's
            // pages start with a head), a SKIP ghost that a length read
            // before its owner merged the run led us to (L3 of
            // `large_cache.rs`): its pages are its owner's, no block.
            let (len, owner, block) = if tag(w) == TAG_ALLOC {
                (alloc_len(w), alloc_owner(w), true)
            } else if is_skip(w) && gap_start.is_none() && p > 0 {
                (skip_len(w), skip_owner(w), false)
            } else {
                (0, 0, false)
            };
            if len > 0 && p as u64 + len as u64 <= n as u64 {
                if let Some(g) = gap_start.take() {
                    self.file_run(g, p - g);
                    rep.free_pages += (p - g) as u64;
                }
                let marked = !block || w & GHOSTS != 0;
                for q in p + 1..p + len {
                    let x = self.w(q);
                    if x == INTERIOR {
                        continue;
                    }
                    let alloc = tag(x) == TAG_ALLOC && alloc_owner(x) == owner;
                    let ghost = is_skip(x) && skip_owner(x) == owner || alloc && is_cached(x);
                    if ghost && marked || alloc && self.w(p) != w {
                        // A ghost (L2 of `large_cache.rs`) in a block
                        // marked for them, or a head the owner made after
                        // we read `w` (it has split and taken this run
                        // since: its head changed, read after `x`): never
                        // ours to clear (L4). Anything else inside a block
                        // whose head stayed `w` is damage.
                        continue;
                    }
                    if tag(x) == TAG_ALLOC {
                        rep.bad_alloc_words += 1;
                    }
                    let _ = self.swap_word(q, x, INTERIOR);
                }
                let u = &mut self.st.usage[owner as usize % MAX_OWNERS];
                u.pages += len as u64;
                if block {
                    rep.live_blocks += 1;
                    u.blocks += 1;
                }
                p += len;
            } else {
                if tag(w) == TAG_ALLOC {
                    rep.bad_alloc_words += 1;
                }
                self.set(p, INTERIOR);
                gap_start.get_or_insert(p);
                p += 1;
            }
        }
        if let Some(g) = gap_start {
            self.file_run(g, n - g);
            rep.free_pages += (n - g) as u64;
        }
        self.st.free_pages = rep.free_pages;
        self.st.live_blocks = rep.live_blocks;
        rep
    }
}
