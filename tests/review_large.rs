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
/// refill's spare run 128.
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
    let p = anon(NPAGES);
    let pg = p.geometry().page_size;
    // a [0,100) with a spare [100,228); b split from the spare; both freed:
    // one cached run [0,228) with SKIP ghosts at 100 and 200; x takes it
    // whole (exact fit), a live block marked GHOSTS.
    let a = p.alloc(100 * pg).unwrap();
    let b = p.alloc(100 * pg).unwrap();
    assert_eq!((first(&p, a), first(&p, b)), (0, 100), "layout");
    p.free(a).unwrap();
    p.free(b).unwrap();
    let x = p.alloc(228 * pg).unwrap();
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
    // The tail run [150,228) is still ours and whole.
    let z = p.alloc(78 * pg).unwrap();
    assert_eq!(first(&p, z), 150, "the cached tail run is gone");
    p.free(z).unwrap();
    p.free(y).unwrap();
    p.reclaim_dead().unwrap();
    let st = p.stats();
    assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
    assert_eq!(p.check(), Vec::<String>::new());
}
