//! Process-shared, crash-safe synchronisation for
//! `Shmpool_netmcore.Netmcore_mutex`, `Netmcore_sem` and
//! `Netmcore_condition` (feature `ocaml-stubs`).
//!
//! Each object lives in an OCaml string allocated in a shared heap (so it
//! never moves and every worker sees it at the same address); the OCaml
//! side passes the string itself, whose value pointer is its first byte.
//! Layout (every object starts with an 8-byte magic, so a dummy or a
//! destroyed object is told apart):
//!
//! - mutex (`MUTEX_BYTES`): magic, `u32` kind, `u32` recoveries (times the
//!   mutex was taken over from a dead owner), then at offset 16: for an
//!   error-checking or recursive mutex a robust, process-shared
//!   `pthread_mutex_t` (owners are threads); for a normal mutex a binary
//!   semaphore, one `u32` futex word holding the identity of the process
//!   that locked it (0 when free: its pid and a tag of its start time, see
//!   `HOLDER_PID_BITS`) and a "sleepers" bit (anyone may unlock it).
//! - semaphore (`SYNC_BYTES`): magic, `u32` value, `u32` waiters, reached
//!   through atomics and waited on with a futex.
//! - condition (`COND_BYTES`): magic, `u32` sequence number, `u32` futex
//!   waiters, then the list of event-loop waiters (`wait_e`): `u64`
//!   address of the first queued wait entry (0: none) at offset 16, and
//!   the list lock, a robust process-shared `pthread_mutex_t`, at offset
//!   `LIST_LOCK_OFF`.
//! - event wait entry (`ENTRY_HDR` + name): magic, `u64` address of the
//!   next queued entry, `u64` address of the condition it is queued on (0:
//!   none), `u32` state (1 once signalled), `u32` identity of the waiter
//!   that queued it (as a `Normal` mutex's holder word), 4 unused bytes,
//!   `u32` length of the named pipe's path, then the path. Entries are strings of the same heap
//!   (kept alive by their wait set), so addresses are valid in every
//!   worker. Invariant: an entry reachable from a condition's list has
//!   that condition's address in its `cond` field (set before it is
//!   linked, cleared after it is unlinked, both under the list lock), so
//!   freeing an entry (`shmpool_sync_entry_free`) finds the one list it may
//!   be on and unlinks it first: a freed entry is never reachable.
//!
//! Crash safety: a pthread mutex held by a dead thread is given to the next
//! locker by the kernel (robust mutex, `EOWNERDEAD`); we mark it consistent
//! at once, count a recovery in the mutex, and the lock succeeds. A normal
//! mutex whose holder process is gone (or a zombie) is taken over by a
//! sleeping locker, which checks the holder every `HOLDER_CHECK_NS`; also
//! counted as a recovery. A dead
//! waiter of a semaphore or condition leaves at most a stale waiter count,
//! which costs a needless wake-up call, never a lost or blocked one. The
//! event-waiter list changes by single stores (append: the last entry's
//! `next`; removal: one predecessor's `next` or the head), so a process
//! dying inside the list lock leaves a well-formed list; the kernel
//! releases the lock of a dead holder at its death (robust mutex, even if
//! the holder stays an unreaped zombie) and the next locker takes it over. A signal marks an entry and writes its pipe
//! before it unlinks it, all under the list lock, so a signaller dying
//! in between leaves the entry queued for the next signal (see
//! `signal_event_waiters`). A signal whose waiter died (its identity,
//! pid and start tag as for a `Normal` mutex's holder, is dead; or its
//! pipe has no reader any more) goes on to the next waiter, so it is not
//! lost.
//!
//! Every stub catches panics; waiting stubs release the OCaml runtime lock
//! (they touch no OCaml value while waiting: the object is in shared
//! memory outside the OCaml heap).

use ocaml::Raw;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MUTEX_MAGIC: u64 = u64::from_le_bytes(*b"SHMMTX03");
const SEM_MAGIC: u64 = u64::from_le_bytes(*b"SHMSEM01");
const COND_MAGIC: u64 = u64::from_le_bytes(*b"SHMCND03");
const ENTRY_MAGIC: u64 = u64::from_le_bytes(*b"SHMWTE03");
const MUTEX_OFF: usize = 16;
/// Bytes of a mutex string.
pub const MUTEX_BYTES: usize = MUTEX_OFF + std::mem::size_of::<libc::pthread_mutex_t>();
/// Bytes of a semaphore or condition string.
pub const SYNC_BYTES: usize = 16;
/// Offset of a condition's list lock.
const LIST_LOCK_OFF: usize = 24;
/// Bytes of a condition string.
pub const COND_BYTES: usize = LIST_LOCK_OFF + std::mem::size_of::<libc::pthread_mutex_t>();
/// Bytes of an event wait entry before its pipe path.
pub const ENTRY_HDR: usize = 40;
/// Offsets in an event wait entry: next queued entry, condition queued on,
/// state, waiter, path length (just before the path: the OCaml side reads
/// it there).
const ENTRY_NEXT: usize = 8;
const ENTRY_COND: usize = 16;
const ENTRY_STATE: usize = 24;
const ENTRY_WAITER: usize = 28;
const ENTRY_LEN: usize = 36;

