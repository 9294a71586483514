//! The on-shm layout of a shared heap. Addresses inside *values* are
//! absolute (they are OCaml pointers, so a heap only works where its pool
//! is mapped at the address it had when the heap was created, which is the
//! case of Netmcore pools, mapped before the fork); everything else is a
//! byte offset from the pool's base, as in the rest of the crate.
//!
//! ```text
//! first pool block (offset = the heap's descriptor):
//!   HeapDesc                 size_of::<HeapDesc>()   (magic, lock, root, tables)
//!   ChunkHeader              64 B                    the first chunk
//!   mark bitmap              ceil(area_words / 64) words
//!   area                     area_words words of blocks
//! every further chunk: a pool block of its own
//!   ChunkHeader | mark bitmap | area
//! ```
//!
//! Every block of an area is an OCaml block (header + fields) with a black
//! header, either live, dead (garbage not yet swept) or free (`alloc.rs`).
//! All pool blocks of a heap are owned by owner slot 0 once the heap (or
//! chunk) is committed, so `Pool::reclaim_dead` never frees them when the
//! worker that made them exits (a heap outlives the process that grew it).

use crate::lock::MutexStorage;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// "SHMHEAP" and a format byte; stored last when a heap is created (with
/// release ordering), so a half-made heap is never attached.
pub const HEAP_MAGIC: u64 = u64::from_le_bytes(*b"SHMHEAP\x01");
/// "SHMCHNK" and a format byte, at the start of every chunk header.
pub const CHUNK_MAGIC: u64 = u64::from_le_bytes(*b"SHMCHNK\x01");
/// Bumped whenever the meaning or position of any shared field changes.
pub const HEAP_LAYOUT_VERSION: u32 = 2;

/// `state`: usable.
pub const STATE_LIVE: u32 = 1;
/// `state`: `destroy` has begun (the commit: every later use fails).
pub const STATE_DESTROYING: u32 = 2;

/// Exact free lists for blocks of 2..=`SMALL_WORDS` words (header
/// included); `free_heads[0]` is the list of larger free blocks. With 63,
/// `free_mask` has one bit per list.
pub const SMALL_WORDS: usize = 63;
/// Chunks a heap may have. Each extension chunk is at least half the heap,
/// so 128 chunks are never reached by a heap that fits in memory.
pub const MAX_CHUNKS: usize = 128;

/// One entry of the chunk table: where a chunk is and how big its pool
/// block is. Written under the heap lock; `nchunks` is the commit.
#[repr(C)]
pub struct ChunkEntry {
    /// Byte offset of the chunk header from the pool base.
    pub offset: AtomicU64,
    /// Bytes of the chunk from its header to the end of its area.
    pub bytes: AtomicU64,
}

