//! Torture: arbitrary input and corrupted pools.
//!
//! 1. `free`, `size` and `owner_of` at arbitrary offsets, and `alloc` of
//!    arbitrary sizes, on a fragmented pool holding live and cached blocks
//!    of a dead process: anything that is not the start of a live block is
//!    a clean `Err(NotABlock)`, and no failing call changes anything
//!    (stats, `check()` and `debug_info()` compared before and after).
//! 2. Damaged pools: a named pool is populated by a process that exits
//!    without giving its cache back, then its shm object is truncated to a
//!    random length or random bytes or words of its header and descriptors
//!    are overwritten (random values, and values that look like
//!    descriptors). A child then attaches it: `Pool::attach` must return
//!    `Err(NotAPool)` or succeed, and then random operations (alloc, free,
//!    size, owner_of, stats, flush_cache, owners, reclaim_dead, debug_info)
//!    must never panic, crash, hang or hand out memory outside the payload;
//!    most run on a second view of the object mapped between inaccessible
//!    guard regions (`attach_in_place`), so a write outside the mapping
//!    would crash the child. `check()` may then report what the damage
//!    left undetectable: the counts of clean and unclean endings are
//!    reported. The pool mutex's own bytes are never damaged: garbage
//!    there reads as a lock held by some thread, and waiting for it is
//!    what a mutex does.
//!
//! `SHMPOOL_TORTURE=n` runs n times as many cases.

mod common;

use common::Rng;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shmpool::desc::{self, NIL};
use shmpool::layout::{Geometry, Header};
use shmpool::{AllocState, CreateOptions, Error, Pool};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

fn scale() -> u32 {
    common::scale().min(u32::MAX as u64) as u32
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        // A hang costs a child's whole timeout: keep shrinking short.
        max_shrink_time: 60_000,
        ..Config::default()
    })
}

/// Everything observable, to compare before and after.
fn picture(p: &Pool) -> (shmpool::Stats, Vec<String>, String) {
    (p.stats(), p.check(), p.debug_info())
}

// ----- 1. arbitrary offsets and sizes

const NPAGES: usize = 4096;

/// A pool with free runs of every kind, live blocks of this process, and
/// live and cached blocks of a process that exited (its cache never given
/// back). Returns the pool and the live blocks, offset -> bytes.
fn fragmented() -> (Pool, BTreeMap<usize, usize>) {
    let pg = shmpool::mapping::page_size();
    let pool = Pool::create(NPAGES * pg, &CreateOptions::default()).unwrap();
    // SAFETY: atomics only.
    let theirs: SharedMem<[AtomicU64; 64]> = unsafe { SharedMem::new() };
    let mut c = fork_child(|| {
        let mut rng = Rng(7);
        let mut n = 0;
        for i in 0..40 {
            let pages = [1, 2, 3, 5, 8, 20, 70, 130][rng.below(8) as usize];
            let Ok(o) = pool.alloc(pages * pg) else {
                continue;
            };
            if i % 3 == 0 {
                pool.free(o).map_err(|e| e.to_string())?; // stays cached
            } else {
                theirs[n].store((o as u64) << 16 | pages as u64, SeqCst);
                n += 1;
            }
        }
        Ok(()) // _exit: no flush
    });
    c.wait_ok(Duration::from_secs(10)).unwrap();
    let mut live: BTreeMap<usize, usize> = theirs
        .iter()
        .map(|e| e.load(SeqCst))
        .filter(|&e| e != 0)
        .map(|e| ((e >> 16) as usize, (e & 0xFFFF) as usize * pg))
        .collect();
    let mut rng = Rng(11);
    for i in 0..60 {
        let pages = 1 + rng.below(if i % 4 == 0 { 200 } else { 12 }) as usize;
        match pool.alloc(pages * pg) {
            Ok(o) if i % 2 == 0 => pool.free(o).map(|_| ()).unwrap(),
            Ok(o) => {
                live.insert(o, pages * pg);
            }
            Err(Error::OutOfMemory) => {}
            Err(e) => panic!("{e}"),
        }
    }
    pool.flush_cache().unwrap();
    let s = pool.stats();
    assert!(s.free_bytes > s.payload_bytes / 4, "{s:?}");
    assert!(pool.check().is_empty());
    assert!(pool
        .debug_info()
        .contains("cached in processes (offs->bsize): {"));
    (pool, live)
}

