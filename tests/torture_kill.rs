//! Torture: SIGKILL at random moments among busy workers.
//!
//! Each trial forks 3 or 4 workers that allocate (1 to 100 pages: blocks
//! come from the per-process cache or, on a miss, from the locked path,
//! and a block of another worker is always freed under the lock), stamp
//! the first word of every page with their pid and the block's offset,
//! verify their stamps before freeing, and pass blocks to each other
//! through a shared mailbox (any worker frees what it takes). One worker
//! is SIGKILLed at a random moment: right away, after a random number of
//! its operations and a random delay, or as soon as it is seen holding
//! the pool lock. Then, within a bound (a hang is a deadlock, never a wait
//! forever):
//! 1. the survivors go on and a fresh process does its own work;
//! 2. with the survivors paused: `check()` is empty; every block they hold
//!    (journal and mailbox) is live, owned by them, stamped, and no two
//!    overlap; `owners()` agrees with their journals to the page; a block
//!    the victim had taken from the mailbox and not yet freed (an orphan of
//!    a live poster) is freed; `reclaim_dead()` returns exactly the
//!    victim's pages;
//! 3. the survivors free everything and exit; then the pool is empty again
//!    (free == largest == payload, no live block) without any further
//!    reclaim: anything short of that is pages lost.
//!
//! The pool is reused from trial to trial (replaced only after a failed
//! trial), so owner slots and recoveries pile up as in a long-running
//! program. `SHMPOOL_TORTURE=n` runs n times as many trials.

mod common;

use common::torture::*;
use common::*;
use shmpool::{CreateOptions, Error, Pool};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const NPAGES: usize = 4096;
/// Workers (up to 4) and the fresh process (the last index).
const MAXW: usize = 5;
const FRESH: usize = MAXW - 1;
/// Blocks a worker holds at most.
const SLOTS: usize = 16;
/// Mailbox entries.
const MB: usize = 32;
/// Every phase of a trial must be over within this.
const BOUND: Duration = Duration::from_secs(10);
/// Operations each survivor must complete after the kill.
const AFTER_KILL_OPS: u64 = 25;
/// Operations of the fresh process.
const FRESH_OPS: u64 = 200;
const DEFAULT_TRIALS: u64 = 30;

/// Phases (0: run).
const PAUSE: u32 = 1;
const FINISH: u32 = 2;

/// The trial's shared state, outside the pool.
#[repr(C)]
struct Board {
    phase: AtomicU32,
    pids: [AtomicI32; MAXW],
    ops: [AtomicU64; MAXW],
    paused: [AtomicU32; MAXW],
    /// Each worker's journal: the blocks it holds (pages 0 = empty slot).
    offs: [[AtomicU64; SLOTS]; MAXW],
    pages: [[AtomicU64; SLOTS]; MAXW],
    /// 0, or a posted block (see `entry`).
    mailbox: [AtomicU64; MB],
}

struct Ctx<'a> {
    pool: &'a Pool,
    b: &'a Board,
    i: usize,
    pid: i32,
    pg: usize,
}

