//! Blocks freed by a process other than their owner go to the owner's
//! inbox (see `cache.rs`): they stay counted as free and listed as cached,
//! the owner takes them into its cache on its next miss, `stats` coalesces
//! what is left, and a process killed at any step of a remote free or of a
//! drain leaves nothing lost or duplicated.

mod common;

use common::*;
use shmpool::Pool;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Offsets listed on the "cached in processes" line of `debug_info`.
fn cached_offsets(p: &Pool) -> Vec<usize> {
    let info = p.debug_info();
    let line = info
        .lines()
        .find(|l| l.starts_with("cached in processes"))
        .expect("cached line")
        .to_string();
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    let mut v: Vec<usize> = inner
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|e| e.split("->").next().unwrap().parse().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn a_block_freed_by_another_process_goes_back_to_its_owner() {
    let _serial = serial();
    let _w = Watchdog::new("inbox hand-off", 60);
    let p = anon(1024);
    let pg = p.geometry().page_size;
    let mut mine: Vec<usize> = (0..4).map(|_| p.alloc(pg).unwrap()).collect();
    mine.sort();
    // Another process frees them: it never allocated (it registers to free).
    let mut c = fork_child(|| {
        for &o in &mine {
            p.free(o).map_err(|e| format!("free: {e:?}"))?;
        }
        Ok(())
    });
    c.wait_ok(T).unwrap();
    // Waiting for us, counted as free, listed as cached, sound.
    assert_eq!(cached_offsets(&p), mine, "the blocks wait in our inbox");
    assert_eq!(p.check(), Vec::<String>::new());
    for &o in &mine {
        assert!(p.free(o).is_err(), "a freed block is not freed twice");
    }
    // Our next allocations take them, without coalescing them first.
    let mut again: Vec<usize> = (0..4).map(|_| p.alloc(pg).unwrap()).collect();
    again.sort();
    assert_eq!(again, mine);
    assert_eq!(cached_offsets(&p), Vec::<usize>::new());
    assert_eq!(p.check(), Vec::<String>::new());
    for o in again {
        p.free(o).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
}

#[test]
fn a_full_inbox_sends_frees_to_the_pool_and_stats_coalesces_the_rest() {
    let _serial = serial();
    let _w = Watchdog::new("inbox overflow", 60);
    let p = anon(1024);
    let pg = p.geometry().page_size;
    let sizes = [1usize, 2, 3, 64, 65, 1, 7, 2, 5, 9, 1, 1, 4, 30, 2, 1];
    let blocks: Vec<(usize, usize)> = sizes
        .iter()
        .map(|&n| (p.alloc(n * pg).unwrap(), n))
        .collect();
    let held: usize = sizes.iter().sum();
    let mut c = fork_child(|| {
        for &(o, n) in &blocks {
            let got = p.free(o).map_err(|e| format!("free: {e:?}"))?;
            if got != n * pg {
                return Err(format!("free returned {got}"));
            }
        }
        Ok(())
    });
    c.wait_ok(T).unwrap();
    let waiting = cached_offsets(&p);
    assert!(
        !waiting.is_empty() && waiting.len() < blocks.len(),
        "some wait in the inbox, the rest (full inbox, 65 pages) went to the pool: {waiting:?}"
    );
    assert_eq!(p.check(), Vec::<String>::new());
    // stats counts them as free and gives them back to the free runs.
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
    assert_eq!(s.live_blocks, 0);
    assert_eq!(cached_offsets(&p), Vec::<usize>::new());
    assert!(held > 0);
    assert_eq!(p.check(), Vec::<String>::new());
}

#[test]
fn a_dead_owners_inbox_is_reaped_and_its_live_blocks_reclaimed() {
    let _serial = serial();
    let _w = Watchdog::new("dead owner inbox", 60);
    let p = anon(1024);
    let pg = p.geometry().page_size;
    // SAFETY: atomics only, valid when zeroed.
    let mail = unsafe { SharedMem::<[AtomicU64; 9]>::new() };
    let mut owner = fork_child(|| {
        die_with_parent();
        for i in 0..4 {
            mail[i].store(p.alloc(3 * pg).unwrap() as u64, SeqCst);
        }
        mail[8].store(1, SeqCst);
        wait_until(Duration::from_secs(3600), || mail[8].load(SeqCst) == 2)
    });
    wait_until(T, || mail[8].load(SeqCst) == 1).unwrap();
    for i in 0..3 {
        p.free(mail[i].load(SeqCst) as usize).unwrap();
    }
    assert_eq!(cached_offsets(&p).len(), 3);
    owner.kill();
    // The next lock acquisition reaps the dead owner's inbox.
    let s = p.stats();
    assert_eq!(s.free_bytes, (1024 - 3) * pg);
    assert_eq!(cached_offsets(&p), Vec::<usize>::new());
    let r = p.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (1, 3));
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
    assert_eq!(p.check(), Vec::<String>::new());
}

/// Staged deaths on the new paths: a freer stopped inside the owner's
/// inbox (before and after its commit), an owner stopped while draining,
/// each then killed.
#[cfg(feature = "crash-points")]
mod staged {
    use super::*;
    use shmpool::crashpoint::{self, CrashPoint};

    fn freer_killed_at(point: CrashPoint, committed: bool) {
        let _w = Watchdog::new("freer killed", 60);
        let p = anon(1024);
        let pg = p.geometry().page_size;
        let x = p.alloc(2 * pg).unwrap();
        let y = p.alloc(pg).unwrap();
        let z = p.alloc(pg).unwrap();
        let mut c = fork_child(|| {
            die_with_parent();
            p.free(z).map_err(|e| format!("{e:?}"))?; // registers, pushes
            crashpoint::arm(Some(point));
            p.free(x).map_err(|e| format!("{e:?}"))?;
            Err("not stopped".into())
        });
        c.wait_stopped(T).unwrap();
        // The stopped freer holds our inbox lock: our own frees and allocs
        // go on (the locked path), check leaves the slot out.
        p.free(y).unwrap();
        let y2 = p.alloc(pg).unwrap();
        assert_eq!(p.check(), Vec::<String>::new());
        c.kill();
        // The next taker takes the dead freer's lock over: every block our
        // slot cached goes back, exact.
        let s = p.stats();
        let live = if committed { 1 } else { 3 };
        assert_eq!(s.free_bytes, (1024 - live) * pg, "at {point:?}");
        assert_eq!(s.live_blocks, if committed { 1 } else { 2 });
        assert_eq!(p.check(), Vec::<String>::new(), "at {point:?}");
        assert_eq!(p.free(x).is_ok(), !committed, "x freed once, at {point:?}");
        p.free(y2).unwrap();
        let s = p.stats();
        assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
        assert_eq!(p.check(), Vec::<String>::new());
        assert_eq!(p.reclaim_dead().unwrap().blocks, 0);
    }

    #[test]
    fn a_freer_killed_holding_the_inbox_before_its_commit() {
        let _serial = serial();
        freer_killed_at(CrashPoint::InboxPushLocked, false);
    }

    #[test]
    fn a_freer_killed_between_its_commit_and_the_inbox_entry() {
        let _serial = serial();
        freer_killed_at(CrashPoint::InboxPushCommitted, true);
    }

    /// The race the branch's author left open: a live freer stopped
    /// between its commit into a dead owner's inbox and the inbox entry,
    /// while `reclaim_dead` frees the dead owner's blocks. The freer then
    /// goes on and lists a block that is no longer cached (or, once the
    /// slot is reused, someone else's). `reclaim_dead` must leave a slot
    /// whose locks a live process holds for a later call.
    fn reclaim_while_a_live_freer_holds_the_dead_owners_inbox(reuse: bool) {
        let _w = Watchdog::new("reclaim vs live freer", 60);
        let p = anon(1024);
        let pg = p.geometry().page_size;
        // SAFETY: atomics only, valid when zeroed.
        let mail = unsafe { SharedMem::<[AtomicU64; 9]>::new() };
        let mut owner = fork_child(|| {
            die_with_parent();
            mail[0].store(p.alloc(pg).unwrap() as u64, SeqCst);
            mail[1].store(p.alloc(2 * pg).unwrap() as u64, SeqCst);
            mail[8].store(1, SeqCst);
            wait_until(Duration::from_secs(3600), || false)
        });
        wait_until(T, || mail[8].load(SeqCst) == 1).unwrap();
        let x = mail[0].load(SeqCst) as usize;
        let mut freer = fork_child(|| {
            die_with_parent();
            crashpoint::arm(Some(CrashPoint::InboxPushCommitted));
            p.free(x).map_err(|e| format!("{e:?}"))?;
            Ok(())
        });
        freer.wait_stopped(T).unwrap();
        owner.kill();
        let r = p.reclaim_dead().unwrap();
        let mut reused = None;
        if reuse {
            // Another process takes the dead owner's slot and the page.
            let c = fork_child(|| {
                die_with_parent();
                let b = p.alloc(pg).map_err(|e| format!("{e:?}"))?;
                mail[2].store(b as u64, SeqCst);
                mail[8].store(2, SeqCst);
                wait_until(Duration::from_secs(3600), || false)
            });
            wait_until(T, || mail[8].load(SeqCst) == 2).unwrap();
            reused = Some(c);
        }
        // SAFETY: a plain signal to our own stopped child.
        unsafe { libc::kill(freer.pid, libc::SIGCONT) };
        freer.wait_ok(T).unwrap();
        assert_eq!(
            p.check(),
            Vec::<String>::new(),
            "reuse {reuse}, first reclaim {r:?}"
        );
        if let Some(mut c) = reused {
            c.kill();
        }
        let _ = p.reclaim_dead().unwrap();
        let s = p.stats();
        assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
        assert_eq!(s.live_blocks, 0);
        assert_eq!(p.check(), Vec::<String>::new());
    }

    #[test]
    fn reclaim_dead_while_a_live_freer_is_in_the_dead_owners_inbox() {
        let _serial = serial();
        reclaim_while_a_live_freer_holds_the_dead_owners_inbox(false);
    }

    #[test]
    fn reclaim_dead_and_slot_reuse_while_a_live_freer_is_in_the_inbox() {
        let _serial = serial();
        reclaim_while_a_live_freer_holds_the_dead_owners_inbox(true);
    }

    #[test]
    fn an_owner_killed_while_draining_its_inbox() {
        let _serial = serial();
        let _w = Watchdog::new("owner killed draining", 60);
        let p = anon(1024);
        let pg = p.geometry().page_size;
        // SAFETY: atomics only, valid when zeroed.
        let mail = unsafe { SharedMem::<[AtomicU64; 9]>::new() };
        let mut owner = fork_child(|| {
            die_with_parent();
            for i in 0..6 {
                mail[i].store(p.alloc(pg).unwrap() as u64, SeqCst);
            }
            mail[8].store(1, SeqCst);
            wait_until(T, || mail[8].load(SeqCst) == 2)?;
            crashpoint::arm(Some(CrashPoint::InboxDrainMoving));
            p.alloc(pg).map_err(|e| format!("{e:?}"))?;
            Err("not stopped".into())
        });
        wait_until(T, || mail[8].load(SeqCst) == 1).unwrap();
        for i in 0..5 {
            p.free(mail[i].load(SeqCst) as usize).unwrap();
        }
        mail[8].store(2, SeqCst);
        owner.wait_stopped(T).unwrap();
        owner.kill();
        let s = p.stats();
        assert_eq!(s.free_bytes, (1024 - 1) * pg, "only its live block is held");
        assert_eq!(p.check(), Vec::<String>::new());
        let r = p.reclaim_dead().unwrap();
        assert_eq!((r.blocks, r.pages), (1, 1));
        let s = p.stats();
        assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
        assert_eq!(p.check(), Vec::<String>::new());
    }
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn staged_inbox_deaths_need_crash_points() {
    let _serial = serial();
    common::skipped("inbox staged deaths", "needs --features crash-points");
}