/// The descriptor, at the start of the heap's first pool block.
///
/// Fields before `lock` are written once, before `magic`. Every other field
/// is written only by the holder of `lock` (atomics with relaxed ordering:
/// the mutex orders them), except `root`, which lock-free readers load
/// (`Heap::root`): it is stored with release ordering, after the value it
/// points to was completely written.
#[repr(C, align(64))]
pub struct HeapDesc {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub state: AtomicU32,
    /// 128 random bits: a chunk carries them, so a pool block is known to
    /// belong to this heap (orphan scan in `recover.rs`).
    pub nonce: [AtomicU64; 2],
    /// Address of the pool's base when the heap was created.
    pub pool_base: AtomicU64,
    /// Byte offset of the first chunk header (inside the first block).
    pub first_chunk: AtomicU64,
    /// Written by `destroy` under the lock (version 2): the first block's
    /// pool `ALLOC` word, from which it is freed (see `Heap::destroy`);
    /// 0 until then.
    pub first_word: AtomicU64,
    pub _pad0: [u64; 1],
    pub lock: MutexStorage,
    /// The root value (an OCaml value word).
    pub root: AtomicU64,
    /// Entries of `chunks` in use; storing it commits an append or removal.
    pub nchunks: AtomicU64,
    /// Bumped at every change of the chunk table (per-process caches of it).
    pub chunk_gen: AtomicU64,
    /// Bit `n` set when `free_heads[n]` is non-empty (n in 0..=SMALL_WORDS).
    pub free_mask: AtomicU64,
    /// Words on the free lists (headers included).
    pub free_words: AtomicU64,
    /// Words of all areas.
    pub heap_words: AtomicU64,
    /// Words of live blocks found by the last GC.
    pub live_words: AtomicU64,
    /// Words allocated since the last GC.
    pub alloc_since_gc: AtomicU64,
    pub gcs: AtomicU64,
    /// Times a holder's death was found and the heap rebuilt from the root.
    pub recoveries: AtomicU64,
    /// Bumped by each recovery; structures on the heap compare it with
    /// `repaired` to know their counters need recomputing.
    pub needs_repair: AtomicU64,
    pub repaired: AtomicU64,
    /// 1 from the start of a GC's mark to the end of its sweep (version
    /// 2): while set, a bitmap may hold marks, and the next GC clears them
    /// all first (`gc.rs`, invariant B).
    pub bitmaps_dirty: AtomicU64,
    pub _pad1: [u64; 1],
    /// Offset (from the pool base) of the header of the first free block of
    /// each class; 0 = empty. Index 0: blocks of more than SMALL_WORDS words.
    pub free_heads: [AtomicU64; SMALL_WORDS + 1],
    /// The values pinned by `with_value`: a list of heap blocks (see
    /// `pins.rs`), or `()`. A GC root.
    pub pin_head: AtomicU64,
    pub _pad2: [u64; 7],
    pub chunks: [ChunkEntry; MAX_CHUNKS],
}

/// The header of a chunk, followed by its mark bitmap and its area.
#[repr(C, align(64))]
pub struct ChunkHeader {
    pub magic: AtomicU64,
    pub nonce: [AtomicU64; 2],
    /// Words of the area.
    pub area_words: AtomicU64,
    /// Byte offset of the mark bitmap from the chunk header.
    pub bitmap_at: AtomicU64,
    /// Byte offset of the area from the chunk header.
    pub area_at: AtomicU64,
    pub _pad: [u64; 2],
}

/// Bytes of a chunk's header and bitmap for `area_words` words of area.
pub const fn chunk_overhead(area_words: usize) -> usize {
    std::mem::size_of::<ChunkHeader>() + area_words.div_ceil(64) * 8
}

/// Area words of a chunk of `bytes` bytes (header and bitmap included).
pub const fn area_words_for(bytes: usize) -> usize {
    let words = bytes.saturating_sub(std::mem::size_of::<ChunkHeader>()) / 8;
    // area + ceil(area / 64) <= words
    let mut a = words * 64 / 65;
    while a > 0 && a + a.div_ceil(64) > words {
        a -= 1;
    }
    a
}

// The layout of version 2, byte for byte. Changing a field means changing
// this block and bumping HEAP_LAYOUT_VERSION.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<MutexStorage>() == 64);
    assert!(offset_of!(HeapDesc, nonce) == 16);
    assert!(offset_of!(HeapDesc, pool_base) == 32);
    assert!(offset_of!(HeapDesc, first_word) == 48);
    assert!(offset_of!(HeapDesc, lock) == 64);
    assert!(offset_of!(HeapDesc, root) == 128);
    assert!(offset_of!(HeapDesc, repaired) == 216);
    assert!(offset_of!(HeapDesc, bitmaps_dirty) == 224);
    assert!(offset_of!(HeapDesc, free_heads) == 240);
    assert!(offset_of!(HeapDesc, pin_head) == 240 + 8 * (SMALL_WORDS + 1));
    assert!(offset_of!(HeapDesc, chunks) == 816);
    assert!(size_of::<HeapDesc>() == 2880);
    assert!(size_of::<ChunkHeader>() == 64);
    assert!(size_of::<ChunkEntry>() == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_fits_its_chunk() {
        for bytes in [64usize, 65, 200, 4096, 65536, 1 << 20, 12345] {
            let a = area_words_for(bytes);
            assert!(chunk_overhead(a) + a * 8 <= bytes.max(64), "{bytes}");
            // and is nearly all of it
            assert!(chunk_overhead(a + 2) + (a + 2) * 8 > bytes, "{bytes}");
        }
    }
}
