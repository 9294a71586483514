//! The OCaml FFI (feature `ocaml-stubs`), used by `ocaml/shmpool`.
//!
//! Two kinds of stub:
//! - **hot path** (alloc, free, size, stats, addr_of): plain `extern "C"`
//!   functions on untagged integers, declared `[@@noalloc]` on the OCaml
//!   side. They return a byte offset (>= 0) or a negative code of
//!   [`crate::error::code`]; the OCaml side builds the bigarray
//!   (`Array1.sub` of the pool's mapping) and raises. Nothing is allocated
//!   on the OCaml heap, rooted or raised from Rust, so these cost a function
//!   call plus the pool operation. Each has a `_byte` twin taking tagged
//!   values, for bytecode.
//! - **cold path** (create, attach, check, owners, ...): plain `extern "C"`
//!   functions too, using ocaml-rs only to build their results. They never
//!   raise either (raising through ocaml-rs leaks its GC roots): a failure
//!   comes back as a negative code or `None`, with the code and message left
//!   in [`LAST`] for the OCaml side to raise.
//!
//! **No panic crosses this boundary.** Every stub runs all of its Rust code,
//! the decoding of its arguments and the building of its result included,
//! inside `catch_unwind`, and turns a panic into the code
//! [`code::INTERNAL`] (or `None`), which the OCaml side raises as `Failure`.
//! ocaml-rs's own panic hook, which raises from inside the hook (before any
//! `catch_unwind` runs, leaving the thread's panic count raised so that the
//! next panic aborts the process), is compiled out (feature
//! `no-panic-hook`); the process keeps the standard hook, which prints the
//! panic's message on stderr.
//!
//! Pools are reached through a process-wide table of handles (small
//! integers), never through raw pointers held by OCaml. A handle is never
//! reused, so a stale one reads as "closed" instead of as another pool.
//!
//! **Blocks outlive `close` safely.** The pool's mapping is handed to OCaml
//! as a bigarray flagged `CAML_BA_MAPPED_FILE` whose proxy (shared by every
//! `Array1.sub` of it, i.e. every block) holds a [`KeepAlive`]: the memory is
//! unmapped only once the pool is closed *and* the GC has finalised the last
//! view of it, so a block used after `close` touches the old pool's pages,
//! never those of a pool mapped later at the same address.

use crate::error::{code, Error};
use crate::mapping::{self, page_size, KeepAlive};
use crate::pool::{CreateOptions, Pool};
use ocaml::sys::bigarray as ba;
use ocaml::{Raw, Runtime, ToValue, Value};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicIsize, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// One open pool: the pool, and for a pool in a caller's bigarray that
/// bigarray, kept reachable (a GC root) for as long as the pool is open so
/// that a GC-managed mapping (e.g. `Unix.map_file`) is not unmapped under
/// it even if OCaml drops every reference to the pool.
struct Entry {
    /// Shared with the heaps opened on it (`ocaml_heap_stubs.rs`), which
    /// keep it alive after `close`.
    pool: std::sync::Arc<Pool>,
    _source: Option<ocaml::root::Root>,
}

const MAX_HANDLES: usize = 1 << 16;
static POOLS: [AtomicPtr<Entry>; MAX_HANDLES] =
    [const { AtomicPtr::new(ptr::null_mut()) }; MAX_HANDLES];
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Code and message of this thread's last failure that carries a
    /// message (read by `shmpool_ml_last_code` and `shmpool_ml_last_error`).
    static LAST: (Cell<isize>, RefCell<String>) =
        const { (Cell::new(0), RefCell::new(String::new())) };
}

/// Records `code` and `msg` for the OCaml side. Never panics (a thread
/// being torn down, or a re-entrant borrow, just loses the message).
pub(crate) fn set_last(code: isize, msg: String) {
    let _ = LAST.try_with(|(c, m)| {
        c.set(code);
        if let Ok(mut m) = m.try_borrow_mut() {
            *m = msg;
        }
    });
}

/// The code of `e`, recording its message when the OCaml side shows it.
/// The common hot-path failures (out of memory, bad size, not a block)
/// have fixed messages: recording them would cost an allocation each.
fn fail(e: Error) -> isize {
    if matches!(
        e,
        Error::NotAPool(_) | Error::Corrupt(_) | Error::Io(..) | Error::BadName(_)
    ) {
        set_last(e.code(), e.to_string());
    } else {
        set_last(e.code(), String::new());
    }
    e.code()
}

