//! A pool formatted in ordinary heap memory and used by several threads at
//! once: every path that needs no kernel object (format, attach, the
//! locked alloc and free, the per-process cache, take-back, stats, check,
//! reclaim, debug_info).
//!
//! A fourth thread attaches meanwhile, reading the header while the
//! others hold the lock.
//!
//! Natively this is a small thread test. Its real purpose is Miri
//! (`make miri`, scripts/miri.sh), which runs it with its aliasing (Stacked
//! Borrows) and data-race checkers: threads stand in for the processes
//! that share a pool, so a `&`/`&mut` reference to shared state that
//! another thread writes, or a plain access racing another, is reported.

use shmpool::layout::{AllocState, Geometry, Header};
use shmpool::{Error, Pool};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::mem::offset_of;

/// Zeroed heap memory for a pool of `pages` payload pages, freed on drop.
struct Heap {
    ptr: *mut u8,
    layout: Layout,
}

impl Heap {
    fn new(pages: u32) -> Heap {
        let pg = shmpool::mapping::page_size();
        let len = Geometry::for_pages(pages, pg).unwrap().total_len;
        let layout = Layout::from_size_align(len, pg).unwrap();
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Heap { ptr, layout }
    }
}

impl Drop for Heap {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the pools built on
        // it are dropped first (declared after the Heap in each test).
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Runs `rounds` alloc/free rounds of mixed sizes, keeping a few blocks
/// live and writing into each block (so that Miri checks the user's side
/// too), and returns the blocks still held.
fn churn(p: &Pool, seed: usize, rounds: usize) -> Vec<usize> {
    let pg = p.geometry().page_size;
    let mut live: Vec<usize> = Vec::new();
    for i in 0..rounds {
        // 1 and 2 pages go through the cache, 3 pages now and then past it
        // via the lock; sizes beyond what is free fail (OutOfMemory) and
        // make alloc take cached blocks back.
        let pages = 1 + (i * 7 + seed) % 3;
        if let Ok(off) = p.alloc(pages * pg) {
            // SAFETY: the block is ours: `pages * pg` bytes at `off`.
            unsafe { p.addr(off).write_bytes(seed as u8, pages * pg) };
            live.push(off);
        }
        if !live.is_empty() && (live.len() > 6 || (i + seed) % 5 == 0) {
            let off = live.remove((i + seed) % live.len());
            assert_eq!(p.size(off).unwrap() % pg, 0);
            p.free(off).unwrap();
        }
    }
    live
}

#[test]
fn threads_share_a_heap_pool() {
    // Few pages, so that the threads run out and take cached blocks back
    // (the cache may hold a 16th of them: 2 pages).
    let heap = Heap::new(32);
    // SAFETY: fresh zeroed memory of the pool's size, used only as this pool.
    let pool = unsafe { Pool::format_in_place(heap.ptr, heap.layout.size(), true) }.unwrap();
    // SAFETY: the same memory, formatted above; outlives `other`.
    let other = unsafe { Pool::attach_in_place(heap.ptr, heap.layout.size()) }.unwrap();
    let rounds = if cfg!(miri) { 24 } else { 2000 };
    let held: Vec<Vec<usize>> = std::thread::scope(|s| {
        let a = s.spawn(|| churn(&pool, 0, rounds));
        let b = s.spawn(|| churn(&other, 1, rounds));
        let c = s.spawn(|| {
            // Readers that take the pool lock and read the slot counters
            // while the others cache and uncache blocks without it.
            for _ in 0..rounds / 8 {
                let st = pool.stats();
                assert!(st.free_bytes <= st.payload_bytes);
                assert_eq!(pool.check(), Vec::<String>::new());
            }
            Vec::new()
        });
        // Attaching checks the header while the others hold the lock (and
        // the allocator state as `&mut`): it must read nothing of theirs.
        let (ptr, len) = (heap.ptr as usize, heap.layout.size());
        let d = s.spawn(move || {
            for _ in 0..4 {
                // SAFETY: as for `other`.
                drop(unsafe { Pool::attach_in_place(ptr as *mut u8, len) }.unwrap());
            }
            Vec::new()
        });
        vec![
            a.join().unwrap(),
            b.join().unwrap(),
            c.join().unwrap(),
            d.join().unwrap(),
        ]
    });
    assert_eq!(pool.check(), Vec::<String>::new());
    assert!(pool.debug_info().contains("live_blocks"));
    assert!(!pool.owners().unwrap().is_empty());
    assert_eq!(pool.reclaim_dead().unwrap().blocks, 0);
    for off in held.into_iter().flatten() {
        other.free(off).unwrap();
    }
    pool.flush_cache().unwrap();
    other.flush_cache().unwrap();
    let st = pool.stats();
    assert_eq!((st.live_blocks, st.free_bytes), (0, st.payload_bytes));
    drop(other);
    drop(pool);
}

/// A header whose geometry and allocator disagree on the page count is not
/// a pool, and attaching it changes nothing (the allocator's count is only
/// read under the lock, so this check runs in `attach`'s first locked
/// section rather than before it).
#[test]
fn a_page_count_that_disagrees_is_not_a_pool() {
    let at = offset_of!(Header, alloc) + offset_of!(AllocState, npages);
    let total = offset_of!(Header, total_len);
    for (off, delta) in [(at, 1u64), (at, u64::MAX), (total, 1), (total, 4096)] {
        // A fresh pool each time (Miri does not let a mutex be restored
        // from a copy of its bytes).
        let heap = Heap::new(8);
        let len = heap.layout.size();
        // SAFETY: fresh zeroed memory of the pool's size, used only as this
        // pool; each pool is dropped before the memory is touched again.
        drop(unsafe { Pool::format_in_place(heap.ptr, len, true) }.unwrap());
        // SAFETY: inside the heap block; both fields are aligned integers.
        unsafe {
            if off == at {
                let p = heap.ptr.add(off).cast::<u32>();
                p.write(p.read().wrapping_add(delta as u32));
            } else {
                let p = heap.ptr.add(off).cast::<u64>();
                p.write(p.read().wrapping_add(delta));
            }
        }
        // SAFETY: as above.
        let damaged = unsafe { std::slice::from_raw_parts(heap.ptr, len).to_vec() };
        // SAFETY: the memory holds a (damaged) pool and outlives the call.
        match unsafe { Pool::attach_in_place(heap.ptr, len) } {
            Err(Error::NotAPool(_)) => {}
            Err(e) => panic!("offset {off} +{delta}: {e}"),
            Ok(_) => panic!("offset {off} +{delta}: attached"),
        }
        // SAFETY: as above.
        let after = unsafe { std::slice::from_raw_parts(heap.ptr, len) };
        assert!(after == damaged, "offset {off} +{delta}: memory changed");
    }
}
