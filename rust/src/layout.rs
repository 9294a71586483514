//! The on-shm layout. Everything in it is an offset or a page number, never
//! a pointer, so a pool works at any address and an unrelated process can
//! attach to it by name.
//!
//! ```text
//! 0               Header (magic, version, geometry, lock, owner table,
//!                 allocator state, slot caches, keeper
//!                 mutexes)                               size_of::<Header>()
//! desc_offset     page descriptors, one u64 per payload page   8 * npages
//! link_offset     inbox links, one u32 per payload page         4 * npages
//! payload_offset  payload pages (page-aligned)            npages * page_size
//! total_len
//! ```
//!
//! The metadata never shares a page with user data, so a user overrunning
//! its block cannot corrupt the allocator. Overhead: about 51 KiB plus 12
//! bytes per page (on x86_64), 0.38 % of a 64 MiB pool and 0.3 % of a
//! 1 GiB one. The link words (4 of the 12 bytes) chain the blocks other
//! processes freed for an owner (see `cache.rs`): derived, like every word
//! but the `ALLOC` ones, and never read for a page not on such a chain.

use crate::desc::{MAX_PAGES, NIL};
use crate::lock::LockGuard;
use std::cell::UnsafeCell;
use std::mem::{align_of, offset_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// "SHMPOOL" and a format byte; stored last when a pool is formatted, so
/// a half-formatted pool is never mistaken for a pool.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMPOOL\x01");
/// Bumped whenever the meaning or position of any shared field changes
/// (the assertions at the end of this file fail until it is).
pub const LAYOUT_VERSION: u32 = 7;

/// Runs of up to this many pages have exact-size free lists.
pub const SMALL_MAX: u32 = 127;
/// Owner slots; slot 0 is "no recorded owner" (used when the table is full).
pub const MAX_OWNERS: usize = 256;

// # How shared memory is reached
//
// Other processes read and write the header while we use it, so no Rust
// `&`/`&mut` reference may assert that a shared byte does not change
// under it. Every field of `Header` is therefore one of:
// - an atomic (read without a lock by someone, or written once before the
//   magic is published);
// - a [`LockCell`], which hands out `&mut` only to the holder of the pool
//   lock (see [`Header::exclusive`]);
// - the mutex itself ([`MutexStorage`]), only ever touched by pthread calls.
// So `&Header` is sound whatever other processes do, and `Header` is `Sync`.
// Each field says which lock, if any, protects its writes.

/// The shared header at offset 0 of every pool.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`] once the pool is formatted; 0 before. Written once, last,
    /// with `Release`; read with `Acquire` before any other field.
    pub magic: AtomicU64,
    /// The geometry (this and the next four fields): written once before
    /// the magic, read-only after (no lock). Atomics so that an attacher
    /// racing with the creator reads them without a data race.
    pub layout_version: AtomicU32,
    pub page_size: AtomicU32,
    pub total_len: AtomicU64,
    pub desc_offset: AtomicU64,
    pub payload_offset: AtomicU64,
    /// How many times the lock was found abandoned (or the metadata
    /// inconsistent) and the derived state rebuilt. Pool lock.
    pub recoveries: LockCell<u64>,
    /// One more than the highest owner slot ever used (bounds the loops
    /// over `slot_cache`). Raised under the pool lock (`fetch_max`), read
    /// without it.
    pub owners_hwm: AtomicU32,
    /// Bit `s` set when owner slot `s` may hold cached blocks (see
    /// `cache.rs`), so `stats` reads only those slots' counters. Written
    /// under slot `s`'s lock (by its owner, or by a taker that also holds
    /// the pool lock); read without any lock.
    pub cache_slots: [AtomicU64; 4],
    /// The pool lock (see `lock.rs`). Only pthread calls touch it.
    pub lock: MutexStorage,
    /// Owner slot identities (slot 0 = "unrecorded owner"). Pool lock.
    pub owners: LockCell<[OwnerIdentity; MAX_OWNERS]>,
    /// The allocator's state. Pool lock.
    pub alloc: LockCell<AllocState>,
    /// What each owner's per-process cache holds (see `cache.rs`): each
    /// slot's fields are written under that slot's lock, by its owner
    /// without the pool lock, or by a taker holding both; each slot on its
    /// own cache line so that processes do not share one.
    pub slot_cache: [SlotCache; MAX_OWNERS],
    /// Each owner slot's keeper mutex (see `liveness.rs`): held by a thread
    /// of the slot's process for as long as it has the pool open, so the
    /// kernel marks it when that process dies. Only pthread calls write it;
    /// readers load its futex word. Packed (read-mostly, never written on
    /// a fast path).
    pub keepers: [KeeperMutex; MAX_OWNERS],
}