fn closed() -> isize {
    set_last(code::CLOSED, "pool is closed".into());
    code::CLOSED
}

/// Records a caught panic as an internal error and drops its payload
/// (under `catch_unwind` too: a payload whose `Drop` panics is leaked).
pub(crate) fn note_panic(payload: Box<dyn Any + Send>) -> isize {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
    set_last(code::INTERNAL, format!("internal error: {msg}"));
    code::INTERNAL
}

/// Test builds only (feature `crash-points`): makes the next stub that
/// runs panic inside its guard, to prove the guard (see
/// `shmpool_ml_arm_panic`).
#[cfg(feature = "crash-points")]
static PANIC_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[inline(always)]
fn induced_panic_point() {
    #[cfg(feature = "crash-points")]
    if PANIC_ARMED.load(Ordering::Relaxed) && PANIC_ARMED.swap(false, Ordering::Relaxed) {
        panic!("induced by a test");
    }
}

fn register(p: Pool, source: Option<ocaml::root::Root>) -> Result<isize, Error> {
    let h = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
    if h >= MAX_HANDLES {
        return Err(Error::Io(
            "too many pools opened".into(),
            nix::errno::Errno::EMFILE,
        ));
    }
    let e = Entry {
        pool: std::sync::Arc::new(p),
        _source: source,
    };
    POOLS[h].store(Box::into_raw(Box::new(e)), Ordering::Release);
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

/// The pool of handle `h`, shared (for a heap opened on it).
pub(crate) fn pool_arc(h: isize) -> Option<std::sync::Arc<Pool>> {
    let p = POOLS.get(usize::try_from(h).ok()?)?.load(Ordering::Acquire);
    // SAFETY: as in `pool`.
    unsafe { p.as_ref().map(|e| e.pool.clone()) }
}

#[inline]
fn pool(h: isize) -> Option<&'static Pool> {
    let p = POOLS.get(usize::try_from(h).ok()?)?.load(Ordering::Acquire);
    // SAFETY: a non-null entry is a leaked Box<Entry> that stays valid until
    // `shmpool_ml_close` swaps it out. OCaml calls these stubs with the
    // runtime lock held and none of them releases it, so a close cannot run
    // concurrently with a use in the same process.
    unsafe { p.as_ref().map(|e| &*e.pool) }
}

/// Runs a hot-path stub body; a panic becomes [`code::INTERNAL`].
#[inline]
fn guarded(f: impl FnOnce() -> isize) -> isize {
    match catch_unwind(AssertUnwindSafe(|| {
        induced_panic_point();
        f()
    })) {
        Ok(r) => r,
        Err(p) => note_panic(p),
    }
}

#[inline]
fn untag(v: Raw) -> isize {
    v.0 >> 1
}

#[inline]
fn tag(n: isize) -> Raw {
    Raw((n << 1) | 1)
}

/// The `caml_ba_array` of a bigarray value.
///
/// # Safety
/// `v` must be a live OCaml bigarray (a custom block whose data is a
/// `caml_ba_array`), which the OCaml types of the externals guarantee.
#[inline]
unsafe fn ba_struct(v: ocaml::sys::Value) -> *mut ba::Bigarray {
    // SAFETY: the caller's contract: `v` is a custom block, whose data (the
    // `caml_ba_array`) follows its one-word custom-operations pointer.
    unsafe { (v as *mut ocaml::sys::Value).add(1) as *mut ba::Bigarray }
}

/// Data pointer and length of a one-dimensional bigarray value.
///
/// # Safety
/// As for [`ba_struct`].
#[inline]
unsafe fn ba_data(v: ocaml::sys::Value) -> (usize, usize) {
    // SAFETY: the caller's contract: the custom block's data (after its
    // one-word ops pointer) is a live `caml_ba_array` with one dimension.
    unsafe {
        let b = ba_struct(v);
        ((*b).data as usize, *(*b).dim.as_ptr() as usize)
    }
}

