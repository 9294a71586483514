//! The OCaml FFI of shared heaps (`crate::heap`), used by
//! `Shmpool_heap` (ocaml/shmpool) and through it by
//! `Shmpool_netmcore.Netmcore_heap`.
//!
//! Heaps are reached through a process-wide table of handles (small
//! integers, never reused), each entry holding the heap and a share of its
//! pool (so a heap stays usable, and its memory mapped, after its pool's
//! handle is closed). Entries are never freed: a process opens each heap
//! once (the OCaml side caches the handle), and a destroyed heap's entry
//! only answers "destroyed".
//!
//! Like `ocaml_stubs.rs`: no panic crosses the boundary (every body runs in
//! `catch_unwind`), nothing is raised from Rust. The stubs that return an
//! OCaml value (a heap value) return, on failure, an immediate and leave
//! the code in `LAST` (`shmpool_heap_last_code`); the OCaml side tells
//! them apart with `Obj.is_block` and the code. Except `lock`,
//! `destroy`, `stats` and `debug_info` (which may wait for another holder
//! and then release the runtime lock, and allocate), they neither allocate on the OCaml heap
//! nor release the runtime lock, so they are declared `[@@noalloc]`: a
//! copy-in reads the source graph while nothing can move it.
//!
//! **Values outside the OCaml heap.** A heap's values live in the pool.
//! The runtime must classify the pool as static data and every value
//! there must keep a black header (docs/design-heap.md, 1.2); a pool that
//! is not registered yet (a plain `Shmpool` pool; Netmcore registers its
//! own) is registered with `caml_page_table_add` when a heap is opened on
//! it.

use crate::heap::value::{is_block, VAL_UNIT};
use crate::heap::{Heap, HeapError};
use crate::ocaml_stubs::{cold, note_panic, pool_arc, set_last};
use crate::pool::Pool;
use ocaml::Raw;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;

extern "C" {
    // caml/address_class.h (exported by every 4.x runtime).
    fn caml_page_table_lookup(addr: *mut libc::c_void) -> libc::c_int;
    fn caml_page_table_add(
        kind: libc::c_int,
        start: *mut libc::c_void,
        end: *mut libc::c_void,
    ) -> libc::c_int;
}

/// `In_heap | In_young | In_static_data`.
const IN_VALUE_AREA: libc::c_int = 1 | 2 | 4;
const IN_STATIC_DATA: libc::c_int = 4;

struct Entry {
    /// Borrows `*_pool` (declared after it, so dropped before; entries are
    /// never dropped anyway).
    heap: Heap<'static>,
    _pool: Arc<Pool>,
}

/// Also `max_handles` of ocaml/netmcore/heap.ml (which packs a handle and
/// a pid into one word).
const MAX_HEAPS: usize = 1 << 14;
static HEAPS: [AtomicPtr<Entry>; MAX_HEAPS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; MAX_HEAPS];
static NEXT: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn untag(v: Raw) -> isize {
    v.0 >> 1
}

#[inline]
fn tag(n: isize) -> Raw {
    Raw((n << 1) | 1)
}

#[inline]
fn heap(hh: Raw) -> Option<&'static Heap<'static>> {
    let p = HEAPS
        .get(usize::try_from(untag(hh)).ok()?)?
        .load(Ordering::Acquire);
    // SAFETY: a non-null entry is a leaked Box<Entry>, never freed.
    unsafe { p.as_ref().map(|e| &e.heap) }
}

fn register(heap: Heap<'static>, pool: Arc<Pool>) -> isize {
    let h = NEXT.fetch_add(1, Ordering::Relaxed);
    if h >= MAX_HEAPS {
        return fail(HeapError::NotAHeap("too many heaps opened".into()));
    }
    let e = Box::new(Entry { heap, _pool: pool });
    HEAPS[h].store(Box::into_raw(e), Ordering::Release);
    h as isize
}

/// Records `e` for the OCaml side; returns its code.
fn fail(e: HeapError) -> isize {
    let c = e.code();
    set_last(c, e.to_string());
    c
}

