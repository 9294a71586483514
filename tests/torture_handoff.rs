//! Torture: SIGKILL among processes that hand blocks to each other.
//!
//! The hand-off pattern of issue 13: *producers* allocate blocks (mostly
//! 1 to 64 pages, whose frees by another process go to the owner's inbox;
//! some 65 to 256 pages, freed through the locked path), mark the first
//! word of every page with their pid and the block's offset, and post them
//! on a shared board (a side mapping, not the pool); *consumers* take
//! posted blocks, verify the marks and free them, so nearly every free is a
//! remote free into a producer's inbox, and producers drain their inboxes
//! on their cache misses. Each trial starts 2 producers and 2 consumers and
//! SIGKILLs several of them, each replaced by a fresh process of its role:
//! - at a random moment (after a random number of its operations and a
//!   random delay), or as soon as it is seen holding the pool lock;
//! - stopped at a crash point (`crash-points` feature): a consumer holding
//!   a producer's inbox lock before or after its commit, a producer
//!   draining its inbox, any step of the locked path; with the
//!   feature off (or a point not reached soon) it is killed where it is;
//! - a consumer stopped in the middle of a remote free *and* a producer
//!   killed with it (a free into a dying owner's inbox); the other
//!   consumers go on freeing the dead producer's posted blocks into its
//!   inbox afterwards.
//!
//! After the kills of a trial, with the survivors paused between two of
//! their steps (a hang anywhere is a deadlock, never a wait forever):
//! `check()` is empty; every block a live process holds (its journal, its
//! posted blocks nobody took) is live, its own, intact and overlaps no
//! other; a block a killed consumer had taken and not freed is freed on
//! its behalf; `owners()` agrees with the survivors' journals to the page
//! and lists nothing else but the dead; `stats` is exact (free = payload -
//! held - the dead's live blocks); allocating `largest_free_bytes` again
//! and again until it is 0 obtains exactly `free_bytes`; `reclaim_dead`
//! frees exactly the dead owners' pages; then `stats` is exact again.
//! Finally the producers, then the consumers (which empty the board) finish
//! and exit, and the pool must be entirely free and sound.
//!
//! The pool is reused from trial to trial (replaced after a failed one).
//! `SHMPOOL_TORTURE=n` runs n times as many trials.

mod common;

use common::torture::*;
use common::*;
use shmpool::crashpoint::{self, CrashPoint};
use shmpool::{CreateOptions, Error, Pool};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const NPAGES: usize = 8192;
const NPROD: usize = 2;
const NCONS: usize = 2;
/// Process indices of one trial (the first ones and every replacement).
const MAXP: usize = 40;
/// Blocks a producer holds at most.
const SLOTS: usize = 12;
/// Board entries.
const MB: usize = 64;
/// Every phase of a trial must be over within this.
const BOUND: Duration = Duration::from_secs(10);
/// Operations each live process must complete between two kills.
const BETWEEN_KILLS: u64 = 20;
const DEFAULT_TRIALS: u64 = 8;
/// Kills per trial: 2 to 5.
const MIN_KILLS: u64 = 2;
const MAX_KILLS: u64 = 5;

/// Phases (0: run).
const PAUSE: u32 = 1;
/// Producers free what they hold and exit; consumers go on.
const FIN_PROD: u32 = 2;
/// Consumers take everything left on the board and exit.
const FIN_CONS: u32 = 3;

/// The trial's shared state, outside the pool.
#[repr(C)]
struct Board {
    phase: AtomicU32,
    pids: [AtomicI32; MAXP],
    ops: [AtomicU64; MAXP],
    paused: [AtomicU32; MAXP],
    /// 1 + the index in `points()` of a crash point the process must arm
    /// at its next step (0: none).
    arm: [AtomicU32; MAXP],
    /// A producer's journal: the blocks it holds (pages 0 = empty slot).
    offs: [[AtomicU64; SLOTS]; MAXP],
    pages: [[AtomicU64; SLOTS]; MAXP],
    /// 0, or a posted block (see `entry`).
    board: [AtomicU64; MB],
}

/// Every crash point: those without the pool lock (the remote free and the
/// drain among them) first.
fn points() -> Vec<CrashPoint> {
    crashpoint::UNLOCKED
        .iter()
        .chain(crashpoint::ALL.iter())
        .copied()
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Producer,
    Consumer,
}

