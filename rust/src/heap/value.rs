//! OCaml's value encoding, as far as the shared heap needs it: block
//! headers (size, colour, tag), the tags that decide how a block is
//! scanned or copied, and immediates. Pure functions on words.
//!
//! A header is `wosize << 10 | colour << 8 | tag` (64-bit OCaml 4.x). Every
//! block in a shared heap is **black** (colour 3) from the moment it is
//! written until it dies: OCaml's compactor treats a black block outside its
//! heap as "out of heap, leave it alone", and rewrites any other colour
//! (docs/design-heap.md, 1.2). Our own GC therefore never uses the colour
//! bits; it marks in a side bitmap (`gc.rs`).

/// Bytes per word (64-bit only).
pub const WORD: usize = 8;

pub const BLACK: u64 = 3 << 8;
const COLOUR_MASK: u64 = 3 << 8;

/// Largest wosize a header can hold (54 bits).
pub const MAX_WOSIZE: u64 = (1 << 54) - 1;

// Tags (caml/mlvalues.h). Blocks with a tag >= NO_SCAN_TAG hold no values.
pub const LAZY_TAG: u8 = 246;
pub const CLOSURE_TAG: u8 = 247;
pub const OBJECT_TAG: u8 = 248;
pub const INFIX_TAG: u8 = 249;
pub const FORWARD_TAG: u8 = 250;
pub const NO_SCAN_TAG: u8 = 251;
pub const ABSTRACT_TAG: u8 = 251;
pub const STRING_TAG: u8 = 252;
pub const DOUBLE_TAG: u8 = 253;
pub const DOUBLE_ARRAY_TAG: u8 = 254;
pub const CUSTOM_TAG: u8 = 255;

/// `()`, `0`, `false`, `[]`, `None`: the immediate 0.
pub const VAL_UNIT: u64 = 1;

#[inline]
pub fn make_header(wosize: u64, tag: u8) -> u64 {
    debug_assert!(wosize <= MAX_WOSIZE);
    (wosize << 10) | BLACK | tag as u64
}

#[inline]
pub fn wosize(hd: u64) -> u64 {
    hd >> 10
}

#[inline]
pub fn tag(hd: u64) -> u8 {
    hd as u8
}

#[inline]
pub fn is_black(hd: u64) -> bool {
    hd & COLOUR_MASK == BLACK
}

/// A pointer (as opposed to an immediate). Zero is never a valid block.
#[inline]
pub fn is_block(v: u64) -> bool {
    v & 1 == 0 && v != 0
}

#[inline]
pub fn val_int(n: i64) -> u64 {
    ((n as u64) << 1) | 1
}

#[inline]
pub fn int_val(v: u64) -> i64 {
    (v as i64) >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_are_black() {
        for (sz, t) in [(0u64, 0u8), (1, 0), (3, STRING_TAG), (MAX_WOSIZE, 255)] {
            let h = make_header(sz, t);
            assert_eq!((wosize(h), tag(h)), (sz, t));
            assert!(is_black(h));
        }
        // A white header (what OCaml allocates) is not black.
        assert!(!is_black(5 << 10));
    }

    #[test]
    fn immediates() {
        assert_eq!(val_int(0), VAL_UNIT);
        assert_eq!(int_val(val_int(-42)), -42);
        assert!(!is_block(val_int(7)) && !is_block(0) && is_block(0x1000));
    }
}
