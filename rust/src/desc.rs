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
//! ALLOC    01  bits 0..29 length in pages, bits 32..47 owner slot, bit 48
//!              CACHED: the block sits in its owner's per-process cache
//!              (free for the user, still held by the owner; see `pool.rs`).
//! FREE     10  head of a free run: bits 0..29 next, bits 30..59 prev
//!              (the run's exact-size list; NIL for runs kept in the tree).
//! AUX      11  bits 61..60 kind, bits 0..59 payload; only ever inside a
//!              free run:
//!                LEN   at head+1 and at the last page (length >= 2)
//!                LINKS at head+2 of a tree run: left | right << 30
//!                UP    at head+3 of a tree run: parent
//! ```
//!
//! Invariants (verified by `check.rs`):
//! - D1: a free run of length 1 is a lone `FREE` word; a free run of length
//!   n >= 2 has `FREE` at its head and `LEN(n)` at head+1 and at its last
//!   page; a tree run also has `LINKS` and `UP`; all its other words are
//!   `INTERIOR`.
//! - D2: every page inside a live block but its first is `INTERIOR`.
//! - D3: two free runs are never adjacent (free coalesces).
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

pub const INTERIOR: u64 = 0;

#[inline]
pub fn tag(w: u64) -> u64 {
    w >> TAG_SHIFT
}

#[inline]
pub fn alloc_word(len: u32, owner: u16) -> u64 {
    (TAG_ALLOC << TAG_SHIFT) | ((owner as u64) << 32) | (len as u64 & LINK_MASK)
}

/// The CACHED flag of an `ALLOC` word.
pub const CACHED: u64 = 1 << 48;

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
    (w >> 32) as u16
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let w = alloc_word(MAX_PAGES, 0xBEEF);
        assert_eq!(tag(w), TAG_ALLOC);
        assert_eq!(alloc_len(w), MAX_PAGES);
        assert_eq!(alloc_owner(w), 0xBEEF);
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
        assert_eq!(tag(INTERIOR), TAG_INTERIOR);
    }
}
