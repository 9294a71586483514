//! Pieces shared by the SIGKILL torture tests (`torture_kill`,
//! `torture_handoff`): the encoding of a block posted on a shared board (a
//! side mapping, not the pool), the mark of its pages, taking, verifying
//! and freeing a posted block, the kinds of failure of a trial, bounded
//! polling (a hang is a deadlock, never a wait forever) and the hint of
//! who holds the pool lock.

use super::marked;
use shmpool::{OwnerInfo, Pool};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// A board entry holds a posted block.
pub const VALID: u64 = 1 << 63;
/// ... which a process has taken (its index in the taker field).
pub const TAKEN: u64 = 1 << 62;

/// A board entry: the block's page index in the mapping (24 bits), its
/// pages (16), who took it (8, once TAKEN) and who posted it (8): process
/// indices below 256, blocks below 65536 pages, pools below 2^24 pages.
pub fn entry(off: usize, pages: usize, poster: usize, pg: usize) -> u64 {
    VALID | (poster as u64) << 48 | (pages as u64) << 24 | (off / pg) as u64
}

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub off: usize,
    pub pages: usize,
    pub poster: usize,
    pub taker: Option<usize>,
}

pub fn decode(e: u64, pg: usize) -> Entry {
    Entry {
        off: (e & 0xFF_FFFF) as usize * pg,
        pages: (e >> 24 & 0xFFFF) as usize,
        poster: (e >> 48 & 0xFF) as usize,
        taker: (e & TAKEN != 0).then_some((e >> 40 & 0xFF) as usize),
    }
}

/// What the first word of each page of a block says.
pub fn stamp_of(pid: i32, off: usize) -> u64 {
    (pid as u32 as u64) << 32 | (off as u64 & 0xFFFF_FFFF)
}

/// Process `taker` takes board entry `slot` if it holds an untaken block,
/// verifies the poster's marks (`pids`: the pid of every process index)
/// and frees it, then empties the entry. Whether it took one.
pub fn take_posted(
    pool: &Pool,
    slot: &AtomicU64,
    pids: &[AtomicI32],
    taker: usize,
    pg: usize,
) -> Result<bool, String> {
    let e = slot.load(SeqCst);
    if e & VALID == 0 || e & TAKEN != 0 {
        return Ok(false);
    }
    if slot
        .compare_exchange(e, e | TAKEN | (taker as u64) << 40, SeqCst, SeqCst)
        .is_err()
    {
        return Ok(false);
    }
    let d = decode(e, pg);
    let ppid = pids[d.poster].load(SeqCst);
    let bytes = d.pages * pg;
    if !marked(pool, d.off, bytes, stamp_of(ppid, d.off)) {
        return Err(format!(
            "taken block {:#x} ({} pages) of process {} was overwritten",
            d.off, d.pages, d.poster
        ));
    }
    match pool.free(d.off) {
        Ok(x) if x == bytes => {}
        r => return Err(format!("free of taken block {:#x}: {r:?}", d.off)),
    }
    slot.store(0, SeqCst);
    Ok(true)
}

/// How a trial failed.
#[derive(Debug)]
pub enum Fail {
    Deadlock(String),
    Violation(String),
    Lost(u64, String),
}

pub fn violation<T>(msg: String) -> Result<T, Fail> {
    Err(Fail::Violation(msg))
}

