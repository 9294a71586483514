//! The shared heap's Rust layer (rust/src/heap): allocation of black
//! blocks, growth and shrinking, the GC, pins, re-entrant locking,
//! destroy restoring the pool, and recovery of a heap whose holder was
//! SIGKILLed at a chosen step or at random.
//!
//! Values are built by hand as OCaml would see them: a list cell is a
//! block of tag 0 and two fields, `[int; next]`.

mod common;

use common::*;
use shmpool::heap::value::*;
use shmpool::heap::{Heap, HeapError};
use shmpool::Pool;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

fn field(v: u64, i: u64) -> u64 {
    // SAFETY: tests only read fields of values they built in a live heap.
    unsafe { ((v + 8 * i) as *const u64).read_volatile() }
}

fn set_field(v: u64, i: u64, x: u64) {
    // SAFETY: as above, under the heap lock.
    unsafe { ((v + 8 * i) as *mut u64).write_volatile(x) }
}

fn header(v: u64) -> u64 {
    field(v - 8, 0)
}

/// Builds the list `[from; from+1; ...; from+n-1]` (lock held).
fn build_list(h: &Heap, from: i64, n: i64) -> u64 {
    let mut l = VAL_UNIT;
    for k in (from..from + n).rev() {
        let c = h.alloc(2, 0).expect("alloc");
        set_field(c, 0, val_int(k));
        set_field(c, 1, l);
        l = c;
    }
    l
}

/// The ints of a list, or Err at the first malformed cell.
fn read_list(mut l: u64) -> Result<Vec<i64>, String> {
    let mut v = Vec::new();
    while l != VAL_UNIT {
        let hd = header(l);
        if !is_black(hd) || wosize(hd) != 2 || tag(hd) != 0 {
            return Err(format!("cell {} has header {hd:#x}", v.len()));
        }
        v.push(int_val(field(l, 0)));
        l = field(l, 1);
    }
    Ok(v)
}

fn assert_sound(h: &Heap) {
    let v = h.check();
    assert!(v.is_empty(), "heap check: {v:?}");
    let p = h.pool().check();
    assert!(p.is_empty(), "pool check: {p:?}");
}

/// The end of most tests: heap and pool sound, then the heap destroyed.
fn check_and_destroy(h: &Heap) {
    assert_sound(h);
    h.destroy().unwrap();
}

/// Makes the list `[from; ...; from+n-1]` the root (taking the lock).
fn set_root_list(h: &Heap, from: i64, n: i64) {
    h.with_lock(|h| {
        let l = build_list(h, from, n);
        h.set_root(l)
    })
    .unwrap();
}

#[test]
fn create_attach_destroy_restores_the_pool() {
    let _serial = serial();
    let pool = anon(256);
    let before = pool.stats();
    let h = Heap::create(&pool, 1000).unwrap();
    assert_eq!(h.root(), VAL_UNIT);
    assert_sound(&h);
    let h2 = Heap::attach(&pool, h.descr()).unwrap();
    h2.with_lock(|h| {
        let l = build_list(h, 0, 100);
        h.set_root(l)
    })
    .unwrap();
    assert_eq!(read_list(h.root()).unwrap(), (0..100).collect::<Vec<_>>());
    // A heap's blocks belong to nobody: reclaim_dead never takes them.
    assert_eq!(pool.owner_of(h.descr()).unwrap(), 0);
    let d = h.descr();
    h.destroy().unwrap();
    assert_eq!(pool.stats(), before);
    assert!(matches!(
        Heap::attach(&pool, d),
        Err(HeapError::NotAHeap(_))
    ));
    assert_eq!(h2.lock(), Err(HeapError::Destroyed));
    // A new heap at the same place is not the old one's handle's business.
    let h3 = Heap::create(&pool, 1000).unwrap();
    assert_eq!(h3.descr(), d, "the allocator reuses the block");
    assert_eq!(h2.lock(), Err(HeapError::Destroyed));
    assert_eq!(h2.destroy(), Err(HeapError::Destroyed));
    h3.destroy().unwrap();
    assert!(matches!(
        Heap::attach(&pool, 12345),
        Err(HeapError::NotAHeap(_))
    ));
    assert_eq!(
        Heap::create(&pool, 0).err(),
        Some(HeapError::Pool(shmpool::Error::BadSize))
    );
    assert!(pool.check().is_empty());
}