// `Pool`'s `Sync` rests on this (a new cell type needs its own `Sync` with
// a safety note). It cannot catch a plain integer field, which is `Sync`
// but breaks the rule above: review does.
const _: () = {
    const fn sync<T: Sync>() {}
    sync::<Header>()
};

/// A value in shared memory that only the holder of the pool lock may
/// read or write. It hands out no reference by itself: [`Header::exclusive`]
/// lends `&mut` to all the lock-protected fields at once, for as long as
/// the caller's [`LockGuard`] is borrowed.
#[repr(transparent)]
pub struct LockCell<T>(UnsafeCell<T>);

// SAFETY: the contents are only reached through `Header::exclusive` (the
// type has no constructor and `as_ptr` is crate-private), which
// requires the guard of the header's own pool lock, mutably borrowed for as
// long as the references it returns live: one thread (of one process) at a
// time, and the next holder only after the unlock (which orders the writes,
// like any mutex). `T: Send` because the value is handed between threads.
unsafe impl<T: Send> Sync for LockCell<T> {}

impl<T> LockCell<T> {
    /// Raw pointer to the value: only `Header::exclusive` dereferences it.
    /// (No constructor: a header is formatted in place from zeros.)
    pub(crate) fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// The lock-protected fields of a header, lent to the lock holder.
pub struct Exclusive<'a> {
    pub alloc: &'a mut AllocState,
    pub owners: &'a mut [OwnerIdentity; MAX_OWNERS],
    pub recoveries: &'a mut u64,
}

impl Header {
    /// Lends the lock-protected fields to the holder of this header's lock,
    /// for as long as its guard stays borrowed (so at most once at a time).
    ///
    /// # Panics
    /// If `g` guards another pool's lock (a bug).
    pub fn exclusive<'a>(&'a self, g: &'a mut LockGuard<'_>) -> Exclusive<'a> {
        assert!(g.guards(&self.lock), "lock guard of another pool");
        // SAFETY: `g` proves that this thread holds this header's pool lock,
        // and the `&mut` borrow of `g` for 'a keeps this function from being
        // called again (and the lock from being released) while the
        // references live. Every access to these cells goes through here
        // (`as_ptr` is dereferenced nowhere else), so nothing else reads or
        // writes them meanwhile.
        unsafe {
            Exclusive {
                alloc: &mut *self.alloc.as_ptr(),
                owners: &mut *self.owners.as_ptr(),
                recoveries: &mut *self.recoveries.as_ptr(),
            }
        }
    }
}

/// Space reserved in the header for the pool's pthread mutex; larger than
/// glibc's `pthread_mutex_t` (40 bytes on x86_64) so the layout stays the
/// same if a libc needs more.
#[repr(C, align(64))]
pub struct MutexStorage {
    pub(crate) bytes: UnsafeCell<[u8; 64]>,
}

const _: () = assert!(size_of::<libc::pthread_mutex_t>() <= 64);

// SAFETY: the bytes are only ever passed to pthread mutex functions (and
// read atomically as a hint, see `lock.rs`), which synchronise between
// threads and processes themselves.
unsafe impl Sync for MutexStorage {}

/// A process-shared robust pthread mutex, one per owner slot (methods in
/// `liveness.rs`). Exactly a `pthread_mutex_t` (40 bytes on x86_64), so
/// the 256 of them cost 10 KiB.
#[repr(C)]
pub struct KeeperMutex {
    pub(crate) m: UnsafeCell<std::mem::MaybeUninit<libc::pthread_mutex_t>>,
}

// SAFETY: only ever passed to pthread mutex functions (by the keeper thread
// holding it) and read with atomic loads of its futex word (see
// `liveness.rs`), which synchronise between threads and processes.
unsafe impl Sync for KeeperMutex {}