/// Test-only staged death (`Shmpool_netmcore.Struct_internal.sync_crash_at`):
/// the process SIGKILLs itself when it reaches the point numbered
/// `CRASH_AT` (0: none), so a test can die exactly between two steps of a
/// signal. One relaxed load per point otherwise.
static CRASH_AT: AtomicU32 = AtomicU32::new(0);
/// A signal has marked its event waiter's entry but not written its pipe.
const CP_SIGNAL_MARKED: u32 = 1;
/// A signal has written its event waiter's pipe but not unlinked it.
const CP_SIGNAL_WRITTEN: u32 = 2;
/// A signal holds the list lock of a condition.
const CP_LIST_LOCKED: u32 = 3;
/// A woken or giving-up event waiter holds the list lock to unlink itself.
const CP_DEQUEUE_LOCKED: u32 = 4;
/// A futex waiter of a condition is counted, its mutex not yet released.
const CP_WAIT_COUNTED: u32 = 5;
/// A futex waiter of a condition woke, its mutex not yet locked again.
const CP_WAIT_WOKEN: u32 = 6;

fn crash_point(n: u32) {
    if CRASH_AT.load(Ordering::Relaxed) == n {
        // SAFETY: getpid and kill have no memory preconditions.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Test-only: makes `Normal` mutex `s` look held by process `pid` started
/// `start_delta` clock ticks after its real start (a `pid` running with
/// another start time: a dead holder whose pid was reused), or by `pid`
/// with an unknown start time if `start_delta` is 0. E_DUMMY if `s` is
/// not a `Normal` mutex, E_OTHER if `pid` does not run.
#[no_mangle]
pub extern "C" fn shmpool_sync_test_set_holder(s: Raw, pid: Raw, start_delta: Raw) -> Raw {
    on(s, MUTEX_MAGIC, |p| {
        if !is_normal(p) {
            return E_DUMMY;
        }
        let pid = untag(pid) as u32;
        let delta = untag(start_delta);
        let start = match crate::owner::start_time_of(pid as i32) {
            Some(t) => t,
            None => return E_OTHER,
        };
        let start = (delta != 0).then(|| start.wrapping_add_signed(delta as i64));
        word(p, MUTEX_OFF).store(identity(pid, start), Ordering::Release);
        0
    })
}

/// Arms crash point `n` (0 disarms) in this process.
#[no_mangle]
pub extern "C" fn shmpool_sync_test_crash_at(n: Raw) -> Raw {
    CRASH_AT.store(untag(n) as u32, Ordering::Relaxed);
    tag(0)
}

/// Codes returned to OCaml (negative: errors).
const E_DUMMY: isize = -1;
const E_DEADLOCK: isize = -2;
const E_NOT_OWNER: isize = -3;
const E_AGAIN: isize = -4;
const E_OTHER: isize = -5;
const E_OVERFLOW: isize = -6;
const E_NOT_LOCKED: isize = -7;

#[inline]
fn untag(v: Raw) -> isize {
    v.0 >> 1
}

#[inline]
fn tag(n: isize) -> Raw {
    Raw((n << 1) | 1)
}

fn guarded(f: impl FnOnce() -> isize) -> Raw {
    tag(catch_unwind(AssertUnwindSafe(f)).unwrap_or(E_OTHER))
}

/// The object's first byte. The OCaml string is a block of a shared heap
/// (or a private dummy) at least as long as the object, 8-aligned.
fn base(s: Raw) -> *mut u8 {
    s.0 as *mut u8
}

fn magic(p: *mut u8) -> &'static AtomicU64 {
    // SAFETY: p is 8-aligned and points to at least 8 bytes that live as
    // long as the object's string (shared memory stays mapped); the word
    // is only accessed atomically by every process.
    unsafe { AtomicU64::from_ptr(p.cast()) }
}

fn word(p: *mut u8, off: usize) -> &'static AtomicU32 {
    // SAFETY: as `magic`; off + 4 is within the object and 4-aligned.
    unsafe { AtomicU32::from_ptr(p.add(off).cast()) }
}

fn mutex_ptr(p: *mut u8) -> *mut libc::pthread_mutex_t {
    // SAFETY: offset within the mutex string (MUTEX_BYTES long).
    unsafe { p.add(MUTEX_OFF).cast() }
}