/// Two destroys waiting for the lock at once: the second must find the
/// heap gone (no double free of its chunks or descriptor).
#[test]
fn concurrent_destroys_free_once() {
    let _serial = serial();
    let pool = anon(256);
    let before = pool.stats();
    let h = Heap::create(&pool, 1000).unwrap();
    // A second chunk, live through the root.
    h.with_lock(|h| {
        let big = h.alloc(100_000, 0)?;
        h.set_root(big)
    })
    .unwrap();
    assert!(h.stats().unwrap().chunks >= 2);
    let a = Heap::attach(&pool, h.descr()).unwrap();
    let b = Heap::attach(&pool, h.descr()).unwrap();
    h.lock().unwrap();
    let results = std::thread::scope(|s| {
        let ta = s.spawn(|| a.destroy());
        let tb = s.spawn(|| b.destroy());
        // Gives both a chance to block on the lock (if one is late, it
        // finds the heap destroyed before waiting: the test still holds).
        std::thread::sleep(Duration::from_millis(100));
        h.unlock();
        [ta.join().unwrap(), tb.join().unwrap()]
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one destroy succeeds: {results:?}");
    assert!(
        results.contains(&Err(HeapError::Destroyed)),
        "the other finds the heap destroyed: {results:?}"
    );
    assert_eq!(pool.stats(), before);
    assert!(pool.check().is_empty());
}

#[test]
fn blocks_are_black_and_initialised() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    h.with_lock(|h| {
        let a = h.alloc(5, 0)?;
        assert_eq!(header(a), make_header(5, 0));
        assert!((0..5).all(|i| field(a, i) == VAL_UNIT));
        let s = h.alloc(3, STRING_TAG)?;
        assert!(is_black(header(s)) && tag(header(s)) == STRING_TAG);
        assert!((0..3).all(|i| field(s, i) == 0));
        assert!(h.contains(a)? && !h.contains(VAL_UNIT)?);
        assert_eq!(h.alloc(0, 0), Err(HeapError::Pool(shmpool::Error::BadSize)));
        Ok(())
    })
    .unwrap();
    assert_eq!(h.alloc(1, 0), Err(HeapError::NotLocked));
    assert_eq!(h.set_root(VAL_UNIT), Err(HeapError::NotLocked));
    check_and_destroy(&h);
}

#[test]
fn gc_keeps_the_reachable_and_frees_the_rest() {
    let _serial = serial();
    let pool = anon(256);
    let h = Heap::create(&pool, 64 << 10).unwrap();
    h.with_lock(|h| {
        let keep = build_list(h, 0, 500);
        let _garbage = build_list(h, 1000, 500);
        h.set_root(keep)
    })
    .unwrap();
    let s0 = h.stats().unwrap();
    h.gc().unwrap();
    let s1 = h.stats().unwrap();
    assert_eq!(s1.live_words, 500 * 3);
    assert_eq!(s1.free_words, s1.heap_words - 500 * 3);
    assert!(s1.free_words > s0.free_words);
    assert_eq!(read_list(h.root()).unwrap(), (0..500).collect::<Vec<_>>());
    assert_sound(&h);
    // Freed space is reused: the same garbage again does not grow the heap.
    for round in 0..20 {
        set_root_list(&h, round, 500);
        h.gc().unwrap();
    }
    assert_eq!(h.stats().unwrap().chunks, 1);
    assert_eq!(read_list(h.root()).unwrap(), (19..519).collect::<Vec<_>>());
    check_and_destroy(&h);
}

#[test]
fn additions_of_the_current_lock_survive_a_gc() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    h.with_lock(|h| {
        let l = build_list(h, 0, 10); // not stored anywhere yet
        h.gc()?; // re-entrant: runs under the lock already held
        assert_eq!(read_list(l).unwrap(), (0..10).collect::<Vec<_>>());
        h.set_root(l)
    })
    .unwrap();
    // After the lock is released they are ordinary values again.
    h.with_lock(|h| {
        let _ = build_list(h, 0, 10);
        Ok(())
    })
    .unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().live_words, 30);
    check_and_destroy(&h);
}

#[test]
fn growth_and_giving_chunks_back() {
    let _serial = serial();
    let pool = anon(2048);
    let h = Heap::create(&pool, 4096).unwrap();
    let after_create = pool.stats();
    set_root_list(&h, 0, 20_000);
    let s = h.stats().unwrap();
    assert!(s.chunks > 1, "{s:?}");
    assert!(pool.stats().free_bytes < after_create.free_bytes);
    assert_eq!(
        read_list(h.root()).unwrap(),
        (0..20_000).collect::<Vec<_>>()
    );
    // A large block gets a chunk of its own size.
    h.with_lock(|h| {
        let big = h.alloc(100_000, STRING_TAG)?;
        let c = h.alloc(2, 0)?;
        set_field(c, 0, big);
        set_field(c, 1, h.root());
        h.set_root(c)
    })
    .unwrap();
    assert_sound(&h);
    h.with_lock(|h| h.set_root(VAL_UNIT)).unwrap();
    h.gc().unwrap();
    let s = h.stats().unwrap();
    assert_eq!((s.chunks, s.live_words), (1, 0));
    assert_eq!(pool.stats(), after_create);
    check_and_destroy(&h);
}

#[test]
fn out_of_pool_memory_changes_nothing() {
    let _serial = serial();
    let pool = anon(32);
    let h = Heap::create(&pool, 4096).unwrap();
    let r = h.with_lock(|h| h.alloc(1 << 20, STRING_TAG).map(|_| ()));
    assert_eq!(r, Err(HeapError::Pool(shmpool::Error::OutOfMemory)));
    check_and_destroy(&h);
    assert_eq!(pool.stats().live_blocks, 0);
}

