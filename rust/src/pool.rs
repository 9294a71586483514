//! The safe Rust API: a pool in shared memory, usable from any process that
//! maps it, at any address.
//!
//! The allocator's shared state is touched only while a `LockGuard` of the
//! pool's `RobustMutex` is held (see `Pool::locked`), which is also
//! where crash recovery happens: a holder that died makes the next locker
//! rebuild the derived state before doing its own operation. The one
//! exception is a process's own cache (`cache.rs`): its allocs and frees of
//! blocks it cached flip one descriptor with a compare-and-swap under a
//! per-process slot lock, and skip the pool lock altogether.

use crate::arena::{Arena, OwnerUsage, PageStats, MAX_OWNERS};
pub use crate::cache::CACHE_CLASSES;
use crate::cache::{self, LocalCache, SlotCache};
use crate::crashpoint::{hit, CrashPoint};
use crate::desc::{alloc_owner, is_cached, tag, TAG_ALLOC};
use crate::error::{Error, Result};
use crate::layout::{Geometry, Header, LAYOUT_VERSION, MAGIC};
use crate::liveness::{self, Keeper};
use crate::lock::{Acquired, LockGuard, RobustMutex};
use crate::mapping::{self, page_size, Mapping};
use crate::owner::{self, OwnerIdentity};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// `(total, free, largest)` and more, all exact at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the whole region, header included.
    pub total_bytes: usize,
    /// Free payload bytes.
    pub free_bytes: usize,
    /// Bytes of the largest free run (the largest block alloc can return).
    pub largest_free_bytes: usize,
    /// Payload capacity in bytes.
    pub payload_bytes: usize,
    pub live_blocks: u64,
    pub page_size: usize,
    /// Times the derived state was rebuilt after a holder died.
    pub recoveries: u64,
}

/// One owner slot and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerInfo {
    pub slot: u16,
    /// 0 for slot 0: blocks of processes that found the table full.
    pub pid: i32,
    pub start_time: u64,
    /// Still running, as far as anyone can tell (see [`Pool::reclaim_dead`]).
    pub alive: bool,
    pub pages: u64,
    pub blocks: u64,
}

/// What [`Pool::reclaim_dead`] freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub blocks: u64,
    pub pages: u64,
    /// The dead processes whose blocks were freed: `(pid, pages)`.
    pub owners: Vec<(i32, u64)>,
}

/// How to create a pool.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// POSIX shm name (`/name`, any bytes but '/' and NUL after the slash:
    /// see [`mapping::check_name`]); `None` for an anonymous (memfd) pool
    /// that only this process and its later children see.
    pub name: Option<OsString>,
    /// Reserve the backing store now (`posix_fallocate`).
    pub prefault: bool,
}

/// A shared-memory page pool.
pub struct Pool {
    map: Mapping,
    hdr: NonNull<Header>,
    geo: Geometry,
    /// `log2(geo.page_size)`: offsets and sizes are turned into pages by
    /// shifts, not divisions (a 64-bit division costs several ns on the
    /// paths of every alloc and free). Page sizes are powers of two.
    page_shift: u32,
    name: Option<OsString>,
    /// This process's owner slot: `fork_generation << 16 | slot`, or
    /// `u64::MAX` before the first alloc (and in a forked child).
    my_slot: AtomicU64,
    /// This process's token (see `cache::token`), set with `my_slot`.
    my_token: AtomicU64,
    pub(crate) cache: LocalCache,
    /// Whether this process uses its cache (see [`Pool::set_caching`]).
    pub(crate) caching: std::sync::atomic::AtomicBool,
    /// Most pages the cache may hold: a 16th of the pool (none for tiny
    /// pools), so one process cannot sit on much of it.
    pub(crate) cache_cap: u64,
    /// Pages at most in a slot's inbox, and in its stacks and chain for a
    /// drain to add to them (see `cache.rs`).
    pub(crate) remote_cap: u64,
    /// Pages a slot's inbox must hold before its owner takes them (see
    /// `cache.rs`, and [`Pool::inbox_reserve_pages`]).
    pub(crate) inbox_reserve: u64,
    /// The thread holding our slot's keeper mutex (see `liveness.rs`), as a
    /// `Box<Keeper>` pointer, null if none. An atomic pointer rather than a
    /// lock, so that a child forked while another thread replaced it cannot
    /// block on it.
    keeper: AtomicPtr<Keeper>,
}

// SAFETY: nothing in a Pool is tied to the thread that made it: `hdr` and
// the mapping are plain shared memory, and a `LockGuard` (which is) never
// outlives the call that took it.
unsafe impl Send for Pool {}
// SAFETY: `&self` methods reach shared memory only through `Header` (atomics,
// `LockCell`s lent by `Header::exclusive` to the pool lock's holder, and the
// mutex via pthread: `Header` is `Sync`), and the descriptors as atomics;
// `geo` and `name` are immutable. The one non-`Sync` field, `cache`'s
// stacks, is only touched by a thread holding this process's slot lock
// (taken by compare-and-swap from 0, so by one thread at a time; see
// `cache.rs`).
unsafe impl Sync for Pool {}

/// The exclusive view handed to code running under the lock.
pub(crate) struct Locked<'a> {
    pub arena: Arena<'a>,
    pub owners: &'a mut [OwnerIdentity; MAX_OWNERS],
    pub recoveries: &'a mut u64,
    pub owners_hwm: &'a std::sync::atomic::AtomicU32,
}

/// Rounds of take-back an alloc tries when a live owner held its cache's
/// lock: it waits 0.1, 0.2, ... 12.8 ms, then 25.6 ms between them (about
/// 130 ms in all, without the pool lock). A preempted owner on a loaded
/// machine may stay off a CPU for several time slices; only an owner
/// frozen longer than that (debugger, `SIGSTOP`) makes the alloc report
/// `OutOfMemory` while its cache holds the space. Nobody else waits: the
/// pool lock is free between rounds.
const TAKE_BACK_ROUNDS: u32 = 12;
/// The longest of those waits, in µs.
const TAKE_BACK_MAX_WAIT_US: u64 = 25_600;

