//! Page descriptors: one 64-bit word per payload page, kept in the header
//! region, never inside user pages.
//!
//! # The truth and what is derived from it
//!
//! The only *truth* in a pool is the set of `ALLOC` words: a page whose
//! descriptor is `ALLOC` starts a live block, and the word holds the block's
//! length and owner slot. Every page not covered by a live block is free.
//! Everything else (free-run heads, length words, tree links, free lists,
//! the bitmap, the counters) is *derived*: recovery throws it away and
//! rebuilds it from the `ALLOC` words alone (see `recovery.rs`). That is what
//! lets each operation commit with one write: alloc commits when it stores
//! the `ALLOC` word, free commits when it overwrites it.
//!
//! # Word formats (tag in bits 63..62)
//!
//! ```text
//! INTERIOR 00  all other bits zero. Every page that is neither a run head
//!              nor an aux word of a free run. Never mistaken for a head.
//! ALLOC    01  bits 0..29 length in pages, bits 30..37 owner slot, bit 38
//!              CACHED: the block sits in its owner's per-process cache
//!              (free for the user, still held by the owner; see
//!              `cache.rs`), bits 39..60 generation (see below), bit 61
//!              GHOSTS: the block may hold ghost words (L2 of
//!              `large_cache.rs`), cleared when it is freed.
//! FREE     10  head of a free run: bits 0..29 next, bits 30..59 prev
//!              (the run's exact-size list; NIL for runs kept in the tree).
//! AUX      11  bits 61..60 kind, bits 0..59 payload:
//!                LEN   at head+1 and at the last page (length >= 2) of a
//!                      free run
//!                LINKS at head+2 of a free tree run: left | right << 30
//!                UP    at head+3 of a free tree run: parent
//!                SKIP  inside a block: a ghost, the former head of a run
//!                      its owner's large cache merged into the block (L2
//!                      of `large_cache.rs`): length | owner << 30
//! ```
//!
//! Invariants (verified by `check.rs`):
//! - D1: a free run of length 1 is a lone `FREE` word; a free run of length
//!   n >= 2 has `FREE` at its head and `LEN(n)` at head+1 and at its last
//!   page; a tree run also has `LINKS` and `UP`; all its other words are
//!   `INTERIOR`.
//! - D2: every page inside a block but its first is `INTERIOR`, or a ghost of
//!   the block's owner (a CACHED word its large cache left: L2 of
//!   `large_cache.rs`).
//! - D3: two free runs are never adjacent (free coalesces).
//!
//! # The generation of an `ALLOC` word
//!
//! A free is given only an address, and a racing double free could
//! otherwise be taken for a free of the block's next incarnation: thread A
//! reads the word of block b, thread B frees b and allocates the same
//! length, getting b again with an identical word, and A's
//! compare-and-swap succeeds, freeing B's new block (handed out twice
//! from then on). So every allocation gives the word a new generation:
//! bits 39..50 count reuses from the owner's cache (each cache pop adds
//! one), bits 51..60 take a pool-wide epoch that every allocation from the
//! free runs advances (`AllocState::alloc_epoch`). A free reads the word
//! once and every later step (the cache flip, the locked commit) requires
//! exactly that word, so a free that read b's word before b was freed and
//! allocated again fails with `NotABlock` and changes nothing (see
//! `Pool::free`). What cannot be told apart: a free that starts after the
//! re-allocation returned frees the new block, as a correct free would
//! (the caller has only an address); and a free that stays between its
//! read and its commit while the same block is re-allocated exactly 4096
//! times in a row from its owner's cache, or is re-allocated from the free
//! runs after a multiple of 1024 allocations from them, with the same
//! length and owner, is not detected. Recovery and `check` accept any
//! generation.
//!
//! D1 and D2 make the neighbours of a block readable in O(1): the page
//! before a block is either `INTERIOR`/`ALLOC` (a live block ends there),
//! `FREE` (a free run of one page) or `AUX LEN` (the tail of a longer free
//! run, whose head the length gives).

/// Width of a page number or length field.
pub const LINK_BITS: u32 = 30;
/// "No page": the end of a list, a missing tree child.
pub const NIL: u32 = (1 << LINK_BITS) - 1;
/// Largest number of payload pages a pool may have (4 TiB of 4 KiB pages).
pub const MAX_PAGES: u32 = NIL - 1;
const LINK_MASK: u64 = NIL as u64;

const TAG_SHIFT: u32 = 62;
pub const TAG_INTERIOR: u64 = 0;
pub const TAG_ALLOC: u64 = 1;
pub const TAG_FREE: u64 = 2;
pub const TAG_AUX: u64 = 3;

