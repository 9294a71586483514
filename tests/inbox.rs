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

/// Frees `blocks` of `p` from a forked child (which never allocated: it
/// registers to free), and waits for it.
fn freed_by_another_process(p: &Pool, blocks: &[usize]) {
    let mut c = fork_child(|| {
        for &o in blocks {
            p.free(o).map_err(|e| format!("free: {e:?}"))?;
        }
        Ok(())
    });
    c.wait_ok(T).unwrap();
}

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
    // As many pages as the owner waits for before it takes them back.
    let n = p.inbox_reserve_pages() as usize;
    assert_eq!(n, 16, "a 64th of the pool");
    let mut mine: Vec<usize> = (0..n).map(|_| p.alloc(pg).unwrap()).collect();
    mine.sort();
    // Another process frees them: it never allocated (it registers to free).
    freed_by_another_process(&p, &mine);
    // Waiting for us, counted as free, listed as cached, sound.
    assert_eq!(cached_offsets(&p), mine, "the blocks wait in our inbox");
    assert_eq!(p.check(), Vec::<String>::new());
    for &o in &mine {
        assert!(p.free(o).is_err(), "a freed block is not freed twice");
    }
    // Our next allocations take them, without coalescing them first.
    let mut again: Vec<usize> = (0..n).map(|_| p.alloc(pg).unwrap()).collect();
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
fn the_inbox_takes_every_cacheable_block_and_stats_coalesces_them() {
    let _serial = serial();
    let _w = Watchdog::new("inbox take-all", 60);
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
    // All but the 65-page block (longer than the cache's classes) wait for
    // us: the inbox is a list, it has no fixed room (it had 9 entries).
    let waiting = cached_offsets(&p);
    let mut want: Vec<usize> = blocks.iter().filter(|b| b.1 <= 64).map(|b| b.0).collect();
    want.sort();
    assert_eq!(waiting, want);
    assert_eq!(p.check(), Vec::<String>::new());
    // stats counts them as free and gives them back to the free runs.
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (1024 * pg, 1024 * pg));
    assert_eq!(s.live_blocks, 0);
    assert_eq!(cached_offsets(&p), Vec::<usize>::new());
    assert!(held > 0);
    assert_eq!(p.check(), Vec::<String>::new());
}

/// The owner leaves what other processes freed for it in its inbox until
/// the inbox holds its reserve of pages, allocating from the free runs
/// meanwhile, and then reuses the blocks freed longest ago first (the
/// lines of a block just freed are still the freer's; see `cache.rs`).
#[test]
fn the_owner_waits_for_its_inbox_reserve_and_reuses_the_oldest_first() {
    let _serial = serial();
    let _w = Watchdog::new("inbox reserve", 60);
    let p = anon(8192);
    let pg = p.geometry().page_size;
    let r = p.inbox_reserve_pages() as usize;
    assert_eq!(r, 128, "a 64th of the pool");
    let mine: Vec<usize> = (0..2 * r).map(|_| p.alloc(pg).unwrap()).collect();
    // Fewer pages than the reserve wait: the owner leaves them there.
    freed_by_another_process(&p, &mine[..r - 1]);
    let fresh = p.alloc(pg).unwrap();
    assert!(!mine.contains(&fresh), "a fresh block, not a waiting one");
    let mut waiting = mine[..r - 1].to_vec();
    waiting.sort();
    assert_eq!(cached_offsets(&p), waiting, "they still wait in the inbox");
    // The rest, in their order: now the inbox holds more than the reserve.
    freed_by_another_process(&p, &mine[r - 1..]);
    assert_eq!(p.check(), Vec::<String>::new());
    // The owner takes the oldest batch first: none of its next allocations
    // is one of the blocks freed last (a list pushed at its head gave the
    // newest first).
    let newest = &mine[r..];
    let first: Vec<usize> = (0..32).map(|_| p.alloc(pg).unwrap()).collect();
    for o in &first {
        assert!(mine[..r].contains(o), "{o} is not among the oldest freed");
        assert!(!newest.contains(o));
    }
    let mut rest: Vec<usize> = (0..2 * r - 32).map(|_| p.alloc(pg).unwrap()).collect();
    rest.extend(&first);
    rest.sort();
    let mut all = mine.clone();
    all.sort();
    assert_eq!(rest, all, "every handed-off block comes back to its owner");
    assert_eq!(p.check(), Vec::<String>::new());
    for o in rest.into_iter().chain([fresh]) {
        p.free(o).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (8192 * pg, 8192 * pg));
}

