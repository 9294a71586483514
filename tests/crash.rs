//! Crash safety: a process killed while it holds the pool lock, at every
//! crash point of alloc and free and at random moments, leaves a pool that
//! the next locker repairs (one recovery), that passes `check()`, and from
//! which `reclaim_dead()` returns exactly the dead process's pages.
//!
//! A process frees its own blocks of up to `CACHE_CLASSES` pages into its
//! per-process cache, without the lock and without reaching the crash
//! points; so the blocks freed at a crash point here are larger than that.
#![cfg(feature = "crash-points")]

mod common;

use common::*;
use shmpool::crashpoint::{self, CrashPoint, ALL};
use shmpool::pool::CACHE_CLASSES;
use shmpool::{Error, Pool};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const NPAGES: usize = 2048;

/// A pool whose processes (this one and children forked later) do not use
/// their per-process cache: every alloc and free takes the locked path, so
/// it reaches the crash points.
fn anon_uncached(pages: usize) -> Pool {
    let p = anon(pages);
    p.set_caching(false).unwrap();
    p
}

fn me() -> i32 {
    std::process::id() as i32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Alloc,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing allocated: alloc splits the one tree run, free merges back.
    Empty,
    /// Only tree runs: alloc splits one and files a tree remainder; free
    /// coalesces a block with tree runs on both sides.
    Tree,
    /// Small runs: alloc takes a small class and files a small remainder;
    /// free coalesces with small runs on both sides.
    Small,
}

/// Whether an `op` passes through crash point `p`.
fn reached(p: CrashPoint, op: Op) -> bool {
    use CrashPoint::*;
    match p {
        Locked | BeforeUnlock => true,
        AllocUnlinked | AllocCommitted | AllocRemainderFiled => op == Op::Alloc,
        FreeCommitted | FreeNeighboursUnlinked | FreeFiled => op == Op::Free,
        // Only with caching on (tests/large_cache.rs); these pools run
        // uncached.
        AllocSpareCached | LargeScrubbing | LargeGiveBack | TakeBackFreed => false,
        // Not in ALL: reached without the pool lock.
        FreeLoaded | CachePushLocked | InboxPushLocked | InboxPushCommitted | InboxDrainMoving
        | InboxPushLinked | ChainTaking => false,
        LargeSplitTailWritten | LargeSplitCommitted | LargeMergeCommitted => false,
        // The shared heaps' points (tests/heap.rs), never in a pool op.
        HeapCreateFormatted
        | HeapCreateBeforeDisown
        | HeapAllocSplit
        | HeapCopyHalfDone
        | HeapRootStored
        | HeapMidMark
        | HeapMidSweep
        | HeapChunkDisowned
        | HeapChunkAppended
        | HeapChunkEntryMoved
        | HeapChunkRemoved
        | HeapPinWritten
        | HeapPinRemoved
        | HeapMidRecovery
        | HeapDestroyCommitted
        | HeapDestroyChunkForgotten
        | HeapDestroyChunksFreed
        | HeapDestroyUnlocked => false,
    }
}

/// Whether the operation's one commit write has happened at `p`.
fn committed(p: CrashPoint, op: Op) -> bool {
    use CrashPoint::*;
    !matches!((p, op), (Locked, _) | (AllocUnlinked, Op::Alloc))
}

/// What the child reports before it arms the crash point.
#[repr(C)]
struct Report {
    ready: AtomicU32,
    pre_pages: AtomicU64,
    pre_blocks: AtomicU64,
    op_pages: AtomicU64,
}

/// The parent's part of a state: blocks it keeps (stamped) and blocks it
/// hands to the child to free.
struct Setup {
    keep: Vec<(usize, usize)>,
    give: Vec<usize>,
}