const KIND_SHIFT: u32 = 60;
pub const AUX_LEN: u64 = 0;
pub const AUX_LINKS: u64 = 1;
pub const AUX_UP: u64 = 2;
pub const AUX_SKIP: u64 = 3;

pub const INTERIOR: u64 = 0;

#[inline]
pub fn tag(w: u64) -> u64 {
    w >> TAG_SHIFT
}

const OWNER_SHIFT: u32 = 30;
const OWNER_MASK: u64 = 0xFF;
/// The reuse count: bits 39..50.
const REUSE_SHIFT: u32 = 39;
const REUSE_MASK: u64 = 0xFFF << REUSE_SHIFT;
/// The epoch: bits 51..60.
const EPOCH_SHIFT: u32 = 51;
const EPOCH_MASK: u64 = 0x3FF << EPOCH_SHIFT;
/// The whole generation (reuse count and epoch).
pub const GEN_MASK: u64 = REUSE_MASK | EPOCH_MASK;

// The fields of an ALLOC word do not overlap.
const _: () = assert!(
    LINK_MASK & (OWNER_MASK << OWNER_SHIFT) == 0
        && (LINK_MASK | OWNER_MASK << OWNER_SHIFT) & CACHED == 0
        && (LINK_MASK | OWNER_MASK << OWNER_SHIFT | CACHED) & GEN_MASK == 0
        && (LINK_MASK | OWNER_MASK << OWNER_SHIFT | CACHED | GEN_MASK) & GHOSTS == 0
        && (LINK_MASK | OWNER_MASK << OWNER_SHIFT | CACHED | GEN_MASK | GHOSTS) >> TAG_SHIFT == 0
        && OWNER_MASK as usize + 1 == crate::layout::MAX_OWNERS
);

/// An `ALLOC` word of generation 0 (owner slots are below 256).
#[inline]
pub fn alloc_word(len: u32, owner: u16) -> u64 {
    (TAG_ALLOC << TAG_SHIFT)
        | ((owner as u64 & OWNER_MASK) << OWNER_SHIFT)
        | (len as u64 & LINK_MASK)
}

/// The `ALLOC` word of a block allocated from the free runs at `epoch`.
#[inline]
pub fn alloc_word_at(len: u32, owner: u16, epoch: u32) -> u64 {
    alloc_word(len, owner) | ((epoch as u64) << EPOCH_SHIFT & EPOCH_MASK)
}

/// The word of cached block `w` allocated again from its owner's cache:
/// live, with the next reuse count (wrapping within its bits).
#[inline]
pub fn reused(w: u64) -> u64 {
    let count = (w & REUSE_MASK).wrapping_add(1 << REUSE_SHIFT) & REUSE_MASK;
    (w & !REUSE_MASK & !CACHED) | count
}

/// The generation bits of an `ALLOC` word.
#[inline]
pub fn alloc_gen(w: u64) -> u64 {
    (w & GEN_MASK) >> REUSE_SHIFT
}

/// The CACHED flag of an `ALLOC` word.
pub const CACHED: u64 = 1 << 38;

/// The GHOSTS flag of an `ALLOC` word: the block may hold ghost words
/// (former heads its owner's large cache left inside it: L2 of
/// `large_cache.rs`), which whoever frees it clears first. Never set on a
/// block allocated from the free runs, so freeing one of those stays O(1).
pub const GHOSTS: u64 = 1 << 61;

#[inline]
pub fn is_cached(w: u64) -> bool {
    w & CACHED != 0
}

#[inline]
pub fn alloc_len(w: u64) -> u32 {
    (w & LINK_MASK) as u32
}

#[inline]
pub fn alloc_owner(w: u64) -> u16 {
    ((w >> OWNER_SHIFT) & OWNER_MASK) as u16
}

#[inline]
pub fn free_word(next: u32, prev: u32) -> u64 {
    (TAG_FREE << TAG_SHIFT) | ((prev as u64 & LINK_MASK) << LINK_BITS) | (next as u64 & LINK_MASK)
}

#[inline]
pub fn free_next(w: u64) -> u32 {
    (w & LINK_MASK) as u32
}

#[inline]
pub fn free_prev(w: u64) -> u32 {
    ((w >> LINK_BITS) & LINK_MASK) as u32
}

#[inline]
pub fn aux_word(kind: u64, payload: u64) -> u64 {
    (TAG_AUX << TAG_SHIFT) | (kind << KIND_SHIFT) | (payload & ((1 << KIND_SHIFT) - 1))
}

#[inline]
pub fn aux_kind(w: u64) -> u64 {
    (w >> KIND_SHIFT) & 3
}

#[inline]
pub fn aux_payload(w: u64) -> u64 {
    w & ((1 << KIND_SHIFT) - 1)
}

#[inline]
pub fn len_word(len: u32) -> u64 {
    aux_word(AUX_LEN, len as u64)
}

