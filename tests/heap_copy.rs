//! Copy-in (rust/src/heap/copy.rs) on source values built by hand in
//! private memory, laid out as OCaml lays them out: sharing, cycles,
//! strings, float arrays, forwards, atoms, int64 and bigarray custom
//! blocks, and refusals that change nothing.

mod common;

use common::*;
use shmpool::heap::value::*;
use shmpool::heap::{Heap, HeapError};
use std::ffi::c_char;

/// A private arena of source blocks.
struct Src {
    mem: Box<[u64]>,
    next: usize,
}

impl Src {
    fn new() -> Src {
        Src {
            mem: vec![0u64; 4096].into_boxed_slice(),
            next: 0,
        }
    }
    fn block(&mut self, tag: u8, fields: &[u64]) -> u64 {
        let at = self.next;
        self.mem[at] = (fields.len() as u64) << 10 | tag as u64; // white, as OCaml's
        self.mem[at + 1..at + 1 + fields.len()].copy_from_slice(fields);
        self.next += 1 + fields.len();
        &self.mem[at + 1] as *const u64 as u64
    }
    fn set(&mut self, v: u64, i: usize, x: u64) {
        let at = (v - self.mem.as_ptr() as u64) as usize / 8 + i;
        self.mem[at] = x;
    }
    fn contains(&self, a: u64) -> bool {
        let s = self.mem.as_ptr() as u64;
        a > s && a < s + 8 * self.mem.len() as u64
    }
}

fn field(v: u64, i: u64) -> u64 {
    // SAFETY: tests read fields of values they built or copied.
    unsafe { ((v + 8 * i) as *const u64).read() }
}

fn header(v: u64) -> u64 {
    field(v - 8, 0)
}

/// A `struct custom_operations` as far as copy-in reads it.
#[repr(C)]
struct Ops {
    identifier: *const c_char,
}

#[test]
fn copies_keep_sharing_cycles_and_contents() {
    let pool = anon(256);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    let shared = s.block(0, &[val_int(1), val_int(2)]);
    let pair = s.block(0, &[shared, shared]);
    let cyc = s.block(0, &[val_int(9), 0]);
    s.set(cyc, 0, cyc); // field 0 points to itself
    let string = s.block(STRING_TAG, &[u64::from_le_bytes(*b"hello\0\0\x02")]);
    let floats = s.block(DOUBLE_ARRAY_TAG, &[1.5f64.to_bits(), (-2.0f64).to_bits()]);
    let atom = s.block(0, &[]);
    let top = s.block(0, &[pair, cyc, string, floats, atom, val_int(-7)]);
    let is_value = |a: u64| s.contains(a);
    let c = h
        .with_lock(|h| {
            let c = h.copy_in(top, false, &is_value).unwrap();
            h.set_root(c)?;
            Ok(c)
        })
        .unwrap();
    assert!(!s.contains(c) && h.contains(c).unwrap());
    assert!(is_black(header(c)) && wosize(header(c)) == 6);
    let (p, cy, st, fl, at) = (
        field(c, 0),
        field(c, 1),
        field(c, 2),
        field(c, 3),
        field(c, 4),
    );
    assert_eq!(field(p, 0), field(p, 1), "sharing kept");
    assert_ne!(field(p, 0), shared);
    assert_eq!(field(field(p, 0), 1), val_int(2));
    assert_eq!(field(cy, 0), cy, "cycle kept");
    assert_eq!(field(st, 0).to_le_bytes(), *b"hello\0\0\x02");
    assert_eq!(tag(header(st)), STRING_TAG);
    assert_eq!(f64::from_bits(field(fl, 1)), -2.0);
    assert_eq!(at, atom, "atoms are kept");
    assert_eq!(field(c, 5), val_int(-7));
    h.gc().unwrap();
    // top 7 + pair 3 + shared 3 + cyc 3 + string 2 + floats 3 words
    assert_eq!(h.stats().unwrap().live_words, 7 + 3 + 3 + 3 + 2 + 3);
    assert!(h.check().is_empty());
    h.destroy().unwrap();
}

#[test]
fn forwards_are_followed_and_immediates_returned() {
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    let target = s.block(0, &[val_int(5)]);
    let fwd_block = s.block(FORWARD_TAG, &[target]);
    let fwd_int = s.block(FORWARD_TAG, &[val_int(3)]);
    let top = s.block(0, &[fwd_block, fwd_int]);
    let is_value = |a: u64| s.contains(a);
    h.with_lock(|h| {
        assert_eq!(h.copy_in(val_int(4), false, &is_value), Ok(val_int(4)));
        assert_eq!(h.copy_in(fwd_int, false, &is_value), Ok(val_int(3)));
        let c = h.copy_in(top, false, &is_value).unwrap();
        assert_eq!(tag(header(field(c, 0))), 0);
        assert_eq!(field(field(c, 0), 0), val_int(5));
        assert_eq!(field(c, 1), val_int(3));
        Ok(())
    })
    .unwrap();
    h.destroy().unwrap();
}