#[test]
fn pins_keep_values_alive_until_unpinned() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let (l, pin) = h
        .with_lock(|h| {
            let l = build_list(h, 7, 3);
            Ok((l, h.pin_shared(l)?))
        })
        .unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().pins, 1);
    assert_eq!(read_list(l).unwrap(), vec![7, 8, 9]);
    // the list, and the pin itself (a 5-field block)
    assert_eq!(h.stats().unwrap().live_words, 9 + 6);
    h.with_lock(|h| h.unpin(pin)).unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().live_words, 0);
    check_and_destroy(&h);
}

#[test]
fn pins_have_no_limit_and_unpin_any_order() {
    let _serial = serial();
    let pool = anon(256);
    let h = Heap::create(&pool, 4096).unwrap();
    let pins = h
        .with_lock(|h| {
            (0..500)
                .map(|i| {
                    let l = build_list(h, i, 2);
                    Ok((l, h.pin_shared(l)?))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().pins, 500);
    assert_eq!(h.stats().unwrap().live_words, 500 * (6 + 6));
    assert_sound(&h);
    // every other one, then the rest backwards
    h.with_lock(|h| {
        for (_, p) in pins.iter().step_by(2) {
            h.unpin(*p)?;
        }
        for (_, p) in pins.iter().skip(1).step_by(2).rev() {
            h.unpin(*p)?;
        }
        Ok(())
    })
    .unwrap();
    h.gc().unwrap();
    let s = h.stats().unwrap();
    assert_eq!((s.pins, s.live_words), (0, 0));
    check_and_destroy(&h);
}

#[test]
fn pins_of_a_dead_process_stop_counting() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    let d = h.descr();
    let mut c = fork_child(|| {
        let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
        h.with_lock(|h| {
            let l = build_list(h, 0, 5);
            h.pin_shared(l).map(|_| ())
        })
        .map_err(|e| e.to_string())
    });
    c.wait_ok(Duration::from_secs(10)).unwrap();
    assert_eq!(h.stats().unwrap().pins, 1);
    h.gc().unwrap();
    let s = h.stats().unwrap();
    assert_eq!((s.pins, s.live_words), (0, 0));
    h.destroy().unwrap();
}

#[test]
fn lock_is_reentrant_and_excludes_other_threads() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 4096).unwrap();
    assert!(!h.lock().unwrap().nested);
    assert!(h.lock().unwrap().nested);
    h.unlock();
    assert!(h.is_locked_by_me());
    let entered = AtomicU64::new(0);
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            assert!(!h.is_locked_by_me());
            h.lock().unwrap();
            entered.store(1, SeqCst);
            h.unlock();
        });
        // The other thread cannot get in while we hold the lock; we only
        // release it after looking (no timing decides the outcome).
        std::thread::yield_now();
        assert_eq!(entered.load(SeqCst), 0);
        h.unlock();
        t.join().unwrap();
    });
    assert_eq!(entered.load(SeqCst), 1);
    h.destroy().unwrap();
}

/// How far the victim gets before it SIGKILLs itself inside the lock.
#[derive(Clone, Copy, Debug)]
enum Step {
    JustLocked,
    /// A new list allocated, not reachable.
    Allocated,
    /// Half of a new block's fields written.
    HalfWritten,
    /// The new list stored as the root.
    Committed,
    /// Inside a GC's mark (bitmaps cleared and partly set).
    AfterGc,
    /// A chunk added by growth.
    Grown,
}

fn victim(pool: &Pool, d: usize, step: Step) -> Result<(), String> {
    let h = Heap::attach(pool, d).map_err(|e| e.to_string())?;
    h.lock().map_err(|e| e.to_string())?;
    let die = || {
        // SAFETY: kills this process; nothing to clean up by design.
        unsafe { libc::raise(libc::SIGKILL) };
    };
    if let Step::JustLocked = step {
        die();
    }
    let l = build_list(&h, 100, 50);
    if let Step::Allocated = step {
        die();
    }
    if let Step::HalfWritten = step {
        let b = h.alloc(10, 0).map_err(|e| e.to_string())?;
        set_field(b, 0, l);
        die();
    }
    h.set_root(l).map_err(|e| e.to_string())?;
    if let Step::Committed = step {
        die();
    }
    if let Step::AfterGc = step {
        h.gc().map_err(|e| e.to_string())?;
        let _ = build_list(&h, 0, 10);
        die();
    }
    if let Step::Grown = step {
        let big = h.alloc(50_000, STRING_TAG).map_err(|e| e.to_string())?;
        let c = h.alloc(2, 0).map_err(|e| e.to_string())?;
        set_field(c, 0, big);
        die();
    }
    Err("not killed".into())
}

