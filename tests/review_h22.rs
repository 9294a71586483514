//! Review of the unbounded inbox and chain (h21-handoff, issue 13): a live
//! owner's stacks and chain taken back under its feet, again and again.
//!
//! An owner hands blocks to a freer (its inbox, its chain) and frees some of
//! its own (its stacks), while a third process repeatedly calls `stats` and
//! `check` (which take inboxes back) and allocates the whole pool in single
//! pages (an alloc that finds no free run takes every cache back: the
//! owner's stacks, chain and inbox, bumping its `taken` count). Every block
//! is stamped by whoever holds it and verified before it is freed, so a
//! block handed out twice (a stale stack entry or chain link after a
//! take-back) shows as a foreign stamp.

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const RING: usize = 256;

#[repr(C)]
struct Ring {
    head: AtomicU64,
    tail: AtomicU64,
    /// Set by the owner when it is done; by anyone on a failure.
    done: AtomicU64,
    /// Rounds the taker completed (each took every cache back).
    rounds: AtomicU64,
    /// (offset, pages, stamp) per entry.
    offs: [AtomicU64; RING],
    lens: [AtomicU64; RING],
    ids: [AtomicU64; RING],
}

#[test]
fn a_live_owners_cache_taken_back_under_its_feet_hands_out_nothing_twice() {
    let _serial = serial();
    let _w = Watchdog::new("review h22 take-back under a live owner", 600);
    let total = 2048usize;
    let p = anon(total);
    let pg = p.geometry().page_size;
    // SAFETY: atomics only, valid when zeroed.
    let ring = unsafe { SharedMem::<Ring>::new() };
    let handoffs = 400_000 * scale();
    let mut owner = fork_child(|| {
        die_with_parent();
        let mut r = Rng(0x0dd_b10c);
        let mut own: Vec<(usize, usize, u64)> = Vec::new();
        let mut id = 1u64 << 40;
        let mut k = 0u64;
        let alloc = |n: usize| -> Result<usize, String> {
            loop {
                match p.alloc(n * pg) {
                    Ok(o) => return Ok(o),
                    Err(shmpool::Error::OutOfMemory) => std::thread::yield_now(),
                    Err(e) => return Err(format!("owner alloc: {e:?}")),
                }
                if ring.done.load(SeqCst) != 0 {
                    return Err("stopped".into());
                }
            }
        };
        while k < handoffs {
            if ring.done.load(SeqCst) > 1 {
                return Err("another process failed".into());
            }
            // Own blocks: through our stacks.
            if r.below(3) == 0 {
                if own.len() < 24 {
                    let n = 1 + r.below(3) as usize;
                    let o = alloc(n)?;
                    id += 1;
                    mark(&p, o, n * pg, id);
                    own.push((o, n, id));
                } else {
                    let (o, n, v) = own.swap_remove(r.below(own.len() as u64) as usize);
                    if !marked(&p, o, n * pg, v) {
                        ring.done.store(2, SeqCst);
                        return Err(format!("owner: own block {o} lost its stamp {v}"));
                    }
                    p.free(o).map_err(|e| format!("owner free {o}: {e:?}"))?;
                }
                continue;
            }
            // Hand-off: 1 or 2 pages, to the freer.
            if k - ring.tail.load(SeqCst) >= RING as u64 {
                std::thread::yield_now();
                continue;
            }
            let n = 1 + r.below(2) as usize;
            let o = alloc(n)?;
            id += 1;
            mark(&p, o, n * pg, id);
            let i = k as usize % RING;
            ring.offs[i].store(o as u64, SeqCst);
            ring.lens[i].store(n as u64, SeqCst);
            ring.ids[i].store(id, SeqCst);
            k += 1;
            ring.head.store(k, SeqCst);
        }
        for (o, n, v) in own {
            if !marked(&p, o, n * pg, v) {
                ring.done.store(2, SeqCst);
                return Err(format!("owner: own block {o} lost its stamp {v}"));
            }
            p.free(o).map_err(|e| format!("owner free {o}: {e:?}"))?;
        }
        ring.done.store(1, SeqCst);
        Ok(())
    });
    let mut freer = fork_child(|| {
        die_with_parent();
        let mut k = 0u64;
        loop {
            if k < ring.head.load(SeqCst) {
                let i = k as usize % RING;
                let (o, n, v) = (
                    ring.offs[i].load(SeqCst) as usize,
                    ring.lens[i].load(SeqCst) as usize,
                    ring.ids[i].load(SeqCst),
                );
                if !marked(&p, o, n * pg, v) {
                    ring.done.store(2, SeqCst);
                    return Err(format!("freer: block {o} ({n} pages) lost its stamp {v}"));
                }
                p.free(o).map_err(|e| format!("freer free {o}: {e:?}"))?;
                k += 1;
                ring.tail.store(k, SeqCst);
            } else if ring.done.load(SeqCst) != 0 {
                return if ring.done.load(SeqCst) == 1 {
                    Ok(())
                } else {
                    Err("another process failed".into())
                };
            } else {
                std::thread::yield_now();
            }
        }
    });
    let mut taker = fork_child(|| {
        die_with_parent();
        let mut round = 0u64;
        let mut id = 1u64 << 50;
        while ring.done.load(SeqCst) == 0 {
            round += 1;
            let _ = p.stats();
            if round % 8 == 0 {
                let v = p.check();
                if !v.is_empty() {
                    ring.done.store(2, SeqCst);
                    return Err(format!("check while running, round {round}: {v:?}"));
                }
            }
            // The whole pool in single pages: takes every cache back.
            let mut got = Vec::new();
            while let Ok(o) = p.alloc(pg) {
                id += 1;
                mark(&p, o, pg, id);
                got.push((o, id));
            }
            for (o, v) in got {
                if !marked(&p, o, pg, v) {
                    ring.done.store(2, SeqCst);
                    return Err(format!("taker: page {o} lost its stamp {v}, round {round}"));
                }
                p.free(o).map_err(|e| format!("taker free {o}: {e:?}"))?;
            }
            ring.rounds.store(round, SeqCst);
            std::thread::yield_now();
        }
        Ok(())
    });
    let r = (
        owner.wait_ok(Duration::from_secs(500)),
        freer.wait_ok(T),
        taker.wait_ok(T),
    );
    assert_eq!(r, (Ok(()), Ok(()), Ok(())));
    let rounds = ring.rounds.load(SeqCst);
    say(&format!(
        "{handoffs} hand-offs, {rounds} whole-pool take-back rounds"
    ));
    assert!(rounds > 0, "the taker never took the caches back");
    let _ = p.reclaim_dead().unwrap();
    let s = p.stats();
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (total * pg, total * pg, 0)
    );
    assert_eq!(p.check(), Vec::<String>::new());
}

