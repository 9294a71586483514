//! Recovery after a process died holding the heap lock: the root is the
//! truth.
//!
//! Every write a holder makes is either to free space (copying a new
//! value, formatting free blocks), to derived bookkeeping (free lists,
//! counters, bitmaps, the chunk table's uncommitted slots), or a single
//! aligned store that commits (the root, a field of a reachable value, the
//! chunk count, a pin). So the next locker, before its own operation:
//!
//! 1. re-reads the chunk table, keeping only entries that name distinct
//!    chunks with our magic and nonce inside the pool (a duplicate left by
//!    an interrupted removal is dropped);
//! 2. drops the pins of dead processes;
//! 3. collects from the root and the remaining pins, which rebuilds the
//!    free lists and counters from the mark bitmap, trusting only headers
//!    of reachable blocks (written completely before anything reached
//!    them): a value half-copied by the dead process is unreachable, so it
//!    becomes free space;
//! 4. frees orphan chunks: pool blocks owned by slot 0 that carry our
//!    nonce but are not in the table (a death between the disown and the
//!    append of `grow`, or between the removal and the free in the sweep);
//! 5. bumps `needs_repair` (structures built on the heap then recompute
//!    their own counters) and counts a recovery.
//!
//! A death during recovery leaves the mutex inconsistent (it is marked
//! consistent only after this returns true); the next locker starts over.
//! Every step is idempotent.

use super::layout::*;
use super::Heap;
use std::sync::atomic::Ordering::Relaxed;

impl Heap<'_> {
    /// Rebuilds the heap's bookkeeping (lock held, after `OwnerDied`).
    /// Returns whether it completed.
    pub(crate) fn recover(&self) -> bool {
        let d = self.desc();
        self.sanitize_chunk_table();
        self.prune_dead_pins();
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapMidRecovery);
        let roots = [d.root.load(Relaxed), d.pin_head.load(Relaxed)];
        if self.collect_from(&roots, None).is_err() {
            return false;
        }
        self.free_orphan_chunks();
        d.needs_repair.fetch_add(1, Relaxed);
        d.recoveries.fetch_add(1, Relaxed);
        true
    }

    /// Whether `off` can be a chunk header of ours: inside the mapping,
    /// aligned, with our magic and nonce.
    fn plausible_chunk(&self, off: u64) -> bool {
        off % 64 == 0
            && (off as usize).saturating_add(std::mem::size_of::<ChunkHeader>()) <= self.pool.len()
            && self.is_our_chunk(off)
    }

    pub(super) fn sanitize_chunk_table(&self) {
        let d = self.desc();
        let first = d.first_chunk.load(Relaxed);
        let n = (d.nchunks.load(Relaxed) as usize).min(MAX_CHUNKS);
        let mut keep: Vec<(u64, u64)> = vec![(first, d.chunks[0].bytes.load(Relaxed))];
        for i in 0..n {
            let off = d.chunks[i].offset.load(Relaxed);
            let bytes = d.chunks[i].bytes.load(Relaxed);
            if off == first || keep.iter().any(|&(o, _)| o == off) || !self.plausible_chunk(off) {
                continue;
            }
            // An extension chunk is a whole pool block of at least its size.
            match self.pool.size(off as usize) {
                Ok(sz) if sz as u64 >= bytes => keep.push((off, bytes)),
                _ => {}
            }
        }
        let mut words = 0;
        for (i, &(off, bytes)) in keep.iter().enumerate() {
            d.chunks[i].offset.store(off, Relaxed);
            d.chunks[i].bytes.store(bytes, Relaxed);
            words += self.range_of(off).words;
        }
        d.nchunks.store(keep.len() as u64, Relaxed);
        d.chunk_gen.fetch_add(1, Relaxed);
        d.heap_words.store(words, Relaxed);
    }

    pub(super) fn free_orphan_chunks(&self) {
        let d = self.desc();
        let n = d.nchunks.load(Relaxed) as usize;
        let Ok(blocks) = self.pool.unowned_blocks() else {
            return;
        };
        for off in blocks {
            let o = off as u64;
            if off == self.desc_off
                || (0..n).any(|i| d.chunks[i].offset.load(Relaxed) == o)
                || !self.plausible_chunk(o)
            {
                continue;
            }
            let _ = self.pool.free(off);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Heap;
    use crate::pool::{CreateOptions, Pool};

    /// A death between `grow`'s disown and its table append leaves a
    /// chunk of ours owned by nobody and listed nowhere; a death between a
    /// removal's table store and its free leaves the same. Recovery frees
    /// it, and only it (another heap's chunk has another nonce).
    #[test]
    fn orphan_chunks_are_freed_and_only_ours() {
        let pool = Pool::create(256 * 4096, &CreateOptions::default()).unwrap();
        let other = Heap::create(&pool, 4096).unwrap();
        let h = Heap::create(&pool, 4096).unwrap();
        let before = pool.stats();
        let orphan = |heap: &Heap| {
            let off = pool.alloc(64 << 10).unwrap();
            heap.format_chunk(off as u64, 64 << 10);
            pool.disown(off).unwrap();
            off
        };
        let mine = orphan(&h);
        let theirs = orphan(&other);
        h.lock().unwrap();
        assert!(h.recover());
        h.unlock();
        assert_eq!(pool.size(mine), Err(crate::Error::NotABlock));
        assert_eq!(pool.size(theirs), Ok(64 << 10));
        assert!(h.check().is_empty() && other.check().is_empty());
        pool.free(theirs).unwrap();
        assert_eq!(pool.stats(), before);
        h.destroy().unwrap();
        other.destroy().unwrap();
    }

    /// A death between a removal's copy of the last entry and its count
    /// store leaves one chunk listed twice and one listed nowhere.
    #[test]
    fn duplicate_entries_are_dropped() {
        let pool = Pool::create(1024 * 4096, &CreateOptions::default()).unwrap();
        let h = Heap::create(&pool, 4096).unwrap();
        h.lock().unwrap();
        h.grow(10).unwrap();
        h.grow(10).unwrap();
        let d = h.desc();
        use std::sync::atomic::Ordering::Relaxed;
        let lost = d.chunks[1].offset.load(Relaxed);
        d.chunks[1]
            .offset
            .store(d.chunks[2].offset.load(Relaxed), Relaxed);
        d.chunks[1]
            .bytes
            .store(d.chunks[2].bytes.load(Relaxed), Relaxed);
        assert!(h.recover());
        h.unlock();
        // Both extension chunks were empty: the survivor was given back by
        // the recovery's sweep, the lost one by the orphan scan.
        assert_eq!(h.stats().unwrap().chunks, 1);
        assert_eq!(pool.size(lost as usize), Err(crate::Error::NotABlock));
        assert!(h.check().is_empty(), "{:?}", h.check());
        assert!(pool.check().is_empty());
        h.destroy().unwrap();
        assert_eq!(pool.stats().live_blocks, 0);
    }
}