/// While its chain still feeds its stacks, an owner that finds nothing of
/// the wanted size on it takes the locked path rather than the blocks in
/// its inbox (freed more recently, their lines still the freer's; see
/// `cache.rs`): with mixed sizes that measured faster (7.0-7.2 against
/// 6.5-6.7 M blocks/s). A policy of performance, pinned here so that it
/// does not change unnoticed.
#[test]
fn an_owner_whose_chain_still_feeds_its_stacks_leaves_its_inbox_alone() {
    let _serial = serial();
    let _w = Watchdog::new("inbox policy", 60);
    let p = anon(8192);
    let pg = p.geometry().page_size;
    assert_eq!(p.inbox_reserve_pages(), 128);
    let twos: Vec<usize> = (0..100).map(|_| p.alloc(2 * pg).unwrap()).collect();
    let ones: Vec<usize> = (0..200).map(|_| p.alloc(pg).unwrap()).collect();
    // 200 pages of 2-page blocks come back: our next 2-page alloc takes
    // them onto our chain, and 32 of them into our stack.
    freed_by_another_process(&p, &twos);
    let t = p.alloc(2 * pg).unwrap();
    assert!(twos.contains(&t), "a handed-back block");
    // 200 pages of 1-page blocks come back: more than the reserve.
    freed_by_another_process(&p, &ones);
    // Our chain holds only 2-page blocks, and still has room to give one
    // to our stack: a 1-page alloc goes to the free runs.
    let one = p.alloc(pg).unwrap();
    assert!(
        !ones.contains(&one),
        "a fresh block, not one from the inbox"
    );
    let mut waiting = cached_offsets(&p);
    waiting.retain(|o| ones.contains(o));
    assert_eq!(waiting.len(), 200, "the 1-page blocks still wait");
    assert_eq!(p.check(), Vec::<String>::new());
    p.free(t).unwrap();
    p.free(one).unwrap();
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (8192 * pg, 8192 * pg));
    assert_eq!(p.check(), Vec::<String>::new());
}

/// A chain left holding only blocks of sizes the owner no longer asks for
/// (their stack full, so they go back on the chain at every miss) must not
/// keep the owner from its inbox for good: once the inbox holds its
/// reserve, the owner takes the blocks handed back to it again. With the
/// reserve as first written (086bdf4) the owner spliced only an empty
/// chain, so here it never took its inbox again: every alloc took the pool
/// lock, and the inbox grew to a quarter of the pool (then every remote
/// free took the pool lock too). Before the reserve, any miss spliced the
/// inbox.
#[test]
fn a_chain_of_sizes_the_owner_no_longer_asks_for_does_not_shut_its_inbox() {
    let _serial = serial();
    let _w = Watchdog::new("inbox behind a stuck chain", 60);
    let p = anon(8192);
    let pg = p.geometry().page_size;
    let r = p.inbox_reserve_pages() as usize;
    assert_eq!(r, 128, "a 64th of the pool");
    // Our stack of 1-page blocks full (we free 32 ourselves), and more
    // 1-page blocks handed back to us: a reserve's worth and then some.
    let own: Vec<usize> = (0..32).map(|_| p.alloc(pg).unwrap()).collect();
    let handed: Vec<usize> = (0..r + 32).map(|_| p.alloc(pg).unwrap()).collect();
    for &o in &own {
        p.free(o).unwrap();
    }
    freed_by_another_process(&p, &handed);
    // From now on we hand off 2-page blocks only. The first miss splices
    // the 1-page blocks onto our chain, where they stay (no room for them).
    let mut first: Vec<usize> = (0..r).map(|_| p.alloc(2 * pg).unwrap()).collect();
    freed_by_another_process(&p, &first);
    // 2 * r pages wait in our inbox, twice the reserve: we take them back.
    let mut again: Vec<usize> = (0..r).map(|_| p.alloc(2 * pg).unwrap()).collect();
    first.sort();
    again.sort();
    let reused = again
        .iter()
        .filter(|o| first.binary_search(o).is_ok())
        .count();
    assert_eq!(
        reused, r,
        "the owner reused {reused} of the {r} blocks waiting in its inbox"
    );
    assert_eq!(p.check(), Vec::<String>::new());
    for o in again {
        p.free(o).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (8192 * pg, 8192 * pg));
}

