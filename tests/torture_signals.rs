//! Torture: a storm of signals during pool operations.
//!
//! Two worker processes each install handlers for SIGALRM and SIGCHLD
//! *without* `SA_RESTART`, so that every blocking system call they are in
//! when a signal lands returns `EINTR` unless the code retries it; a timer
//! (`setitimer`, ITIMER_REAL) fires SIGALRM at about 10 kHz, and each worker
//! forks short-lived children all the time, so SIGCHLD keeps coming too.
//! Meanwhile they alloc (1 to 100 pages, some longer), stamp, verify and
//! free on one pool, hand blocks to each other, and now and then call every
//! other entry point: `stats`, `check`, `owners`, `reclaim_dead`,
//! `debug_info`, `flush_cache`, `size`, `owner_of`, and create, attach,
//! use and unlink a named pool with `prefault` (`posix_fallocate`, which
//! tmpfs abandoned with EINTR on any signal before Linux 6.10). No
//! operation may fail (out of memory aside), no lock may be lost (no
//! recovery ever runs), `check()` must be clean and the pool empty at the
//! end. Each worker goes on until it has done `OPS` operations, received
//! `MIN_ALRM` SIGALRM and some SIGCHLD and created `MIN_NAMED` named pools:
//! what is tested is counted, never timed, so a slow or loaded machine
//! tests as much as a fast one. `SHMPOOL_TORTURE=n` multiplies those
//! counts by n (at most 60).

mod common;

use common::*;
use shmpool::{CreateOptions, Error, Pool};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Per worker and per unit of `SHMPOOL_TORTURE` (about 1 s here).
const OPS: u64 = 100_000;
const MIN_ALRM: u64 = 2_000;
const MIN_NAMED: u64 = 5;
/// A worker that has done this many times `OPS` without the signals or
/// named pools it needs fails (rather than looping forever).
const GIVE_UP: u64 = 50;

const WORKERS: usize = 2;
const SLOTS: usize = 32;
const MB: usize = 16;
const NPAGES: usize = 4096;
/// SIGALRM period.
const TICK_US: i64 = 100;

#[repr(C)]
struct Board {
    go: AtomicU64,
    pids: [AtomicI32; WORKERS],
    ops: [AtomicU64; WORKERS],
    other_calls: [AtomicU64; WORKERS],
    named: [AtomicU64; WORKERS],
    alrm: [AtomicU64; WORKERS],
    chld: [AtomicU64; WORKERS],
    forks: [AtomicU64; WORKERS],
    oom: [AtomicU64; WORKERS],
    /// Blocks handed from one worker to the other: 0 or offset | pages.
    mailbox: [AtomicU64; MB],
}

static ALRM: AtomicU64 = AtomicU64::new(0);
static CHLD: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_alrm(_: libc::c_int) {
    ALRM.fetch_add(1, SeqCst);
}

extern "C" fn on_chld(_: libc::c_int) {
    CHLD.fetch_add(1, SeqCst);
    // SAFETY: errno is thread-local; waitpid is async-signal-safe.
    unsafe {
        let e = *libc::__errno_location();
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        *libc::__errno_location() = e;
    }
}

/// Installs `f` for `sig` without SA_RESTART.
fn handle(sig: libc::c_int, f: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with an empty mask and a handler that is
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = f as usize;
        sa.sa_flags = 0; // no SA_RESTART: interrupted calls return EINTR
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

fn timer(period_us: i64) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: period_us,
    };
    let it = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: plain system call on a local struct.
    unsafe {
        assert_eq!(
            libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()),
            0
        );
    }
}

fn stamp_of(pid: i32, off: usize) -> u64 {
    (pid as u32 as u64) << 32 | (off as u64 & 0xFFFF_FFFF)
}

