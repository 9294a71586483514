//! Regression tests from the independent review of the large cache
//! (branch review-large, on large at 9590a94). Each test names the finding
//! it demonstrates.

mod common;

use common::*;
use shmpool::crashpoint::{self, CrashPoint};
use shmpool::{Error, Pool};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
/// Pages of the test pools: a 16th (the large cache's bound) is 512, a
/// refill's spare run up to 128 (whole blocks of its length).
const NPAGES: usize = 8192;

fn first(p: &Pool, o: usize) -> usize {
    (o - p.geometry().payload_offset) / p.geometry().page_size
}

/// Finding: a locked free of a live block marked GHOSTS (a remote free of
/// a block over 64 pages, or a `free_word` decided before a lock was
/// released, as a heap's destroy does) clears every non-INTERIOR word
/// inside the block *before* its commit, while the block's owner may free
/// it into its large cache and split it meanwhile (no pool lock needed).
/// The clearing then wipes the head of the owner's new cached tail run;
/// the free itself fails (the head's word changed: `NotABlock`, as it
/// should), but the owner's run has lost its head: its pages are in no
/// block (check: "D1 ... starts no run"), walks stop there, and stats
/// count them cached for ever.
#[test]
fn a_losing_free_of_a_ghost_block_does_not_wipe_the_owners_new_run() {
    let _serial = serial();
    let _w = Watchdog::new("review-large: losing free scrubs", 60);
    // A 16th is 1024 pages: a refill of 100 pages takes a spare of 200.
    let p = anon(2 * NPAGES);
    let pg = p.geometry().page_size;
    // a [0,100) with a spare [100,300); b split from the spare; both freed:
    // one cached run [0,300) with SKIP ghosts at 100 and 200; x takes it
    // whole (exact fit), a live block marked GHOSTS.
    let a = p.alloc(100 * pg).unwrap();
    let b = p.alloc(100 * pg).unwrap();
    assert_eq!((first(&p, a), first(&p, b)), (0, 100), "layout");
    p.free(a).unwrap();
    p.free(b).unwrap();
    let x = p.alloc(300 * pg).unwrap();
    assert_eq!(first(&p, x), 0, "layout");
    // Another process frees x too (through the pool lock: over 64 pages),
    // and stops after its first ghost is cleared.
    let mut c = fork_child(|| {
        let s = p.alloc(pg).map_err(|e| format!("{e:?}"))?; // registers
        p.free(s).map_err(|e| format!("{e:?}"))?;
        crashpoint::arm(Some(CrashPoint::LargeScrubbing));
        let r = p.free(x);
        crashpoint::arm(None);
        match r {
            // The owner's free won: this one must lose, changing nothing.
            Err(Error::NotABlock) => Ok(()),
            other => Err(format!("the losing free returned {other:?}")),
        }
    });
    c.wait_stopped(T).unwrap();
    // Meanwhile the owner frees x into its cache (no pool lock) and splits
    // the run again: a new cached tail run's head at page 150, inside x.
    p.free(x).unwrap();
    let y = p.alloc(150 * pg).unwrap();
    assert_eq!(first(&p, y), 0, "layout");
    // SAFETY: continues our own stopped child.
    unsafe { libc::kill(c.pid, libc::SIGCONT) };
    c.wait_ok(T).unwrap();
    assert_eq!(p.check(), Vec::<String>::new(), "after the losing free");
    // The tail run [150,300) is still ours and whole.
    let z = p.alloc(150 * pg).unwrap();
    assert_eq!(first(&p, z), 150, "the cached tail run is gone");
    p.free(z).unwrap();
    p.free(y).unwrap();
    p.reclaim_dead().unwrap();
    assert_all_free(&p);
}