impl Pool {
    /// Creates a pool whose payload holds at least `bytes` bytes.
    pub fn create(bytes: usize, opts: &CreateOptions) -> Result<Pool> {
        let geo = Geometry::for_payload(bytes, page_size()).ok_or(Error::BadSize)?;
        // The header and the descriptors always get their backing store
        // now, the payload only with prefault: when the shm file system
        // fills up, touching a block may SIGBUS, but the pool's own
        // operations (check, recovery) never do.
        let reserve = if opts.prefault {
            geo.total_len
        } else {
            geo.payload_offset
        };
        let map = match &opts.name {
            Some(n) => Mapping::create_named(n, geo.total_len, reserve)?,
            None => Mapping::create_anonymous(geo.total_len, reserve)?,
        };
        // A new object (O_EXCL or memfd) reads as zeros: nothing to clear.
        let r = Self::format(map, geo, opts.name.clone(), true);
        if r.is_err() {
            if let Some(n) = &opts.name {
                let _ = mapping::unlink(n);
            }
        }
        r
    }

    /// Formats a pool in memory mapped by someone else (all of it that fits).
    /// With `zeroed`, the caller guarantees the memory reads as zeros (a
    /// freshly created object), and creating a large pool then touches only
    /// its header.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a writable shared mapping that outlives the
    /// pool, that nothing else uses as anything but this pool, and that no
    /// other process uses as a pool until this call returns; with `zeroed`,
    /// it must be all zeros.
    pub unsafe fn format_in_place(ptr: *mut u8, len: usize, zeroed: bool) -> Result<Pool> {
        let geo = Geometry::fitting(len, page_size()).ok_or(Error::BadSize)?;
        // SAFETY: the caller's contract covers `borrowed`'s.
        let map = unsafe { Mapping::borrowed(ptr, len)? };
        Self::format(map, geo, None, zeroed)
    }

    /// Opens a pool formatted earlier in memory mapped by someone else.
    ///
    /// # Safety
    /// As for [`Pool::format_in_place`], except that the pool exists.
    pub unsafe fn attach_in_place(ptr: *mut u8, len: usize) -> Result<Pool> {
        // SAFETY: the caller's contract covers `borrowed`'s.
        let map = unsafe { Mapping::borrowed(ptr, len)? };
        Self::validate(map, None).and_then(Self::repaired)
    }

    /// Maps and opens the named pool created by another process.
    pub fn attach(name: impl AsRef<OsStr>) -> Result<Pool> {
        let name = name.as_ref();
        Self::validate(Mapping::open_named(name)?, Some(name.to_owned())).and_then(Self::repaired)
    }

    /// A process opening a pool verifies it once (O(pages), about a
    /// millisecond per GiB) and, if its metadata is damaged (a stray write
    /// by some program, a bug), rebuilds everything derived from the
    /// `ALLOC` words before using it, counting a recovery.
    ///
    /// First of all it compares the allocator's own page count with the
    /// header's geometry (`validate` cannot: the allocator state may only be
    /// read under the lock), and refuses the pool if they differ.
    fn repaired(self) -> Result<Pool> {
        let npages = self.geo.npages;
        let r = self.locked(|l| {
            if l.arena.st.npages != npages {
                return Err(Error::NotAPool(format!(
                    "the allocator counts {} pages, the geometry {npages}",
                    l.arena.st.npages
                )));
            }
            // Other processes may be splitting or merging their large
            // cached runs right now: their slots are checked loosely.
            let mut extra = [0i64; MAX_OWNERS];
            for (q, e) in extra.iter_mut().enumerate() {
                *e = self.slot_cache(q as u16).extra();
            }
            if !l.arena.check_with(&extra, &[true; MAX_OWNERS]).is_empty() {
                l.arena.rebuild();
                *l.recoveries = l.recoveries.wrapping_add(1);
            }
            Ok(())
        });
        match r {
            Err(e @ Error::NotAPool(_)) => Err(e),
            _ => Ok(self),
        }
    }

    fn format(map: Mapping, geo: Geometry, name: Option<OsString>, zeroed: bool) -> Result<Pool> {
        if map.len() < geo.total_len || (map.ptr() as usize) % 64 != 0 {
            return Err(Error::BadSize);
        }
        let hdr = NonNull::new(map.ptr().cast::<Header>()).ok_or(Error::BadSize)?;
        // SAFETY: the mapping is at least geo.total_len bytes (checked) and
        // 64-byte aligned, so the header and the descriptor array fit and
        // are aligned; nobody else uses the memory until the magic is
        // stored below (contract of the constructors), so plain writes
        // race with nothing. All zeros is a valid `Header` (atomics, cells of
        // integers, mutex bytes that `init` sets up next).
        unsafe {
            if zeroed {
                std::ptr::write_bytes(map.ptr(), 0, std::mem::size_of::<Header>());
            } else {
                std::ptr::write_bytes(map.ptr(), 0, geo.payload_offset);
            }
        }
        let pool = Pool::new(map, hdr, geo, name);
        let h = pool.header();
        h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.page_size.store(geo.page_size as u32, Ordering::Relaxed);
        h.total_len.store(geo.total_len as u64, Ordering::Relaxed);
        h.desc_offset
            .store(geo.desc_offset as u64, Ordering::Relaxed);
        h.payload_offset
            .store(geo.payload_offset as u64, Ordering::Relaxed);
        let m = pool.mutex();
        // SAFETY: not yet published: nobody else uses the mutexes.
        unsafe {
            m.init()?;
            for k in &h.keepers {
                k.init()?;
            }
        }
        {
            // The fresh lock proves exclusive access like any other time.
            let (mut g, _) = m.lock()?;
            let mut l = pool.view(&mut g);
            l.arena.st.npages = geo.npages; // set once, before the magic
            l.arena.format_zeroed(); // the descriptors were zeroed above or were zero
        }
        // Publishes everything above (Release; attachers load it Acquire).
        pool.header().magic.store(MAGIC, Ordering::Release);
        Ok(pool)
    }

