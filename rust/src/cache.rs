//! The per-process cache of freed small blocks.
//!
//! One pool lock for every process means that two busy processes spend
//! their time passing the lock's cache line back and forth. So a process
//! keeps its own freed blocks in a small process-local stack per size of
//! up to [`CACHE_CLASSES`] pages (longer ones as runs it splits and
//! merges: `large_cache.rs`): freeing such a block flips the CACHED
//! flag of its `ALLOC` word (the commit, a compare-and-swap) and pushes
//! its page; allocating pops one and flips the flag back (with a new
//! generation, see `desc.rs`). Neither takes the pool lock; both touch
//! only this process's slot in the header.
//!
//! # Nothing is lost, nothing is counted twice
//!
//! - A cached block is still an `ALLOC` word with its owner: crash recovery
//!   keeps it, `reclaim_dead` frees it with the dead owner's other blocks,
//!   `size` and `free` reject it like any freed block.
//! - `stats` counts cached pages as free through per-slot counters
//!   ([`SlotCache`]).
//! - When an alloc finds no free run large enough, it takes every cached
//!   block back under the pool lock and tries again: memory cached by one
//!   process is never denied to another. The taker bumps the slot's `taken`
//!   count, and the owner drops its stacks when it next sees it changed.
//! - The cache of a process that died goes back to the free runs, coalesced,
//!   the next time any process takes the pool lock: each acquisition reads
//!   the keeper mutex (`liveness.rs`) of every slot that holds cached
//!   blocks, one load each (read-mostly lines), and takes back those whose
//!   process the kernel marked dead; a dead slot left holding nothing is
//!   freed for reuse. `stats` also does it for slots without a keeper,
//!   asking `/proc` within its own PID namespace.
//! - `stats` reports as `largest_free_bytes` (the original's `contiguous`)
//!   the largest free run after taking back every cache that may hold a
//!   block longer than it (each slot keeps an upper bound, `max_len`), so
//!   it is always a size `alloc` can satisfy from the free runs, and
//!   allocating it again and again until it is 0 obtains exactly
//!   `free_bytes` in all, whatever other processes hold in their caches
//!   (save a frozen one, below). That take-back walks the descriptors
//!   (O(pages), about 1 ms per GiB, under the pool lock), so it only
//!   happens when a cache may hold a block longer than every free run:
//!   in a pool nearly full, or badly fragmented.
//!
//! # The slot lock
//!
//! The counters must agree with the CACHED words even when a process dies
//! between the flip and the counter update. So every change of a slot's
//! cached blocks and counters happens under that slot's lock, a word holding
//! the holder's *token* (see [`token`]: pid, start time, and the holder's
//! own slot):
//! - the owner only ever *tries* it (fast path; on failure it uses the
//!   locked path), and never waits for the pool lock while holding it;
//! - a process taking blocks back (or checking, reclaiming, adopting its
//!   stacks) holds the pool lock first and then tries the slot lock for a
//!   bounded number of spins and yields. It takes the lock over from a
//!   holder that no longer exists (a token naming another slot is a taker's,
//!   which held the pool lock we now hold, so it is gone; a token naming
//!   this slot is its owner's, gone when its keeper mutex says so), and then
//!   takes every block the slot caches back to the free runs (a dead holder
//!   may have left a list half written: see "Crash safety of the lists"
//!   below). A live holder that keeps the
//!   lock longer (stopped by a debugger or `SIGSTOP` in the middle of a
//!   cache operation, or descheduled there) makes the taker leave that slot
//!   alone: its blocks stay cached and counted as free, and an alloc that
//!   needed them retries a few times outside the pool lock, then reports
//!   `OutOfMemory`. Nobody else waits on it.
//!
//! The order is always pool lock, then slot lock, so there is no deadlock;
//! and the slot lock also serialises the threads of one process over its
//! process-local stacks.
//!
//! # Frees by another process: the owner's inbox and chain
//!
//! A block is often filled by one process and freed by another (a
//! producer hands it to a consumer). Such a free cannot go into the
//! freer's cache (the block is the owner's, and the owner is the one that
//! will allocate again), and through the pool lock it makes both processes
//! fight over the lock's and the allocator's cache lines. The best
//! concurrent allocators send remote frees back to the owner without a
//! global lock: mimalloc pushes them on a per-page "thread free" list the
//! owner collects in one swap, snmalloc batches them as messages to the
//! owning allocator's queue. Both link the freed objects through the
//! objects themselves, so a remote free is O(1) and the list unbounded.
//! Here the metadata never lives in user pages (a write past a block must
//! not corrupt the pool) and everything must stay derivable from the
//! descriptors after a SIGKILL, so:
//!
//! - every page has a *link word* next to its descriptor (`layout.rs`,
//!   4 bytes a page), meaningful only while the page starts a block on a
//!   list below. Like every word but the `ALLOC` ones it is derived: no
//!   recovery reads it, and a list that may be half written is never
//!   walked (its blocks are taken back from the descriptors instead);
//! - each owner slot has an *inbox* in the header ([`Inbox`], on its own
//!   cache line, so freers do not take the owner's line on every free): a
//!   lock word, counters, and a list of blocks (head, tail) linked through
//!   the link words;
//! - a remote free takes the owner's inbox lock (token marked [`REMOTE`]),
//!   flips the block's `ALLOC` word to CACHED from exactly the word it read
//!   (the commit, so double frees are caught as for any free), links the
//!   page at the list's tail and bumps the inbox's counters. To the
//!   descriptors an inbox block is simply a block its owner caches:
//!   recovery keeps it, `reclaim_dead` and the dead-cache reaping free it
//!   with the owner's other cached blocks, `stats` counts it as free
//!   through the inbox's counters;
//! - the owner, on a cache miss with an empty chain (and a reserve, below),
//!   splices the whole inbox onto its *chain* (its slot's own list,
//!   counted with its stacks in the slot's counters) under its slot lock
//!   and then its inbox lock: O(1) whatever the inbox
//!   holds, one acquisition of the line the freers write per batch, which
//!   is what snmalloc's batching and mimalloc's swap buy. It then moves up
//!   to [`CHAIN_STEP`] blocks from the chain into its stacks (each stack
//!   keeps at most its depth; blocks whose stack is full go back on the
//!   chain), so an alloc is still O(1) and the next ones hit;
//! - the owner splices only once its inbox holds a *reserve* of pages
//!   ([`Pool::inbox_reserve_pages`]: 256, or a 64th of a smaller pool),
//!   and freers append to the inbox's tail, so the owner reuses the
//!   blocks freed longest ago first. Before that, and while its chain
//!   holds blocks but none of the wanted size, it allocates from the free
//!   runs (the locked path), which in a steady hand-off happens only until
//!   that many pages circulate. A chain none of whose blocks finds room in
//!   the stacks (their classes full of sizes the owner no longer asks for)
//!   would never empty, so then the owner splices the inbox in front of
//!   it. And an owner that finds no free run for its alloc takes its inbox
//!   whatever it holds before it takes every cache back (a pool with
//!   fewer free pages than the reserve would otherwise take them all back,
//!   O(pages), each time a hand-off used up its free runs). The reason for
//!   the reserve is the cost of a hand-off, which is cache lines moving
//!   between the two cores: a block's descriptor and link word are
//!   last written by the freer. If the owner takes the block the freer has
//!   just freed (a list pushed at its head, spliced at once), it pulls those
//!   lines while the freer is still working on the lines around them (the
//!   inbox's, the next block's), and every step of both processes waits on
//!   the other. With the reserve, the lines the owner pulls are ones the
//!   freer finished with long ago. Measured in the OCaml bench (blocks
//!   handed off per second): 1 page 7.7-7.9 -> 7.9-8.5 M, 1-64 pages
//!   6.6-6.8 -> 7.2-8.0 M; with the bench's earlier ring, whose traffic
//!   made the owner wait more, 1 page 5.5-6.4 -> 8.0-9.3 M
//!   (docs/experiments/handoff, fourth round). The order is the oldest
//!   *batch* first, not strict FIFO: the stacks reverse each batch, which
//!   keeps consecutive allocations on different descriptor lines (strict
//!   FIFO reuse put the owner's next allocation on the line the freer was
//!   freeing, and was slower);
//! - the inbox used to be 9 entries in its cache line: a hand-off runs
//!   ahead by up to the depth of its queue (1024 in the benches), the
//!   processes run in bursts (they alternate on a busy machine), and 99 %
//!   of the frees found the inbox full and took the pool lock, and so did
//!   the owner's allocs. Unbounded lists make both sides lock-free in the
//!   pool's sense. What bounds them is a policy, not room: an inbox takes
//!   blocks while it holds at most a quarter of the pool (`remote_cap`),
//!   and the owner splices only while its stacks and chain hold no more
//!   (so a slot holds at most about half the pool for others' frees;
//!   an alloc that finds no free run takes all of it back first). A block
//!   longer than [`CACHE_CLASSES`], or a full inbox, takes the locked path;
//! - a freer-side batch (an outbox per destination in the freer's slot,
//!   flushed with one inbox lock) was considered: the push above costs one
//!   uncontended lock on a line only the freers write between the owner's
//!   splices, so the batch would save little, and it would add a third
//!   place where a block CACHED for one slot is recorded by another;
//! - `stats` frees what waits in inboxes (they list their blocks:
//!   O(blocks)), so that it coalesces; `flush_cache` gives back the
//!   caller's chain and inbox too.
//!
//! ## Crash safety of the lists
//!
//! Every write to a list happens under a lock whose token names the
//! writer: a freer holds the inbox lock (REMOTE token) from before its
//! commit to after its counters; the owner holds its slot lock (and the
//! inbox lock while splicing) for every chain and stack change. A process
//! killed at any step (crash points `InboxPushLocked`, `InboxPushCommitted`,
//! `InboxPushLinked`, `InboxDrainMoving`, `ChainTaking`) leaves a lock held
//! by a dead token, and lists that may miss a committed block, name it
//! without counting it, or be cut. Whoever takes such a lock over (a taker
//! holding the pool lock: the owner's next locked alloc, `stats`, a
//! take-back, `reclaim_dead`, the dead-cache reaping) never walks those
//! lists: it frees every block CACHED for the slot from the descriptors
//! (one O(pages) walk per such death), empties the slot's counters, chain
//! and inbox, and bumps the slot's `taken` count. So no block is lost (every
//! committed one is CACHED, hence found by the walk) or duplicated (after
//! the walk no record names it): the owner's process-local stacks, which a
//! taker cannot reach, are dropped by the owner at its next cache
//! operation because `taken` changed, so they never name a block that is
//! no longer theirs, nor one on a list (the links of a page must not be
//! written while it is on a list: only a block freed live is linked). An
//! owner that dies has its whole cache reaped, as for any dead owner. The
//! lock order is pool lock, slot lock, inbox lock; freers and owners only
//! *try* the locks they need without the pool lock (a few spins, then the
//! locked path), so nothing waits in a cycle, and nothing waits for a dead
//! process.

