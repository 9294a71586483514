//! Shared heaps of OCaml values in a pool: the core of
//! `Shmpool_netmcore.Netmcore_heap` (design: `docs/design-heap.md`).
//!
//! A heap is a descriptor plus chunks, all pool blocks owned by nobody
//! (owner slot 0). Values in it are OCaml blocks with black headers
//! (`value.rs`). Everything but the values and the root is derived
//! bookkeeping: free lists, counters, mark bitmaps. **The root is the
//! truth**: when a process dies holding the heap's robust lock, the next
//! locker rebuilds the bookkeeping by marking from the root and the pins
//! (`recover.rs`), exactly as a GC does, so a death at any step costs at
//! most the garbage of that step.
//!
//! | file | mechanism |
//! |---|---|
//! | `value.rs` | OCaml header encoding, tags, immediates |
//! | `layout.rs` | on-shm descriptor, chunk header, chunk table, pins |
//! | `hlock.rs` | the heap's robust lock, held across calls |
//! | `alloc.rs` | free lists: exact classes and a first-fit list |
//! | `chunks.rs` | getting, adding, removing and finding chunks |
//! | `gc.rs` | mark (side bitmap) and sweep (free lists from the gaps) |
//! | `pins.rs` | values pinned by `with_value`, with their owner |
//! | `recover.rs` | rebuilding after a holder died; orphan chunks |
//! | `check.rs` | every invariant, as a list of violations |
//!
//! The test-only death points between the writes are the `Heap*` points
//! of the crate's single list, `crate::crashpoint`.
//!
//! # Threads and processes
//! A `Heap` is a per-process handle. Its lock is re-entrant in the thread
//! that holds it (nested `modify`, `gc` inside `modify`); other threads
//! and processes wait. Every operation that writes heap memory or the
//! descriptor requires the lock, held by the calling thread (checked:
//! [`HeapError::NotLocked`]). [`Heap::root`] needs no lock.

mod alloc;
mod check;
mod chunks;
pub mod copy;
mod gc;
mod hlock;
pub mod layout;
mod pins;
mod recover;
pub mod value;

use crate::error::Error;
use crate::pool::Pool;
use layout::*;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI64, Ordering::*};
use value::*;

/// What can go wrong with a heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeapError {
    /// The pool failed (out of memory, bad size, ...).
    Pool(Error),
    /// No heap at this descriptor (bad offset, no magic, another layout,
    /// another pool mapping), with the reason.
    NotAHeap(String),
    /// The heap was destroyed.
    Destroyed,
    /// The operation needs the heap lock held by the calling thread.
    NotLocked,
    /// `destroy` called by the thread holding the heap's lock.
    InUse,
    /// A value that cannot be copied into a heap, and what it is: a
    /// closure, object, lazy, abstract or unknown custom block, or a
    /// pointer outside OCaml's memory.
    Uncopyable(&'static str),
}

impl HeapError {
    /// The FFI code (see [`crate::error::code`]).
    pub fn code(&self) -> isize {
        use crate::error::code;
        match self {
            HeapError::Pool(e) => e.code(),
            HeapError::NotAHeap(_) => code::NOT_A_HEAP,
            HeapError::Destroyed => code::HEAP_DESTROYED,
            HeapError::NotLocked => code::NOT_LOCKED,
            HeapError::InUse => code::HEAP_IN_USE,
            HeapError::Uncopyable(_) => code::UNCOPYABLE,
        }
    }
}

impl From<Error> for HeapError {
    fn from(e: Error) -> Self {
        HeapError::Pool(e)
    }
}

impl std::fmt::Display for HeapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeapError::Pool(e) => write!(f, "{e}"),
            HeapError::NotAHeap(why) => write!(f, "no heap structure found: {why}"),
            HeapError::Destroyed => write!(f, "heap destroyed"),
            HeapError::NotLocked => write!(f, "heap not locked by this thread"),
            HeapError::InUse => write!(f, "heap in use by this thread"),
            HeapError::Uncopyable(what) => write!(f, "cannot copy into a heap: {what}"),
        }
    }
}