/// One slot of the shared owner table (the truth about who a slot is).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerIdentity {
    /// 0 = slot unused.
    pub pid: i32,
    /// The PID namespace the pid means something in: the inode number of
    /// the registering process's `/proc/self/ns/pid` (0 if unreadable).
    pub pidns: u32,
    pub start_time: u64,
}

/// Pages and blocks held by one owner slot (derived, rebuilt by recovery).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerUsage {
    pub pages: u64,
    pub blocks: u64,
}

/// The allocator's part of the shared header (under the pool lock).
/// Everything here is derived from the descriptors except `npages`.
#[repr(C)]
#[derive(Debug, Clone)]
pub struct AllocState {
    /// Payload pages. Set at format time, never changed after; checked
    /// against the header's geometry when a pool is attached.
    pub npages: u32,
    /// Root of the treap of long free runs, or `NIL`.
    pub tree_root: u32,
    /// Length of the longest run in the treap (0 when empty).
    pub tree_max: u32,
    /// Advanced by every allocation from the free runs; its low bits go
    /// into the new block's `ALLOC` word (the generation, see `desc.rs`).
    /// Not derived: recovery leaves it alone (any value does).
    pub alloc_epoch: u32,
    pub free_pages: u64,
    pub live_blocks: u64,
    /// Bit n set ⇔ `small_head[n] != NIL` (n in 1..=SMALL_MAX).
    pub small_bitmap: [u64; 2],
    /// Head page of the exact-size list for each length (index 0 unused).
    pub small_head: [u32; SMALL_MAX as usize + 1],
    pub usage: [OwnerUsage; MAX_OWNERS],
}

impl AllocState {
    /// A state for a pool of `npages` pages whose descriptors are still to be
    /// formatted (see `Arena::format`).
    pub fn new(npages: u32) -> Self {
        AllocState {
            npages,
            tree_root: NIL,
            tree_max: 0,
            alloc_epoch: 0,
            free_pages: 0,
            live_blocks: 0,
            small_bitmap: [0; 2],
            small_head: [NIL; SMALL_MAX as usize + 1],
            usage: [OwnerUsage::default(); MAX_OWNERS],
        }
    }
}

/// One owner slot's cache state in the shared header: the owner's own
/// line, then its inbox on a line of its own, so that processes freeing
/// into the inbox do not take the owner's line from it. Methods in
/// `cache.rs`.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SlotCache {
    /// The slot lock: 0 = free, else the holder's token (`cache::token`).
    /// Taken by compare-and-swap (see `cache.rs`).
    pub(crate) lock: AtomicU64,
    /// Pages and blocks the slot's owner holds cached in its own stacks
    /// (not its inbox). Written under the slot lock; read without it (a
    /// snapshot).
    pub(crate) pages: AtomicU64,
    pub(crate) blocks: AtomicU64,
    /// At least the length of the longest block the slot holds cached (the
    /// longest cached since the slot last held none); 0 when it holds none.
    /// Written under the slot lock, raised *before* a block is cached, so
    /// it is never below the truth even if the owner dies.
    pub(crate) max_len: AtomicU64,
    /// The first page of the slot's *chain*: blocks its owner took from its
    /// inbox and has not yet moved into its stacks, linked through the link
    /// words (`NIL`, or 0 in a zeroed header, = none: see `cache.rs`).
    /// Counted in `pages`/`blocks`. Slot lock.
    pub(crate) chain: AtomicU32,
    /// Blocks in the chain (bounds every walk of it). Slot lock.
    pub(crate) chain_len: AtomicU32,
    /// Bumped by every taker that takes the slot's blocks back (slot lock
    /// held): the owner's process-local stacks remember the value they were
    /// filled under and are dropped when it changed, so that they never
    /// name a block that is no longer theirs (see `cache.rs`).
    pub(crate) taken: AtomicU32,
    /// 1 when the arena's `usage.blocks` of this slot is unknown: a
    /// recovery counted the slot's words while its owner may have been
    /// splitting or merging, and could not take its slot lock afterwards
    /// (L5 of `large_cache.rs`). Whoever holds the pool lock and the slot
    /// lock recounts and clears it. Written under the pool lock only.
    pub(crate) recount: AtomicU32,
    /// `ALLOC` words of this slot minus what the arena's `usage.blocks`
    /// counts, as an `i64`: the owner's splits and merges of large cached
    /// runs (`large_cache.rs`, L5) change the number of words without the
    /// pool lock. Written under the slot lock; folded into the arena's
    /// counts by takers holding both locks.
    pub(crate) extra: AtomicU64,
    /// Blocks of this slot's owner freed by other processes (see `cache.rs`).
    pub(crate) inbox: Inbox,
}

