//! The OCaml FFI (feature `ocaml-stubs`), used by `ocaml/shmpool`.
//!
//! Two kinds of stub:
//! - **hot path** (alloc, free, size, stats): plain `extern "C"` functions
//!   on untagged integers, declared `[@@noalloc]` on the OCaml side. They
//!   return a byte offset (>= 0) or a negative [`Error::code`]; the OCaml
//!   side builds the bigarray (`Array1.sub` of the pool's mapping) and
//!   raises. Nothing is allocated, rooted or raised from Rust, so these cost
//!   a function call plus the pool operation. Each has a `_byte` twin taking
//!   tagged values, for bytecode.
//! - **cold path** (create, attach, debug_info, owners, ...): ocaml-rs
//!   `#[ocaml::func]`. They never raise either (raising through ocaml-rs
//!   leaks its GC roots): failures come back as `(code, message)`.
//!
//! No panic crosses this boundary: every stub body runs in `catch_unwind`.
//!
//! Pools are reached through a process-wide table of handles (small
//! integers), never through raw pointers held by OCaml. A handle is never
//! reused, so a stale one reads as "closed" instead of as another pool.

use crate::error::Error;
use crate::mapping::{self, page_size};
use crate::pool::{CreateOptions, Pool};
use ocaml::sys::bigarray as ba;
use ocaml::{Raw, Value};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

const MAX_HANDLES: usize = 1 << 16;
static POOLS: [AtomicPtr<Pool>; MAX_HANDLES] =
    [const { AtomicPtr::new(ptr::null_mut()) }; MAX_HANDLES];
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(0);

/// Error code for a closed or unknown handle.
const CLOSED: isize = -7;
/// Error code for a panic caught at the boundary.
const PANIC: isize = -8;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn fail(e: Error) -> isize {
    if matches!(e, Error::NotAPool(_) | Error::Corrupt(_) | Error::Io(..)) {
        LAST_ERROR.with(|l| *l.borrow_mut() = e.to_string());
    }
    e.code()
}

fn register(p: Pool) -> Result<isize, Error> {
    let h = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
    if h >= MAX_HANDLES {
        return Err(Error::Io(
            "too many pools opened".into(),
            nix::errno::Errno::EMFILE,
        ));
    }
    POOLS[h].store(Box::into_raw(Box::new(p)), Ordering::Release);
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe {
            libc::atexit(flush_all_at_exit);
        }
    });
    Ok(h as isize)
}

/// Gives this process's cached blocks of every open pool back. Registered
/// both with C `atexit` and, by `Shmpool`, with OCaml's `at_exit` (Netmcore
/// workers run the latter but leave with `_exit`).
#[no_mangle]
pub extern "C" fn shmpool_ml_flush_all(_unit: Raw) -> Raw {
    flush_all_at_exit();
    Raw(ocaml::sys::UNIT)
}

/// At a normal exit (OCaml's `exit`, not `Unix._exit` or a signal), give
/// this process's cached blocks back, so that pools do not keep them until
/// someone calls `reclaim_dead`.
extern "C" fn flush_all_at_exit() {
    let _ = catch_unwind(|| {
        let n = NEXT_HANDLE.load(Ordering::Relaxed).min(MAX_HANDLES);
        for h in 0..n {
            if let Some(p) = pool(h as isize) {
                let _ = p.flush_cache();
            }
        }
    });
}

#[inline]
fn pool(h: isize) -> Option<&'static Pool> {
    let p = POOLS.get(usize::try_from(h).ok()?)?.load(Ordering::Acquire);
    // SAFETY: a non-null entry is a leaked Box<Pool> that stays valid until
    // `shmpool_ml_close` swaps it out. OCaml calls these stubs with the
    // runtime lock held and none of them releases it, so a close cannot run
    // concurrently with a use in the same process.
    unsafe { p.as_ref() }
}

#[inline]
fn guarded(f: impl FnOnce() -> isize) -> isize {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(PANIC)
}

#[inline]
fn untag(v: Raw) -> isize {
    v.0 >> 1
}

