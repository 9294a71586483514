//! The per-process cache of large runs (rust/src/large_cache.rs): staged
//! death at each of its write steps, stale interior words rejected by
//! `free` and `size` while an owner is stopped mid-operation, and random
//! kills of two processes allocating and freeing large blocks.

mod common;

use common::*;
use shmpool::crashpoint::{self, CrashPoint};
use shmpool::{Error, Pool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
/// Pages of the test pools: a 16th (the large cache's bound) is 512.
const NPAGES: usize = 8192;

/// What the child did before it stopped: offsets in shared memory.
#[repr(C)]
struct Report {
    /// Offset of a stale interior word while the child is stopped (0: none).
    stale: AtomicU64,
    /// Pages the child holds live once the operation under way committed
    /// (`live_done`) or not (`live_before`).
    live_before: AtomicU64,
    live_done: AtomicU64,
}

/// Takes everything back and allocates the largest free block again and
/// again: the pool must yield exactly `free_bytes`, then be whole.
fn greedy_gets_everything(p: &Pool, what: &str) {
    let st = p.stats();
    let mut got = Vec::new();
    let mut total = 0usize;
    loop {
        let s = p.stats();
        if s.largest_free_bytes == 0 {
            break;
        }
        let o = p
            .alloc(s.largest_free_bytes)
            .unwrap_or_else(|e| panic!("{what}: alloc of largest_free_bytes: {e:?}"));
        total += s.largest_free_bytes;
        got.push(o);
    }
    assert_eq!(total, st.free_bytes, "{what}: greedy total");
    for o in got {
        p.free(o).unwrap();
    }
    assert_eq!(p.check(), Vec::<String>::new(), "{what}");
}

/// A child that sets up its large cache, arms `point`, and runs the
/// operation that reaches it.
fn child(p: &Pool, point: CrashPoint, r: &Report) -> Result<(), String> {
    let pg = p.geometry().page_size;
    let e = |e: Error| format!("{e:?}");
    // The first alloc takes a spare run for the cache (a refill).
    if point == CrashPoint::AllocSpareCached {
        r.live_before.store(0, Ordering::SeqCst);
        r.live_done.store(100, Ordering::SeqCst);
        crashpoint::arm(Some(point));
        p.alloc(100 * pg).map_err(e)?;
        crashpoint::arm(None);
        return Err("not reached".into());
    }
    let a = p.alloc(100 * pg).map_err(e)?;
    match point {
        CrashPoint::LargeSplitTailWritten | CrashPoint::LargeSplitCommitted => {
            // The spare run right after `a` is split for 70 pages: its tail
            // word is written at a + 70 pages.
            r.stale.store(
                if point == CrashPoint::LargeSplitTailWritten {
                    (a + 170 * pg) as u64
                } else {
                    0
                },
                Ordering::SeqCst,
            );
            r.live_before.store(100, Ordering::SeqCst);
            r.live_done.store(170, Ordering::SeqCst);
            crashpoint::arm(Some(point));
            let b = p.alloc(70 * pg).map_err(e)?;
            crashpoint::arm(None);
            Err(format!("not reached (got {b} after {a})"))
        }
        CrashPoint::LargeMergeCommitted => {
            // b comes from the spare right after a; both are freed and
            // wait unmerged (deferred merging), then an alloc that no
            // cached run fits merges b into a's run: b's word becomes
            // stale. The alloc has not committed at the merge.
            let b = p.alloc(100 * pg).map_err(e)?;
            if b != a + 100 * pg {
                return Err(format!("b at {b}, a at {a}"));
            }
            p.free(a).map_err(e)?;
            p.free(b).map_err(e)?;
            r.stale.store(b as u64, Ordering::SeqCst);
            r.live_before.store(0, Ordering::SeqCst);
            r.live_done.store(0, Ordering::SeqCst);
            crashpoint::arm(Some(point));
            p.alloc(240 * pg).map_err(e)?;
            crashpoint::arm(None);
            Err("not reached".into())
        }
        CrashPoint::LargeScrubbing => {
            // b split from the spare after a (100 pages: a whole block of
            // a's length), freed, then merged with the spare's tail (by
            // c's alloc, which no cached run fits), whose head becomes a
            // SKIP ghost inside b's run. Flushing frees that run under the
            // pool lock: the ghost is scrubbed first.
            let b = p.alloc(70 * pg).map_err(e)?;
            p.free(b).map_err(e)?;
            let c = p.alloc(240 * pg).map_err(e)?;
            if c < b + 100 * pg {
                return Err(format!("c at {c}, inside b's run at {b}"));
            }
            r.live_before.store(340, Ordering::SeqCst);
            r.live_done.store(340, Ordering::SeqCst);
            crashpoint::arm(Some(point));
            p.flush_cache().map_err(e)?;
            crashpoint::arm(None);
            Err("not reached".into())
        }
        CrashPoint::LargeGiveBack => {
            // Blocks of 128 pages after a (the cache's bound is 512 pages,
            // spares are whole blocks of up to 128 pages): a's spare is
            // 100, b and d refills with a spare of 128 each, c and f those
            // spares, so 100 pages cached. Freeing b, c, d, f caches 128
            // more each: the last free makes 612 and gives the runs back
            // (merged: one of 612), with only a still live.
            let b = p.alloc(128 * pg).map_err(e)?;
            let c = p.alloc(128 * pg).map_err(e)?;
            let d = p.alloc(128 * pg).map_err(e)?;
            let f = p.alloc(128 * pg).map_err(e)?;
            r.live_before.store(100, Ordering::SeqCst);
            r.live_done.store(100, Ordering::SeqCst);
            crashpoint::arm(Some(point));
            for x in [b, c, d, f] {
                p.free(x).map_err(e)?;
            }
            crashpoint::arm(None);
            Err("not reached".into())
        }
        CrashPoint::TakeBackFreed => {
            // a and its spare cached as one run; an alloc of nearly the
            // whole pool takes every cache back.
            p.free(a).map_err(e)?;
            r.live_before.store(0, Ordering::SeqCst);
            r.live_done.store(0, Ordering::SeqCst);
            crashpoint::arm(Some(point));
            let g = p.alloc((NPAGES - 100) * pg).map_err(e)?;
            crashpoint::arm(None);
            Err(format!("not reached (got {g})"))
        }
        _ => Err(format!("no scenario for {point:?}")),
    }
}

fn one_death(point: CrashPoint) {
    let what = format!("killed at {point:?}");
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    // SAFETY: Report is atomics only.
    let r: SharedMem<Report> = unsafe { SharedMem::new() };
    let mut c = fork_child(|| child(&p, point, &r));
    c.wait_stopped(T).unwrap_or_else(|e| panic!("{what}: {e}"));
    // Stopped in the middle: a stale interior word is no block, and
    // freeing it changes nothing.
    let stale = r.stale.load(Ordering::SeqCst) as usize;
    // (At a point of ALL the child holds the pool lock: nothing to try.)
    if stale != 0 && !crashpoint::ALL.contains(&point) {
        assert_eq!(p.size(stale), Err(Error::NotABlock), "{what}");
        assert_eq!(p.free(stale), Err(Error::NotABlock), "{what}");
        assert_eq!(p.size(stale), Err(Error::NotABlock), "{what}");
    }
    if !crashpoint::ALL.contains(&point) {
        // The owner holds only its slot lock: `check` leaves its slot to
        // it (loose) and finds nothing wrong.
        assert_eq!(p.check(), Vec::<String>::new(), "{what}: stopped owner");
    }
    let st = c.kill();
    assert!(libc::WIFSIGNALED(st), "{what}: {}", describe(st));
    // Anything done now reaps the dead cache (and recovers if it held the
    // pool lock: only then).
    let s = p.stats();
    assert_eq!(
        s.recoveries,
        crashpoint::ALL.contains(&point) as u64,
        "{what}: recoveries"
    );
    assert_eq!(p.check(), Vec::<String>::new(), "{what}");
    let live = r.live_before.load(Ordering::SeqCst);
    let done = r.live_done.load(Ordering::SeqCst);
    let held = (p.stats().payload_bytes - s.free_bytes) / pg;
    assert!(
        held as u64 == live || held as u64 == done,
        "{what}: the dead child holds {held} pages (expected {live} or {done})"
    );
    let want = match point {
        CrashPoint::LargeSplitTailWritten => live,
        _ => done,
    };
    assert_eq!(held as u64, want, "{what}: committed or not");
    let got = p.reclaim_dead().unwrap();
    assert_eq!(got.pages, want, "{what}: reclaim_dead");
    let after = p.stats();
    assert_eq!(after.free_bytes, after.payload_bytes, "{what}");
    assert_eq!(after.live_blocks, 0, "{what}");
    assert_eq!(p.check(), Vec::<String>::new(), "{what}");
    greedy_gets_everything(&p, &what);
    assert_eq!(p.stats().largest_free_bytes, after.payload_bytes, "{what}");
}

#[test]
fn killed_at_each_step_of_split_merge_and_refill() {
    let _serial = serial();
    let _w = Watchdog::new("large cache staged death", 120);
    for point in [
        CrashPoint::AllocSpareCached,
        CrashPoint::LargeSplitTailWritten,
        CrashPoint::LargeSplitCommitted,
        CrashPoint::LargeMergeCommitted,
        CrashPoint::LargeScrubbing,
        CrashPoint::LargeGiveBack,
        CrashPoint::TakeBackFreed,
    ] {
        one_death(point);
    }
}

#[test]
fn split_merge_and_take_back_keep_the_counts() {
    let _serial = serial();
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    let mut rng = Rng(7);
    let mut live: Vec<(usize, usize)> = Vec::new();
    for i in 0..4000 {
        if live.len() < 24 && rng.below(2) == 0 || live.is_empty() {
            let n = 65 + rng.below(192) as usize;
            let o = p.alloc(n * pg).unwrap();
            mark(&p, o, n * pg, o as u64);
            live.push((o, n));
        } else {
            let k = rng.below(live.len() as u64) as usize;
            let (o, n) = live.swap_remove(k);
            assert!(marked(&p, o, n * pg, o as u64), "block {o} overwritten");
            p.free(o).unwrap();
            assert_eq!(p.free(o), Err(Error::NotABlock));
        }
        if i % 500 == 0 {
            assert_eq!(p.check(), Vec::<String>::new(), "step {i}");
            let st = p.stats();
            let held: usize = live.iter().map(|b| b.1).sum();
            assert_eq!(st.free_bytes, st.payload_bytes - held * pg, "step {i}");
            assert_eq!(st.live_blocks, live.len() as u64, "step {i}");
            for &(o, n) in &live {
                assert_eq!(p.size(o), Ok(n * pg));
            }
        }
    }
    // Exhaustion takes the cache back: the whole free space is allocatable.
    greedy_gets_everything(&p, "after the ring");
    for (o, _) in live {
        p.free(o).unwrap();
    }
    let st = p.stats();
    assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
}

#[test]
fn two_processes_killed_at_random_moments() {
    let _serial = serial();
    let _w = Watchdog::new("large cache random kills", 240);
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    let mut rng = Rng(99);
    for round in 0..scale() * 12 {
        let kids: Vec<Child> = (0..2u64)
            .map(|k| {
                let seed = round * 2 + k;
                fork_child(|| {
                    let mut r = Rng(seed + 1000);
                    let mut live: Vec<usize> = Vec::new();
                    loop {
                        if live.len() < 16 && r.below(2) == 0 || live.is_empty() {
                            let n = 65 + r.below(192) as usize;
                            match p.alloc(n * pg) {
                                Ok(o) => live.push(o),
                                Err(Error::OutOfMemory) => {}
                                Err(e) => return Err(format!("{e:?}")),
                            }
                        } else {
                            let k = r.below(live.len() as u64) as usize;
                            let o = live.swap_remove(k);
                            p.free(o).map_err(|e| format!("free {o}: {e:?}"))?;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_micros(200 + rng.below(3000)));
        for mut c in kids {
            c.kill();
        }
        let v = p.check();
        assert_eq!(v, Vec::<String>::new(), "round {round}");
        p.reclaim_dead().unwrap();
        let st = p.stats();
        assert_eq!(
            (st.free_bytes, st.live_blocks),
            (st.payload_bytes, 0),
            "round {round}"
        );
        assert_eq!(p.check(), Vec::<String>::new(), "round {round}");
    }
    greedy_gets_everything(&p, "after the kills");
}

/// A walk of the descriptors under the pool lock (here `debug_info`'s)
/// must see every block while another process splits and merges its large
/// runs without the pool lock. The first version cleared a merged run's
/// absorbed head word at once: a walk that had read the run's old length
/// then found `INTERIOR` where it expected a head, and stopped there
/// (the take-backs, `reclaim_dead` and recovery walk the same way).
#[test]
fn walks_see_every_block_while_another_process_merges() {
    let _serial = serial();
    let _w = Watchdog::new("large cache walks during merges", 240);
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    // Our block at the very end, the rest of the pool free for the child.
    p.set_caching(false).unwrap();
    let f = p.alloc((NPAGES - 1) * pg).unwrap();
    let x = p.alloc(pg).unwrap();
    p.free(f).unwrap();
    assert_eq!(
        x,
        p.geometry().payload_offset + (NPAGES - 1) * pg,
        "our block is not at the end"
    );
    let mut c = fork_child(|| {
        let mut r = Rng(5);
        let mut live: Vec<usize> = Vec::new();
        loop {
            if live.len() < 6 && r.below(2) == 0 || live.is_empty() {
                let n = 65 + r.below(100) as usize;
                match p.alloc(n * pg) {
                    Ok(o) => live.push(o),
                    Err(Error::OutOfMemory) => {}
                    Err(e) => return Err(format!("{e:?}")),
                }
            } else {
                let k = r.below(live.len() as u64) as usize;
                let o = live.swap_remove(k);
                p.free(o).map_err(|e| format!("free {o}: {e:?}"))?;
            }
        }
    });
    let want = format!("{x}->{pg}");
    let mut missed = 0;
    for _ in 0..scale() * 20_000 {
        let d = p.debug_info();
        if !d.contains(&want) {
            missed += 1;
        }
    }
    c.kill();
    assert_eq!(missed, 0, "walks that did not reach our block");
    p.reclaim_dead().unwrap();
    p.free(x).unwrap();
    assert_eq!(p.check(), Vec::<String>::new());
    assert_all_free(&p);
}

/// The descriptor word of `page`, read from the pool's header region
/// (white box: what a walker under the pool lock reads).
fn word(p: &Pool, page: usize) -> u64 {
    let g = p.geometry();
    assert!(page < g.npages as usize);
    // SAFETY: the descriptors are `npages` aligned u64 words at
    // `desc_offset` of the mapping, written with atomics by the pool: an
    // atomic load of one is sound.
    unsafe { (*p.base().add(g.desc_offset + 8 * page).cast::<AtomicU64>()).load(Ordering::SeqCst) }
}

/// Walks run heads from `page` to the end as the pool's walkers do (by
/// each head's length); `Err` names the first page that is no head.
fn walk_from(p: &Pool, mut page: usize) -> Result<usize, String> {
    let n = p.geometry().npages as usize;
    let mut heads = 0;
    while page < n {
        let w = word(p, page);
        let len = match w >> 62 {
            1 => (w & ((1 << 30) - 1)) as usize,
            2 if page + 1 < n && word(p, page + 1) >> 60 == 0b1100 => {
                (word(p, page + 1) & ((1 << 60) - 1)) as usize
            }
            2 => 1,
            // A SKIP ghost (AUX kind 3): a merged run's former head.
            3 if w >> 60 == 0b1111 => (w & ((1 << 30) - 1)) as usize,
            _ => 0,
        };
        if len == 0 {
            return Err(format!("page {page} (word {w:#x}) is no head"));
        }
        heads += 1;
        page += len;
    }
    Ok(heads)
}

/// The deterministic form of the race above: a walker that read a run's
/// length before the owner merged the next run into it lands on the
/// absorbed run's head afterwards, and must be able to step over it.
#[test]
fn a_merged_runs_old_head_still_leads_a_walker_on() {
    let _serial = serial();
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    let first = |o: usize| (o - p.geometry().payload_offset) / pg;
    // a from the free runs with a spare run after it, b split from it.
    let a = p.alloc(100 * pg).unwrap();
    let b = p.alloc(100 * pg).unwrap();
    assert_eq!(first(b), first(a) + 100, "b does not follow a");
    p.free(a).unwrap();
    // A walker reads a's word now (100 pages), and is descheduled.
    assert_eq!(word(&p, first(a)) & ((1 << 30) - 1), 100);
    // b's free waits unmerged (deferred merging); an alloc that no cached
    // run fits merges b (and the spare's tail) into a's run first.
    p.free(b).unwrap();
    assert_eq!(word(&p, first(a)) & ((1 << 30) - 1), 100, "merged early");
    let c = p.alloc(240 * pg).unwrap();
    assert!(word(&p, first(a)) & ((1 << 30) - 1) > 100, "no merge");
    // The walker resumes at b.
    assert_eq!(walk_from(&p, first(a)).map(|_| ()), Ok(()));
    assert!(
        walk_from(&p, first(b)).is_ok(),
        "{:?}",
        walk_from(&p, first(b))
    );
    assert_eq!(p.check(), Vec::<String>::new());
    p.free(c).unwrap();
    assert_all_free(&p);
    assert!(walk_from(&p, 0).is_ok());
}

/// A merged run's former head must not pass for a cached block: a stale
/// entry of the small cache naming that page (its block was taken back
/// when memory ran out, and the page later became the tail of a split run,
/// then merged) found a CACHED word of the right length and owner there in
/// the version that left the head word as it was, and handed out a block
/// inside a cached run (found by tests/torture_signals.rs: "block
/// overwritten").
///
/// Checked 2026-12-03: with the `SKIP` write removed from `merge`, this
/// test passes (also on the code of 2026-12-02: the take-back below bumps
/// the slot's `taken`, so the stale entry is dropped before it is used),
/// while `two_processes_killed_at_random_moments` fails. It stays as a
/// check of the layout it builds; the random kills are what catch that bug.
#[test]
fn a_merged_runs_old_head_is_no_cached_block_to_a_stale_entry() {
    let _serial = serial();
    // A 16th is 1024 pages: spares of up to 256, whole blocks of the
    // refill's length (200 for 100, 175 for 175).
    let npages = 2 * NPAGES;
    let p = anon(npages);
    let pg = p.geometry().page_size;
    let first = |o: usize| (o - p.geometry().payload_offset) / pg;
    // E and its spare run (200 pages), x after them.
    let e = p.alloc(100 * pg).unwrap();
    let x = p.alloc(50 * pg).unwrap();
    assert_eq!((first(e), first(x)), (0, 300), "layout");
    p.free(x).unwrap(); // into our small cache: an entry for page 300
    p.free(e).unwrap(); // E and its spare: one cached run [0, 300)
                        // Memory runs out: every cache is taken back, our entry goes stale.
    let g = p.alloc((npages - 100) * pg).unwrap();
    p.free(g).unwrap();
    // C with a new spare [175, 350); D split from it leaves a cached tail
    // at 300 of 50 pages, and D's free merges that tail into D's run.
    let c = p.alloc(175 * pg).unwrap();
    let d = p.alloc(125 * pg).unwrap();
    assert_eq!((first(c), first(d)), (0, 175), "layout");
    p.free(d).unwrap();
    // 50 pages: the stale entry names 300, inside the cached run [175, 350).
    let y = p.alloc(50 * pg).unwrap();
    assert!(
        !(175..350).contains(&first(y)),
        "a block at page {} inside a cached run",
        first(y)
    );
    assert_eq!(p.check(), Vec::<String>::new());
    let z = p.alloc(128 * pg).unwrap();
    assert!(
        first(z) + 128 <= first(y) || first(y) + 50 <= first(z),
        "overlap"
    );
    for o in [c, y, z] {
        p.free(o).unwrap();
    }
    assert_all_free(&p);
}

/// The arena's block count of an owner is its words minus what its splits
/// and merges added (`extra`), so it may have to go below zero: a free or
/// a disown of a block split from a cached run, before any fold, must not
/// stop at 0 (a saturating count made `check` and `stats` drift by one:
/// test_heap_workers' "live_blocks 18446744073709551615 but counted 0").
#[test]
fn blocks_split_from_a_run_can_be_disowned_and_freed_before_a_fold() {
    let _serial = serial();
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    // A run of 228 pages (a block and its spare, merged), folded by check.
    let a = p.alloc(100 * pg).unwrap();
    p.free(a).unwrap();
    assert_eq!(p.check(), Vec::<String>::new());
    // Two blocks split from it, disowned: the owner's arena count was 1.
    let b = p.alloc(100 * pg).unwrap();
    let c = p.alloc(100 * pg).unwrap();
    p.disown(b).unwrap();
    p.disown(c).unwrap();
    assert_eq!(p.check(), Vec::<String>::new());
    assert_eq!(p.stats().live_blocks, 2);
    // Again, freed by the locked path (disowned: nobody's cache).
    let d = p.alloc(70 * pg).unwrap();
    p.disown(d).unwrap();
    for o in [b, c, d] {
        p.free(o).unwrap();
    }
    assert_eq!(p.check(), Vec::<String>::new());
    assert_all_free(&p);
}

/// `make demo`'s pattern: large blocks that stay live fill the pool (8 of
/// 4097 pages in 34,304, as its 134 MiB pool with 8 blocks of 16 MiB and a
/// page). A spare run taken with each allocation and left between two
/// long-lived blocks became a hole when the cache was taken back, and the
/// last allocation found no run long enough: `Out_of_pool_memory` with
/// 5,600 pages free. Blocks too long to be served from a spare get none.
#[test]
fn long_lived_large_blocks_fill_the_pool() {
    let _serial = serial();
    let pages = 34_304;
    let p = anon(pages);
    let pg = p.geometry().page_size;
    let n = 4097;
    let mut got = Vec::new();
    // One process, then the same with the blocks shared among processes
    // that stay alive while the others allocate (their caches are live).
    for i in 0..8 {
        let o = p
            .alloc(n * pg)
            .unwrap_or_else(|e| panic!("alloc {i} of {n} pages: {e:?} ({:?})", p.stats()));
        got.push(o);
    }
    for o in got.drain(..) {
        p.free(o).unwrap();
    }
    assert_all_free(&p);
    // Four children allocate one block each and exit (the blocks stay,
    // as the demo's fill workers'), then four more do so together.
    for round in 0..2 {
        let kids: Vec<_> = (0..4)
            .map(|_| {
                let p = &p;
                fork_child(move || p.alloc(n * pg).map(|_| ()).map_err(|e| format!("{e:?}")))
            })
            .collect();
        for mut k in kids {
            k.wait_ok(T)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    let st = p.stats();
    assert_eq!(st.live_blocks, 8);
    assert_eq!(p.check(), Vec::<String>::new());
    let r = p.reclaim_dead().unwrap();
    assert_eq!(r.pages, 8 * n as u64);
    assert_all_free(&p);
}

/// What the processes of `one_block_per_live_process` report.
#[repr(C)]
struct Fill {
    /// Set by the parent once it has seen every child's answer.
    release: AtomicU64,
    /// Children that have tried their alloc, and those it succeeded for.
    tried: AtomicU64,
    got: AtomicU64,
}

/// Forks one process after another, each allocating one block of `n`
/// pages and staying alive (as a worker holding its buffer) while the
/// next ones allocate, until one gets `OutOfMemory` or `max` have
/// allocated; returns how many did, and the free pages `stats` counts
/// then (every cache taken back).
fn one_block_per_live_process(p: &Pool, n: usize, max: usize) -> (usize, u64) {
    let pg = p.geometry().page_size;
    // SAFETY: Fill is atomics only.
    let f: SharedMem<Fill> = unsafe { SharedMem::new() };
    let mut kids = Vec::new();
    for i in 0..max {
        let f = &f;
        kids.push(fork_child(move || {
            let r = p.alloc(n * pg);
            if r.is_ok() {
                f.got.fetch_add(1, Ordering::SeqCst);
            }
            f.tried.fetch_add(1, Ordering::SeqCst);
            wait_until(T, || f.release.load(Ordering::SeqCst) != 0)?;
            match r {
                Ok(_) | Err(Error::OutOfMemory) => Ok(()),
                Err(e) => Err(format!("{e:?}")),
            }
        }));
        wait_until(T, || f.tried.load(Ordering::SeqCst) == i as u64 + 1).unwrap();
        if f.got.load(Ordering::SeqCst) != i as u64 + 1 {
            break;
        }
    }
    let got = f.got.load(Ordering::SeqCst) as usize;
    let free = (p.stats().free_bytes / pg) as u64;
    f.release.store(1, Ordering::SeqCst);
    for mut k in kids {
        k.wait_ok(T).unwrap();
    }
    (got, free)
}

/// Worker processes that each allocate one buffer and keep it, with
/// blocks of `n` pages a spare run of `s` can serve once but not twice
/// (`s/2 < n < s`; `s` is 128 pages here, a quarter of the cache's
/// bound): each refill places the block right after the previous
/// worker's spare, which a take-back turns into a hole of `s` pages
/// holding one later block and `s - n` pages no block of `n` fits. With
/// caching off, the same processes fill the pool with `npages / n`
/// blocks; the cache must not make that fewer (README: "a cache does not
/// make an allocation fail").
#[test]
fn one_long_lived_block_per_process_fills_the_pool() {
    let _serial = serial();
    let _w = Watchdog::new("one long-lived block per process", 120);
    let n = 70;
    let want = NPAGES / n;
    for caching in [false, true] {
        let p = anon(NPAGES);
        p.set_caching(caching).unwrap();
        let (got, free) = one_block_per_live_process(&p, n, want);
        assert_eq!(
            got, want,
            "caching {caching}: blocks of {n} pages, one per live process: \
             OutOfMemory after {got} with {free} pages free"
        );
        assert_eq!(p.check(), Vec::<String>::new());
        let r = p.reclaim_dead().unwrap();
        assert_eq!(r.pages, (want * n) as u64);
        assert_all_free(&p);
    }
}

/// A worker frees a temporary buffer (200 pages: cached, no longer than
/// half the cache's bound) and then allocates a smaller block that it
/// keeps (100 pages): the cache splits the cached run for it, although a
/// free run of exactly 100 pages waits elsewhere, and the pages of the
/// temporary buffer are no longer whole when another process needs them:
/// `OutOfMemory` with 200 pages free. With caching off the block goes to
/// the 100-page run (best fit over all free runs) and the other process
/// gets the 200. Known, not fixed: a per-process cache serves from its own
/// runs without looking at the free runs (that is what it is for); shown
/// by `cargo test --test large_cache -- --ignored`.
#[test]
#[ignore = "review rev2: cache-local best fit splits a run the pool needed whole (not fixed)"]
fn a_cached_run_split_for_a_long_lived_block_is_not_needed_whole_later() {
    let _serial = serial();
    for caching in [false, true] {
        let p = anon(NPAGES);
        let pg = p.geometry().page_size;
        let first = |o: usize| (o - p.geometry().payload_offset) / pg;
        // The parent fills the pool, caching off (a fixed layout): free
        // runs [0, 100) and [NPAGES - 200, NPAGES).
        p.set_caching(false).unwrap();
        let h = p.alloc(100 * pg).unwrap();
        let _g = p.alloc(8 * pg).unwrap();
        let _rest = p.alloc((NPAGES - 308) * pg).unwrap();
        p.free(h).unwrap();
        // SAFETY: Fill is atomics only.
        let f: SharedMem<Fill> = unsafe { SharedMem::new() };
        let mut a = {
            let (p, f) = (&p, &f);
            fork_child(move || {
                let e = |e: Error| format!("{e:?}");
                p.set_caching(caching).map_err(e)?;
                let t = p.alloc(200 * pg).map_err(e)?;
                p.free(t).map_err(e)?;
                let k = p.alloc(100 * pg).map_err(e)?;
                f.got.store(first(k) as u64 + 1, Ordering::SeqCst);
                wait_until(T, || f.release.load(Ordering::SeqCst) != 0)
            })
        };
        wait_until(T, || f.got.load(Ordering::SeqCst) != 0).unwrap();
        let kept = f.got.load(Ordering::SeqCst) - 1;
        let mut b = {
            let p = &p;
            fork_child(move || {
                p.set_caching(caching).map_err(|e| format!("{e:?}"))?;
                p.alloc(200 * pg).map(|_| ()).map_err(|e| {
                    let s = p.stats();
                    format!(
                        "{e:?} with {} pages free, {} contiguous",
                        s.free_bytes / pg,
                        s.largest_free_bytes / pg
                    )
                })
            })
        };
        let rb = b.wait_ok(T);
        f.release.store(1, Ordering::SeqCst);
        a.wait_ok(T).unwrap();
        rb.unwrap_or_else(|e| {
            panic!("caching {caching}: the kept block at page {kept}; the other process: {e}")
        });
        p.reclaim_dead().unwrap();
        assert_eq!(p.check(), Vec::<String>::new());
    }
}

/// Staged death at the merges deferred merging does outside an alloc: a
/// free that finds the pending list full merges it (no pool lock), and a
/// give-back merges the pending runs first (pool lock held). The child
/// holds only `a` (one block of the same length) live when killed; the
/// pool must come back whole.
#[test]
fn killed_merging_pending_runs_in_a_free_and_in_a_give_back() {
    let _serial = serial();
    let _w = Watchdog::new("large cache pending merges", 120);
    // (pages, block length, blocks freed, pool lock held at the merge)
    for (npages, len, count, locked) in [
        // A bound of 4096 pages: 33 frees of 65 pages stay under it, and
        // the 33rd finds 32 runs pending.
        (65536usize, 65usize, 33usize, false),
        // A bound of 512, spares of one block of 120 pages (a whole number
        // of blocks up to 128): a, then b1..b5 alternately from the spare
        // and from a refill with a new spare, leave nothing cached; the
        // 5th free of 120 pages (600) goes past the bound, and the
        // give-back merges the pending runs first.
        (NPAGES, 120, 5, true),
    ] {
        let what = format!("{count} frees of {len} pages in {npages}");
        let p = anon(npages);
        let pg = p.geometry().page_size;
        let mut c = fork_child(|| {
            let e = |e: Error| format!("{e:?}");
            let _a = p.alloc(len * pg).map_err(e)?;
            let bs = (0..count)
                .map(|_| p.alloc(len * pg))
                .collect::<Result<Vec<_>, _>>()
                .map_err(e)?;
            crashpoint::arm(Some(CrashPoint::LargeMergeCommitted));
            for b in bs {
                p.free(b).map_err(e)?;
            }
            crashpoint::arm(None);
            Err("not reached".into())
        });
        c.wait_stopped(T).unwrap_or_else(|e| panic!("{what}: {e}"));
        if !locked {
            assert_eq!(p.check(), Vec::<String>::new(), "{what}: stopped owner");
        }
        let st = c.kill();
        assert!(libc::WIFSIGNALED(st), "{what}: {}", describe(st));
        let s = p.stats();
        assert_eq!(s.recoveries, locked as u64, "{what}: recoveries");
        assert_eq!(p.check(), Vec::<String>::new(), "{what}");
        assert_eq!(
            (s.payload_bytes - s.free_bytes) / pg,
            len,
            "{what}: the dead child holds only a"
        );
        assert_eq!(p.reclaim_dead().unwrap().pages, len as u64, "{what}");
        let after = p.stats();
        assert_eq!(
            (after.free_bytes, after.live_blocks),
            (after.payload_bytes, 0),
            "{what}"
        );
        assert_eq!(p.check(), Vec::<String>::new(), "{what}");
        greedy_gets_everything(&p, &what);
        assert_eq!(p.stats().largest_free_bytes, after.payload_bytes, "{what}");
    }
}