impl Ctx<'_> {
    /// Takes mailbox entry `m` if there is one, verifies and frees it.
    fn take(&self, m: usize) -> Result<(), String> {
        take_posted(self.pool, &self.b.mailbox[m], &self.b.pids, self.i, self.pg).map(|_| ())
    }

    fn step(&self, rng: &mut Rng, may_post: bool) -> Result<(), String> {
        let (b, i, pg) = (self.b, self.i, self.pg);
        let r = rng.below(100);
        if r < 20 {
            // The first posted block from a random place on.
            let m0 = rng.below(MB as u64) as usize;
            let m = (0..MB)
                .map(|k| (m0 + k) % MB)
                .find(|&m| self.b.mailbox[m].load(SeqCst) & (VALID | TAKEN) == VALID);
            return m.map_or(Ok(()), |m| self.take(m));
        }
        let s = rng.below(SLOTS as u64) as usize;
        let k = b.pages[i][s].load(SeqCst) as usize;
        if k == 0 {
            // Mostly cache-sized blocks, some for the locked path.
            let n = if rng.below(10) < 7 {
                1 + rng.below(64)
            } else {
                65 + rng.below(36)
            } as usize;
            match self.pool.alloc(n * pg) {
                Ok(o) => {
                    mark(self.pool, o, n * pg, stamp_of(self.pid, o));
                    b.offs[i][s].store(o as u64, SeqCst);
                    b.pages[i][s].store(n as u64, SeqCst);
                }
                Err(Error::OutOfMemory) => {}
                Err(e) => return Err(format!("alloc of {n} pages: {e}")),
            }
            return Ok(());
        }
        let o = b.offs[i][s].load(SeqCst) as usize;
        if !marked(self.pool, o, k * pg, stamp_of(self.pid, o)) {
            return Err(format!("own block {o:#x} ({k} pages) was overwritten"));
        }
        if may_post && r < 40 {
            let m = rng.below(MB as u64) as usize;
            if b.mailbox[m]
                .compare_exchange(0, entry(o, k, i, pg), SeqCst, SeqCst)
                .is_ok()
            {
                b.pages[i][s].store(0, SeqCst);
            }
            return Ok(());
        }
        b.pages[i][s].store(0, SeqCst);
        match self.pool.free(o) {
            Ok(x) if x == k * pg => Ok(()),
            r => Err(format!("free of own block {o:#x} ({k} pages): {r:?}")),
        }
    }
}

/// A worker: steps until FINISH (or `limit` steps for the fresh process),
/// pausing when asked; then frees all it holds (and, unless fresh, all
/// that is left in the mailbox) and gives its cache back.
fn worker(pool: &Pool, b: &Board, i: usize, seed: u64, limit: Option<u64>) -> Result<(), String> {
    die_with_parent();
    let pid = std::process::id() as i32;
    b.pids[i].store(pid, SeqCst);
    let c = Ctx {
        pool,
        b,
        i,
        pid,
        pg: pool.geometry().page_size,
    };
    let mut rng = Rng(seed);
    let mut done = 0u64;
    loop {
        match b.phase.load(SeqCst) {
            PAUSE if limit.is_none() => {
                b.paused[i].store(1, SeqCst);
                wait_until(Duration::from_secs(120), || b.phase.load(SeqCst) != PAUSE)?;
                continue;
            }
            FINISH => break,
            _ => {}
        }
        if limit.is_some_and(|l| done >= l) {
            break;
        }
        c.step(&mut rng, limit.is_none())?;
        done += 1;
        b.ops[i].fetch_add(1, SeqCst);
    }
    if limit.is_none() {
        for m in 0..MB {
            c.take(m)?;
        }
    }
    for s in 0..SLOTS {
        let k = b.pages[i][s].load(SeqCst) as usize;
        if k > 0 {
            let o = b.offs[i][s].load(SeqCst) as usize;
            if !marked(pool, o, k * c.pg, stamp_of(pid, o)) {
                return Err(format!("own block {o:#x} was overwritten"));
            }
            b.pages[i][s].store(0, SeqCst);
            pool.free(o).map_err(|e| format!("final free: {e}"))?;
        }
    }
    pool.flush_cache().map_err(|e| format!("flush_cache: {e}"))
}

#[derive(Default)]
struct Totals {
    trials: u64,
    kills: u64,
    deadlocks: u64,
    violations: u64,
    lost: u64,
    recovered: u64,
    caught_in_lock: u64,
    orphans: u64,
    reclaimed_pages: u64,
    ops: u64,
}

/// Polls `cond` until it holds; a deadlock after `BOUND`.
fn wait(what: &str, cond: impl FnMut() -> Result<bool, Fail>) -> Result<(), Fail> {
    wait_within(BOUND, what, cond)
}

/// A violation if one of `which` has ended.
fn still_running(kids: &mut [Child], which: &[usize], what: &str) -> Result<(), Fail> {
    for &w in which {
        if let Some(st) = kids[w].poll() {
            return violation(format!(
                "{what}: worker {w} (pid {}) ended with {}",
                kids[w].pid,
                describe(st)
            ));
        }
    }
    Ok(())
}

fn new_pool() -> Pool {
    let pg = shmpool::mapping::page_size();
    Pool::create(NPAGES * pg, &CreateOptions::default()).expect("create pool")
}