/// Any error but running out of memory fails the worker, with its name.
fn must<T>(what: &str, r: Result<T, Error>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

/// Creates, attaches, uses and unlinks the named pool `name` (prefaulted).
fn named_round(name: &str, rng: &mut Rng) -> Result<(), String> {
    let pg = shmpool::mapping::page_size();
    let opts = CreateOptions {
        name: Some(name.into()),
        prefault: true,
    };
    let pages = 2048 + rng.below(6144) as usize; // 8 to 32 MiB
    let a = must(
        "create prefaulted named pool",
        Pool::create(pages * pg, &opts),
    )?;
    let r = (|| {
        let b = must("attach", Pool::attach(name))?;
        let o = must("alloc in named pool", a.alloc(100 * pg))?;
        mark(&b, o, 100 * pg, 0xABCD);
        if !marked(&a, o, 100 * pg, 0xABCD) {
            return Err("named pool: the two mappings disagree".into());
        }
        must("free through the attached pool", b.free(o))?;
        let v = a.check();
        if !v.is_empty() {
            return Err(format!("named pool check: {v:?}"));
        }
        Ok(())
    })();
    must("unlink", a.unlink())?;
    r
}

fn worker(pool: &Pool, b: &Board, i: usize, name: &str, units: u64) -> Result<(), String> {
    die_with_parent();
    let pid = std::process::id() as i32;
    let pg = pool.geometry().page_size;
    b.pids[i].store(pid, SeqCst);
    handle(libc::SIGALRM, on_alrm);
    handle(libc::SIGCHLD, on_chld);
    wait_until(Duration::from_secs(10), || b.go.load(SeqCst) != 0)?;
    timer(TICK_US);
    let mut rng = Rng(0x516 + i as u64);
    let mut offs = [0usize; SLOTS];
    let mut pages = [0usize; SLOTS];
    let (ops, min_alrm, min_named) = (OPS * units, MIN_ALRM * units, MIN_NAMED * units);
    let mut n = 0u64;
    let mut named = 0u64;
    while n < ops || ALRM.load(SeqCst) < min_alrm || CHLD.load(SeqCst) == 0 || named < min_named {
        if n >= GIVE_UP * ops {
            return Err(format!(
                "after {n} operations: only {} SIGALRM, {} SIGCHLD, {named} named pools",
                ALRM.load(SeqCst),
                CHLD.load(SeqCst)
            ));
        }
        n += 1;
        let s = rng.below(SLOTS as u64) as usize;
        if pages[s] == 0 {
            let k = match rng.below(10) {
                0 => 101 + rng.below(300),
                _ => 1 + rng.below(100),
            } as usize;
            match pool.alloc(k * pg) {
                Ok(o) => {
                    mark(pool, o, k * pg, stamp_of(pid, o));
                    (offs[s], pages[s]) = (o, k);
                }
                Err(Error::OutOfMemory) => {
                    b.oom[i].fetch_add(1, SeqCst);
                }
                Err(e) => return Err(format!("alloc of {k} pages: {e:?}")),
            }
        } else {
            let (o, k) = (offs[s], pages[s]);
            if !marked(pool, o, k * pg, stamp_of(pid, o)) {
                return Err(format!("block {o:#x} was overwritten"));
            }
            let m = rng.below(MB as u64) as usize;
            if rng.below(4) == 0
                && b.mailbox[m]
                    .compare_exchange(0, (o as u64) << 16 | k as u64, SeqCst, SeqCst)
                    .is_ok()
            {
                pages[s] = 0;
            } else {
                pages[s] = 0;
                if must("free", pool.free(o))? != k * pg {
                    return Err(format!("free({o:#x}) returned the wrong size"));
                }
            }
        }
        // A block from the mailbox (maybe our own): free it.
        let m = rng.below(MB as u64) as usize;
        let e = b.mailbox[m].swap(0, SeqCst);
        if e != 0 {
            let (o, k) = ((e >> 16) as usize, (e & 0xFFFF) as usize);
            if must("size", pool.size(o))? != k * pg {
                return Err(format!("size({o:#x}) is not {k} pages"));
            }
            must("owner_of", pool.owner_of(o))?;
            must("free of a handed block", pool.free(o))?;
        }
        if n % 64 == 0 {
            // A child that exits at once: SIGCHLD.
            // SAFETY: the child only calls _exit.
            match unsafe { libc::fork() } {
                0 => unsafe { libc::_exit(0) },
                -1 => {}
                _ => {
                    b.forks[i].fetch_add(1, SeqCst);
                }
            }
        }
        if n % 512 == 0 {
            b.other_calls[i].fetch_add(1, SeqCst);
            match rng.below(6) {
                0 => {
                    let st = pool.stats();
                    if st.recoveries != 0 {
                        return Err(format!("a recovery ran: {st:?}"));
                    }
                }
                1 => {
                    let v = pool.check();
                    if !v.is_empty() {
                        return Err(format!("check: {v:?}"));
                    }
                }
                2 => {
                    must("owners", pool.owners())?;
                }
                3 => {
                    let r = must("reclaim_dead", pool.reclaim_dead())?;
                    if r.pages != 0 {
                        return Err(format!("reclaim_dead freed live blocks: {r:?}"));
                    }
                }
                4 => {
                    must("flush_cache", pool.flush_cache())?;
                    let _ = pool.debug_info();
                }
                _ => {
                    named_round(name, &mut rng)?;
                    named += 1;
                    b.named[i].fetch_add(1, SeqCst);
                }
            }
        }
    }
    timer(0);
    // Let the last signals land, then count them.
    std::thread::sleep(Duration::from_millis(2));
    b.ops[i].store(n, SeqCst);
    b.alrm[i].store(ALRM.load(SeqCst), SeqCst);
    b.chld[i].store(CHLD.load(SeqCst), SeqCst);
    for s in 0..SLOTS {
        if pages[s] > 0 {
            if !marked(pool, offs[s], pages[s] * pg, stamp_of(pid, offs[s])) {
                return Err(format!("block {:#x} was overwritten", offs[s]));
            }
            must("final free", pool.free(offs[s]))?;
        }
    }
    // Reap the last children (blocking: no handler interferes now).
    // SAFETY: plain system calls.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
    }
    must("flush_cache", pool.flush_cache())
}

