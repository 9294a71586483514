//! The cross-process pool lock: a process-shared, robust pthread mutex in
//! the shared header.
//!
//! Robustness is what fixes the original's deadlock: when the holder dies
//! (even by SIGKILL), the kernel walks the dead thread's robust list and
//! marks the mutex; the next `pthread_mutex_lock` returns `EOWNERDEAD` with
//! the lock held. The caller must then repair the data (see
//! `recovery.rs`) and call [`RobustMutex::mark_consistent`] before
//! unlocking; if it dies first, the next locker gets `EOWNERDEAD` again.

use crate::error::{Error, Result};
use nix::errno::Errno;
use std::cell::UnsafeCell;
use std::sync::atomic::Ordering;

/// Space reserved in the header for the mutex; larger than glibc's
/// `pthread_mutex_t` (40 bytes on x86_64) so the layout stays the same if
/// a libc needs more.
#[repr(C, align(64))]
pub struct MutexStorage {
    bytes: UnsafeCell<[u8; 64]>,
}

const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= 64);

/// Tries before blocking in `lock` (about 2 µs of backoff in all).
const SPIN_ROUNDS: u32 = 16;

/// How long a blocked `lock` sleeps before looking at the lock again.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

extern "C" {
    /// glibc >= 2.30 (not yet in the `libc` crate): `pthread_mutex_timedlock`
    /// on a clock of our choice, so a wall-clock step cannot stretch a wait.
    fn pthread_mutex_clocklock(
        m: *mut libc::pthread_mutex_t,
        clock: libc::clockid_t,
        abstime: *const libc::timespec,
    ) -> libc::c_int;
}

/// `CLOCK_MONOTONIC` now plus `d`, as a timespec.
fn deadline_after(d: std::time::Duration) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    let nsec = ts.tv_nsec as u64 + d.subsec_nanos() as u64;
    ts.tv_sec += d.as_secs() as libc::time_t + (nsec / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (nsec % 1_000_000_000) as libc::c_long;
    ts
}

/// How the lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The previous holder unlocked normally.
    Clean,
    /// The previous holder died holding it: the data may be half-updated.
    OwnerDied,
}

/// A robust mutex living in shared memory.
pub struct RobustMutex {
    m: *mut libc::pthread_mutex_t,
}

impl RobustMutex {
    /// Views the mutex stored in `storage`.
    ///
    /// # Safety
    /// `storage` must stay mapped for the life of the returned value.
    pub unsafe fn at(storage: *const MutexStorage) -> Self {
        RobustMutex {
            m: (*storage).bytes.get().cast(),
        }
    }

    /// Initialises the mutex as process-shared and robust. Only the creator
    /// calls this, before anyone else can see the pool.
    pub fn init(&self) -> Result<()> {
        // SAFETY: `attr` is a local initialised by pthread_mutexattr_init
        // before use and destroyed after; `self.m` points to 64 writable,
        // suitably aligned bytes that nobody else uses yet (the pool is not
        // published until its magic is written, after this).
        unsafe {
            let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
            check(
                libc::pthread_mutexattr_init(attr.as_mut_ptr()),
                "pthread_mutexattr_init",
            )?;
            let a = attr.as_mut_ptr();
            let r = (|| {
                check(
                    libc::pthread_mutexattr_setpshared(a, libc::PTHREAD_PROCESS_SHARED),
                    "pthread_mutexattr_setpshared",
                )?;
                check(
                    libc::pthread_mutexattr_setrobust(a, libc::PTHREAD_MUTEX_ROBUST),
                    "pthread_mutexattr_setrobust",
                )?;
                check(libc::pthread_mutex_init(self.m, a), "pthread_mutex_init")
            })();
            libc::pthread_mutexattr_destroy(a);
            r
        }
    }

    /// Locks, retrying `EINTR` (which Linux does not return for mutexes,
    /// but POSIX allows). `ENOTRECOVERABLE` cannot happen with this crate's
    /// callers (they always mark the mutex consistent before unlocking after
    /// `EOWNERDEAD`) and is reported as corruption.
    ///
    /// glibc's robust mutexes go to sleep in the kernel at once when the
    /// lock is taken; our critical sections last tens of nanoseconds, far
    /// less than a sleep and wake-up, so we first retry for a few
    /// microseconds with exponential backoff (the holder is most likely
    /// running on another core).
    #[inline]
    pub fn lock(&self) -> Result<Acquired> {
        for round in 0..SPIN_ROUNDS {
            // Test before test-and-set: while the lock word reads as taken,
            // wait on our cached copy of its line instead of stealing the
            // line from the holder with a failing trylock.
            if round > 0 && self.looks_locked() {
                for _ in 0..(1u32 << round.min(6)) {
                    std::hint::spin_loop();
                }
                continue;
            }
            // SAFETY: as below.
            match unsafe { libc::pthread_mutex_trylock(self.m) } {
                0 => return Ok(Acquired::Clean),
                libc::EOWNERDEAD => return Ok(Acquired::OwnerDied),
                libc::EBUSY => {
                    for _ in 0..(1u32 << round.min(6)) {
                        std::hint::spin_loop();
                    }
                }
                _ => break, // let the blocking call report it
            }
        }
        // Never sleep without a deadline. glibc's robust mutex can lose a
        // wake-up when processes die: an unlock wakes one sleeper, that
        // sleeper is SIGKILLed before it takes the lock, and a third process
        // takes and releases the free lock meanwhile, clearing the "waiters"
        // bit; the kernel's clean-up at the death wakes nobody then, and any
        // other sleeper would wait forever on a free lock (seen about once in
        // 300 torture trials). With a deadline it looks again after
        // `RECHECK` at worst.
        loop {
            let deadline = deadline_after(RECHECK);
            // SAFETY: `self.m` points into a live mapping (contract of `at`)
            // and was initialised by `init` before the pool was published;
            // `deadline` is a valid timespec on the stack.
            match unsafe { pthread_mutex_clocklock(self.m, libc::CLOCK_MONOTONIC, &deadline) } {
                0 => return Ok(Acquired::Clean),
                libc::EOWNERDEAD => return Ok(Acquired::OwnerDied),
                libc::EINTR | libc::ETIMEDOUT => continue,
                libc::ENOTRECOVERABLE => {
                    return Err(Error::Corrupt("pool lock is not recoverable".into()))
                }
                e => {
                    return Err(Error::Io(
                        "pthread_mutex_clocklock".into(),
                        Errno::from_raw(e),
                    ))
                }
            }
        }
    }

    /// Whether the mutex is held, read without writing to its cache line.
    /// glibc keeps the futex word (owner tid, 0 when free) as the mutex's
    /// first `int` on every architecture; reading it is only a hint.
    #[inline]
    fn looks_locked(&self) -> bool {
        // SAFETY: `self.m` points to an initialised mutex in a live mapping;
        // an atomic load of its first 4 bytes (4-byte aligned, inside the
        // object) races with nothing unsound.
        unsafe { (*(self.m as *const std::sync::atomic::AtomicI32)).load(Ordering::Relaxed) != 0 }
    }

    /// Declares the protected data repaired after `Acquired::OwnerDied`.
    pub fn mark_consistent(&self) {
        // SAFETY: as in `lock`; called only by the current holder.
        unsafe {
            libc::pthread_mutex_consistent(self.m);
        }
    }

    #[inline]
    pub fn unlock(&self) {
        // SAFETY: as in `lock`; called only by the current holder.
        unsafe {
            libc::pthread_mutex_unlock(self.m);
        }
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Io(what.into(), Errno::from_raw(rc)))
    }
}
