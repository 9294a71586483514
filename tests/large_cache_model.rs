//! Model tests of the per-process caches through the public API, with large
//! blocks (rust/src/large_cache.rs: split, merge, refill with a spare run,
//! give-back, take-back on exhaustion and in `stats`), against a model that
//! knows only the live blocks.
//!
//! `large_cache_matches_model`: random sequences of alloc, free, bad frees
//! of addresses inside blocks (ghost words among them), `stats`,
//! `flush_cache` and `check` in one process. After each step the pool must
//! agree with the model: blocks never overlap and keep their size, an alloc
//! fails exactly when no gap between live blocks is long enough (the caches
//! are taken back first), `stats` gives exactly the free pages, the number
//! of live blocks and the longest gap, and `check` finds nothing wrong.
//!
//! `two_processes_match_model`: the same with a second process (a forked
//! helper run step by step through shared memory), so that each process's
//! large cache meets the other's frees (a block of up to 64 pages freed by
//! the other process goes to its owner's inbox, a longer one through the
//! pool lock), the other's take-backs when memory runs out, and `stats`
//! and `check` taken while the other holds cached runs: `free_bytes` must
//! count every cached page exactly once, `largest_free_bytes` must be a
//! size an alloc gets (and the longest gap once both caches are flushed).

mod common;

use common::{anon, fork_child, serial, Child};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmpool::{Error, Pool};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

// ----- two processes

/// One command at a time from the test to its helper process.
#[repr(C)]
struct Mailbox {
    /// Bumped by the test to post a command.
    seq: AtomicU64,
    /// Set to `seq` by the helper once the command is done.
    done: AtomicU64,
    op: AtomicU64,
    arg: AtomicU64,
    /// 0 ok, 1 `OutOfMemory`, 2 `NotABlock`, 3 anything else.
    status: AtomicU64,
    value: AtomicU64,
}

const H_ALLOC: u64 = 1;
const H_FREE: u64 = 2;
const H_FLUSH: u64 = 3;

fn code(e: Error) -> u64 {
    match e {
        Error::OutOfMemory => 1,
        Error::NotABlock => 2,
        _ => 3,
    }
}

/// The helper's loop: runs each posted command on its own `Pool` value
/// (its own owner slot: a forked process registers afresh).
fn helper(pool: &Pool, mb: &Mailbox) -> Result<(), String> {
    common::die_with_parent();
    let mut last = 0;
    let mut idle = Instant::now();
    loop {
        let seq = mb.seq.load(Ordering::Acquire);
        if seq == last {
            if idle.elapsed() > Duration::from_secs(60) {
                return Err("no command for 60 s".into());
            }
            std::thread::yield_now();
            continue;
        }
        let arg = mb.arg.load(Ordering::Relaxed);
        let r = match mb.op.load(Ordering::Relaxed) {
            H_ALLOC => pool.alloc(arg as usize).map(|o| o as u64),
            H_FREE => pool.free(arg as usize).map(|b| b as u64),
            H_FLUSH => pool.flush_cache().map(|()| 0),
            op => return Err(format!("bad op {op}")),
        };
        let (st, v) = match r {
            Ok(v) => (0, v),
            Err(e) => (code(e), 0),
        };
        mb.status.store(st, Ordering::Relaxed);
        mb.value.store(v, Ordering::Relaxed);
        mb.done.store(seq, Ordering::Release);
        last = seq;
        idle = Instant::now();
    }
}

/// Which process does a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Me,
    Helper,
}

#[derive(Debug, Clone)]
enum Op2 {
    Alloc(Who, u32),
    /// `Who` frees the n-th live block (mod the count), whoever owns it.
    Free(Who, usize),
    FreeInside(Who, usize, u32),
    Flush(Who),
    /// `stats` (by us): exact free pages and live blocks, and a
    /// `largest_free_bytes` we can allocate.
    Stats,
    /// Both caches flushed, then `stats`: the largest is the longest gap.
    FlushBothStats,
    Check,
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![Just(Who::Me), Just(Who::Helper)]
}

fn op2() -> impl Strategy<Value = Op2> {
    prop_oneof![
        10 => (who(), size()).prop_map(|(w, k)| Op2::Alloc(w, k)),
        9 => (who(), any::<usize>()).prop_map(|(w, j)| Op2::Free(w, j)),
        1 => (who(), any::<usize>(), any::<u32>()).prop_map(|(w, i, k)| Op2::FreeInside(w, i, k)),
        1 => who().prop_map(Op2::Flush),
        2 => Just(Op2::Stats),
        1 => Just(Op2::FlushBothStats),
        1 => Just(Op2::Check),
    ]
}