#[test]
fn staged_death_inside_the_lock_is_recovered_from_the_root() {
    let _serial = serial();
    let _w = Watchdog::new("staged heap death", 120);
    for step in [
        Step::JustLocked,
        Step::Allocated,
        Step::HalfWritten,
        Step::Committed,
        Step::AfterGc,
        Step::Grown,
    ] {
        let pool = anon(1024);
        let before = pool.stats();
        let h = Heap::create(&pool, 8192).unwrap();
        set_root_list(&h, 0, 20);
        let d = h.descr();
        let mut c = fork_child(|| victim(&pool, d, step));
        wait_until(Duration::from_secs(10), || c.poll().is_some()).unwrap();
        let st = c.poll().unwrap();
        assert!(
            libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
            "{step:?}: {}",
            describe(st)
        );
        let info = h.lock().unwrap();
        assert!(info.recovered, "{step:?}");
        h.unlock();
        let want: Vec<i64> = match step {
            Step::JustLocked | Step::Allocated | Step::HalfWritten => (0..20).collect(),
            _ => (100..150).collect(),
        };
        assert_eq!(read_list(h.root()).unwrap(), want, "{step:?}");
        let s = h.stats().unwrap();
        assert_eq!(s.recoveries, 1, "{step:?}");
        assert_eq!(s.needs_repair, 1, "{step:?}");
        assert_eq!(s.live_words, want.len() as u64 * 3, "{step:?}");
        assert_eq!(s.chunks, 1, "{step:?}: grown chunk not given back");
        assert_sound(&h);
        // The heap is usable again, and destroy restores the pool.
        set_root_list(&h, 0, 1000);
        h.destroy().unwrap();
        assert_eq!(pool.stats().free_bytes, before.free_bytes, "{step:?}");
        assert_eq!(pool.stats().live_blocks, 0, "{step:?}");
    }
}

/// Shared between the test and its victims.
#[derive(Default)]
struct Board {
    /// Operations completed by the current victim.
    ops: AtomicU64,
}