fn trial(pool: &Pool, rng: &mut Rng, t: &mut Totals) -> Result<(), Fail> {
    let pg = pool.geometry().page_size;
    let payload = pool.stats().payload_bytes;
    let rec0 = pool.stats().recoveries;
    // SAFETY: Board is atomics only, valid when zeroed.
    let b: SharedMem<Board> = unsafe { SharedMem::new() };
    let n = 3 + rng.below(2) as usize;
    let mut kids: Vec<Child> = (0..n)
        .map(|i| {
            let seed = rng.next();
            fork_child(|| worker(pool, &b, i, seed, None))
        })
        .collect();
    let v = rng.below(n as u64) as usize;
    let survivors: Vec<usize> = (0..n).filter(|&i| i != v).collect();

    // The random moment: right away, or after some of the victim's
    // operations, plus a random delay.
    let target = match rng.below(8) {
        0 => 0,
        1 => rng.below(10),
        _ => rng.below(400),
    };
    wait("victim's progress", || {
        still_running(&mut kids, &(0..n).collect::<Vec<_>>(), "before the kill")?;
        Ok(b.ops[v].load(SeqCst) >= target)
    })?;
    match rng.below(3) {
        0 => {}
        1 => {
            let until = Instant::now() + Duration::from_micros(rng.below(400));
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        _ => {
            // Catch the victim holding the pool lock, if it takes it
            // within a few milliseconds.
            let vpid = b.pids[v].load(SeqCst);
            let until = Instant::now() + Duration::from_millis(20);
            while vpid != 0 && Instant::now() < until {
                if lock_holder(pool) == vpid {
                    t.caught_in_lock += 1;
                    break;
                }
                std::hint::spin_loop();
            }
        }
    }
    let st = kids[v].kill();
    if !(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL) {
        return violation(format!("the victim ended by itself: {}", describe(st)));
    }
    t.kills += 1;

    // 1. The survivors go on; a fresh process does its work.
    let base: Vec<u64> = (0..MAXW).map(|i| b.ops[i].load(SeqCst)).collect();
    let fseed = rng.next();
    let mut fresh = fork_child(|| worker(pool, &b, FRESH, fseed, Some(FRESH_OPS)));
    wait("survivors and the fresh process after the kill", || {
        still_running(&mut kids, &survivors, "after the kill")?;
        let progressed = survivors
            .iter()
            .all(|&s| b.ops[s].load(SeqCst) >= base[s] + AFTER_KILL_OPS);
        Ok(progressed && fresh.poll().is_some())
    })?;
    if let Err(e) = fresh.wait_ok(BOUND) {
        return violation(format!("fresh process: {e}"));
    }

    // 2. Pause the survivors and look at everything.
    b.phase.store(PAUSE, SeqCst);
    wait("survivors pausing", || {
        still_running(&mut kids, &survivors, "pausing")?;
        Ok(survivors.iter().all(|&s| b.paused[s].load(SeqCst) == 1))
    })?;
    let c = pool.check();
    if !c.is_empty() {
        return violation(format!("check after the kill: {c:?}"));
    }
    let pid = |i: usize| b.pids[i].load(SeqCst);
    let vpid = pid(v);
    let fpid = pid(FRESH);
    // Blocks the survivors hold: their journals and their untaken posts.
    let mut held: Vec<Held> = Vec::new();
    for &s in &survivors {
        held.extend(journal(&b.offs[s], &b.pages[s], pid(s)));
    }
    let entries = board_entries(&b.mailbox, pg);
    for &(_, d) in &entries {
        if d.taker.is_none() && d.poster != v {
            held.push((d.off, d.pages, pid(d.poster)));
        }
    }
    // Entries the victim posted go with its other blocks (reclaim_dead);
    // one it took and had not freed yet, if its poster still owns it and
    // holds it nowhere else, is an orphan: free it on the victim's behalf.
    for &(m, d) in &entries {
        match d.taker {
            Some(tk) if tk != v => {
                return violation(format!("mailbox entry {m} held by live worker {tk}"));
            }
            Some(_) if d.poster != v => {
                if free_orphan(pool, &d, pg, pid(d.poster), &held)? {
                    t.orphans += 1;
                }
                b.mailbox[m].store(0, SeqCst);
            }
            _ if d.poster == v => b.mailbox[m].store(0, SeqCst),
            _ => {}
        }
    }
    check_held(pool, pg, &mut held)?;
    let owners = pool
        .owners()
        .map_err(|e| Fail::Violation(format!("owners: {e}")))?;
    for &s in &survivors {
        if let Some((have, want)) = owners_disagree(&owners, &held, pid(s)) {
            return violation(format!(
                "survivor {s} owns {have:?} (pages, blocks), its journal says {want:?}"
            ));
        }
    }
    let victim_pages = owners
        .iter()
        .find(|o| vpid != 0 && o.pid == vpid)
        .map_or(0, |o| o.pages);
    let got = pool
        .reclaim_dead()
        .map_err(|e| Fail::Violation(format!("reclaim_dead: {e}")))?;
    if got.pages != victim_pages
        || got
            .owners
            .iter()
            .any(|&(p, n)| !(p == vpid || (p == fpid && n == 0)))
    {
        return violation(format!(
            "reclaim_dead freed {got:?}; the victim {vpid} owned {victim_pages} pages"
        ));
    }
    t.reclaimed_pages += got.pages;
    let c = pool.check();
    if !c.is_empty() {
        return violation(format!("check after reclaim_dead: {c:?}"));
    }
    let s = pool.stats();
    let held_pages: usize = held.iter().map(|h| h.1).sum();
    if s.free_bytes != payload - held_pages * pg || s.live_blocks != held.len() as u64 {
        return violation(format!(
            "after reclaim_dead: {s:?}, survivors hold {} blocks of {held_pages} pages",
            held.len()
        ));
    }
    match s.recoveries - rec0 {
        0 => {}
        1 => t.recovered += 1,
        r => return violation(format!("{r} recoveries for one death")),
    }

    // 3. The survivors free everything and exit.
    b.phase.store(FINISH, SeqCst);
    wait("survivors finishing", || {
        Ok(survivors.iter().all(|&s| kids[s].poll().is_some()))
    })?;
    for &s in &survivors {
        if let Err(e) = kids[s].wait_ok(BOUND) {
            return violation(format!("survivor {s}: {e}"));
        }
    }
    t.ops += (0..MAXW).map(|i| b.ops[i].load(SeqCst)).sum::<u64>();
    if let Some(m) = (0..MB).find(|&m| b.mailbox[m].load(SeqCst) != 0) {
        return violation(format!("mailbox entry {m} left"));
    }
    check_all_free(pool, payload, pg)
}

#[test]
fn torture_kill() {
    let _serial = serial();
    let trials = DEFAULT_TRIALS * scale();
    let _w = Watchdog::new("torture_kill", 60 + trials / 4);
    let t0 = Instant::now();
    let mut pool = new_pool();
    let mut rng = Rng(0x7041_7ED0 ^ trials);
    let mut t = Totals::default();
    let mut failures = Vec::new();
    for n in 0..trials {
        t.trials += 1;
        if let Err(f) = trial(&pool, &mut rng, &mut t) {
            let msg = match f {
                Fail::Deadlock(m) => {
                    t.deadlocks += 1;
                    format!("DEADLOCK {m}")
                }
                Fail::Violation(m) => {
                    t.violations += 1;
                    format!("VIOLATION {m}")
                }
                Fail::Lost(k, m) => {
                    t.lost += k;
                    format!("LOST {k} pages: {m}")
                }
            };
            say(&format!("torture kill: trial {n}: {msg}"));
            failures.push(msg);
            // Its children are killed and reaped; start from a new pool.
            pool = new_pool();
        }
    }
    eprintln!(
        "torture kill: {} trials, {} kills, {} deadlocks, {} violations, {} pages lost \
         ({} recoveries, {} kills seen holding the lock, {} orphans freed, \
         {} pages reclaimed, {} ops, {:.1} s)",
        t.trials,
        t.kills,
        t.deadlocks,
        t.violations,
        t.lost,
        t.recovered,
        t.caught_in_lock,
        t.orphans,
        t.reclaimed_pages,
        t.ops,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failed trials: {failures:#?}",
        failures.len()
    );
    assert_eq!(t.kills, t.trials);
    if trials >= 300 {
        assert!(t.recovered > 0, "no victim died holding the pool lock");
    }
}
