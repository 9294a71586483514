//! Model test: random alloc/free/rebuild sequences against a reference model
//! (a bitmap of pages and a map of live blocks). After every operation the
//! allocator must pass `check()` and agree with the model on the stats, the
//! live blocks and the free runs; alloc must succeed exactly when the model
//! has a free run long enough, and must take a run of minimal length among
//! those that fit (best fit: exact-size lists for small runs, treap lower
//! bound `(length, page)` for long ones, so the lowest such page for those).

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmpool::arena::SMALL_MAX;
use shmpool::{AllocState, Arena, Error, PageStats};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Alloc(u32, u16),
    /// Free the n-th live block (mod the count).
    Free(usize),
    /// Free whatever page this is (mod npages + 8): often not a block.
    FreeAt(u32),
    Rebuild,
}

fn size() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 1u32..=4,
        6 => 1u32..=32,
        2 => 1u32..=SMALL_MAX + 2,
        1 => 100u32..=700,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (size(), 0u16..5).prop_map(|(k, o)| Op::Alloc(k, o)),
        8 => any::<usize>().prop_map(Op::Free),
        1 => any::<u32>().prop_map(Op::FreeAt),
        1 => Just(Op::Rebuild),
    ]
}

struct Model {
    n: u32,
    used: Vec<bool>,
    live: BTreeMap<u32, (u32, u16)>,
}

impl Model {
    fn runs(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut p = 0;
        while p < self.n {
            if self.used[p as usize] {
                p += 1;
                continue;
            }
            let s = p;
            while p < self.n && !self.used[p as usize] {
                p += 1;
            }
            out.push((s, p - s));
        }
        out
    }

    fn stats(&self) -> PageStats {
        let runs = self.runs();
        PageStats {
            npages: self.n,
            free_pages: runs.iter().map(|r| r.1 as u64).sum(),
            largest_free_run: runs.iter().map(|r| r.1).max().unwrap_or(0),
            live_blocks: self.live.len() as u64,
        }
    }

    fn blocks(&self) -> Vec<(u32, u32, u16)> {
        self.live.iter().map(|(&p, &(l, o))| (p, l, o)).collect()
    }

    fn set(&mut self, p: u32, len: u32, v: bool) {
        for q in p..p + len {
            assert_ne!(self.used[q as usize], v);
            self.used[q as usize] = v;
        }
    }
}

fn agree(a: &Arena, m: &Model, what: &dyn Fn() -> String) -> Result<(), TestCaseError> {
    let v = a.check();
    prop_assert!(v.is_empty(), "{}: check: {:?}", what(), v);
    prop_assert_eq!(a.stats(), m.stats(), "{}: stats", what());
    prop_assert_eq!(a.live_blocks(), m.blocks(), "{}: live blocks", what());
    prop_assert_eq!(a.free_runs(), m.runs(), "{}: free runs", what());
    Ok(())
}

fn run(n: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut st = AllocState::new(n);
    let mut d = vec![0u64; n as usize];
    let mut a = Arena::new(&mut st, &mut d).unwrap();
    a.format();
    let mut m = Model {
        n,
        used: vec![false; n as usize],
        live: BTreeMap::new(),
    };
    agree(&a, &m, &|| "after format".into())?;
    for (i, op) in ops.iter().enumerate() {
        let what = || format!("op {i} {op:?} (n={n})");
        match *op {
            Op::Alloc(k, owner) => {
                let runs = m.runs();
                let best = runs.iter().filter(|r| r.1 >= k).map(|r| r.1).min();
                let before = (a.stats(), a.free_runs());
                match (a.alloc(k, owner), best) {
                    (Err(Error::OutOfMemory), None) => {
                        prop_assert_eq!((a.stats(), a.free_runs()), before, "{}", what());
                    }
                    (Ok(h), Some(best)) => {
                        // h is the head of a run of minimal fitting length;
                        // for a tree run, the lowest such head.
                        let Some(&(_, len)) = runs.iter().find(|r| r.0 == h) else {
                            return Err(TestCaseError::fail(format!(
                                "{}: page {h} heads no free run of the model",
                                what()
                            )));
                        };
                        prop_assert_eq!(len, best, "{}: not best fit", what());
                        if len > SMALL_MAX {
                            let lowest = runs.iter().find(|r| r.1 == len).unwrap().0;
                            prop_assert_eq!(h, lowest, "{}: treap tie", what());
                        }
                        m.set(h, k, true);
                        m.live.insert(h, (k, owner));
                    }
                    (r, best) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: alloc gave {r:?}, model best fit {best:?}",
                            what()
                        )))
                    }
                }
            }
            Op::Free(sel) => {
                if m.live.is_empty() {
                    continue;
                }
                let (&p, &(len, _)) = m.live.iter().nth(sel % m.live.len()).unwrap();
                prop_assert_eq!(a.free(p), Ok(len), "{}", what());
                m.set(p, len, false);
                m.live.remove(&p);
            }
            Op::FreeAt(x) => {
                let p = x % (n + 8);
                match m.live.get(&p).copied() {
                    Some((len, _)) => {
                        prop_assert_eq!(a.free(p), Ok(len), "{}", what());
                        m.set(p, len, false);
                        m.live.remove(&p);
                    }
                    None => {
                        let before = (a.stats(), a.free_runs(), a.live_blocks());
                        prop_assert_eq!(a.free(p), Err(Error::NotABlock), "{}", what());
                        prop_assert_eq!(a.size(p), Err(Error::NotABlock), "{}", what());
                        let after = (a.stats(), a.free_runs(), a.live_blocks());
                        prop_assert_eq!(after, before, "{}", what());
                    }
                }
            }
            Op::Rebuild => {
                let rep = a.rebuild();
                prop_assert_eq!(rep.live_blocks, m.live.len() as u64, "{}", what());
                prop_assert_eq!(rep.free_pages, m.stats().free_pages, "{}", what());
                prop_assert_eq!(rep.bad_alloc_words, 0, "{}", what());
            }
        }
        agree(&a, &m, &what)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// 200 cases x 600 ops = 120,000 checked operations, pools of 1..600 pages.
    #[test]
    fn allocator_matches_model(n in 1u32..=600, ops in prop::collection::vec(op(), 600)) {
        run(n, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Larger pools (deeper treaps), longer sequences: 24 x 2000 ops.
    #[test]
    fn allocator_matches_model_large(n in 600u32..=5000, ops in prop::collection::vec(op(), 2000)) {
        run(n, &ops)?;
    }
}
