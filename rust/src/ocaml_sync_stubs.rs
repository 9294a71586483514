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
//!   mutex was taken over from a dead owner), then a robust,
//!   process-shared `pthread_mutex_t` at offset 16.
//! - semaphore and condition (`SYNC_BYTES`): magic, `u32` value or
//!   sequence number, `u32` waiters, each reached through atomics and
//!   waited on with a futex.
//!
//! Crash safety: a mutex held by a dead thread is given to the next locker
//! by the kernel (robust mutex, `EOWNERDEAD`); we mark it consistent at
//! once, count a recovery in the mutex, and the lock succeeds. A dead
//! waiter of a semaphore or condition leaves at most a stale waiter count,
//! which costs a needless wake-up call, never a lost or blocked one.
//!
//! Every stub catches panics; waiting stubs release the OCaml runtime lock
//! (they touch no OCaml value while waiting: the object is in shared
//! memory outside the OCaml heap).

use ocaml::Raw;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MUTEX_MAGIC: u64 = u64::from_le_bytes(*b"SHMMTX01");
const SEM_MAGIC: u64 = u64::from_le_bytes(*b"SHMSEM01");
const COND_MAGIC: u64 = u64::from_le_bytes(*b"SHMCND01");
const MUTEX_OFF: usize = 16;
/// Bytes of a mutex string.
pub const MUTEX_BYTES: usize = MUTEX_OFF + std::mem::size_of::<libc::pthread_mutex_t>();
/// Bytes of a semaphore or condition string.
pub const SYNC_BYTES: usize = 16;

/// Codes returned to OCaml (negative: errors).
const E_DUMMY: isize = -1;
const E_DEADLOCK: isize = -2;
const E_NOT_OWNER: isize = -3;
const E_AGAIN: isize = -4;
const E_OTHER: isize = -5;
const E_OVERFLOW: isize = -6;

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

fn futex_wake(w: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live, aligned 32-bit word.
    unsafe {
        libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// Initialises a mutex of `kind` (0 normal, 1 error-checking, 2
/// recursive) in the string `s` (MUTEX_BYTES long, no one else using it).
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_init(s: Raw, kind: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        let ty = match untag(kind) {
            0 => libc::PTHREAD_MUTEX_NORMAL,
            1 => libc::PTHREAD_MUTEX_ERRORCHECK,
            _ => libc::PTHREAD_MUTEX_RECURSIVE,
        };
        // SAFETY: attr is a local initialised by pthread_mutexattr_init;
        // the mutex memory is the string's, not in use by anyone yet.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            if libc::pthread_mutexattr_init(&mut attr) != 0 {
                return E_OTHER;
            }
            libc::pthread_mutexattr_settype(&mut attr, ty);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let r = libc::pthread_mutex_init(mutex_ptr(p), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if r != 0 {
                return E_OTHER;
            }
        }
        word(p, 8).store(untag(kind) as u32, Ordering::Relaxed);
        word(p, 12).store(0, Ordering::Relaxed);
        magic(p).store(MUTEX_MAGIC, Ordering::Release);
        0
    })
}

/// Locks; 0, or 1 if taken over from a dead owner (then made consistent).
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_lock(s: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        if magic(p).load(Ordering::Acquire) != MUTEX_MAGIC {
            return E_DUMMY;
        }
        let m = mutex_ptr(p);
        // SAFETY: m is an initialised robust process-shared mutex.
        let mut r = unsafe { libc::pthread_mutex_trylock(m) };
        if r == libc::EBUSY {
            // SAFETY: as above; the mutex is in shared memory, not OCaml's.
            r = blocking(|| unsafe { libc::pthread_mutex_lock(m) });
        }
        match r {
            0 => 0,
            libc::EOWNERDEAD => {
                // SAFETY: we own the mutex now (EOWNERDEAD).
                unsafe { libc::pthread_mutex_consistent(m) };
                word(p, 12).fetch_add(1, Ordering::Relaxed);
                1
            }
            libc::EDEADLK => E_DEADLOCK,
            libc::EAGAIN => E_OVERFLOW,
            _ => E_OTHER,
        }
    })
}

