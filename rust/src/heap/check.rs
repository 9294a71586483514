//! Every invariant of a heap, as a list of violations (tests and
//! debugging; O(heap)). It reads only, and marks in a private set rather
//! than in the bitmaps.

use super::chunks::find_in;
use super::layout::*;
use super::value::*;
use super::{HResult, Heap};
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;

impl Heap<'_> {
    /// Violated invariants (empty when the heap is sound). Takes the lock.
    pub fn check(&self) -> Vec<String> {
        match self.with_lock(|h| Ok(h.check_locked())) {
            Ok(v) => v,
            Err(e) => vec![format!("could not lock the heap: {e}")],
        }
    }

    /// The first pointer that leaves the heap for private memory, as
    /// `(block, field index, pointer)`, reached from the root, the pins and
    /// this lock's additions (lock held; O(live data), for `Debug`).
    /// `is_private(p)`: `p` is in a process's own OCaml heap, valid in
    /// that process only.
    pub fn first_escape(
        &self,
        is_private: &dyn Fn(u64) -> bool,
    ) -> HResult<Option<(u64, u64, u64)>> {
        let d = self.desc();
        let mut stack = vec![d.root.load(Relaxed), d.pin_head.load(Relaxed)];
        stack.extend_from_slice(&self.local()?.added);
        let ranges = self.ranges();
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            if !is_block(x) {
                continue;
            }
            let hoff = x.wrapping_sub(self.base()).wrapping_sub(8);
            if find_in(&ranges, hoff).is_none() || !seen.insert(hoff) {
                continue;
            }
            // SAFETY: a block of our area; lock held.
            let hd = unsafe { self.rd(hoff) };
            if tag(hd) >= NO_SCAN_TAG {
                continue;
            }
            for k in 0..wosize(hd) {
                // SAFETY: a field of that block.
                let f = unsafe { self.rd(hoff + 8 + 8 * k) };
                if is_block(f)
                    && find_in(&ranges, f.wrapping_sub(self.base()).wrapping_sub(8)).is_none()
                    && is_private(f)
                {
                    return Ok(Some((x, k, f)));
                }
                stack.push(f);
            }
        }
        Ok(None)
    }

    fn check_locked(&self) -> Vec<String> {
        let mut v = Vec::new();
        let d = self.desc();
        let n = d.nchunks.load(Relaxed) as usize;
        if n == 0 || n > MAX_CHUNKS {
            v.push(format!("{n} chunks"));
            return v;
        }
        // C1
        if d.chunks[0].offset.load(Relaxed) != d.first_chunk.load(Relaxed) {
            v.push("entry 0 is not the first chunk".into());
        }
        let mut seen = HashSet::new();
        let mut words = 0;
        for i in 0..n {
            let off = d.chunks[i].offset.load(Relaxed);
            if !seen.insert(off) {
                v.push(format!("chunk {off} listed twice"));
            }
            if !self.is_our_chunk(off) {
                v.push(format!("chunk {off} lacks our magic or nonce"));
                return v;
            }
            words += self.range_of(off).words;
        }
        if words != d.heap_words.load(Relaxed) {
            v.push(format!(
                "heap_words {} but areas hold {words}",
                d.heap_words.load(Relaxed)
            ));
        }
        let ranges = self.ranges();
        // B (gc.rs): outside a GC, a bitmap holds no mark unless the last
        // GC was interrupted (then the next one clears them all).
        if d.bitmaps_dirty.load(Relaxed) == 0 {
            for r in &ranges {
                for k in 0..r.words.div_ceil(64) {
                    // SAFETY: a word of this chunk's bitmap; lock held.
                    if unsafe { self.rd(r.bitmap + 8 * k) } != 0 {
                        v.push(format!("bitmap word {k} of chunk {} is not zero", r.hdr));
                        break;
                    }
                }
            }
        }
        // A1..A3: free blocks as (start, words).
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut total = 0;
        for c in 0..=SMALL_WORDS {
            let mut cur = d.free_heads[c].load(Relaxed);
            let nonempty = cur != 0;
            if nonempty != (d.free_mask.load(Relaxed) & (1 << c) != 0) {
                v.push(format!("free_mask bit {c} disagrees with its list"));
            }
            let mut steps = 0;
            while cur != 0 {
                steps += 1;
                if steps > words {
                    v.push(format!("free list {c} loops"));
                    break;
                }
                let Some(r) = find_in(&ranges, cur) else {
                    v.push(format!("free list {c} leaves the areas at {cur}"));
                    break;
                };
                // SAFETY: cur is a word of one of our areas; lock held.
                let hd = unsafe { self.rd(cur) };
                let w = wosize(hd) + 1;
                if !is_black(hd) || tag(hd) != ABSTRACT_TAG || cur + w * 8 > r.end() {
                    v.push(format!("free block at {cur} has header {hd:#x}"));
                    break;
                }
                let want = if w <= SMALL_WORDS as u64 {
                    w as usize
                } else {
                    0
                };
                if w < 2 || want != c {
                    v.push(format!("free block of {w} words on list {c}"));
                }
                free.push((cur, w));
                total += w;
                // SAFETY: as above, w >= 2.
                cur = unsafe { self.rd(cur + 8) };
            }
        }
        if total != d.free_words.load(Relaxed) {
            v.push(format!(
                "free_words {} but lists hold {total}",
                d.free_words.load(Relaxed)
            ));
        }
        free.sort_unstable();
        for w in free.windows(2) {
            if w[0].0 + w[0].1 * 8 > w[1].0 {
                v.push(format!("free blocks at {} and {} overlap", w[0].0, w[1].0));
            }
        }
        // Reachable blocks: black, inside an area, not free.
        let mut stack = vec![d.root.load(Relaxed), d.pin_head.load(Relaxed)];
        let mut marked = HashSet::new();
        while let Some(x) = stack.pop() {
            if !is_block(x) {
                continue;
            }
            let hoff = x.wrapping_sub(self.base()).wrapping_sub(8);
            let Some(r) = find_in(&ranges, hoff) else {
                continue; // outside the heap: atoms, or a program error
            };
            if !marked.insert(hoff) {
                continue;
            }
            // SAFETY: a word of our area; lock held.
            let hd = unsafe { self.rd(hoff) };
            let w = wosize(hd) + 1;
            if !is_black(hd) || hoff + w * 8 > r.end() {
                v.push(format!("reachable block at {hoff} has header {hd:#x}"));
                continue;
            }
            let i = free.partition_point(|&(s, _)| s <= hoff + (w - 1) * 8);
            if i > 0 && free[i - 1].0 + free[i - 1].1 * 8 > hoff {
                v.push(format!("reachable block at {hoff} overlaps free space"));
            }
            if tag(hd) < NO_SCAN_TAG {
                for k in 1..w {
                    // SAFETY: fields of a block inside our area.
                    stack.push(unsafe { self.rd(hoff + 8 * k) });
                }
            }
        }
        v
    }
}