#[test]
fn refused_values_change_nothing() {
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    let ok = s.block(0, &[val_int(1)]);
    let ops = Ops {
        identifier: c"_chan".as_ptr(),
    };
    let cases = [
        ("closure", s.block(CLOSURE_TAG, &[0x1000, val_int(1)])),
        ("object", s.block(OBJECT_TAG, &[ok, val_int(1)])),
        ("lazy", s.block(LAZY_TAG, &[ok])),
        ("abstract", s.block(ABSTRACT_TAG, &[0])),
        (
            "custom block",
            s.block(CUSTOM_TAG, &[&ops as *const Ops as u64, 0]),
        ),
    ];
    let naked = 0x10_0000u64;
    let is_value = |a: u64| s.contains(a);
    let before = h.stats().unwrap();
    h.with_lock(|h| {
        for (what, v) in cases {
            // Deep inside a valid value too.
            let mut s2 = Src::new();
            let wrap = s2.block(0, &[ok, v]);
            let both = |a: u64| s.contains(a) || s2.contains(a);
            assert_eq!(
                h.copy_in(v, false, &is_value),
                Err(HeapError::Uncopyable(what))
            );
            assert_eq!(
                h.copy_in(wrap, false, &both),
                Err(HeapError::Uncopyable(what))
            );
        }
        assert_eq!(
            h.copy_in(naked, false, &is_value),
            Err(HeapError::Uncopyable("pointer outside OCaml memory"))
        );
        Ok(())
    })
    .unwrap();
    assert_eq!(h.stats().unwrap(), before);
    h.destroy().unwrap();
}

#[test]
fn custom_ints_and_bigarrays_are_copied() {
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    let ops_j = Ops {
        identifier: c"_j".as_ptr(),
    };
    let ops_ba = Ops {
        identifier: c"_bigarr02".as_ptr(),
    };
    let i64v = s.block(CUSTOM_TAG, &[&ops_j as *const Ops as u64, 0x1234_5678_9abc]);
    let data: Box<[i64]> = vec![10, -20, 30].into_boxed_slice();
    // kind int64 (7), layout C, CAML_BA_MANAGED (0x200); proxy non-null.
    let ba = s.block(
        CUSTOM_TAG,
        &[
            &ops_ba as *const Ops as u64,
            data.as_ptr() as u64,
            1,
            7 | 0x200,
            0xdead0,
            3,
        ],
    );
    let top = s.block(0, &[i64v, ba]);
    let is_value = |a: u64| s.contains(a);
    h.with_lock(|h| {
        let c = h.copy_in(top, false, &is_value).unwrap();
        let (ci, cb) = (field(c, 0), field(c, 1));
        assert_eq!(field(ci, 0), &ops_j as *const Ops as u64);
        assert_eq!(field(ci, 1), 0x1234_5678_9abc);
        assert_eq!(field(cb, 0), &ops_ba as *const Ops as u64);
        let d = field(cb, 1);
        assert!(
            d > cb && d < cb + 8 * wosize(header(cb)),
            "data inside the block"
        );
        assert_eq!((field(cb, 2), field(cb, 3), field(cb, 4)), (1, 7, 0));
        assert_eq!(field(cb, 5), 3);
        // SAFETY: 3 int64 at d, inside the copied block.
        let got = unsafe { std::slice::from_raw_parts(d as *const i64, 3) };
        assert_eq!(got, &[10, -20, 30]);
        h.set_root(c)
    })
    .unwrap();
    h.gc().unwrap();
    assert!(h.check().is_empty());
    h.destroy().unwrap();
}

#[test]
fn sharing_mode_keeps_values_of_this_heap() {
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    let inner = s.block(0, &[val_int(1)]);
    let is_value = |a: u64| s.contains(a);
    let outer_src = |x: u64, s: &mut Src| s.block(0, &[x]);
    h.with_lock(|h| {
        let c = h.copy_in(inner, false, &is_value).unwrap();
        // The heap's own value is "OCaml memory" for the validator too.
        let mut s2 = Src::new();
        let o = outer_src(c, &mut s2);
        let ok = |a: u64| s2.contains(a) || h.contains(a).unwrap_or(false);
        let shared = h.copy_in(o, true, &ok).unwrap();
        assert_eq!(field(shared, 0), c, "add_immutable shares");
        let copied = h.copy_in(o, false, &ok).unwrap();
        assert_ne!(field(copied, 0), c, "add copies");
        Ok(())
    })
    .unwrap();
    h.destroy().unwrap();
}

#[test]
fn large_graphs_keep_sharing_past_the_linear_lookup() {
    let pool = anon(256);
    let h = Heap::create(&pool, 4096).unwrap();
    let mut s = Src::new();
    // 100 cells [i; next]; cell 99's next is cell 30 (a cycle), and a
    // tuple points to cells 0 and 70 (sharing across the whole graph).
    let cells: Vec<u64> = (0..100)
        .map(|i| s.block(0, &[val_int(i), VAL_UNIT]))
        .collect();
    for i in 0..99 {
        s.set(cells[i], 1, cells[i + 1]);
    }
    s.set(cells[99], 1, cells[30]);
    let top = s.block(0, &[cells[0], cells[70]]);
    let is_value = |a: u64| s.contains(a);
    h.with_lock(|h| {
        let c = h.copy_in(top, false, &is_value).unwrap();
        let mut cur = field(c, 0);
        let mut seen = Vec::new();
        for i in 0..100 {
            assert_eq!(int_val(field(cur, 0)), i);
            seen.push(cur);
            cur = field(cur, 1);
        }
        assert_eq!(cur, seen[30], "cycle kept");
        assert_eq!(field(c, 1), seen[70], "sharing kept");
        h.set_root(c)
    })
    .unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().live_words, 3 + 100 * 3);
    h.destroy().unwrap();
}