#[inline]
fn tag(n: isize) -> Raw {
    Raw((n << 1) | 1)
}

/// Data pointer and length of a bigarray value.
///
/// # Safety
/// `v` must be a live OCaml bigarray (a custom block whose data is a
/// `caml_ba_array`), which the OCaml types of the externals guarantee.
#[inline]
unsafe fn ba_data(v: ocaml::sys::Value) -> (usize, usize) {
    // SAFETY: the caller's contract: the custom block's data (after its
    // one-word ops pointer) is a live `caml_ba_array` with one dimension.
    unsafe {
        let b = (v as *const ocaml::sys::Value).add(1) as *const ba::Bigarray;
        ((*b).data as usize, *(*b).dim.as_ptr() as usize)
    }
}

/// Offset of the first byte of bigarray `v` within pool `p`, if inside it.
///
/// # Safety
/// As for [`ba_data`].
#[inline]
unsafe fn offset_in(p: &Pool, v: ocaml::sys::Value) -> Option<usize> {
    // SAFETY: the caller's contract is `ba_data`'s.
    let (data, _) = unsafe { ba_data(v) };
    data.checked_sub(p.base() as usize).filter(|&o| o < p.len())
}

// ----- hot path -----------------------------------------------------------

#[no_mangle]
pub extern "C" fn shmpool_ml_alloc(h: isize, bytes: isize) -> isize {
    guarded(|| match (pool(h), usize::try_from(bytes)) {
        (None, _) => CLOSED,
        (Some(_), Err(_)) => Error::BadSize.code(),
        (Some(p), Ok(n)) => p.alloc(n).map_or_else(fail, |o| o as isize),
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_alloc_byte(h: Raw, bytes: Raw) -> Raw {
    tag(shmpool_ml_alloc(untag(h), untag(bytes)))
}

/// Runs `op` on the offset of bigarray `mem` in pool `h`; the result in
/// bytes, or an error code.
#[inline]
fn on_block(
    h: isize,
    mem: ocaml::sys::Value,
    op: impl FnOnce(&Pool, usize) -> Result<usize, Error>,
) -> isize {
    guarded(|| {
        let Some(p) = pool(h) else { return CLOSED };
        // SAFETY: `mem` has OCaml type `memory` (a char bigarray).
        match unsafe { offset_in(p, mem) } {
            Some(off) => op(p, off).map_or_else(fail, |n| n as isize),
            None => Error::NotABlock.code(),
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_free(h: isize, mem: ocaml::sys::Value) -> isize {
    on_block(h, mem, Pool::free)
}

#[no_mangle]
pub extern "C" fn shmpool_ml_free_byte(h: Raw, mem: Raw) -> Raw {
    tag(shmpool_ml_free(untag(h), mem.0))
}

#[no_mangle]
pub extern "C" fn shmpool_ml_size(h: isize, mem: ocaml::sys::Value) -> isize {
    on_block(h, mem, Pool::size)
}

#[no_mangle]
pub extern "C" fn shmpool_ml_size_byte(h: Raw, mem: Raw) -> Raw {
    tag(shmpool_ml_size(untag(h), mem.0))
}

#[no_mangle]
pub extern "C" fn shmpool_ml_size_at_addr(h: isize, addr: isize) -> isize {
    guarded(|| {
        let Some(p) = pool(h) else { return CLOSED };
        match (addr as usize).checked_sub(p.base() as usize) {
            Some(off) if off < p.len() => p.size(off).map_or_else(fail, |n| n as isize),
            _ => Error::NotABlock.code(),
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_size_at_addr_byte(h: Raw, addr: Raw) -> Raw {
    // SAFETY: `addr` is a boxed nativeint: a custom block whose data is one
    // machine word, right after the custom-operations pointer.
    let a = unsafe { *(addr.0 as *const isize).add(1) };
    tag(shmpool_ml_size_at_addr(untag(h), a))
}

/// Number of fields `shmpool_ml_stats` fills.
const STATS_FIELDS: usize = 7;

/// Fills `arr` (an OCaml `int array` of at least 7 elements) with
/// total, free, largest, payload, live blocks, page size, recoveries.
#[no_mangle]
pub extern "C" fn shmpool_ml_stats(h: isize, arr: ocaml::sys::Value) -> isize {
    guarded(|| {
        let Some(p) = pool(h) else { return CLOSED };
        let s = p.stats();
        let vals = [
            s.total_bytes,
            s.free_bytes,
            s.largest_free_bytes,
            s.payload_bytes,
            s.live_blocks as usize,
            s.page_size,
            s.recoveries as usize,
        ];
        // SAFETY: `arr` is an OCaml int array; the length check keeps the
        // writes inside it, and storing immediates needs no write barrier.
        unsafe {
            if ocaml::sys::caml_array_length(arr) < STATS_FIELDS {
                return Error::BadSize.code();
            }
            let fields = arr as *mut isize;
            for (i, v) in vals.iter().enumerate() {
                *fields.add(i) = ((*v as isize) << 1) | 1;
            }
        }
        0
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_stats_byte(h: Raw, arr: Raw) -> Raw {
    tag(shmpool_ml_stats(untag(h), arr.0))
}

// ----- cold path ----------------------------------------------------------

extern "C" {
    fn boxroot_setup() -> bool;
}

/// Module initialisation: sets up boxroot (used by ocaml-rs for roots)
/// before any thread exists. Returns false if that failed.
#[no_mangle]
pub extern "C" fn shmpool_ml_init(_unit: Raw) -> Raw {
    // SAFETY: called once from the OCaml module initialiser, with the
    // runtime lock held and before any systhread is created.
    let ok = catch_unwind(|| unsafe { boxroot_setup() }).unwrap_or(false);
    Raw(if ok {
        ocaml::sys::TRUE
    } else {
        ocaml::sys::FALSE
    })
}

fn result(r: Result<Pool, Error>) -> (ocaml::Int, String) {
    match r.and_then(register) {
        Ok(h) => (h, String::new()),
        Err(e) => (e.code(), e.to_string()),
    }
}

fn cold<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

fn panic_pair() -> (ocaml::Int, String) {
    (PANIC, "internal panic".into())
}

#[ocaml::func]
pub fn shmpool_ml_page_size() -> ocaml::Int {
    page_size() as ocaml::Int
}

/// Total mapping length of a pool whose payload holds `bytes` (or -2).
#[ocaml::func]
pub fn shmpool_ml_total_for_payload(bytes: ocaml::Int) -> ocaml::Int {
    usize::try_from(bytes)
        .ok()
        .filter(|&b| b > 0)
        .and_then(|b| crate::layout::Geometry::for_payload(b, page_size()))
        .map_or(Error::BadSize.code(), |g| g.total_len as ocaml::Int)
}

#[ocaml::func]
pub fn shmpool_ml_create(
    bytes: ocaml::Int,
    name: Option<String>,
    prefault: bool,
) -> (ocaml::Int, String) {
    cold(panic_pair(), || {
        let Ok(bytes) = usize::try_from(bytes) else {
            return result(Err(Error::BadSize));
        };
        if bytes == 0 {
            return result(Err(Error::BadSize));
        }
        result(Pool::create(bytes, &CreateOptions { name, prefault }))
    })
}

#[ocaml::func]
pub fn shmpool_ml_attach(name: String) -> (ocaml::Int, String) {
    cold(panic_pair(), || result(Pool::attach(&name)))
}

/// Opens (`mode = 0`) or formats (1; 2: memory known to be all zeros) a
/// pool in the memory of bigarray `mem` (the Netmcore shim: Netmcore mapped
/// it at the same address in every process).
#[ocaml::func]
pub fn shmpool_ml_in_place(mem: Value, mode: ocaml::Int) -> (ocaml::Int, String) {
    cold(panic_pair(), || {
        // SAFETY: `mem` is a char bigarray (its OCaml type); its memory is
        // the Netmcore shm mapping, which stays mapped for the life of the
        // process (Netmcore never unmaps preallocated shm), and the shim
        // formats it once, in the creating process, before any worker
        // starts; mode 2 is used only for an object Netmcore just created
        // (ftruncate'd, so all zeros).
        unsafe {
            let (data, len) = ba_data(mem.raw().0);
            result(match mode {
                0 => Pool::attach_in_place(data as *mut u8, len),
                m => Pool::format_in_place(data as *mut u8, len, m == 2),
            })
        }
    })
}

/// The fork generation (see `owner.rs`) as a one-element int bigarray over
/// the counter itself: the Netmcore shim reads it on every call, with a
/// plain load instead of a C call, to notice that it runs in a child
/// forked since it looked a pool up.
#[ocaml::func]
pub fn shmpool_ml_fork_generation_cell() -> Value {
    let flags =
        ba::Kind::CAML_INT as i32 | ba::Layout::C_LAYOUT as i32 | ba::Managed::EXTERNAL as i32;
    let p = crate::owner::FORK_GENERATION.as_ptr();
    // SAFETY: a static (never freed) 8-byte-aligned counter read as one
    // OCaml `int` element (an i64 on 64-bit); EXTERNAL: the GC never frees
    // it. OCaml only reads it; the fork hook writes it in the child before
    // any OCaml code runs there.
    unsafe {
        Value::new(ba::caml_ba_alloc_dims(
            flags,
            1,
            p.cast(),
            1 as ocaml::sys::Intnat,
        ))
    }
}

/// The whole mapping as an unmanaged char bigarray (the GC never frees or
/// unmaps it); blocks are `Array1.sub`s of it.
#[ocaml::func]
pub fn shmpool_ml_mapping(h: ocaml::Int) -> Value {
    let (base, len) = pool(h).map_or((ptr::null_mut(), 0), |p| (p.base(), p.len()));
    let flags = ba::Kind::CHAR as i32 | ba::Layout::C_LAYOUT as i32 | ba::Managed::EXTERNAL as i32;
    // SAFETY: `base..base+len` is the pool's live mapping (or an empty
    // array); EXTERNAL tells the GC not to free it.
    unsafe {
        Value::new(ba::caml_ba_alloc_dims(
            flags,
            1,
            base.cast(),
            len as ocaml::sys::Intnat,
        ))
    }
}

#[ocaml::func]
pub fn shmpool_ml_last_error() -> String {
    LAST_ERROR.with(|l| l.borrow().clone())
}

#[ocaml::func]
pub fn shmpool_ml_debug_info(h: ocaml::Int) -> String {
    cold(String::new(), || {
        pool(h).map(|p| p.debug_info()).unwrap_or_default()
    })
}

#[ocaml::func]
pub fn shmpool_ml_check(h: ocaml::Int) -> Vec<String> {
    cold(vec!["internal panic".into()], || match pool(h) {
        Some(p) => p.check(),
        None => vec!["pool is closed".into()],
    })
}

/// `(pid, start_time, alive, pages, blocks)` of one owner slot.
type OwnerRow = (ocaml::Int, ocaml::Int, bool, ocaml::Int, ocaml::Int);

/// One [`OwnerRow`] per owner slot in use.
#[ocaml::func]
pub fn shmpool_ml_owners(h: ocaml::Int) -> (ocaml::Int, Vec<OwnerRow>) {
    cold((PANIC, vec![]), || match pool(h).map(|p| p.owners()) {
        None => (CLOSED, vec![]),
        Some(Err(e)) => (fail(e), vec![]),
        Some(Ok(v)) => (
            0,
            v.iter()
                .map(|o| {
                    (
                        o.pid as ocaml::Int,
                        o.start_time as ocaml::Int,
                        o.alive,
                        o.pages as ocaml::Int,
                        o.blocks as ocaml::Int,
                    )
                })
                .collect(),
        ),
    })
}

/// `(code, blocks, pages, [(pid, pages)])`.
#[ocaml::func]
pub fn shmpool_ml_reclaim_dead(
    h: ocaml::Int,
) -> (
    ocaml::Int,
    ocaml::Int,
    ocaml::Int,
    Vec<(ocaml::Int, ocaml::Int)>,
) {
    cold((PANIC, 0, 0, vec![]), || {
        match pool(h).map(|p| p.reclaim_dead()) {
            None => (CLOSED, 0, 0, vec![]),
            Some(Err(e)) => (fail(e), 0, 0, vec![]),
            Some(Ok(r)) => (
                0,
                r.blocks as ocaml::Int,
                r.pages as ocaml::Int,
                r.owners
                    .iter()
                    .map(|&(pid, pages)| (pid as ocaml::Int, pages as ocaml::Int))
                    .collect(),
            ),
        }
    })
}

#[ocaml::func]
pub fn shmpool_ml_unlink(h: ocaml::Int) -> (ocaml::Int, String) {
    cold(panic_pair(), || match pool(h).map(|p| p.unlink()) {
        None => (CLOSED, "pool is closed".into()),
        Some(Ok(())) => (0, String::new()),
        Some(Err(e)) => (e.code(), e.to_string()),
    })
}

#[ocaml::func]
pub fn shmpool_ml_unlink_name(name: String) -> (ocaml::Int, String) {
    cold(panic_pair(), || match mapping::unlink(&name) {
        Ok(()) => (0, String::new()),
        Err(e) => (e.code(), e.to_string()),
    })
}

/// Reserves the backing store of the named shm object: its first `len`
/// bytes, or all of it for `len <= 0` (`alloc_really`).
#[ocaml::func]
pub fn shmpool_ml_prefault_name(name: String, len: ocaml::Int) -> (ocaml::Int, String) {
    let len = usize::try_from(len).ok().filter(|&l| l > 0);
    cold(panic_pair(), || match mapping::prefault_named(&name, len) {
        Ok(()) => (0, String::new()),
        Err(e) => (e.code(), e.to_string()),
    })
}

/// Gives this process's cached blocks back (0, or a negative error code).
#[ocaml::func]
pub fn shmpool_ml_flush_cache(h: ocaml::Int) -> ocaml::Int {
    cold(PANIC, || match pool(h).map(|p| p.flush_cache()) {
        None => CLOSED,
        Some(Ok(())) => 0,
        Some(Err(e)) => fail(e),
    })
}

/// Turns this process's cache on or off (0, or a negative error code).
#[ocaml::func]
pub fn shmpool_ml_set_caching(h: ocaml::Int, on: bool) -> ocaml::Int {
    cold(PANIC, || match pool(h).map(|p| p.set_caching(on)) {
        None => CLOSED,
        Some(Ok(())) => 0,
        Some(Err(e)) => fail(e),
    })
}

#[ocaml::func]
pub fn shmpool_ml_name(h: ocaml::Int) -> Option<String> {
    pool(h).and_then(|p| p.name().map(String::from))
}

/// Unmaps the pool (if this process mapped it) and retires the handle.
#[ocaml::func]
pub fn shmpool_ml_close(h: ocaml::Int) {
    if let Some(slot) = usize::try_from(h).ok().and_then(|h| POOLS.get(h)) {
        let p = slot.swap(ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: the pointer came from Box::into_raw in `register` and
            // the swap removed the only other path to it.
            cold((), || drop(unsafe { Box::from_raw(p) }));
        }
    }
}

/// Address of the first byte of a bigarray, as a nativeint.
#[ocaml::func]
pub fn shmpool_ml_addr_of(mem: Value) -> Value {
    // SAFETY: `mem` is a char bigarray (its OCaml type).
    let (data, _) = unsafe { ba_data(mem.raw().0) };
    // SAFETY: allocating a boxed nativeint with the runtime lock held.
    unsafe { Value::nativeint(data as isize) }
}

/// Test builds only (feature `crash-points`): arms crash point `n` (see
/// `crashpoint.rs`; 0 disarms) in this process.
#[cfg(feature = "crash-points")]
#[no_mangle]
pub extern "C" fn shmpool_ml_arm_crash_point(n: Raw) -> Raw {
    let point = crate::crashpoint::ALL
        .iter()
        .copied()
        .find(|p| *p as isize == untag(n));
    crate::crashpoint::arm(point);
    Raw(ocaml::sys::UNIT)
}