use crate::arena::MAX_OWNERS;
use crate::crashpoint::{hit, CrashPoint};
use crate::desc::{alloc_len, alloc_owner, is_cached, reused, tag, CACHED, TAG_ALLOC};
use crate::large_cache::LargeIndex;
use crate::layout::Inbox;
use crate::liveness::{self, KeeperState};
use crate::owner::{self, OwnerIdentity};
use crate::pool::{Locked, Pool};
use crate::Result;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Blocks of up to this many pages go through the per-process cache.
pub const CACHE_CLASSES: u32 = 64;
/// Entries per size class in a process's stacks.
const CACHE_DEPTH: usize = 32;
/// How long a taker tries a slot lock held by a live process before leaving
/// that slot alone: spins, then yields (so that a holder descheduled on our
/// own core gets to finish). A holder keeps it for tens of nanoseconds.
const TAKER_SPINS: u32 = 256;
const TAKER_YIELDS: u32 = 32;

// The per-slot counters and lock live in the shared header.
pub use crate::layout::SlotCache;

/// A token for slot and inbox locks: `pid << 32 | (start time & 0x7FFFFF)
/// << 9 | remote << 8 | slot`, where `slot` is the holder's own owner slot
/// (0 for a process without one) and `remote` ([`REMOTE`]) is set by a
/// process freeing into another slot's inbox. Never 0 (pids are positive).
pub fn token(id: &OwnerIdentity, slot: u16) -> u64 {
    ((id.pid as u32 as u64) << 32) | ((id.start_time & 0x7F_FFFF) << 9) | (slot as u64 & 0xFF)
}

/// Marks the token of a process holding another slot's inbox lock to free
/// into it (without the pool lock: see [`Pool::holder_gone`]).
pub const REMOTE: u64 = 1 << 8;

/// Spins an owner or a freer gives a lock held by someone else (held for
/// tens of nanoseconds) before it takes the locked path instead.
const FAST_SPINS: u32 = 64;
/// Pages an owner's inbox must hold before the owner takes them, in a pool
/// of at least 64 times as many (a 64th of a smaller one; see the module
/// doc).
pub(crate) const INBOX_RESERVE: u64 = 256;
/// Blocks an owner takes off its chain on one miss, at most (bounds the
/// work of an alloc: O(1)).
const CHAIN_STEP: usize = 64;

/// The owner slot a token was made for.
fn token_slot(t: u64) -> u16 {
    (t & 0xFF) as u16
}

/// The pid a token was made for.
fn token_pid(t: u64) -> i32 {
    (t >> 32) as u32 as i32
}

/// How a taker got a slot lock.
#[derive(PartialEq, Eq, Clone, Copy)]
pub(crate) enum Taken {
    /// Released normally by its previous holder: counters are exact.
    Clean,
    /// From a holder that died: recount before trusting the counters.
    FromTheDead,
}