/// The blocks other processes freed for one owner slot, waiting for the
/// owner to take them: a list linked through the link words, oldest first
/// (freers append at the tail). Earlier format-7 code pushed at the head:
/// a list both wrote is still one list from head to tail, which is all its
/// readers need (the owner splices it whole, `stats` frees it whole).
/// Every field is written under the inbox lock only.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Inbox {
    /// The inbox lock: 0 = free, else the holder's token (a freer's carries
    /// `cache::REMOTE`).
    pub(crate) lock: AtomicU64,
    /// Pages in the inbox.
    pub(crate) pages: AtomicU64,
    /// Blocks in the inbox (0 = empty: `head` and `tail` are then stale).
    pub(crate) blocks: AtomicU32,
    /// The oldest block's page (the list's head).
    pub(crate) head: AtomicU32,
    /// At least the length of the longest block in the inbox since it was
    /// last empty (raised before a block is committed to it).
    pub(crate) max_len: AtomicU32,
    /// The newest block's page (the list's tail): freers append there, and
    /// the owner splices the whole list onto its chain in O(1).
    pub(crate) tail: AtomicU32,
}

// The byte layout of format LAYOUT_VERSION. Changing any of these numbers
// changes the format: bump LAYOUT_VERSION (here too) so that old and new
// code refuse each other's pools instead of misreading them. Format 7 is
// format 6 (the inbox lists and link words) plus `SlotCache::recount` and
// `extra` in the owner's line's spare bytes, and a change of meaning of
// the descriptors: blocks may hold ghost words (`desc.rs`: the SKIP aux
// word, the GHOSTS flag, an epoch one bit narrower), which format-6 code
// would misread as damage (L2 of `large_cache.rs`).
const _: () = assert!(
    LAYOUT_VERSION == 7
        && size_of::<Header>() == 41728 + MAX_OWNERS * size_of::<KeeperMutex>()
        && align_of::<Header>() == 64
        && offset_of!(Header, magic) == 0
        && offset_of!(Header, layout_version) == 8
        && offset_of!(Header, page_size) == 12
        && offset_of!(Header, total_len) == 16
        && offset_of!(Header, desc_offset) == 24
        && offset_of!(Header, payload_offset) == 32
        && offset_of!(Header, recoveries) == 40
        && offset_of!(Header, owners_hwm) == 48
        && offset_of!(Header, cache_slots) == 56
        && offset_of!(Header, lock) == 128
        && offset_of!(Header, owners) == 192
        && offset_of!(Header, alloc) == 4288
        && offset_of!(Header, slot_cache) == 8960
        && offset_of!(Header, keepers) == 41728
        && size_of::<KeeperMutex>() == size_of::<libc::pthread_mutex_t>()
        && align_of::<KeeperMutex>() <= 8
        && size_of::<MutexStorage>() == 64
        && size_of::<OwnerIdentity>() == 16
        && offset_of!(OwnerIdentity, pid) == 0
        && offset_of!(OwnerIdentity, pidns) == 4
        && offset_of!(OwnerIdentity, start_time) == 8
        && size_of::<OwnerUsage>() == 16
        && offset_of!(OwnerUsage, pages) == 0
        && offset_of!(OwnerUsage, blocks) == 8
        && size_of::<AllocState>() == 4656
        && offset_of!(AllocState, npages) == 0
        && offset_of!(AllocState, tree_root) == 4
        && offset_of!(AllocState, tree_max) == 8
        && offset_of!(AllocState, alloc_epoch) == 12
        && offset_of!(AllocState, free_pages) == 16
        && offset_of!(AllocState, live_blocks) == 24
        && offset_of!(AllocState, small_bitmap) == 32
        && offset_of!(AllocState, small_head) == 48
        && offset_of!(AllocState, usage) == 560
        && size_of::<SlotCache>() == 128
        && offset_of!(SlotCache, lock) == 0
        && offset_of!(SlotCache, pages) == 8
        && offset_of!(SlotCache, blocks) == 16
        && offset_of!(SlotCache, max_len) == 24
        && offset_of!(SlotCache, chain) == 32
        && offset_of!(SlotCache, chain_len) == 36
        && offset_of!(SlotCache, taken) == 40
        && offset_of!(SlotCache, recount) == 44
        && offset_of!(SlotCache, extra) == 48
        && offset_of!(SlotCache, inbox) == 64
        && size_of::<Inbox>() == 64
        && offset_of!(Inbox, lock) == 0
        && offset_of!(Inbox, pages) == 8
        && offset_of!(Inbox, blocks) == 16
        && offset_of!(Inbox, head) == 20
        && offset_of!(Inbox, max_len) == 24
        && offset_of!(Inbox, tail) == 28
);