struct Ctx<'a> {
    pool: &'a Pool,
    b: &'a Board,
    i: usize,
    pid: i32,
    pg: usize,
}

/// Mostly cache-sized blocks (half of them 1 to 4 pages), a quarter for
/// the locked path.
fn random_pages(rng: &mut Rng) -> usize {
    (match rng.below(100) {
        0..=39 => 1 + rng.below(4),
        40..=74 => 5 + rng.below(60),
        _ => 65 + rng.below(192),
    }) as usize
}

impl Ctx<'_> {
    /// Takes board entry `m` if it holds an untaken block: verifies and
    /// frees it. Whether it took one.
    fn take(&self, m: usize) -> Result<bool, String> {
        take_posted(self.pool, &self.b.board[m], &self.b.pids, self.i, self.pg)
    }

    /// The first untaken entry from a random place on, taken.
    fn take_any(&self, rng: &mut Rng) -> Result<bool, String> {
        let m0 = rng.below(MB as u64) as usize;
        for k in 0..MB {
            if self.take((m0 + k) % MB)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn own_block(&self, s: usize) -> Result<Option<(usize, usize)>, String> {
        let k = self.b.pages[self.i][s].load(SeqCst) as usize;
        if k == 0 {
            return Ok(None);
        }
        let o = self.b.offs[self.i][s].load(SeqCst) as usize;
        if !marked(self.pool, o, k * self.pg, stamp_of(self.pid, o)) {
            return Err(format!("own block {o:#x} ({k} pages) was overwritten"));
        }
        Ok(Some((o, k)))
    }

    fn free_own(&self, s: usize, o: usize, k: usize) -> Result<(), String> {
        self.b.pages[self.i][s].store(0, SeqCst);
        match self.pool.free(o) {
            Ok(x) if x == k * self.pg => Ok(()),
            r => Err(format!("free of own block {o:#x} ({k} pages): {r:?}")),
        }
    }

    fn produce(&self, rng: &mut Rng) -> Result<(), String> {
        let (b, i, pg) = (self.b, self.i, self.pg);
        let s = rng.below(SLOTS as u64) as usize;
        let r = rng.below(100);
        match self.own_block(s)? {
            None if r < 90 => {
                let n = random_pages(rng);
                match self.pool.alloc(n * pg) {
                    Ok(o) => {
                        mark(self.pool, o, n * pg, stamp_of(self.pid, o));
                        b.offs[i][s].store(o as u64, SeqCst);
                        b.pages[i][s].store(n as u64, SeqCst);
                    }
                    Err(Error::OutOfMemory) => {}
                    Err(e) => return Err(format!("alloc of {n} pages: {e}")),
                }
                Ok(())
            }
            None => Ok(()),
            // Mostly handed off; some freed by ourselves (into our cache).
            Some((o, k)) if r < 85 => {
                let m0 = rng.below(MB as u64) as usize;
                for j in 0..MB {
                    let m = (m0 + j) % MB;
                    if b.board[m]
                        .compare_exchange(0, entry(o, k, i, pg), SeqCst, SeqCst)
                        .is_ok()
                    {
                        b.pages[i][s].store(0, SeqCst);
                        return Ok(());
                    }
                }
                self.free_own(s, o, k)
            }
            Some((o, k)) => self.free_own(s, o, k),
        }
    }

    fn consume(&self, rng: &mut Rng) -> Result<(), String> {
        if !self.take_any(rng)? {
            // Nothing posted: let a producer have the core.
            // SAFETY: sched_yield has no preconditions.
            unsafe {
                libc::sched_yield();
            }
        }
        Ok(())
    }
}

/// A process of the trial: steps until told to finish, pausing when asked,
/// arming a crash point when asked; then gives back what it holds (a
/// consumer: everything left on the board) and its cache.
fn worker(pool: &Pool, b: &Board, i: usize, role: Role, seed: u64) -> Result<(), String> {
    die_with_parent();
    let pid = std::process::id() as i32;
    let c = Ctx {
        pool,
        b,
        i,
        pid,
        pg: pool.geometry().page_size,
    };
    b.pids[i].store(pid, SeqCst);
    let pts = points();
    let mut rng = Rng(seed);
    loop {
        match b.phase.load(SeqCst) {
            PAUSE => {
                b.paused[i].store(1, SeqCst);
                wait_until(Duration::from_secs(120), || b.phase.load(SeqCst) != PAUSE)?;
                b.paused[i].store(0, SeqCst);
                continue;
            }
            FIN_PROD if role == Role::Producer => break,
            FIN_CONS => break,
            _ => {}
        }
        let a = b.arm[i].swap(0, SeqCst);
        if a != 0 {
            crashpoint::arm(Some(pts[a as usize - 1]));
        }
        match role {
            Role::Producer => c.produce(&mut rng)?,
            Role::Consumer => c.consume(&mut rng)?,
        }
        b.ops[i].fetch_add(1, SeqCst);
    }
    match role {
        Role::Producer => {
            for s in 0..SLOTS {
                if let Some((o, k)) = c.own_block(s)? {
                    c.free_own(s, o, k)?;
                }
            }
        }
        Role::Consumer => {
            for m in 0..MB {
                c.take(m)?;
            }
        }
    }
    pool.flush_cache().map_err(|e| format!("flush_cache: {e}"))
}

#[derive(Default)]
struct Totals {
    trials: u64,
    kills: u64,
    producers_killed: u64,
    consumers_killed: u64,
    at_point: u64,
    inbox_points: u64,
    pairs: u64,
    caught_in_lock: u64,
    orphans: u64,
    dead_posts_freed: u64,
    reclaimed_pages: u64,
    recovered: u64,
    ops: u64,
}

/// Polls `cond` until it holds; a deadlock after `BOUND`.
fn wait(what: &str, cond: impl FnMut() -> Result<bool, Fail>) -> Result<(), Fail> {
    wait_within(BOUND, what, cond)
}

fn new_pool() -> Pool {
    let pg = shmpool::mapping::page_size();
    Pool::create(NPAGES * pg, &CreateOptions::default()).expect("create pool")
}

/// The processes of a trial.
struct Procs<'a> {
    pool: &'a Pool,
    b: &'a Board,
    kids: Vec<Child>,
    roles: Vec<Role>,
    live: Vec<usize>,
    dead: Vec<usize>,
}