#[inline]
fn try_lock_word(w: &AtomicU64, tok: u64) -> bool {
    tok != 0
        && w.compare_exchange(0, tok, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
}

/// Tries `w` for a few spins (its holders keep it for tens of ns).
#[inline]
fn spin_lock_word(w: &AtomicU64, tok: u64) -> bool {
    for _ in 0..FAST_SPINS {
        if w.load(Ordering::Relaxed) == 0 && try_lock_word(w, tok) {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// Releases the lock if we still hold it. A lock is only taken over
/// from a holder that is gone (see the module doc), which then runs no
/// more code; the check only guards against that judgement ever being
/// wrong, so a plain load and store do (a locked instruction here costs
/// the fast path ~5 ns).
#[inline]
fn unlock_word(w: &AtomicU64, tok: u64) {
    if w.load(Ordering::Relaxed) == tok {
        w.store(0, Ordering::Release);
    }
}

impl Inbox {
    /// Pages and blocks waiting in the inbox (a snapshot without the lock).
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed) as u64
    }

    pub fn max_len(&self) -> u64 {
        self.max_len.load(Ordering::Relaxed) as u64
    }

    /// Empties the inbox's record (inbox lock held, or the slot being given
    /// to a new process).
    fn clear(&self) {
        self.blocks.store(0, Ordering::Relaxed);
        self.pages.store(0, Ordering::Relaxed);
        self.max_len.store(0, Ordering::Relaxed);
    }

    /// Links a committed block at the tail of the list (inbox lock held),
    /// so that the owner reuses the oldest first (see the module doc):
    /// first the old tail's link word and the tail (crash point
    /// `InboxPushLinked`), then the counters. The old tail is on this
    /// list, so its link word is ours to write (no other list names it).
    #[inline]
    fn push(&self, links: &[AtomicU32], page: u32, len: u32) {
        let b = self.blocks.load(Ordering::Relaxed);
        if b == 0 {
            self.head.store(page, Ordering::Relaxed);
        } else if let Some(l) = links.get(self.tail.load(Ordering::Relaxed) as usize) {
            l.store(page, Ordering::Relaxed);
        }
        self.tail.store(page, Ordering::Relaxed);
        hit(CrashPoint::InboxPushLinked);
        self.pages
            .store(self.pages() + len as u64, Ordering::Relaxed);
        self.blocks.store(b + 1, Ordering::Relaxed);
    }

    /// The pages on the list, oldest first (inbox lock held).
    fn walk<'a>(&self, links: &'a [AtomicU32]) -> impl Iterator<Item = u32> + 'a {
        walk_list(
            links,
            self.head.load(Ordering::Relaxed),
            self.blocks.load(Ordering::Relaxed),
        )
    }
}

/// The `n` pages of a list starting at `first`, linked through `links`
/// (stops early at a page out of range: only a corrupt list has one).
fn walk_list(links: &[AtomicU32], first: u32, n: u32) -> impl Iterator<Item = u32> + '_ {
    let mut p = first;
    (0..n).map_while(move |i| {
        let cur = p;
        if i + 1 < n {
            p = links.get(cur as usize)?.load(Ordering::Relaxed);
        }
        ((cur as usize) < links.len()).then_some(cur)
    })
}

impl SlotCache {
    #[inline]
    pub(crate) fn try_lock(&self, tok: u64) -> bool {
        try_lock_word(&self.lock, tok)
    }

    #[inline]
    pub(crate) fn unlock(&self, tok: u64) {
        unlock_word(&self.lock, tok)
    }

    /// Empties the slot's record, chain included, and tells its owner's
    /// stacks they are stale (slot lock held by a taker that took every
    /// block the slot held, or the slot being given to a new process under
    /// the pool lock, its previous owner gone).
    fn clear_counts(&self) {
        self.set(0, 0);
        self.max_len.store(0, Ordering::Relaxed);
        self.chain_len.store(0, Ordering::Relaxed);
        self.taken.store(
            self.taken.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// The pages on the slot's chain (slot lock held).
    fn chain<'a>(&self, links: &'a [AtomicU32]) -> impl Iterator<Item = u32> + 'a {
        walk_list(
            links,
            self.chain.load(Ordering::Relaxed),
            self.chain_len.load(Ordering::Relaxed),
        )
    }

    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Adjusts the counters by `(pages, blocks)`. Only ever called with the
    /// slot lock held, so a plain load and store suffice (no locked
    /// instruction on the fast path); readers without the lock only read.
    #[inline]
    pub(crate) fn add(&self, pages: u64, blocks: u64) {
        self.pages
            .store(self.pages().wrapping_add(pages), Ordering::Relaxed);
        self.blocks
            .store(self.blocks().wrapping_add(blocks), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn sub(&self, pages: u64, blocks: u64) {
        self.pages
            .store(self.pages().saturating_sub(pages), Ordering::Relaxed);
        let left = self.blocks().saturating_sub(blocks);
        self.blocks.store(left, Ordering::Relaxed);
        if left == 0 {
            self.max_len.store(0, Ordering::Relaxed);
        }
    }

    /// Raises the bound on the longest cached block before a block of
    /// `len` pages is cached (slot lock held; a store only when it grows).
    #[inline]
    pub(crate) fn raise_max(&self, len: u32) {
        if self.max_len() < len as u64 {
            self.max_len.store(len as u64, Ordering::Relaxed);
        }
    }

    /// At least the length of the longest block the slot holds cached.
    pub fn max_len(&self) -> u64 {
        self.max_len.load(Ordering::Relaxed)
    }

    /// Sets the counters (slot lock held).
    fn set(&self, pages: u64, blocks: u64) {
        self.pages.store(pages, Ordering::Relaxed);
        self.blocks.store(blocks, Ordering::Relaxed);
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Pages and blocks held for the slot: its stacks and its inbox.
    pub fn held(&self) -> (u64, u64) {
        (
            self.pages().saturating_add(self.inbox.pages()),
            self.blocks().saturating_add(self.inbox.blocks()),
        )
    }

    /// At least the longest block held for the slot (stacks or inbox).
    pub fn max_held(&self) -> u64 {
        self.max_len().max(self.inbox.max_len())
    }
}

/// This process's stacks of cached pages, one per size class. Only touched
/// by a thread holding this process's slot lock with this process's token.
pub(crate) struct LocalCache {
    stacks: UnsafeCell<Stacks>,
    /// The index of our large cached runs (see `large_cache.rs`), under
    /// the same rule as `stacks`.
    large: UnsafeCell<LargeIndex>,
    /// The fork generation the stacks belong to (a child inherits its
    /// parent's, naming the parent's blocks, and must start empty).
    gen: AtomicU64,
}

struct Stacks {
    len: [usize; CACHE_CLASSES as usize + 1],
    pages: [[u32; CACHE_DEPTH]; CACHE_CLASSES as usize + 1],
    /// Pages pushed and not yet popped.
    held: u64,
    /// The slot's `taken` count the entries were pushed under.
    taken: u32,
}

impl Stacks {
    /// Forgets every entry (the pages are left as they are: only the
    /// lengths say what is on a stack).
    fn forget(&mut self) {
        self.len = [0; CACHE_CLASSES as usize + 1];
        self.held = 0;
    }

    /// Whether a block of `len` pages fits (per-class room and the cap).
    fn has_room(&self, len: u32, cap: u64) -> bool {
        // Longer blocks go to the large cache (`large_cache.rs`).
        len <= CACHE_CLASSES
            && self.len[len as usize] < CACHE_DEPTH
            && self.held + len as u64 <= cap
    }

    /// Records a block (the caller checked `has_room`).
    fn push(&mut self, len: u32, page: u32) {
        let k = len as usize;
        self.pages[k][self.len[k]] = page;
        self.len[k] += 1;
        self.held += len as u64;
    }

    /// Removes and returns an entry of exactly `len` pages (maybe stale).
    fn pop(&mut self, len: u32) -> Option<u32> {
        let k = len as usize;
        if len > CACHE_CLASSES || self.len[k] == 0 {
            return None;
        }
        self.len[k] -= 1;
        let page = self.pages[k][self.len[k]];
        self.held -= len as u64;
        Some(page)
    }

    /// Pages of every entry.
    fn all_pages(&self) -> impl Iterator<Item = u32> + '_ {
        (1..=CACHE_CLASSES as usize).flat_map(|k| self.pages[k][..self.len[k]].iter().copied())
    }
}

impl LocalCache {
    pub(crate) fn new() -> Self {
        LocalCache {
            stacks: UnsafeCell::new(Stacks {
                len: [0; CACHE_CLASSES as usize + 1],
                pages: [[0; CACHE_DEPTH]; CACHE_CLASSES as usize + 1],
                held: 0,
                taken: 0,
            }),
            large: UnsafeCell::new(LargeIndex::default()),
            gen: AtomicU64::new(crate::owner::fork_generation()),
        }
    }

    /// # Safety
    /// The caller holds this process's slot lock (with its token) for as
    /// long as the returned reference lives, and makes no other call to
    /// `stacks` or `clear` meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn stacks(&self) -> &mut Stacks {
        // SAFETY: the slot lock is taken by compare-and-swap from 0 and our
        // threads all use one token, so at most one thread of this process
        // holds it; with the caller's promise, this is the only reference.
        unsafe { &mut *self.stacks.get() }
    }

    /// Our index of large runs (see `large_cache.rs`), emptied first if a
    /// taker took the slot's blocks back since it was filled, as for
    /// [`LocalCache::fresh_stacks`].
    ///
    /// # Safety
    /// As for `stacks` (and no other reference from `large` lives).
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn fresh_large(&self, sc: &SlotCache) -> &mut LargeIndex {
        // SAFETY: the caller's contract is ours.
        let ix = unsafe { self.large() };
        ix.refresh(sc.taken.load(Ordering::Relaxed));
        ix
    }

    /// # Safety
    /// As for `fresh_large`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn large(&self) -> &mut LargeIndex {
        // SAFETY: as in `stacks`: the slot lock makes us the only user, and
        // the caller holds no other reference to this cell.
        unsafe { &mut *self.large.get() }
    }

