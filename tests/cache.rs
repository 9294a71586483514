//! The per-process cache of freed small blocks (see rust/src/pool.rs):
//! reuse without the lock, accounting in stats, take-back when memory runs
//! out, bad frees of cached blocks, a dying process's cache, fork.

mod common;

use common::*;
use shmpool::{Error, Pool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn clean(p: &Pool) {
    assert_eq!(p.check(), Vec::<String>::new());
}

#[test]
fn a_freed_block_is_cached_and_reused_first() {
    let _serial = serial();
    let p = anon(256);
    let pg = p.geometry().page_size;
    let a = p.alloc(pg).unwrap();
    let _b = p.alloc(pg).unwrap();
    p.free(a).unwrap();
    // Cached: no longer a block, counted free, listed as cached.
    assert_eq!(p.size(a), Err(Error::NotABlock));
    assert_eq!(
        p.free(a),
        Err(Error::NotABlock),
        "double free of a cached block"
    );
    assert!(p
        .debug_info()
        .contains(&format!("cached in processes (offs->bsize): {{{a}->{pg}}}")));
    clean(&p);
    // The next 1-page alloc gets it back.
    assert_eq!(p.alloc(pg).unwrap(), a);
    assert_eq!(p.size(a), Ok(pg));
    clean(&p);
}

#[test]
fn stats_counts_cached_blocks_as_free_and_flushes_its_own() {
    let _serial = serial();
    let p = anon(256);
    let pg = p.geometry().page_size;
    let full = p.stats();
    let blocks: Vec<usize> = (0..8).map(|_| p.alloc(2 * pg).unwrap()).collect();
    for &b in &blocks {
        p.free(b).unwrap();
    }
    // stats gives this process's cache back first: exact and coalesced.
    let s = p.stats();
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (full.free_bytes, full.free_bytes, 0)
    );
    clean(&p);
}

