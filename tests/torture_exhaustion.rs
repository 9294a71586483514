//! Torture: running out of memory, of both kinds.
//!
//! 1. A backing store that cannot grow. In a child with a mount namespace
//!    of its own, a 1 MiB tmpfs is mounted on /dev/shm; creating an 8 MiB
//!    named pool with `prefault` must fail cleanly (an Io error from
//!    `posix_fallocate`, ENOSPC), leaving no object behind and never
//!    raising SIGBUS. Without `prefault` the same pool is created (the
//!    object is sparse) and works, but a process touching its pages beyond
//!    what tmpfs can hold dies of SIGBUS: that is what `prefault` is for.
//!    Where unshare or mount is refused (not root), this test reports
//!    itself skipped (`common::skipped`) instead of passing.
//! 2. Pool memory running out under contention: 4 processes, each holding
//!    a warm cache of freed blocks, allocate until even one page is refused;
//!    every one of them gets OutOfMemory, and together they hold exactly
//!    the whole payload (alloc takes the other processes' caches back
//!    before failing); nothing overlaps, `check()` is clean, and after
//!    they free everything the pool is empty again.
//! 3. A stale cache entry after such a take-back, whose page has become
//!    another process's cached block, is not freed by its former owner's
//!    `flush_cache` (the regression test of a bug found by torture_kill).
//!
//! `SHMPOOL_TORTURE=n` runs n times as many contention rounds.

mod common;

use common::*;
use shmpool::{CreateOptions, Error, Pool};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

// ----- 1. a backing store that cannot grow

/// What the namespaced child found (a skip reason, or the results).
#[repr(C)]
struct Tmpfs {
    /// 1: skipped (errno of the refused call in `errno`, step in `step`).
    skipped: AtomicU32,
    step: AtomicU32,
    errno: AtomicI32,
    /// 1 once everything below was checked.
    done: AtomicU32,
    /// Signal that ended the grandchild, and the page it reached.
    signal: AtomicI32,
    touched_pages: AtomicU64,
    /// Wait status of a grandchild running `check()` on the full store.
    check_status: AtomicI32,
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap()
}

fn shm_entries() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// In the child: a 1 MiB tmpfs on /dev/shm, private to this child.
fn small_dev_shm(r: &Tmpfs) -> Result<bool, String> {
    let skip = |step: u32| {
        r.errno.store(nix::errno::Errno::last_raw(), SeqCst);
        r.step.store(step, SeqCst);
        r.skipped.store(1, SeqCst);
        Ok(false)
    };
    // SAFETY: plain system calls on valid C strings; this child is
    // single-threaded, as unshare(CLONE_NEWNS) requires.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return skip(1);
        }
        let none = std::ptr::null::<libc::c_char>();
        let root = cstr("/");
        if libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return skip(2);
        }
        let (fs, at, opts) = (cstr("tmpfs"), cstr("/dev/shm"), cstr("size=1m"));
        if libc::mount(
            fs.as_ptr(),
            at.as_ptr(),
            fs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        ) != 0
        {
            return skip(3);
        }
    }
    Ok(true)
}

