//! A process opening a pool whose derived metadata was damaged repairs it
//! before use (and counts a recovery); a sound pool is left alone.

mod common;

use common::*;
use shmpool::{CreateOptions, Pool};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

fn named(name: &ShmName, bytes: usize) -> Pool {
    let opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: false,
    };
    Pool::create(bytes, &opts).unwrap()
}

/// A pool of 64 pages holding a live block of 3 pages (returned) and, after
/// it, one free run of 61 pages (a 40-page block freed, cache flushed).
fn with_a_block_and_a_free_run(name: &ShmName, pg: usize) -> (Pool, usize) {
    let p = named(name, 64 * pg);
    let a = p.alloc(3 * pg).unwrap();
    let b = p.alloc(40 * pg).unwrap();
    p.free(b).unwrap();
    p.flush_cache().unwrap();
    (p, a)
}

#[test]
fn attach_repairs_damaged_derived_state_and_keeps_blocks() {
    let _serial = serial();
    let name = ShmName::new();
    let pg = shmpool::mapping::page_size();
    let (p, a) = with_a_block_and_a_free_run(&name, pg);
    let before = p.stats();

    // A sound pool: attaching changes nothing.
    let q = Pool::attach(name.as_str()).unwrap();
    assert_eq!(q.stats().recoveries, 0);
    drop(q);

    // Damage derived state only: the free-page counter in the header
    // (AllocState::free_pages, found by its value).
    let hdr = p.base() as *mut u64;
    let words = std::mem::size_of::<shmpool::layout::Header>() / 8;
    let free_pages = before.free_bytes as u64 / pg as u64;
    // SAFETY: reads and writes words of our own pool's header, in bounds.
    let hits = unsafe {
        (0..words)
            .filter(|&i| *hdr.add(i) == free_pages)
            .inspect(|&i| *hdr.add(i) = 7)
            .count()
    };
    assert!(hits >= 1, "free_pages counter not found");
    assert!(
        !p.check().is_empty(),
        "the damage must be visible to check()"
    );

    let q = Pool::attach(name.as_str()).unwrap();
    assert_eq!(q.check(), Vec::<String>::new());
    let s = q.stats();
    assert_eq!(s.recoveries, 1);
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (before.free_bytes, before.largest_free_bytes, 1)
    );
    assert_eq!(q.size(a), Ok(3 * pg));
    q.free(a).unwrap();
    q.flush_cache().unwrap();
    assert_eq!(q.stats().free_bytes, 64 * pg);
}

/// The recovery counter is a damaged header word like any other: a repair
/// on attach counts one more recovery with wrap-around, never an overflow
/// (a panic in the dev profile, caught under the lock, that rebuilt twice).
#[test]
fn attach_repair_counts_a_recovery_past_a_damaged_counter() {
    let _serial = serial();
    let _w = Watchdog::new("attach_repair past u64::MAX", 30);
    let name = ShmName::new();
    let pg = shmpool::mapping::page_size();
    let p = named(&name, 64 * pg);
    let a = p.alloc(3 * pg).unwrap();
    let hdr = p.base();
    let off = std::mem::offset_of!(shmpool::layout::Header, recoveries);
    let free_pages = p.stats().free_bytes as u64 / pg as u64;
    // SAFETY: words of our own pool's header, in bounds and aligned; no
    // other process uses the pool.
    unsafe {
        hdr.add(off).cast::<u64>().write(u64::MAX);
        let words = std::mem::size_of::<shmpool::layout::Header>() / 8;
        let w = hdr.cast::<u64>();
        let hits = (0..words)
            .filter(|&i| *w.add(i) == free_pages)
            .inspect(|&i| *w.add(i) = 7)
            .count();
        assert!(hits >= 1, "free_pages counter not found");
    }
    assert!(!p.check().is_empty());
    // In a child, whose panic hook counts every panic, caught or not.
    // SAFETY: atomics only.
    let panics: SharedMem<AtomicU64> = unsafe { SharedMem::new() };
    let n = name.as_str().to_string();
    let mut c = fork_child(|| {
        let count = &*panics as *const AtomicU64 as usize;
        std::panic::set_hook(Box::new(move |info| {
            // SAFETY: the shared counter stays mapped while this child lives.
            unsafe { &*(count as *const AtomicU64) }.fetch_add(1, SeqCst);
            say(&format!("panic: {info}"));
        }));
        let q = Pool::attach(&n).map_err(|e| e.to_string())?;
        let (v, r) = (q.check(), q.stats().recoveries);
        if !v.is_empty() || r != 0 {
            return Err(format!("after the repair: check {v:?}, recoveries {r}"));
        }
        Ok(())
    });
    c.wait_ok(Duration::from_secs(10)).unwrap();
    assert_eq!(panics.load(SeqCst), 0, "a panic while repairing");
    assert_eq!(p.size(a), Ok(3 * pg));
    p.free(a).unwrap();
    assert!(p.check().is_empty());
}

/// A free run whose length word was damaged to say 0 pages (found by
/// `torture_fuzz`, a descriptor byte zeroed): `check` stepped 0 pages at a
/// time, pushing a violation per step, so `check` and the repair an attach
/// runs before use never returned and grew without bound. Now `check`
/// reports the run and stops, and the attach rebuilds the pool.
#[test]
fn a_free_run_of_length_zero_is_damage_not_an_endless_walk() {
    let _serial = serial();
    let _w = Watchdog::new("free run of length 0", 60);
    let name = ShmName::new();
    let pg = shmpool::mapping::page_size();
    let (p, a) = with_a_block_and_a_free_run(&name, pg);
    // The free run after `a` starts at page 3; its length word is the next
    // page's descriptor.
    let g = p.geometry();
    let run = (a - g.payload_offset) / pg + 3;
    let len_at = g.desc_offset + 8 * (run + 1);
    // SAFETY: a descriptor word of our own pool, in bounds and aligned; no
    // other process uses the pool.
    unsafe {
        let w = p.base().add(len_at).cast::<u64>();
        assert_eq!(*w, shmpool::desc::len_word(61), "the run's length word");
        w.write(shmpool::desc::len_word(0));
    }
    // Both in a child: before the fix neither returned.
    let n = name.as_str().to_string();
    let mut c = fork_child(|| {
        let v = p.check();
        if !v
            .iter()
            .any(|m| m.contains(&format!("free run at {run} has bad length 0")))
        {
            return Err(format!("check: {v:?}"));
        }
        let q = Pool::attach(&n).map_err(|e| e.to_string())?;
        let (v, r) = (q.check(), q.stats().recoveries);
        if !v.is_empty() || r != 1 {
            return Err(format!("after the repair: check {v:?}, recoveries {r}"));
        }
        if q.size(a) != Ok(3 * pg) {
            return Err(format!("the live block: {:?}", q.size(a)));
        }
        Ok(())
    });
    c.wait_ok(Duration::from_secs(20)).unwrap();
}
