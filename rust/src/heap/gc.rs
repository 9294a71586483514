//! The heap's own collector: mark from the roots into side bitmaps, then
//! sweep every gap between marked blocks into the free lists.
//!
//! Headers stay black throughout (`value.rs` says why), so the marks live
//! in each chunk's bitmap: bit i set = the block whose header is area word
//! i is reachable.
//!
//! Roots: the root value, the pins of `with_value` (`pins.rs`), the
//! values allocated since the calling thread took the lock, and the blocks
//! of this heap that a copy in progress reads (`copy.rs`).
//!
//! Mark follows a word only if it is a pointer whose header word lies in
//! one of this heap's areas, is black, and whose block fits the area:
//! anything else (an immediate, an atom, a private value stored by
//! mistake, another heap's value) is ignored and never dereferenced. It
//! uses an explicit stack, so a long list cannot overflow the C stack.
//!
//! Sweep trusts only the headers of marked blocks (completely written
//! before anything could reach them), which is what makes it the recovery
//! procedure too. It writes only into gaps, never into a marked block, so
//! readers without the lock never see a live value change. An extension
//! chunk with no marked block goes back to the pool.
//!
//! Cost: O(live blocks + live fields) to mark, O(gaps) to rebuild the
//! lists, and the bitmap words between each chunk's first and last marked
//! block to sweep (bitmaps stay zero between GCs: invariant B, see
//! `collect_from`; a whole-bitmap clear only after an interrupted GC).

use super::chunks::{find_index_in, ChunkRange};
use super::value::*;
use super::{HResult, Heap};
use std::sync::atomic::Ordering::Relaxed;