struct Helper<'a> {
    mb: &'a Mailbox,
    child: Child,
}

impl Helper<'_> {
    /// Runs `op(arg)` in the helper; `Ok(value)` or the error's code.
    fn call(&mut self, op: u64, arg: u64) -> Result<Result<u64, u64>, TestCaseError> {
        let mb = self.mb;
        mb.op.store(op, Ordering::Relaxed);
        mb.arg.store(arg, Ordering::Relaxed);
        let seq = mb.seq.load(Ordering::Relaxed) + 1;
        mb.seq.store(seq, Ordering::Release);
        let t0 = Instant::now();
        while mb.done.load(Ordering::Acquire) != seq {
            if t0.elapsed() > Duration::from_secs(20) || self.child.poll().is_some() {
                return Err(TestCaseError::fail(format!(
                    "helper did not answer command {op}({arg}): {}",
                    self.child
                        .poll()
                        .map_or("still running".into(), common::describe)
                )));
            }
            std::thread::yield_now();
        }
        Ok(match mb.status.load(Ordering::Relaxed) {
            0 => Ok(mb.value.load(Ordering::Relaxed)),
            c => Err(c),
        })
    }
}

/// The live blocks: first page -> (length, owner).
struct Model2 {
    n: u32,
    live: BTreeMap<u32, (u32, Who)>,
}

impl Model2 {
    fn as_model(&self) -> Model {
        Model {
            n: self.n,
            live: self.live.iter().map(|(&p, &(l, _))| (p, l)).collect(),
        }
    }
}