    /// Our stacks, emptied first if a taker took the slot's blocks back
    /// since they were filled (`sc` is our slot): so no entry ever names a
    /// block that is not ours and cached, nor one on a list.
    ///
    /// # Safety
    /// As for `stacks`.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    unsafe fn fresh_stacks(&self, sc: &SlotCache) -> &mut Stacks {
        // SAFETY: the caller's contract is ours.
        let s = unsafe { self.stacks() };
        let t = sc.taken.load(Ordering::Relaxed);
        if s.taken != t {
            s.forget();
            s.taken = t;
        }
        s
    }

    /// In a forked child: forgets everything inherited from the parent
    /// without reading it. Another thread of the parent may have been in
    /// the middle of an index operation when it forked (its slot lock is
    /// the parent's, not ours), so the inherited lists may be half linked:
    /// walking them, as `clear` does, could follow a stale link or never
    /// end. The stacks are just lengths; the large index is replaced whole
    /// (its arrays are allocated again, lazily, on first use).
    ///
    /// # Safety
    /// As for `stacks`.
    unsafe fn forget_inherited(&self) {
        // SAFETY: the caller's contract is ours.
        let s = unsafe { self.stacks() };
        s.forget();
        // SAFETY: the caller's contract; `s` is not used after this.
        *unsafe { self.large() } = LargeIndex::default();
    }

    /// Forgets every entry.
    ///
    /// # Safety
    /// As for `stacks`.
    unsafe fn clear(&self) {
        // SAFETY: the caller's contract is ours.
        let s = unsafe { self.stacks() };
        s.forget();
        // SAFETY: the caller's contract; `s` is not used after this.
        unsafe { self.large() }.clear();
    }
}

impl Pool {
    /// Under the pool lock: makes this process's stacks its own, once per
    /// fork generation (in a forked child they still name the parent's
    /// blocks). Called at registration with the new slot and token.
    pub(crate) fn adopt_stacks(&self, l: &mut Locked, slot: u16, tok: u64, gen: u64) {
        let Some(how) = self.lock_slot(l, slot, tok) else {
            return; // stale entries would only fail their CAS
        };
        if how == Taken::FromTheDead {
            self.recount(l, &[slot]);
        }
        if self.cache.gen.load(Ordering::Relaxed) != gen {
            // SAFETY: we hold our slot lock.
            unsafe { self.cache.forget_inherited() };
            self.cache.gen.store(gen, Ordering::Relaxed);
        }
        self.unlock_slot(slot, tok);
    }

    /// Takes slot `q`'s lock and then its inbox lock as a taker (the caller
    /// holds the pool lock, `l`), taking each over from a holder that is
    /// gone; `None` (holding neither) if a live holder keeps one past our
    /// patience (see the module doc). A lock taken from a dead holder
    /// (a freer in the inbox, the owner on its chain, stacks or large runs,
    /// a taker) may guard a half-written list or counter: every block the
    /// slot caches is then taken back (O(pages), once per such death), which
    /// leaves the records exact and empty, reported as `Clean`. So callers
    /// see `FromTheDead` no more; their recount stays as a second line.
    pub(crate) fn lock_slot(&self, l: &mut Locked, q: u16, tok: u64) -> Option<Taken> {
        let sc = self.slot_cache(q);
        let how = self.take_word(l, &sc.lock, q, tok)?;
        let Some(inbox) = self.take_word(l, &sc.inbox.lock, q, tok) else {
            sc.unlock(tok);
            return None;
        };
        // No owner operation is under way now: the slot's block count joins
        // the arena's (L5 of `large_cache.rs`; recounted from the words if a
        // holder died mid-operation or a recovery made it unknown).
        if how == Taken::FromTheDead {
            self.recount_owner(l, q);
        } else {
            self.fold_extra(l, q);
        }
        // A list (inbox or chain) whose writer died may be half linked:
        // take every block back rather than walk it.
        if inbox == Taken::FromTheDead || how == Taken::FromTheDead {
            self.empty_slot(l, q);
            return Some(Taken::Clean);
        }
        Some(how)
    }

    /// Under the pool lock, on our locked path: if a freer died holding our
    /// inbox's lock (our drains and other freers then skip the inbox), take
    /// it over, which takes our cached blocks back (see `lock_slot`). One
    /// load when the lock is free.
    pub(crate) fn repair_own_inbox(&self, l: &mut Locked, slot: u16, tok: u64) {
        let h = self.slot_cache(slot).inbox.lock.load(Ordering::Relaxed);
        if slot != 0
            && h & REMOTE != 0
            && self.holder_gone(l, slot, h)
            && self.lock_slot(l, slot, tok).is_some()
        {
            self.unlock_slot(slot, tok);
        }
    }

    /// Under the pool lock (for `stats`): frees the blocks waiting in every
    /// inbox, so that they coalesce with their free neighbours. O(blocks)
    /// per inbox: its list names them. A slot whose lock a live process
    /// holds past our patience is left as it is (its blocks stay counted
    /// as free).
    pub(crate) fn take_back_inboxes(&self, l: &mut Locked, tok: u64) {
        let busy: Vec<u16> = self
            .caching_slots()
            .filter(|&q| self.slot_cache(q).inbox.blocks() != 0)
            .collect();
        for q in busy {
            // Both locks, so that a slot left holding nothing is unmarked
            // (its owner marks it under the slot lock).
            let Some(how) = self.lock_slot(l, q, tok) else {
                continue;
            };
            let sc = self.slot_cache(q);
            let ib = &sc.inbox;
            for p in ib.walk(self.links()) {
                if alloc_owner(l.arena.w(p)) == q {
                    let _ = l.arena.free_cached(p);
                }
            }
            ib.clear();
            if how == Taken::FromTheDead {
                self.recount(l, &[q]);
            }
            if sc.blocks() == 0 {
                self.unmark_caching(q);
            }
            self.unlock_slot(q, tok);
        }
    }

