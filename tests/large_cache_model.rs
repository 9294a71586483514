//! Model test of the per-process caches through the public API, with large
//! blocks (rust/src/large_cache.rs: split, merge, refill with a spare run,
//! give-back, take-back on exhaustion and in `stats`): random sequences of
//! alloc, free, bad frees of addresses inside blocks (ghost words among
//! them), `stats`, `flush_cache` and `check` in one process, against a
//! model that knows only the live blocks. After each step the pool must
//! agree with the model: blocks never overlap and keep their size, an alloc
//! fails exactly when no gap between live blocks is long enough (the caches
//! are taken back first), `stats` gives exactly the free pages, the number
//! of live blocks and the longest gap, and `check` finds nothing wrong.

mod common;

use common::anon;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmpool::{Error, Pool};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Alloc(u32),
    /// Free the n-th live block (mod the count).
    Free(usize),
    /// Free an address inside the n-th live block (page `k` mod its length,
    /// not its first): never a block.
    FreeInside(usize, u32),
    Stats,
    Flush,
    Check,
}

fn size() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 65u32..=300,
        2 => 1u32..=64,
        1 => 300u32..=3000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => size().prop_map(Op::Alloc),
        9 => any::<usize>().prop_map(Op::Free),
        1 => (any::<usize>(), any::<u32>()).prop_map(|(i, k)| Op::FreeInside(i, k)),
        1 => Just(Op::Stats),
        1 => Just(Op::Flush),
        1 => Just(Op::Check),
    ]
}

/// The live blocks: first page -> length.
struct Model {
    n: u32,
    live: BTreeMap<u32, u32>,
}

impl Model {
    fn used(&self) -> u64 {
        self.live.values().map(|&l| l as u64).sum()
    }

    /// The longest run of pages no live block covers.
    fn longest_gap(&self) -> u32 {
        let mut best = 0;
        let mut at = 0;
        for (&p, &l) in &self.live {
            best = best.max(p - at);
            at = p + l;
        }
        best.max(self.n - at)
    }

    fn overlaps(&self, p: u32, l: u32) -> bool {
        let before = self.live.range(..p + l).next_back();
        before.is_some_and(|(&q, &m)| q + m > p)
    }
}

fn run(n: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let pool = anon(n as usize);
    let pg = pool.geometry().page_size;
    let base = pool.geometry().payload_offset;
    let page = |o: usize| ((o - base) / pg) as u32;
    let off = |p: u32| base + p as usize * pg;
    let mut m = Model {
        n,
        live: BTreeMap::new(),
    };
    let verify_stats = |pool: &Pool, m: &Model, i: usize| -> Result<(), TestCaseError> {
        let st = pool.stats();
        prop_assert_eq!(
            st.free_bytes as u64,
            (m.n as u64 - m.used()) * pg as u64,
            "step {}: free",
            i
        );
        prop_assert_eq!(st.live_blocks, m.live.len() as u64, "step {}: live", i);
        prop_assert_eq!(
            st.largest_free_bytes,
            m.longest_gap() as usize * pg,
            "step {}: largest",
            i
        );
        Ok(())
    };
    for (i, o) in ops.iter().enumerate() {
        match *o {
            Op::Alloc(k) => match pool.alloc(k as usize * pg) {
                Ok(a) => {
                    let p = page(a);
                    prop_assert!(p + k <= n, "step {}: block past the end", i);
                    prop_assert!(!m.overlaps(p, k), "step {}: {} overlaps", i, p);
                    prop_assert_eq!(pool.size(a), Ok(k as usize * pg));
                    m.live.insert(p, k);
                }
                Err(Error::OutOfMemory) => {
                    prop_assert!(
                        m.longest_gap() < k,
                        "step {}: no {} pages with a gap of {}",
                        i,
                        k,
                        m.longest_gap()
                    );
                }
                Err(e) => return Err(TestCaseError::fail(format!("step {i}: {e:?}"))),
            },
            Op::Free(j) => {
                if m.live.is_empty() {
                    continue;
                }
                let (&p, &l) = m.live.iter().nth(j % m.live.len()).unwrap();
                prop_assert_eq!(pool.free(off(p)), Ok(l as usize * pg), "step {}", i);
                prop_assert_eq!(pool.free(off(p)), Err(Error::NotABlock), "step {}", i);
                m.live.remove(&p);
            }
            Op::FreeInside(j, k) => {
                let Some((&p, &l)) = m.live.iter().nth(j % m.live.len().max(1)) else {
                    continue;
                };
                if l < 2 {
                    continue;
                }
                let q = p + 1 + k % (l - 1);
                prop_assert_eq!(pool.free(off(q)), Err(Error::NotABlock), "step {}", i);
                prop_assert_eq!(pool.size(off(q)), Err(Error::NotABlock), "step {}", i);
                prop_assert_eq!(pool.size(off(p)), Ok(l as usize * pg), "step {}", i);
            }
            Op::Stats => verify_stats(&pool, &m, i)?,
            Op::Flush => pool.flush_cache().unwrap(),
            Op::Check => prop_assert_eq!(pool.check(), Vec::<String>::new(), "step {}", i),
        }
    }
    prop_assert_eq!(pool.check(), Vec::<String>::new(), "at the end");
    verify_stats(&pool, &m, ops.len())?;
    for (&p, &l) in &m.live {
        prop_assert_eq!(pool.free(off(p)), Ok(l as usize * pg));
    }
    let st = pool.stats();
    prop_assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
    prop_assert_eq!(st.largest_free_bytes, st.payload_bytes);
    prop_assert_eq!(pool.check(), Vec::<String>::new(), "emptied");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Pools of 4200 pages or more: a process caches a 16th, so its spare
    /// runs are longer than 64 pages.
    #[test]
    fn large_cache_matches_model(n in 4200u32..=12000, ops in prop::collection::vec(op(), 400)) {
        run(n, &ops)?;
    }
}