fn run2(n: u32, no_reserve: bool, ops: &[Op2]) -> Result<(), TestCaseError> {
    let _serial = serial();
    let mut pool = anon(n as usize);
    if no_reserve {
        // Our inboxes, which hold a few blocks at a time here, are taken
        // at the next miss: the drain, the chain and their meeting with
        // the large cache are in the model too (with the reserve of 65-187
        // pages, 0 drains in the 32 cases; 59 before the reserve).
        pool.set_inbox_reserve_pages(0);
    }
    let pg = pool.geometry().page_size;
    let base = pool.geometry().payload_offset;
    let page = |o: usize| ((o - base) / pg) as u32;
    let off = |p: u32| base + p as usize * pg;
    // SAFETY: Mailbox is atomics only (valid when zero).
    let mb: common::SharedMem<Mailbox> = unsafe { common::SharedMem::new() };
    let child = fork_child(|| helper(&pool, &mb));
    let mut h = Helper { mb: &mb, child };
    let mut m = Model2 {
        n,
        live: BTreeMap::new(),
    };
    let alloc =
        |h: &mut Helper, w: Who, bytes: usize| -> Result<Result<usize, u64>, TestCaseError> {
            Ok(match w {
                Who::Me => pool.alloc(bytes).map_err(code),
                Who::Helper => h.call(H_ALLOC, bytes as u64)?.map(|o| o as usize),
            })
        };
    let free = |h: &mut Helper, w: Who, o: usize| -> Result<Result<usize, u64>, TestCaseError> {
        Ok(match w {
            Who::Me => pool.free(o).map_err(code),
            Who::Helper => h.call(H_FREE, o as u64)?.map(|b| b as usize),
        })
    };
    let flush = |h: &mut Helper, w: Who| -> Result<(), TestCaseError> {
        match w {
            Who::Me => pool.flush_cache().unwrap(),
            Who::Helper => prop_assert_eq!(h.call(H_FLUSH, 0)?, Ok(0)),
        }
        Ok(())
    };
    // Exact free pages and live blocks; a largest free run that is no
    // longer than the longest gap and that we can allocate (at once freed).
    let stats = |m: &Model2, i: usize| -> Result<usize, TestCaseError> {
        let st = pool.stats();
        let mm = m.as_model();
        prop_assert_eq!(
            st.free_bytes as u64,
            (m.n as u64 - mm.used()) * pg as u64,
            "step {}: free",
            i
        );
        prop_assert_eq!(st.live_blocks, m.live.len() as u64, "step {}: live", i);
        prop_assert!(
            st.largest_free_bytes <= mm.longest_gap() as usize * pg,
            "step {}: largest {} pages, longest gap {}",
            i,
            st.largest_free_bytes / pg,
            mm.longest_gap()
        );
        if st.largest_free_bytes > 0 {
            let o = pool.alloc(st.largest_free_bytes);
            prop_assert!(
                o.is_ok(),
                "step {}: alloc of largest_free_bytes: {:?}",
                i,
                o
            );
            prop_assert_eq!(pool.free(o.unwrap()), Ok(st.largest_free_bytes));
        }
        Ok(st.largest_free_bytes / pg)
    };
    for (i, o) in ops.iter().enumerate() {
        match *o {
            Op2::Alloc(w, k) => match alloc(&mut h, w, k as usize * pg)? {
                Ok(a) => {
                    let p = page(a);
                    prop_assert!(p + k <= n, "step {}: block past the end", i);
                    prop_assert!(!m.as_model().overlaps(p, k), "step {}: {} overlaps", i, p);
                    prop_assert_eq!(pool.size(a), Ok(k as usize * pg));
                    m.live.insert(p, (k, w));
                }
                Err(1) => {
                    let gap = m.as_model().longest_gap();
                    prop_assert!(
                        gap < k,
                        "step {}: {:?} got no {} pages with a gap of {}",
                        i,
                        w,
                        k,
                        gap
                    );
                }
                Err(c) => return Err(TestCaseError::fail(format!("step {i}: error {c}"))),
            },
            Op2::Free(w, j) => {
                if m.live.is_empty() {
                    continue;
                }
                let (&p, &(l, _)) = m.live.iter().nth(j % m.live.len()).unwrap();
                prop_assert_eq!(free(&mut h, w, off(p))?, Ok(l as usize * pg), "step {}", i);
                prop_assert_eq!(free(&mut h, w, off(p))?, Err(2), "step {}: twice", i);
                m.live.remove(&p);
            }
            Op2::FreeInside(w, j, k) => {
                let Some((&p, &(l, _))) = m.live.iter().nth(j % m.live.len().max(1)) else {
                    continue;
                };
                if l < 2 {
                    continue;
                }
                let q = p + 1 + k % (l - 1);
                prop_assert_eq!(free(&mut h, w, off(q))?, Err(2), "step {}", i);
                prop_assert_eq!(pool.size(off(q)), Err(Error::NotABlock), "step {}", i);
                prop_assert_eq!(pool.size(off(p)), Ok(l as usize * pg), "step {}", i);
            }
            Op2::Flush(w) => flush(&mut h, w)?,
            Op2::Stats => {
                stats(&m, i)?;
            }
            Op2::FlushBothStats => {
                flush(&mut h, Who::Helper)?;
                let largest = stats(&m, i)?;
                prop_assert_eq!(largest as u32, m.as_model().longest_gap(), "step {}", i);
            }
            Op2::Check => prop_assert_eq!(pool.check(), Vec::<String>::new(), "step {}", i),
        }
    }
    prop_assert_eq!(pool.check(), Vec::<String>::new(), "at the end");
    stats(&m, ops.len())?;
    // Allocating the largest free run again and again gets every free page.
    let free_now = pool.stats().free_bytes;
    let mut got = Vec::new();
    loop {
        let s = pool.stats().largest_free_bytes;
        if s == 0 {
            break;
        }
        got.push((
            pool.alloc(s)
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?,
            s,
        ));
    }
    prop_assert_eq!(got.iter().map(|g| g.1).sum::<usize>(), free_now, "greedy");
    for (o, _) in got {
        pool.free(o).unwrap();
    }
    // Each frees its own blocks, and the other's: every path of free.
    for (&p, &(l, w)) in &m.live {
        let by = if p % 2 == 0 {
            w
        } else if w == Who::Me {
            Who::Helper
        } else {
            Who::Me
        };
        prop_assert_eq!(free(&mut h, by, off(p))?, Ok(l as usize * pg));
    }
    flush(&mut h, Who::Helper)?;
    let st = pool.stats();
    prop_assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
    prop_assert_eq!(st.largest_free_bytes, st.payload_bytes);
    prop_assert_eq!(pool.check(), Vec::<String>::new(), "emptied");
    h.child.kill();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// As `large_cache_matches_model`, with a second process.
    #[test]
    fn two_processes_match_model(
        n in 4200u32..=12000,
        no_reserve in any::<bool>(),
        ops in prop::collection::vec(op2(), 300),
    ) {
        run2(n, no_reserve, &ops)?;
    }
}