/// Offset of the first byte of bigarray `v` within pool `p`, if inside it.
///
/// # Safety
/// As for [`ba_struct`].
#[inline]
unsafe fn offset_in(p: &Pool, v: ocaml::sys::Value) -> Option<usize> {
    // SAFETY: the caller's contract is `ba_data`'s.
    let (data, _) = unsafe { ba_data(v) };
    data.checked_sub(p.base() as usize).filter(|&o| o < p.len())
}

/// A copy of the bytes of an OCaml string (names are bytes, not text).
///
/// # Safety
/// `v` must be an OCaml string. Nothing here allocates on the OCaml heap,
/// so the string cannot move while it is copied.
unsafe fn os_string(v: Raw) -> OsString {
    // SAFETY: the caller's contract: `v` is an OCaml string, `len` bytes
    // long, that cannot move while we copy it (nothing here allocates on
    // the OCaml heap).
    unsafe {
        let len = ocaml::sys::caml_string_length(v.0);
        let bytes = std::slice::from_raw_parts(ocaml::sys::string_val(v.0) as *const u8, len);
        OsStr::from_bytes(bytes).to_owned()
    }
}

// ----- hot path -----------------------------------------------------------

#[no_mangle]
pub extern "C" fn shmpool_ml_alloc(h: isize, bytes: isize) -> isize {
    guarded(|| match (pool(h), usize::try_from(bytes)) {
        (None, _) => closed(),
        (Some(_), Err(_)) => code::BAD_SIZE,
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
        let Some(p) = pool(h) else { return closed() };
        // SAFETY: `mem` has OCaml type `memory` (a char bigarray).
        match unsafe { offset_in(p, mem) } {
            Some(off) => op(p, off).map_or_else(fail, |n| n as isize),
            None => code::NOT_A_BLOCK,
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
        let Some(p) = pool(h) else { return closed() };
        match (addr as usize).checked_sub(p.base() as usize) {
            Some(off) if off < p.len() => p.size(off).map_or_else(fail, |n| n as isize),
            _ => code::NOT_A_BLOCK,
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
        let Some(p) = pool(h) else { return closed() };
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
                return code::BAD_SIZE;
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

/// Address of the first byte of a bigarray (`[@unboxed] nativeint`). Two
/// loads: nothing here can panic, so there is nothing to guard.
#[no_mangle]
pub extern "C" fn shmpool_ml_addr_of(mem: ocaml::sys::Value) -> isize {
    // SAFETY: `mem` has OCaml type `memory` (a char bigarray); reading its
    // header cannot fail or unwind.
    unsafe { ba_data(mem).0 as isize }
}

#[no_mangle]
pub extern "C" fn shmpool_ml_addr_of_byte(mem: Raw) -> Raw {
    // SAFETY: allocating a boxed nativeint with the runtime lock held; the
    // only other value, `mem`, is not used after the allocation.
    Raw(unsafe { ocaml::sys::caml_copy_nativeint(shmpool_ml_addr_of(mem.0)) })
}

/// The code of this thread's last failure (`[@@noalloc]`). Cannot panic
/// (`try_with`, a `Cell` read).
#[no_mangle]
pub extern "C" fn shmpool_ml_last_code(_unit: Raw) -> isize {
    LAST.try_with(|(c, _)| c.get()).unwrap_or(code::INTERNAL)
}

#[no_mangle]
pub extern "C" fn shmpool_ml_last_code_byte(unit: Raw) -> Raw {
    tag(shmpool_ml_last_code(unit))
}

// ----- cold path ----------------------------------------------------------

/// `None`, the panic result of the stubs whose OCaml result is an option.
const NONE: Raw = Raw(ocaml::sys::NONE);

/// Runs a cold stub: everything `f` does (decoding arguments, the work,
/// building the OCaml result with ocaml-rs) happens inside `catch_unwind`.
/// A panic returns `on_panic`, which must be an immediate of the stub's
/// OCaml result type (an int code, `None`, `()`), so that nothing needs
/// allocating after a panic.
pub(crate) fn cold(on_panic: Raw, f: impl FnOnce(&Runtime) -> Raw) -> Raw {
    let r = catch_unwind(AssertUnwindSafe(|| {
        induced_panic_point();
        // SAFETY: OCaml called us, so the runtime is up and we hold its lock.
        f(unsafe { Runtime::recover_handle() })
    }));
    match r {
        Ok(v) => v,
        Err(p) => {
            note_panic(p);
            on_panic
        }
    }
}

/// A cold stub returning an int code (or handle).
fn cold_code(f: impl FnOnce() -> isize) -> Raw {
    cold(tag(code::INTERNAL), |_| tag(f()))
}

/// `Some(v)` as an OCaml value, or `None` after recording `e`.
fn some_or_fail<T: ToValue>(gc: &Runtime, r: Result<T, isize>) -> Raw {
    match r {
        // The Value returned by to_value roots the result; its raw word
        // stays valid after the root is dropped because nothing allocates
        // between here and the return to OCaml.
        Ok(v) => Some(v).to_value(gc).raw(),
        Err(_) => NONE,
    }
}

/// Like `pool`, with the closed-pool failure recorded.
fn open_pool(h: Raw) -> Result<&'static Pool, isize> {
    pool(untag(h)).ok_or_else(closed)
}

/// Module initialisation: sets up boxroot (used by ocaml-rs for roots)
/// before any thread exists. Returns false if that failed.
#[no_mangle]
pub extern "C" fn shmpool_ml_init(_unit: Raw) -> Raw {
    extern "C" {
        fn boxroot_setup() -> bool;
    }
    // SAFETY: called once from the OCaml module initialiser, with the
    // runtime lock held and before any systhread is created.
    let ok = catch_unwind(|| unsafe { boxroot_setup() }).unwrap_or(false);
    Raw(if ok {
        ocaml::sys::TRUE
    } else {
        ocaml::sys::FALSE
    })
}

/// The code called `name` in [`code::ALL`], or 0 if there is none.
#[no_mangle]
pub extern "C" fn shmpool_ml_error_code(name: Raw) -> Raw {
    cold(tag(0), |_| {
        // SAFETY: `name` is an OCaml string (its OCaml type).
        let name = unsafe { os_string(name) };
        let c = code::ALL
            .iter()
            .find(|(n, _)| n.as_bytes() == name.as_bytes());
        tag(c.map_or(0, |&(_, c)| c))
    })
}

/// The message of this thread's last failure (`None` only if even that
/// failed).
#[no_mangle]
pub extern "C" fn shmpool_ml_last_error(_unit: Raw) -> Raw {
    cold(NONE, |gc| {
        let m = LAST.with(|(_, m)| m.borrow().clone());
        some_or_fail(gc, Ok::<_, isize>(m))
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_page_size(_unit: Raw) -> Raw {
    cold_code(|| page_size() as isize)
}

/// Total mapping length of a pool whose payload holds `bytes`, or a code.
#[no_mangle]
pub extern "C" fn shmpool_ml_total_for_payload(bytes: Raw) -> Raw {
    cold_code(|| {
        usize::try_from(untag(bytes))
            .ok()
            .filter(|&b| b > 0)
            .and_then(|b| crate::layout::Geometry::for_payload(b, page_size()))
            .map_or(code::BAD_SIZE, |g| g.total_len as isize)
    })
}

/// A new handle, or a code with the message recorded.
fn handle(r: Result<Pool, Error>, source: Option<ocaml::root::Root>) -> isize {
    r.and_then(|p| register(p, source)).unwrap_or_else(|e| {
        set_last(e.code(), e.to_string());
        e.code()
    })
}

/// `create bytes (name : string option) prefault`: a handle or a code.
#[no_mangle]
pub extern "C" fn shmpool_ml_create(bytes: Raw, name: Raw, prefault: Raw) -> Raw {
    cold_code(|| {
        // SAFETY: `name` is a `string option`: an immediate None or a block
        // whose field 0 is a string.
        let name = unsafe {
            ocaml::sys::is_block(name.0).then(|| os_string(Raw(*ocaml::sys::field(name.0, 0))))
        };
        let opts = CreateOptions {
            name,
            prefault: prefault.0 != ocaml::sys::FALSE,
        };
        match usize::try_from(untag(bytes)) {
            Ok(b) if b > 0 => handle(Pool::create(b, &opts), None),
            _ => handle(Err(Error::BadSize), None),
        }
    })
}

/// `attach name`: a handle or a code.
#[no_mangle]
pub extern "C" fn shmpool_ml_attach(name: Raw) -> Raw {
    // SAFETY: `name` is an OCaml string (its OCaml type).
    cold_code(|| handle(Pool::attach(unsafe { os_string(name) }), None))
}

/// Opens (`mode = 0`) or formats (1; 2: memory known to be all zeros) a
/// pool in the memory of bigarray `mem`: a handle or a code. The handle
/// roots `mem` until `close`; the OCaml side hands out blocks as
/// sub-arrays of `mem`, which keep it alive after that.
#[no_mangle]
pub extern "C" fn shmpool_ml_in_place(mem: Raw, mode: Raw) -> Raw {
    cold_code(|| {
        // SAFETY: `mem` is a char bigarray (its OCaml type). Its memory
        // stays mapped while the pool uses it: the handle roots `mem` until
        // `close`, after which the Rust side no longer touches the memory
        // (and OCaml's views of it keep `mem`'s mapping alive themselves
        // when the GC manages it). Mode 2 is used only for an object the
        // caller just created (ftruncate'd, so all zeros); the caller
        // formats it once, before any other process uses it.
        unsafe {
            let (data, len) = ba_data(mem.0);
            let r = match untag(mode) {
                0 => Pool::attach_in_place(data as *mut u8, len),
                m => Pool::format_in_place(data as *mut u8, len, m == 2),
            };
            match r {
                Ok(p) => handle(Ok(p), Some(ocaml::root::Root::new(mem.0))),
                Err(e) => handle(Err(e), None),
            }
        }
    })
}

/// The fork generation (see `owner.rs`) as a one-element int bigarray over
/// the counter itself: the Netmcore shim reads it on every call, with a
/// plain load instead of a C call, to notice that it runs in a child
/// forked since it looked a pool up. `None` only after a panic.
#[no_mangle]
pub extern "C" fn shmpool_ml_fork_generation_cell(_unit: Raw) -> Raw {
    cold(NONE, |gc| {
        let flags =
            ba::Kind::CAML_INT as i32 | ba::Layout::C_LAYOUT as i32 | ba::Managed::EXTERNAL as i32;
        let p = crate::owner::FORK_GENERATION.as_ptr();
        // SAFETY: a static (never freed) 8-byte-aligned counter read as one
        // OCaml `int` element (an i64 on 64-bit); EXTERNAL: the GC never
        // frees it. OCaml only reads it; the fork hook writes it in the
        // child before any OCaml code runs there. Value::new roots the
        // array before `Some` is allocated.
        let v = unsafe {
            Value::new(ba::caml_ba_alloc_dims(
                flags,
                1,
                p.cast(),
                1 as ocaml::sys::Intnat,
            ))
        };
        some_or_fail(gc, Ok::<_, isize>(v))
    })
}

/// `struct caml_ba_proxy` of caml/bigarray.h (refcount, data, size), with
/// the [`KeepAlive`] of the mapping after it. OCaml's `caml_ba_sub` (and
/// `slice`, `reshape`, `change_layout`) give each new view the proxy of the
/// array it was cut from and increment `refcount`; [`finalize_mapping`]
/// decrements it and drops the whole proxy with the last view.
#[repr(C)]
struct MappingProxy {
    refcount: AtomicIsize,
    data: *mut u8,
    size: usize,
    keep: KeepAlive,
}

/// Custom operations of the mapping and its views: those of OCaml's
/// bigarrays (compare, hash, serialize, ...) with our finaliser.
struct Ops(ocaml::sys::custom_operations);
// SAFETY: a table of function pointers and a static C string, never
// written after initialisation.
unsafe impl Sync for Ops {}
// SAFETY: as for Sync: immutable data, usable from any thread.
unsafe impl Send for Ops {}

extern "C" {
    static caml_ba_ops: ocaml::sys::custom_operations;
}

fn mapping_ops() -> *const ocaml::sys::custom_operations {
    static OPS: OnceLock<Ops> = OnceLock::new();
    &OPS.get_or_init(|| {
        // SAFETY: caml_ba_ops is a constant table exported by the runtime.
        let mut ops = unsafe { caml_ba_ops };
        ops.finalize = Some(finalize_mapping);
        Ops(ops)
    })
    .0
}

/// GC finaliser of the mapping bigarray and of every view cut from it:
/// drops one reference to the proxy; the last one drops the [`KeepAlive`]
/// (which unmaps the memory if the pool is closed too). Runs inside the
/// GC: allocates nothing on the OCaml heap, raises nothing, never unwinds.
unsafe extern "C" fn finalize_mapping(v: ocaml::sys::Value) {
    let _ = catch_unwind(|| {
        // SAFETY: `v` is a bigarray whose custom operations are ours, so
        // its proxy is null or a MappingProxy from `shmpool_ml_mapping`
        // (OCaml only ever copies that pointer into new views, counting
        // them in `refcount`). The GC runs finalisers with the runtime lock
        // held, as are all increments, so `refcount` is exact.
        unsafe {
            let proxy = (*ba_struct(v)).proxy as *mut MappingProxy;
            if proxy.is_null() {
                return;
            }
            // A plain decrement, as OCaml's own increments are: both run
            // under the runtime lock (an atomic read-modify-write would
            // add its cost to every block's collection).
            let n = (*proxy).refcount.load(Ordering::Relaxed) - 1;
            (*proxy).refcount.store(n, Ordering::Relaxed);
            if n == 0 {
                drop(Box::from_raw(proxy));
            }
        }
    });
}

/// The whole mapping of pool `h` as a char bigarray (`Some`), or `None`
/// (code recorded) for a closed handle. Blocks are `Array1.sub`s of it; it
/// and every block keep the mapping alive (see the module doc). A pool in
/// borrowed memory gets an unmanaged view (the OCaml side uses the
/// caller's bigarray for those instead).
#[no_mangle]
pub extern "C" fn shmpool_ml_mapping(h: Raw) -> Raw {
    cold(NONE, |gc| {
        let p = match open_pool(h) {
            Ok(p) => p,
            Err(c) => return some_or_fail::<Value>(gc, Err(c)),
        };
        let (base, len) = (p.base(), p.len());
        let keep = p.keep_alive();
        let managed = if keep.is_some() {
            ba::Managed::MAPPED_FILE
        } else {
            ba::Managed::EXTERNAL
        };
        let flags = ba::Kind::CHAR as i32 | ba::Layout::C_LAYOUT as i32 | managed as i32;
        // SAFETY: `base..base+len` is the pool's live mapping. The new
        // array gets our custom operations and its proxy before anything
        // else can allocate (and so run the GC); from then on the proxy
        // (refcount 1: this array) holds the mapping. Value::new roots the
        // array before `Some` is allocated.
        let v = unsafe {
            let raw = ba::caml_ba_alloc_dims(flags, 1, base.cast(), len as ocaml::sys::Intnat);
            if let Some(keep) = keep {
                *(raw as *mut *const ocaml::sys::custom_operations) = mapping_ops();
                let proxy = Box::new(MappingProxy {
                    refcount: AtomicIsize::new(1),
                    data: base,
                    size: len,
                    keep,
                });
                (*ba_struct(raw)).proxy = Box::into_raw(proxy) as *const ba::BigarrayProxy;
            }
            Value::new(raw)
        };
        some_or_fail(gc, Ok::<_, isize>(v))
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_debug_info(h: Raw) -> Raw {
    cold(NONE, |gc| {
        some_or_fail(gc, open_pool(h).map(|p| p.debug_info()))
    })
}

#[no_mangle]
pub extern "C" fn shmpool_ml_check(h: Raw) -> Raw {
    cold(NONE, |gc| some_or_fail(gc, open_pool(h).map(|p| p.check())))
}

/// `(pid, start_time, alive, pages, blocks)` of one owner slot.
type OwnerRow = (ocaml::Int, ocaml::Int, bool, ocaml::Int, ocaml::Int);

/// One [`OwnerRow`] per owner slot in use.
#[no_mangle]
pub extern "C" fn shmpool_ml_owners(h: Raw) -> Raw {
    cold(NONE, |gc| {
        let r = open_pool(h).and_then(|p| p.owners().map_err(fail));
        let rows = r.map(|v| {
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
                .collect::<Vec<OwnerRow>>()
        });
        some_or_fail(gc, rows)
    })
}

/// `(blocks, pages, [(pid, pages)])`.
#[no_mangle]
pub extern "C" fn shmpool_ml_reclaim_dead(h: Raw) -> Raw {
    cold(NONE, |gc| {
        let r = open_pool(h).and_then(|p| p.reclaim_dead().map_err(fail));
        let r = r.map(|r| {
            (
                r.blocks as ocaml::Int,
                r.pages as ocaml::Int,
                r.owners
                    .iter()
                    .map(|&(pid, pages)| (pid as ocaml::Int, pages as ocaml::Int))
                    .collect::<Vec<_>>(),
            )
        });
        some_or_fail(gc, r)
    })
}

/// 0, or a code with the message recorded.
fn unit_result(r: Result<(), Error>) -> isize {
    r.map_or_else(
        |e| {
            set_last(e.code(), e.to_string());
            e.code()
        },
        |()| 0,
    )
}

#[no_mangle]
pub extern "C" fn shmpool_ml_unlink(h: Raw) -> Raw {
    cold_code(|| match open_pool(h) {
        Ok(p) => unit_result(p.unlink()),
        Err(c) => c,
    })
}

/// Reserves the backing store of the named shm object: its first `len`
/// bytes, or all of it for `len <= 0` (`alloc_really`).
#[no_mangle]
pub extern "C" fn shmpool_ml_prefault_name(name: Raw, len: Raw) -> Raw {
    cold_code(|| {
        let len = usize::try_from(untag(len)).ok().filter(|&l| l > 0);
        // SAFETY: `name` is an OCaml string (its OCaml type).
        let name = unsafe { os_string(name) };
        unit_result(mapping::prefault_named(name, len))
    })
}

/// Gives this process's cached blocks back (0, or a negative code).
#[no_mangle]
pub extern "C" fn shmpool_ml_flush_cache(h: Raw) -> Raw {
    cold_code(|| match open_pool(h) {
        Ok(p) => p.flush_cache().map_or_else(fail, |()| 0),
        Err(c) => c,
    })
}

/// Turns this process's cache on or off (0, or a negative code).
#[no_mangle]
pub extern "C" fn shmpool_ml_set_caching(h: Raw, on: Raw) -> Raw {
    cold_code(|| match open_pool(h) {
        Ok(p) => p
            .set_caching(on.0 != ocaml::sys::FALSE)
            .map_or_else(fail, |()| 0),
        Err(c) => c,
    })
}

/// Drops the pool (unmapping it once no OCaml view of it is left, if this
/// process mapped it) and retires the handle. Idempotent.
#[no_mangle]
pub extern "C" fn shmpool_ml_close(h: Raw) -> Raw {
    cold(Raw(ocaml::sys::UNIT), |_| {
        if let Some(slot) = usize::try_from(untag(h)).ok().and_then(|h| POOLS.get(h)) {
            let p = slot.swap(ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: the pointer came from Box::into_raw in `register`
                // and the swap removed the only other path to it; dropping
                // the source root needs the runtime lock, which we hold.
                drop(unsafe { Box::from_raw(p) });
            }
        }
        Raw(ocaml::sys::UNIT)
    })
}

/// Test builds only (feature `crash-points`): arms crash point `n` (see
/// `crashpoint.rs`; 0 disarms) in this process.
#[cfg(feature = "crash-points")]
#[no_mangle]
pub extern "C" fn shmpool_ml_arm_crash_point(n: Raw) -> Raw {
    let _ = catch_unwind(|| {
        let point = crate::crashpoint::ALL
            .iter()
            .copied()
            .find(|p| *p as isize == untag(n));
        crate::crashpoint::arm(point);
    });
    Raw(ocaml::sys::UNIT)
}

/// Test builds only (feature `crash-points`): the next stub this process
/// runs panics inside its guard (which must turn it into an internal
/// error, not an abort).
#[cfg(feature = "crash-points")]
#[no_mangle]
pub extern "C" fn shmpool_ml_arm_panic(_unit: Raw) -> Raw {
    PANIC_ARMED.store(true, Ordering::Relaxed);
    Raw(ocaml::sys::UNIT)
}

/// Test builds only (feature `crash-points`): every crash point's name and
/// number, in order: the one list the OCaml test library checks its own
/// against (`ocaml/crashtest/crash_point.ml`).
#[cfg(feature = "crash-points")]
#[no_mangle]
pub extern "C" fn shmpool_ml_crash_points(_unit: Raw) -> Raw {
    cold(NONE, |gc| {
        let points: Vec<(String, ocaml::Int)> = crate::crashpoint::ALL
            .iter()
            .map(|&p| (p.name().to_string(), p as ocaml::Int))
            .collect();
        some_or_fail(gc, Ok(points))
    })
}