impl Heap<'_> {
    /// Collects (lock held by the calling thread), giving every emptied
    /// extension chunk back to the pool (an explicit `gc`).
    pub(crate) fn collect(&self) -> HResult<()> {
        self.collect_with(&|_| {}, None)
    }

    /// Collects with the roots `extra` adds too (lock held): the blocks of
    /// this heap a copy in progress reads (`copy.rs`). `pending`: the
    /// words of the allocation that made this GC run, if one did (see
    /// `sweep`).
    pub(crate) fn collect_with(
        &self,
        extra: &dyn Fn(&mut Vec<u64>),
        pending: Option<u64>,
    ) -> HResult<()> {
        self.prune_dead_pins();
        let d = self.desc();
        let mut roots = std::mem::take(&mut self.local()?.gc_roots);
        roots.clear();
        roots.extend_from_slice(&[d.root.load(Relaxed), d.pin_head.load(Relaxed)]);
        roots.extend_from_slice(&self.local()?.added);
        extra(&mut roots);
        let r = self.collect_from(&roots, pending);
        if let Ok(l) = self.local() {
            l.gc_roots = roots;
        }
        r
    }

    /// Marks from `roots` and sweeps (lock held).
    ///
    /// Bitmaps are all zero between GCs (invariant B): the sweep zeroes
    /// every bitmap word it reads, and reads every word the mark may have
    /// set (it records, per chunk, the first and last bitmap word it set
    /// a bit in), so a GC costs O(live blocks + the bitmap span between
    /// the first and the last live block of each chunk) instead of the
    /// whole bitmaps twice (clear, then scan). `bitmaps_dirty` is 1 from
    /// the start of a mark to the end of its sweep: a GC interrupted by a
    /// death or an error leaves it set, and the next one clears every
    /// bitmap first. New chunks are formatted with a zero bitmap.
    pub(crate) fn collect_from(&self, roots: &[u64], pending: Option<u64>) -> HResult<()> {
        let ranges = self.ranges();
        let d = self.desc();
        if d.bitmaps_dirty.load(Relaxed) != 0 {
            for r in &ranges {
                // SAFETY: the bitmap lies inside the chunk (format_chunk);
                // lock held.
                unsafe {
                    std::ptr::write_bytes(
                        self.pool.addr(r.bitmap as usize),
                        0,
                        r.words.div_ceil(64) as usize * 8,
                    )
                };
            }
        }
        d.bitmaps_dirty.store(1, Relaxed);
        let mut spans = std::mem::take(&mut self.local()?.gc_spans);
        spans.clear();
        spans.resize(ranges.len(), (u64::MAX, 0));
        self.mark(&ranges, roots, &mut spans);
        let r = self.sweep(&ranges, &spans, pending);
        if let Ok(l) = self.local() {
            l.gc_spans = spans;
        }
        r
    }

    /// Marks `v` if it is an unmarked block of ours; returns whether it
    /// must be scanned.
    #[inline]
    fn mark_one(&self, ranges: &[ChunkRange], spans: &mut [(u64, u64)], v: u64) -> bool {
        if !is_block(v) {
            return false;
        }
        let hoff = v.wrapping_sub(self.base()).wrapping_sub(8);
        let Some(ci) = find_index_in(ranges, hoff) else {
            return false;
        };
        let r = &ranges[ci];
        // SAFETY: hoff is a word of one of our areas (find_in); lock held.
        let hd = unsafe { self.rd(hoff) };
        if !is_black(hd) || hoff + (wosize(hd) + 1) * 8 > r.end() {
            return false;
        }
        let i = (hoff - r.area) / 8;
        let word = r.bitmap + (i / 64) * 8;
        // SAFETY: i < r.words, so the bitmap word is inside the bitmap.
        let bits = unsafe { self.rd(word) };
        if bits & (1 << (i % 64)) != 0 {
            return false;
        }
        // SAFETY: as above.
        unsafe { self.wr(word, bits | 1 << (i % 64)) };
        let s = &mut spans[ci];
        s.0 = s.0.min(i / 64);
        s.1 = s.1.max(i / 64);
        tag(hd) < NO_SCAN_TAG
    }

    fn mark(&self, ranges: &[ChunkRange], roots: &[u64], spans: &mut [(u64, u64)]) {
        let mut stack = self
            .local()
            .map(|l| std::mem::take(&mut l.gc_stack))
            .unwrap_or_default();
        stack.clear();
        for &v in roots {
            if self.mark_one(ranges, spans, v) {
                stack.push(v);
            }
        }
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapMidMark);
        while let Some(v) = stack.pop() {
            let hoff = v - self.base() - 8;
            // SAFETY: v was marked, so its header and fields are inside
            // one of our areas (checked by mark_one); lock held.
            let n = wosize(unsafe { self.rd(hoff) });
            for k in 0..n {
                // SAFETY: as above, k < wosize.
                let f = unsafe { self.rd(hoff + 8 + 8 * k) };
                if self.mark_one(ranges, spans, f) {
                    stack.push(f);
                }
            }
        }
        if let Ok(l) = self.local() {
            l.gc_stack = stack;
        }
    }

    /// Rebuilds the free lists from the marks. An extension chunk with no
    /// marked block goes back to the pool, except, in a GC that an
    /// allocation of `pending` words ran, while the free space of the chunks
    /// kept so far is below what the heap will allocate before its next GC
    /// (max(live words, `MIN_GC_WORDS`)) plus `pending`, so that a heap whose live data fits in one chunk but whose
    /// allocation rate needs two does not give a chunk back at every GC and
    /// take it again a few allocations later (measured: 10 KB strings
    /// replaced in a 64 KB heap, a grow and a give-back every 15 `add`s,
    /// each a pool alloc, a bitmap clear on fresh pages, a disown and a
    /// pool free). An explicit `gc`, and recovery, pass `None`: every empty
    /// chunk goes back. So the heap holds at most that much free space
    /// beyond what its live data needs.
    fn sweep(
        &self,
        ranges: &[ChunkRange],
        spans: &[(u64, u64)],
        pending: Option<u64>,
    ) -> HResult<()> {
        let d = self.desc();
        let first = d.first_chunk.load(Relaxed);
        self.clear_free_lists();
        let mut live = 0u64;
        let mut empty = Vec::new();
        for (ri, r) in ranges.iter().enumerate() {
            if ri == 1 || ranges.len() == 1 {
                crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapMidSweep);
            }
            let (lo, hi) = spans[ri];
            if lo > hi && r.hdr != first {
                // No mark in this chunk: its bitmap is all zero (B).
                empty.push((r.hdr, r.area, r.words));
                continue;
            }
            let bitmap = self.pool.addr(r.bitmap as usize).cast::<u64>();
            let mut pos = 0u64; // first area word not yet accounted for
                                // Only lo..=hi can hold marks (B and the mark's spans); an
                                // unmarked chunk (the first) has lo > hi: no word to read.
            for k in lo..hi.saturating_add(1) {
                // SAFETY: k <= hi < ceil(r.words / 64): a word of this
                // chunk's bitmap (8-aligned); lock held. Read, then zeroed
                // for the next GC (B).
                let mut bits = unsafe {
                    let w = bitmap.add(k as usize);
                    let b = w.read();
                    if b != 0 {
                        w.write(0);
                    }
                    b
                };
                while bits != 0 {
                    let i = k * 64 + bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    if i < pos {
                        // A marked header inside a marked block: only a
                        // value built by hand (an interior pointer) can do
                        // this; the enclosing block covers it.
                        continue;
                    }
                    if i > pos {
                        self.push_free(r.area + pos * 8, i - pos);
                    }
                    // SAFETY: a marked header of our area.
                    let n = wosize(unsafe { self.rd(r.area + i * 8) }) + 1;
                    live += n;
                    pos = i + n;
                }
            }
            if pos < r.words {
                self.push_free(r.area + pos * 8, r.words - pos);
            }
        }
        // Every bitmap word that was set has been read and zeroed.
        d.bitmaps_dirty.store(0, Relaxed);
        let keep_free = pending.map_or(0, |p| live.max(super::MIN_GC_WORDS) + p);
        for (off, area, words) in empty {
            if d.free_words.load(Relaxed) < keep_free {
                self.push_free(area, words);
                continue;
            }
            let n = d.nchunks.load(Relaxed) as usize;
            if let Some(i) = (0..n).find(|&i| d.chunks[i].offset.load(Relaxed) == off) {
                self.remove_chunk(i)?;
            }
        }
        d.live_words.store(live, Relaxed);
        d.alloc_since_gc.store(0, Relaxed);
        d.gcs.fetch_add(1, Relaxed);
        Ok(())
    }
}