/// Where each part of a pool of `npages` payload pages lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub page_size: usize,
    pub npages: u32,
    pub desc_offset: usize,
    /// The link words (`4 * npages` bytes, after the descriptors).
    pub link_offset: usize,
    pub payload_offset: usize,
    pub total_len: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Geometry {
    /// The layout for `npages` payload pages, or `None` if out of range.
    pub fn for_pages(npages: u32, page_size: usize) -> Option<Geometry> {
        // (Pages are found from offsets by shifts: `Pool::page_of_offset`.)
        if npages == 0 || npages > MAX_PAGES || !page_size.is_power_of_two() {
            return None;
        }
        let desc_offset = round_up(std::mem::size_of::<Header>(), 64);
        let link_offset = desc_offset + 8 * npages as usize;
        let payload_offset = round_up(link_offset + 4 * npages as usize, page_size);
        let total_len = payload_offset.checked_add((npages as usize).checked_mul(page_size)?)?;
        Some(Geometry {
            page_size,
            npages,
            desc_offset,
            link_offset,
            payload_offset,
            total_len,
        })
    }

    /// The layout whose payload holds at least `bytes` bytes.
    pub fn for_payload(bytes: usize, page_size: usize) -> Option<Geometry> {
        let pages = bytes.div_ceil(page_size);
        Self::for_pages(u32::try_from(pages).ok()?, page_size)
    }

    /// The largest layout that fits in `len` bytes (memory mapped by
    /// someone else), or `None` if not even one payload page fits.
    pub fn fitting(len: usize, page_size: usize) -> Option<Geometry> {
        let fixed = round_up(std::mem::size_of::<Header>(), 64);
        let guess = len.checked_sub(fixed)? / (page_size + 12);
        let mut n = guess.min(MAX_PAGES as usize) as u32;
        while n > 0 && Self::for_pages(n, page_size).is_none_or(|g| g.total_len > len) {
            n -= 1;
        }
        Self::for_pages(n, page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_under_0_38_percent_from_64_mib() {
        for mib in [64usize, 256, 1024, 16384] {
            let g = Geometry::for_payload(mib << 20, 4096).unwrap();
            let overhead = g.payload_offset as f64 / g.total_len as f64;
            assert!(overhead <= 0.0038, "{mib} MiB: {overhead}");
        }
    }

    #[test]
    fn fitting_inverts_for_pages() {
        for n in [1u32, 2, 3, 100, 4095, 4096, 100_000] {
            let g = Geometry::for_pages(n, 4096).unwrap();
            assert_eq!(Geometry::fitting(g.total_len, 4096), Some(g));
            assert_eq!(Geometry::fitting(g.total_len + 4095, 4096), Some(g));
            if n > 1 {
                assert_eq!(
                    Geometry::fitting(g.total_len - 1, 4096).unwrap().npages,
                    n - 1
                );
            }
        }
        assert_eq!(Geometry::fitting(100, 4096), None);
        assert_eq!(Geometry::for_pages(0, 4096), None);
        assert_eq!(Geometry::for_pages(MAX_PAGES + 1, 4096), None);
    }

    #[test]
    fn payload_is_page_aligned() {
        for ps in [4096usize, 16384, 65536] {
            let g = Geometry::for_pages(7, ps).unwrap();
            assert_eq!(g.payload_offset % ps, 0);
            assert!(g.desc_offset + 8 * 7 <= g.link_offset);
            assert!(g.link_offset + 4 * 7 <= g.payload_offset);
        }
    }
}