/// In a pool nearly full (fewer free pages than the reserve), a hand-off
/// must not force a take-back of every process's cache each time the free
/// runs are used up, when the owner's inbox holds the very blocks it
/// needs: the take-back walks every descriptor under the pool lock and
/// empties every cache. Here the owner keeps a 3-page block in its own
/// stack; a take-back would free it. Before the reserve the owner's miss
/// took its inbox; with the reserve as first written (086bdf4) its alloc
/// went to the free runs, found none, and took every cache back (here at
/// the second round).
#[test]
fn a_hand_off_in_a_nearly_full_pool_needs_no_take_back() {
    let _serial = serial();
    let _w = Watchdog::new("nearly full hand-off", 60);
    let p = anon(1024);
    let pg = p.geometry().page_size;
    assert_eq!(p.inbox_reserve_pages(), 16, "a 64th of the pool");
    let y = p.alloc(3 * pg).unwrap();
    // 12 pages left free (fewer than the reserve), with small blocks only
    // (no large cache).
    let mut filler: Vec<usize> = (0..15).map(|_| p.alloc(64 * pg).unwrap()).collect();
    filler.push(p.alloc(49 * pg).unwrap());
    p.free(y).unwrap();
    assert_eq!(cached_offsets(&p), vec![y], "our 3-page block is cached");
    for round in 0..6 {
        let batch: Vec<usize> = (0..8).map(|_| p.alloc(pg).unwrap()).collect();
        assert!(
            batch.iter().all(|o| !(y..y + 3 * pg).contains(o)),
            "round {round}: our cache was taken back (our 3-page block's pages reused)"
        );
        freed_by_another_process(&p, &batch);
    }
    assert_eq!(p.check(), Vec::<String>::new());
    for o in filler {
        p.free(o).unwrap();
    }
}