#[test]
fn torture_signals() {
    let _serial = serial();
    let units = scale().min(60);
    // A safety net only: the workers stop by counts.
    let _w = Watchdog::new("torture_signals", 120 + 10 * units);
    let t0 = Instant::now();
    let pg = shmpool::mapping::page_size();
    let pool = Pool::create(NPAGES * pg, &CreateOptions::default()).unwrap();
    // SAFETY: Board is atomics only.
    let b: SharedMem<Board> = unsafe { SharedMem::new() };
    let names: Vec<ShmName> = (0..WORKERS).map(|_| ShmName::new()).collect();
    let mut kids: Vec<Child> = (0..WORKERS)
        .map(|i| fork_child(|| worker(&pool, &b, i, names[i].as_str(), units)))
        .collect();
    wait_until(Duration::from_secs(10), || {
        (0..WORKERS).all(|i| b.pids[i].load(SeqCst) != 0)
    })
    .unwrap();
    b.go.store(1, SeqCst);
    let mut failed = Vec::new();
    for (i, k) in kids.iter_mut().enumerate() {
        if let Err(e) = k.wait_ok(Duration::from_secs(100 + 10 * units)) {
            failed.push(format!("worker {i}: {e}"));
        }
    }
    // Blocks left in the mailbox by the workers: free them here.
    for m in 0..MB {
        let e = b.mailbox[m].swap(0, SeqCst);
        if e != 0 {
            assert!(pool.free((e >> 16) as usize).is_ok());
        }
    }
    let v = pool.check();
    let s = pool.stats();
    let r = pool.reclaim_dead().unwrap();
    let sum = |a: &[AtomicU64; WORKERS]| a.iter().map(|x| x.load(SeqCst)).sum::<u64>();
    let ops = sum(&b.ops);
    eprintln!(
        "torture signals: {WORKERS} processes, {ops} ops, {} other calls, {} prefaulted named pools, \
         {} SIGALRM, {} SIGCHLD ({} forks), {} OOM, {} failed, {} recoveries, check {}, {:.1} s",
        sum(&b.other_calls),
        sum(&b.named),
        sum(&b.alrm),
        sum(&b.chld),
        sum(&b.forks),
        sum(&b.oom),
        failed.len(),
        s.recoveries,
        if v.is_empty() { "clean" } else { "NOT clean" },
        t0.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(v.is_empty(), "check: {v:#?}");
    assert_eq!(s.recoveries, 0, "a lock was lost");
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (s.payload_bytes, s.payload_bytes, 0)
    );
    assert_eq!(r.pages, 0);
    // What each worker went through (it also checked this itself).
    for i in 0..WORKERS {
        let (n, a, c, k) = (
            b.ops[i].load(SeqCst),
            b.alrm[i].load(SeqCst),
            b.chld[i].load(SeqCst),
            b.named[i].load(SeqCst),
        );
        assert!(
            n >= OPS * units && a >= MIN_ALRM * units && c > 0 && k >= MIN_NAMED * units,
            "worker {i}: {n} ops, {a} SIGALRM, {c} SIGCHLD, {k} named pools"
        );
    }
    // Every named pool was unlinked by the worker that made it: look before
    // the guards unlink the names themselves.
    for n in &names {
        assert!(!shm_exists(n.as_str()), "{} left in /dev/shm", n.as_str());
    }
    drop(names);
    assert_no_leftover_shm();
}