    fn validate(map: Mapping, name: Option<OsString>) -> Result<Pool> {
        let bad = |why: String| Err(Error::NotAPool(why));
        if map.len() < std::mem::size_of::<Header>() || (map.ptr() as usize) % 64 != 0 {
            return bad(format!("{} bytes is too small for a header", map.len()));
        }
        // SAFETY: the mapping holds at least a header (checked above) and is
        // aligned. `&Header` is sound even while another process is still
        // formatting it: every field is an atomic or a cell (see layout.rs).
        let h = unsafe { &*map.ptr().cast::<Header>() };
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return bad("no shmpool magic".into());
        }
        // The geometry was written before the magic was (Release), so the
        // Acquire above makes it visible; it never changes after.
        let version = h.layout_version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return bad(format!(
                "layout version {version} (this is {LAYOUT_VERSION})"
            ));
        }
        let ps = h.page_size.load(Ordering::Relaxed);
        if ps as usize != page_size() {
            return bad(format!("page size {ps} (this machine {})", page_size()));
        }
        // The page count the geometry implies. `AllocState::npages` must
        // agree, but it is only read under the lock (see `repaired`): a lock
        // holder may have the allocator state lent as `&mut` right now.
        let total = h.total_len.load(Ordering::Relaxed);
        let payload = h.payload_offset.load(Ordering::Relaxed);
        let npages = total
            .checked_sub(payload)
            .and_then(|b| u32::try_from(b / ps as u64).ok())
            .unwrap_or(0);
        match Geometry::for_pages(npages, page_size()) {
            Some(g)
                if g.total_len as u64 == total
                    && g.desc_offset as u64 == h.desc_offset.load(Ordering::Relaxed)
                    && g.payload_offset as u64 == payload
                    && g.total_len <= map.len() =>
            {
                let hdr = NonNull::new(map.ptr().cast::<Header>()).ok_or(Error::BadSize)?;
                Ok(Pool::new(map, hdr, g, name))
            }
            _ => bad(format!(
                "geometry of {npages} pages does not fit {} bytes",
                map.len()
            )),
        }
    }

    fn new(map: Mapping, hdr: NonNull<Header>, geo: Geometry, name: Option<OsString>) -> Pool {
        owner::ensure_fork_hook();
        Pool {
            map,
            hdr,
            geo,
            page_shift: geo.page_size.trailing_zeros(),
            name,
            my_slot: AtomicU64::new(u64::MAX),
            my_token: AtomicU64::new(0),
            cache: LocalCache::new(),
            caching: std::sync::atomic::AtomicBool::new(true),
            cache_cap: geo.npages as u64 / 16,
            remote_cap: geo.npages as u64 / 4,
            inbox_reserve: (geo.npages as u64 / 64).min(crate::cache::INBOX_RESERVE),
            keeper: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: hdr points to the header of our mapping, which lives as
        // long as self, aligned (checked by the constructors); every field
        // of `Header` is an atomic or a cell, so a shared reference asserts
        // nothing that other processes' writes could break.
        unsafe { self.hdr.as_ref() }
    }

    /// The mutable view of the shared state, for the holder of the pool
    /// lock, for as long as its guard stays borrowed.
    fn view<'a>(&'a self, g: &'a mut LockGuard<'_>) -> Locked<'a> {
        let h = self.header();
        let x = h.exclusive(g);
        Locked {
            // npages and d.len() agree by construction (geometry validated).
            arena: Arena {
                st: x.alloc,
                d: self.descriptors(),
                rebuilt: false,
            },
            owners: x.owners,
            recoveries: x.recoveries,
            owners_hwm: &h.owners_hwm,
        }
    }

    /// The page descriptors, as atomics (see `Arena`).
    pub(crate) fn descriptors(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the descriptor array lies inside our mapping at the
        // validated geometry, 8-byte aligned (desc_offset is a multiple of
        // 64), and is only ever accessed atomically or under the lock.
        unsafe {
            std::slice::from_raw_parts(
                self.map.ptr().add(self.geo.desc_offset).cast::<AtomicU64>(),
                self.geo.npages as usize,
            )
        }
    }

    /// The link words that chain inbox blocks (see `cache.rs`).
    pub(crate) fn links(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: the link array lies inside our mapping at the validated
        // geometry (after the descriptors, 4-byte aligned), and is only
        // ever accessed atomically.
        unsafe {
            std::slice::from_raw_parts(
                self.map
                    .ptr()
                    .add(self.geo.link_offset)
                    .cast::<std::sync::atomic::AtomicU32>(),
                self.geo.npages as usize,
            )
        }
    }

    pub(crate) fn slot_cache(&self, slot: u16) -> &SlotCache {
        &self.header().slot_cache[slot as usize % MAX_OWNERS]
    }

    /// One more than the highest owner slot ever used.
    pub(crate) fn owners_hwm(&self) -> u16 {
        self.header()
            .owners_hwm
            .load(Ordering::Relaxed)
            .min(MAX_OWNERS as u32) as u16
    }

    /// A token for taking slot locks: ours if registered, else computed
    /// (once per fork generation: it reads `/proc`, a few µs, which a
    /// process that only calls `stats` would otherwise pay on every call).
    pub(crate) fn taker_token(&self) -> u64 {
        use std::sync::atomic::AtomicU64;
        // The fallback token of this process and the fork generation it was
        // computed in (u64::MAX: none yet). Within one generation every
        // thread computes the same value, so a race only stores it twice.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        static FALLBACK_GEN: AtomicU64 = AtomicU64::new(u64::MAX);
        if let Some(t) = self.my_identity().map(|(_, t)| t).filter(|&t| t != 0) {
            return t;
        }
        let gen = owner::fork_generation();
        if FALLBACK_GEN.load(Ordering::Acquire) == gen {
            return FALLBACK.load(Ordering::Relaxed);
        }
        // Holding a slot lock as a taker needs some nonzero token; takers
        // also hold the pool lock, so a pid-only one is safe.
        let pid = std::process::id() as i32;
        let id = owner::me().unwrap_or(OwnerIdentity {
            pid,
            pidns: 0,
            start_time: 0,
        });
        let t = cache::token(&id, 0);
        FALLBACK.store(t, Ordering::Relaxed);
        FALLBACK_GEN.store(gen, Ordering::Release);
        t
    }

    fn mutex(&self) -> RobustMutex<'_> {
        RobustMutex::at(&self.header().lock)
    }

    /// Runs `f` under the pool lock. Recovers first if the previous holder
    /// died; if `f` finds the metadata inconsistent or panics, rebuilds and
    /// (for an inconsistency) runs `f` once more. The lock is always released
    /// with the pool in a consistent state.
    pub(crate) fn locked<R>(&self, mut f: impl FnMut(&mut Locked) -> Result<R>) -> Result<R> {
        let m = self.mutex();
        let (mut guard, acquired) = m.lock()?;
        hit(CrashPoint::Locked);
        let mut l = self.view(&mut guard);
        if acquired == Acquired::OwnerDied {
            // The holder died somewhere inside an operation: the ALLOC words
            // are the truth (one commit write per operation), rebuild the
            // rest before anyone reads it, then declare the lock consistent.
            // Nothing here is expected to panic; if it did, unwinding out
            // of `locked` would leave the lock held by a live process
            // forever, so it is caught like `f` below.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                l.arena.rebuild();
                *l.recoveries = l.recoveries.wrapping_add(1);
                // A dead process taking cached blocks back may have died
                // holding slot locks: take them over and recount them.
                let _ = self.check_slots(&mut l, self.taker_token(), false);
            }));
            m.mark_consistent();
        }
        // The caches of processes that died go back to the free runs now
        // (about one load per caching slot when nobody died).
        let _ = catch_unwind(AssertUnwindSafe(|| self.reap_dead_caches(&mut l)));
        let mut r = catch_unwind(AssertUnwindSafe(|| f(&mut l)));
        if matches!(r, Ok(Err(Error::Corrupt(_)))) {
            l.arena.rebuild();
            *l.recoveries = l.recoveries.wrapping_add(1);
            r = catch_unwind(AssertUnwindSafe(|| f(&mut l)));
        }
        let r = r.unwrap_or_else(|_| {
            l.arena.rebuild();
            *l.recoveries = l.recoveries.wrapping_add(1);
            Err(Error::Corrupt("internal panic under the pool lock".into()))
        });
        if l.arena.rebuilt {
            // The rebuild counted the words, maybe while owners split and
            // merged: recount them (L5 of `large_cache.rs`).
            let _ = catch_unwind(AssertUnwindSafe(|| self.after_rebuild(&mut l)));
        }
        hit(CrashPoint::BeforeUnlock);
        guard.unlock();
        r
    }

    /// This process's owner slot, registering it on first use (and again
    /// in a forked child). Called under the lock with `me` computed
    /// outside. Slot 0 if the table is full.
    ///
    /// A mark left on the slot's keeper mutex by its dead previous process
    /// is erased before the identity is published (it must never be read
    /// as news of this one); our keeper takes the mutex after the pool lock
    /// is released (waiting for a new thread to run must not hold up every
    /// process). In between, the slot has no keeper and reads as alive
    /// (`/proc` in its namespace, "maybe" elsewhere).
    fn owner_slot(&self, l: &mut Locked, me: &OwnerIdentity) -> u16 {
        let keepers = &self.header().keepers;
        let hwm = (self.owners_hwm() as usize).max(1);
        if let Some(i) = (1..hwm).find(|&i| l.owners[i] == *me) {
            // Registered already: by another `Pool` value of ours, or by
            // this process before an `execve` (pid and start time survive
            // it), whose keeper the exec killed. That mark speaks of the
            // old program: erase it, or a process that cannot start a
            // keeper would read as dead for as long as it lives.
            // The old program's cache died with it too (its stacks were
            // process memory; a thread of it may even have died holding
            // the slot lock, under the very token we would use): take its
            // blocks back while the mark still says its holder is gone,
            // then start the slot afresh.
            if keepers[i].state() == liveness::KeeperState::OwnerDied {
                self.take_back_cached(l, self.taker_token(), |s, _| s as usize == i);
                self.reset_slot(i as u16);
                keepers[i].clear_mark();
            }
            return i as u16;
        }
        // Pages, not blocks: its owner's splits and merges change its
        // block count without the pool lock, never its pages (L5).
        let empty = |l: &Locked, i: usize| l.arena.st.usage[i].pages == 0;
        // A free slot, or one whose process the kernel saw die and which
        // holds nothing; else a never used one; else one that `/proc` says
        // is dead and holds nothing.
        let slot = (1..hwm)
            .find(|&i| {
                empty(l, i)
                    && (l.owners[i].pid == 0
                        || keepers[i].state() == liveness::KeeperState::OwnerDied)
            })
            .or_else(|| (hwm < MAX_OWNERS).then_some(hwm))
            .or_else(|| {
                (1..MAX_OWNERS)
                    .find(|&i| empty(l, i) && !liveness::slot_alive(&keepers[i], &l.owners[i]))
            });
        match slot {
            Some(i) => {
                if keepers[i].state() == liveness::KeeperState::OwnerDied {
                    keepers[i].clear_mark();
                }
                // It holds no page, so no word: no block either.
                self.set_counted(l, i as u16, (0, 0));
                self.reset_slot(i as u16);
                l.owners[i] = *me;
                l.owners_hwm.fetch_max(i as u32 + 1, Ordering::Relaxed);
                i as u16
            }
            None => 0,
        }
    }

    /// This process's `(slot, token)`, if it has allocated since its
    /// last fork.
    #[inline]
    pub(crate) fn my_identity(&self) -> Option<(u16, u64)> {
        let c = self.my_slot.load(Ordering::Acquire);
        (c != u64::MAX && c >> 16 == owner::fork_generation())
            .then(|| (c as u16, self.my_token.load(Ordering::Relaxed)))
    }

    fn offset_of_page(&self, p: u32) -> usize {
        self.geo.payload_offset + p as usize * self.geo.page_size
    }

    fn page_of_offset(&self, off: usize) -> Result<u32> {
        let rel = off
            .checked_sub(self.geo.payload_offset)
            .ok_or(Error::NotABlock)?;
        let page = rel >> self.page_shift;
        if rel & (self.geo.page_size - 1) != 0 || page >= self.geo.npages as usize {
            return Err(Error::NotABlock);
        }
        Ok(page as u32)
    }

    /// Pages needed for `bytes`, or `BadSize` for 0. Sizes beyond the pool
    /// are `OutOfMemory`, as the original's users expect.
    fn pages_for(&self, bytes: usize) -> Result<u32> {
        if bytes == 0 {
            return Err(Error::BadSize);
        }
        // bytes.div_ceil(page_size), without overflow or division.
        let pages = (bytes >> self.page_shift) + (bytes & (self.geo.page_size - 1) != 0) as usize;
        u32::try_from(pages)
            .ok()
            .filter(|&p| p <= self.geo.npages)
            .ok_or(Error::OutOfMemory)
    }

    /// Allocates `bytes` (rounded up to whole pages); returns the block's
    /// byte offset from the start of the mapping.
    #[inline]
    pub fn alloc(&self, bytes: usize) -> Result<usize> {
        let pages = self.pages_for(bytes)?;
        let page = match self.my_identity() {
            Some((slot, tok)) => {
                let hit = if pages > CACHE_CLASSES {
                    self.large_pop(pages, slot, tok)
                } else {
                    self.cache_pop(pages, slot, tok, false)
                };
                match hit {
                    Some(p) => p,
                    None => self.alloc_locked(pages, slot, tok)?,
                }
            }
            None => self.alloc_registering(pages)?,
        };
        Ok(self.offset_of_page(page))
    }

    /// The locked path; when no free run is large enough, takes the
    /// processes' cached blocks back and tries once more.
    ///
    /// A cache whose owner holds its slot lock (mid-operation) is left
    /// alone; if the alloc still fails, it tries again a few times after
    /// yielding without the pool lock (the owner finishes in nanoseconds
    /// unless it is stopped), then reports `OutOfMemory`.
    fn alloc_locked(&self, pages: u32, slot: u16, tok: u64) -> Result<u32> {
        let r = self.locked(|l| {
            self.repair_own_inbox(l, slot, tok);
            if pages > CACHE_CLASSES && slot != 0 {
                // With a spare run for our large cache (`large_cache.rs`).
                self.large_refill(l, pages, slot, tok)
            } else {
                l.arena.alloc(pages, slot)
            }
        });
        match r {
            Err(Error::OutOfMemory) => {
                // Blocks handed back to us may wait in our inbox below its
                // reserve (see `cache.rs`): ours to take first.
                if pages <= CACHE_CLASSES {
                    if let Some(p) = self.cache_pop(pages, slot, tok, true) {
                        return Ok(p);
                    }
                }
                for round in 0..TAKE_BACK_ROUNDS {
                    let mut skipped = 0;
                    let r = self.locked(|l| {
                        skipped = self.take_back_cached(l, tok, |_, _| true);
                        l.arena.alloc(pages, slot)
                    });
                    if r != Err(Error::OutOfMemory) || skipped == 0 || round + 1 == TAKE_BACK_ROUNDS
                    {
                        return r;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(
                        (100u64 << round).min(TAKE_BACK_MAX_WAIT_US),
                    ));
                }
                Err(Error::OutOfMemory)
            }
            r => r,
        }
    }

    #[cold]
    fn alloc_registering(&self, pages: u32) -> Result<u32> {
        let (slot, tok) = self.register()?;
        self.alloc_locked(pages, slot, tok)
    }

    /// Gives this process an owner slot (and a keeper) in this fork
    /// generation; returns `(slot, token)`.
    #[cold]
    fn register(&self) -> Result<(u16, u64)> {
        if let Some(id) = self.my_identity() {
            return Ok(id);
        }
        let gen = owner::fork_generation();
        // Without a readable identity the process allocates as the
        // unrecorded owner (slot 0) and does not cache (token 0).
        let me = owner::me();
        // Outside the pool lock: creating a thread takes tens of µs.
        let keeper = me.as_ref().and_then(|_| Keeper::spawn());
        let mut tok = 0;
        let slot = self.locked(|l| {
            let Some(m) = me.as_ref() else { return Ok(0) };
            let slot = self.owner_slot(l, m);
            if slot != 0 {
                tok = cache::token(m, slot);
                self.adopt_stacks(l, slot, tok, gen);
            }
            Ok(slot)
        })?;
        // Our keeper takes the slot's keeper mutex (it fails if another
        // `Pool` value of ours has one holding it already).
        if let Some(k) =
            keeper.filter(|k| slot != 0 && k.hold(&self.header().keepers[slot as usize]))
        {
            self.set_keeper(k);
        }
        self.my_token.store(tok, Ordering::Relaxed);
        self.my_slot
            .store(gen << 16 | slot as u64, Ordering::Release);
        Ok((slot, tok))
    }

    /// Keeps `k` as this `Pool`'s keeper; a previous one is released (if
    /// it is this fork generation's) or forgotten (a parent's).
    fn set_keeper(&self, k: Keeper) {
        let old = self
            .keeper
            .swap(Box::into_raw(Box::new(k)), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: non-null values of `keeper` come from Box::into_raw
            // above, and the swap gave us sole ownership of this one.
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// Turns this process's cache on (the default) or off, for this `Pool`
    /// value (and children forked after). Off, every alloc and free takes
    /// the pool lock, and `stats().largest_free_bytes` is exact again once
    /// the cache is flushed (which turning it off does).
    pub fn set_caching(&self, on: bool) -> Result<()> {
        self.caching.store(on, Ordering::Relaxed);
        if on {
            Ok(())
        } else {
            self.flush_cache()
        }
    }

    /// Hands the live block at byte offset `off` to nobody (owner slot 0):
    /// `reclaim_dead` never frees it, so it outlives the process that
    /// allocated it (a shared heap's chunks). One rewrite of its `ALLOC`
    /// word under the lock: the commit.
    pub fn disown(&self, off: usize) -> Result<()> {
        let page = self.page_of_offset(off)?;
        let owner_bits = crate::desc::alloc_word(0, u16::MAX) ^ crate::desc::alloc_word(0, 0);
        self.locked(|l| {
            let w = l.arena.w(page);
            if crate::desc::tag(w) != crate::desc::TAG_ALLOC || crate::desc::is_cached(w) {
                return Err(Error::NotABlock);
            }
            let (len, owner) = (crate::desc::alloc_len(w), crate::desc::alloc_owner(w));
            if !l
                .arena
                .swap_word(page, w, w & !owner_bits & !crate::desc::GHOSTS)
            {
                return Err(Error::NotABlock);
            }
            if w & crate::desc::GHOSTS != 0 {
                // Its old owner's ghosts (`large_cache.rs`, L2) would not
                // name the new owner: gone (its interior is its user's, and
                // a death before this is repaired by recovery, which clears
                // words of another owner inside a block).
                l.arena.clear_ghosts(page, len, false);
            }
            let u = &mut l.arena.st.usage;
            let o = owner as usize % MAX_OWNERS;
            u[o].pages = u[o].pages.saturating_sub(len as u64);
            u[o].blocks = u[o].blocks.wrapping_sub(1); // may be "negative" (L5)
            u[0].pages += len as u64;
            u[0].blocks += 1;
            Ok(())
        })
    }

    /// Byte offsets of the live blocks owned by nobody (slot 0).
    pub(crate) fn unowned_blocks(&self) -> Result<Vec<usize>> {
        let live = self.locked(|l| Ok(l.arena.live_blocks()))?;
        Ok(live
            .into_iter()
            .filter(|&(_, _, o)| o == 0)
            .map(|(p, _, _)| self.offset_of_page(p))
            .collect())
    }

    /// Frees the block starting at byte offset `off`; returns its size.
    ///
    /// The block's descriptor is read once, here, and every later step
    /// requires exactly the word read: a free that raced with another free
    /// of the same block and its re-allocation (which gives the word a new
    /// generation, see `desc.rs`) fails with `NotABlock` and changes
    /// nothing, instead of freeing the new allocation.
    #[inline]
    pub fn free(&self, off: usize) -> Result<usize> {
        let page = self.page_of_offset(off)?;
        let w = self.descriptors()[page as usize].load(Ordering::Acquire);
        hit(CrashPoint::FreeLoaded);
        self.free_page_word(page, w)
    }

    /// The `ALLOC` word of the live block at byte offset `off`: its
    /// identity (a re-allocation of the same pages has another generation,
    /// see `desc.rs`), for [`Pool::free_word`].
    pub(crate) fn block_word(&self, off: usize) -> Result<u64> {
        let page = self.page_of_offset(off)?;
        let w = self.descriptors()[page as usize].load(Ordering::Acquire);
        if tag(w) != TAG_ALLOC || is_cached(w) {
            return Err(Error::NotABlock);
        }
        Ok(w)
    }

    /// Frees the block at `off` only if it is still the allocation whose
    /// word [`Pool::block_word`] returned (else `NotABlock`, nothing
    /// changes): a free decided before a lock was released, which another
    /// process may have done meanwhile (a heap's `destroy`).
    pub(crate) fn free_word(&self, off: usize, w: u64) -> Result<usize> {
        let page = self.page_of_offset(off)?;
        self.free_page_word(page, w)
    }

    #[inline]
    fn free_page_word(&self, page: u32, w: u64) -> Result<usize> {
        if tag(w) != TAG_ALLOC || is_cached(w) {
            return Err(Error::NotABlock);
        }
        let pages = match self.cache_free(page, w) {
            Some(n) => n,
            None => self.locked(|l| l.arena.free_exact(page, w))?,
        };
        Ok(pages as usize * self.geo.page_size)
    }

    /// The lock-free part of a free: our own block into our cache, another
    /// owner's into that owner's inbox (registering us first if we never
    /// allocated: a freer needs a slot, so that its death is seen).
    #[inline]
    fn cache_free(&self, page: u32, w: u64) -> Option<u32> {
        match self.my_identity() {
            Some((slot, _)) if alloc_owner(w) == slot => self.cache_push(page, w),
            Some((_, tok)) => self.inbox_push(page, w, tok),
            None if alloc_owner(w) != 0 && self.caching.load(Ordering::Relaxed) => {
                let (_, tok) = self.register().ok()?;
                self.inbox_push(page, w, tok)
            }
            None => None,
        }
    }

    /// Size in bytes of the block starting at byte offset `off`.
    #[inline]
    pub fn size(&self, off: usize) -> Result<usize> {
        let page = self.page_of_offset(off)?;
        let pages = self.locked(|l| l.arena.size(page))?;
        Ok(pages as usize * self.geo.page_size)
    }

    /// Pid of the process that allocated the block at byte offset `off`
    /// (0 if unrecorded).
    pub fn owner_of(&self, off: usize) -> Result<i32> {
        let page = self.page_of_offset(off)?;
        self.locked(|l| {
            let slot = l.arena.owner_of(page)? as usize;
            // A damaged ALLOC word may name a slot past the table (it would
            // panic, caught, and rebuild): read it as unrecorded.
            Ok(l.owners.get(slot).map_or(0, |o| o.pid))
        })
    }

    /// Exact figures. `free_bytes` counts the blocks processes hold in their
    /// caches (this process's are given back first, and those of dead
    /// processes are taken back). `largest_free_bytes` is the longest free
    /// run, after taking back every cache that may hold a longer block: a
    /// size alloc can always satisfy, and allocating it until it is 0
    /// obtains `free_bytes` in all (unless a cache's owner is frozen in the
    /// middle of a cache operation: see `cache.rs`).
    pub fn stats(&self) -> Stats {
        let _ = self.flush_cache();
        self.settle_slots();
        let tok = self.taker_token();
        // The caches' counters are read under the pool lock too, so that a
        // take-back (which holds it) is seen whole or not at all.
        let (ps, recoveries, (cached_pages, cached_blocks)) = self
            .locked(|l| {
                self.reap_keeperless_dead(l);
                self.settle_recounts(l, tok);
                // Blocks other processes freed into inboxes coalesce now.
                self.take_back_inboxes(l, tok);
                // `largest_free_bytes` must be a size alloc gets from the
                // free runs, and allocating it until it is 0 must obtain
                // every free page: take back the caches that may hold a
                // block longer than the longest run (they coalesce).
                let longest = l.arena.stats().largest_free_run as u64;
                if self
                    .caching_slots()
                    .any(|s| self.slot_cache(s).max_held() > longest)
                {
                    self.take_back_cached(l, tok, |_, sc| sc.max_held() > longest);
                }
                let mut ps = l.arena.stats();
                ps.live_blocks = (ps.live_blocks as i64).wrapping_add(self.extra_total()) as u64;
                Ok((ps, *l.recoveries, self.cached_totals()))
            })
            .unwrap_or((
                PageStats {
                    npages: self.geo.npages,
                    free_pages: 0,
                    largest_free_run: 0,
                    live_blocks: 0,
                },
                0,
                (0, 0),
            ));
        let pg = self.geo.page_size;
        Stats {
            total_bytes: self.geo.total_len,
            // Saturating: a damaged header must not make stats panic.
            free_bytes: (ps.free_pages.saturating_add(cached_pages) as usize).saturating_mul(pg),
            largest_free_bytes: ps.largest_free_run as usize * pg,
            payload_bytes: self.geo.npages as usize * pg,
            live_blocks: ps.live_blocks.saturating_sub(cached_blocks),
            page_size: pg,
            recoveries,
        }
    }

    /// Every violated invariant (empty when the pool is sound).
    pub fn check(&self) -> Vec<String> {
        let tok = self.taker_token();
        self.locked(|l| {
            // The descriptors and counts first (under the slot locks,
            // `check_slots`), then the owner table.
            let mut v = self.check_slots(l, tok, true);
            for (i, o) in l.owners.iter().enumerate().skip(1) {
                if o.pid == 0 && l.arena.st.usage[i] != OwnerUsage::default() {
                    v.push(format!("owner slot {i} is empty but holds blocks"));
                }
            }
            Ok(v)
        })
        .unwrap_or_else(|e| vec![format!("could not lock the pool: {e}")])
    }

    /// Owner slots in use, with their usage and whether they still live.
    pub fn owners(&self) -> Result<Vec<OwnerInfo>> {
        let (ids, usage) = self.locked(|l| Ok((*l.owners, l.arena.st.usage)))?;
        Ok((0..MAX_OWNERS)
            .filter(|&i| ids[i].pid != 0 || usage[i].pages != 0)
            .map(|i| OwnerInfo {
                slot: i as u16,
                pid: ids[i].pid,
                start_time: ids[i].start_time,
                alive: i == 0 || liveness::slot_alive(&self.header().keepers[i], &ids[i]),
                pages: usage[i]
                    .pages
                    .saturating_sub(self.slot_cache(i as u16).held().0),
                blocks: ((usage[i].blocks as i64).wrapping_add(self.slot_cache(i as u16).extra())
                    as u64)
                    .saturating_sub(self.slot_cache(i as u16).held().1),
            })
            .collect())
    }

    /// Frees every block whose owner process no longer exists, as its
    /// keeper mutex says (see `liveness.rs`), or, for a process without a
    /// keeper, `/proc` in our own PID namespace (a pid that was reused
    /// counts as dead: the start time differs; a process of another
    /// namespace counts as alive). Never automatic: a dead worker's block
    /// may hold a result another process still reads. A dead owner whose
    /// slot or inbox lock a live process keeps (one freeing a block into
    /// its inbox, stopped there) is left whole for a later call.
    pub fn reclaim_dead(&self) -> Result<Reclaimed> {
        let tok = self.taker_token();
        // Read liveness outside the lock (it reads /proc), then re-check the
        // identities under the lock so a slot reused meanwhile is spared.
        let snapshot = self.locked(|l| Ok(*l.owners))?;
        let dead: Vec<(usize, OwnerIdentity)> = (1..MAX_OWNERS)
            .filter(|&i| {
                snapshot[i].pid != 0
                    && !liveness::slot_alive(&self.header().keepers[i], &snapshot[i])
            })
            .map(|i| (i, snapshot[i]))
            .collect();
        self.locked(|l| {
            let mut out = Reclaimed::default();
            let still_dead: Vec<usize> = dead
                .iter()
                .filter(|(i, id)| l.owners[*i] == *id)
                .map(|(i, _)| *i)
                .collect();
            // Both locks of each slot first, held until its records are
            // cleared: a live process freeing one of the dead owner's
            // blocks into its inbox holds the inbox lock between its
            // commit and its entry, and would otherwise list a block we
            // free here (or, once the slot is reused, another process's).
            // A slot such a process keeps past our patience is left for a
            // later call, whole.
            let dead_now = self.lock_slots(l, &still_dead, tok);
            for &i in &dead_now {
                let cached = self.slot_cache(i as u16).held().0;
                let held = l.arena.st.usage[i].pages.saturating_sub(cached);
                out.owners.push((l.owners[i].pid, held));
            }
            for (page, len, owner) in l.arena.live_blocks() {
                if dead_now.contains(&(owner as usize)) {
                    l.arena.free_any(page)?;
                    out.blocks += 1;
                    out.pages += len as u64;
                }
            }
            // Its cache died with it: those blocks were free already.
            for (page, _, owner) in l.arena.cached_blocks() {
                if dead_now.contains(&(owner as usize)) {
                    l.arena.free_any(page)?;
                }
            }
            for &i in &dead_now {
                l.owners[i] = OwnerIdentity::default();
                self.forget_locked_slot(i as u16, tok);
            }
            Ok(out)
        })
    }

    /// A human-readable picture in the spirit of the original's
    /// `debug_info`: sizes, live blocks (offset -> size) and free runs.
    pub fn debug_info(&self) -> String {
        let r = self.locked(|l| {
            Ok((
                l.arena.stats(),
                l.arena.live_blocks(),
                l.arena.free_runs(),
                l.arena.cached_blocks(),
                *l.recoveries,
            ))
        });
        let Ok((ps, live, free, cached, recoveries)) = r else {
            return "pool could not be locked".into();
        };
        let pg = self.geo.page_size;
        let mut s = String::new();
        let cached_pages: usize = cached.iter().map(|&(_, n, _)| n as usize).sum();
        // The original's lines first, in its order and meaning: pool_size
        // is the payload (the size asked for), as `stats`' total in the
        // shim; pool_start is the payload's offset in the shared object.
        let _ = writeln!(s, "pool_size = {}", self.geo.npages as usize * pg);
        let _ = writeln!(
            s,
            "pool_free = {}",
            (ps.free_pages as usize)
                .saturating_add(cached_pages)
                .saturating_mul(pg)
        );
        let _ = writeln!(
            s,
            "pool_free_contiguous = {}",
            ps.largest_free_run as usize * pg
        );
        let _ = writeln!(s, "pool_start = {}", self.geo.payload_offset);
        let list = |v: &mut String, title: &str, runs: &mut dyn Iterator<Item = (u32, u32)>| {
            let _ = write!(v, "{title} (offs->bsize): {{");
            for (i, (p, n)) in runs.enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(v, "{sep}{}->{}", self.offset_of_page(p), n as usize * pg);
            }
            let _ = writeln!(v, "}}");
        };
        list(
            &mut s,
            "allocations",
            &mut live.iter().map(|&(p, n, _)| (p, n)),
        );
        list(&mut s, "free runs", &mut free.into_iter());
        list(
            &mut s,
            "cached in processes",
            &mut cached.iter().map(|&(p, n, _)| (p, n)),
        );
        let _ = writeln!(s, "page_size = {pg}");
        let _ = writeln!(s, "payload_pages = {}", self.geo.npages);
        let _ = writeln!(s, "header_size = {}", self.geo.payload_offset);
        let _ = writeln!(s, "live_blocks = {}", live.len());
        let _ = writeln!(s, "recoveries = {recoveries}");
        s
    }

    /// Removes the pool's name (named pools only); mappings stay valid.
    pub fn unlink(&self) -> Result<()> {
        match &self.name {
            Some(n) => mapping::unlink(n),
            None => Ok(()),
        }
    }

    pub fn name(&self) -> Option<&OsStr> {
        self.name.as_deref()
    }

    /// Keeps this pool's memory mapped after the pool is dropped (see
    /// [`Mapping::keep_alive`]); `None` for a pool in borrowed memory.
    pub fn keep_alive(&self) -> Option<mapping::KeepAlive> {
        self.map.keep_alive()
    }

    /// Address of the first byte of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.map.ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Pages of blocks other processes freed that wait in a process's
    /// inbox before the process takes them back into its cache: 256, or a
    /// 64th of a pool of less than 16,384 pages. Until then its allocations
    /// come from the free runs, so a hand-off keeps about this many pages
    /// more in circulation (still counted as free by `stats`, and taken
    /// back by any allocation that needs them). It is what makes the owner
    /// reuse blocks the freer finished with long ago (see `cache.rs`).
    pub fn inbox_reserve_pages(&self) -> u64 {
        self.inbox_reserve
    }

    /// Sets [`Pool::inbox_reserve_pages`] for this `Pool` value (each
    /// process has its own; a child forked afterwards inherits it). For
    /// tests: 0 makes the owner take its inbox at its next miss, as before
    /// the reserve, so that a test of a few hundred operations on a large
    /// pool still goes through the drain.
    #[doc(hidden)]
    pub fn set_inbox_reserve_pages(&mut self, pages: u64) {
        self.inbox_reserve = pages;
    }

    /// Address of the byte at offset `off` of the mapping (for example a
    /// block returned by `alloc`). Dereferencing it is the caller's business.
    pub fn addr(&self, off: usize) -> *mut u8 {
        self.map.ptr().wrapping_add(off)
    }
}

impl Drop for Pool {
    /// Gives this process's cached blocks back before the pool is closed.
    /// Then releases this process's keeper (before the mapping goes: the
    /// kernel must not find the mutex in its robust list once unmapped).
    fn drop(&mut self) {
        let _ = self.flush_cache();
        let k = self.keeper.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !k.is_null() {
            // SAFETY: as in `set_keeper`.
            drop(unsafe { Box::from_raw(k) });
        }
    }
}
