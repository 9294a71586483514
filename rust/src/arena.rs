//! The allocator: pure logic over the allocator state and the page
//! descriptors. It knows nothing of mappings, locks or processes, so it can be
//! tested on a plain `Vec`; the caller guarantees exclusive access (the pool
//! lock in a real pool).
//!
//! # Where free runs are filed
//!
//! - A run of 1..=`SMALL_MAX` pages is on the exact-size list of its length
//!   (doubly linked through its `FREE` head word). Bit `n` of `small_bitmap`
//!   is set exactly when list `n` is non-empty, so the smallest fitting class
//!   is found with two `trailing_zeros` and no scan.
//! - A longer run is a node of a treap ordered by `(length, page)` whose
//!   links live in the run's own descriptors (see `treap.rs`). Best fit is a
//!   lower-bound search: O(log n) expected, whatever the fragmentation.
//!
//! `free_pages`, `live_blocks`, per-owner usage and `tree_max` are counters
//! kept exact by every operation, so the arena's own figures cost O(1)
//! (`Pool::stats` adds the per-process caches, see `pool.rs`).
//!
//! # Commit points
//!
//! alloc: unlink the chosen run, then store the `ALLOC` word (the commit),
//! then file the remainder. free: overwrite the `ALLOC` word (the commit),
//! then coalesce and file. A crash anywhere leaves the `ALLOC` words telling
//! the truth and recovery (`recovery.rs`) rebuilds the rest.

use crate::crashpoint::{hit, CrashPoint};
use crate::desc::*;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

// The allocator state lives in the shared header, so its type is defined
// with the other on-shm types.
pub use crate::layout::{AllocState, OwnerUsage, MAX_OWNERS, SMALL_MAX};

/// Pool-wide figures, all exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStats {
    pub npages: u32,
    pub free_pages: u64,
    pub largest_free_run: u32,
    pub live_blocks: u64,
}

/// Exclusive view of one pool's allocator metadata.
///
/// The descriptors are atomics because one transition happens outside the
/// pool lock: a process flipping the CACHED flag of its own block (see
/// `pool.rs`). Every other descriptor write happens under the lock; the
/// commits of free and of that flip are compare-and-swaps on the same word,
/// so a block is never both freed and cached.
pub struct Arena<'a> {
    pub(crate) st: &'a mut AllocState,
    pub(crate) d: &'a [AtomicU64],
    /// Set by every `rebuild`, so that the pool reconciles the owners'
    /// block counts afterwards (see `Pool::after_rebuild`).
    pub(crate) rebuilt: bool,
}

impl<'a> Arena<'a> {
    /// Views `st` and `d` as an arena. `d` must hold `st.npages` words.
    pub fn new(st: &'a mut AllocState, d: &'a mut [u64]) -> Result<Self> {
        const _: () = assert!(std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>());
        // SAFETY: AtomicU64 has the same size, alignment (checked above) and
        // bit validity as u64, and the exclusive borrow rules out any other
        // access for 'a.
        let d: &'a [AtomicU64] = unsafe { &*(d as *mut [u64] as *const [AtomicU64]) };
        Self::over(st, d)
    }

    /// Views shared descriptors (the pool's, under its lock).
    pub(crate) fn over(st: &'a mut AllocState, d: &'a [AtomicU64]) -> Result<Self> {
        if d.len() != st.npages as usize || st.npages == 0 || st.npages > MAX_PAGES {
            return Err(Error::Corrupt(format!(
                "descriptor count {} does not match {} pages",
                d.len(),
                st.npages
            )));
        }
        Ok(Arena {
            st,
            d,
            rebuilt: false,
        })
    }

    /// Makes the whole pool one free run.
    pub fn format(&mut self) {
        for w in self.d {
            w.store(INTERIOR, Ordering::Relaxed);
        }
        self.format_zeroed();
    }

    /// [`Arena::format`] for descriptors known to be all `INTERIOR` (zero),
    /// as in a freshly created shared memory object: touches O(1) words, so
    /// creating a large pool does not fault in its whole descriptor array.
    pub fn format_zeroed(&mut self) {
        *self.st = AllocState::new(self.st.npages);
        let n = self.st.npages;
        self.file_run(0, n);
        self.st.free_pages = n as u64;
    }