/// Polls `cond` until it holds; a deadlock after `bound`.
pub fn wait_within(
    bound: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool, Fail>,
) -> Result<(), Fail> {
    let t0 = Instant::now();
    let mut spins = 0u32;
    loop {
        if cond()? {
            return Ok(());
        }
        if t0.elapsed() > bound {
            return Err(Fail::Deadlock(format!("{what}: not done within {bound:?}")));
        }
        spins += 1;
        if spins < 200 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// The thread id holding the pool lock, 0 if none: glibc keeps the owner's
/// tid in the low 30 bits of the robust mutex's first word (a hint only,
/// as in `lock.rs`). A worker is single-threaded: its tid is its pid.
pub fn lock_holder(pool: &Pool) -> i32 {
    let off = std::mem::offset_of!(shmpool::layout::Header, lock);
    // SAFETY: the mutex lies at that offset of the live mapping, 4-byte
    // aligned; an atomic read of its first word races with nothing unsound.
    let w = unsafe { (*pool.addr(off).cast::<AtomicI32>()).load(SeqCst) };
    w & 0x3FFF_FFFF
}

/// A block a live process holds: (offset, pages, owner pid).
pub type Held = (usize, usize, i32);

/// Posted block `d`, taken by a process now dead and not freed by it, of
/// a live poster (pid `ppid`): an orphan if the poster still owns it at
/// its size and holds it nowhere else (`held`). Frees an orphan on the dead
/// taker's behalf, after checking its marks. Whether it freed one.
pub fn free_orphan(
    pool: &Pool,
    d: &Entry,
    pg: usize,
    ppid: i32,
    held: &[Held],
) -> Result<bool, Fail> {
    let bytes = d.pages * pg;
    let orphan = pool.owner_of(d.off) == Ok(ppid)
        && pool.size(d.off) == Ok(bytes)
        && !held.iter().any(|h| h.0 == d.off);
    if !orphan {
        return Ok(false);
    }
    if !marked(pool, d.off, bytes, stamp_of(ppid, d.off)) {
        return violation(format!("orphan {:#x} was overwritten", d.off));
    }
    match pool.free(d.off) {
        Ok(x) if x == bytes => Ok(true),
        r => violation(format!("free of orphan {:#x}: {r:?}", d.off)),
    }
}

/// Every block of `held` is live at its size, owned by its pid and intact,
/// and no two overlap (`held` ends sorted).
pub fn check_held(pool: &Pool, pg: usize, held: &mut [Held]) -> Result<(), Fail> {
    for &(off, p, owner) in held.iter() {
        let bytes = p * pg;
        if pool.size(off) != Ok(bytes) || pool.owner_of(off) != Ok(owner) {
            return violation(format!(
                "block {off:#x} ({p} pages) of pid {owner}: size {:?}, owner {:?}",
                pool.size(off),
                pool.owner_of(off)
            ));
        }
        if !marked(pool, off, bytes, stamp_of(owner, off)) {
            return violation(format!("block {off:#x} of pid {owner} was overwritten"));
        }
    }
    held.sort();
    for w in held.windows(2) {
        if w[0].0 + w[0].1 * pg > w[1].0 {
            return violation(format!("blocks overlap: {:?} and {:?}", w[0], w[1]));
        }
    }
    Ok(())
}

/// What `owners` says pid `p` owns and what `held` gives it, as (pages,
/// blocks), if they differ.
pub fn owners_disagree(
    owners: &[OwnerInfo],
    held: &[Held],
    p: i32,
) -> Option<((u64, u64), (u64, u64))> {
    let want = held
        .iter()
        .filter(|h| h.2 == p)
        .fold((0, 0), |a, h| (a.0 + h.1 as u64, a.1 + 1));
    let have = owners
        .iter()
        .find(|o| o.pid == p)
        .map_or((0, 0), |o| (o.pages, o.blocks));
    (have != want).then_some((have, want))
}

/// The blocks a process's journal lists (`offs`, `pages`: one slot a
/// block, 0 pages = empty slot), as held by pid `p`.
pub fn journal<'a>(
    offs: &'a [AtomicU64],
    pages: &'a [AtomicU64],
    p: i32,
) -> impl Iterator<Item = Held> + 'a {
    offs.iter().zip(pages).filter_map(move |(o, k)| {
        let k = k.load(SeqCst) as usize;
        (k > 0).then(|| (o.load(SeqCst) as usize, k, p))
    })
}

/// The board's entries that are not empty: (index, entry).
pub fn board_entries(board: &[AtomicU64], pg: usize) -> Vec<(usize, Entry)> {
    board
        .iter()
        .enumerate()
        .filter_map(|(m, e)| {
            let e = e.load(SeqCst);
            (e != 0).then(|| (m, decode(e, pg)))
        })
        .collect()
}

/// The end of a trial, every process gone: the pool is sound and entirely
/// free (else the pages are lost) without any reclaim, and `reclaim_dead`
/// finds nothing (the last processes exited normally).
pub fn check_all_free(pool: &Pool, payload: usize, pg: usize) -> Result<(), Fail> {
    let c = pool.check();
    if !c.is_empty() {
        return violation(format!("check at the end: {c:?}"));
    }
    let s = pool.stats();
    if (s.free_bytes, s.largest_free_bytes, s.live_blocks) != (payload, payload, 0) {
        let lost = (payload - s.free_bytes) as u64 / pg as u64;
        return Err(Fail::Lost(
            lost,
            format!("at the end: {s:?}\n{}", pool.debug_info()),
        ));
    }
    let got = pool
        .reclaim_dead()
        .map_err(|e| Fail::Violation(format!("reclaim_dead: {e}")))?;
    if got.pages != 0 {
        return violation(format!("the last processes left {got:?}"));
    }
    Ok(())
}