fn offsets(g: Geometry, live: &BTreeMap<usize, usize>) -> impl Strategy<Value = usize> {
    let pg = g.page_size;
    let starts: Vec<usize> = live.keys().copied().collect();
    let blocks: Vec<(usize, usize)> = live.iter().map(|(&o, &b)| (o, b)).collect();
    let pay = g.payload_offset;
    let n = g.npages as usize;
    prop_oneof![
        any::<usize>(),
        0..g.total_len + 4 * pg,
        (0..n + 4).prop_map(move |p| pay + p * pg),
        (0..starts.len(), -2 * pg as isize..2 * pg as isize)
            .prop_map(move |(i, d)| starts[i].wrapping_add_signed(d)),
        (0..blocks.len(), 0..1usize << 20).prop_map(move |(i, k)| {
            let (o, b) = blocks[i];
            o + (k % (b / pg)) * pg // a page of the block, maybe its first
        }),
        prop::sample::select(vec![
            0,
            8,
            g.desc_offset,
            pay - pg,
            pay - 1,
            g.total_len,
            g.total_len - pg,
            usize::MAX,
            usize::MAX - pg + 1,
            isize::MAX as usize + 1,
        ]),
    ]
}

/// Part 1; returns its summary.
fn offsets_and_sizes() -> String {
    let (pool, live) = fragmented();
    let g = pool.geometry();
    let pg = g.page_size;
    let before = picture(&pool);
    let (not_blocks, blocks) = (Cell::new(0u64), Cell::new(0u64));
    let bump = |c: &Cell<u64>| c.set(c.get() + 1);
    let mut r = runner(1000 * scale());
    r.run(&offsets(g, &live), |off| {
        if let Some(&bytes) = live.get(&off) {
            prop_assert_eq!(pool.size(off), Ok(bytes));
            prop_assert_eq!(pool.owner_of(off).map(|p| p != 0), Ok(true));
            bump(&blocks);
        } else {
            prop_assert_eq!(pool.free(off), Err(Error::NotABlock), "free({:#x})", off);
            prop_assert_eq!(pool.size(off), Err(Error::NotABlock), "size({:#x})", off);
            prop_assert_eq!(
                pool.owner_of(off),
                Err(Error::NotABlock),
                "owner_of({:#x})",
                off
            );
            bump(&not_blocks);
        }
        prop_assert!(
            picture(&pool) == before,
            "offset {:#x} changed the pool",
            off
        );
        Ok(())
    })
    .unwrap();
    // An alloc that finds no run large enough takes every process's cached
    // blocks back before it fails (by design): do that once, so that from
    // here on a refused alloc changes nothing at all.
    assert_eq!(pool.alloc(g.npages as usize * pg), Err(Error::OutOfMemory));
    let before = picture(&pool);
    assert!(before.2.contains("cached in processes (offs->bsize): {}"));
    let sizes = prop_oneof![
        any::<usize>(),
        0..4 * g.total_len,
        (0..2 * g.npages as usize).prop_map(move |p| p * pg),
        prop::sample::select(vec![0, 1, usize::MAX, isize::MAX as usize, 1 << 62]),
    ];
    let (allocs, refused) = (Cell::new(0u64), Cell::new(0u64));
    let mut r = runner(500 * scale());
    r.run(&sizes, |bytes| {
        match pool.alloc(bytes) {
            Ok(o) => {
                let want = bytes.div_ceil(pg) * pg;
                prop_assert!(o >= g.payload_offset && (o - g.payload_offset) % pg == 0);
                prop_assert!(o + want <= g.total_len);
                prop_assert_eq!(pool.size(o), Ok(want));
                prop_assert!(!live.contains_key(&o));
                prop_assert_eq!(pool.free(o), Ok(want));
                bump(&allocs);
            }
            Err(Error::OutOfMemory) => bump(&refused),
            Err(Error::BadSize) => {
                prop_assert_eq!(bytes, 0);
                bump(&refused);
            }
            Err(e) => return Err(TestCaseError::fail(format!("alloc({bytes}): {e}"))),
        }
        prop_assert!(
            picture(&pool) == before,
            "alloc({}) changed the pool",
            bytes
        );
        Ok(())
    })
    .unwrap();
    format!(
        "{} bad offsets all Err(NotABlock) and {} block starts, {} allocs undone and {} \
         refused, pool unchanged",
        not_blocks.get(),
        blocks.get(),
        allocs.get(),
        refused.get(),
    )
}

// ----- 2. damaged pools

/// Payload pages of the damaged pools.
const DPAGES: u32 = 300;

#[derive(Debug, Clone)]
enum Damage {
    /// None: the control (the pool must attach and stay clean).
    Nothing,
    /// The object cut to this length.
    Truncate(usize),
    /// Bytes overwritten.
    Bytes(Vec<(usize, u8)>),
    /// 8-byte words overwritten.
    Words(Vec<(usize, u64)>),
}