impl Procs<'_> {
    fn spawn(&mut self, role: Role, seed: u64) -> Result<usize, Fail> {
        let i = self.kids.len();
        if i >= MAXP {
            return violation("too many processes in one trial".into());
        }
        let (pool, b) = (self.pool, self.b);
        self.kids
            .push(fork_child(|| worker(pool, b, i, role, seed)));
        self.roles.push(role);
        self.live.push(i);
        Ok(i)
    }

    /// A violation if a live process has ended.
    fn all_running(&mut self, what: &str) -> Result<(), Fail> {
        for &w in &self.live {
            if let Some(st) = self.kids[w].poll() {
                return violation(format!(
                    "{what}: {:?} {w} (pid {}) ended with {}",
                    self.roles[w],
                    self.kids[w].pid,
                    describe(st)
                ));
            }
        }
        Ok(())
    }

    /// SIGKILLs `i` (already stopped, or running) and reaps it.
    fn kill(&mut self, i: usize, t: &mut Totals) -> Result<(), Fail> {
        let st = self.kids[i].kill();
        if !(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL) {
            return violation(format!(
                "{:?} {i} ended by itself: {}",
                self.roles[i],
                describe(st)
            ));
        }
        self.live.retain(|&x| x != i);
        self.dead.push(i);
        t.kills += 1;
        match self.roles[i] {
            Role::Producer => t.producers_killed += 1,
            Role::Consumer => t.consumers_killed += 1,
        }
        Ok(())
    }

    /// Asks `i` to arm crash point `p` (1 + its index in `points()`) and
    /// waits for it to stop there. Whether it did; if it does not within a
    /// short while it is SIGKILLed wherever it is (and reaped).
    fn stop_at(&mut self, i: usize, p: u32) -> Result<bool, Fail> {
        self.b.arm[i].store(p, SeqCst);
        match self.kids[i].wait_stopped(Duration::from_millis(300)) {
            Ok(()) => Ok(true),
            Err(_) => {
                // Killed by wait_stopped's timeout, unless it ended by
                // itself (`kill` reports that).
                Ok(false)
            }
        }
    }

    fn wait_progress(&mut self, what: &str) -> Result<(), Fail> {
        let base: Vec<u64> = (0..MAXP).map(|i| self.b.ops[i].load(SeqCst)).collect();
        let live = self.live.clone();
        wait(what, || {
            self.all_running(what)?;
            Ok(live
                .iter()
                .all(|&i| self.b.ops[i].load(SeqCst) >= base[i] + BETWEEN_KILLS))
        })
    }
}

