//! Chunks: the pool blocks a heap's values live in.
//!
//! A chunk is a `ChunkHeader` (magic, the heap's nonce, sizes), a mark
//! bitmap (one bit per area word) and the area. The first chunk follows the
//! descriptor in the heap's first block; each other one is a pool block of
//! its own.
//!
//! Invariants:
//! - C1: entries `0..nchunks` of the chunk table name distinct chunks whose
//!   header has the chunk magic and this heap's nonce; entry 0 is the first
//!   chunk.
//! - C2: an extension chunk is a live pool block owned by slot 0 from
//!   before its table entry is committed until after its entry is removed.
//!
//! Commit points (what a death between two steps leaves, repaired by
//! `recover.rs`):
//! - grow: pool alloc (owned by this process: a death leaves a block
//!   `reclaim_dead` frees) → format the header → disown (slot 0: a death
//!   leaves an orphan with our nonce that the orphan scan frees) → write the
//!   entry at `nchunks` → store `nchunks + 1` (the commit) → add its area
//!   to the free lists.
//! - remove (an empty extension chunk, in the sweep): copy the last entry
//!   over it → store `nchunks - 1` (the commit; a death before it leaves a
//!   duplicate entry, dropped by recovery, and an orphan) → pool free.

use super::layout::*;
use super::value::WORD;
use super::{HResult, Heap, HeapError, MIN_CHUNK_BYTES};
use crate::error::Error;
use std::sync::atomic::Ordering::Relaxed;

/// Where one chunk's parts are (byte offsets from the pool base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRange {
    pub hdr: u64,
    pub bitmap: u64,
    pub area: u64,
    pub words: u64,
}

impl ChunkRange {
    #[inline]
    pub fn end(&self) -> u64 {
        self.area + self.words * WORD as u64
    }
}

/// The chunk whose area holds the word at byte offset `off`, in ranges
/// sorted by `area`.
pub(crate) fn find_in(ranges: &[ChunkRange], off: u64) -> Option<&ChunkRange> {
    find_index_in(ranges, off).map(|i| &ranges[i])
}

/// [`find_in`], as the index of the chunk in `ranges`.
#[inline]
pub(crate) fn find_index_in(ranges: &[ChunkRange], off: u64) -> Option<usize> {
    let i = ranges.partition_point(|r| r.area <= off).checked_sub(1)?;
    let r = ranges.get(i)?;
    (off < r.end() && (off - r.area) % WORD as u64 == 0).then_some(i)
}