#[test]
fn tiny_pools_do_not_cache() {
    let _serial = serial();
    // A 16th of the pool is the cap: a 1-page pool caches nothing.
    let p = anon(1);
    let pg = p.geometry().page_size;
    let a = p.alloc(pg).unwrap();
    p.free(a).unwrap();
    assert!(p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    assert_eq!(p.alloc(pg).unwrap(), a);
}

#[repr(C)]
struct Board {
    step: AtomicU64,
    go: AtomicU64,
}

#[test]
fn memory_cached_by_another_process_is_taken_back() {
    let _serial = serial();
    let _w = Watchdog::new("cache take-back", 30);
    let pages = 64usize;
    let p = anon(pages);
    let pg = p.geometry().page_size;
    // SAFETY: Board is made of atomics, valid when zero.
    let board = unsafe { SharedMem::<Board>::new() };
    let mut child = fork_child(|| {
        // Allocate 4 single pages and free them: they sit in our cache
        // (the cap is 64/16 = 4 pages).
        let v: Vec<usize> = (0..4).map(|_| p.alloc(pg).unwrap()).collect();
        for &o in &v {
            p.free(o).map_err(|e| e.to_string())?;
        }
        board.step.store(1, Ordering::SeqCst);
        wait_until(T, || board.go.load(Ordering::SeqCst) == 1)
    });
    wait_until(T, || board.step.load(Ordering::SeqCst) == 1).unwrap();
    // The child holds 4 cached pages; stats counts them free.
    assert_eq!(p.stats().free_bytes, pages * pg);
    // The whole pool in one block needs them: alloc takes them back.
    let all = p.alloc(pages * pg).unwrap();
    assert_eq!(p.size(all), Ok(pages * pg));
    clean(&p);
    board.go.store(1, Ordering::SeqCst);
    child.wait_ok(T).unwrap();
    p.free(all).unwrap();
    assert_eq!(p.stats().largest_free_bytes, pages * pg);
    clean(&p);
}

#[test]
fn a_dead_process_cache_is_reclaimed_not_counted_as_leaked() {
    let _serial = serial();
    let _w = Watchdog::new("dead cache", 30);
    let p = anon(256);
    let pg = p.geometry().page_size;
    let mut child = fork_child(|| {
        let keep = p.alloc(3 * pg).map_err(|e| e.to_string())?;
        let _ = keep;
        let c = p.alloc(pg).map_err(|e| e.to_string())?;
        p.free(c).map_err(|e| e.to_string())?; // cached, then we die
        Ok(())
    });
    child.wait_ok(T).unwrap();
    // Its cache went back to the free runs at the next lock acquisition
    // (issue 9.3 a): only its live block is left.
    let d = p.debug_info();
    assert!(d.contains("cached in processes (offs->bsize): {}"), "{d}");
    assert_eq!(p.stats().free_bytes, 253 * pg);
    clean(&p);
    let r = p.reclaim_dead().unwrap();
    assert_eq!(
        (r.blocks, r.pages),
        (1, 3),
        "only the live block counts as reclaimed"
    );
    assert_eq!(r.owners, vec![(child.pid, 3)]);
    let s = p.stats();
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (256 * pg, 256 * pg, 0)
    );
    assert!(p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    clean(&p);
}

#[test]
fn a_forked_child_cannot_reuse_its_parents_cache() {
    let _serial = serial();
    let _w = Watchdog::new("fork cache", 30);
    let p = anon(256);
    let pg = p.geometry().page_size;
    let a = p.alloc(pg).unwrap();
    p.free(a).unwrap(); // in the parent's cache
    let mut child = fork_child(|| {
        let b = p.alloc(pg).map_err(|e| e.to_string())?;
        if b == a {
            return Err("child got the parent's cached block".into());
        }
        p.free(b).map_err(|e| e.to_string())?;
        p.flush_cache().map_err(|e| e.to_string())
    });
    child.wait_ok(T).unwrap();
    // The parent still gets its own cached block back.
    assert_eq!(p.alloc(pg).unwrap(), a);
    clean(&p);
}

#[test]
fn another_process_can_free_a_block_the_owner_cached_only_once() {
    let _serial = serial();
    let _w = Watchdog::new("cross free", 30);
    let p = anon(256);
    let pg = p.geometry().page_size;
    let a = p.alloc(pg).unwrap();
    p.free(a).unwrap(); // cached by the parent
    let mut child = fork_child(|| match p.free(a) {
        Err(Error::NotABlock) => Ok(()),
        r => Err(format!(
            "free of a block cached by another process gave {r:?}"
        )),
    });
    child.wait_ok(T).unwrap();
    clean(&p);
}

#[test]
fn long_blocks_are_cached_split_and_merged() {
    let _serial = serial();
    let p = anon(4096);
    let pg = p.geometry().page_size;
    let a = p.alloc(100 * pg).unwrap();
    let _guard = p.alloc(pg).unwrap();
    p.free(a).unwrap();
    assert_eq!(p.size(a), Err(Error::NotABlock));
    clean(&p);
    // A shorter block is carved from the cached run (rust/src/large_cache.rs)...
    let b = p.alloc(99 * pg).unwrap();
    assert_eq!(b, a);
    assert!(p.debug_info().contains(&format!(
        "cached in processes (offs->bsize): {{{}->{pg}}}",
        a + 99 * pg
    )));
    clean(&p);
    // ...and freed, it waits unmerged beside its tail (deferred merging:
    // an alloc of its exact length would take it as it is)...
    p.free(b).unwrap();
    let info = p.debug_info();
    assert!(
        info.contains(&format!(
            "cached in processes (offs->bsize): {{{a}->{},{}->{pg}}}",
            99 * pg,
            a + 99 * pg
        )),
        "{info}"
    );
    clean(&p);
    // ...until an alloc finds no run of its exact length: then it merges
    // with its tail again, and the whole run comes back.
    assert_eq!(p.alloc(100 * pg).unwrap(), a);
    clean(&p);
    // Longer than half the bound (a 16th of the pool): never cached.
    let big = p.alloc(300 * pg).unwrap();
    p.free(big).unwrap();
    assert!(p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    clean(&p);
}

#[test]
fn caching_can_be_turned_off() {
    let _serial = serial();
    let p = anon(256);
    let pg = p.geometry().page_size;
    let a = p.alloc(pg).unwrap();
    let b = p.alloc(pg).unwrap();
    p.free(a).unwrap();
    assert!(!p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    // Turning it off gives the cache back.
    p.set_caching(false).unwrap();
    assert!(p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    p.free(b).unwrap();
    assert!(p
        .debug_info()
        .contains("cached in processes (offs->bsize): {}"));
    assert_eq!(p.stats().largest_free_bytes, 256 * pg);
    p.set_caching(true).unwrap();
    clean(&p);
}