fn no_room(r: &Tmpfs) -> Result<(), String> {
    die_with_parent();
    if !small_dev_shm(r)? {
        return Ok(());
    }
    if !shm_entries().is_empty() {
        return Err(format!("the new /dev/shm holds {:?}", shm_entries()));
    }
    let name = ShmName::new();
    let mut opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: true,
    };
    match Pool::create(8 << 20, &opts) {
        Err(e @ Error::Io(..)) => {
            let Error::Io(what, errno) = &e else {
                unreachable!()
            };
            if *errno != nix::errno::Errno::ENOSPC || !e.to_string().contains("posix_fallocate") {
                return Err(format!("prefaulted create: {what}: {errno:?} ({e})"));
            }
        }
        other => return Err(format!("prefaulted create: {:?}", other.map(|_| ()))),
    }
    if !shm_entries().is_empty() {
        return Err(format!("left behind: {:?}", shm_entries()));
    }
    // Without prefault: created (sparse), usable, until a page is touched
    // that tmpfs cannot hold.
    opts.prefault = false;
    let pool = Pool::create(8 << 20, &opts).map_err(|e| format!("create: {e}"))?;
    let pg = pool.geometry().page_size;
    let big = pool
        .alloc(6 << 20)
        .map_err(|e| format!("alloc of 6 MiB: {e}"))?;
    let touched = &r.touched_pages;
    let mut g = fork_child(|| {
        for (i, p) in (big..big + (6 << 20)).step_by(pg).enumerate() {
            // SAFETY: inside the block just allocated, in the mapping.
            unsafe { pool.addr(p).write_volatile(1) };
            touched.store(i as u64 + 1, SeqCst);
        }
        Ok(()) // not reached: SIGBUS first
    });
    let st = g.kill_after(T);
    r.signal.store(
        if libc::WIFSIGNALED(st) {
            libc::WTERMSIG(st)
        } else {
            0
        },
        SeqCst,
    );
    // With the store full, an operation that reads descriptors never
    // touched before faults too (only the header and the descriptors
    // used so far have pages): `check` reads them all. Recorded, in a
    // grandchild, not required.
    let mut g = fork_child(|| {
        let v = pool.check();
        if v.is_empty() {
            Ok(())
        } else {
            Err(format!("check: {v:?}"))
        }
    });
    let st = g.kill_after(T);
    r.check_status.store(st, SeqCst);
    // What alloc and free touch has pages: they still work.
    pool.free(big).map_err(|e| format!("free: {e}"))?;
    let small = pool.alloc(pg).map_err(|e| format!("alloc: {e}"))?;
    pool.free(small).map_err(|e| format!("free: {e}"))?;
    pool.unlink().map_err(|e| format!("unlink: {e}"))?;
    drop(pool);
    if !shm_entries().is_empty() {
        return Err(format!("left behind: {:?}", shm_entries()));
    }
    r.done.store(1, SeqCst);
    Ok(())
}

trait KillAfter {
    /// Waits for the child to end (killing it after `t`); its wait status.
    fn kill_after(&mut self, t: Duration) -> i32;
}