/// Runs `wait` without the OCaml runtime lock.
fn blocking<T>(wait: impl FnOnce() -> T) -> T {
    // SAFETY: OCaml called us holding the runtime lock; `wait` touches no
    // OCaml heap value; we take the lock back before returning, even if
    // `wait` panics.
    unsafe { ocaml::sys::caml_enter_blocking_section() };
    let r = catch_unwind(AssertUnwindSafe(wait));
    // SAFETY: as above.
    unsafe { ocaml::sys::caml_leave_blocking_section() };
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn futex_wait(w: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT on a live, aligned 32-bit word; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// Sleeps while `w` holds `expected`, at most `ns` nanoseconds; false if
/// the time ran out.
fn futex_wait_for(w: &AtomicU32, expected: u32, ns: i64) -> bool {
    let t = libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    };
    // SAFETY: FUTEX_WAIT on a live, aligned 32-bit word; t is a local
    // relative timeout.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &t as *const libc::timespec,
        )
    };
    !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT))
}

fn futex_wake(w: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live, aligned 32-bit word.
    unsafe {
        libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// Initialises a robust process-shared pthread mutex of type `ty` at `m`
/// (memory of a fresh object nobody uses yet); false on failure.
fn init_robust(m: *mut libc::pthread_mutex_t, ty: libc::c_int) -> bool {
    // SAFETY: attr is a local initialised by pthread_mutexattr_init; the
    // mutex memory is the object's, not in use by anyone yet.
    unsafe {
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        if libc::pthread_mutexattr_init(&mut attr) != 0 {
            return false;
        }
        libc::pthread_mutexattr_settype(&mut attr, ty);
        libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
        libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        let r = libc::pthread_mutex_init(m, &attr);
        libc::pthread_mutexattr_destroy(&mut attr);
        r == 0
    }
}

/// Mutex kinds (the word at offset 8).
const KIND_NORMAL: u32 = 0;

/// Initialises a mutex of `kind` (0 normal, 1 error-checking, 2
/// recursive) in the string `s` (MUTEX_BYTES long, no one else using it).
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_init(s: Raw, kind: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        let kind = untag(kind).clamp(0, 2) as u32;
        if kind == KIND_NORMAL {
            word(p, MUTEX_OFF).store(0, Ordering::Relaxed);
        } else {
            let ty = if kind == 1 {
                libc::PTHREAD_MUTEX_ERRORCHECK
            } else {
                libc::PTHREAD_MUTEX_RECURSIVE
            };
            if !init_robust(mutex_ptr(p), ty) {
                return E_OTHER;
            }
        }
        word(p, 8).store(kind, Ordering::Relaxed);
        word(p, 12).store(0, Ordering::Relaxed);
        magic(p).store(MUTEX_MAGIC, Ordering::Release);
        0
    })
}

fn is_normal(p: *mut u8) -> bool {
    word(p, 8).load(Ordering::Relaxed) == KIND_NORMAL
}

/// Set in a `Normal` mutex's word while a locker may sleep on it.
const SLEEPERS: u32 = 1 << 31;
/// How long a locker of a `Normal` mutex sleeps before it checks whether
/// the holder still lives (a dead holder wakes no one).
const HOLDER_CHECK_NS: i64 = 50_000_000;

// `Normal` mutex: a binary semaphore in one futex word, which holds the
// identity of the process that locked it (0: free), plus SLEEPERS. Anyone
// may unlock it (as OCamlnet's, which has no owner checks). A holder that
// died (even one left an unreaped zombie) is seen by a sleeping locker
// after at most HOLDER_CHECK_NS; the locker swaps its own identity in for
// the dead one with one compare-and-swap, so exactly one locker takes the
// lock over.
//
// Identity: the pid (HOLDER_PID_BITS: Linux pids are below 2^22,
// PID_MAX_LIMIT) and, above it, a tag of the process's start time
// (START_TAG_BITS: a "known" bit and the start time's low 8 bits, in clock
// ticks), all in the one word, so that locking stays one compare-and-swap
// with a cached value. A holder whose pid runs but with another start tag
// is a dead holder whose pid was reused: taken over like a gone one. The
// tag is 8 bits: a reused pid whose process started a multiple of 256
// ticks (2.56 s at 100 Hz) after the dead holder is still taken for the
// holder (then the lock waits for that process's end, as it did for every
// reused pid before). A tag of 0 (start time unreadable) checks the pid only.
const HOLDER_PID_BITS: u32 = 22;
const HOLDER_PID_MASK: u32 = (1 << HOLDER_PID_BITS) - 1;
const START_TAG_KNOWN: u32 = 0x100;

/// The start tag of a process started at `start` (clock ticks since boot).
fn start_tag(start: u64) -> u32 {
    START_TAG_KNOWN | (start & 0xFF) as u32
}

/// The identity word of process `pid` started at `start` (None: unknown).
fn identity(pid: u32, start: Option<u64>) -> u32 {
    (pid & HOLDER_PID_MASK) | (start.map_or(0, start_tag) << HOLDER_PID_BITS)
}