/// Tiny pools (1 to 9 pages, odd counts included): the link words sit right
/// after the descriptors; remote frees go to the inbox only when a quarter
/// of the pool is at least a page, and blocks the owner's (empty) stacks
/// cannot take stay on its chain, counted as free and taken back when
/// memory runs out.
#[test]
fn tiny_pools_hand_off_and_account_exactly() {
    let _serial = serial();
    let _w = Watchdog::new("review h22 tiny pools", 120);
    for total in [1usize, 2, 3, 4, 5, 7, 8, 9] {
        let p = anon(total);
        let pg = p.geometry().page_size;
        let g = p.geometry();
        assert!(g.link_offset >= g.desc_offset + 8 * total);
        assert!(g.link_offset + 4 * total <= g.payload_offset);
        // SAFETY: atomics only, valid when zeroed.
        let mail = unsafe { SharedMem::<[AtomicU64; 16]>::new() };
        // The owner allocates everything, the child frees it all.
        let mut blocks = Vec::new();
        while let Ok(o) = p.alloc(pg) {
            blocks.push(o);
        }
        assert_eq!(blocks.len(), total, "{total} pages");
        for (i, &o) in blocks.iter().enumerate() {
            mail[i].store(o as u64, SeqCst);
        }
        let n = blocks.len();
        let mut c = fork_child(|| {
            die_with_parent();
            for i in 0..n {
                p.free(mail[i].load(SeqCst) as usize)
                    .map_err(|e| format!("free: {e:?}"))?;
            }
            Ok(())
        });
        c.wait_ok(T).unwrap();
        assert_eq!(p.check(), Vec::<String>::new(), "{total} pages");
        // Allocating again gets every page back (inbox, chain or runs).
        let mut again = Vec::new();
        while let Ok(o) = p.alloc(pg) {
            again.push(o);
        }
        assert_eq!(again.len(), total, "{total} pages, second round");
        assert_eq!(p.check(), Vec::<String>::new(), "{total} pages");
        for o in again {
            p.free(o).unwrap();
        }
        let s = p.stats();
        assert_eq!(
            (s.free_bytes, s.largest_free_bytes, s.live_blocks),
            (total * pg, total * pg, 0),
            "{total} pages"
        );
        assert_eq!(p.check(), Vec::<String>::new(), "{total} pages");
    }
}
