//! The cross-process pool lock: a process-shared, robust pthread mutex in
//! the shared header.
//!
//! Robustness is what fixes the original's deadlock: when the holder dies
//! (even by SIGKILL), the kernel walks the dead thread's robust list and
//! marks the mutex; the next `pthread_mutex_lock` returns `EOWNERDEAD` with
//! the lock held. The caller must then repair the data (see
//! `recovery.rs`) and call [`RobustMutex::mark_consistent`] before
//! unlocking; if it dies first, the next locker gets `EOWNERDEAD` again.
//!
//! Holding the lock is a [`LockGuard`] value: `Header::exclusive` asks for
//! one before it lends the lock-protected header fields, so safe code
//! cannot reach them without the lock. A thread that locks again while it
//! holds the lock gets no second guard: glibc makes it wait (or fail).

use crate::error::{Error, Result};
pub use crate::layout::MutexStorage;
use nix::errno::Errno;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;

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

/// A robust mutex living in shared memory (in `storage`, borrowed for
/// `'a`, so the mapping outlives it).
pub struct RobustMutex<'a> {
    m: *mut libc::pthread_mutex_t,
    _storage: PhantomData<&'a MutexStorage>,
}

/// Proof that the calling thread holds a [`RobustMutex`]: what
/// `Header::exclusive` asks for before lending the lock-protected fields.
/// Unlocks when dropped. Not `Send` (it holds a `&RobustMutex`, which is
/// not `Sync`): a pthread mutex must be unlocked by the thread that locked it.
#[must_use = "dropping the guard unlocks"]
pub struct LockGuard<'a> {
    m: &'a RobustMutex<'a>,
}

impl<'a> RobustMutex<'a> {
    /// Views the mutex stored in `storage`.
    pub fn at(storage: &'a MutexStorage) -> Self {
        RobustMutex {
            m: storage.bytes.get().cast(),
            _storage: PhantomData,
        }
    }

    /// Initialises the mutex as process-shared and robust.
    ///
    /// # Safety
    /// Nobody else may use the mutex until this returns (only the creator
    /// calls it, before the pool's magic is published).
    pub unsafe fn init(&self) -> Result<()> {
        // SAFETY: `attr` is a local initialised by pthread_mutexattr_init
        // before use and destroyed after; `self.m` points to 64 writable,
        // suitably aligned bytes that nobody else uses yet (contract above).
        unsafe {
            let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
            check(
                libc::pthread_mutexattr_init(attr.as_mut_ptr()),
                "pthread_mutexattr_init",
            )?;
            let a = attr.as_mut_ptr();
            let r = (|| {
                // Miri (see scripts/miri.sh) runs one process and has
                // neither attribute; its threads stand in for processes.
                #[cfg(not(miri))]
                check(
                    libc::pthread_mutexattr_setpshared(a, libc::PTHREAD_PROCESS_SHARED),
                    "pthread_mutexattr_setpshared",
                )?;
                #[cfg(not(miri))]
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
    pub fn lock(&self) -> Result<(LockGuard<'_>, Acquired)> {
        let how = self.acquire()?;
        Ok((LockGuard { m: self }, how))
    }

    #[inline]
    fn acquire(&self) -> Result<Acquired> {
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
            // SAFETY: `self.m` points into a live mapping (the borrow of
            // `at`) and was initialised by `init` before the pool was
            // published.
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
        #[cfg(miri)]
        {
            // Miri has no clocklock; nobody dies there, so no deadline.
            // SAFETY: as below.
            return match unsafe { libc::pthread_mutex_lock(self.m) } {
                0 => Ok(Acquired::Clean),
                e => Err(Error::Io("pthread_mutex_lock".into(), Errno::from_raw(e))),
            };
        }
        #[allow(unreachable_code)]
        loop {
            let deadline = deadline_after(RECHECK);
            // SAFETY: `self.m` points into a live mapping (the borrow in `at`)
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
        // Miri keeps its own data in the mutex's bytes.
        if cfg!(miri) {
            return false;
        }
        // SAFETY: `self.m` points to an initialised mutex in a live mapping;
        // an atomic load of its first 4 bytes (4-byte aligned, inside the
        // object) races with nothing unsound.
        unsafe { (*(self.m as *const std::sync::atomic::AtomicI32)).load(Ordering::Relaxed) != 0 }
    }

    /// Declares the protected data repaired after `Acquired::OwnerDied`.
    /// Meant for the current holder (anyone else gets `EINVAL`, ignored).
    pub fn mark_consistent(&self) {
        // SAFETY: as in `acquire`.
        unsafe {
            libc::pthread_mutex_consistent(self.m);
        }
    }
}

impl LockGuard<'_> {
    /// Whether this guard holds the mutex stored in `storage`.
    #[inline]
    pub fn guards(&self, storage: &MutexStorage) -> bool {
        std::ptr::eq(self.m.m, storage.bytes.get().cast())
    }

    /// Unlocks: what dropping the guard does, but spelled out without the
    /// drop glue, which measurably slowed the locked path (~3 ns of ~36
    /// per alloc; `Pool::locked` unlocks this way).
    #[inline]
    pub fn unlock(self) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: as in `acquire`; the guard exists only while this thread
        // holds the mutex, and `me` is not dropped (so unlocks once).
        unsafe {
            libc::pthread_mutex_unlock(me.m.m);
        }
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as in `acquire`; the guard exists only while this thread
        // holds the mutex.
        unsafe {
            libc::pthread_mutex_unlock(self.m.m);
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