impl std::error::Error for HeapError {}

pub type HResult<T> = std::result::Result<T, HeapError>;

/// How [`Heap::lock`] got the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockInfo {
    /// This thread held it already (re-entrance: only the depth grew).
    pub nested: bool,
    /// The previous holder died; the heap was rebuilt from the root.
    pub recovered: bool,
}

/// Figures of one heap, exact at one instant (under its lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeapStats {
    pub chunks: u64,
    /// Words of all areas.
    pub heap_words: u64,
    /// Words on the free lists.
    pub free_words: u64,
    /// Words of live blocks at the last GC.
    pub live_words: u64,
    pub alloc_since_gc: u64,
    pub gcs: u64,
    pub recoveries: u64,
    pub needs_repair: u64,
    pub repaired: u64,
    pub pins: u64,
}

/// State only the thread holding the lock touches.
#[derive(Default)]
struct Local {
    /// Nesting depth of `lock` in the holding thread.
    depth: u32,
    /// Values allocated since the outermost `lock`: GC roots until the
    /// outermost `unlock`, so a value not yet stored anywhere reachable
    /// survives the GC that a later allocation of the same `modify` runs.
    added: Vec<u64>,
    /// Buffers of the copy-in, reused.
    scratch: copy::Scratch,
    /// Buffers of the GC (roots, mark stack, marked span of each chunk's
    /// bitmap), reused.
    gc_roots: Vec<u64>,
    gc_stack: Vec<u64>,
    gc_spans: Vec<(u64, u64)>,
}

/// A process's handle on a shared heap.
pub struct Heap<'p> {
    pool: &'p Pool,
    desc_off: usize,
    /// Kernel thread id of the holder of the lock in this process, or 0.
    holder: AtomicI64,
    /// The heap's nonce when this handle was made: a handle kept after
    /// `destroy` must not work on a new heap made at the same place.
    nonce0: std::sync::atomic::AtomicU64,
    local: UnsafeCell<Local>,
}

// SAFETY: `local` is touched only by the thread recorded in `holder` while
// it holds the heap's mutex (every access goes through `local()`, which
// checks); all shared memory is reached through atomics or raw pointers
// under that mutex.
unsafe impl Send for Heap<'_> {}
// SAFETY: as for Send: shared use from several threads goes through the
// heap's mutex and the `holder` check.
unsafe impl Sync for Heap<'_> {}

/// Smallest extension chunk.
const MIN_CHUNK_BYTES: usize = 64 << 10;
/// A GC runs before growing only once this many words were allocated
/// since the last one (and at least as many as were live after it).
const MIN_GC_WORDS: u64 = 8 << 10;
/// [`Heap::collect_if_due`] collects once this many words were allocated
/// since the last GC (and at least the live words, and a sixteenth of the
/// heap): 16 KiB, so that what the copies of a `modify` loop write cycles
/// through memory that stays in the L1 cache with its sources.
const EARLY_GC_WORDS: u64 = 2 << 10;

fn random_nonce() -> [u64; 2] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes to a valid buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut w = [
        u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
        u64::from_le_bytes(b[8..].try_into().unwrap_or_default()),
    ];
    if n != 16 {
        // No entropy source: still distinct per heap and process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        w[0] ^= t ^ ((std::process::id() as u64) << 32);
        w[1] ^= t.rotate_left(29) ^ (&b as *const _ as u64);
    }
    w
}

impl<'p> Heap<'p> {
    /// Bytes of descriptor and first-chunk overhead a heap of `size`
    /// usable bytes takes from the pool.
    pub fn first_block_bytes(size: usize) -> usize {
        let area = size.div_ceil(WORD).max(2);
        std::mem::size_of::<HeapDesc>() + chunk_overhead(area) + area * WORD
    }

