//! The per-process cache of large runs: blocks of more than
//! [`CACHE_CLASSES`] pages allocated and freed without the pool lock.
//!
//! # Why
//!
//! The per-class stacks of `cache.rs` serve a process that reuses a few
//! sizes. Large blocks of random sizes (buffers of a few hundred KiB to a
//! few MiB) almost never find a cached block of their exact length, so
//! every such alloc and free took the pool lock, and two processes doing it
//! ran slower together than one alone (the lock's and the treap's cache
//! lines bounce between cores).
//!
//! How the best allocators handle large allocations:
//! - tcmalloc sends large objects (more than its largest size class)
//!   straight to its page heap, a central structure under a lock, and
//!   caches only small objects per thread or per CPU, refilled in batches
//!   from central lists;
//! - jemalloc spreads threads over several *arenas* (by default a few per
//!   CPU), each with its own lock and its own extents, which it splits for
//!   an allocation and coalesces on free; its per-thread cache holds only
//!   sizes up to `tcache_max` (32 KiB by default);
//! - mimalloc gives each thread its own heap of pages and segments, so a
//!   thread allocates from memory it owns without any lock, and only
//!   remote frees and huge blocks go elsewhere.
//!
//! The common idea is that memory a thread (here: a process) *owns* can be
//! carved and coalesced without a global lock, and a global structure is
//! visited only to refill or give back in bulk. Here that owned memory is
//! a set of *cached runs*: `ALLOC|CACHED` words of the process's owner
//! slot, exactly as the small cache's blocks (so recovery, `reclaim_dead`,
//! the dead-cache reaping and take-backs already see them), which the owner
//! splits and merges under its slot lock, each change committed by one
//! compare-and-swap on a head word. The pool lock is taken once per
//! refill (a run of several allocations' worth) and once per give-back.
//!
//! # The operations (owner, slot lock held, no pool lock)
//!
//! - **exact fit**: a cached run of exactly `n` pages flips to live, as a
//!   small cache pop (`CAS (CACHED, n) -> (live, n)`, the commit);
//! - **split**: for a cached run `[p, p+L)` and `n < L`, first write the
//!   tail's word `(CACHED, L-n)` at `p+n`, inside the run (no-one reads an
//!   interior word as a head: see the invariants), then
//!   `CAS p: (CACHED, L) -> (live, n)` (the commit). Before the commit the
//!   tail word is a ghost inside the cached run (L2); after it, a cached
//!   run of its own;
//! - **merge** (on free, with the runs that end where the freed block
//!   starts and start where it ends): the freed block first flips to
//!   CACHED as for a small cache push (its commit). Then for two adjacent
//!   cached runs `A = [a, b)` and `B = [b, c)`:
//!   `CAS a: (CACHED, b-a) -> (CACHED|GHOSTS, c-a)` (the commit), then
//!   `CAS b: B's word -> SKIP(c-b)`: a *ghost* inside `A` (L2, L3).
//! - **deferred merging**: the runs the last frees cached (up to
//!   `PENDING`) wait unmerged: an alloc of exactly the length of a cached
//!   run takes it by the exact fit (one compare-and-swap, as a small
//!   cache pop: a program freeing and reallocating buffers of one size
//!   pays no merge and no split), and an alloc that finds no run of its
//!   exact length first merges the waiting runs, as their frees would
//!   have done, then takes the best fit (dlmalloc's fast bins and their
//!   consolidation are the same idea). An unmerged cached run is a state
//!   the words may always be in (merging is an optimisation), so this
//!   changes nothing in shared memory;
//! - **refill** (no fitting run): under the pool lock and then the slot
//!   lock, one allocation from the free runs of `n` pages *plus a spare*
//!   run written as a cached run right after it (`Arena::alloc_spare`),
//!   a whole number of blocks of `n` pages long (none if not even one
//!   fits): the next allocations of that length are then carved from it,
//!   next to each other. A spare the process does not use is, when a
//!   take-back frees it, a hole between two blocks that may live long,
//!   and it must hold blocks of its kind exactly: a spare shorter than
//!   the block served none of them (`make demo`, 8 blocks of 4097 pages
//!   in a pool of 34,304, failed its last allocation with 5,600 pages
//!   free in such holes: tests/large_cache.rs,
//!   `long_lived_large_blocks_fill_the_pool`), and a spare of 128 pages
//!   with blocks of 70 left 58 free pages after each (worker processes
//!   holding one block each: `one_long_lived_block_per_process_fills_the_pool`,
//!   83 blocks of the 117 the pool holds without caching);
//! - **give back**: when the process caches more than its bound (a 16th of
//!   the pool, as the small cache), under the pool lock and the slot lock
//!   its smallest runs go back to the free runs until it holds 3/4 of it.
//!
//! A process keeps its runs in a process-local index ([`LargeIndex`]:
//! size-class lists and per-page arrays, O(1)). The index is only a hint:
//! it is dropped whole when a taker took the slot's blocks back (the
//! slot's `taken` count changed, as for the small cache's stacks), and
//! every entry is checked against the descriptor (owner, CACHED, length)
//! under the slot lock before use.
//!
//! Why this and not the alternatives: a per-process *arena* of pages set
//! aside for each process (jemalloc's arenas, mimalloc's segments) would
//! partition the pool, and a pool must stay usable whole by any process
//! (an alloc of nearly all of it must succeed once the others have freed
//! their blocks), with one process's share found and given back after it
//! is killed. Cached runs need nothing of their own in shared memory:
//! they are `ALLOC` words like any block, so they survive a crash, are
//! taken back by the take-backs and the dead-cache reaping that exist
//! already, and everything else (the index, `extra`, the counters) is
//! derived from the descriptors and rebuilt when in doubt. tcmalloc's
//! choice (large blocks always through the central heap) is what this
//! replaces: the central heap is our pool lock.
//!
//! # Beside the inbox and the chain (frees by other processes)
//!
//! A block of another owner freed by a process goes to that owner's inbox
//! only if it is at most [`CACHE_CLASSES`] pages long (`cache.rs`); a
//! longer one is freed through the pool lock, clearing its ghosts first if
//! it carries `GHOSTS` (L3). Handing long blocks to the owner's inbox
//! would make the owner merge them into its runs when it drains, on the
//! allocation path that must stay O(1), and add a second way a run
//! appears in its records; one locked free per block of more than 64
//! pages (whose user writes at least 256 KiB) costs little in comparison,
//! and the hand-off of small blocks, the common case, is untouched. So:
//! - inbox and chain blocks are small blocks freed live, never pieces of a
//!   run: they have no `GHOSTS` flag and no ghost inside, and the index
//!   never names one (only runs this module created are inserted, and the
//!   index is dropped after every take-back). Both kinds are CACHED words
//!   of the owner, so every take-back (`take_back_cached`, `empty_slot`,
//!   the reaping, `reclaim_dead`) frees them all from the descriptors,
//!   and `flush_cache` from the stacks, the chain, the index and the
//!   inbox;
//! - the link words that chain inbox blocks lie beside the descriptors,
//!   not in them: a `SKIP` ghost never touches one, and a run's pages
//!   never are on a list;
//! - every cached page is counted once in `stats`: in the slot's `pages`
//!   (stacks, chain and runs) or in its inbox's `pages` (waiting blocks).
//!
//! # Invariants (who writes which words)
//!
//! - L1: the CACHED words of slot `q` are changed only by holders of `q`'s
//!   slot lock: the owner (no pool lock), or a taker holding the pool lock
//!   first (take-back, reaping, `reclaim_dead`, `check`, `flush_cache`).
//!   Remote freers only create CACHED words from live ones (inbox, small
//!   blocks only); `free`, `size`, `disown` reject CACHED words.
//! - L2 (ghosts): inside a block (live or cached) of owner `q` a word is
//!   `INTERIOR` or a *ghost* of `q`, a word that once was a head: a `SKIP`
//!   word (`desc.rs`: length and owner) for a merged run's absorbed head;
//!   and, only while `q` holds its slot lock mid-operation or after it
//!   died, a CACHED word of `q` (a split's tail before its commit, an
//!   absorbed head before it becomes a `SKIP`). A ghost never starts a
//!   block: every walk goes head to head by lengths, and `free`/`size`/
//!   `disown` of its address see a `SKIP` or a CACHED word and answer
//!   `NotABlock`, changing nothing. An absorbed head turns into a `SKIP`
//!   because a CACHED word would pass for a cached block to a stale entry
//!   of the owner's stacks or index naming its page (its block was taken
//!   back, the page later became a split's tail, then was merged): the
//!   first version left the word as it was and handed out a block inside
//!   a cached run (tests/torture_signals.rs; tests/large_cache.rs has the
//!   deterministic case). A split may cut a live block out of a run
//!   holding ghosts: they stay inside it.
//! - L3 (why ghosts stay): nothing clears a word without the pool lock.
//!   Walks under the pool lock (recovery, `check`, the take-backs,
//!   `reclaim_dead`, `debug_info`) run while owners split and merge; a walk
//!   that read `a`'s length before a merge lands on `b` after it, and must
//!   find a length there, not `INTERIOR` (the first version cleared `b` at
//!   once: such a walk stopped, or recovery filed the rest of the run as
//!   free; tests/large_cache.rs). Each word a walk lands on was true at
//!   some instant since it read the previous one (a head, or a `SKIP`
//!   giving the length its run had when it was merged), and an owner's page
//!   set cannot change while the walk holds the pool lock, so every walk
//!   tiles the pool exactly: pages per owner and free runs are exact, block
//!   counts of owners busy meanwhile may mix two instants. Walks step over
//!   a `SKIP` they land on. Ghosts go when their block is freed under the
//!   pool lock, before its commit (`Arena::clear_ghosts`, O(length)), or
//!   is disowned; so free runs never hold one (D1 of `desc.rs`). A block
//!   that may hold ghosts carries the `GHOSTS` flag in its word (set with
//!   the merge's commit, and before a split writes its tail; kept by the
//!   pieces), so that only such blocks pay for the clearing: a block from
//!   the free runs is freed in O(1) as before, and a block with ghosts came
//!   from a large cache, so is at most about the cache's bound long.
//! - L4: recovery (`rebuild`) takes every `ALLOC` head as before, and inside
//!   a block of owner `q` leaves `INTERIOR`, ghosts, and heads of `q` when
//!   the block's head has changed since it read it (the owner split the
//!   run and took the pieces meanwhile: a live word inside a block whose
//!   head stayed the same is damage), and clears anything else by
//!   compare-and-swap from the value it read.
//! - L5 (counts): splits and merges change the number of `ALLOC` words
//!   without the pool lock, never an owner's pages. So `usage[q].pages` is
//!   exact and decides whether a slot holds anything; for blocks each slot
//!   keeps `extra` ([`SlotCache`], written under its slot lock): `ALLOC`
//!   words of the slot minus `usage[q].blocks` (so `usage[q].blocks` is a
//!   count only with `extra` added, and may go below zero: a block split
//!   from a run and freed or disowned before a fold; wrapping arithmetic
//!   throughout). A taker that holds the pool
//!   lock and the slot lock folds it into the arena's counts
//!   (`fold_extra`); readers add it (`stats`, `owners`, `check`). A
//!   recovery counts words while owners may be splitting and merging
//!   (L3), so afterwards every slot that may hold runs is marked
//!   (`SlotCache::recount`) and recounted under its slot lock: at once if
//!   the lock is free, else by the next taker of the lock, and `stats`
//!   takes every marked slot's lock first. So the counts agree with the
//!   words whenever no owner is frozen in the middle of an operation.
//! - L6: `sc.pages`/`sc.blocks` count the slot's cached runs as for the
//!   small cache (a split: `-n` pages, same blocks; a merge: same pages,
//!   one block less); `max_len` is raised before a merge commits.
//!
//! # Crash safety
//!
//! A process killed at any instruction of an owner operation leaves its
//! slot lock holding its token: the next taker (any process holding the
//! pool lock that needs the slot: the per-acquisition reaping of dead
//! caches, a take-back, `reclaim_dead`) takes it over, recounts (L5, L6)
//! and frees the cached runs (clearing their ghosts, L3). Each step is a single
//! commit, so the words say exactly which pages are live, cached or free:
//! before a split's commit the whole run is cached, after it the head is
//! live and the tail cached; before a merge's commit both runs are cached,
//! after it one is. Refill and give-back run under the pool lock and are
//! arena operations with their own commits; a death there is repaired by
//! the rebuild as any locked operation. The staged-death tests stop a
//! process at each step (crash points `LargeSplitTailWritten`,
//! `LargeSplitCommitted`, `LargeMergeCommitted` without the pool lock;
//! `AllocSpareCached` (refill), `LargeScrubbing` (ghosts being cleared),
//! `LargeGiveBack` and `TakeBackFreed` with it) and kill it there:
//! tests/large_cache.rs and tests/ocaml/test_crash_points.ml. With
//! deferred merging a merge also happens under the pool lock (a give-back
//! merges the pending runs first), so `LargeMergeCommitted` is reached
//! with it too, and the death is then repaired by the rebuild
//! (`killed_merging_pending_runs_in_a_free_and_in_a_give_back`).