    // ----- descriptor access: never panics; out of range reads as INTERIOR
    // and writes are dropped (check() reports what that would hide).

    #[inline]
    pub(crate) fn w(&self, p: u32) -> u64 {
        self.d
            .get(p as usize)
            // Acquire: a head's new word is seen with the words its owner
            // wrote before it (a split's tail, `large_cache.rs`); a plain
            // load on x86.
            .map_or(INTERIOR, |w| w.load(Ordering::Acquire))
    }

    /// Replaces `old` by `new` at page `p` if `p` still holds `old`.
    #[inline]
    pub(crate) fn swap_word(&self, p: u32, old: u64, new: u64) -> bool {
        self.d.get(p as usize).is_some_and(|x| {
            x.compare_exchange(old, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    #[inline]
    pub(crate) fn set(&mut self, p: u32, v: u64) {
        if let Some(x) = self.d.get(p as usize) {
            x.store(v, Ordering::Relaxed);
        }
    }

    /// Length of the free run whose `FREE` head is at `h` (invariant D1).
    #[inline]
    pub(crate) fn free_len(&self, h: u32) -> u32 {
        let next = self.w(h.wrapping_add(1));
        if h + 1 < self.st.npages && is_len_word(next) {
            aux_payload(next) as u32
        } else {
            1
        }
    }

    // ----- filing and unfiling free runs

    /// Writes the descriptors of the free run `[h, h+len)` and files it.
    /// The run's pages must all be `INTERIOR`.
    pub(crate) fn file_run(&mut self, h: u32, len: u32) {
        if len >= 2 {
            self.set(h + 1, len_word(len));
            self.set(h + len - 1, len_word(len));
        }
        if len <= SMALL_MAX {
            let next = self.st.small_head[len as usize];
            self.set(h, free_word(next, NIL));
            if next != NIL {
                let nw = self.w(next);
                self.set(next, free_word(free_next(nw), h));
            }
            self.st.small_head[len as usize] = h;
            self.st.small_bitmap[(len / 64) as usize] |= 1 << (len % 64);
        } else {
            self.set(h, free_word(NIL, NIL));
            self.set(h + 2, links_word(NIL, NIL));
            self.set(h + 3, up_word(NIL));
            self.treap_insert(h, len);
            if len > self.st.tree_max {
                self.st.tree_max = len;
            }
        }
    }

    /// Takes the free run `[h, h+len)` off its list or out of the treap and
    /// turns all its descriptors back to `INTERIOR`.
    pub(crate) fn unfile_run(&mut self, h: u32, len: u32) {
        if len <= SMALL_MAX {
            let w = self.w(h);
            let (next, prev) = (free_next(w), free_prev(w));
            if prev == NIL {
                self.st.small_head[len as usize] = next;
                if next == NIL {
                    self.st.small_bitmap[(len / 64) as usize] &= !(1 << (len % 64));
                }
            } else {
                let pw = self.w(prev);
                self.set(prev, free_word(next, free_prev(pw)));
            }
            if next != NIL {
                let nw = self.w(next);
                self.set(next, free_word(free_next(nw), prev));
            }
        } else {
            self.treap_remove(h);
            if len == self.st.tree_max {
                self.st.tree_max = self.treap_max_len();
            }
            self.set(h + 2, INTERIOR);
            self.set(h + 3, INTERIOR);
        }
        self.set(h, INTERIOR);
        if len >= 2 {
            self.set(h + 1, INTERIOR);
            self.set(h + len - 1, INTERIOR);
        }
    }

    /// Smallest length class `>= k` with a non-empty list.
    #[inline]
    fn small_class_from(&self, k: u32) -> Option<u32> {
        let mut i = (k / 64) as usize;
        let mut bits = self.st.small_bitmap[i] & (!0u64 << (k % 64));
        loop {
            if bits != 0 {
                return Some(i as u32 * 64 + bits.trailing_zeros());
            }
            i += 1;
            if i >= self.st.small_bitmap.len() {
                return None;
            }
            bits = self.st.small_bitmap[i];
        }
    }

    fn largest_small(&self) -> u32 {
        if self.st.small_bitmap[1] != 0 {
            127 - self.st.small_bitmap[1].leading_zeros()
        } else if self.st.small_bitmap[0] != 0 {
            63 - self.st.small_bitmap[0].leading_zeros()
        } else {
            0
        }
    }

    // ----- the operations

    /// Allocates a block of `pages` pages for `owner`; returns its first page.
    pub fn alloc(&mut self, pages: u32, owner: u16) -> Result<u32> {
        if pages == 0 {
            return Err(Error::BadSize);
        }
        if pages as u64 > self.st.free_pages {
            return Err(Error::OutOfMemory);
        }
        let (h, len) = self.pick(pages)?;
        self.unfile_run(h, len);
        hit(CrashPoint::AllocUnlinked);
        let epoch = self.st.alloc_epoch;
        self.st.alloc_epoch = epoch.wrapping_add(1);
        self.set(h, alloc_word_at(pages, owner, epoch)); // commit
        hit(CrashPoint::AllocCommitted);
        if len > pages {
            self.file_run(h + pages, len - pages);
        }
        hit(CrashPoint::AllocRemainderFiled);
        self.st.free_pages -= pages as u64;
        // Wrapping: it may be "negative" (L5 of `large_cache.rs`).
        self.st.live_blocks = self.st.live_blocks.wrapping_add(1);
        let u = &mut self.st.usage[owner as usize % MAX_OWNERS];
        u.pages += pages as u64;
        u.blocks = u.blocks.wrapping_add(1); // may be "negative" (L5)
        Ok(h)
    }

    /// The best-fitting free run of at least `pages` pages, checked.
    #[inline]
    fn pick(&self, pages: u32) -> Result<(u32, u32)> {
        let (h, len) = match (pages <= SMALL_MAX)
            .then(|| self.small_class_from(pages))
            .flatten()
        {
            Some(class) => (self.st.small_head[class as usize], class),
            None => {
                let h = self.treap_lower_bound(pages);
                if h == NIL {
                    return Err(Error::OutOfMemory);
                }
                (h, self.free_len(h))
            }
        };
        if tag(self.w(h)) != TAG_FREE
            || len < pages
            || h as u64 + len as u64 > self.st.npages as u64
            // D1: a run's last page repeats its length; a damaged length
            // word or list link shows here before we hand out its pages.
            || (len >= 2 && self.w(h + len - 1) != len_word(len))
        {
            return Err(Error::Corrupt(format!("free structures point at page {h}")));
        }
        Ok((h, len))
    }

    /// Allocates a block of `pages` pages for `owner` and, right after it,
    /// a cached run of `spare` pages for the owner's large cache (see
    /// `large_cache.rs`) if a free run holds both; returns the block's
    /// first page and the spare's length (0 if none fitted). Two commits:
    /// the block's `ALLOC` word, then the spare's `ALLOC|CACHED` word (a
    /// death between them leaves the spare's pages free, which recovery
    /// files). The caller holds the owner's slot lock and counts the spare.
    pub fn alloc_spare(&mut self, pages: u32, spare: u32, owner: u16) -> Result<(u32, u32)> {
        let want = pages.saturating_add(spare);
        if spare == 0 || want as u64 > self.st.free_pages || want > MAX_PAGES {
            return self.alloc(pages, owner).map(|h| (h, 0));
        }
        let (h, len) = match self.pick(want) {
            Ok(r) => r,
            Err(Error::OutOfMemory) => return self.alloc(pages, owner).map(|h| (h, 0)),
            Err(e) => return Err(e),
        };
        self.unfile_run(h, len);
        hit(CrashPoint::AllocUnlinked);
        let epoch = self.st.alloc_epoch;
        self.st.alloc_epoch = epoch.wrapping_add(1);
        self.set(h, alloc_word_at(pages, owner, epoch)); // commit
        hit(CrashPoint::AllocCommitted);
        self.set(h + pages, alloc_word_at(spare, owner, epoch) | CACHED); // the spare's
        hit(CrashPoint::AllocSpareCached);
        if len > want {
            self.file_run(h + want, len - want);
        }
        hit(CrashPoint::AllocRemainderFiled);
        self.st.free_pages -= want as u64;
        self.st.live_blocks = self.st.live_blocks.wrapping_add(2); // may be "negative" (L5)
        let u = &mut self.st.usage[owner as usize % MAX_OWNERS];
        u.pages += want as u64;
        u.blocks = u.blocks.wrapping_add(2);
        Ok((h, spare))
    }

    /// Frees the live block starting at page `p`; returns its length.
    /// A block sitting in its owner's cache is not live: `NotABlock`.
    pub fn free(&mut self, p: u32) -> Result<u32> {
        let w = self.w(p);
        self.free_exact(p, w)
    }

    /// Frees the live block at `p` only if its `ALLOC` word is still
    /// exactly `w` (read by the caller when its free began): a block freed
    /// and allocated again meanwhile has another generation, and is
    /// `NotABlock` to this free (see `desc.rs`).
    pub fn free_exact(&mut self, p: u32, w: u64) -> Result<u32> {
        if is_cached(w) {
            return Err(Error::NotABlock);
        }
        self.free_word(p, w)
    }

    /// Frees the block at `p` only if it sits in its owner's cache (taking
    /// cached blocks back when memory runs out).
    pub fn free_cached(&mut self, p: u32) -> Result<u32> {
        self.free_block(p, Some(true))
    }

    /// Frees the block at `p` whether live or cached (reclaiming the blocks
    /// of a dead owner, which cannot flip them any more).
    pub fn free_any(&mut self, p: u32) -> Result<u32> {
        self.free_block(p, None)
    }

    fn free_block(&mut self, p: u32, cached: Option<bool>) -> Result<u32> {
        let w = self.w(p);
        if cached.is_some_and(|c| c != is_cached(w)) {
            return Err(Error::NotABlock);
        }
        self.free_word(p, w)
    }

    /// Frees the block at `p` whose word the caller read as `w`.
    fn free_word(&mut self, p: u32, w: u64) -> Result<u32> {
        if p >= self.st.npages || tag(w) != TAG_ALLOC || self.w(p) != w {
            return Err(Error::NotABlock);
        }
        let (len, owner) = (alloc_len(w), alloc_owner(w));
        if len == 0 || p as u64 + len as u64 > self.st.npages as u64 {
            return Err(Error::Corrupt(format!(
                "block at page {p} has length {len}"
            )));
        }
        if w & GHOSTS != 0 {
            // Ghost words the owner's large cache left inside (L2, L3 of
            // `large_cache.rs`) go before the commit: once the head is gone,
            // a ghost would read as a head to recovery. No walker runs (we
            // hold the pool lock). Inside a cached block nobody else writes
            // (its owner is dead or its slot lock is ours), so every ghost
            // goes. A *live* block's owner, though, may free it into its
            // large cache and split it again while we clear (a losing double
            // free: a remote free, a heap's `free_word` decided before a
            // lock was released): our commit below then fails, and the words
            // inside are by then the owner's (a new cached run's head). A
            // live block holds no CACHED ghost (those exist only inside a
            // cached run, mid-operation or after its owner died, L2), so for
            // one only `SKIP` words are cleared: a `SKIP` is only ever a
            // ghost, and clearing one under the pool lock is harmless even
            // inside an owner's run (walkers need them only during a walk,
            // and every walk holds the pool lock; tests/review_large.rs).
            self.clear_ghosts(p, len, !is_cached(w));
        }
        // The commit. A compare-and-swap, because the block's owner may be
        // flipping its CACHED flag without the lock at this very moment.
        if !self.swap_word(p, w, INTERIOR) {
            return Err(Error::NotABlock);
        }
        hit(CrashPoint::FreeCommitted);
        let (mut start, mut total) = (p, len);
        if p > 0 {
            let lw = self.w(p - 1);
            let left_len = match tag(lw) {
                TAG_FREE => 1,
                TAG_AUX if is_len_word(lw) => aux_payload(lw) as u32,
                _ => 0,
            };
            if left_len > 0 {
                let lh = p
                    .checked_sub(left_len)
                    .filter(|&lh| tag(self.w(lh)) == TAG_FREE);
                let Some(lh) = lh else {
                    // Damaged derived words, found after the commit: the
                    // block *is* free now, so repair everything derived
                    // from the truth and report success (an error here
                    // would make the caller retry and hear "not a block").
                    self.rebuild();
                    return Ok(len);
                };
                self.unfile_run(lh, left_len);
                start = lh;
                total += left_len;
            }
        }
        let e = p + len;
        if e < self.st.npages && tag(self.w(e)) == TAG_FREE {
            let right_len = self.free_len(e);
            self.unfile_run(e, right_len);
            total += right_len;
        }
        hit(CrashPoint::FreeNeighboursUnlinked);
        self.file_run(start, total);
        hit(CrashPoint::FreeFiled);
        self.st.free_pages += len as u64;
        // An owner's blocks split from its large runs are counted in its
        // slot's `extra` until a taker folds it (L5 of `large_cache.rs`), so
        // frees of them by others (which fold nothing) may take this below
        // zero: wrapping, as `usage.blocks` (tests/review_large.rs).
        self.st.live_blocks = self.st.live_blocks.wrapping_sub(1);
        let u = &mut self.st.usage[owner as usize % MAX_OWNERS];
        u.pages = u.pages.saturating_sub(len as u64);
        u.blocks = u.blocks.wrapping_sub(1); // may be "negative": L5 of `large_cache.rs`
        Ok(len)
    }

    /// Clears the words inside the block `[p, p + len)` that are not
    /// `INTERIOR` (the large cache's ghosts), for a block whose interior no
    /// other process writes (being freed, or live and disowned), each by
    /// compare-and-swap from the word read; with `skips_only`, only the
    /// `SKIP` words (a live block, see `free_word`). O(len).
    pub(crate) fn clear_ghosts(&self, p: u32, len: u32, skips_only: bool) {
        let end = (p as u64 + len as u64).min(self.st.npages as u64) as u32;
        let mut first = true;
        for q in p.saturating_add(1)..end {
            let x = self.w(q);
            if x != INTERIOR && (!skips_only || is_skip(x)) {
                let _ = self.swap_word(q, x, INTERIOR);
                if first {
                    hit(CrashPoint::LargeScrubbing);
                    first = false;
                }
            }
        }
    }

    /// The `ALLOC` word of the live (not cached) block starting at `p`.
    #[inline]
    fn live_word(&self, p: u32) -> Result<u64> {
        let w = self.w(p);
        if p < self.st.npages && tag(w) == TAG_ALLOC && !is_cached(w) {
            Ok(w)
        } else {
            Err(Error::NotABlock)
        }
    }

    /// Length of the live block starting at page `p`.
    #[inline]
    pub fn size(&self, p: u32) -> Result<u32> {
        self.live_word(p).map(alloc_len)
    }

    /// Owner slot of the live block starting at page `p`.
    pub fn owner_of(&self, p: u32) -> Result<u16> {
        self.live_word(p).map(alloc_owner)
    }

    pub fn stats(&self) -> PageStats {
        PageStats {
            npages: self.st.npages,
            free_pages: self.st.free_pages,
            largest_free_run: self.st.tree_max.max(self.largest_small()),
            live_blocks: self.st.live_blocks,
        }
    }

    /// Live blocks in address order as `(page, length, owner)`.
    pub fn live_blocks(&self) -> Vec<(u32, u32, u16)> {
        self.held_blocks(false)
    }

    /// Blocks held in owners' caches, as `(page, length, owner)`.
    pub fn cached_blocks(&self) -> Vec<(u32, u32, u16)> {
        self.held_blocks(true)
    }

    fn held_blocks(&self, cached: bool) -> Vec<(u32, u32, u16)> {
        let mut out = Vec::new();
        self.walk(|p, w, len| {
            if tag(w) == TAG_ALLOC && is_cached(w) == cached {
                out.push((p, len, alloc_owner(w)));
            }
        });
        out
    }

    /// Free runs in address order as `(page, length)`.
    pub fn free_runs(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        self.walk(|p, w, len| {
            if tag(w) == TAG_FREE {
                out.push((p, len));
            }
        });
        out
    }

    /// Visits runs in address order, trusting the invariants (use `check`
    /// to verify them first). Stops at the first word that is no run head.
    fn walk(&self, mut f: impl FnMut(u32, u64, u32)) {
        let mut p = 0;
        while p < self.st.npages {
            let w = self.w(p);
            let len = match tag(w) {
                TAG_ALLOC => alloc_len(w),
                TAG_FREE => self.free_len(p),
                // A ghost (only ever landed on while its owner merges:
                // L3 of `large_cache.rs`): no run, stepped over.
                _ if is_skip(w) => skip_len(w),
                _ => 0,
            };
            if len == 0 {
                return;
            }
            if !is_skip(w) {
                f(p, w, len);
            }
            p = p.saturating_add(len);
        }
    }
}