#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_unlock(s: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        if magic(p).load(Ordering::Acquire) != MUTEX_MAGIC {
            return E_DUMMY;
        }
        // SAFETY: an initialised robust mutex (robust mutexes check the
        // owner: EPERM when this thread does not hold it).
        match unsafe { libc::pthread_mutex_unlock(mutex_ptr(p)) } {
            0 => 0,
            libc::EPERM => E_NOT_OWNER,
            _ => E_OTHER,
        }
    })
}

/// Times the mutex was taken over from a dead owner.
#[no_mangle]
pub extern "C" fn shmpool_sync_mutex_recoveries(s: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        if magic(p).load(Ordering::Acquire) != MUTEX_MAGIC {
            return E_DUMMY;
        }
        word(p, 12).load(Ordering::Relaxed) as isize
    })
}

/// Initialises a semaphore (`which` 0) with `value`, or a condition
/// (`which` 1).
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
        if magic(p).swap(0, Ordering::AcqRel) == MUTEX_MAGIC {
            // SAFETY: an initialised mutex nobody may use any more.
            unsafe { libc::pthread_mutex_destroy(mutex_ptr(p)) };
        }
        0
    })
}

fn is(p: *mut u8, m: u64) -> bool {
    magic(p).load(Ordering::Acquire) == m
}

#[no_mangle]
pub extern "C" fn shmpool_sync_sem_post(s: Raw) -> Raw {
    guarded(|| {
        let p = base(s);
        if !is(p, SEM_MAGIC) {
            return E_DUMMY;
        }
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
    guarded(|| {
        let p = base(s);
        if !is(p, SEM_MAGIC) {
            return E_DUMMY;
        }
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
    guarded(|| {
        let p = base(s);
        if !is(p, SEM_MAGIC) {
            return E_DUMMY;
        }
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
        if !is(cp, COND_MAGIC) || !is(mp, MUTEX_MAGIC) {
            return E_DUMMY;
        }
        let seq = word(cp, 8);
        let waiters = word(cp, 12);
        let s0 = seq.load(Ordering::SeqCst);
        waiters.fetch_add(1, Ordering::SeqCst);
        let mx = mutex_ptr(mp);
        // SAFETY: an initialised robust mutex.
        if unsafe { libc::pthread_mutex_unlock(mx) } != 0 {
            waiters.fetch_sub(1, Ordering::SeqCst);
            return E_NOT_OWNER;
        }
        let r = blocking(|| {
            futex_wait(seq, s0);
            waiters.fetch_sub(1, Ordering::SeqCst);
            // SAFETY: as above.
            unsafe { libc::pthread_mutex_lock(mx) }
        });
        match r {
            0 => 0,
            libc::EOWNERDEAD => {
                // SAFETY: we own the mutex (EOWNERDEAD).
                unsafe { libc::pthread_mutex_consistent(mx) };
                word(mp, 12).fetch_add(1, Ordering::Relaxed);
                1
            }
            _ => E_OTHER,
        }
    })
}

/// Wakes one waiter (`all` 0) or every waiter of condition `c`.
#[no_mangle]
pub extern "C" fn shmpool_sync_cond_signal(c: Raw, all: Raw) -> Raw {
    guarded(|| {
        let p = base(c);
        if !is(p, COND_MAGIC) {
            return E_DUMMY;
        }
        let seq = word(p, 8);
        seq.fetch_add(1, Ordering::SeqCst);
        if word(p, 12).load(Ordering::SeqCst) > 0 {
            futex_wake(seq, if untag(all) != 0 { i32::MAX } else { 1 });
        }
        0
    })
}

/// The sizes the OCaml side allocates: mutex (`which` 0) or semaphore /
/// condition.
#[no_mangle]
pub extern "C" fn shmpool_sync_bytes(which: Raw) -> Raw {
    tag(if untag(which) == 0 {
        MUTEX_BYTES as isize
    } else {
        SYNC_BYTES as isize
    })
}