    /// Creates a heap whose first block leaves at least `size` bytes for
    /// values; `init` runs under the heap's lock before anyone can know
    /// the heap and returns the root (for example a value it copied in).
    /// If `init` fails, the heap is freed and the pool is as before.
    pub fn create_with(
        pool: &'p Pool,
        size: usize,
        init: impl FnOnce(&Heap<'p>) -> HResult<u64>,
    ) -> HResult<Heap<'p>> {
        if size == 0 {
            return Err(Error::BadSize.into());
        }
        let bytes = Self::first_block_bytes(size);
        // Owned by this process until committed: if it dies before the
        // `disown` below, `reclaim_dead` frees the block (nobody knew it).
        let off = pool.alloc(bytes)?;
        let bytes = pool.size(off)?;
        let h = Heap {
            pool,
            desc_off: off,
            holder: AtomicI64::new(0),
            nonce0: std::sync::atomic::AtomicU64::new(0),
            local: UnsafeCell::new(Local::default()),
        };
        // SAFETY: the block is ours alone (just allocated, not published)
        // and holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(pool.addr(off), 0, std::mem::size_of::<HeapDesc>()) };
        let d = h.desc();
        let nonce = random_nonce();
        d.layout_version.store(HEAP_LAYOUT_VERSION, Relaxed);
        d.state.store(STATE_LIVE, Relaxed);
        d.nonce[0].store(nonce[0], Relaxed);
        d.nonce[1].store(nonce[1], Relaxed);
        h.nonce0.store(nonce[0], Relaxed);
        d.pool_base.store(pool.base() as u64, Relaxed);
        let first = off + std::mem::size_of::<HeapDesc>();
        d.first_chunk.store(first as u64, Relaxed);
        d.root.store(VAL_UNIT, Relaxed);
        d.pin_head.store(VAL_UNIT, Relaxed);
        for f in &d.free_heads {
            f.store(0, Relaxed);
        }
        // SAFETY: not yet published.
        if let Err(e) = unsafe { hlock::init(&d.lock) } {
            let _ = pool.free(off);
            return Err(e.into());
        }
        h.format_chunk(first as u64, bytes - std::mem::size_of::<HeapDesc>());
        h.append_chunk(first as u64, bytes - std::mem::size_of::<HeapDesc>());
        d.magic.store(HEAP_MAGIC, Release);
        let r = h.lock().and_then(|_| {
            crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapCreateFormatted);
            let r = init(&h).and_then(|root| h.set_root(root));
            h.unlock();
            r
        });
        let r = r.and_then(|()| {
            crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapCreateBeforeDisown);
            pool.disown(off).map_err(HeapError::from)
        });
        if let Err(e) = r {
            d.state.store(STATE_DESTROYING, Release);
            let _ = pool.free(off);
            return Err(e);
        }
        Ok(h)
    }

    /// Creates a heap whose root is `()`.
    pub fn create(pool: &'p Pool, size: usize) -> HResult<Heap<'p>> {
        Self::create_with(pool, size, |_| Ok(VAL_UNIT))
    }

    /// Opens the heap whose descriptor is at byte offset `off` of the pool
    /// (see [`Heap::descr`]).
    pub fn attach(pool: &'p Pool, off: usize) -> HResult<Heap<'p>> {
        let bad = |why: &str| Err(HeapError::NotAHeap(why.into()));
        match pool.size(off) {
            Ok(n) if n >= std::mem::size_of::<HeapDesc>() => {}
            _ => return bad("not a block of this pool"),
        }
        let h = Heap {
            pool,
            desc_off: off,
            holder: AtomicI64::new(0),
            nonce0: std::sync::atomic::AtomicU64::new(0),
            local: UnsafeCell::new(Local::default()),
        };
        let d = h.desc();
        if d.magic.load(Acquire) != HEAP_MAGIC {
            return bad("no heap magic");
        }
        if d.layout_version.load(Relaxed) != HEAP_LAYOUT_VERSION {
            return bad("another heap layout version");
        }
        if d.pool_base.load(Relaxed) != pool.base() as u64 {
            return bad("the pool is mapped at another address than at the heap's creation");
        }
        if d.state.load(Acquire) != STATE_LIVE {
            return Err(HeapError::Destroyed);
        }
        h.nonce0.store(d.nonce[0].load(Relaxed), Relaxed);
        Ok(h)
    }

    /// The descriptor: byte offset of the heap's first block in the pool.
    pub fn descr(&self) -> usize {
        self.desc_off
    }

    /// The first word of the random nonce of the heap this handle was
    /// made on (distinct for every heap ever created, in practice); a heap
    /// made later at the same descriptor has another.
    pub fn nonce(&self) -> u64 {
        self.nonce0.load(Relaxed)
    }

    pub fn pool(&self) -> &'p Pool {
        self.pool
    }

    pub(crate) fn desc(&self) -> &HeapDesc {
        // SAFETY: the first block is at least a HeapDesc (checked by
        // create/attach), 64-aligned (page-aligned block), and stays
        // mapped with the pool; every field is an atomic or a mutex cell.
        unsafe { &*self.pool.addr(self.desc_off).cast::<HeapDesc>() }
    }

    /// Pool base as an address (values are absolute addresses).
    #[inline]
    pub(crate) fn base(&self) -> u64 {
        self.pool.base() as u64
    }

    /// The word at byte offset `off` of the pool.
    ///
    /// # Safety
    /// `off` is 8-aligned and inside a chunk of this heap (or its
    /// descriptor), and the caller holds the heap lock.
    #[inline]
    pub(crate) unsafe fn rd(&self, off: u64) -> u64 {
        // SAFETY: contract above; the pool mapping covers the offset.
        unsafe { std::ptr::read(self.pool.addr(off as usize).cast::<u64>()) }
    }

    /// Writes the word at byte offset `off` of the pool.
    ///
    /// # Safety
    /// As for [`Heap::rd`]; nothing live (reachable) is overwritten except
    /// by the documented mutations.
    #[inline]
    pub(crate) unsafe fn wr(&self, off: u64, v: u64) {
        // SAFETY: as in `rd`.
        unsafe { std::ptr::write(self.pool.addr(off as usize).cast::<u64>(), v) }
    }

    fn held(&self) -> bool {
        self.holder.load(Relaxed) == hlock::tid()
    }

    /// The holder's local state.
    #[allow(clippy::mut_from_ref)]
    fn local(&self) -> HResult<&mut Local> {
        if !self.held() {
            return Err(HeapError::NotLocked);
        }
        // SAFETY: only the holding thread gets here (checked above), and
        // it never keeps two of these borrows alive at once (each use is a
        // short statement or block in this module).
        Ok(unsafe { &mut *self.local.get() })
    }

    fn check_live(&self) -> HResult<()> {
        let d = self.desc();
        if d.magic.load(Acquire) != HEAP_MAGIC
            || d.state.load(Acquire) != STATE_LIVE
            || d.nonce[0].load(Relaxed) != self.nonce0.load(Relaxed)
        {
            Err(HeapError::Destroyed)
        } else {
            Ok(())
        }
    }

    /// Locks the heap for the calling thread (re-entrant). A heap whose
    /// previous holder died is rebuilt from its root first.
    pub fn lock(&self) -> HResult<LockInfo> {
        self.lock_waiting(&mut |wait| wait())
    }

    /// [`Heap::lock`], where waiting for another holder runs inside
    /// `around` (the OCaml stub releases the runtime lock there, so other
    /// threads, maybe the holder, can run).
    pub fn lock_waiting(&self, around: &mut dyn FnMut(&mut dyn FnMut())) -> HResult<LockInfo> {
        if self.held() {
            self.local()?.depth += 1;
            return Ok(LockInfo {
                nested: true,
                recovered: false,
            });
        }
        self.check_live()?;
        let d = self.desc();
        let how = match hlock::try_acquire(&d.lock) {
            Some(r) => r?,
            None => {
                let mut r = None;
                around(&mut || r = Some(hlock::acquire(&d.lock)));
                r.unwrap_or_else(|| hlock::acquire(&d.lock))?
            }
        };
        self.holder.store(hlock::tid(), Relaxed);
        {
            let l = self.local()?;
            l.depth = 1;
            l.added.clear();
        }
        let mut info = LockInfo::default();
        if how == crate::lock::Acquired::OwnerDied {
            // A death during recovery leaves the mutex inconsistent for
            // the next locker, which starts over. A *failure* (a panic: a
            // bug) must not: unlocking an inconsistent robust mutex makes
            // it unusable forever, so it is marked consistent anyway and
            // the caller hears of the failure.
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.recover()))
                .unwrap_or(false);
            hlock::mark_consistent(&d.lock);
            if !ok {
                self.unlock();
                return Err(Error::Corrupt("heap recovery failed".into()).into());
            }
            info.recovered = true;
        }
        if let Err(e) = self.check_live() {
            self.unlock();
            return Err(e);
        }
        Ok(info)
    }

    /// Collects now (lock held, at the start of an outermost `modify`) if
    /// enough was allocated since the last GC: at least `EARLY_GC_WORDS`,
    /// the live words and a sixteenth of the heap (so the cost, O(live
    /// blocks + marked bitmap span), stays amortised). Returns whether it
    /// collected.
    ///
    /// Why (measured, see docs/design-heap.md 3.4): between two GCs the
    /// allocations walk through all of the heap's free space, so a loop of
    /// `modify` + `add` of 10 KB strings wrote its copies through 120 KB,
    /// from the L2 cache (a 10 KB memcpy: 171 ns), where collecting every
    /// 16 KiB keeps them in about 30 KB of L1 (57 ns). Only here, where
    /// the thread holds nothing of this `modify` yet: a GC inside a
    /// `modify` (which allocation still runs when the free lists are
    /// exhausted) can reclaim a value the callback read from the heap and
    /// detached, and running more of them there would make that likelier.
    pub fn collect_if_due(&self) -> HResult<bool> {
        let l = self.local()?;
        if l.depth != 1 {
            return Ok(false);
        }
        let d = self.desc();
        let since = d.alloc_since_gc.load(Relaxed);
        if since < EARLY_GC_WORDS
            || since < d.live_words.load(Relaxed)
            || since < d.heap_words.load(Relaxed) / 16
        {
            return Ok(false);
        }
        self.collect_with(&|_| {}, Some(0))?;
        Ok(true)
    }

    /// Undoes one [`Heap::lock`]; the outermost one releases the mutex.
    pub fn unlock(&self) {
        let Ok(l) = self.local() else { return };
        l.depth = l.depth.saturating_sub(1);
        if l.depth == 0 {
            l.added.clear();
            if l.added.capacity() > 4096 {
                l.added.shrink_to(64);
            }
            self.holder.store(0, Relaxed);
            hlock::release(&self.desc().lock);
        }
    }

    /// Whether the calling thread holds the lock.
    pub fn is_locked_by_me(&self) -> bool {
        self.held()
    }

    /// Runs `f` under the lock.
    pub fn with_lock<R>(&self, f: impl FnOnce(&Self) -> HResult<R>) -> HResult<R> {
        self.with_lock_waiting(&mut |wait| wait(), f)
    }

    /// [`Heap::with_lock`], waiting for another holder inside `around` (see
    /// [`Heap::lock_waiting`]).
    pub fn with_lock_waiting<R>(
        &self,
        around: &mut dyn FnMut(&mut dyn FnMut()),
        f: impl FnOnce(&Self) -> HResult<R>,
    ) -> HResult<R> {
        self.lock_waiting(around)?;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        self.unlock();
        match r {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// The root value (no lock needed: one load).
    pub fn root(&self) -> u64 {
        self.desc().root.load(Acquire)
    }

    /// The root, or `Destroyed` once `destroy` began (no lock needed).
    pub fn live_root(&self) -> HResult<u64> {
        self.check_live()?;
        Ok(self.root())
    }

    /// Makes `v` the root (lock held). `v` must be an immediate or a value
    /// of this heap, completely written.
    pub fn set_root(&self, v: u64) -> HResult<()> {
        self.local()?;
        self.desc().root.store(v, Release);
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapRootStored);
        Ok(())
    }

    /// Allocates a block of `wosize` fields with tag `tag` (lock held) and
    /// returns its address as an OCaml value. Fields of scanned blocks
    /// read `()`, others zero. The block stays alive until the outermost
    /// `unlock` even if nothing points to it.
    pub fn alloc(&self, wosize: usize, tag: u8) -> HResult<u64> {
        if wosize == 0 || wosize as u64 > MAX_WOSIZE {
            return Err(Error::BadSize.into());
        }
        let hoff = self.alloc_span(wosize as u64 + 1)?;
        let fill = if tag < NO_SCAN_TAG { VAL_UNIT } else { 0 };
        // SAFETY: alloc_span returned wosize+1 free words of our area.
        unsafe {
            self.wr(hoff, make_header(wosize as u64, tag));
            for i in 1..=wosize as u64 {
                self.wr(hoff + i * 8, fill);
            }
        }
        let v = self.base() + hoff + 8;
        self.local()?.added.push(v);
        Ok(v)
    }

    /// Takes `words` contiguous free words (lock held), collecting or
    /// growing the heap when the free lists have none; returns the byte
    /// offset of the first. The caller writes black headers over all of
    /// them before the next allocation and roots what it keeps
    /// ([`Heap::keep`]).
    pub(crate) fn alloc_span(&self, words: u64) -> HResult<u64> {
        self.alloc_span_rooted(words, &|_| {})
    }

    /// [`Heap::alloc_span`] where a collection, if one runs, also keeps
    /// what `extra` adds to the roots.
    pub(crate) fn alloc_span_rooted(
        &self,
        words: u64,
        extra: &dyn Fn(&mut Vec<u64>),
    ) -> HResult<u64> {
        self.local()?;
        if let Some(off) = self.take(words) {
            return Ok(self.count_alloc(off, words));
        }
        let d = self.desc();
        let since = d.alloc_since_gc.load(Relaxed);
        if since >= d.live_words.load(Relaxed).max(MIN_GC_WORDS) {
            self.collect_with(extra, Some(words))?;
            // Mostly live after the GC: grow now, so the next GCs stay
            // amortised; but a full pool is no error while the free lists
            // still have room.
            let (free, total) = (d.free_words.load(Relaxed), d.heap_words.load(Relaxed));
            if free < total / 4 {
                match self.grow(words) {
                    Ok(()) | Err(HeapError::Pool(Error::OutOfMemory)) => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(off) = self.take(words) {
                return Ok(self.count_alloc(off, words));
            }
            self.grow(words)?;
        } else {
            match self.grow(words) {
                // The pool is full: what the heap holds as garbage is the
                // only room left.
                Err(HeapError::Pool(Error::OutOfMemory)) if since > 0 => {
                    self.collect_with(extra, Some(words))?
                }
                r => r?,
            }
        }
        let off = self
            .take(words)
            .ok_or(HeapError::Pool(Error::OutOfMemory))?;
        Ok(self.count_alloc(off, words))
    }

    fn count_alloc(&self, off: u64, words: u64) -> u64 {
        let d = self.desc();
        d.alloc_since_gc
            .store(d.alloc_since_gc.load(Relaxed) + words, Relaxed);
        off
    }

    /// Roots `v` until the outermost `unlock` (lock held).
    pub fn keep(&self, v: u64) -> HResult<()> {
        self.local()?.added.push(v);
        Ok(())
    }

    /// Collects the heap: frees what the root, the pins and this lock's
    /// additions do not reach; gives emptied chunks back to the pool.
    pub fn gc(&self) -> HResult<()> {
        self.with_lock(|h| h.collect())
    }

    pub fn stats(&self) -> HResult<HeapStats> {
        self.stats_waiting(&mut |wait| wait())
    }

    /// [`Heap::stats`], waiting for the lock inside `around` (see
    /// [`Heap::lock_waiting`]).
    pub fn stats_waiting(&self, around: &mut dyn FnMut(&mut dyn FnMut())) -> HResult<HeapStats> {
        self.with_lock_waiting(around, |h| {
            let d = h.desc();
            Ok(HeapStats {
                chunks: d.nchunks.load(Relaxed),
                heap_words: d.heap_words.load(Relaxed),
                free_words: d.free_words.load(Relaxed),
                live_words: d.live_words.load(Relaxed),
                alloc_since_gc: d.alloc_since_gc.load(Relaxed),
                gcs: d.gcs.load(Relaxed),
                recoveries: d.recoveries.load(Relaxed),
                needs_repair: d.needs_repair.load(Relaxed),
                repaired: d.repaired.load(Relaxed),
                pins: h.count_pins(),
            })
        })
    }

    /// `(needs_repair, repaired)`: structures built on the heap recompute
    /// their own counters when they differ (lock held).
    pub fn repair_state(&self) -> HResult<(u64, u64)> {
        self.local()?;
        let d = self.desc();
        Ok((d.needs_repair.load(Relaxed), d.repaired.load(Relaxed)))
    }

    /// Records that the structures are repaired (lock held): the commit of
    /// a repair.
    pub fn mark_repaired(&self) -> HResult<()> {
        self.local()?;
        let d = self.desc();
        d.repaired.store(d.needs_repair.load(Relaxed), Relaxed);
        Ok(())
    }

    /// A multi-line description: the root, chunks, free lists and
    /// counters.
    pub fn debug_info(&self) -> String {
        self.debug_info_waiting(&mut |wait| wait())
    }

    /// [`Heap::debug_info`], waiting for the lock inside `around` (see
    /// [`Heap::lock_waiting`]).
    pub fn debug_info_waiting(&self, around: &mut dyn FnMut(&mut dyn FnMut())) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "pool = {}", self.pool.base() as u64);
        let _ = writeln!(s, "value = @0x{:x}", self.root());
        let r = self.with_lock_waiting(around, |h| {
            let d = h.desc();
            for (i, r) in h.ranges().iter().enumerate() {
                let _ = writeln!(
                    s,
                    "chunk[{i}] = @0x{:x}, words {}",
                    h.base() + r.area,
                    r.words
                );
            }
            for c in 0..=SMALL_WORDS {
                let head = d.free_heads[c].load(Relaxed);
                if head != 0 {
                    let _ = writeln!(s, "fl[{c}] = @0x{:x}", h.base() + head);
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            let _ = writeln!(s, "error = {e}");
        }
        if let Ok(st) = self.stats_waiting(around) {
            let _ = writeln!(s, "{st:?}");
        }
        s
    }

    /// Whether the address `v` is a block inside this heap's areas.
    pub fn contains(&self, v: u64) -> HResult<bool> {
        self.with_lock(|h| {
            Ok(h.find_chunk(v.wrapping_sub(h.base()).wrapping_sub(8))
                .is_some())
        })
    }

    /// Gives every block of the heap back to the pool. The state is set
    /// first (the commit): any later use of any handle fails with
    /// `Destroyed`; a process dying at any step leaves a heap that a
    /// second `destroy` finishes, freeing each block exactly once.
    ///
    /// Steps and what a death after each leaves (crash points `HeapDestroy*`):
    /// 1. state := DESTROYING under the heap lock (`HeapDestroyCommitted`);
    /// 2. for each extension chunk, last first: drop it from the table,
    ///    then free it (`HeapDestroyChunkForgotten` between the two: an
    ///    orphan chunk, owned by nobody, with our nonce, which the next
    ///    destroy's orphan scan frees; listed nowhere, so never freed twice);
    /// 3. record the first block's pool word (its identity: a re-allocation
    ///    of the same pages has another generation) in `first_word`
    ///    (`HeapDestroyChunksFreed`), release the lock
    ///    (`HeapDestroyUnlocked`), free the first block *from that word*:
    ///    of two destroyers (one resuming after a death, or two racing), the
    ///    pool lets exactly one free succeed, and a block freed and
    ///    allocated again by someone else is never freed by a late one
    ///    (the recorded word no longer matches: `Destroyed`).
    ///
    /// The lock is in the first block, so that block is freed only after
    /// the lock is released (a robust mutex still held would be on the
    /// thread's robust list, which the kernel walks at its exit).
    pub fn destroy(&self) -> HResult<()> {
        use crate::crashpoint::{hit, CrashPoint as P};
        let d = self.desc();
        let stale = || {
            d.magic.load(Acquire) != HEAP_MAGIC
                || d.nonce[0].load(Relaxed) != self.nonce0.load(Relaxed)
                || self.first_block_gone()
        };
        if stale() {
            return Err(HeapError::Destroyed);
        }
        if self.held() {
            return Err(HeapError::InUse);
        }
        let how = hlock::acquire(&d.lock)?;
        let died = how == crate::lock::Acquired::OwnerDied;
        if died {
            hlock::mark_consistent(&d.lock);
        }
        // Another destroy may have finished while this one waited: only
        // one that finds the heap live, or half destroyed by a dead
        // destroyer (state DESTROYING, first block still the same
        // allocation), frees it.
        if stale() {
            hlock::release(&d.lock);
            return Err(HeapError::Destroyed);
        }
        let resumed = d.state.load(Acquire) != STATE_LIVE;
        d.state.store(STATE_DESTROYING, Release);
        hit(P::HeapDestroyCommitted);
        if resumed || died {
            // A holder killed inside `remove_chunk` (between the entry
            // move and the count store) leaves one chunk listed twice:
            // freeing both entries would free it twice (the second free
            // fails, or frees the block of whoever the pool gave it to in
            // between). Recovery's table pass drops the duplicate (and
            // entries that are not chunks of ours); idempotent.
            self.sanitize_chunk_table();
        }
        let first = d.first_chunk.load(Relaxed);
        let n = (d.nchunks.load(Relaxed) as usize).min(MAX_CHUNKS);
        let mut r = Ok(());
        for i in (0..n).rev() {
            let off = d.chunks[i].offset.load(Relaxed);
            // Forgotten before it is freed: a death between the two leaves
            // an orphan for the next destroy's scan, never a chunk the
            // table still names after the pool reused it.
            d.nchunks.store(i as u64, Release);
            if off != first {
                hit(P::HeapDestroyChunkForgotten);
                if let Err(e) = self.pool.free(off as usize) {
                    r = Err(e.into());
                }
            }
        }
        if resumed || died {
            // A dead holder or destroyer may have left chunks of ours that
            // no table entry names (`recover.rs`, step 4).
            self.free_orphan_chunks();
        }
        let w = match self.pool.block_word(self.desc_off) {
            Ok(w) => w,
            Err(e) => {
                hlock::release(&d.lock);
                return Err(e.into());
            }
        };
        d.first_word.store(w, Release);
        hit(P::HeapDestroyChunksFreed);
        hlock::release(&d.lock);
        hit(P::HeapDestroyUnlocked);
        match self.pool.free_word(self.desc_off, w) {
            Ok(_) => r,
            // Freed by a racing destroyer after our lock release.
            Err(crate::error::Error::NotABlock) => Err(HeapError::Destroyed),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a destroyer already freed the first block: it recorded the
    /// block's pool word and the block is no longer that allocation.
    fn first_block_gone(&self) -> bool {
        let d = self.desc();
        if d.state.load(Acquire) == STATE_LIVE {
            return false;
        }
        let w = d.first_word.load(Acquire);
        w != 0 && self.pool.block_word(self.desc_off) != Ok(w)
    }
}