use crate::arena::{Arena, MAX_OWNERS};
use crate::cache::CACHE_CLASSES;
use crate::crashpoint::{hit, CrashPoint};
use crate::desc::*;
use crate::layout::SlotCache;
use crate::pool::{Locked, Pool};
use std::sync::atomic::Ordering;

/// Runs of up to this many pages have an exact-length list in the index;
/// longer ones are filed by power of two.
const EXACT: u32 = 1024;
/// Classes: `1..=EXACT` exact, then one per power of two above.
const CLASSES: usize = EXACT as usize + 1 + 32;

/// The class of a run of `len` pages.
#[inline]
fn class_of(len: u32) -> usize {
    if len <= EXACT {
        len as usize
    } else {
        // EXACT is a power of two: 2^10 < len <= ... -> classes above it.
        EXACT as usize + (31 - len.leading_zeros() - EXACT.trailing_zeros()) as usize + 1
    }
}

/// A list link as stored: 0 for none, so that the arrays start as zeroed
/// memory the kernel maps only when touched.
#[inline]
fn enc(p: u32) -> u32 {
    if p == NIL {
        0
    } else {
        p + 1
    }
}

#[inline]
fn dec(v: u32) -> u32 {
    if v == 0 {
        NIL
    } else {
        v - 1
    }
}