    /// Releases both locks of slot `q` taken by [`Pool::lock_slot`].
    pub(crate) fn unlock_slot(&self, q: u16, tok: u64) {
        let sc = self.slot_cache(q);
        unlock_word(&sc.inbox.lock, tok);
        sc.unlock(tok);
    }

    /// Frees every block slot `q` caches (stacks and inbox; both its locks
    /// held with the pool lock) and zeroes its records.
    #[cold]
    fn empty_slot(&self, l: &mut Locked, q: u16) {
        for (page, _, owner) in l.arena.cached_blocks() {
            if owner == q {
                let _ = l.arena.free_cached(page);
            }
        }
        let sc = self.slot_cache(q);
        sc.clear_counts();
        sc.inbox.clear();
        self.unmark_caching(q);
    }

    /// Takes lock word `w` of slot `q` as a taker (pool lock held).
    fn take_word(&self, l: &Locked, w: &AtomicU64, q: u16, tok: u64) -> Option<Taken> {
        let mut tries = 0u32;
        loop {
            if try_lock_word(w, tok) {
                return Some(Taken::Clean);
            }
            let h = w.load(Ordering::Relaxed);
            if h != 0 && h != tok && self.holder_gone(l, q, h) {
                if w.compare_exchange(h, tok, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(Taken::FromTheDead);
                }
                continue;
            }
            tries += 1;
            if tries > TAKER_SPINS + TAKER_YIELDS {
                return None;
            }
            if tries < TAKER_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Whether the holder of token `h` of one of slot `q`'s locks is gone
    /// (pool lock held). A freer's token ([`REMOTE`], inbox locks only)
    /// names the freer's own slot: gone when that slot holds another
    /// process now or the kernel says its process died. Any other token
    /// made for another slot is a taker's, which held the pool lock while
    /// it held this one: we hold the pool lock now, so that taker is dead
    /// (or past the point where it would release it). A token made for `q`
    /// is its owner's (a slot given to a new process starts unlocked),
    /// gone when the kernel says so.
    fn holder_gone(&self, l: &Locked, q: u16, h: u64) -> bool {
        let s = token_slot(h);
        if h & REMOTE != 0 {
            let i = s as usize % MAX_OWNERS;
            return l.owners[i].pid != token_pid(h) || !self.slot_alive(l, s);
        }
        s != q || !self.slot_alive(l, q)
    }

    /// Whether the process registered in slot `q` may still run (pool lock
    /// held): its keeper mutex, else `/proc` in our PID namespace.
    pub(crate) fn slot_alive(&self, l: &Locked, q: u16) -> bool {
        let i = q as usize % MAX_OWNERS;
        liveness::slot_alive(&self.header().keepers[i], &l.owners[i])
    }

    /// Takes a cached block of exactly `pages` pages, without the pool lock.
    /// `urgent` when the free runs have nothing for us: then our inbox is
    /// taken whatever it holds and whatever our chain holds, before the
    /// locked path takes every process's cache back (an O(pages) walk that
    /// empties them all) for blocks that may be waiting for us below the
    /// reserve.
    #[inline]
    pub(crate) fn cache_pop(&self, pages: u32, slot: u16, tok: u64, urgent: bool) -> Option<u32> {
        if !self.caching.load(Ordering::Relaxed) {
            return None;
        }
        let sc = self.slot_cache(slot);
        if !sc.try_lock(tok) {
            return None;
        }
        // SAFETY: we hold our slot lock.
        let s = unsafe { self.cache.fresh_stacks(sc) };
        let d = self.descriptors();
        let mut got = None;
        // A miss first takes blocks off our chain; once the chain is empty,
        // and if our inbox holds its reserve, it splices the inbox in and
        // takes again: at most 2 * CHAIN_STEP blocks moved per alloc. A
        // chain with nothing of this size sends us to the locked path
        // rather than to blocks freed more recently (the module doc),
        // unless none of the blocks we took off it found room in our
        // stacks: such a chain would never empty (its blocks go back on it
        // at every miss until we ask for their sizes), and the inbox behind
        // it would never be taken.
        let mut step = 0;
        let mut stuck = false;
        loop {
            let Some(p) = s.pop(pages) else {
                match step {
                    0 if sc.chain_len.load(Ordering::Relaxed) != 0 => {
                        stuck = self.take_chain(slot, s, pages) == 0;
                        step = 1;
                    }
                    0 | 1
                        if (urgent || stuck || sc.chain_len.load(Ordering::Relaxed) == 0)
                            && self.inbox_ready(&sc.inbox, urgent) =>
                    {
                        self.drain_inbox(slot, tok);
                        self.take_chain(slot, s, pages);
                        step = 2;
                    }
                    _ => break,
                }
                continue;
            };
            // The commit: cached -> live, with the next generation (so a
            // free that read the block's word before it was cached cannot
            // free this allocation; see `desc.rs`). The checks only guard
            // against a corrupt entry: `fresh_stacks` drops stale ones.
            let ok = d.get(p as usize).is_some_and(|w| {
                let cur = w.load(Ordering::Relaxed);
                tag(cur) == TAG_ALLOC
                    && is_cached(cur)
                    && alloc_len(cur) == pages
                    && alloc_owner(cur) == slot
                    && w.compare_exchange(cur, reused(cur), Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
            });
            if ok {
                sc.sub(pages as u64, 1);
                got = Some(p);
                break;
            }
        }
        sc.unlock(tok);
        got
    }

    /// Moves up to [`CHAIN_STEP`] blocks from the head of our chain into our
    /// stacks (our slot lock held, `s` our stacks), stopping once the stack
    /// of `want` pages is full; blocks whose stack is full go back on the
    /// chain. Returns how many went into the stacks. Both records count in
    /// the slot's counters, so only the chain
    /// head and length change in shared memory; a death half-way leaves
    /// our slot lock held by our token, and the taker that takes it over
    /// takes every block of the slot back (`lock_slot`).
    #[inline(never)]
    fn take_chain(&self, slot: u16, s: &mut Stacks, want: u32) -> usize {
        let sc = self.slot_cache(slot);
        let links = self.links();
        let d = self.descriptors();
        let mut aside = [0u32; CHAIN_STEP];
        let mut naside = 0;
        let mut moved = 0;
        let mut head = sc.chain.load(Ordering::Relaxed);
        let mut n = sc.chain_len.load(Ordering::Relaxed);
        for _ in 0..CHAIN_STEP {
            if n == 0 || (head as usize) >= links.len() {
                break;
            }
            let p = head;
            head = links[p as usize].load(Ordering::Relaxed);
            n -= 1;
            sc.chain.store(head, Ordering::Relaxed);
            sc.chain_len.store(n, Ordering::Relaxed);
            hit(CrashPoint::ChainTaking);
            let w = d[p as usize].load(Ordering::Relaxed);
            let len = alloc_len(w);
            if !(tag(w) == TAG_ALLOC && is_cached(w) && alloc_owner(w) == slot) {
                continue; // never: each listed block is ours and cached
            }
            if s.has_room(len, self.cache_cap) {
                s.push(len, p);
                moved += 1;
                if len == want && !s.has_room(len, self.cache_cap) {
                    break;
                }
            } else {
                aside[naside] = p;
                naside += 1;
            }
        }
        // Those that did not fit go back at the head, in their order.
        for &p in aside[..naside].iter().rev() {
            if n != 0 {
                links[p as usize].store(head, Ordering::Relaxed);
            }
            head = p;
            n += 1;
        }
        sc.chain.store(head, Ordering::Relaxed);
        sc.chain_len.store(n, Ordering::Relaxed);
        moved
    }

    /// Whether our inbox holds the reserve of pages the owner waits for
    /// before it takes them (see the module doc), or anything at all when
    /// `urgent`; a snapshot without the inbox lock, so it may be stale by a
    /// few frees either way.
    #[inline]
    fn inbox_ready(&self, ib: &Inbox, urgent: bool) -> bool {
        ib.blocks.load(Ordering::Relaxed) != 0 && (urgent || ib.pages() >= self.inbox_reserve)
    }

    /// Splices our inbox's whole list onto our chain (our slot lock held by
    /// the caller): O(1) whatever the inbox holds. The inbox lock is only
    /// tried for a few spins: a freer holds it for nanoseconds, and a dead
    /// one's is taken over by the next taker (see `lock_slot`).
    ///
    /// The blocks move from the inbox's counters to the slot's: a death in
    /// between leaves both locks held by our token, and a taker then takes
    /// every block of the slot back, which no count depends on.
    #[inline(never)]
    fn drain_inbox(&self, slot: u16, tok: u64) {
        let sc = self.slot_cache(slot);
        let ib = &sc.inbox;
        if sc.pages() > self.remote_cap || !spin_lock_word(&ib.lock, tok) {
            return;
        }
        let b = ib.blocks.load(Ordering::Relaxed);
        if b != 0 {
            let links = self.links();
            let (head, tail) = (
                ib.head.load(Ordering::Relaxed),
                ib.tail.load(Ordering::Relaxed),
            );
            let n = sc.chain_len.load(Ordering::Relaxed);
            if n != 0 {
                if let Some(l) = links.get(tail as usize) {
                    l.store(sc.chain.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
            sc.raise_max(ib.max_len() as u32);
            sc.chain.store(head, Ordering::Relaxed);
            sc.chain_len.store(n + b, Ordering::Relaxed);
            sc.add(ib.pages(), b as u64);
            hit(CrashPoint::InboxDrainMoving);
            ib.clear();
        }
        unlock_word(&ib.lock, tok);
    }

    /// Frees a live block of *another* owner slot, at `page`, whose word
    /// the caller read as `w`, into that slot's inbox (without the pool
    /// lock); returns its length, or `None` to use the locked path (inbox
    /// busy or over the cache's bound, block too long, no slot of our
    /// own). `tok` is ours.
    #[inline]
    pub(crate) fn inbox_push(&self, page: u32, w: u64, tok: u64) -> Option<u32> {
        let q = alloc_owner(w);
        let len = alloc_len(w);
        if q == 0 || tok == 0 || len > CACHE_CLASSES || !self.caching.load(Ordering::Relaxed) {
            return None;
        }
        let d = self.descriptors().get(page as usize)?;
        let ib = &self.slot_cache(q).inbox;
        if ib.pages() + len as u64 > self.remote_cap {
            return None;
        }
        let rtok = tok | REMOTE;
        if !spin_lock_word(&ib.lock, rtok) {
            return None;
        }
        hit(CrashPoint::InboxPushLocked);
        // Marked and bounded before the commit, as for a cache push.
        self.mark_caching(q);
        if ib.max_len() < len as u64 {
            ib.max_len.store(len, Ordering::Relaxed);
        }
        // The commit: live -> cached (in q's inbox), from exactly the
        // word the free read (a racing free of the same block, or its
        // re-allocation, makes it fail: see `Pool::free`).
        let done = d
            .compare_exchange(w, w | CACHED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if done {
            hit(CrashPoint::InboxPushCommitted);
            ib.push(self.links(), page, len);
        }
        unlock_word(&ib.lock, rtok);
        done.then_some(len)
    }

    /// Puts our own live block at `page`, whose word the caller read as
    /// `w`, into the cache if it belongs there; returns its length, or
    /// `None` to use the locked path.
    #[inline]
    pub(crate) fn cache_push(&self, page: u32, w: u64) -> Option<u32> {
        if !self.caching.load(Ordering::Relaxed) {
            return None;
        }
        let (slot, tok) = self.my_identity()?;
        let d = self.descriptors().get(page as usize)?;
        let len = alloc_len(w);
        if tok == 0 || tag(w) != TAG_ALLOC || is_cached(w) || alloc_owner(w) != slot {
            return None;
        }
        if len > CACHE_CLASSES {
            let (n, over) = self.large_push(page, w, slot, tok)?;
            if over {
                self.large_trim(slot, tok);
            }
            return Some(n);
        }
        let sc = self.slot_cache(slot);
        if !sc.try_lock(tok) {
            return None;
        }
        // SAFETY: we hold our slot lock.
        let s = unsafe { self.cache.fresh_stacks(sc) };
        let mut done = None;
        hit(CrashPoint::CachePushLocked);
        if s.has_room(len, self.cache_cap) {
            // Marked and bounded before the commit, so that a death right
            // after it still leaves the slot where `stats` and the dead-cache
            // check look, with a bound no lower than the truth.
            self.mark_caching(slot);
            sc.raise_max(len);
            // The commit: live -> cached, from exactly the word the free
            // read. Fails if the block was freed by someone else meanwhile
            // (and maybe allocated again: a new generation): the locked
            // path then says `NotABlock`, as it requires the same word.
            if d.compare_exchange(w, w | CACHED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.push(len, page);
                sc.add(len as u64, 1);
                done = Some(len);
            }
        }
        sc.unlock(tok);
        done
    }

    /// Gives this process's cached blocks back to the pool, so that they
    /// coalesce with their free neighbours. [`Pool::stats`] does it first;
    /// call it before a process idles for long.
    pub fn flush_cache(&self) -> Result<()> {
        let Some((slot, tok)) = self.my_identity() else {
            return Ok(());
        };
        let sc = self.slot_cache(slot);
        if tok == 0 || sc.blocks() == 0 && sc.inbox.blocks() == 0 {
            return Ok(()); // nothing cached: skip the pool lock
        }
        self.locked(|l| {
            let sc = self.slot_cache(slot);
            let Some(how) = self.lock_slot(l, slot, tok) else {
                return Ok(()); // another thread of ours is mid-operation
            };
            // SAFETY: we hold our slot lock.
            let s = unsafe { self.cache.fresh_stacks(sc) };
            // SAFETY: as above (a distinct cell from the stacks').
            let large: Vec<u32> = unsafe { self.cache.fresh_large(sc) }.pages().collect();
            let links = self.links();
            // Our stacks, large runs and chain (all counted in our slot),
            // then what others freed for us (we hold the inbox lock too).
            // Every entry is a block of ours, cached; checked all the same
            // (never free another process's cached block: its owner counts
            // it).
            for p in s.all_pages().chain(sc.chain(links)).chain(large) {
                if alloc_owner(l.arena.w(p)) != slot {
                    continue;
                }
                if let Ok(len) = l.arena.free_cached(p) {
                    sc.sub(len as u64, 1);
                }
            }
            // SAFETY: we hold our slot lock.
            unsafe { self.cache.clear() };
            sc.chain_len.store(0, Ordering::Relaxed);
            let ib = &sc.inbox;
            for p in ib.walk(links) {
                if alloc_owner(l.arena.w(p)) == slot {
                    let _ = l.arena.free_cached(p);
                }
            }
            ib.clear();
            if how == Taken::FromTheDead {
                self.recount(l, &[slot]);
            }
            if sc.blocks() == 0 {
                self.unmark_caching(slot);
            }
            self.unlock_slot(slot, tok);
            Ok(())
        })
    }

    /// Under the pool lock: frees every cached block of every caching slot
    /// passing `want` whose lock can be had, and zeroes their counters
    /// (exact: we hold the slot locks and took all their cached blocks).
    /// One pass over the descriptors, so O(pages); runs when memory is
    /// exhausted, when a cache's owner died, and from `stats` when a cache
    /// may hold a block longer than the longest free run. Returns how many
    /// wanted slots were left alone because a live holder kept their lock.
    pub(crate) fn take_back_cached(
        &self,
        l: &mut Locked,
        tok: u64,
        want: impl Fn(u16, &SlotCache) -> bool,
    ) -> usize {
        let mut held = Vec::new();
        let mut skipped = 0;
        for s in self.caching_slots() {
            if !want(s, self.slot_cache(s)) {
                continue;
            }
            match self.lock_slot(l, s, tok) {
                Some(_) => held.push(s),
                None => skipped += 1,
            }
        }
        if held.is_empty() {
            return skipped;
        }
        for (page, _, owner) in l.arena.cached_blocks() {
            if held.contains(&owner) {
                let _ = l.arena.free_cached(page);
            }
        }
        hit(CrashPoint::TakeBackFreed);
        for &s in &held {
            let sc = self.slot_cache(s);
            sc.clear_counts();
            sc.inbox.clear();
            self.unmark_caching(s);
            self.unlock_slot(s, tok);
        }
        skipped
    }

    /// Under the pool lock, on every acquisition: takes back the caches of
    /// processes the kernel marked dead (one load of the caching bitmap,
    /// and one of a keeper mutex per caching slot), and frees the slot of
    /// such a process if it then holds nothing, for reuse.
    #[inline]
    pub(crate) fn reap_dead_caches(&self, l: &mut Locked) {
        let mine = self.my_identity().map_or(u16::MAX, |(s, _)| s);
        let dead = |s: u16, _: &SlotCache| {
            s != mine
                && self.header().keepers[s as usize % MAX_OWNERS].state() == KeeperState::OwnerDied
        };
        if !self.caching_slots().any(|s| dead(s, self.slot_cache(s))) {
            return;
        }
        self.reap(l, dead);
    }

    /// Takes back the caches of the slots passing `dead` (whose processes
    /// are gone) and frees those slots that then hold nothing.
    #[cold]
    fn reap(&self, l: &mut Locked, dead: impl Fn(u16, &SlotCache) -> bool) {
        let slots: Vec<u16> = self
            .caching_slots()
            .filter(|&s| dead(s, self.slot_cache(s)))
            .collect();
        let tok = self.taker_token();
        self.take_back_cached(l, tok, |s, sc| slots.contains(&s) && dead(s, sc));
        for s in slots {
            let i = s as usize % MAX_OWNERS;
            if i != 0 && l.arena.st.usage[i].pages == 0 && !self.slot_alive(l, s) {
                l.owners[i] = OwnerIdentity::default();
            }
        }
    }

    /// Under the pool lock, for `stats`: what the per-acquisition check
    /// cannot see, slots holding cached blocks without a keeper whose
    /// process `/proc` (in our PID namespace) says is gone.
    pub(crate) fn reap_keeperless_dead(&self, l: &mut Locked) {
        let mine = self.my_identity().map_or(u16::MAX, |(s, _)| s);
        let suspects: Vec<u16> = self
            .caching_slots()
            .filter(|&s| {
                s != mine
                    && self.header().keepers[s as usize % MAX_OWNERS].state() == KeeperState::Unheld
            })
            .collect();
        if suspects.is_empty() {
            return;
        }
        let gone: Vec<u16> = suspects
            .into_iter()
            .filter(|&s| !owner::is_alive(&l.owners[s as usize % MAX_OWNERS]))
            .collect();
        if !gone.is_empty() {
            self.reap(l, |s, _| gone.contains(&s));
        }
    }

    /// Sets the counters and bound of `slots` (both of whose locks the
    /// caller holds, the inbox's record exact) from the CACHED words: what
    /// the slot caches is every CACHED block of its owner not in its inbox.
    /// The repair after a holder of the slot lock died mid-update.
    fn recount(&self, l: &Locked, slots: &[u16]) {
        let counts = Self::count_cached(l);
        for &s in slots {
            let c = counts[s as usize % MAX_OWNERS];
            let sc = self.slot_cache(s);
            sc.set(
                c.0.saturating_sub(sc.inbox.pages()),
                c.1.saturating_sub(sc.inbox.blocks()),
            );
            sc.max_len.store(c.2, Ordering::Relaxed);
        }
    }

    /// `(pages, blocks, longest)` cached by each slot, from the descriptors.
    fn count_cached(l: &Locked) -> Vec<(u64, u64, u64)> {
        let mut counts = vec![(0u64, 0u64, 0u64); MAX_OWNERS];
        for (_, len, owner) in l.arena.cached_blocks() {
            let c = &mut counts[owner as usize % MAX_OWNERS];
            c.0 += len as u64;
            c.1 += 1;
            c.2 = c.2.max(len as u64);
        }
        counts
    }

    /// Under the pool lock: repairs every slot whose lock a dead process
    /// left held (it died mid-operation), and with `verify` reports slots
    /// whose counters disagree with their CACHED words. A slot whose live
    /// owner is in the middle of a cache operation (its lock held past our
    /// patience: preempted, or stopped) cannot be verified now and is left
    /// out: that is no violation.
    pub(crate) fn check_slots(&self, l: &mut Locked, tok: u64, verify: bool) -> Vec<String> {
        let mut v = Vec::new();
        // Lock the slots first, count their CACHED words after (fix found by
        // the random-kill test): a live owner flips its words and updates
        // its counters under its slot lock, without the pool lock, so counts
        // taken before holding its slot lock may be stale. Compared, that
        // was a false report; stored (`!verify`), it corrupted the counters
        // of a live process.
        let mut held = Vec::new();
        for s in 0..self.owners_hwm() {
            let sc = self.slot_cache(s);
            if !verify
                && sc.lock.load(Ordering::Relaxed) == 0
                && sc.inbox.lock.load(Ordering::Relaxed) == 0
            {
                continue;
            }
            if let Some(how) = self.lock_slot(l, s, tok) {
                held.push((s, how));
            }
        }
        if verify {
            // The descriptors and the arena's counts, with the slots we
            // hold strict (their `extra` folded, no operation under way)
            // and the others loose (L2, L5 of `large_cache.rs`).
            let mut extra = [0i64; MAX_OWNERS];
            let mut loose = [true; MAX_OWNERS];
            for (q, e) in extra.iter_mut().enumerate() {
                *e = self.slot_cache(q as u16).extra();
            }
            for &(q, _) in &held {
                loose[q as usize % MAX_OWNERS] = false;
            }
            // Never used: nobody to be mid-operation there.
            loose[self.owners_hwm() as usize..].fill(false);
            v.extend(l.arena.check_with(&extra, &loose));
        }
        if held.is_empty() {
            return v;
        }
        let counts = Self::count_cached(l);
        for (s, how) in held {
            let sc = self.slot_cache(s);
            let want = counts[s as usize];
            let ib = &sc.inbox;
            let have = (sc.pages() + ib.pages(), sc.blocks() + ib.blocks());
            if verify {
                v.extend(self.check_inbox(l, s));
            }
            if how == Taken::FromTheDead || !verify {
                self.recount(l, &[s]);
            } else if have != (want.0, want.1) {
                v.push(format!(
                    "owner slot {s} caches {:?} (pages, blocks) but counts {have:?}",
                    (want.0, want.1)
                ));
            } else if sc.max_len().max(ib.max_len()) < want.2 {
                v.push(format!(
                    "owner slot {s} caches a block of {} pages but bounds them by {}",
                    want.2,
                    sc.max_len().max(ib.max_len())
                ));
            }
            self.unlock_slot(s, tok);
        }
        v
    }

    /// What is wrong with slot `s`'s inbox and chain (both its locks
    /// held): every entry must be a distinct block CACHED for `s` (on one
    /// list only), and the inbox's counters the sum of its list.
    fn check_inbox(&self, l: &Locked, s: u16) -> Vec<String> {
        let sc = self.slot_cache(s);
        let ib = &sc.inbox;
        let links = self.links();
        let n = ib.blocks() as usize;
        let nc = sc.chain_len.load(Ordering::Relaxed) as usize;
        if n + nc > l.arena.st.npages as usize {
            return vec![format!("owner slot {s}'s lists have {n} + {nc} entries")];
        }
        let mut v = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(n + nc);
        let mut walked = 0;
        for p in sc.chain(links) {
            let w = l.arena.w(p);
            let fresh = seen.insert(p);
            if !(fresh && tag(w) == TAG_ALLOC && is_cached(w) && alloc_owner(w) == s) {
                v.push(format!(
                    "owner slot {s}'s chain lists page {p}, not its cached block"
                ));
            }
            walked += 1;
        }
        if walked != nc {
            v.push(format!(
                "owner slot {s}'s chain ends after {walked} of {nc} blocks"
            ));
        }
        let mut pages = 0u64;
        let mut walked = 0;
        for p in ib.walk(links) {
            let w = l.arena.w(p);
            walked += 1;
            let fresh = seen.insert(p);
            if !(fresh && tag(w) == TAG_ALLOC && is_cached(w) && alloc_owner(w) == s) {
                v.push(format!(
                    "owner slot {s}'s inbox lists page {p}, not its cached block"
                ));
            }
            pages += alloc_len(w) as u64;
            if ib.max_len() < alloc_len(w) as u64 {
                v.push(format!(
                    "owner slot {s}'s inbox bound is below page {p}'s length"
                ));
            }
        }
        if (pages, walked as u64) != (ib.pages(), ib.blocks()) {
            v.push(format!(
                "owner slot {s}'s inbox lists {:?} (pages, blocks) but counts {:?}",
                (pages, walked),
                (ib.pages(), ib.blocks())
            ));
        }
        v
    }

    /// Takes both locks of each of `slots` as a taker (pool lock held),
    /// taking them over from holders that are gone; returns the slots
    /// whose locks we now hold (a live holder past our patience keeps its
    /// slot out). Release each with [`Pool::forget_locked_slot`].
    pub(crate) fn lock_slots(&self, l: &mut Locked, slots: &[usize], tok: u64) -> Vec<usize> {
        slots
            .iter()
            .copied()
            .filter(|&i| self.lock_slot(l, i as u16, tok).is_some())
            .collect()
    }

    /// Zeroes the records of a dead owner's slot whose blocks were just
    /// freed (both its locks held, from [`Pool::lock_slots`]: no freer is
    /// between its commit and its inbox entry), and releases the locks.
    pub(crate) fn forget_locked_slot(&self, slot: u16, tok: u64) {
        let sc = self.slot_cache(slot);
        sc.clear_counts();
        sc.inbox.clear();
        self.unmark_caching(slot);
        self.unlock_slot(slot, tok);
    }

    /// Makes a slot given to a new process (pool lock held, its previous
    /// process gone or none) start empty and unlocked.
    pub(crate) fn reset_slot(&self, slot: u16) {
        let sc = self.slot_cache(slot);
        sc.clear_counts();
        sc.inbox.clear();
        self.unmark_caching(slot);
        sc.inbox.lock.store(0, Ordering::Release);
        sc.lock.store(0, Ordering::Release);
    }

    /// Makes sure no slot is left locked by a dead process (which died
    /// between a cache flip and its counter update, leaving the counters one
    /// block off): a slot lock normally stays taken for tens of
    /// nanoseconds, so one still taken after a short wait is checked, and
    /// repaired, under the pool lock. Costs a load per caching slot when
    /// nothing is locked.
    pub(crate) fn settle_slots(&self) {
        for s in self.caching_slots() {
            let sc = self.slot_cache(s);
            let busy = || {
                sc.lock.load(Ordering::Relaxed) != 0 || sc.inbox.lock.load(Ordering::Relaxed) != 0
            };
            let mut spins = 0;
            while busy() && spins < 2000 {
                std::hint::spin_loop();
                spins += 1;
            }
            if busy() {
                let tok = self.taker_token();
                let _ = self.locked(|l| {
                    self.check_slots(l, tok, false);
                    Ok(())
                });
                return; // check_slots repaired every abandoned slot
            }
        }
    }

    /// Notes that `slot` may hold cached blocks (its owner, slot lock held).
    /// Writes the shared bitmap only the first time.
    #[inline]
    pub(crate) fn mark_caching(&self, slot: u16) {
        let (w, bit) = self.caching_bit(slot);
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Notes that `slot` holds no cached block (slot lock held, counters 0).
    fn unmark_caching(&self, slot: u16) {
        let (w, bit) = self.caching_bit(slot);
        w.fetch_and(!bit, Ordering::Relaxed);
    }

    /// Whether `slot` may hold cached blocks (its caching bit).
    pub(crate) fn may_cache(&self, slot: u16) -> bool {
        let (w, bit) = self.caching_bit(slot);
        w.load(Ordering::Relaxed) & bit != 0
    }

    fn caching_bit(&self, slot: u16) -> (&AtomicU64, u64) {
        let s = slot as usize % MAX_OWNERS;
        (&self.header().cache_slots[s / 64], 1u64 << (s % 64))
    }

    /// The slots that may hold cached blocks: every slot with a cached
    /// block, or whose owner died in the middle of caching one.
    pub(crate) fn caching_slots(&self) -> impl Iterator<Item = u16> + '_ {
        self.header()
            .cache_slots
            .iter()
            .enumerate()
            .flat_map(|(i, w)| {
                let mut bits = w.load(Ordering::Relaxed);
                std::iter::from_fn(move || {
                    (bits != 0).then(|| {
                        let b = bits.trailing_zeros();
                        bits &= bits - 1;
                        (i * 64) as u16 + b as u16
                    })
                })
            })
    }

    /// Pages and blocks in all processes' caches and inboxes.
    pub(crate) fn cached_totals(&self) -> (u64, u64) {
        self.caching_slots().fold((0, 0), |(p, b), s| {
            let (cp, cb) = self.slot_cache(s).held();
            (p.saturating_add(cp), b.saturating_add(cb))
        })
    }
}