/// Finding: the arena's `live_blocks` is decremented with a plain `-= 1`
/// by a locked free, but with the large cache it counts an owner's words
/// only up to its unfolded `extra` (L5 of `large_cache.rs`): blocks split
/// from a run without the pool lock and then freed by another process
/// (the locked path, which folds nothing) take it below zero. The dev
/// profile (`make test`'s cargo-test-dev step, overflow checks on) then
/// panics under the pool lock: the free reports `Corrupt("internal
/// panic")` although the block was freed, and a recovery is counted. (The
/// release profile wraps, and the sum with `extra` comes out right, so
/// this test fails only in the dev profile. No `stats` before the frees:
/// it would fold the owner's `extra`.)
#[test]
fn remote_frees_of_split_blocks_before_a_fold_are_plain_frees() {
    let _serial = serial();
    let _w = Watchdog::new("review-large: live_blocks below zero", 60);
    // A 16th is 1024 pages: a refill's spare run is 256.
    let p = anon(16384);
    let pg = p.geometry().page_size;
    // a from the free runs (the arena counts a and its spare: 2 blocks),
    // then three blocks split from the spare without the pool lock.
    let a = p.alloc(100 * pg).unwrap();
    let split: Vec<usize> = (0..3).map(|_| p.alloc(65 * pg).unwrap()).collect();
    assert_eq!(first(&p, split[0]), 100, "layout");
    // Another process frees the three split ones (over 64 pages: the
    // locked path): the arena counted 2 blocks of ours, now "-1".
    let mut c = fork_child(|| {
        for &o in &split {
            p.free(o).map_err(|e| format!("free of {o}: {e:?}"))?;
        }
        Ok(())
    });
    c.wait_ok(T).unwrap();
    // Our next block from the free runs (a small one, no fold on its
    // way) brings our count back to "0", then a's free to "-1" again.
    let s = p.alloc(pg).unwrap();
    p.free(a).unwrap();
    p.free(s).unwrap();
    let st = p.stats();
    assert_eq!(st.recoveries, 0, "a recovery");
    assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
    assert_eq!(p.check(), Vec::<String>::new());
}

/// Finding (review, untested idea made a test): a fork while another
/// thread of the parent is in the middle of a large-index operation. The
/// child inherits the process-local index half linked; making the stacks
/// its own used to walk that index to clear it, which may follow a stale
/// link. The child now drops it unread (`forget_inherited`). Each child
/// allocates and frees long blocks (its own index from scratch) and must
/// finish with the pool consistent; the parent's busy thread is checked
/// the same way at the end.
#[test]
fn forks_while_a_thread_uses_the_large_index() {
    let _serial = serial();
    let _w = Watchdog::new("review-large: fork mid index operation", 120);
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let forks = 40 * scale();
    std::thread::scope(|s| {
        let busy = s.spawn(|| -> Result<u64, String> {
            let mut rng = Rng(7);
            let mut live: Vec<usize> = Vec::new();
            let mut ops = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if live.len() < 8 {
                    let n = 65 + rng.below(120) as usize;
                    live.push(p.alloc(n * pg).map_err(|e| format!("alloc: {e:?}"))?);
                } else {
                    let i = rng.below(live.len() as u64) as usize;
                    p.free(live.swap_remove(i))
                        .map_err(|e| format!("free: {e:?}"))?;
                }
                ops += 1;
            }
            for o in live {
                p.free(o).map_err(|e| format!("free: {e:?}"))?;
            }
            Ok(ops)
        });
        for i in 0..forks {
            let mut c = fork_child(|| {
                let mut rng = Rng(100 + i);
                for _ in 0..20 {
                    let n = 65 + rng.below(120) as usize;
                    let o = p.alloc(n * pg).map_err(|e| format!("child alloc: {e:?}"))?;
                    p.free(o).map_err(|e| format!("child free: {e:?}"))?;
                }
                Ok(())
            });
            c.wait_ok(T).unwrap_or_else(|e| panic!("fork {i}: {e}"));
            std::thread::sleep(Duration::from_micros(300));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ops = busy.join().unwrap().unwrap();
        assert!(ops > 0, "the busy thread never ran");
    });
    p.reclaim_dead().unwrap();
    assert_eq!(p.check(), Vec::<String>::new());
    assert_all_free(&p);
}