/// The process-local index of this process's cached large runs (O(1) for
/// every operation, like the arena's exact-size lists). Only touched with
/// this process's slot lock held (see `LocalCache`).
///
/// Per-page arrays (allocated zeroed on first use: the kernel maps only
/// the pages of them that runs touch) give each run's length at its
/// first page and its first page at its last page (neighbours for
/// merging), and the links of the doubly linked list of its class; a
/// bitmap of non-empty classes gives the best-fitting class with a few
/// `trailing_zeros`. Lengths up to [`EXACT`] are exact classes (best fit);
/// a longer request takes the first run of its power-of-two class if it
/// fits, else any run of a higher class (good fit, O(1)).
#[derive(Default)]
pub(crate) struct LargeIndex {
    /// `len_at[p]`: length of the entry starting at `p` (0: none).
    len_at: Vec<u32>,
    /// `start_at_end[e]`: `1 +` first page of the entry whose last page is `e`.
    start_at_end: Vec<u32>,
    next: Vec<u32>,
    prev: Vec<u32>,
    head: Vec<u32>,
    bitmap: Vec<u64>,
    /// Pages of all entries (some may be stale).
    held: u64,
    entries: usize,
    /// The arrays could not be allocated (see `ensure`).
    failed: bool,
    /// The slot's `taken` count the entries were inserted under (see
    /// `LocalCache::fresh_large`).
    taken: u32,
    /// The runs the last frees cached, `(page, len)` oldest first, not
    /// filed in the lists and arrays yet, so that allocs of exactly their
    /// lengths take them whole (see "deferred merging" in the module doc).
    /// Disjoint from the filed entries; counted in [`LargeIndex::held`].
    pending: [(u32, u32); PENDING],
    npending: usize,
    pending_pages: u64,
}

/// Most frees whose merging waits (a batch of frees followed by a batch of
/// allocs of the same sizes, the common pattern, reuses up to this many
/// blocks without merging and splitting them).
const PENDING: usize = 32;