/// Byte ranges worth damaging, the mutex excluded, with weights.
fn regions(g: Geometry) -> Vec<(u32, std::ops::Range<usize>)> {
    use std::mem::{offset_of, size_of};
    let lock = offset_of!(Header, lock);
    let alloc = offset_of!(Header, alloc);
    let owners = offset_of!(Header, owners);
    let slots = offset_of!(Header, slot_cache);
    vec![
        (2, 0..lock),
        (1, owners..alloc),
        (6, alloc..alloc + size_of::<AllocState>()),
        (1, slots..size_of::<Header>()),
        (8, g.desc_offset..g.desc_offset + 8 * g.npages as usize),
    ]
}

fn position(g: Geometry) -> BoxedStrategy<usize> {
    let arms: Vec<(u32, BoxedStrategy<usize>)> = regions(g)
        .into_iter()
        .map(|(w, r)| (w, r.boxed()))
        .collect();
    proptest::strategy::Union::new_weighted(arms).boxed()
}

/// Words that look like what the header and descriptors hold.
fn plausible_word(n: u32) -> BoxedStrategy<u64> {
    let page = prop_oneof![0..n + 3, Just(NIL), Just(n - 1)];
    prop_oneof![
        any::<u64>(),
        (0..n as u64 + 3),
        Just(0u64),
        Just(NIL as u64),
        Just(u64::MAX),
        (0..n + 3, 0u16..4, any::<bool>()).prop_map(|(len, owner, cached)| {
            desc::alloc_word(len, owner) | if cached { desc::CACHED } else { 0 }
        }),
        (page.clone(), page.clone()).prop_map(|(a, b)| desc::free_word(a, b)),
        (0..n + 3).prop_map(desc::len_word),
        (page.clone(), page.clone()).prop_map(|(a, b)| desc::links_word(a, b)),
        page.prop_map(desc::up_word),
    ]
    .boxed()
}

fn damage(g: Geometry) -> impl Strategy<Value = (Damage, u64)> {
    let n = g.npages;
    let total = g.total_len;
    let hdr = std::mem::size_of::<Header>();
    let cut = prop_oneof![
        0..total,
        prop::sample::select(vec![
            0,
            1,
            8,
            hdr - 1,
            hdr,
            g.desc_offset + 8,
            g.payload_offset - 1,
            g.payload_offset,
            total - g.page_size,
            total - 1,
        ]),
    ];
    let d = prop_oneof![
        1 => Just(Damage::Nothing),
        2 => cut.prop_map(Damage::Truncate),
        4 => prop::collection::vec((position(g), any::<u8>()), 1..8).prop_map(Damage::Bytes),
        10 => prop::collection::vec((position(g), plausible_word(n)), 1..8)
            .prop_map(|v| Damage::Words(v.into_iter().map(|(p, w)| (p & !7, w)).collect())),
    ];
    (d, any::<u64>())
}