fn setup(pool: &Pool, state: State, op: Op) -> Setup {
    let pg = pool.geometry().page_size;
    let layout = |sizes: &[usize], free: &[usize], give: &[usize]| {
        let offs: Vec<usize> = sizes.iter().map(|&n| pool.alloc(n * pg).unwrap()).collect();
        for &i in free {
            pool.free(offs[i]).unwrap();
        }
        let keep: Vec<(usize, usize)> = (0..sizes.len())
            .filter(|i| !free.contains(i) && !give.contains(i))
            .map(|i| (offs[i], sizes[i] * pg))
            .collect();
        for &(o, b) in &keep {
            stamp(pool, o, b, 0xC0FFEE00 + o as u64);
        }
        // Small blocks freed above sit in this process's cache: give them
        // back so that the holes are free runs.
        pool.flush_cache().unwrap();
        Setup {
            keep,
            give: give.iter().map(|&i| offs[i]).collect(),
        }
    };
    match (state, op) {
        (State::Empty, _) => layout(&[], &[], &[]),
        // Tree runs of 300, 200, 250 and the tail.
        (State::Tree, Op::Alloc) => layout(&[300, 1, 200, 1, 250, 1], &[0, 2, 4], &[]),
        // A hole the child fills, between two blocks it then frees.
        (State::Tree, Op::Free) => layout(&[300, TREE_X, 250, 1], &[1], &[0, 2]),
        // Small runs of 5, 3 and 8.
        (State::Small, Op::Alloc) => layout(&[5, 1, 3, 1, 8, 1], &[0, 2, 4], &[]),
        // A hole between blocks of 3 and 4 that the child frees.
        (State::Small, Op::Free) => layout(&[3, SMALL_X, 4, 1], &[1], &[0, 2]),
    }
}

/// Sizes of the blocks freed at a crash point: past the per-process cache.
const EMPTY_X: usize = CACHE_CLASSES as usize + 12;
const TREE_X: usize = CACHE_CLASSES as usize + 12;
const SMALL_X: usize = CACHE_CLASSES as usize + 2;

/// The child: builds its part of the state, reports, arms `point`, runs
/// the operation. Reaching the end means the point was never hit.
fn child(
    pool: &Pool,
    state: State,
    op: Op,
    point: CrashPoint,
    give: &[usize],
    r: &Report,
) -> Result<(), String> {
    let pg = pool.geometry().page_size;
    let e = |what: &'static str| move |e: Error| format!("{what}: {e}");
    let (mut pre_pages, mut pre_blocks) = (0u64, 0u64);
    let mut hold = |pages: usize| -> Result<usize, String> {
        let o = pool.alloc(pages * pg).map_err(e("alloc"))?;
        pre_pages += pages as u64;
        pre_blocks += 1;
        Ok(o)
    };
    let (target, op_pages) = match (state, op) {
        (State::Empty, Op::Alloc) => {
            // Register this process, leave the pool empty (a block too
            // large for the cache).
            let o = pool.alloc(EMPTY_X * pg).map_err(e("alloc"))?;
            pool.free(o).map_err(e("free"))?;
            (0, 3)
        }
        (State::Empty, Op::Free) => (hold(EMPTY_X)?, EMPTY_X),
        (State::Tree, Op::Alloc) => {
            hold(1)?;
            hold(7)?;
            (0, 10)
        }
        (State::Small, Op::Alloc) => {
            hold(1)?;
            (0, 4)
        }
        (State::Tree, Op::Free) | (State::Small, Op::Free) => {
            let n = if state == State::Tree {
                TREE_X
            } else {
                SMALL_X
            };
            let x = hold(n)?;
            hold(2)?;
            for &g in give {
                pool.free(g).map_err(e("free given"))?;
            }
            (x, n)
        }
    };
    r.pre_pages.store(pre_pages, Ordering::SeqCst);
    r.pre_blocks.store(pre_blocks, Ordering::SeqCst);
    r.op_pages.store(op_pages as u64, Ordering::SeqCst);
    r.ready.store(1, Ordering::SeqCst);
    crashpoint::arm(Some(point));
    let res = match op {
        Op::Alloc => pool.alloc(op_pages * pg).map(|_| ()),
        Op::Free => pool.free(target).map(|_| ()),
    };
    crashpoint::arm(None);
    Err(format!(
        "crash point {point:?} not reached by {op:?} ({res:?})"
    ))
}