/// `n` zeroed words, or `None` if the allocator refuses. Zeroed by the
/// allocator (`calloc`: fresh pages from the kernel stay untouched until a
/// run uses them), as `vec![0; n]` does, but without aborting on failure.
fn zeroed(n: usize) -> Option<Vec<u32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u32>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u32>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` was allocated by the global allocator with the layout of
    // `[u32; n]` (so capacity `n` matches on deallocation), and all `n`
    // elements are initialised (zero is a valid u32).
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

impl LargeIndex {
    /// Sizes the arrays for a pool of `npages` pages (once); `false` if the
    /// memory for them cannot be had (then, for good, this process serves
    /// its large blocks through the pool lock instead: no abort).
    #[inline]
    pub(crate) fn ensure(&mut self, npages: u32) -> bool {
        if self.len_at.len() == npages as usize {
            return true;
        }
        if self.failed {
            return false;
        }
        let n = npages as usize;
        let arrays = (|| Some((zeroed(n)?, zeroed(n)?, zeroed(n)?, zeroed(n)?)))();
        let Some((len_at, start_at_end, next, prev)) = arrays else {
            self.failed = true;
            return false;
        };
        *self = LargeIndex {
            len_at,
            start_at_end,
            next,
            prev,
            head: vec![NIL; CLASSES],
            bitmap: vec![0; CLASSES.div_ceil(64)],
            held: 0,
            entries: 0,
            failed: false,
            taken: self.taken,
            pending: [(0, 0); PENDING],
            npending: 0,
            pending_pages: 0,
        };
        true
    }

    /// Forgets every entry if a taker took the slot's blocks back since
    /// they were inserted (`taken` is the slot's count now): no entry then
    /// names a run that is not ours and cached any more.
    #[inline]
    pub(crate) fn refresh(&mut self, taken: u32) {
        if self.taken != taken {
            self.clear();
            self.taken = taken;
        }
    }

    pub(crate) fn insert(&mut self, page: u32, len: u32) {
        let (p, l) = (page as usize, len as usize);
        if len == 0 || p + l > self.len_at.len() {
            return;
        }
        self.remove(page);
        // A stale entry ending at the same page loses its end mark.
        if let Some(other) = self.ending_at(page + len) {
            self.remove(other.0);
        }
        self.len_at[p] = len;
        self.start_at_end[p + l - 1] = page + 1;
        let c = class_of(len);
        let h = self.head[c];
        self.next[p] = enc(h);
        self.prev[p] = enc(NIL);
        if h != NIL {
            self.prev[h as usize] = enc(page);
        }
        self.head[c] = page;
        self.bitmap[c / 64] |= 1 << (c % 64);
        self.held += len as u64;
        self.entries += 1;
    }

    pub(crate) fn remove(&mut self, page: u32) -> Option<u32> {
        let p = page as usize;
        let len = *self.len_at.get(p)?;
        if len == 0 {
            return None;
        }
        self.len_at[p] = 0;
        let e = p + len as usize - 1;
        if self.start_at_end[e] == page + 1 {
            self.start_at_end[e] = 0;
        }
        let c = class_of(len);
        let (n, pr) = (dec(self.next[p]), dec(self.prev[p]));
        if pr == NIL {
            self.head[c] = n;
            if n == NIL {
                self.bitmap[c / 64] &= !(1 << (c % 64));
            }
        } else {
            self.next[pr as usize] = enc(n);
        }
        if n != NIL {
            self.prev[n as usize] = enc(pr);
        }
        self.held -= len as u64;
        self.entries -= 1;
        Some(len)
    }

    /// The first non-empty class `>= c`.
    #[inline]
    fn class_from(&self, c: usize) -> Option<usize> {
        let mut i = c / 64;
        let mut bits = *self.bitmap.get(i)? & (!0u64 << (c % 64));
        loop {
            if bits != 0 {
                return Some(i * 64 + bits.trailing_zeros() as usize);
            }
            i += 1;
            bits = *self.bitmap.get(i)?;
        }
    }

    /// An entry of at least `n` pages (best fit up to [`EXACT`]), as
    /// `(page, len)`.
    #[inline]
    pub(crate) fn best_fit(&self, n: u32) -> Option<(u32, u32)> {
        let c = class_of(n);
        if n > EXACT {
            let h = *self.head.get(c)?;
            if h != NIL && self.len_at[h as usize] >= n {
                return Some((h, self.len_at[h as usize]));
            }
            let k = self.class_from(c + 1)?;
            let h = self.head[k];
            return Some((h, self.len_at[h as usize]));
        }
        let k = self.class_from(c)?;
        let h = self.head[k];
        Some((h, self.len_at[h as usize]))
    }

    /// The smallest entry, as `(page, len)` (first of the lowest class).
    pub(crate) fn smallest(&self) -> Option<(u32, u32)> {
        let k = self.class_from(0)?;
        let h = self.head[k];
        Some((h, self.len_at[h as usize]))
    }

    /// The entry that ends exactly at `page`, as `(page, len)`.
    #[inline]
    pub(crate) fn ending_at(&self, page: u32) -> Option<(u32, u32)> {
        let e = (page as usize).checked_sub(1)?;
        let s = *self.start_at_end.get(e)?;
        if s == 0 {
            return None;
        }
        let len = self.len_at[s as usize - 1];
        (len != 0 && s as usize - 1 + len as usize == page as usize).then_some((s - 1, len))
    }

    /// The length of the entry that starts at `page`.
    #[inline]
    pub(crate) fn starting_at(&self, page: u32) -> Option<u32> {
        self.len_at.get(page as usize).copied().filter(|&l| l != 0)
    }

    /// Pages of all entries, filed and pending (some may be stale).
    pub(crate) fn held(&self) -> u64 {
        self.held + self.pending_pages
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Forgets every entry: O(entries).
    pub(crate) fn clear(&mut self) {
        for p in self.pages().collect::<Vec<_>>() {
            self.remove(p);
        }
        self.held = 0;
        self.entries = 0;
        self.npending = 0;
        self.pending_pages = 0;
    }

    /// Whether a filed entry of exactly `n` pages may be there (its exact
    /// class is not empty).
    #[inline]
    fn has_exact(&self, n: u32) -> bool {
        n <= EXACT && self.head.get(n as usize).is_some_and(|&h| h != NIL)
    }

    /// Adds a run to the pending ones (the caller made room).
    #[inline]
    fn add_pending(&mut self, page: u32, len: u32) {
        self.pending[self.npending] = (page, len);
        self.npending += 1;
        self.pending_pages += len as u64;
    }

    /// Takes the newest pending run of exactly `n` pages, as its page.
    #[inline]
    fn take_pending(&mut self, n: u32) -> Option<u32> {
        let i = self.pending[..self.npending]
            .iter()
            .rposition(|&(_, l)| l == n)?;
        let (p, _) = self.pending[i];
        self.pending.copy_within(i + 1..self.npending, i);
        self.npending -= 1;
        self.pending_pages -= n as u64;
        Some(p)
    }

    /// The first pages of all entries, filed and pending.
    pub(crate) fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        let mut c = 0usize;
        let mut cur = NIL;
        let pending = self.pending[..self.npending].iter().map(|&(p, _)| p);
        pending.chain(std::iter::from_fn(move || loop {
            if cur != NIL {
                let p = cur;
                cur = dec(self.next[p as usize]);
                return Some(p);
            }
            c = self.class_from(c)?;
            cur = self.head[c];
            c += 1;
        }))
    }
}

/// The word of a cached run of `len` pages of `slot` that may hold ghosts,
/// with generation bits taken from `gen_of`.
#[inline]
fn cached_word(len: u32, slot: u16, gen_of: u64) -> u64 {
    alloc_word(len, slot) | (gen_of & GEN_MASK) | CACHED | GHOSTS
}

/// The same `ALLOC` word with another length.
#[inline]
fn with_len(w: u64, len: u32) -> u64 {
    (w & !(NIL as u64)) | len as u64
}

impl SlotCache {
    /// `extra` as a signed number (see the module doc, L5).
    pub fn extra(&self) -> i64 {
        self.extra.load(Ordering::Relaxed) as i64
    }

    /// Adds `d` to `extra` (slot lock held: a plain load and store).
    #[inline]
    fn add_extra(&self, d: i64) {
        self.extra
            .store(self.extra().wrapping_add(d) as u64, Ordering::Relaxed);
    }
}

impl Arena<'_> {
    /// `(pages, blocks)` of the `ALLOC` heads of each owner slot. O(pages).
    pub(crate) fn count_owners(&self) -> Vec<(u64, u64)> {
        let mut c = vec![(0u64, 0u64); MAX_OWNERS];
        for (_, len, o) in self.live_blocks().into_iter().chain(self.cached_blocks()) {
            let x = &mut c[o as usize % MAX_OWNERS];
            x.0 += len as u64;
            x.1 += 1;
        }
        c
    }
}

impl Pool {
    /// Most pages this process keeps in large cached runs: a 16th of the
    /// pool, as the small cache (0 for pools too small to hold a large
    /// block in it).
    #[inline]
    pub(crate) fn large_cap(&self) -> u64 {
        if self.cache_cap <= CACHE_CLASSES as u64 {
            0
        } else {
            self.cache_cap
        }
    }

    /// Folds slot `q`'s `extra` into the arena's counts (pool lock and `q`'s
    /// slot lock held: no owner operation is under way, L5), or recounts
    /// the slot when its count is unknown (a recovery ran).
    pub(crate) fn fold_extra(&self, l: &mut Locked, q: u16) {
        let sc = self.slot_cache(q);
        if l.arena.rebuilt || sc.recount.load(Ordering::Relaxed) != 0 {
            return self.recount_owner(l, q);
        }
        let e = sc.extra();
        if e != 0 {
            let u = &mut l.arena.st.usage[q as usize % MAX_OWNERS];
            u.blocks = (u.blocks as i64).wrapping_add(e) as u64;
            l.arena.st.live_blocks = (l.arena.st.live_blocks as i64).wrapping_add(e) as u64;
            sc.extra.store(0, Ordering::Relaxed);
        }
    }

    /// Sets `usage[q]` from `q`'s words, `extra` to 0 and clears the
    /// recount mark (pool lock and `q`'s slot lock held). O(pages).
    pub(crate) fn recount_owner(&self, l: &mut Locked, q: u16) {
        let c = l.arena.count_owners();
        self.set_counted(l, q, c[q as usize % MAX_OWNERS]);
    }

    /// `usage[q]` from a count of its words (pool lock and `q`'s slot lock
    /// held, the count taken under them).
    pub(crate) fn set_counted(&self, l: &mut Locked, q: u16, (pages, blocks): (u64, u64)) {
        let u = &mut l.arena.st.usage[q as usize % MAX_OWNERS];
        let old = u.blocks;
        u.pages = pages;
        u.blocks = blocks;
        l.arena.st.live_blocks = l
            .arena
            .st
            .live_blocks
            .wrapping_sub(old)
            .wrapping_add(blocks);
        let sc = self.slot_cache(q);
        sc.extra.store(0, Ordering::Relaxed);
        sc.recount.store(0, Ordering::Relaxed);
    }

    /// After a recovery (pool lock held, at the end of the locked
    /// operation). The rebuild took each owner's block count from its
    /// words, but an owner splitting and merging while it walked may have
    /// been counted partly before and partly after an operation, and its
    /// `extra` no longer applies either way. So every slot that may hold
    /// large runs or has an `extra` is marked for a recount (L5); those
    /// whose slot lock is free now are locked and recounted at once, with
    /// one walk; the others (a live owner mid-operation, or a dead holder,
    /// left to the takers) are recounted by the next holder of the pool
    /// lock that takes their slot lock (`fold_extra`; `stats` does it).
    pub(crate) fn after_rebuild(&self, l: &mut Locked) {
        l.arena.rebuilt = false;
        let tok = self.taker_token();
        let mut held = Vec::new();
        for q in 0..self.owners_hwm() {
            let sc = self.slot_cache(q);
            if sc.extra() == 0 && !self.may_cache(q) {
                continue;
            }
            sc.recount.store(1, Ordering::Relaxed);
            if sc.try_lock(tok) {
                held.push(q);
            }
        }
        if held.is_empty() {
            return;
        }
        let c = l.arena.count_owners();
        for q in held {
            self.set_counted(l, q, c[q as usize % MAX_OWNERS]);
            self.slot_cache(q).unlock(tok);
        }
    }

    /// Recounts every slot marked for it whose locks we can take (pool
    /// lock held; for `stats`, so that its block count is exact unless an
    /// owner is frozen in the middle of an operation).
    pub(crate) fn settle_recounts(&self, l: &mut Locked, tok: u64) {
        for q in 0..self.owners_hwm() {
            if self.slot_cache(q).recount.load(Ordering::Relaxed) != 0
                && self.lock_slot(l, q, tok).is_some()
            {
                self.unlock_slot(q, tok);
            }
        }
    }

    /// Sum of every slot's `extra` (for `stats`).
    pub(crate) fn extra_total(&self) -> i64 {
        (0..self.owners_hwm()).fold(0i64, |a, q| a.wrapping_add(self.slot_cache(q).extra()))
    }

    /// Takes a cached run for a block of `n > CACHE_CLASSES` pages, without
    /// the pool lock: exact fit or split (see the module doc). `None` on a
    /// miss (or when the slot lock is busy).
    #[inline]
    pub(crate) fn large_pop(&self, n: u32, slot: u16, tok: u64) -> Option<u32> {
        if !self.caching.load(Ordering::Relaxed) || self.large_cap() == 0 {
            return None;
        }
        let sc = self.slot_cache(slot);
        if !sc.try_lock(tok) {
            return None;
        }
        // SAFETY: we hold our slot lock.
        let ix = unsafe { self.cache.fresh_large(sc) };
        if !ix.ensure(self.geometry().npages) {
            sc.unlock(tok);
            return None;
        }
        let d = self.descriptors();
        // Deferred merging: a pending run of exactly `n` pages is the first
        // candidate, taken as it is by the exact fit below; with none,
        // neither pending nor filed, the pending runs are merged first, as
        // their frees would have done, so that the best fit sees them
        // coalesced.
        let mut pending = ix.take_pending(n).map(|p| (p, n));
        if pending.is_none() && ix.npending != 0 && !ix.has_exact(n) {
            self.merge_pending(ix, slot);
        }
        let mut got = None;
        while let Some((p, len)) = pending.take().or_else(|| ix.best_fit(n)) {
            ix.remove(p); // (nothing for the pending run: it is not filed)
            let Some(mut w) = self.my_cached_word(p, len, slot) else {
                continue; // stale
            };
            if len != n && w & GHOSTS == 0 {
                // The run is marked as holding ghosts before the split
                // writes one (its tail's word, a ghost until the commit),
                // so that whoever frees it clears them (L3).
                if d[p as usize]
                    .compare_exchange(w, w | GHOSTS, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    break; // cannot happen (L1)
                }
                w |= GHOSTS;
            }
            let live = with_len(reused(w), n);
            if len == n {
                // Exact fit: the commit.
                if d[p as usize]
                    .compare_exchange(w, live, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    sc.sub(n as u64, 1);
                    got = Some(p);
                }
                break;
            }
            // Split: the tail's word first, inside the run (a ghost until the
            // commit: L2), then the head's commit.
            let t = p + n;
            let tw = cached_word(len - n, slot, live);
            d[t as usize].store(tw, Ordering::Relaxed);
            hit(CrashPoint::LargeSplitTailWritten);
            if d[p as usize]
                .compare_exchange(w, live, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                hit(CrashPoint::LargeSplitCommitted);
                sc.add_extra(1);
                sc.sub(n as u64, 0);
                ix.insert(t, len - n);
                got = Some(p);
            } else {
                // Cannot happen (L1); undo the tail word all the same.
                let _ = d[t as usize].compare_exchange(
                    tw,
                    INTERIOR,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
            break;
        }
        sc.unlock(tok);
        got
    }

    /// The word at `p` if it is a cached run of `len` pages of `slot`.
    #[inline]
    fn my_cached_word(&self, p: u32, len: u32, slot: u16) -> Option<u64> {
        let w = self.descriptors().get(p as usize)?.load(Ordering::Acquire);
        (tag(w) == TAG_ALLOC && is_cached(w) && alloc_owner(w) == slot && alloc_len(w) == len)
            .then_some(w)
    }

    /// Caches our own live block at `page` of more than `CACHE_CLASSES`
    /// pages, whose word the caller read as `w`, merging it with the
    /// adjacent runs we cache. `Some((len, over))`, `over` when we now hold
    /// more than our bound (the caller gives some back, see `large_trim`);
    /// `None` for the locked path.
    #[inline]
    pub(crate) fn large_push(&self, page: u32, w: u64, slot: u16, tok: u64) -> Option<(u32, bool)> {
        let cap = self.large_cap();
        let len = alloc_len(w);
        if cap == 0 || len as u64 > cap / 2 {
            return None;
        }
        let sc = self.slot_cache(slot);
        if !sc.try_lock(tok) {
            return None;
        }
        // SAFETY: we hold our slot lock.
        let ix = unsafe { self.cache.fresh_large(sc) };
        if !ix.ensure(self.geometry().npages) {
            sc.unlock(tok);
            return None;
        }
        let d = self.descriptors();
        hit(CrashPoint::CachePushLocked);
        // Marked and bounded before the commit (see `cache_push`).
        self.mark_caching(slot);
        sc.raise_max(len);
        let mut done = None;
        let cw = w | CACHED;
        if d[page as usize]
            .compare_exchange(w, cw, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            sc.add(len as u64, 1);
            // Deferred merging: this run waits unmerged for an alloc of
            // its length, or for the next alloc that needs more.
            if ix.npending == PENDING {
                self.merge_pending(ix, slot);
            }
            ix.add_pending(page, len);
            done = Some((len, ix.held() > cap));
        }
        sc.unlock(tok);
        done
    }

    /// Merges every run whose merging waits (slot lock held), oldest first.
    fn merge_pending(&self, ix: &mut LargeIndex, slot: u16) {
        ix.pending_pages = 0;
        for i in 0..std::mem::take(&mut ix.npending) {
            let (p, len) = ix.pending[i];
            self.file_merged(ix, p, len, slot);
        }
    }

    /// Files our cached run at `page` (`len` pages, not filed in `ix`),
    /// merged with the filed runs of ours that end where it starts and
    /// start where it ends (slot lock held). A stale run (no longer ours
    /// and cached) is dropped.
    fn file_merged(&self, ix: &mut LargeIndex, page: u32, len: u32, slot: u16) {
        let Some(w) = self.my_cached_word(page, len, slot) else {
            return; // stale
        };
        let (mut a, mut aw, mut alen) = (page, w, len);
        // The run ending where this one starts.
        if let Some((lp, ll)) = ix.ending_at(a) {
            ix.remove(lp);
            if let Some(lw) = self.my_cached_word(lp, ll, slot) {
                if let Some(nw) = self.merge(lp, lw, a, aw, alen) {
                    (a, aw, alen) = (lp, nw, ll + alen);
                }
            }
        }
        // The run starting where this one ends.
        let e = a as u64 + alen as u64;
        if e < self.descriptors().len() as u64 {
            if let Some(rl) = ix.starting_at(e as u32) {
                ix.remove(e as u32);
                if let Some(rw) = self.my_cached_word(e as u32, rl, slot) {
                    if self.merge(a, aw, e as u32, rw, rl).is_some() {
                        alen += rl;
                    }
                }
            }
        }
        ix.insert(a, alen);
    }

    /// Merges the cached run at `b` (word `bw`, `blen` pages) into the
    /// cached run at `a` (word `aw`) that ends at `b` (slot lock held, both
    /// words checked); returns `a`'s new word.
    #[inline]
    fn merge(&self, a: u32, aw: u64, b: u32, bw: u64, blen: u32) -> Option<u64> {
        let d = self.descriptors();
        let slot = alloc_owner(aw);
        let sc = self.slot_cache(slot);
        let total = alloc_len(aw) + blen;
        sc.raise_max(total);
        let nw = with_len(aw, total) | GHOSTS;
        // The commit: `b`'s word is now a ghost inside `a`'s run (L2). It
        // is never cleared without the pool lock: a walker that read `a`'s
        // old length lands on it, and must find a length there (L3).
        d[a as usize]
            .compare_exchange(aw, nw, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        hit(CrashPoint::LargeMergeCommitted);
        sc.add_extra(-1);
        sc.sub(0, 1);
        // `b`'s word becomes a SKIP ghost: a walker still steps over it,
        // but it no longer passes for a cached head (a stale entry of our
        // stacks or index naming `b` would otherwise take it for one: a
        // block inside a run, handed out twice).
        let _ = d[b as usize].compare_exchange(
            bw,
            skip_word(blen, slot),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        Some(nw)
    }

    /// Under the pool lock: a block of `n` pages for us, from the free runs,
    /// with a spare run after it for our large cache when there is room
    /// (one lock for several allocations).
    pub(crate) fn large_refill(
        &self,
        l: &mut Locked,
        n: u32,
        slot: u16,
        tok: u64,
    ) -> crate::Result<u32> {
        let cap = self.large_cap();
        if cap == 0
            || !self.caching.load(Ordering::Relaxed)
            || self.lock_slot(l, slot, tok).is_none()
        {
            return l.arena.alloc(n, slot);
        }
        let sc = self.slot_cache(slot);
        // SAFETY: we hold our slot lock.
        let ix = unsafe { self.cache.fresh_large(sc) };
        if !ix.ensure(self.geometry().npages) {
            self.unlock_slot(slot, tok);
            return l.arena.alloc(n, slot);
        }
        if ix.held() > cap * 3 / 4 {
            self.give_back(l, ix, slot, cap / 2);
        }
        let room = cap.saturating_sub(ix.held());
        // Whole blocks of `n` only (see "refill" in the module doc): none
        // for a block the spare could not serve again, and no remainder
        // that no block of `n` fits once a take-back frees the spare.
        let spare = (cap / 4).min(room) as u32 / n * n;
        let spare = if spare > CACHE_CLASSES { spare } else { 0 };
        if spare > 0 {
            // Marked and bounded before the spare's word is written.
            self.mark_caching(slot);
            sc.raise_max(spare);
        }
        let r = l.arena.alloc_spare(n, spare, slot);
        if let Ok((p, got)) = r {
            if got > 0 {
                sc.add(got as u64, 1);
                ix.insert(p + n, got);
            }
        }
        self.unlock_slot(slot, tok);
        r.map(|(p, _)| p)
    }

    /// Under the pool lock: gives our smallest large runs back to the free
    /// runs until we hold at most `3/4` of our bound.
    pub(crate) fn large_trim(&self, slot: u16, tok: u64) {
        let cap = self.large_cap();
        let _ = self.locked(|l| {
            if self.lock_slot(l, slot, tok).is_some() {
                // SAFETY: we hold our slot lock.
                let ix = unsafe { self.cache.fresh_large(self.slot_cache(slot)) };
                self.give_back(l, ix, slot, cap * 3 / 4);
                self.unlock_slot(slot, tok);
            }
            Ok(())
        });
    }

    /// Pool lock and our slot lock held: frees our smallest runs until the
    /// index holds at most `keep` pages.
    /// (`ix` is our index, lent by the caller, which holds our slot lock:
    /// one reference to it at a time.)
    fn give_back(&self, l: &mut Locked, ix: &mut LargeIndex, slot: u16, keep: u64) {
        let sc = self.slot_cache(slot);
        self.merge_pending(ix, slot);
        while ix.held() > keep {
            let Some((p, len)) = ix.smallest() else { break };
            ix.remove(p);
            if self.my_cached_word(p, len, slot).is_some() && l.arena.free_cached(p).is_ok() {
                hit(CrashPoint::LargeGiveBack);
                sc.sub(len as u64, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_best_fit_and_neighbours() {
        let mut ix = LargeIndex::default();
        assert!(ix.ensure(10_000));
        ix.insert(100, 80);
        ix.insert(300, 200);
        ix.insert(180, 70);
        assert_eq!(ix.best_fit(75), Some((100, 80)));
        assert_eq!(ix.best_fit(81), Some((300, 200)));
        assert_eq!(ix.best_fit(201), None);
        assert_eq!(ix.ending_at(180), Some((100, 80)));
        assert_eq!(ix.ending_at(250), Some((180, 70)));
        assert_eq!(ix.ending_at(299), None);
        assert_eq!(ix.starting_at(300), Some(200));
        assert_eq!(ix.held(), 350);
        // Re-inserting a page replaces its entry.
        ix.insert(300, 100);
        assert_eq!(ix.held(), 250);
        assert_eq!(ix.best_fit(101), None);
        assert_eq!(ix.smallest(), Some((180, 70)));
        assert_eq!(ix.remove(180), Some(70));
        assert_eq!(ix.remove(180), None);
        ix.clear();
        assert!(ix.is_empty() && ix.held() == 0);
        assert_eq!(ix.pages().count(), 0);
        // Long runs: a power-of-two class, good fit.
        ix.insert(2000, 1500);
        ix.insert(5000, 3000);
        ix.insert(9000, 100);
        assert_eq!(ix.best_fit(1400), Some((2000, 1500)));
        assert_eq!(ix.best_fit(1600), Some((5000, 3000)));
        assert_eq!(ix.best_fit(3001), None);
        assert_eq!(ix.smallest(), Some((9000, 100)));
        let mut all: Vec<u32> = ix.pages().collect();
        all.sort();
        assert_eq!(all, vec![2000, 5000, 9000]);
        assert_eq!(ix.ending_at(3500), Some((2000, 1500)));
    }

    #[test]
    fn pending_runs_are_held_listed_and_taken_newest_first() {
        let mut ix = LargeIndex::default();
        assert!(ix.ensure(10_000));
        ix.insert(100, 80);
        ix.add_pending(300, 70);
        ix.add_pending(500, 70);
        ix.add_pending(700, 90);
        assert_eq!(ix.held(), 80 + 70 + 70 + 90);
        // Pending runs are not filed: no best fit, no neighbour finds them.
        assert_eq!(ix.best_fit(85), None);
        assert_eq!(ix.starting_at(300), None);
        assert_eq!(ix.take_pending(70), Some(500));
        assert_eq!(ix.take_pending(75), None);
        let mut all: Vec<u32> = ix.pages().collect();
        all.sort();
        assert_eq!(all, vec![100, 300, 700]);
        assert_eq!(ix.held(), 80 + 70 + 90);
        assert_eq!(ix.take_pending(70), Some(300));
        assert_eq!(ix.take_pending(70), None);
        ix.clear();
        assert_eq!((ix.held(), ix.pages().count()), (0, 0));
        assert_eq!(ix.take_pending(90), None);
    }

    #[test]
    fn words() {
        let w = alloc_word_at(300, 7, 9) | CACHED;
        let v = with_len(w, 120);
        assert_eq!((alloc_len(v), alloc_owner(v), is_cached(v)), (120, 7, true));
        assert_eq!(alloc_gen(v), alloc_gen(w));
        let t = cached_word(5, 7, reused(w));
        assert_eq!(
            (alloc_len(t), alloc_owner(t), is_cached(t), tag(t)),
            (5, 7, true, TAG_ALLOC)
        );
    }
}