#[inline]
pub fn is_len_word(w: u64) -> bool {
    tag(w) == TAG_AUX && aux_kind(w) == AUX_LEN
}

#[inline]
pub fn links_word(left: u32, right: u32) -> u64 {
    aux_word(
        AUX_LINKS,
        (left as u64 & LINK_MASK) | ((right as u64 & LINK_MASK) << LINK_BITS),
    )
}

#[inline]
pub fn links_left(w: u64) -> u32 {
    (aux_payload(w) & LINK_MASK) as u32
}

#[inline]
pub fn links_right(w: u64) -> u32 {
    ((aux_payload(w) >> LINK_BITS) & LINK_MASK) as u32
}

#[inline]
pub fn up_word(parent: u32) -> u64 {
    aux_word(AUX_UP, parent as u64 & LINK_MASK)
}

/// The ghost of a merged run's head of `len` pages of `owner` (L2 of
/// `large_cache.rs`): never a head for an operation, but a walker that
/// lands on it (having read a length from before the merge) steps `len`.
#[inline]
pub fn skip_word(len: u32, owner: u16) -> u64 {
    aux_word(
        AUX_SKIP,
        (len as u64 & LINK_MASK) | ((owner as u64 & OWNER_MASK) << LINK_BITS),
    )
}

#[inline]
pub fn is_skip(w: u64) -> bool {
    tag(w) == TAG_AUX && aux_kind(w) == AUX_SKIP
}

#[inline]
pub fn skip_len(w: u64) -> u32 {
    (aux_payload(w) & LINK_MASK) as u32
}

#[inline]
pub fn skip_owner(w: u64) -> u16 {
    ((aux_payload(w) >> LINK_BITS) & OWNER_MASK) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let w = alloc_word(MAX_PAGES, 0xEF);
        assert_eq!(tag(w), TAG_ALLOC);
        assert_eq!(alloc_len(w), MAX_PAGES);
        assert_eq!(alloc_owner(w), 0xEF);
        assert!(!is_cached(w));
        assert!(is_cached(w | CACHED));
        assert_eq!(alloc_gen(w), 0);
        let f = free_word(7, NIL);
        assert_eq!(tag(f), TAG_FREE);
        assert_eq!((free_next(f), free_prev(f)), (7, NIL));
        let l = links_word(NIL, 12345);
        assert_eq!(tag(l), TAG_AUX);
        assert_eq!(aux_kind(l), AUX_LINKS);
        assert_eq!((links_left(l), links_right(l)), (NIL, 12345));
        assert!(is_len_word(len_word(9)));
        assert_eq!(aux_payload(len_word(9)), 9);
        assert!(!is_len_word(up_word(9)));
        let s = skip_word(MAX_PAGES, 0xEF);
        assert!(is_skip(s) && !is_len_word(s) && tag(s) == TAG_AUX);
        assert_eq!((skip_len(s), skip_owner(s)), (MAX_PAGES, 0xEF));
        assert!(!is_skip(len_word(9)) && !is_skip(up_word(9)));
        assert_eq!(tag(INTERIOR), TAG_INTERIOR);
    }

    #[test]
    fn generations_leave_the_other_fields_alone() {
        let w = alloc_word_at(MAX_PAGES, 255, 0xFFFF_FFFF);
        assert_eq!(
            (tag(w), alloc_len(w), alloc_owner(w), is_cached(w)),
            (TAG_ALLOC, MAX_PAGES, 255, false)
        );
        assert_eq!(alloc_gen(w), 0x3FF << 12);
        assert_eq!(w & GHOSTS, 0);
        // A cache pop clears CACHED and counts one more reuse, wrapping
        // within the reuse bits without touching the epoch.
        let mut c = alloc_word_at(7, 3, 5);
        let start = alloc_gen(c);
        for i in 1..=4096u64 {
            c = reused(c | CACHED);
            assert_eq!((alloc_len(c), alloc_owner(c), is_cached(c)), (7, 3, false));
            assert_eq!(tag(c), TAG_ALLOC);
            assert_eq!(alloc_gen(c) == start, i == 4096, "after {i} reuses");
        }
        // Different epochs give different words.
        assert_ne!(alloc_word_at(7, 3, 5), alloc_word_at(7, 3, 6));
        assert_eq!(alloc_word_at(7, 3, 5), alloc_word_at(7, 3, 5 + 1024));
        // GHOSTS survives a reuse and is no part of the generation.
        let g = alloc_word_at(7, 3, 5) | GHOSTS | CACHED;
        assert_eq!(reused(g) & GHOSTS, GHOSTS);
        assert_eq!(alloc_gen(g), alloc_gen(alloc_word_at(7, 3, 5)));
    }
}