impl Heap<'_> {
    pub(crate) fn chunk_header(&self, off: u64) -> &ChunkHeader {
        // SAFETY: chunk offsets come from the table or from a pool block
        // at least a ChunkHeader long, 64-aligned (after the 64-aligned
        // descriptor, or page-aligned); all fields are atomics.
        unsafe { &*self.pool.addr(off as usize).cast::<ChunkHeader>() }
    }

    /// Whether the chunk at `off` carries this heap's magic and nonce.
    pub(crate) fn is_our_chunk(&self, off: u64) -> bool {
        let c = self.chunk_header(off);
        let d = self.desc();
        c.magic.load(Relaxed) == CHUNK_MAGIC
            && c.nonce[0].load(Relaxed) == d.nonce[0].load(Relaxed)
            && c.nonce[1].load(Relaxed) == d.nonce[1].load(Relaxed)
    }

    /// Writes the header of a chunk of `bytes` bytes at `off` (memory not
    /// yet part of the heap).
    pub(crate) fn format_chunk(&self, off: u64, bytes: usize) {
        let words = area_words_for(bytes);
        let d = self.desc();
        let c = self.chunk_header(off);
        c.area_words.store(words as u64, Relaxed);
        c.bitmap_at
            .store(std::mem::size_of::<ChunkHeader>() as u64, Relaxed);
        c.area_at.store(chunk_overhead(words) as u64, Relaxed);
        // A zero bitmap: the GC's invariant B (`gc.rs`); pool memory may
        // hold anything.
        // SAFETY: the bitmap lies inside the chunk's block (chunk_overhead
        // counts it), which is not yet part of the heap.
        unsafe {
            std::ptr::write_bytes(
                self.pool
                    .addr(off as usize + std::mem::size_of::<ChunkHeader>()),
                0,
                words.div_ceil(64) * 8,
            )
        };
        c.nonce[0].store(d.nonce[0].load(Relaxed), Relaxed);
        c.nonce[1].store(d.nonce[1].load(Relaxed), Relaxed);
        c.magic.store(CHUNK_MAGIC, Relaxed);
    }

    pub(crate) fn range_of(&self, off: u64) -> ChunkRange {
        let c = self.chunk_header(off);
        ChunkRange {
            hdr: off,
            bitmap: off + c.bitmap_at.load(Relaxed),
            area: off + c.area_at.load(Relaxed),
            words: c.area_words.load(Relaxed),
        }
    }

    /// Commits the formatted chunk at `off` into the table and gives its
    /// area to the free lists (lock held, or heap not yet published).
    pub(crate) fn append_chunk(&self, off: u64, bytes: usize) {
        let d = self.desc();
        let n = d.nchunks.load(Relaxed) as usize;
        d.chunks[n].offset.store(off, Relaxed);
        d.chunks[n].bytes.store(bytes as u64, Relaxed);
        d.nchunks.store(n as u64 + 1, Relaxed); // commit
        d.chunk_gen.fetch_add(1, Relaxed);
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapChunkAppended);
        let r = self.range_of(off);
        d.heap_words
            .store(d.heap_words.load(Relaxed) + r.words, Relaxed);
        self.push_free(r.area, r.words);
    }

    /// Removes table entry `i` (an empty extension chunk) and frees its
    /// pool block (lock held). Its words must be on no free list.
    pub(crate) fn remove_chunk(&self, i: usize) -> HResult<()> {
        let d = self.desc();
        let n = d.nchunks.load(Relaxed) as usize;
        let off = d.chunks[i].offset.load(Relaxed);
        let r = self.range_of(off);
        let last = n - 1;
        d.chunks[i]
            .offset
            .store(d.chunks[last].offset.load(Relaxed), Relaxed);
        d.chunks[i]
            .bytes
            .store(d.chunks[last].bytes.load(Relaxed), Relaxed);
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapChunkEntryMoved);
        d.nchunks.store(last as u64, Relaxed); // commit
        d.chunk_gen.fetch_add(1, Relaxed);
        d.heap_words
            .store(d.heap_words.load(Relaxed).saturating_sub(r.words), Relaxed);
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapChunkRemoved);
        // The table no longer names it: a free that fails (a block the
        // pool does not know as live: damage) leaves nothing of ours
        // behind, and if the block is still live the next recovery's
        // orphan scan frees it.
        let _ = self.pool.free(off as usize);
        Ok(())
    }

    /// The chunks, sorted by address (lock held).
    pub(crate) fn ranges(&self) -> Vec<ChunkRange> {
        let d = self.desc();
        let n = (d.nchunks.load(Relaxed) as usize).min(MAX_CHUNKS);
        let mut v: Vec<ChunkRange> = (0..n)
            .map(|i| self.range_of(d.chunks[i].offset.load(Relaxed)))
            .collect();
        v.sort_unstable_by_key(|r| r.area);
        v
    }

    /// The chunk holding the block header at byte offset `hoff`.
    pub(crate) fn find_chunk(&self, hoff: u64) -> Option<ChunkRange> {
        find_in(&self.ranges(), hoff).copied()
    }

    /// Adds a chunk with room for a block of `words` words (lock held): at
    /// least `MIN_CHUNK_BYTES` and half the heap, so the table never fills
    /// in practice; exactly enough when the pool has no more.
    pub(crate) fn grow(&self, words: u64) -> HResult<()> {
        let d = self.desc();
        if d.nchunks.load(Relaxed) as usize >= MAX_CHUNKS {
            return Err(HeapError::Pool(Error::OutOfMemory));
        }
        let need = chunk_overhead(words as usize)
            .checked_add(
                (words as usize)
                    .checked_mul(WORD)
                    .ok_or(Error::OutOfMemory)?,
            )
            .ok_or(Error::OutOfMemory)?;
        let half = (d.heap_words.load(Relaxed) as usize * WORD) / 2;
        let want = need.max(MIN_CHUNK_BYTES).max(half);
        let off = match self.pool.alloc(want) {
            Err(Error::OutOfMemory) if want > need => self.pool.alloc(need)?,
            r => r?,
        };
        let bytes = self.pool.size(off)?;
        self.format_chunk(off as u64, bytes);
        if let Err(e) = self.pool.disown(off) {
            let _ = self.pool.free(off);
            return Err(e.into());
        }
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapChunkDisowned);
        self.append_chunk(off as u64, bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_in_sorted_ranges() {
        let r = |area, words| ChunkRange {
            hdr: 0,
            bitmap: 0,
            area,
            words,
        };
        let v = vec![r(100 * 8, 10), r(1000 * 8, 5)];
        assert_eq!(find_in(&v, 100 * 8).map(|c| c.area), Some(800));
        assert_eq!(find_in(&v, 109 * 8).map(|c| c.area), Some(800));
        assert_eq!(find_in(&v, 110 * 8), None);
        assert_eq!(find_in(&v, 99 * 8), None);
        assert_eq!(find_in(&v, 100 * 8 + 3), None);
        assert_eq!(find_in(&v, 1004 * 8).map(|c| c.area), Some(8000));
        assert_eq!(find_in(&v, 0), None);
    }
}
