//! Model test of heap contents (proptest): random sequences of stores of
//! new lists into the slots of a root array, clears, garbage (small and
//! chunk-sized), GCs and nested locks, checked after every step against a
//! plain Vec model and the heap's own invariants (`Heap::check`); at the
//! end, with every slot cleared, the heap is back to one chunk.

mod common;

use common::*;
use proptest::prelude::*;
use shmpool::heap::value::*;
use shmpool::heap::Heap;

const SLOTS: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Store(usize, i64, usize),
    Clear(usize),
    Garbage(usize),
    BigGarbage(usize),
    Gc,
    NestedStore(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SLOTS, -1000i64..1000, 0usize..300).prop_map(|(s, a, n)| Op::Store(s, a, n)),
        1 => (0..SLOTS).prop_map(Op::Clear),
        2 => (1usize..2000).prop_map(Op::Garbage),
        1 => (1usize..40_000).prop_map(Op::BigGarbage),
        1 => Just(Op::Gc),
        1 => (0..SLOTS, 0usize..50).prop_map(|(s, n)| Op::NestedStore(s, n)),
    ]
}

fn field(v: u64, i: u64) -> u64 {
    // SAFETY: reads fields of live values of a heap the test holds.
    unsafe { ((v + 8 * i) as *const u64).read_volatile() }
}

fn set_field(v: u64, i: u64, x: u64) {
    // SAFETY: writes a field of a live value, under the heap lock.
    unsafe { ((v + 8 * i) as *mut u64).write_volatile(x) }
}

fn build(h: &Heap, from: i64, n: usize) -> u64 {
    let mut l = VAL_UNIT;
    for k in (0..n as i64).rev() {
        let c = h.alloc(2, 0).unwrap();
        set_field(c, 0, val_int(from + k));
        set_field(c, 1, l);
        l = c;
    }
    l
}

fn read(mut l: u64) -> Vec<i64> {
    let mut v = Vec::new();
    while l != VAL_UNIT {
        v.push(int_val(field(l, 0)));
        l = field(l, 1);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn heap_contents_follow_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let pool = anon(4096);
        let before = pool.stats();
        let h = Heap::create(&pool, 2048).unwrap();
        let root = h.with_lock(|h| { let r = h.alloc(SLOTS, 0)?; h.set_root(r)?; Ok(r) }).unwrap();
        let mut model: Vec<Vec<i64>> = vec![Vec::new(); SLOTS];
        for o in &ops {
            h.with_lock(|h| {
                match *o {
                    Op::Store(s, a, n) => {
                        set_field(root, s as u64, build(h, a, n));
                        model[s] = (a..a + n as i64).collect();
                    }
                    Op::Clear(s) => {
                        set_field(root, s as u64, VAL_UNIT);
                        model[s].clear();
                    }
                    Op::Garbage(n) => { let _ = build(h, 0, n); }
                    Op::BigGarbage(w) => { h.alloc(w, STRING_TAG)?; }
                    Op::Gc => h.gc()?,
                    Op::NestedStore(s, n) => {
                        h.with_lock(|h| {
                            set_field(root, s as u64, build(h, 7, n));
                            h.gc()
                        })?;
                        model[s] = (7..7 + n as i64).collect();
                    }
                }
                Ok(())
            }).unwrap();
            for (s, m) in model.iter().enumerate() {
                prop_assert_eq!(&read(field(root, s as u64)), m, "slot {} after {:?}", s, o);
            }
            let v = h.check();
            prop_assert!(v.is_empty(), "after {:?}: {:?}", o, v);
        }
        h.gc().unwrap();
        let live: usize = model.iter().map(|m| m.len() * 3).sum::<usize>() + SLOTS + 1;
        prop_assert_eq!(h.stats().unwrap().live_words, live as u64);
        h.with_lock(|_| { for s in 0..SLOTS { set_field(root, s as u64, VAL_UNIT); } Ok(()) }).unwrap();
        h.gc().unwrap();
        let s = h.stats().unwrap();
        prop_assert_eq!((s.chunks, s.live_words), (1, SLOTS as u64 + 1));
        h.destroy().unwrap();
        prop_assert_eq!(pool.stats(), before);
    }
}