#[test]
fn random_kills_never_wedge_or_corrupt_the_heap() {
    let _serial = serial();
    let _w = Watchdog::new("random heap kills", 300);
    let pool = anon(4096);
    let before = pool.stats();
    let h = Heap::create(&pool, 8192).unwrap();
    let d = h.descr();
    // SAFETY: Board is made of atomics, valid when zero.
    let board = unsafe { SharedMem::<Board>::new() };
    let mut rng = Rng(0x5eed_1234);
    let trials = 20 * scale();
    let mut recoveries = 0;
    for trial in 0..trials {
        board.ops.store(0, SeqCst);
        let seed = rng.next();
        let mut c = fork_child(|| {
            die_with_parent();
            let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
            let mut r = Rng(seed);
            loop {
                h.with_lock(|h| {
                    // Verify the current root, replace it by a new list
                    // (start k, length n: the cells read k, k+1, ...).
                    let cur = read_list(h.root()).map_err(HeapError::NotAHeap)?;
                    if cur.windows(2).any(|w| w[1] != w[0] + 1) {
                        return Err(HeapError::NotAHeap(format!("bad list {cur:?}")));
                    }
                    let n = 1 + r.below(3000) as i64;
                    let l = build_list(h, r.below(1000) as i64, n);
                    if r.below(4) == 0 {
                        let _ = h.alloc(1 + r.below(20_000) as usize, STRING_TAG)?;
                    }
                    h.set_root(l)?;
                    if r.below(8) == 0 {
                        h.gc()?;
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
                board.ops.fetch_add(1, SeqCst);
            }
        });
        // Kill after a random number of completed operations, then at a
        // random point of the next one (count-based, not timed).
        let target = rng.below(20);
        wait_until(Duration::from_secs(60), || {
            board.ops.load(SeqCst) >= target || c.poll().is_some()
        })
        .unwrap();
        for _ in 0..rng.below(2000) {
            std::hint::spin_loop();
        }
        let st = c.kill();
        assert!(
            libc::WIFSIGNALED(st),
            "trial {trial}: victim ended by itself: {}",
            describe(st)
        );
        let info = h.lock().unwrap();
        recoveries += info.recovered as u64;
        h.unlock();
        let l = read_list(h.root()).unwrap();
        assert!(l.windows(2).all(|w| w[1] == w[0] + 1), "trial {trial}");
        assert_sound(&h);
    }
    say(&format!(
        "random heap kills: {trials} trials, {recoveries} killed inside the lock"
    ));
    h.with_lock(|h| h.set_root(VAL_UNIT)).unwrap();
    h.gc().unwrap();
    let s = h.stats().unwrap();
    assert_eq!(s.recoveries, recoveries);
    assert_eq!((s.chunks, s.live_words), (1, 0), "{s:?}");
    h.destroy().unwrap();
    // A victim killed inside the pool's alloc for a new chunk, before
    // giving the block to nobody, still owns it: reclaim_dead frees it.
    pool.reclaim_dead().unwrap();
    assert_eq!(pool.stats().free_bytes, before.free_bytes);
    assert_eq!(pool.stats().live_blocks, 0);
}

#[test]
fn disowned_blocks_outlive_their_allocator() {
    let _serial = serial();
    let pool = anon(64);
    // SAFETY: a u64 cell made of an atomic, valid when zero.
    let out = unsafe { SharedMem::<AtomicU64>::new() };
    let mut c = fork_child(|| {
        let a = pool.alloc(4096).map_err(|e| e.to_string())?;
        let b = pool.alloc(4096).map_err(|e| e.to_string())?;
        pool.disown(b).map_err(|e| e.to_string())?;
        out.store((a as u64) << 32 | b as u64, SeqCst);
        Ok(())
    });
    c.wait_ok(Duration::from_secs(10)).unwrap();
    let (a, b) = (
        (out.load(SeqCst) >> 32) as usize,
        out.load(SeqCst) as u32 as usize,
    );
    assert_eq!(pool.owner_of(b).unwrap(), 0);
    let r = pool.reclaim_dead().unwrap();
    assert_eq!(r.blocks, 1, "only the block still owned by the dead child");
    assert_eq!(pool.size(a), Err(shmpool::Error::NotABlock));
    assert_eq!(pool.size(b), Ok(4096));
    assert_eq!(pool.disown(a), Err(shmpool::Error::NotABlock));
    assert!(pool.check().is_empty(), "{:?}", pool.check());
    pool.free(b).unwrap();
    assert_eq!(pool.stats().live_blocks, 0);
}

/// Death at each heap-internal write step reached by an operation on a
/// live heap (the `Heap*` points of rust/src/crashpoint.rs), holding the
/// lock: the child stops there and is SIGKILLed; the next locker recovers,
/// the root is the last committed one, the heap and pool are sound, and
/// destroy gives every page back.
#[cfg(feature = "crash-points")]
#[test]
fn death_at_each_heap_crash_point_is_recovered() {
    let _serial = serial();
    use shmpool::crashpoint::{self, CrashPoint as P};
    let _w = Watchdog::new("heap crash points", 300);
    let mut visited = Vec::new();
    for point in crashpoint::HEAP {
        if matches!(
            point,
            P::HeapCreateFormatted
                | P::HeapCreateBeforeDisown
                | P::HeapMidRecovery
                | P::HeapDestroyCommitted
                | P::HeapDestroyChunkForgotten
                | P::HeapDestroyChunksFreed
                | P::HeapDestroyUnlocked
        ) {
            continue; // the tests below
        }
        visited.push(point);
        let pool = anon(2048);
        let before = pool.stats();
        let h = Heap::create(&pool, 8192).unwrap();
        set_root_list(&h, 0, 20);
        let d = h.descr();
        // The root the child commits at HeapRootStored.
        let committed = matches!(point, P::HeapRootStored);
        let mut c = fork_child(|| {
            let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
            let e = |e: HeapError| e.to_string();
            if matches!(point, P::HeapChunkRemoved | P::HeapChunkEntryMoved) {
                // Unrooted values in chunks of their own, then a GC that
                // finds those chunks empty (two, so that removing the first
                // moves the last entry over it).
                h.with_lock(|h| h.alloc(100_000, STRING_TAG).map(|_| ()))
                    .map_err(e)?;
                h.with_lock(|h| h.alloc(300_000, STRING_TAG).map(|_| ()))
                    .map_err(e)?;
            }
            if point == P::HeapPinRemoved {
                h.with_lock(|h| h.pin_shared(h.root()).map(|_| ()))
                    .map_err(e)?;
            }
            crashpoint::arm(Some(point));
            h.lock().map_err(e)?;
            match point {
                P::HeapCopyHalfDone => {
                    h.copy_in(h.root(), false, &|_| true).map_err(e)?;
                }
                P::HeapAllocSplit => {
                    // The one free block (the rest of the first chunk),
                    // taken but for a 10-word remainder.
                    let free = h.stats().map_err(e)?.free_words as usize;
                    let _ = h.alloc(free - 11, STRING_TAG).map_err(e)?;
                }
                P::HeapRootStored => {
                    let l = build_list(&h, 100, 20);
                    h.set_root(l).map_err(e)?;
                }
                P::HeapMidMark | P::HeapMidSweep => {
                    let _ = build_list(&h, 100, 200);
                    h.gc().map_err(e)?;
                }
                P::HeapChunkRemoved | P::HeapChunkEntryMoved => h.gc().map_err(e)?,
                P::HeapChunkDisowned | P::HeapChunkAppended => {
                    h.alloc(100_000, STRING_TAG).map_err(e)?;
                }
                P::HeapPinWritten => {
                    h.pin_shared(h.root()).map_err(e)?;
                }
                P::HeapPinRemoved => {
                    let pin = h.pin_shared(h.root()).map_err(e)?;
                    h.unpin(pin).map_err(e)?;
                }
                _ => unreachable!(),
            }
            Err(format!("{point:?} not reached"))
        });
        c.wait_stopped(Duration::from_secs(20))
            .unwrap_or_else(|m| panic!("{point:?}: {m}"));
        c.kill();
        assert!(h.lock().unwrap().recovered, "{point:?}");
        h.unlock();
        let want: Vec<i64> = if committed {
            (100..120).collect()
        } else {
            (0..20).collect()
        };
        assert_eq!(read_list(h.root()).unwrap(), want, "{point:?}");
        let s = h.stats().unwrap();
        // A pin of the dead child (HeapPinRemoved: the first one is still
        // listed) is dropped by the recovery.
        assert_eq!(
            (s.recoveries, s.pins, s.chunks),
            (1, 0, 1),
            "{point:?}: {s:?}"
        );
        assert_eq!(s.live_words, 60, "{point:?}");
        check_and_destroy(&h);
        assert_eq!(
            pool.reclaim_dead().unwrap().blocks,
            0,
            "{point:?}: nothing left to the dead"
        );
        assert_eq!(pool.stats(), before, "{point:?}");
    }
    assert_eq!(visited.len(), 11, "{visited:?}");
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn death_at_each_heap_crash_point_is_recovered() {
    let _serial = serial();
    skipped(
        "death_at_each_heap_crash_point_is_recovered",
        "needs --features crash-points",
    );
}

/// A heap of three chunks, its root a pair of two large strings, each in
/// an extension chunk of its own.
#[cfg(feature = "crash-points")]
fn three_chunk_heap(pool: &Pool) -> Heap<'_> {
    let h = Heap::create(pool, 8192).unwrap();
    h.with_lock(|h| {
        let a = h.alloc(20_000, STRING_TAG)?;
        let b = h.alloc(60_000, STRING_TAG)?;
        let r = h.alloc(2, 0)?;
        set_field(r, 0, a);
        set_field(r, 1, b);
        h.set_root(r)
    })
    .unwrap();
    assert_eq!(h.stats().unwrap().chunks, 3);
    h
}

/// Death at each write step of `destroy` (child SIGKILLed while stopped
/// there): the heap is then unusable (`Destroyed`) but a second destroy by
/// a survivor completes, and the pool's stats are exactly those before
/// `create_heap`, with nothing left to the dead child, nothing freed twice
/// (pool check clean) and no block of the heap left live.
#[cfg(feature = "crash-points")]
#[test]
fn death_at_each_destroy_step_is_finished_by_the_next_destroy() {
    let _serial = serial();
    use shmpool::crashpoint::{self, CrashPoint as P};
    let _w = Watchdog::new("destroy crash points", 300);
    for point in [
        P::HeapDestroyCommitted,
        P::HeapDestroyChunkForgotten,
        P::HeapDestroyChunksFreed,
        P::HeapDestroyUnlocked,
    ] {
        // Also with a recovery pending: the child that destroys first dies
        // holding the lock in an ordinary operation (HeapChunkDisowned: an
        // orphan chunk the destroy must find).
        for after_death in [false, true] {
            let what = format!("{point:?}, after a death: {after_death}");
            let pool = anon(2048);
            let before = pool.stats();
            let h = three_chunk_heap(&pool);
            let d = h.descr();
            if after_death {
                let mut c = fork_child(|| {
                    let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
                    crashpoint::arm(Some(P::HeapChunkDisowned));
                    h.with_lock(|h| h.alloc(200_000, STRING_TAG).map(|_| ()))
                        .map_err(|e| e.to_string())?;
                    Err("HeapChunkDisowned not reached".into())
                });
                c.wait_stopped(Duration::from_secs(20)).unwrap();
                c.kill();
            }
            let mut c = fork_child(|| {
                let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
                crashpoint::arm(Some(point));
                h.destroy().map_err(|e| e.to_string())?;
                Err(format!("{point:?} not reached"))
            });
            c.wait_stopped(Duration::from_secs(20))
                .unwrap_or_else(|m| panic!("{what}: {m}"));
            c.kill();
            // Committed: no handle can use it any more.
            assert_eq!(h.lock().err(), Some(HeapError::Destroyed), "{what}");
            assert_eq!(
                Heap::attach(&pool, d).err(),
                Some(HeapError::Destroyed),
                "{what}"
            );
            h.destroy().unwrap_or_else(|e| panic!("{what}: {e}"));
            // Exactly once.
            assert_eq!(h.destroy(), Err(HeapError::Destroyed), "{what}");
            assert!(pool.check().is_empty(), "{what}: {:?}", pool.check());
            assert_eq!(pool.reclaim_dead().unwrap().blocks, 0, "{what}");
            assert_eq!(pool.stats(), before, "{what}");
        }
    }
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn death_at_each_destroy_step_is_finished_by_the_next_destroy() {
    let _serial = serial();
    skipped(
        "death_at_each_destroy_step_is_finished_by_the_next_destroy",
        "needs --features crash-points",
    );
}

/// A destroyer that released the lock and has not yet freed the first
/// block, overtaken by a second destroy, after which the pool gives the
/// same pages to someone else: the late destroyer must not free them
/// (it frees only the allocation it recorded).
#[cfg(feature = "crash-points")]
#[test]
fn a_late_destroyer_never_frees_the_pages_reused_by_another() {
    let _serial = serial();
    use shmpool::crashpoint::{self, CrashPoint as P};
    let _w = Watchdog::new("late destroyer", 120);
    let pool = anon(2048);
    let h = three_chunk_heap(&pool);
    let d = h.descr();
    let first_bytes = pool.size(d).unwrap();
    let mut c = fork_child(|| {
        let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
        crashpoint::arm(Some(P::HeapDestroyUnlocked));
        match h.destroy() {
            Err(HeapError::Destroyed) => Ok(()),
            r => Err(format!("late destroy: {r:?}")),
        }
    });
    c.wait_stopped(Duration::from_secs(20)).unwrap();
    h.destroy().unwrap();
    let again = pool.alloc(first_bytes).unwrap();
    assert_eq!(again, d, "the pool reuses the first block's pages");
    // SAFETY: resumes our own stopped child.
    unsafe { libc::kill(c.pid, libc::SIGCONT) };
    c.wait_ok(Duration::from_secs(20)).unwrap();
    assert_eq!(pool.size(again), Ok(first_bytes), "still allocated");
    assert!(pool.check().is_empty(), "{:?}", pool.check());
    pool.free(again).unwrap();
    assert_eq!(pool.stats().live_blocks, 0);
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn a_late_destroyer_never_frees_the_pages_reused_by_another() {
    let _serial = serial();
    skipped(
        "a_late_destroyer_never_frees_the_pages_reused_by_another",
        "needs --features crash-points",
    );
}

/// Death while recovering from a death: the next locker starts over, and
/// the result is that of a single recovery.
#[cfg(feature = "crash-points")]
#[test]
fn death_during_recovery_is_recovered() {
    let _serial = serial();
    use shmpool::crashpoint::{self, CrashPoint as P};
    let _w = Watchdog::new("death during recovery", 120);
    let pool = anon(2048);
    let before = pool.stats();
    let h = Heap::create(&pool, 8192).unwrap();
    set_root_list(&h, 0, 20);
    let d = h.descr();
    for point in [P::HeapCopyHalfDone, P::HeapMidRecovery] {
        let mut c = fork_child(|| {
            let h = Heap::attach(&pool, d).map_err(|e| e.to_string())?;
            crashpoint::arm(Some(point));
            h.lock().map_err(|e| e.to_string())?;
            h.copy_in(h.root(), false, &|_| true)
                .map_err(|e| e.to_string())?;
            Err(format!("{point:?} not reached"))
        });
        c.wait_stopped(Duration::from_secs(20)).unwrap();
        c.kill();
    }
    assert!(h.lock().unwrap().recovered);
    h.unlock();
    assert_eq!(read_list(h.root()).unwrap(), (0..20).collect::<Vec<_>>());
    let s = h.stats().unwrap();
    assert_eq!((s.recoveries, s.live_words, s.chunks), (1, 60, 1), "{s:?}");
    check_and_destroy(&h);
    assert_eq!(pool.reclaim_dead().unwrap().blocks, 0);
    assert_eq!(pool.stats(), before);
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn death_during_recovery_is_recovered() {
    let _serial = serial();
    skipped(
        "death_during_recovery_is_recovered",
        "needs --features crash-points",
    );
}

/// Death inside `create`: before the disown the block is the dead
/// creator's, so `reclaim_dead` gives the pool back exactly.
#[cfg(feature = "crash-points")]
#[test]
fn death_inside_create_is_reclaimed() {
    let _serial = serial();
    use shmpool::crashpoint::{self, CrashPoint as P};
    let _w = Watchdog::new("death inside create", 120);
    for point in [P::HeapCreateFormatted, P::HeapCreateBeforeDisown] {
        let pool = anon(256);
        let before = pool.stats();
        let mut c = fork_child(|| {
            crashpoint::arm(Some(point));
            Heap::create(&pool, 8192).map_err(|e| e.to_string())?;
            Err(format!("{point:?} not reached"))
        });
        c.wait_stopped(Duration::from_secs(20)).unwrap();
        c.kill();
        assert_eq!(pool.reclaim_dead().unwrap().blocks, 1, "{point:?}");
        assert!(pool.check().is_empty(), "{point:?}");
        assert_eq!(pool.stats(), before, "{point:?}");
    }
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn death_inside_create_is_reclaimed() {
    let _serial = serial();
    skipped(
        "death_inside_create_is_reclaimed",
        "needs --features crash-points",
    );
}

/// With the pool full, a heap reuses its own garbage before reporting
/// `OutOfMemory`, even far below the GC's usual threshold.
#[test]
fn a_full_pool_makes_the_heap_collect_instead_of_failing() {
    let _serial = serial();
    let pool = anon(64);
    let h = Heap::create(&pool, 16 << 10).unwrap();
    let mut filler = Vec::new();
    while let Ok(off) = pool.alloc(4096) {
        filler.push(off);
    }
    set_root_list(&h, 0, 400);
    for round in 0..50 {
        // build_list panics if an allocation fails
        h.with_lock(|h| {
            let _ = build_list(h, round, 200);
            Ok(())
        })
        .unwrap();
    }
    let s = h.stats().unwrap();
    assert_eq!(s.chunks, 1);
    assert!(s.gcs > 0, "{s:?}");
    assert_eq!(read_list(h.root()).unwrap(), (0..400).collect::<Vec<_>>());
    assert_sound(&h);
    // What does not fit even after a GC is still OutOfMemory, cleanly.
    let r = h.with_lock(|h| h.alloc(100_000, STRING_TAG).map(|_| ()));
    assert_eq!(r, Err(HeapError::Pool(shmpool::Error::OutOfMemory)));
    for off in filler {
        pool.free(off).unwrap();
    }
    h.destroy().unwrap();
    assert_eq!(pool.stats().live_blocks, 0);
}

/// The one-block fast path of `copy_in` (a string) roots its source during
/// the GC its own allocation runs, as the general path does: a heap string
/// unlinked from the root in the same lock and re-added must be copied
/// intact, not from memory that GC just made free.
#[test]
fn a_flat_copy_keeps_its_source_through_the_gc_it_runs() {
    let _serial = serial();
    let pool = anon(4096);
    let h = Heap::create(&pool, 8192).unwrap();
    let n = 20_000u64;
    let s = h
        .with_lock(|h| {
            let s = h.alloc(n as usize, STRING_TAG)?;
            for i in 0..n {
                set_field(s, i, i * 3 + 1);
            }
            h.set_root(s)?;
            Ok(s)
        })
        .unwrap();
    h.gc().unwrap();
    let gcs = h.stats().unwrap().gcs;
    let c = h
        .with_lock(|h| {
            h.set_root(VAL_UNIT)?;
            // Allocated since the last GC: past its threshold (the live
            // words), so the copy's allocation, which no free block fits,
            // collects first.
            for _ in 0..25 {
                h.alloc(1000, STRING_TAG)?;
            }
            let c = h.copy_in(s, false, &|_| true)?;
            h.set_root(c)?;
            Ok(c)
        })
        .unwrap();
    assert!(h.stats().unwrap().gcs > gcs, "the copy ran a GC");
    assert_ne!(c, s);
    assert_eq!(header(c), header(s));
    for i in 0..n {
        assert_eq!(field(c, i), i * 3 + 1, "word {i}");
    }
    check_and_destroy(&h);
    assert_eq!(pool.stats().live_blocks, 0);
}

/// A heap whose live data fits in its first chunk but whose allocation
/// between two GCs needs a second one keeps that chunk across the GCs its
/// allocations run (before, it gave it back at every GC and took it again a
/// few allocations later); an explicit `gc` gives it back.
#[test]
fn an_allocation_gc_keeps_the_chunk_the_next_allocations_need() {
    let _serial = serial();
    let pool = anon(4096);
    let h = Heap::create(&pool, 65536).unwrap();
    let after_create = pool.stats();
    let mut changes = 0;
    let mut last = h.stats().unwrap().chunks;
    for round in 0..300 {
        h.with_lock(|h| {
            let s = h.alloc(1251, STRING_TAG)?; // 10 KB
            set_field(s, 0, round);
            h.set_root(s)
        })
        .unwrap();
        let c = h.stats().unwrap().chunks;
        if c != last {
            changes += 1;
            last = c;
        }
    }
    let s = h.stats().unwrap();
    assert!(s.gcs > 20, "{s:?}");
    assert!(
        changes <= 2,
        "the chunk count changed {changes} times: {s:?}"
    );
    assert_sound(&h);
    h.with_lock(|h| h.set_root(VAL_UNIT)).unwrap();
    h.gc().unwrap();
    assert_eq!(h.stats().unwrap().chunks, 1);
    assert_eq!(pool.stats(), after_create);
    check_and_destroy(&h);
}

/// `collect_if_due` (run at the start of every outermost OCaml `modify`):
/// a loop that replaces a 10 KB root writes its copies through a few
/// places only (they stay in the L1 cache), where without it the copies
/// walk through all of the heap's free space between two GCs. Never
/// inside a lock already held.
#[test]
fn early_gcs_keep_a_replace_loop_in_few_places() {
    let _serial = serial();
    let pool = anon(4096);
    let h = Heap::create(&pool, 65536).unwrap();
    let mut places = std::collections::BTreeSet::new();
    for round in 0..200u64 {
        h.lock().unwrap();
        h.collect_if_due().unwrap();
        let s = h.alloc(1251, STRING_TAG).unwrap(); // 10 KB
        set_field(s, 0, round);
        h.set_root(s).unwrap();
        // nested: never collects
        h.lock().unwrap();
        assert!(!h.collect_if_due().unwrap());
        h.unlock();
        h.unlock();
        if round >= 20 {
            places.insert(s);
        }
    }
    assert!(places.len() <= 4, "{} places: {places:?}", places.len());
    assert_eq!(field(h.root(), 0), 199);
    check_and_destroy(&h);
    assert_eq!(pool.stats().live_blocks, 0);
}