fn kill_one(ps: &mut Procs, rng: &mut Rng, t: &mut Totals) -> Result<(), Fail> {
    let pts = points();
    let is_inbox = |k: usize| pts[k].name().starts_with("Inbox");
    let inbox: Vec<usize> = (0..pts.len()).filter(|&k| is_inbox(k)).collect();
    // A consumer only frees: the points of a free (and of the lock).
    let frees: Vec<usize> = (0..pts.len())
        .filter(|&k| {
            let n = pts[k].name();
            n.contains("Free") || n.starts_with("InboxPush") || n.contains("Lock")
        })
        .collect();
    let live = ps.live.clone();
    let v = live[rng.below(live.len() as u64) as usize];
    let role = ps.roles[v];
    let pick = |rng: &mut Rng| -> usize {
        let any: Vec<usize> = match role {
            Role::Producer => (0..pts.len()).collect(),
            Role::Consumer => frees.clone(),
        };
        let inb: Vec<usize> = inbox.iter().copied().filter(|k| any.contains(k)).collect();
        // Half of the time a point of the remote free or the drain.
        if !inb.is_empty() && rng.below(2) == 0 {
            inb[rng.below(inb.len() as u64) as usize]
        } else {
            any[rng.below(any.len() as u64) as usize]
        }
    };
    let mut replace = vec![v];
    match rng.below(4) {
        // A random moment.
        0 => {
            let target = ps.b.ops[v].load(SeqCst) + rng.below(300);
            wait("victim's progress", || {
                ps.all_running("before the kill")?;
                Ok(ps.b.ops[v].load(SeqCst) >= target)
            })?;
            let until = Instant::now() + Duration::from_micros(rng.below(300));
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            ps.kill(v, t)?;
        }
        // Seen holding the pool lock (within 20 ms), else where it is.
        1 => {
            let vpid = ps.b.pids[v].load(SeqCst);
            let until = Instant::now() + Duration::from_millis(20);
            while vpid != 0 && Instant::now() < until {
                if lock_holder(ps.pool) == vpid {
                    t.caught_in_lock += 1;
                    break;
                }
                std::hint::spin_loop();
            }
            ps.kill(v, t)?;
        }
        // Stopped at a crash point.
        2 => {
            let k = pick(rng);
            if ps.stop_at(v, k as u32 + 1)? {
                t.at_point += 1;
                if is_inbox(k) {
                    t.inbox_points += 1;
                }
            }
            ps.kill(v, t)?;
        }
        // A consumer stopped in a remote free, and a producer with it.
        _ => {
            let cons: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| ps.roles[i] == Role::Consumer)
                .collect();
            let prods: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| ps.roles[i] == Role::Producer)
                .collect();
            let c = cons[rng.below(cons.len() as u64) as usize];
            let p = prods[rng.below(prods.len() as u64) as usize];
            let pushes: Vec<usize> = inbox
                .iter()
                .copied()
                .filter(|&k| pts[k].name().starts_with("InboxPush"))
                .collect();
            let k = if pushes.is_empty() {
                frees[rng.below(frees.len() as u64) as usize]
            } else {
                pushes[rng.below(pushes.len() as u64) as usize]
            };
            let stopped = ps.stop_at(c, k as u32 + 1)?;
            if stopped {
                t.at_point += 1;
                if is_inbox(k) {
                    t.inbox_points += 1;
                }
            }
            // The producer dies first, while the consumer is (maybe) in
            // the middle of freeing into its inbox.
            ps.kill(p, t)?;
            ps.kill(c, t)?;
            t.pairs += 1;
            replace = vec![p, c];
        }
    }
    for r in replace {
        let role = ps.roles[r];
        ps.spawn(role, rng.next())?;
    }
    ps.wait_progress("the others after a kill")
}