/// Whether `a` is a block of OCaml memory (heap, minor heap, static data,
/// which includes registered pools).
fn is_value(a: u64) -> bool {
    // SAFETY: the lookup only hashes the address.
    unsafe { caml_page_table_lookup(a as *mut libc::c_void) & IN_VALUE_AREA != 0 }
}

/// [`is_value`] remembering the last page found to be OCaml memory: the
/// blocks of a value built at once mostly share pages, and a lookup is a
/// hash probe per block. Valid for one copy (nothing is unmapped or
/// re-registered while a stub runs).
fn page_cached_is_value() -> impl Fn(u64) -> bool {
    let last = std::cell::Cell::new(u64::MAX);
    move |a: u64| {
        let page = a >> 12; // the page table's granularity (4 KiB)
        if page == last.get() {
            return true;
        }
        let ok = is_value(a);
        if ok {
            last.set(page);
        }
        ok
    }
}

/// Registers the pool's mapping as static data unless some of it is
/// classified already (Netmcore pools are, as a whole).
fn register_value_area(p: &Pool) -> Result<(), HeapError> {
    let start = p.base();
    // SAFETY: lookups only hash addresses.
    let known = unsafe {
        caml_page_table_lookup(start.cast()) != 0
            || caml_page_table_lookup(start.add(p.len() - 1).cast()) != 0
    };
    if known {
        return Ok(());
    }
    // SAFETY: registers [start, start+len), our live mapping, which stays
    // mapped while any heap entry holds the pool (entries are never freed).
    let r = unsafe { caml_page_table_add(IN_STATIC_DATA, start.cast(), start.add(p.len()).cast()) };
    if r == 0 {
        Ok(())
    } else {
        Err(HeapError::Pool(crate::Error::OutOfMemory))
    }
}

/// Runs a stub body returning an int code; a panic becomes INTERNAL.
fn guarded(f: impl FnOnce() -> isize) -> Raw {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => tag(r),
        Err(p) => tag(note_panic(p)),
    }
}

/// Runs a stub body returning a heap value; a failure or a panic returns
/// `()` with its code in LAST; an immediate success clears LAST.
fn guarded_value(f: impl FnOnce() -> Result<u64, HeapError>) -> Raw {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            if !is_block(v) {
                set_last(0, String::new());
            }
            Raw(v as isize)
        }
        Ok(Err(e)) => {
            fail(e);
            Raw(VAL_UNIT as isize)
        }
        Err(p) => {
            note_panic(p);
            Raw(VAL_UNIT as isize)
        }
    }
}

fn closed() -> HeapError {
    HeapError::NotAHeap("unknown heap handle".into())
}

/// The code of the last failure of a value-returning stub (0 after an
/// immediate success).
#[no_mangle]
pub extern "C" fn shmpool_heap_last_code(_unit: Raw) -> Raw {
    tag(crate::ocaml_stubs::shmpool_ml_last_code(Raw(
        ocaml::sys::UNIT,
    )))
}

/// Creates a heap of `size` bytes in pool `ph` whose root is a copy of
/// `root`; returns the heap handle or a negative code.
#[no_mangle]
pub extern "C" fn shmpool_heap_create(ph: Raw, size: Raw, root: Raw) -> Raw {
    guarded(|| {
        let Some(pool) = pool_arc(untag(ph)) else {
            return fail(HeapError::Pool(crate::Error::NotAPool("closed".into())));
        };
        let Ok(size) = usize::try_from(untag(size)) else {
            return fail(HeapError::Pool(crate::Error::BadSize));
        };
        // SAFETY: the Arc is stored next to the heap in its entry, which is
        // never freed, so the pool outlives the borrow.
        let p: &'static Pool = unsafe { &*Arc::as_ptr(&pool) };
        if let Err(e) = register_value_area(p) {
            return fail(e);
        }
        let r = Heap::create_with(p, size, |h| {
            h.copy_in(root.0 as u64, false, &page_cached_is_value())
        });
        match r {
            Ok(h) => register(h, pool),
            Err(e) => fail(e),
        }
    })
}