fn one_crash(state: State, op: Op, point: CrashPoint) {
    let what = format!("{state:?} {op:?} killed at {point:?}");
    let pool = anon_uncached(NPAGES);
    let pg = pool.geometry().page_size;
    let s = setup(&pool, state, op);
    // SAFETY: Report is atomics only.
    let r: SharedMem<Report> = unsafe { SharedMem::new() };
    let rec0 = pool.stats().recoveries;
    let mut c = fork_child(|| child(&pool, state, op, point, &s.give, &r));
    c.wait_stopped(T).unwrap_or_else(|e| panic!("{what}: {e}"));
    let st = c.kill();
    assert!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "{what}: {}",
        describe(st)
    );
    assert_eq!(r.ready.load(Ordering::SeqCst), 1, "{what}");
    let (pre_p, pre_b, op_p) = (
        r.pre_pages.load(Ordering::SeqCst),
        r.pre_blocks.load(Ordering::SeqCst),
        r.op_pages.load(Ordering::SeqCst),
    );
    let (want_p, want_b) = match (op, committed(point, op)) {
        (_, false) => (pre_p, pre_b),
        (Op::Alloc, true) => (pre_p + op_p, pre_b + 1),
        (Op::Free, true) => (pre_p - op_p, pre_b - 1),
    };

    // The first operation after the death finds the lock abandoned and
    // rebuilds: exactly one recovery.
    let stats = pool.stats();
    assert_eq!(stats.recoveries, rec0 + 1, "{what}: recoveries");
    let v = pool.check();
    assert!(v.is_empty(), "{what}: check: {v:#?}");
    let kept: usize = s.keep.iter().map(|k| k.1).sum();
    assert_eq!(
        stats.free_bytes,
        stats.payload_bytes - kept - want_p as usize * pg,
        "{what}: free bytes"
    );
    assert_eq!(
        stats.live_blocks,
        s.keep.len() as u64 + want_b,
        "{what}: live blocks"
    );
    let owners = pool.owners().unwrap();
    if let Some(o) = owners.iter().find(|o| o.pid == c.pid) {
        assert!(!o.alive, "{what}");
        assert_eq!((o.pages, o.blocks), (want_p, want_b), "{what}: owners()");
    } else {
        assert_eq!(want_p, 0, "{what}: child not in owners()");
    }

    let got = pool.reclaim_dead().unwrap();
    assert_eq!(
        (got.blocks, got.pages),
        (want_b, want_p),
        "{what}: reclaim_dead"
    );
    assert!(got.owners.iter().all(|&(pid, _)| pid == c.pid), "{what}");
    let after = pool.stats();
    assert_eq!(after.free_bytes, after.payload_bytes - kept, "{what}");
    assert_eq!(after.recoveries, rec0 + 1, "{what}: a second recovery");
    assert!(pool.check().is_empty(), "{what}");
    // The parent's blocks are intact; the pool works normally.
    for &(o, b) in &s.keep {
        assert_eq!(pool.size(o), Ok(b), "{what}");
        assert!(stamped(&pool, o, b, 0xC0FFEE00 + o as u64), "{what}: stamp");
        assert_eq!(pool.owner_of(o), Ok(me()));
    }
    let big = pool.alloc(after.largest_free_bytes).unwrap();
    pool.free(big).unwrap();
    for &(o, _) in &s.keep {
        pool.free(o).unwrap();
    }
    let end = pool.stats();
    assert_eq!(
        (end.free_bytes, end.largest_free_bytes),
        (end.payload_bytes, end.payload_bytes)
    );
    assert!(pool.check().is_empty(), "{what}");
}