fn trial(pool: &Pool, rng: &mut Rng, t: &mut Totals) -> Result<(), Fail> {
    let pg = pool.geometry().page_size;
    let payload = pool.stats().payload_bytes;
    let rec0 = pool.stats().recoveries;
    // SAFETY: Board is atomics only, valid when zeroed.
    let b: SharedMem<Board> = unsafe { SharedMem::new() };
    let mut ps = Procs {
        pool,
        b: &b,
        kids: Vec::new(),
        roles: Vec::new(),
        live: Vec::new(),
        dead: Vec::new(),
    };
    for _ in 0..NPROD {
        ps.spawn(Role::Producer, rng.next())?;
    }
    for _ in 0..NCONS {
        ps.spawn(Role::Consumer, rng.next())?;
    }
    ps.wait_progress("start")?;
    let nkills = MIN_KILLS + rng.below(MAX_KILLS - MIN_KILLS + 1);
    for _ in 0..nkills {
        kill_one(&mut ps, rng, t)?;
    }

    // Pause the survivors and look at everything.
    b.phase.store(PAUSE, SeqCst);
    let live = ps.live.clone();
    wait("survivors pausing", || {
        ps.all_running("pausing")?;
        Ok(live.iter().all(|&s| b.paused[s].load(SeqCst) == 1))
    })?;
    let c = pool.check();
    if !c.is_empty() {
        return violation(format!("check after the kills: {c:?}"));
    }
    let pid = |i: usize| b.pids[i].load(SeqCst);
    let is_live = |i: usize| live.contains(&i);
    // Blocks live processes hold: producers' journals and their posts that
    // nobody took.
    let mut held: Vec<Held> = Vec::new();
    for &s in &live {
        held.extend(journal(&b.offs[s], &b.pages[s], pid(s)));
    }
    let entries = board_entries(&b.board, pg);
    for &(_, d) in &entries {
        if d.taker.is_none() && is_live(d.poster) {
            held.push((d.off, d.pages, pid(d.poster)));
        }
    }
    // A paused consumer is between two steps: it holds no entry. A dead
    // poster's entries go with its other blocks (reclaim_dead). An entry
    // a dead consumer took, of a live poster, is an orphan if its poster
    // still owns it and holds it nowhere else: free it on the consumer's
    // behalf (it went to the poster's inbox, or the locked path).
    for &(m, d) in &entries {
        match d.taker {
            Some(tk) if is_live(tk) => {
                return violation(format!("board entry {m} held by live consumer {tk}"));
            }
            Some(_) if is_live(d.poster) => {
                if free_orphan(pool, &d, pg, pid(d.poster), &held)? {
                    t.orphans += 1;
                }
                b.board[m].store(0, SeqCst);
            }
            _ if !is_live(d.poster) => {
                t.dead_posts_freed += 1;
                b.board[m].store(0, SeqCst);
            }
            _ => {}
        }
    }
    check_held(pool, pg, &mut held)?;
    let held_pages: usize = held.iter().map(|h| h.1).sum();
    let owners = pool
        .owners()
        .map_err(|e| Fail::Violation(format!("owners: {e}")))?;
    for &s in &live {
        if let Some((have, want)) = owners_disagree(&owners, &held, pid(s)) {
            return violation(format!(
                "{:?} {s} owns {have:?} (pages, blocks), its journal says {want:?}",
                ps.roles[s]
            ));
        }
    }
    let dead_pids: Vec<i32> = ps.dead.iter().map(|&i| pid(i)).collect();
    let (mut dead_pages, mut dead_blocks) = (0u64, 0u64);
    for o in &owners {
        if o.pages == 0 || live.iter().any(|&s| pid(s) == o.pid) {
            continue;
        }
        if !dead_pids.contains(&o.pid) || o.alive {
            return violation(format!("owners lists {o:?}, neither a survivor nor killed"));
        }
        dead_pages += o.pages;
        dead_blocks += o.blocks;
    }
    let s = pool.stats();
    let busy = held_pages + dead_pages as usize;
    if s.free_bytes != payload - busy * pg || s.live_blocks != held.len() as u64 + dead_blocks {
        return violation(format!(
            "before reclaim_dead: {s:?}; survivors hold {} blocks of {held_pages} pages, \
             the dead {dead_blocks} of {dead_pages}",
            held.len()
        ));
    }
    // Greedy: allocating the largest free run until it is 0 obtains
    // exactly what stats says is free (nothing lost in a dead cache or
    // inbox, nothing counted twice).
    let free0 = s.free_bytes;
    let mut got = Vec::new();
    loop {
        let c = pool.stats().largest_free_bytes;
        if c == 0 || got.len() > NPAGES {
            break;
        }
        match pool.alloc(c) {
            Ok(o) => got.push((o, c)),
            Err(e) => return violation(format!("greedy: alloc of largest {c} bytes: {e}")),
        }
    }
    let obtained: usize = got.iter().map(|g| g.1).sum();
    for &(o, c) in &got {
        if pool.free(o) != Ok(c) {
            return violation(format!("greedy: free of {o:#x}"));
        }
    }
    pool.flush_cache()
        .map_err(|e| Fail::Violation(format!("flush_cache: {e}")))?;
    if obtained != free0 {
        return Err(Fail::Lost(
            (free0.abs_diff(obtained) / pg) as u64,
            format!("greedy allocation obtained {obtained} bytes, stats said {free0} free"),
        ));
    }
    let r = pool
        .reclaim_dead()
        .map_err(|e| Fail::Violation(format!("reclaim_dead: {e}")))?;
    if r.pages != dead_pages || r.owners.iter().any(|&(p, _)| !dead_pids.contains(&p)) {
        return violation(format!(
            "reclaim_dead freed {r:?}; the dead {dead_pids:?} owned {dead_pages} pages"
        ));
    }
    t.reclaimed_pages += r.pages;
    let c = pool.check();
    if !c.is_empty() {
        return violation(format!("check after reclaim_dead: {c:?}"));
    }
    let s = pool.stats();
    if s.free_bytes != payload - held_pages * pg || s.live_blocks != held.len() as u64 {
        return violation(format!(
            "after reclaim_dead: {s:?}, survivors hold {} blocks of {held_pages} pages",
            held.len()
        ));
    }
    t.recovered += s.recoveries - rec0;

    // The producers free what they hold and exit, then the consumers empty
    // the board and exit.
    let prods: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| ps.roles[i] == Role::Producer)
        .collect();
    b.phase.store(FIN_PROD, SeqCst);
    for &i in &prods {
        if let Err(e) = ps.kids[i].wait_ok(BOUND) {
            return violation(format!("producer {i}: {e}"));
        }
    }
    b.phase.store(FIN_CONS, SeqCst);
    for &i in &live {
        if let Err(e) = ps.kids[i].wait_ok(BOUND) {
            return violation(format!("{:?} {i}: {e}", ps.roles[i]));
        }
    }
    t.ops += (0..MAXP).map(|i| b.ops[i].load(SeqCst)).sum::<u64>();
    if let Some(m) = (0..MB).find(|&m| b.board[m].load(SeqCst) != 0) {
        return violation(format!("board entry {m} left"));
    }
    check_all_free(pool, payload, pg)
}