fn apply(name: &str, d: &Damage) {
    use std::os::unix::fs::FileExt;
    let fd = nix::sys::mman::shm_open(
        name,
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let f = std::fs::File::from(fd);
    match d {
        Damage::Nothing => {}
        Damage::Truncate(len) => f.set_len(*len as u64).unwrap(),
        Damage::Bytes(v) => {
            for &(at, b) in v {
                f.write_all_at(&[b], at as u64).unwrap();
            }
        }
        Damage::Words(v) => {
            for &(at, w) in v {
                f.write_all_at(&w.to_le_bytes(), at as u64).unwrap();
            }
        }
    }
}

/// What a child made of a damaged pool.
#[repr(C)]
struct Outcome {
    /// 1: NotAPool, 2: attached.
    kind: AtomicU32,
    violations: AtomicU64,
    recoveries: AtomicU64,
    ops: AtomicU64,
    allocs: AtomicU64,
    overlaps: AtomicU64,
    /// Panics, even those the pool caught under its lock.
    panics: AtomicU64,
}

/// Maps the object `name` between two inaccessible 1 MiB regions and opens
/// it there: a write past either end faults.
fn guarded_attach(name: &str) -> Result<Pool, Error> {
    let fd = nix::sys::mman::shm_open(
        name,
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::Io("shm_open".into(), e))?;
    let len = nix::sys::stat::fstat(&fd).unwrap().st_size as usize;
    let pg = shmpool::mapping::page_size();
    let guard = 1 << 20;
    let span = 2 * guard + len.div_ceil(pg) * pg;
    // SAFETY: a fresh reservation, then the object mapped over its middle
    // (MAP_FIXED inside our own reservation); both leak with the child.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert!(base != libc::MAP_FAILED);
        let p = libc::mmap(
            base.cast::<u8>().add(guard).cast(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        );
        assert!(p != libc::MAP_FAILED);
        Pool::attach_in_place(p.cast(), len)
    }
}

/// The child: attach (both ways) and, if it works, random operations.
fn use_damaged(name: &str, seed: u64, out: &Outcome) -> Result<(), String> {
    // Count every panic, including those the pool catches under its lock
    // (it then rebuilds): none may happen.
    let counter = &out.panics as *const AtomicU64 as usize;
    std::panic::set_hook(Box::new(move |info| {
        // SAFETY: `out` is shared memory this child keeps mapped until it
        // exits, and it panics only before then.
        unsafe { &*(counter as *const AtomicU64) }.fetch_add(1, SeqCst);
        say(&format!("panic: {info}"));
    }));
    let r1 = Pool::attach(name);
    let r2 = if std::matches!(r1, Err(Error::NotAPool(_))) {
        Err(Error::NotAPool("skipped".into()))
    } else {
        guarded_attach(name)
    };
    let (a, b) = match (r1, r2) {
        (Err(Error::NotAPool(_)), _) => {
            out.kind.store(1, SeqCst);
            return Ok(());
        }
        (Ok(a), Ok(b)) => (a, b),
        (r1, r2) => {
            return Err(format!(
                "attach: {:?}, guarded attach: {:?}",
                r1.err(),
                r2.err()
            ))
        }
    };
    out.kind.store(2, SeqCst);
    let rec0 = b.stats().recoveries; // the damage may have set it to anything
    let g = b.geometry();
    let pg = g.page_size;
    let n = g.npages as usize;
    let mut rng = Rng(seed);
    let mut held: Vec<(usize, usize)> = Vec::new();
    for _ in 0..150 {
        // Mostly the guarded view.
        let p = if rng.below(4) == 0 { &a } else { &b };
        let any_off = |rng: &mut Rng| match rng.below(3) {
            0 => g.payload_offset + rng.below(n as u64 + 2) as usize * pg,
            1 => rng.below(g.total_len as u64 + 1) as usize,
            _ => held
                .get(rng.below(held.len() as u64 + 1) as usize)
                .map_or(0, |h| h.0),
        };
        match rng.below(12) {
            0..=4 => {
                let pages = if rng.below(8) == 0 {
                    1 + rng.below(n as u64 + 2)
                } else {
                    1 + rng.below(40)
                } as usize;
                if let Ok(o) = p.alloc(pages * pg) {
                    let bytes = pages * pg;
                    if o < g.payload_offset
                        || (o - g.payload_offset) % pg != 0
                        || o + bytes > g.total_len
                    {
                        return Err(format!("alloc of {pages} pages gave offset {o:#x}"));
                    }
                    if held.iter().any(|&(h, hb)| o < h + hb && h < o + bytes) {
                        out.overlaps.fetch_add(1, SeqCst);
                    }
                    // Touch every page through both views.
                    mark(&b, o, bytes, o as u64);
                    mark(&a, o, bytes, o as u64);
                    held.push((o, bytes));
                    out.allocs.fetch_add(1, SeqCst);
                }
            }
            5..=6 => {
                if !held.is_empty() && rng.below(3) > 0 {
                    let i = rng.below(held.len() as u64) as usize;
                    let (o, _) = held.swap_remove(i);
                    let _ = p.free(o);
                } else {
                    // A block of ours freed this way is ours no longer: an
                    // alloc may hand its pages out again, no overlap.
                    let o = any_off(&mut rng);
                    if p.free(o).is_ok() {
                        held.retain(|h| h.0 != o);
                    }
                }
            }
            7 => {
                let o = any_off(&mut rng);
                let _ = p.size(o);
                let _ = p.owner_of(o);
            }
            8 => {
                let _ = p.stats();
            }
            9 => {
                let _ = p.flush_cache();
                let _ = p.owners();
            }
            10 => {
                let _ = p.debug_info();
            }
            _ => {
                let _ = p.reclaim_dead();
            }
        }
        out.ops.fetch_add(1, SeqCst);
    }
    let v = b.check();
    out.violations.store(v.len() as u64, SeqCst);
    out.recoveries
        .store(b.stats().recoveries.wrapping_sub(rec0), SeqCst);
    Ok(())
}

#[derive(Default)]
struct Tally {
    cases: u64,
    not_a_pool: u64,
    clean: u64,
    unclean: u64,
    recoveries: u64,
    ops: u64,
    allocs: u64,
    overlaps: u64,
    panics: u64,
    truncated: u64,
    controls: u64,
}

/// Part 2; returns its summary and the runner's verdict.
fn damaged_pools() -> (String, Result<(), String>) {
    let cases = 400 * scale();
    let pg = shmpool::mapping::page_size();
    let g = Geometry::for_pages(DPAGES, pg).unwrap();
    let tally = RefCell::new(Tally::default());
    let mut r = runner(cases);
    let res = r.run(&damage(g), |(d, seed)| {
        let name = ShmName::new();
        // A pool with live and cached blocks of a process that exited.
        let mut c = fork_child(|| {
            let opts = CreateOptions {
                name: Some(name.as_str().into()),
                prefault: false,
            };
            let p = Pool::create(DPAGES as usize * pg, &opts).map_err(|e| e.to_string())?;
            let mut rng = Rng(seed ^ 0x55);
            for i in 0..30 {
                let pages = [1, 2, 5, 9, 64, 65, 128, 140][rng.below(8) as usize];
                if let Ok(o) = p.alloc(pages * pg) {
                    if i % 3 == 0 {
                        let _ = p.free(o);
                    }
                }
            }
            std::mem::forget(p); // no flush: cached blocks stay cached
            Ok(())
        });
        c.wait_ok(Duration::from_secs(10))
            .map_err(TestCaseError::fail)?;
        apply(name.as_str(), &d);
        // SAFETY: atomics only.
        let out: SharedMem<Outcome> = unsafe { SharedMem::new() };
        let mut c = fork_child(|| use_damaged(name.as_str(), seed, &out));
        if let Err(e) = c.wait_ok(Duration::from_secs(10)) {
            return Err(TestCaseError::fail(format!("{d:?}: {e}")));
        }
        // The control: an undamaged pool attaches, stays clean, never hands
        // out a page twice and never panics, whatever the profile.
        if std::matches!(d, Damage::Nothing)
            && (out.kind.load(SeqCst) != 2
                || out.violations.load(SeqCst) != 0
                || out.overlaps.load(SeqCst) != 0
                || out.panics.load(SeqCst) != 0)
        {
            return Err(TestCaseError::fail(format!(
                "an undamaged pool: outcome {}, {} violations, {} overlapping allocs, {} panics",
                out.kind.load(SeqCst),
                out.violations.load(SeqCst),
                out.overlaps.load(SeqCst),
                out.panics.load(SeqCst)
            )));
        }
        // Counted once the control passed: a control is also counted clean.
        let mut t = tally.borrow_mut();
        t.cases += 1;
        t.truncated += std::matches!(d, Damage::Truncate(_)) as u64;
        t.controls += std::matches!(d, Damage::Nothing) as u64;
        match out.kind.load(SeqCst) {
            1 => t.not_a_pool += 1,
            2 if out.violations.load(SeqCst) == 0 => t.clean += 1,
            2 => t.unclean += 1,
            k => return Err(TestCaseError::fail(format!("{d:?}: outcome {k}"))),
        }
        t.recoveries += out.recoveries.load(SeqCst);
        t.ops += out.ops.load(SeqCst);
        t.allocs += out.allocs.load(SeqCst);
        t.overlaps += out.overlaps.load(SeqCst);
        t.panics += out.panics.load(SeqCst);
        // No panic, in any profile: the pool catches one under its lock and
        // rebuilds, but a panic is a bug (in the dev profile, an overflow
        // that release builds would wrap silently).
        if out.panics.load(SeqCst) > 0 {
            return Err(TestCaseError::fail(format!("{d:?}: a panic")));
        }
        Ok(())
    });
    let t = tally.into_inner();
    let summary = format!(
        "{} damaged pools ({} truncated, plus {} undamaged controls): {} NotAPool, {} \
         attached and clean, {} attached with violations, {} crashes/panics/hangs \
         ({} caught panics, {} ops, {} allocs of which {} overlapping, {} recoveries)",
        t.cases - t.controls,
        t.truncated,
        t.controls,
        t.not_a_pool,
        t.clean - t.controls,
        t.unclean,
        if res.is_ok() { 0 } else { 1 },
        t.panics,
        t.ops,
        t.allocs,
        t.overlaps,
        t.recoveries,
    );
    (summary, res.map_err(|e| e.to_string()))
}

#[test]
fn torture_fuzz() {
    let _serial = serial();
    let _w = Watchdog::new("torture_fuzz", 180 + 4 * scale() as u64);
    let t0 = Instant::now();
    let a = offsets_and_sizes();
    let (b, res) = damaged_pools();
    eprintln!(
        "torture fuzz: {a}; {b}; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    res.unwrap();
    assert_no_leftover_shm();
}