#[test]
fn killed_at_every_crash_point() {
    let _serial = serial();
    let _w = Watchdog::new("killed_at_every_crash_point", 60);
    let mut n = 0;
    for point in ALL {
        for op in [Op::Alloc, Op::Free] {
            if !reached(point, op) {
                continue;
            }
            for state in [State::Empty, State::Tree, State::Small] {
                one_crash(state, op, point);
                n += 1;
            }
        }
    }
    // 8 points: Locked and BeforeUnlock with both ops, 3 alloc-only and
    // 3 free-only points, each in 3 states.
    assert_eq!(n, (2 * 2 + 3 + 3) * 3);
}

#[test]
fn a_crash_point_is_reached_only_where_expected() {
    let _serial = serial();
    // An alloc never passes the free points (and vice versa): the child
    // completes the operation and says so.
    let _w = Watchdog::new("crash_point_not_reached", 30);
    for (point, op) in [
        (CrashPoint::FreeCommitted, Op::Alloc),
        (CrashPoint::AllocCommitted, Op::Free),
    ] {
        let pool = anon_uncached(NPAGES);
        let s = setup(&pool, State::Empty, op);
        // SAFETY: Report is atomics only.
        let r: SharedMem<Report> = unsafe { SharedMem::new() };
        let mut c = fork_child(
            || match child(&pool, State::Empty, op, point, &s.give, &r) {
                Err(m) if m.contains("not reached") => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        c.wait_ok(T).unwrap();
        assert_eq!(pool.stats().recoveries, 0);
        assert!(pool.check().is_empty());
    }
}

// ----- random-moment kills

const SLOTS: usize = 32;
const ALLOC_FLAG: u64 = 1 << 40;
const FREE_FLAG: u64 = 1 << 41;

/// A worker's record of what it holds, kept in shared memory so that the
/// parent can read it after the worker's death.
#[repr(C)]
struct Journal {
    ops: AtomicU64,
    /// 0, or ALLOC_FLAG|pages / FREE_FLAG|pages of the operation under way.
    inflight: AtomicU64,
    offs: [AtomicU64; SLOTS],
    pages: [AtomicU64; SLOTS],
    stop: AtomicU32,
}

impl Journal {
    fn recorded(&self) -> u64 {
        self.pages.iter().map(|p| p.load(Ordering::SeqCst)).sum()
    }
}

/// Mostly sizes past the per-process cache, so that most operations take
/// the lock; some small (cached) ones and some long (tree) runs.
fn size(rng: &mut Rng) -> usize {
    match rng.below(16) {
        0..=1 => 128 + rng.below(80) as usize,
        2..=11 => CACHE_CLASSES as usize + 1 + rng.below(32) as usize,
        _ => 1 + rng.below(4) as usize,
    }
}

/// Random alloc/free forever (until `stop`), journaling each step and
/// checking its own stamps (on every page, or with `light` on the first
/// page only, so that a victim spends its time in the pool's operations
/// rather than in page faults). On `stop` frees everything it holds.
fn worker(pool: &Pool, j: &Journal, seed: u64, light: bool) -> Result<(), String> {
    let pg = pool.geometry().page_size;
    let span = |k: usize| if light { pg } else { k * pg };
    let pid = me() as u64;
    let word = |i: usize| pid << 32 | i as u64;
    let mut rng = Rng(seed);
    while j.stop.load(Ordering::Relaxed) == 0 {
        let i = rng.below(SLOTS as u64) as usize;
        let k = j.pages[i].load(Ordering::SeqCst) as usize;
        if k == 0 {
            let n = size(&mut rng);
            j.inflight.store(ALLOC_FLAG | n as u64, Ordering::SeqCst);
            match pool.alloc(n * pg) {
                Ok(o) => {
                    mark(pool, o, span(n), word(i));
                    j.offs[i].store(o as u64, Ordering::SeqCst);
                    j.pages[i].store(n as u64, Ordering::SeqCst);
                }
                Err(Error::OutOfMemory) => {}
                Err(e) => return Err(format!("alloc: {e}")),
            }
        } else {
            let o = j.offs[i].load(Ordering::SeqCst) as usize;
            if !marked(pool, o, span(k), word(i)) {
                return Err(format!("block {o:#x} of {k} pages was overwritten"));
            }
            j.inflight.store(FREE_FLAG | k as u64, Ordering::SeqCst);
            match pool.free(o) {
                Ok(b) if b == k * pg => {}
                r => return Err(format!("free({o:#x}) of {k} pages: {r:?}")),
            }
            j.pages[i].store(0, Ordering::SeqCst);
        }
        j.inflight.store(0, Ordering::SeqCst);
        j.ops.fetch_add(1, Ordering::SeqCst);
    }
    for i in 0..SLOTS {
        let k = j.pages[i].load(Ordering::SeqCst) as usize;
        if k > 0 {
            let o = j.offs[i].load(Ordering::SeqCst) as usize;
            if !marked(pool, o, span(k), word(i)) {
                return Err(format!("block {o:#x} was overwritten"));
            }
            pool.free(o).map_err(|e| format!("final free: {e}"))?;
        }
    }
    Ok(())
}

/// Trials of `killed_at_random_moments`: at least `MIN_TRIALS`, and on
/// until `MIN_RECOVERIES` victims died holding the lock (about one trial
/// in six does), but never more than `MAX_TRIALS`: how much is tested is
/// counted, not timed, so a slow machine tests as much as a fast one.
const MIN_TRIALS: u32 = 200;
const MIN_RECOVERIES: u32 = 10;
const MAX_TRIALS: u32 = 3000;

#[test]
fn killed_at_random_moments() {
    let _serial = serial();
    let _w = Watchdog::new("killed_at_random_moments", 300);
    let t0 = Instant::now();
    let pool = anon(8192);
    let pg = pool.geometry().page_size;
    // The parent's own blocks must survive every trial.
    let keep: Vec<(usize, usize)> = [3usize, 150, 1]
        .iter()
        .map(|&n| {
            let o = pool.alloc(n * pg).unwrap();
            stamp(&pool, o, n * pg, 0xFEED_0000 + o as u64);
            (o, n * pg)
        })
        .collect();
    let initial = pool.stats();
    // A survivor works through all the trials: its lock acquisitions race
    // with the victims' deaths (it may be the one that recovers).
    // SAFETY: Journal is atomics only.
    let sj: SharedMem<Journal> = unsafe { SharedMem::new() };
    let mut survivor = fork_child(|| worker(&pool, &sj, 0x5u64, false));
    let mut rng = Rng(0xC0DE);
    let mut recoveries = initial.recoveries;
    let (mut trials, mut with_recovery, mut inflight_kills) = (0u32, 0u32, 0u32);
    while trials < MIN_TRIALS || (with_recovery < MIN_RECOVERIES && trials < MAX_TRIALS) {
        trials += 1;
        // SAFETY: Journal is atomics only.
        let j: SharedMem<Journal> = unsafe { SharedMem::new() };
        let seed = rng.next();
        let mut victim = fork_child(|| worker(&pool, &j, seed, true));
        let target = rng.below(400);
        // Judged by progress, not by time: the victim fails only if it
        // completes no operation for T (on a starved machine its 400 ops
        // may take longer than T in all, and that is no deadlock).
        let (mut last, mut since, mut spins) = (u64::MAX, Instant::now(), 0u32);
        let stalled = loop {
            let ops = j.ops.load(Ordering::SeqCst);
            if ops >= target || victim.poll().is_some() {
                break None;
            }
            if ops != last {
                (last, since) = (ops, Instant::now());
            } else if since.elapsed() > T {
                break Some(ops);
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        };
        if let Some(ops) = stalled {
            let inflight = j.inflight.load(Ordering::SeqCst);
            let first = victim.report();
            std::thread::sleep(Duration::from_secs(5));
            let later = j.ops.load(Ordering::SeqCst);
            panic!(
                "trial {trials}: victim made no progress (deadlock?) for {T:?}: ops {ops} of \
                 {target}, inflight {inflight:#x}, {later} ops 5 s later; victim:\n{first}\n\
                 survivor:\n{}",
                survivor.report()
            )
        }
        if rng.below(2) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(300)));
        }
        let st = victim.kill();
        assert!(
            libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
            "trial {trials}: victim ended by itself: {}",
            describe(st)
        );
        assert!(
            survivor.poll().is_none(),
            "trial {trials}: the survivor ended"
        );

        let rec = pool.stats().recoveries;
        assert!(
            rec == recoveries || rec == recoveries + 1,
            "trial {trials}: {recoveries} -> {rec}"
        );
        if rec > recoveries {
            with_recovery += 1;
        }
        recoveries = rec;
        // Exact even with the survivor flipping cache flags meanwhile (it
        // does so under its slot lock, which check() takes).
        let v = pool.check();
        assert!(v.is_empty(), "trial {trials}: check: {v:#?}");

        // What the victim held: its journal, give or take the operation
        // under way.
        let recorded = j.recorded();
        let inflight = j.inflight.load(Ordering::SeqCst);
        let k = inflight & 0xFFFF_FFFF;
        let mut allowed = vec![recorded];
        if inflight & ALLOC_FLAG != 0 {
            allowed.push(recorded + k);
        } else if inflight & FREE_FLAG != 0 {
            allowed.push(recorded - k);
        }
        if inflight != 0 {
            inflight_kills += 1;
        }
        let owned = pool
            .owners()
            .unwrap()
            .iter()
            .find(|o| o.pid == victim.pid)
            .map_or(0, |o| o.pages);
        assert!(
            allowed.contains(&owned),
            "trial {trials}: victim owns {owned}, journal says {allowed:?}"
        );
        let got = pool.reclaim_dead().unwrap();
        assert_eq!(got.pages, owned, "trial {trials}: reclaim_dead");
        assert!(
            got.owners.iter().all(|&(pid, _)| pid == victim.pid),
            "trial {trials}: {got:?}"
        );
        assert!(
            pool.owners().unwrap().iter().all(|o| o.alive),
            "trial {trials}: a dead owner is left"
        );
    }
    // Stop the survivor: it checks and frees all it holds.
    sj.stop.store(1, Ordering::SeqCst);
    survivor.wait_ok(T).unwrap();
    assert!(sj.ops.load(Ordering::SeqCst) > 0);
    // It freed all it held; its cache (free already) goes back with its slot.
    let r = pool.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (0, 0));
    let v = pool.check();
    assert!(v.is_empty(), "after all trials: {v:#?}");
    let end = pool.stats();
    assert_eq!(
        (end.free_bytes, end.largest_free_bytes, end.live_blocks),
        (
            initial.free_bytes,
            initial.largest_free_bytes,
            initial.live_blocks
        ),
        "pages leaked over {trials} trials"
    );
    assert_eq!(end.recoveries, recoveries);
    assert!(pool.check().is_empty());
    for &(o, b) in &keep {
        assert!(stamped(&pool, o, b, 0xFEED_0000 + o as u64));
        pool.free(o).unwrap();
    }
    assert!(
        with_recovery >= MIN_RECOVERIES,
        "only {with_recovery} victims died holding the lock in {trials} trials"
    );
    assert!(
        inflight_kills >= MIN_RECOVERIES,
        "only {inflight_kills} victims died in an operation in {trials} trials"
    );
    say(&format!(
        "killed_at_random_moments: {trials} trials, {with_recovery} with recovery, \
         {inflight_kills} mid-operation, {:?}",
        t0.elapsed()
    ));
}