#[test]
fn torture_handoff() {
    let _serial = serial();
    let trials = DEFAULT_TRIALS * scale();
    let _w = Watchdog::new("torture_handoff", 60 + trials);
    let t0 = Instant::now();
    let mut pool = new_pool();
    let mut rng = Rng(0x4A4D_0FF5 ^ trials);
    let mut t = Totals::default();
    let mut failures = Vec::new();
    for n in 0..trials {
        t.trials += 1;
        if let Err(f) = trial(&pool, &mut rng, &mut t) {
            let msg = match f {
                Fail::Deadlock(m) => format!("DEADLOCK {m}"),
                Fail::Violation(m) => format!("VIOLATION {m}"),
                Fail::Lost(k, m) => format!("LOST {k} pages: {m}"),
            };
            say(&format!("torture handoff: trial {n}: {msg}"));
            failures.push(msg);
            // Its children are killed and reaped; start from a new pool.
            pool = new_pool();
        }
    }
    eprintln!(
        "torture handoff: {} trials, {} kills ({} producers, {} consumers; {} stopped at a \
         crash point, {} of them in a remote free or drain; {} consumer+producer pairs; {} seen \
         holding the pool lock), {} failed trials ({} orphans freed, {} dead producers' posts, \
         {} pages reclaimed, {} recoveries, {} ops, {:.1} s)",
        t.trials,
        t.kills,
        t.producers_killed,
        t.consumers_killed,
        t.at_point,
        t.inbox_points,
        t.pairs,
        t.caught_in_lock,
        failures.len(),
        t.orphans,
        t.dead_posts_freed,
        t.reclaimed_pages,
        t.recovered,
        t.ops,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failed trials: {failures:#?}",
        failures.len()
    );
    if cfg!(feature = "crash-points") {
        assert!(t.inbox_points > 0, "no kill in a remote free or drain");
    }
    assert_no_leftover_shm();
}