/// Opens the heap at byte offset `off` of pool `ph`: a heap handle or a
/// negative code.
#[no_mangle]
pub extern "C" fn shmpool_heap_open(ph: Raw, off: Raw) -> Raw {
    guarded(|| {
        let Some(pool) = pool_arc(untag(ph)) else {
            return fail(HeapError::Pool(crate::Error::NotAPool("closed".into())));
        };
        let Ok(off) = usize::try_from(untag(off)) else {
            return fail(HeapError::NotAHeap("negative offset".into()));
        };
        // SAFETY: as in shmpool_heap_create.
        let p: &'static Pool = unsafe { &*Arc::as_ptr(&pool) };
        if let Err(e) = register_value_area(p) {
            return fail(e);
        }
        match Heap::attach(p, off) {
            Ok(h) => register(h, pool),
            Err(e) => fail(e),
        }
    })
}

/// Runs `wait` (a wait for the heap lock) with the OCaml runtime lock
/// released, so other threads, maybe the heap lock's holder, can run.
/// The caller holds no OCaml value across the call (a GC may run).
fn releasing_runtime(wait: &mut dyn FnMut()) {
    // SAFETY: we hold the runtime lock (OCaml called us); `wait` touches
    // no OCaml value, and we take the runtime lock back before returning,
    // even if `wait` panics.
    unsafe { ocaml::sys::caml_enter_blocking_section() };
    let r = catch_unwind(AssertUnwindSafe(wait));
    // SAFETY: as above.
    unsafe { ocaml::sys::caml_leave_blocking_section() };
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

/// Locks the heap for this thread: 0, 1 after a recovery, 2 when this
/// thread held it already, or a negative code. Waiting for another holder
/// releases the OCaml runtime lock.
#[no_mangle]
pub extern "C" fn shmpool_heap_lock(hh: Raw) -> Raw {
    guarded(|| {
        let Some(h) = heap(hh) else {
            return fail(closed());
        };
        match h.lock_waiting(&mut releasing_runtime) {
            Ok(i) if i.nested => 2,
            Ok(i) if i.recovered => 1,
            Ok(_) => {
                // An early GC at the start of an outermost lock, when due
                // (`Heap::collect_if_due`); its failure is not this
                // caller's: the allocations that need room collect again.
                let _ = h.collect_if_due();
                0
            }
            Err(e) => fail(e),
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_heap_unlock(hh: Raw) -> Raw {
    guarded(|| {
        if let Some(h) = heap(hh) {
            h.unlock();
        }
        0
    })
}

/// Copies `v` into the heap (lock held); with `share`, parts already in
/// the heap are kept.
#[no_mangle]
pub extern "C" fn shmpool_heap_add(hh: Raw, v: Raw, share: Raw) -> Raw {
    guarded_value(|| {
        let h = heap(hh).ok_or_else(closed)?;
        h.copy_in(v.0 as u64, untag(share) != 0, &page_cached_is_value())
    })
}

/// A block of `wosize` fields and tag `tg` (lock held): fields `()` for a
/// scanned tag, else zero (a float array of zeros).
#[no_mangle]
pub extern "C" fn shmpool_heap_alloc_block(hh: Raw, wosize: Raw, tg: Raw) -> Raw {
    guarded_value(|| {
        let h = heap(hh).ok_or_else(closed)?;
        let n = usize::try_from(untag(wosize)).map_err(|_| crate::Error::BadSize)?;
        let t = u8::try_from(untag(tg)).map_err(|_| crate::Error::BadSize)?;
        h.alloc(n, t)
    })
}

/// A string of `len` zero bytes (lock held).
#[no_mangle]
pub extern "C" fn shmpool_heap_alloc_string(hh: Raw, len: Raw) -> Raw {
    guarded_value(|| {
        let h = heap(hh).ok_or_else(closed)?;
        let len = usize::try_from(untag(len)).map_err(|_| crate::Error::BadSize)?;
        let words = len / 8 + 1;
        let v = h.alloc(words, crate::heap::value::STRING_TAG)?;
        // SAFETY: the block has `words` zeroed fields; the last byte tells
        // OCaml the length (caml_string_length).
        unsafe { *((v as *mut u8).add(words * 8 - 1)) = (words * 8 - 1 - len) as u8 };
        Ok(v)
    })
}

/// The heap's root (no lock; fails once the heap is destroyed).
#[no_mangle]
pub extern "C" fn shmpool_heap_root(hh: Raw) -> Raw {
    guarded_value(|| heap(hh).ok_or_else(closed)?.live_root())
}

/// Keeps `v` alive until the outermost unlock (lock held): `pin`.
#[no_mangle]
pub extern "C" fn shmpool_heap_keep(hh: Raw, v: Raw) -> Raw {
    guarded(
        || match heap(hh).ok_or_else(closed).and_then(|h| h.keep(v.0 as u64)) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
    )
}

/// Sets the heap's root (lock held).
#[no_mangle]
pub extern "C" fn shmpool_heap_set_root(hh: Raw, v: Raw) -> Raw {
    guarded(|| {
        match heap(hh)
            .ok_or_else(closed)
            .and_then(|h| h.set_root(v.0 as u64))
        {
            Ok(()) => 0,
            Err(e) => fail(e),
        }
    })
}

/// Collects the heap (lock held, or taken and released here if free).
#[no_mangle]
pub extern "C" fn shmpool_heap_collect(hh: Raw) -> Raw {
    guarded(|| {
        let Some(h) = heap(hh) else {
            return fail(closed());
        };
        if !h.is_locked_by_me() {
            return fail(HeapError::NotLocked);
        }
        match h.gc() {
            Ok(()) => 0,
            Err(e) => fail(e),
        }
    })
}

/// Pins `v` for this process (lock held): the pin (its address halved, an
/// int for OCaml), 0 when `v` is not a block of this heap (nothing
/// pinned), or a negative code.
#[no_mangle]
pub extern "C" fn shmpool_heap_pin(hh: Raw, v: Raw) -> Raw {
    guarded(|| {
        match heap(hh)
            .ok_or_else(closed)
            .and_then(|h| h.pin_shared(v.0 as u64))
        {
            Ok(p) => (p >> 1) as isize,
            Err(e) => fail(e),
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_heap_unpin(hh: Raw, i: Raw) -> Raw {
    guarded(|| {
        let r = heap(hh)
            .ok_or_else(closed)
            .and_then(|h| h.unpin((untag(i) as u64) << 1));
        match r {
            Ok(()) => 0,
            Err(e) => fail(e),
        }
    })
}

/// Whether `v` is a block of this heap (lock held).
#[no_mangle]
pub extern "C" fn shmpool_heap_contains(hh: Raw, v: Raw) -> Raw {
    guarded(|| {
        let Some(h) = heap(hh) else {
            return fail(closed());
        };
        if !h.is_locked_by_me() {
            return fail(HeapError::NotLocked);
        }
        match h.contains(v.0 as u64) {
            Ok(b) => b as isize,
            Err(e) => fail(e),
        }
    })
}

/// Debug check (lock held): 0, or a field index `k` >= 0 of the first
/// heap block (written to `out.(0)` as an address) whose field points into
/// this process's private OCaml heap; negative code on failure.
#[no_mangle]
pub extern "C" fn shmpool_heap_escape(hh: Raw, out: Raw) -> Raw {
    guarded(|| {
        let Some(h) = heap(hh) else {
            return fail(closed());
        };
        // SAFETY: the lookup only hashes the address.
        let private = |a: u64| unsafe { caml_page_table_lookup(a as *mut libc::c_void) & 3 != 0 };
        match h.first_escape(&private) {
            Ok(None) => 0,
            Ok(Some((block, k, _))) => {
                // SAFETY: `out` is an int array of at least 1 field (the
                // OCaml side allocates it); an int needs no write barrier.
                unsafe { *(out.0 as *mut isize) = ((block as isize >> 1) << 1) | 1 };
                k as isize + 1
            }
            Err(e) => fail(e),
        }
    })
}

/// Words a copy of `v` takes, or a negative code.
#[no_mangle]
pub extern "C" fn shmpool_heap_measure(v: Raw) -> Raw {
    guarded(
        || match crate::heap::copy::measure(v.0 as u64, &page_cached_is_value()) {
            Ok(n) => n as isize,
            Err(e) => fail(e),
        },
    )
}

/// Bytes a heap whose root copy takes `words` words needs.
#[no_mangle]
pub extern "C" fn shmpool_heap_first_block_bytes(words: Raw) -> Raw {
    guarded(|| Heap::first_block_bytes(untag(words).max(0) as usize * 8) as isize)
}

/// 62 bits of the random nonce of the heap this handle was opened on:
/// tells that heap from one created later at the same descriptor.
#[no_mangle]
pub extern "C" fn shmpool_heap_nonce(hh: Raw) -> Raw {
    guarded(|| match heap(hh) {
        Some(h) => (h.nonce() & (u64::MAX >> 2)) as isize,
        None => fail(closed()),
    })
}

/// The heap's descriptor offset.
#[no_mangle]
pub extern "C" fn shmpool_heap_descr(hh: Raw) -> Raw {
    guarded(|| match heap(hh) {
        Some(h) => h.descr() as isize,
        None => fail(closed()),
    })
}

/// `(needs_repair, repaired)` generations (lock held), or a code in both.
#[no_mangle]
pub extern "C" fn shmpool_heap_repair_gen(hh: Raw) -> Raw {
    guarded(
        || match heap(hh).ok_or_else(closed).and_then(|h| h.repair_state()) {
            Ok((need, done)) => (need != done) as isize,
            Err(e) => fail(e),
        },
    )
}

/// Records that the structures were repaired up to the current
/// generation (lock held).
#[no_mangle]
pub extern "C" fn shmpool_heap_repaired(hh: Raw) -> Raw {
    guarded(
        || match heap(hh).ok_or_else(closed).and_then(|h| h.mark_repaired()) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
    )
}

/// Destroys the heap (waits for its lock, releasing the runtime lock).
#[no_mangle]
pub extern "C" fn shmpool_heap_destroy(hh: Raw) -> Raw {
    guarded(|| {
        let Some(h) = heap(hh) else {
            return fail(closed());
        };
        // SAFETY: destroy touches only shared memory and the pool, no
        // OCaml value; the runtime lock is taken back before returning.
        unsafe { ocaml::sys::caml_enter_blocking_section() };
        let r = catch_unwind(AssertUnwindSafe(|| h.destroy()));
        // SAFETY: as above.
        unsafe { ocaml::sys::caml_leave_blocking_section() };
        match r {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => fail(e),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// A multi-line description (allocates an OCaml string). Waits for the
/// heap lock with the runtime lock released.
#[no_mangle]
pub extern "C" fn shmpool_heap_debug_info(hh: Raw) -> Raw {
    use ocaml::ToValue;
    cold(Raw(ocaml::sys::UNIT), |gc| {
        let s = match heap(hh) {
            Some(h) => h.debug_info_waiting(&mut releasing_runtime),
            None => "unknown heap handle".into(),
        };
        s.to_value(gc).raw()
    })
}

/// Heap statistics: `[| chunks; heap_words; free_words; live_words; gcs;
/// recoveries; pins |]`, or `[| code |]` on failure. Waits for the heap
/// lock with the runtime lock released, so the array is allocated after.
#[no_mangle]
pub extern "C" fn shmpool_heap_stats(hh: Raw) -> Raw {
    use ocaml::ToValue;
    cold(Raw(ocaml::sys::UNIT), |gc| {
        let r = heap(hh)
            .ok_or_else(closed)
            .and_then(|h| h.stats_waiting(&mut releasing_runtime));
        let a: Vec<ocaml::Int> = match r {
            Ok(s) => [
                s.chunks,
                s.heap_words,
                s.free_words,
                s.live_words,
                s.gcs,
                s.recoveries,
                s.pins,
            ]
            .iter()
            .map(|&x| x as ocaml::Int)
            .collect(),
            Err(e) => vec![fail(e)],
        };
        // The Value roots the array; its raw word stays valid because
        // nothing allocates between here and the return to OCaml.
        a.to_value(gc).raw()
    })
}