/// Whether the holder `ident` (SLEEPERS cleared) is known to be dead: its
/// pid is gone (or a zombie), or runs with another start tag (reused).
fn holder_dead(ident: u32) -> bool {
    let pid = (ident & HOLDER_PID_MASK) as i32;
    let tag = ident >> HOLDER_PID_BITS;
    match crate::owner::probe(pid) {
        crate::owner::Liveness::Gone => true,
        crate::owner::Liveness::Alive(start) => tag != 0 && start_tag(start) != tag,
        crate::owner::Liveness::Unknown => false,
    }
}

/// This process's identity word (see above), cached per fork generation:
/// `getpid` is a system call (glibc no longer caches it) and the start
/// time is read from /proc, and every `Normal` lock needs the identity.
fn my_pid() -> u32 {
    use std::sync::atomic::AtomicU64;
    // (fork generation << 32) | pid; u64::MAX: not known yet.
    static PID: AtomicU64 = AtomicU64::new(u64::MAX);
    let gen = crate::owner::fork_generation() & 0xFFFF_FFFF;
    let c = PID.load(Ordering::Relaxed);
    if c != u64::MAX && c >> 32 == gen {
        return c as u32;
    }
    // The fork hook bumps the generation in every child, so the pid cached
    // here is looked up again after any fork from now on.
    crate::owner::ensure_fork_hook();
    let gen = crate::owner::fork_generation() & 0xFFFF_FFFF;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let me = identity(pid, crate::owner::start_time_of(pid as i32));
    PID.store(gen << 32 | me as u64, Ordering::Relaxed);
    me
}