/// A burst of hand-offs far deeper than the owner's stacks: every free
/// goes to the inbox (no pool lock), the owner's next allocations take
/// exactly those blocks back, through its chain, and the records stay exact
/// at every step.
#[test]
fn a_deep_hand_off_burst_goes_through_the_inbox_and_back() {
    let _serial = serial();
    let _w = Watchdog::new("inbox burst", 60);
    let p = anon(4096);
    let pg = p.geometry().page_size;
    let n = 300; // 600 pages: within the inbox bound (a quarter of the pool)
    let mut mine: Vec<usize> = (0..n).map(|i| p.alloc((1 + i % 3) * pg).unwrap()).collect();
    mine.sort();
    freed_by_another_process(&p, &mine);
    assert_eq!(cached_offsets(&p), mine, "all {n} wait for us");
    assert_eq!(p.check(), Vec::<String>::new());
    let mut again = Vec::new();
    for i in 0..n {
        again.push(p.alloc((1 + i % 3) * pg).unwrap());
        if i % 97 == 0 {
            assert_eq!(p.check(), Vec::<String>::new(), "after {i} allocs");
        }
    }
    again.sort();
    assert_eq!(again, mine, "the same blocks, none from the free runs");
    assert_eq!(cached_offsets(&p), Vec::<usize>::new());
    for o in again {
        p.free(o).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (4096 * pg, 4096 * pg));
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

    #[test]
    fn a_freer_killed_between_linking_and_counting() {
        let _serial = serial();
        freer_killed_at(CrashPoint::InboxPushLinked, true);
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
        owner_killed_at(CrashPoint::InboxDrainMoving);
    }

    #[test]
    fn an_owner_killed_while_taking_blocks_off_its_chain() {
        owner_killed_at(CrashPoint::ChainTaking);
    }

    fn owner_killed_at(point: CrashPoint) {
        let _serial = serial();
        let _w = Watchdog::new("owner killed draining", 60);
        let p = anon(1024);
        let pg = p.geometry().page_size;
        // SAFETY: atomics only, valid when zeroed.
        let mail = unsafe { SharedMem::<[AtomicU64; 9]>::new() };
        // Blocks of 4 pages: the 5 freed fill the owner's inbox reserve
        // (16 pages here), so that its next alloc drains the inbox.
        let b = 4 * pg;
        assert!(5 * 4 >= p.inbox_reserve_pages());
        let mut owner = fork_child(|| {
            die_with_parent();
            for i in 0..6 {
                mail[i].store(p.alloc(b).unwrap() as u64, SeqCst);
            }
            mail[8].store(1, SeqCst);
            wait_until(T, || mail[8].load(SeqCst) == 2)?;
            crashpoint::arm(Some(point));
            p.alloc(b).map_err(|e| format!("{e:?}"))?;
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
        assert_eq!(
            s.free_bytes,
            (1024 - 4) * pg,
            "only its live block is held, at {point:?}"
        );
        assert_eq!(p.check(), Vec::<String>::new());
        let r = p.reclaim_dead().unwrap();
        assert_eq!((r.blocks, r.pages), (1, 4));
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

/// The hand-off ring of the random-kill test: the owner posts offsets at
/// `head`, the freer frees them and advances `tail`.
const KRING: usize = 128;
/// Freers killed and replaced per round.
const KILLS: u64 = 8;
#[repr(C)]
struct HandRing {
    head: AtomicU64,
    tail: AtomicU64,
    next: AtomicU64,
    offs: [AtomicU64; KRING],
}

/// The owner of the random-kill test: allocates 1 page or 1-64 pages (half
/// each) and posts the offsets, forever.
fn hand_owner(p: &Pool, ring: &HandRing, seed: u64) -> Result<(), String> {
    let pg = p.geometry().page_size;
    let mut r = Rng(seed);
    let mut k = ring.head.load(SeqCst);
    loop {
        if k - ring.tail.load(SeqCst) < KRING as u64 {
            let n = if r.below(2) == 0 { 1 } else { 1 + r.below(64) };
            let off = p
                .alloc(n as usize * pg)
                .map_err(|e| format!("alloc: {e:?}"))?;
            ring.offs[k as usize % KRING].store(off as u64, SeqCst);
            k += 1;
            ring.head.store(k, SeqCst);
        } else {
            std::thread::yield_now();
        }
    }
}

/// The freer: frees what the owner posts, forever. Before each free it
/// raises `next` past the block, so that a freer taking over from a killed
/// one (starting at `next`) leaves alone the block that one may have been
/// freeing: it may be freed already, and even allocated again and posted
/// further on (freeing it again would free that new allocation, a double
/// free of the test's own); if it was not freed, it stays the owner's live
/// block, for `reclaim_dead`.
fn hand_freer(p: &Pool, ring: &HandRing) -> Result<(), String> {
    let mut k = ring.next.load(SeqCst);
    loop {
        if k < ring.head.load(SeqCst) {
            let off = ring.offs[k as usize % KRING].load(SeqCst);
            ring.next.store(k + 1, SeqCst);
            p.free(off as usize)
                .map_err(|e| format!("free {k} of {off}: {e:?}"))?;
            k += 1;
            ring.tail.store(k, SeqCst);
        } else {
            std::thread::yield_now();
        }
    }
}

/// Random SIGKILLs during a hand-off (the freer again and again, then the
/// owner, the freer, or both, in any order, at any step of an alloc, a
/// remote free or a drain): nothing
/// is lost or duplicated. After each round `check` is clean, allocating
/// `largest_free_bytes` again and again obtains exactly `free_bytes`,
/// `reclaim_dead` gives back the dead owner's blocks (those posted and not
/// freed, give or take the ones the killed processes were handling),
/// and then the pool is whole again.
#[test]
fn random_kills_during_hand_off_lose_and_duplicate_nothing() {
    let _serial = serial();
    let _w = Watchdog::new("hand-off random kills", 600);
    let total = 16384;
    let p = anon(total);
    let pg = p.geometry().page_size;
    let mut rng = Rng(0x4a4d_0ff5);
    let rounds = 30 * scale();
    let pause = |rng: &mut Rng| std::thread::sleep(Duration::from_micros(100 + rng.below(1000)));
    for round in 0..rounds {
        // SAFETY: atomics only, valid when zeroed.
        let ring = unsafe { SharedMem::<HandRing>::new() };
        let seed = rng.next();
        let mut owner = fork_child(|| {
            die_with_parent();
            hand_owner(&p, &ring, seed)
        });
        let mut freer = fork_child(|| {
            die_with_parent();
            hand_freer(&p, &ring)
        });
        pause(&mut rng);
        if round % 3 == 0 {
            // While they run: a slot in the middle of an operation is left
            // out, anything else must be sound.
            assert_eq!(p.check(), Vec::<String>::new(), "round {round}, running");
        }
        for c in [&mut owner, &mut freer] {
            assert_eq!(c.poll(), None, "round {round}: a worker stopped by itself");
        }
        // The freer dies again and again (at any step of its frees: most of
        // its time is spent in them, the ring being full), and a new one
        // takes over each time; the owner goes on.
        for j in 0..KILLS {
            let st = freer.kill();
            assert!(
                libc::WIFSIGNALED(st),
                "round {round}, kill {j}: the freer stopped by itself ({})",
                describe(st)
            );
            // A freer killed inside the owner's inbox leaves its lock held:
            // check takes it over, and must find every record exact.
            assert_eq!(p.check(), Vec::<String>::new(), "round {round}, kill {j}");
            freer = fork_child(|| {
                die_with_parent();
                hand_freer(&p, &ring)
            });
            pause(&mut rng);
            assert_eq!(owner.poll(), None, "round {round}: owner stopped");
        }
        let mode = rng.below(3);
        match mode {
            0 => {
                freer.kill();
                owner.kill();
            }
            1 => {
                // The owner dies; the freer goes on freeing its blocks.
                owner.kill();
                pause(&mut rng);
                assert_eq!(freer.poll(), None, "round {round}: freer stopped");
                freer.kill();
            }
            _ => {
                // SAFETY: plain signals to our own children.
                unsafe {
                    libc::kill(owner.pid, libc::SIGKILL);
                    libc::kill(freer.pid, libc::SIGKILL);
                }
                owner.kill();
                freer.kill();
            }
        }
        let (h, t) = (ring.head.load(SeqCst), ring.tail.load(SeqCst));
        assert_eq!(
            p.check(),
            Vec::<String>::new(),
            "round {round}, mode {mode}"
        );
        // Greedy allocation obtains exactly what stats calls free.
        let free = p.stats().free_bytes;
        let mut got = Vec::new();
        loop {
            let l = p.stats().largest_free_bytes;
            if l == 0 {
                break;
            }
            got.push((p.alloc(l).unwrap(), l));
        }
        let sum: usize = got.iter().map(|g| g.1).sum();
        assert_eq!(sum, free, "round {round}, mode {mode}: greedy allocation");
        for (o, _) in got {
            p.free(o).unwrap();
        }
        let r = p.reclaim_dead().unwrap();
        // Posted and not freed, give or take the one the owner was
        // allocating and the one the last freer was freeing when killed,
        // plus the ones the replaced freers may have left (`next`).
        let posted = h - t;
        assert!(
            r.blocks + 1 >= posted && r.blocks <= posted + 1 + KILLS,
            "round {round}, mode {mode}: reclaimed {} blocks, {posted} posted and not freed",
            r.blocks
        );
        let s = p.stats();
        assert_eq!(
            (s.free_bytes, s.largest_free_bytes, s.live_blocks),
            (total * pg, total * pg, 0),
            "round {round}, mode {mode}"
        );
        assert_eq!(
            p.check(),
            Vec::<String>::new(),
            "round {round}, mode {mode}"
        );
    }
}