impl KillAfter for Child {
    fn kill_after(&mut self, t: Duration) -> i32 {
        let t0 = Instant::now();
        while t0.elapsed() < t {
            if let Some(st) = self.poll() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.kill()
    }
}

/// Part 1; its summary, or None if it was skipped (said so).
fn backing_store_full() -> Option<String> {
    // SAFETY: atomics only.
    let r: SharedMem<Tmpfs> = unsafe { SharedMem::new() };
    let mut c = fork_child(|| no_room(&r));
    c.wait_ok(T).unwrap();
    if r.skipped.load(SeqCst) == 1 {
        let what = ["", "unshare(CLONE_NEWNS)", "mount / private", "mount tmpfs"]
            [r.step.load(SeqCst) as usize];
        let why = nix::errno::Errno::from_raw(r.errno.load(SeqCst));
        skipped(
            "torture_exhaustion::backing_store_that_cannot_grow",
            &format!("{what} refused ({why}): needs root with CAP_SYS_ADMIN"),
        );
        return None;
    }
    assert_eq!(r.done.load(SeqCst), 1);
    let sig = r.signal.load(SeqCst);
    assert_eq!(
        sig,
        libc::SIGBUS,
        "touching unbacked pages: signal {sig}, not SIGBUS"
    );
    let cs = r.check_status.load(SeqCst);
    let check = if libc::WIFSIGNALED(cs) && libc::WTERMSIG(cs) == libc::SIGBUS {
        "SIGBUS (untouched descriptor pages)".to_string()
    } else {
        describe(cs)
    };
    Some(format!(
        "1 MiB tmpfs: prefaulted 8 MiB create -> ENOSPC from posix_fallocate, nothing left; \
         unprefaulted -> SIGBUS after touching {} pages, then check() -> {check}",
        r.touched_pages.load(SeqCst)
    ))
}

// ----- 2. pool memory running out under contention

const W: usize = 4;
const NPAGES: usize = 2048;

#[repr(C)]
struct Board {
    ready: AtomicU32,
    go: AtomicU32,
    done: AtomicU32,
    release: AtomicU32,
    pids: [AtomicI32; W],
    ooms: [AtomicU64; W],
    nblocks: [AtomicU64; W],
    offs: [[AtomicU64; NPAGES]; W],
    pages: [[AtomicU64; NPAGES]; W],
}

fn stamp_of(pid: i32, off: usize) -> u64 {
    (pid as u32 as u64) << 32 | (off as u64 & 0xFFFF_FFFF)
}

fn grabber(pool: &Pool, b: &Board, i: usize, seed: u64) -> Result<(), String> {
    die_with_parent();
    let pid = std::process::id() as i32;
    let pg = pool.geometry().page_size;
    b.pids[i].store(pid, SeqCst);
    let mut rng = Rng(seed);
    // A warm cache: blocks allocated and freed (kept by this process).
    let warm: Vec<usize> = (0..24)
        .filter_map(|_| pool.alloc((1 + rng.below(12) as usize) * pg).ok())
        .collect();
    for o in warm {
        pool.free(o).map_err(|e| format!("warm-up free: {e}"))?;
    }
    b.ready.fetch_add(1, SeqCst);
    wait_until(T, || b.go.load(SeqCst) != 0)?;
    let mut n = 0usize;
    let mut want = 1 + rng.below(100) as usize;
    loop {
        match pool.alloc(want * pg) {
            Ok(o) => {
                mark(pool, o, want * pg, stamp_of(pid, o));
                b.offs[i][n].store(o as u64, SeqCst);
                b.pages[i][n].store(want as u64, SeqCst);
                n += 1;
                b.nblocks[i].store(n as u64, SeqCst);
                want = 1 + rng.below(100) as usize;
            }
            Err(Error::OutOfMemory) => {
                b.ooms[i].fetch_add(1, SeqCst);
                if want == 1 {
                    break; // not even a page left
                }
                want = want.div_ceil(2);
            }
            Err(e) => return Err(format!("alloc of {want} pages: {e}")),
        }
    }
    b.done.fetch_add(1, SeqCst);
    wait_until(T, || b.release.load(SeqCst) != 0)?;
    for k in 0..n {
        let o = b.offs[i][k].load(SeqCst) as usize;
        let p = b.pages[i][k].load(SeqCst) as usize;
        if !marked(pool, o, p * pg, stamp_of(pid, o)) {
            return Err(format!("block {o:#x} was overwritten"));
        }
        pool.free(o).map_err(|e| format!("free: {e}"))?;
    }
    pool.flush_cache().map_err(|e| format!("flush_cache: {e}"))
}

/// Cached blocks listed by `debug_info`.
fn cached_blocks(pool: &Pool) -> usize {
    pool.debug_info()
        .lines()
        .find(|l| l.starts_with("cached in processes"))
        .map_or(0, |l| l.matches("->").count())
}

/// Part 2; its summary.
fn contention() -> String {
    let pg = shmpool::mapping::page_size();
    let pool = Pool::create(NPAGES * pg, &CreateOptions::default()).unwrap();
    let rounds = 10 * scale();
    let (mut ooms, mut cached_at_go) = (0u64, 0usize);
    let mut rng = Rng(0xE4A);
    for round in 0..rounds {
        // SAFETY: atomics only.
        let b: SharedMem<Board> = unsafe { SharedMem::new() };
        let mut kids: Vec<Child> = (0..W)
            .map(|i| {
                let seed = rng.next();
                fork_child(|| grabber(&pool, &b, i, seed))
            })
            .collect();
        wait_until(T, || b.ready.load(SeqCst) == W as u32).unwrap();
        let cached = cached_blocks(&pool);
        assert!(cached > 0, "round {round}: no cached blocks to take back");
        cached_at_go += cached;
        b.go.store(1, SeqCst);
        wait_until(T, || {
            b.done.load(SeqCst) == W as u32 || kids.iter_mut().any(|k| k.poll().is_some())
        })
        .unwrap_or_else(|e| panic!("round {round}: allocating until OOM: {e}"));
        assert_eq!(
            b.done.load(SeqCst),
            W as u32,
            "round {round}: a worker died"
        );
        // Everything is handed out, exactly once.
        let mut blocks: Vec<(usize, usize, i32)> = Vec::new();
        for i in 0..W {
            assert!(b.ooms[i].load(SeqCst) > 0);
            ooms += b.ooms[i].load(SeqCst);
            let pid = b.pids[i].load(SeqCst);
            for k in 0..b.nblocks[i].load(SeqCst) as usize {
                let o = b.offs[i][k].load(SeqCst) as usize;
                let p = b.pages[i][k].load(SeqCst) as usize;
                blocks.push((o, p, pid));
            }
        }
        let total: usize = blocks.iter().map(|b| b.1).sum();
        assert_eq!(total, NPAGES, "round {round}: pages handed out");
        blocks.sort();
        for w in blocks.windows(2) {
            assert!(w[0].0 + w[0].1 * pg <= w[1].0, "overlap: {w:?}");
        }
        for &(o, p, pid) in &blocks {
            assert_eq!(pool.size(o), Ok(p * pg));
            assert_eq!(pool.owner_of(o), Ok(pid));
            assert!(marked(&pool, o, p * pg, stamp_of(pid, o)));
        }
        let v = pool.check();
        assert!(v.is_empty(), "round {round}: {v:?}");
        let s = pool.stats();
        assert_eq!((s.free_bytes, s.live_blocks), (0, blocks.len() as u64));
        assert_eq!(pool.alloc(pg), Err(Error::OutOfMemory));
        b.release.store(1, SeqCst);
        for k in kids.iter_mut() {
            k.wait_ok(T).unwrap();
        }
        let v = pool.check();
        assert!(v.is_empty(), "round {round}: {v:?}");
        let s = pool.stats();
        assert_eq!(
            (s.free_bytes, s.largest_free_bytes, s.live_blocks),
            (s.payload_bytes, s.payload_bytes, 0),
            "round {round}"
        );
        assert_eq!(pool.reclaim_dead().unwrap().pages, 0);
    }
    format!(
        "{rounds} rounds x {W} processes: all {NPAGES} pages handed out every round, \
         {cached_at_go} cached blocks taken back, {ooms} OutOfMemory, check clean, pool empty after"
    )
}

// ----- 3. a stale cache entry after a take-back

fn stale_cache_entry_after_take_back() -> String {
    let pg = shmpool::mapping::page_size();
    let pool = Pool::create(256 * pg, &CreateOptions::default()).unwrap();
    let x = pool.alloc(2 * pg).unwrap();
    pool.free(x).unwrap(); // cached here
                           // SAFETY: atomics only.
    let flag: SharedMem<[AtomicU32; 2]> = unsafe { SharedMem::new() };
    let mut c = fork_child(|| {
        die_with_parent();
        // Exhaust the pool (taking the parent's cached block back), then
        // cache the block at x here.
        let mut got = Vec::new();
        while let Ok(o) = pool.alloc(2 * pg) {
            got.push(o);
        }
        if !got.contains(&x) {
            return Err("the cached block was not taken back".into());
        }
        pool.free(x).map_err(|e| e.to_string())?;
        for o in got.into_iter().filter(|&o| o != x) {
            pool.free(o).map_err(|e| e.to_string())?;
        }
        flag[0].store(1, SeqCst);
        wait_until(T, || flag[1].load(SeqCst) != 0)?;
        pool.flush_cache().map_err(|e| e.to_string())
    });
    wait_until(T, || flag[0].load(SeqCst) != 0).unwrap();
    // Cache something again (so flush_cache has work), then flush: the
    // stale entry for x must not free the child's cached block.
    let y = pool.alloc(3 * pg).unwrap();
    pool.free(y).unwrap();
    pool.flush_cache().unwrap();
    let v = pool.check();
    flag[1].store(1, SeqCst);
    c.wait_ok(T).unwrap();
    assert!(v.is_empty(), "after flushing a stale entry: {v:?}");
    let s = pool.stats();
    assert_eq!((s.free_bytes, s.live_blocks), (s.payload_bytes, 0));
    assert!(pool.check().is_empty());
    "stale cache entry not freed by its former owner".into()
}

/// Part 1 on its own, so that where it cannot run it is reported skipped
/// (not folded into a passing test).
#[test]
fn backing_store_that_cannot_grow() {
    let _serial = serial();
    let _w = Watchdog::new("backing_store_that_cannot_grow", 60);
    if let Some(a) = backing_store_full() {
        eprintln!("torture exhaustion: {a}");
    }
    assert_no_leftover_shm();
}

#[test]
fn torture_exhaustion() {
    let _serial = serial();
    let _w = Watchdog::new("torture_exhaustion", 60 + 2 * scale());
    let t0 = Instant::now();
    let b = contention();
    let c = stale_cache_entry_after_take_back();
    eprintln!(
        "torture exhaustion: {b}; {c}; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_no_leftover_shm();
}
