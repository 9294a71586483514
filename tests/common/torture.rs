//! Pieces shared by the SIGKILL torture tests (`torture_kill`,
//! `torture_handoff`): the encoding of a block posted on a shared board (a
//! side mapping, not the pool), the mark of its pages, taking, verifying
//! and freeing a posted block, the kinds of failure of a trial, bounded
//! polling (a hang is a deadlock, never a wait forever) and the hint of
//! who holds the pool lock.

use super::marked;
use shmpool::Pool;
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