/// Tries to lock a `Normal` mutex at once; false if held.
fn normal_try(p: *mut u8) -> bool {
    let me = my_pid();
    word(p, MUTEX_OFF)
        .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Locks a `Normal` mutex, sleeping while it is held (call without the
/// OCaml runtime lock); 0, or 1 if taken over from a dead holder.
fn normal_lock_wait(p: *mut u8) -> isize {
    let w = word(p, MUTEX_OFF);
    let me = my_pid();
    loop {
        let cur = w.load(Ordering::Relaxed);
        if cur == 0 {
            // others may sleep: keep SLEEPERS so our unlock wakes one
            if w.compare_exchange(0, me | SLEEPERS, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return 0;
            }
            continue;
        }
        if cur & SLEEPERS == 0
            && w.compare_exchange(cur, cur | SLEEPERS, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        if futex_wait_for(w, cur | SLEEPERS, HOLDER_CHECK_NS) {
            continue;
        }
        if holder_dead(cur & !SLEEPERS)
            && w.compare_exchange(
                cur | SLEEPERS,
                me | SLEEPERS,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            word(p, 12).fetch_add(1, Ordering::Relaxed);
            return 1;
        }
    }
}

/// Unlocks a `Normal` mutex, whoever locked it; E_NOT_LOCKED if free.
fn normal_unlock(p: *mut u8) -> isize {
    let w = word(p, MUTEX_OFF);
    let old = w.swap(0, Ordering::Release);
    if old == 0 {
        return E_NOT_LOCKED;
    }
    if old & SLEEPERS != 0 {
        futex_wake(w, 1);
    }
    0
}

/// The result of locking a pthread (error-checking or recursive) mutex.
fn pthread_locked(p: *mut u8, r: libc::c_int) -> isize {
    match r {
        0 => 0,
        libc::EOWNERDEAD => {
            // SAFETY: we own the mutex now (EOWNERDEAD).
            unsafe { libc::pthread_mutex_consistent(mutex_ptr(p)) };
            word(p, 12).fetch_add(1, Ordering::Relaxed);
            1
        }
        libc::EDEADLK => E_DEADLOCK,
        libc::EAGAIN => E_OVERFLOW,
        _ => E_OTHER,
    }
}

/// Tries to lock mutex `p` at once: Some(result), or None if it is held
/// by someone else (then `mutex_lock_wait`).
fn mutex_try(p: *mut u8) -> Option<isize> {
    if is_normal(p) {
        return normal_try(p).then_some(0);
    }
    // SAFETY: an initialised robust process-shared mutex.
    match unsafe { libc::pthread_mutex_trylock(mutex_ptr(p)) } {
        libc::EBUSY => None,
        r => Some(pthread_locked(p, r)),
    }
}

/// Locks mutex `p`, waiting as long as it takes (call without the OCaml
/// runtime lock); 0, 1 if taken over from a dead owner, or an error.
fn mutex_lock_wait(p: *mut u8) -> isize {
    if is_normal(p) {
        return normal_lock_wait(p);
    }
    // SAFETY: an initialised robust mutex in shared memory.
    pthread_locked(p, unsafe { libc::pthread_mutex_lock(mutex_ptr(p)) })
}

/// Unlocks mutex `p`: 0, E_NOT_OWNER (a pthread mutex this thread does
/// not hold) or E_NOT_LOCKED (a free `Normal` mutex).
fn mutex_unlock(p: *mut u8) -> isize {
    if is_normal(p) {
        return normal_unlock(p);
    }
    // SAFETY: an initialised robust mutex (robust mutexes check the
    // owner: EPERM when this thread does not hold it).
    match unsafe { libc::pthread_mutex_unlock(mutex_ptr(p)) } {
        0 => 0,
        libc::EPERM => E_NOT_OWNER,
        _ => E_OTHER,
    }
}

/// Locks; 0, or 1 if taken over from a dead owner.
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_lock(s: Raw) -> Raw {
    on(s, MUTEX_MAGIC, |p| {
        match mutex_try(p) {
            Some(r) => r,
            // the mutex is in shared memory, not OCaml's
            None => blocking(|| mutex_lock_wait(p)),
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_unlock(s: Raw) -> Raw {
    on(s, MUTEX_MAGIC, mutex_unlock)
}

/// Times the mutex was taken over from a dead owner.
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_recoveries(s: Raw) -> Raw {
    on(s, MUTEX_MAGIC, |p| {
        word(p, 12).load(Ordering::Relaxed) as isize
    })
}

/// Initialises a semaphore (`which` 0) with `value`, or a condition
/// (`which` 1: `s` is COND_BYTES long).
#[no_mangle]
pub extern "C" fn shmpool_sync_init(s: Raw, which: Raw, value: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        let v = untag(value);
        if !(0..=i32::MAX as isize).contains(&v) {
            return E_OVERFLOW;
        }
        word(p, 8).store(v as u32, Ordering::Relaxed);
        word(p, 12).store(0, Ordering::Relaxed);
        let m = if untag(which) == 0 {
            SEM_MAGIC
        } else {
            dword(p, 16).store(0, Ordering::Relaxed);
            if !init_robust(list_mutex(p), libc::PTHREAD_MUTEX_NORMAL) {
                return E_OTHER;
            }
            COND_MAGIC
        };
        magic(p).store(m, Ordering::Release);
        0
    })
}

/// Makes the object unusable (a dummy).
#[no_mangle]
pub extern "C" fn shmpool_sync_destroy(s: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        match magic(p).swap(0, Ordering::AcqRel) {
            MUTEX_MAGIC if is_normal(p) => 0,
            // SAFETY: an initialised mutex nobody may use any more.
            MUTEX_MAGIC => unsafe { libc::pthread_mutex_destroy(mutex_ptr(p)) },
            // SAFETY: as above.
            COND_MAGIC => unsafe { libc::pthread_mutex_destroy(list_mutex(p)) },
            _ => 0,
        };
        0
    })
}

fn is(p: *mut u8, m: u64) -> bool {
    magic(p).load(Ordering::Acquire) == m
}

extern "C" {
    // caml/address_class.h (exported by every 4.x runtime).
    fn caml_page_table_lookup(addr: *mut libc::c_void) -> libc::c_int;
}

/// Whether `p` lies in this process's own OCaml heap (major or minor):
/// a private copy of an object (`Netmcore_heap.copy`, `deref_c`, ...),
/// which the GC may move. Such a copy is no shared object: a pthread
/// robust mutex there would be put on the thread's robust list at an
/// address the GC then reuses (the next robust lock writes a list pointer
/// into whatever private value lives there), so the stubs that use one
/// treat the copy as a dummy.
fn in_ocaml_heap(p: *mut u8) -> bool {
    // SAFETY: the lookup only hashes the address. In_heap | In_young.
    unsafe { caml_page_table_lookup(p.cast()) & 3 != 0 }
}

/// A pthread-based object (an error-checking or recursive mutex, a
/// condition: its list lock) that must not be used: a private copy.
fn private_pthread_object(p: *mut u8, m: u64) -> bool {
    (m == COND_MAGIC || (m == MUTEX_MAGIC && !is_normal(p))) && in_ocaml_heap(p)
}

/// Runs `f` on object `s` if it carries magic `m` (E_DUMMY otherwise: a
/// dummy or another kind of object), guarded as every stub.
fn on(s: Raw, m: u64, f: impl FnOnce(*mut u8) -> isize) -> Raw {
    guarded(|| {
        let p = base(s);
        if !is(p, m) || private_pthread_object(p, m) {
            return E_DUMMY;
        }
        f(p)
    })
}

#[no_mangle]
pub extern "C" fn shmpool_sync_sem_post(s: Raw) -> Raw {
    on(s, SEM_MAGIC, |p| {
        let v = word(p, 8);
        let mut c = v.load(Ordering::Relaxed);
        loop {
            if c >= i32::MAX as u32 {
                return E_OVERFLOW;
            }
            match v.compare_exchange_weak(c, c + 1, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(x) => c = x,
            }
        }
        if word(p, 12).load(Ordering::SeqCst) > 0 {
            futex_wake(v, 1);
        }
        0
    })
}

fn try_down(v: &AtomicU32) -> bool {
    let mut c = v.load(Ordering::Relaxed);
    while c > 0 {
        match v.compare_exchange_weak(c, c - 1, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(x) => c = x,
        }
    }
    false
}

/// Decrements, waiting while the value is 0 (unless `nonblock`: then
/// E_AGAIN).
#[no_mangle]
pub extern "C" fn shmpool_sync_sem_wait(s: Raw, nonblock: Raw) -> Raw {
    on(s, SEM_MAGIC, |p| {
        let v = word(p, 8);
        if try_down(v) {
            return 0;
        }
        if untag(nonblock) != 0 {
            return E_AGAIN;
        }
        let waiters = word(p, 12);
        blocking(|| {
            waiters.fetch_add(1, Ordering::SeqCst);
            while !try_down(v) {
                futex_wait(v, 0);
            }
            waiters.fetch_sub(1, Ordering::SeqCst);
        });
        0
    })
}

#[no_mangle]
pub extern "C" fn shmpool_sync_sem_getvalue(s: Raw) -> Raw {
    on(s, SEM_MAGIC, |p| {
        word(p, 8).load(Ordering::Relaxed) as isize
    })
}

/// Waits on condition `c`, releasing mutex `m` (held by this thread)
/// meanwhile and locking it again before returning (1 if that lock took it
/// from a dead owner). May wake spuriously, as any condition.
#[no_mangle]
pub extern "C" fn shmpool_sync_cond_wait(c: Raw, m: Raw) -> Raw {
    guarded(|| {
        let cp = base(c);
        let mp = base(m);
        if !is(cp, COND_MAGIC)
            || !is(mp, MUTEX_MAGIC)
            || private_pthread_object(cp, COND_MAGIC)
            || private_pthread_object(mp, MUTEX_MAGIC)
        {
            return E_DUMMY;
        }
        let seq = word(cp, 8);
        let waiters = word(cp, 12);
        let s0 = seq.load(Ordering::SeqCst);
        waiters.fetch_add(1, Ordering::SeqCst);
        crash_point(CP_WAIT_COUNTED);
        let u = mutex_unlock(mp);
        if u != 0 {
            waiters.fetch_sub(1, Ordering::SeqCst);
            return u;
        }
        blocking(|| {
            futex_wait(seq, s0);
            crash_point(CP_WAIT_WOKEN);
            waiters.fetch_sub(1, Ordering::SeqCst);
            mutex_lock_wait(mp)
        })
    })
}

/// Wakes one waiter (`all` 0) or every waiter of condition `c`. Queued
/// event-loop waiters come first (oldest first); a futex waiter is woken
/// by `signal` only when no event waiter could be notified.
#[no_mangle]
pub extern "C" fn shmpool_sync_cond_signal(c: Raw, all: Raw) -> Raw {
    on(c, COND_MAGIC, |p| {
        let all = untag(all) != 0;
        match signal_event_waiters(p, all) {
            None => return E_OTHER,
            Some(true) if !all => return 0,
            Some(_) => {}
        }
        let seq = word(p, 8);
        seq.fetch_add(1, Ordering::SeqCst);
        if word(p, 12).load(Ordering::SeqCst) > 0 {
            futex_wake(seq, if all { i32::MAX } else { 1 });
        }
        0
    })
}

/// Notifies the first queued event waiter that is still alive (every
/// queued waiter if `all`); true if one was notified for this call.
///
/// Invariant: an entry leaves the list only after its pipe was written,
/// and all of it happens under the list lock. So a signaller dying at any
/// step leaves the entry queued: either still unmarked (the signal did not
/// happen), or marked (and perhaps written): the next signal or broadcast
/// finds it again, writes its pipe and unlinks it, without counting it as
/// its own wake-up (a spurious wake-up at worst, never a lost one). The
/// entry is marked before its pipe is written because the waiter accepts a
/// byte only from a marked entry. A waiter woken while its entry is still
/// queued (its signaller died before unlinking) unlinks it itself.
fn signal_event_waiters(p: *mut u8, all: bool) -> Option<bool> {
    let head = dword(p, 16);
    let mut notified = false;
    if !list_lock(p) {
        return None;
    }
    crash_point(CP_LIST_LOCKED);
    loop {
        let a = head.load(Ordering::Acquire);
        if a == 0 {
            break;
        }
        let e = entry(a);
        let left_over = word(e, ENTRY_STATE).swap(1, Ordering::AcqRel) == 1;
        crash_point(CP_SIGNAL_MARKED);
        let len = word(e, ENTRY_LEN).load(Ordering::Relaxed) as usize;
        // SAFETY: the entry string holds len path bytes after its header
        // (written once by shmpool_sync_entry_init, never changed).
        let bytes = unsafe { std::slice::from_raw_parts(e.add(ENTRY_HDR), len) };
        // a dead waiter's pipe may have another reader (a new waiter given
        // the same path): its identity, not the pipe, tells it is gone
        let waiter = word(e, ENTRY_WAITER).load(Ordering::Relaxed);
        let alive = !(waiter != 0 && holder_dead(waiter))
            && std::ffi::CString::new(bytes).is_ok_and(|path| notify(&path));
        crash_point(CP_SIGNAL_WRITTEN);
        // single store: the list stays well-formed if we die here
        head.store(
            dword(e, ENTRY_NEXT).load(Ordering::Acquire),
            Ordering::Release,
        );
        dword(e, ENTRY_COND).store(0, Ordering::Release);
        if alive && !left_over {
            notified = true;
            if !all {
                break;
            }
        }
    }
    list_unlock(p);
    Some(notified)
}

fn dword(p: *mut u8, off: usize) -> &'static AtomicU64 {
    // SAFETY: as `magic`; off + 8 is within the object and 8-aligned.
    unsafe { AtomicU64::from_ptr(p.add(off).cast()) }
}

fn list_mutex(p: *mut u8) -> *mut libc::pthread_mutex_t {
    // SAFETY: offset within the condition string (COND_BYTES long).
    unsafe { p.add(LIST_LOCK_OFF).cast() }
}

/// Takes the list lock of condition `p`, waiting without the OCaml
/// runtime lock (so the caller's stub must not be `noalloc`). A lock whose
/// holder died is taken over: the list is well-formed at every step (see
/// the module doc), so it is marked consistent at once. False if the lock
/// could not be taken (a broken object).
fn list_lock(p: *mut u8) -> bool {
    let m = list_mutex(p);
    // SAFETY: m is an initialised robust process-shared mutex (the
    // condition's magic was checked); it is in shared memory, not OCaml's.
    let mut r = unsafe { libc::pthread_mutex_trylock(m) };
    if r == libc::EBUSY {
        // SAFETY: as above.
        r = blocking(|| unsafe { libc::pthread_mutex_lock(m) });
    }
    match r {
        0 => true,
        libc::EOWNERDEAD => {
            // SAFETY: we own the mutex now (EOWNERDEAD).
            unsafe { libc::pthread_mutex_consistent(m) };
            true
        }
        _ => false,
    }
}

fn list_unlock(p: *mut u8) {
    // SAFETY: held by this thread (list_lock returned true).
    unsafe { libc::pthread_mutex_unlock(list_mutex(p)) };
}

/// The entry at address `a` (a live entry string of the condition's heap:
/// only such addresses are ever stored in the list).
fn entry(a: u64) -> *mut u8 {
    a as usize as *mut u8
}

/// Writes one byte into the named pipe `path` without blocking; false if
/// nobody has it open for reading (its waiter is gone).
fn notify(path: &std::ffi::CStr) -> bool {
    // SAFETY: path is NUL-terminated; the descriptor is ours and closed.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        let b = 1u8;
        let r = libc::write(fd, (&b as *const u8).cast(), 1);
        let full = r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
        libc::close(fd);
        r == 1 || full
    }
}

/// Initialises event wait entry `e` (ENTRY_HDR + path bytes long, fresh)
/// with the pipe path `path` (an OCaml string).
#[no_mangle]
pub extern "C" fn shmpool_sync_entry_init(e: Raw, path: Raw) -> Raw {
    guarded(|| {
        let p = base(e);
        let src = base(path);
        // SAFETY: path is an OCaml string; its length is in its header.
        let len = unsafe { ocaml::sys::caml_string_length(path.0) };
        // SAFETY: e has room for len bytes after its header (allocated so
        // by the OCaml side); src holds len bytes; they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, p.add(ENTRY_HDR), len) };
        dword(p, ENTRY_NEXT).store(0, Ordering::Relaxed);
        dword(p, ENTRY_COND).store(0, Ordering::Relaxed);
        word(p, ENTRY_STATE).store(0, Ordering::Relaxed);
        word(p, ENTRY_WAITER).store(0, Ordering::Relaxed);
        word(p, 32).store(0, Ordering::Relaxed);
        word(p, ENTRY_LEN).store(len as u32, Ordering::Relaxed);
        magic(p).store(ENTRY_MAGIC, Ordering::Release);
        0
    })
}

/// Runs `f(c, e)` on condition `c` and event wait entry `e` (E_DUMMY if
/// either is not one) with `c`'s list of event waiters locked (E_OTHER if
/// that lock cannot be taken), unlocking it after.
fn on_waiter_list(c: Raw, e: Raw, f: impl FnOnce(*mut u8, *mut u8) -> isize) -> Raw {
    guarded(|| {
        let p = base(c);
        let ep = base(e);
        if !is(p, COND_MAGIC) || !is(ep, ENTRY_MAGIC) || private_pthread_object(p, COND_MAGIC) {
            return E_DUMMY;
        }
        if !list_lock(p) {
            return E_OTHER;
        }
        let r = f(p, ep);
        list_unlock(p);
        r
    })
}

/// Queues entry `e` at the end of condition `c`'s event waiters, state 0
/// (not yet signalled). An entry already queued there stays where it is;
/// one still queued on another condition (its waiter died, or gave up
/// without leaving) is unlinked from there first.
#[no_mangle]
pub extern "C" fn shmpool_sync_cond_enqueue(c: Raw, e: Raw) -> Raw {
    let ca = base(c) as usize as u64;
    let ep = base(e);
    if is(ep, ENTRY_MAGIC) {
        let other = dword(ep, ENTRY_COND).load(Ordering::Acquire);
        if other != 0 && other != ca && !detach(ep) {
            return tag(E_OTHER);
        }
    }
    on_waiter_list(c, e, |p, ep| {
        let ea = ep as usize as u64;
        let mut link = dword(p, 16);
        loop {
            let a = link.load(Ordering::Acquire);
            if a == ea {
                word(ep, ENTRY_WAITER).store(my_pid(), Ordering::Relaxed);
                word(ep, ENTRY_STATE).store(0, Ordering::Release);
                break;
            }
            if a == 0 {
                word(ep, ENTRY_WAITER).store(my_pid(), Ordering::Relaxed);
                word(ep, ENTRY_STATE).store(0, Ordering::Release);
                dword(ep, ENTRY_NEXT).store(0, Ordering::Release);
                // the condition is recorded before the entry is reachable
                dword(ep, ENTRY_COND).store(ca, Ordering::Release);
                // single store publishes the entry
                link.store(ea, Ordering::Release);
                break;
            }
            link = dword(entry(a), ENTRY_NEXT);
        }
        0
    })
}

/// Unlinks entry `ep` from the list of condition `p` (whose list lock this
/// thread holds) if it is there; true if it was. Clears the entry's
/// `cond` field if it names `p` (after the unlink: see the module doc).
fn unlink_locked(p: *mut u8, ep: *mut u8) -> bool {
    let ea = ep as usize as u64;
    let mut link = dword(p, 16);
    let mut found = false;
    loop {
        let a = link.load(Ordering::Acquire);
        if a == 0 {
            break;
        }
        if a == ea {
            // single store: the list stays well-formed if we die here
            link.store(
                dword(ep, ENTRY_NEXT).load(Ordering::Acquire),
                Ordering::Release,
            );
            found = true;
            break;
        }
        link = dword(entry(a), ENTRY_NEXT);
    }
    let _ = dword(ep, ENTRY_COND).compare_exchange(
        p as usize as u64,
        0,
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
    found
}

/// Unlinks entry `ep` from whichever condition's list its `cond` field
/// names, under that list's lock; false if that lock could not be taken.
/// A condition that was destroyed has no list any more: the field is just
/// cleared. (The condition must not have been freed: waiting on a
/// condition keeps it alive, as in OCamlnet.)
fn detach(ep: *mut u8) -> bool {
    loop {
        let ca = dword(ep, ENTRY_COND).load(Ordering::Acquire);
        if ca == 0 {
            return true;
        }
        let cp = entry(ca);
        if !is(cp, COND_MAGIC) {
            let _ =
                dword(ep, ENTRY_COND).compare_exchange(ca, 0, Ordering::AcqRel, Ordering::Relaxed);
            continue;
        }
        if !list_lock(cp) {
            return false;
        }
        if dword(ep, ENTRY_COND).load(Ordering::Acquire) == ca {
            unlink_locked(cp, ep);
        }
        list_unlock(cp);
    }
}

/// Frees event wait entry `e`: unlinks it from the list it may still be
/// queued on (its waiter died, or never left), then makes it a dummy, so
/// no list ever reaches its memory once the heap reuses it. 0, or E_OTHER
/// (a list lock that could not be taken: the entry is left as it was).
#[no_mangle]
pub extern "C" fn shmpool_sync_entry_free(e: Raw) -> Raw {
    on(e, ENTRY_MAGIC, |ep| {
        if !detach(ep) {
            return E_OTHER;
        }
        magic(ep).store(0, Ordering::Release);
        0
    })
}

/// Unlinks entry `e` from condition `c`'s event waiters if it is queued
/// there; returns 1 if it was, 0 otherwise.
#[no_mangle]
pub extern "C" fn shmpool_sync_cond_dequeue(c: Raw, e: Raw) -> Raw {
    on_waiter_list(c, e, |p, ep| {
        crash_point(CP_DEQUEUE_LOCKED);
        unlink_locked(p, ep) as isize
    })
}

/// 1 once entry `e` was signalled since it was last queued, else 0.
#[no_mangle]
pub extern "C" fn shmpool_sync_entry_signalled(e: Raw) -> Raw {
    on(e, ENTRY_MAGIC, |p| {
        word(p, ENTRY_STATE).load(Ordering::Acquire) as isize
    })
}

/// The sizes the OCaml side allocates: mutex (`which` 0), semaphore (1),
/// condition (2), header of an event wait entry (3).
#[no_mangle]
pub extern "C" fn shmpool_sync_bytes(which: Raw) -> Raw {
    tag(match untag(which) {
        0 => MUTEX_BYTES,
        1 => SYNC_BYTES,
        2 => COND_BYTES,
        _ => ENTRY_HDR,
    } as isize)
}
