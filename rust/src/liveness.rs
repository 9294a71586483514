//! Whether the process behind an owner slot still exists, as the kernel
//! tracks it, across PID namespaces.
//!
//! # Why not `/proc`
//!
//! A pid means something only in one PID namespace. Containers that share
//! `/dev/shm` (hence a pool) but not a PID namespace see each other's pids
//! as absent, or as unrelated processes: judged by `/proc`, a live process
//! of the other container looks dead, and `reclaim_dead`, or a taker of a
//! slot lock, would free or steal what it still uses.
//!
//! # Keepers
//!
//! Each owner slot has a robust, process-shared pthread mutex in the header
//! (its *keeper mutex*, [`KeeperMutex`]). A process registering a slot has
//! a small thread of its own, the *keeper*, lock that mutex and hold it
//! for as long as the process keeps the pool open (`Keeper`). When the
//! process dies, however it dies, the kernel walks the keeper thread's
//! robust list and marks the mutex `FUTEX_OWNER_DIED` in shared memory; that
//! works whatever namespace the reader is in, and no pid is involved. So,
//! reading the mutex's futex word (never locking it):
//!
//! - owner TID set, no `OWNER_DIED`: the keeper holds it, the process lives
//!   (or is stopped: a stopped process is alive);
//! - `OWNER_DIED`: the holder died; nobody has taken the mutex since (a
//!   process given the slot erases the mark under the pool lock before it
//!   publishes its identity, and its keeper takes the mutex once the pool
//!   lock is released, so the mark always speaks of the identity in the
//!   table);
//! - 0: no keeper holds it: the slot is unused, or its process closed the
//!   `Pool` whose keeper held it (it drops its keeper before unmapping;
//!   another `Pool` value of the same pool in that process does not take
//!   over), or could not start a keeper (no thread), or is between
//!   publishing its identity and its keeper taking the mutex (microseconds;
//!   a process killed right then stays without one). Only then does the
//!   old test apply, and only within one PID
//!   namespace: the slot records the namespace of the process that
//!   registered it (the inode of `/proc/self/ns/pid`), and `/proc` is asked
//!   only when it is the reader's; across namespaces the answer is "maybe
//!   alive", so nothing is reclaimed or stolen across them.
//!
//! The keeper blocks every signal, lives on a 64 KiB stack, touches nothing
//! but its mutex and a process-local condition variable, and never calls
//! into OCaml. A forked child has no keeper (threads do not survive
//! `fork`); it registers a slot of its own on first use, with its own
//! keeper (each fork generation registers anew, see `owner.rs`).
//! `execve` also marks the mutex (the kernel walks robust lists then too),
//! correctly: the new program no longer maps the pool.

use crate::error::{Error, Result};
pub use crate::layout::KeeperMutex;
use crate::owner::{self, OwnerIdentity};
use nix::errno::Errno;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a keeper mutex's futex word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperState {
    /// A live thread holds it: its process lives.
    Held,
    /// Its holder died (the kernel marked it).
    OwnerDied,
    /// Nobody holds it: no keeper (see the module doc).
    Unheld,
}

impl KeeperMutex {
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.m.get().cast()
    }

    /// Initialises the mutex as process-shared and robust.
    ///
    /// # Safety
    /// Nobody else may use the mutex until this returns (the creator calls
    /// it before the pool's magic is published).
    pub unsafe fn init(&self) -> Result<()> {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        let a = attr.as_mut_ptr();
        let check = |rc: libc::c_int, what: &str| {
            if rc == 0 {
                Ok(())
            } else {
                Err(Error::Io(what.into(), Errno::from_raw(rc)))
            }
        };
        // SAFETY: `attr` is a local initialised by pthread_mutexattr_init
        // before use and destroyed after; `self.raw()` points to storage of
        // the size and alignment of a pthread_mutex_t that nobody else uses
        // yet (contract above).
        unsafe {
            check(libc::pthread_mutexattr_init(a), "pthread_mutexattr_init")?;
            // Miri (scripts/miri.sh) has neither attribute, and no keepers
            // run there (see `Keeper::spawn`).
            #[cfg(not(miri))]
            let r = check(
                libc::pthread_mutexattr_setpshared(a, libc::PTHREAD_PROCESS_SHARED),
                "pthread_mutexattr_setpshared",
            )
            .and_then(|()| {
                check(
                    libc::pthread_mutexattr_setrobust(a, libc::PTHREAD_MUTEX_ROBUST),
                    "pthread_mutexattr_setrobust",
                )
            });
            #[cfg(miri)]
            let r: Result<()> = Ok(());
            let r = r.and_then(|()| {
                check(
                    libc::pthread_mutex_init(self.raw(), a),
                    "pthread_mutex_init",
                )
            });
            libc::pthread_mutexattr_destroy(a);
            r
        }
    }

    /// Erases a dead holder's mark (taking the mutex and giving it back at
    /// once), so that a slot given to a process without a keeper does not
    /// read as dead. The caller holds the pool lock (nobody else locks a
    /// keeper mutex but its keeper, and a keeper only a free mutex, which
    /// this one then is again). False if a live thread holds it.
    pub(crate) fn clear_mark(&self) -> bool {
        // SAFETY: an initialised keeper mutex in our live mapping; this
        // thread unlocks it right after taking it.
        unsafe {
            match libc::pthread_mutex_trylock(self.raw()) {
                0 => {}
                libc::EOWNERDEAD => {
                    libc::pthread_mutex_consistent(self.raw());
                }
                _ => return false,
            }
            libc::pthread_mutex_unlock(self.raw());
        }
        true
    }

    /// Reads the futex word (glibc keeps it as the mutex's first `int` on
    /// every architecture; its bits are the kernel's robust-futex ABI: the
    /// holder's TID, `FUTEX_WAITERS`, `FUTEX_OWNER_DIED`). One load; never
    /// takes the mutex, so a reader can neither block nor be mistaken for
    /// a holder.
    #[inline]
    pub fn state(&self) -> KeeperState {
        // Miri keeps its own data in a mutex's bytes, and runs no keepers.
        if cfg!(miri) {
            return KeeperState::Unheld;
        }
        // SAFETY: the mutex lies in our live mapping, 4-byte aligned, and
        // its first 4 bytes are only ever accessed atomically (by glibc and
        // the kernel) once initialised; an atomic load races with nothing.
        let w = unsafe { AtomicU32::from_ptr(self.raw().cast::<u32>()) }.load(Ordering::Acquire);
        if w & libc::FUTEX_OWNER_DIED != 0 {
            KeeperState::OwnerDied
        } else if w & libc::FUTEX_TID_MASK != 0 {
            KeeperState::Held
        } else {
            KeeperState::Unheld
        }
    }
}

/// Whether the process registered as `id` in the slot whose keeper mutex is
/// `km` may still run: the keeper's word if it says anything, else `/proc`
/// within the reader's own PID namespace, else "maybe" (true). An unused
/// slot (pid 0) is not alive.
pub fn slot_alive(km: &KeeperMutex, id: &OwnerIdentity) -> bool {
    if id.pid == 0 {
        return false;
    }
    match km.state() {
        KeeperState::Held => true,
        KeeperState::OwnerDied => false,
        KeeperState::Unheld => owner::is_alive(id),
    }
}

/// A thread holding one slot's keeper mutex for this process (see the
/// module doc). Dropping it, in the fork generation that made it, makes
/// the thread unlock the mutex and end; in a forked child (which does not
/// have the thread) it is forgotten.
pub(crate) struct Keeper {
    gen: u64,
    ctl: Arc<Ctl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Ctl {
    st: Mutex<Cmd>,
    cv: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a mutex to hold.
    Waiting,
    Holding,
    /// Could not take the mutex (held by someone else): the thread ended.
    Failed,
    /// Released (or never used): the thread ended.
    Done,
}

struct Cmd {
    /// Address of the keeper mutex to hold (0: none yet).
    target: usize,
    stop: bool,
    phase: Phase,
}

impl Ctl {
    fn lock(&self) -> MutexGuard<'_, Cmd> {
        // Nothing panics while holding it; recover the guard regardless.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Cmd>) -> MutexGuard<'a, Cmd> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// Stack of a keeper thread: it calls a handful of pthread functions.
const KEEPER_STACK: usize = 64 << 10;

impl Keeper {
    /// Starts a keeper thread, idle until [`Keeper::hold`]; `None` if no
    /// thread can be created (the process then goes without: see the
    /// module doc). Called without the pool lock (creating a thread takes
    /// tens of microseconds).
    pub(crate) fn spawn() -> Option<Keeper> {
        // Miri runs one process (nobody dies) and has no signal masks.
        if cfg!(miri) {
            return None;
        }
        let ctl = Arc::new(Ctl {
            st: Mutex::new(Cmd {
                target: 0,
                stop: false,
                phase: Phase::Waiting,
            }),
            cv: Condvar::new(),
        });
        let c = ctl.clone();
        // The new thread inherits the signal mask: block everything around
        // its creation, so that no signal is ever delivered to it (an OCaml
        // or other handler must not run on a thread unknown to its runtime).
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initialises `all`; pthread_sigmask reads `all`
        // and writes the previous mask into `old`, restored right after.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        }
        let t = std::thread::Builder::new()
            .name("shmpool-keeper".into())
            .stack_size(KEEPER_STACK)
            .spawn(move || keep(&c));
        // SAFETY: `old` was written by the pthread_sigmask call above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        }
        let thread = t.ok()?;
        Some(Keeper {
            gen: owner::fork_generation(),
            ctl,
            thread: Some(thread),
        })
    }

    /// Has the thread take `km` (a trylock: it never waits; a mutex whose
    /// holder died is taken and made consistent). True once it holds it;
    /// false if someone else holds it (the thread has ended then).
    pub(crate) fn hold(&self, km: &KeeperMutex) -> bool {
        let mut g = self.ctl.lock();
        if g.phase != Phase::Waiting {
            return g.phase == Phase::Holding && g.target == km.raw() as usize;
        }
        g.target = km.raw() as usize;
        self.ctl.cv.notify_all();
        while g.phase == Phase::Waiting {
            g = self.ctl.wait(g);
        }
        g.phase == Phase::Holding
    }

    /// Whether the thread holds a mutex.
    #[cfg(test)]
    pub(crate) fn holding(&self) -> bool {
        self.ctl.lock().phase == Phase::Holding
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if self.gen != owner::fork_generation() {
            // A forked child's copy: the thread is the parent's. Touch
            // nothing (its mutex may have been locked at the fork).
            std::mem::forget(self.thread.take());
            return;
        }
        {
            let mut g = self.ctl.lock();
            g.stop = true;
            self.ctl.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The keeper thread: waits for a mutex to hold, holds it until told to
/// stop, then unlocks it (a pthread mutex is unlocked by its locker).
fn keep(ctl: &Ctl) {
    let mut g = ctl.lock();
    while g.target == 0 && !g.stop {
        g = ctl.wait(g);
    }
    if g.stop {
        g.phase = Phase::Done;
        ctl.cv.notify_all();
        return;
    }
    let m = g.target as *mut libc::pthread_mutex_t;
    // SAFETY: `m` is a keeper mutex initialised at format time in a pool
    // mapping that stays mapped until the owning `Pool` drops this keeper,
    // which waits for this thread to unlock and end first.
    let held = match unsafe { libc::pthread_mutex_trylock(m) } {
        0 => true,
        libc::EOWNERDEAD => {
            // The previous holder died; the mutex protects no data.
            // SAFETY: as above; we hold it now.
            unsafe { libc::pthread_mutex_consistent(m) };
            true
        }
        _ => false,
    };
    g.phase = if held { Phase::Holding } else { Phase::Failed };
    ctl.cv.notify_all();
    if !held {
        return;
    }
    while !g.stop {
        g = ctl.wait(g);
    }
    // SAFETY: as above; this thread locked it.
    unsafe { libc::pthread_mutex_unlock(m) };
    g.phase = Phase::Done;
    ctl.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keeper mutex in a shared anonymous mapping (visible to children).
    struct Shared(*mut KeeperMutex);

    impl Shared {
        fn new() -> Shared {
            // SAFETY: a fresh shared anonymous mapping of one page, zeroed,
            // large and aligned enough for a KeeperMutex.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            let s = Shared(p.cast());
            // SAFETY: nobody else sees the mapping yet.
            unsafe { s.km().init() }.unwrap();
            s
        }
        fn km(&self) -> &KeeperMutex {
            // SAFETY: mapped and initialised until drop.
            unsafe { &*self.0 }
        }
    }

    impl Drop for Shared {
        fn drop(&mut self) {
            // SAFETY: unmaps what new mapped.
            unsafe { libc::munmap(self.0.cast(), 4096) };
        }
    }

    fn fork_and<F: FnOnce()>(f: F) -> i32 {
        // SAFETY: the child runs `f` (which only waits or sleeps) and then
        // _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            f();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        pid
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        for _ in 0..20_000 {
            if cond() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("condition not reached in 20 s");
    }

    #[test]
    #[cfg_attr(miri, ignore = "forks and starts keepers")]
    fn a_keeper_holds_until_dropped() {
        let s = Shared::new();
        assert_eq!(s.km().state(), KeeperState::Unheld);
        let k = Keeper::spawn().expect("thread");
        assert!(k.hold(s.km()));
        assert!(k.holding());
        assert_eq!(s.km().state(), KeeperState::Held);
        // A second keeper cannot take it, and says so.
        let k2 = Keeper::spawn().expect("thread");
        assert!(!k2.hold(s.km()));
        drop(k2);
        assert_eq!(s.km().state(), KeeperState::Held);
        drop(k);
        assert_eq!(s.km().state(), KeeperState::Unheld);
    }

    #[test]
    #[cfg_attr(miri, ignore = "forks and starts keepers")]
    fn a_killed_keepers_process_reads_as_dead_and_the_mutex_is_reusable() {
        let s = Shared::new();
        let km = s.km();
        let child = fork_and(|| {
            let k = Keeper::spawn().expect("thread");
            assert!(k.hold(km));
            std::mem::forget(k);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        wait_for(|| km.state() == KeeperState::Held);
        // SAFETY: signals and reaps our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        // Reaped: every thread of it has exited and the kernel has walked
        // their robust lists.
        assert_eq!(km.state(), KeeperState::OwnerDied);
        // A new keeper takes it over.
        let k = Keeper::spawn().expect("thread");
        assert!(k.hold(km));
        assert_eq!(km.state(), KeeperState::Held);
        drop(k);
        assert_eq!(km.state(), KeeperState::Unheld);
    }

    #[test]
    #[cfg_attr(miri, ignore = "forks and starts keepers")]
    fn a_dead_mark_can_be_cleared_but_not_a_live_hold() {
        let s = Shared::new();
        let km = s.km();
        let child = fork_and(|| {
            let k = Keeper::spawn().expect("thread");
            assert!(k.hold(km));
            std::mem::forget(k);
        });
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        assert_eq!(km.state(), KeeperState::OwnerDied);
        assert!(km.clear_mark());
        assert_eq!(km.state(), KeeperState::Unheld);
        let k = Keeper::spawn().expect("thread");
        assert!(k.hold(km));
        assert!(!km.clear_mark());
        assert_eq!(km.state(), KeeperState::Held);
    }

    #[test]
    #[cfg_attr(miri, ignore = "forks and starts keepers")]
    fn a_stopped_keepers_process_is_alive_and_a_forked_child_has_no_keeper() {
        let s = Shared::new();
        let km = s.km();
        let k = Keeper::spawn().expect("thread");
        assert!(k.hold(km));
        // A child forked now does not hold it: its copy of `k` is inert,
        // and when it exits the mutex stays ours.
        let child = fork_and(|| {
            assert_eq!(km.state(), KeeperState::Held);
            // SAFETY: stops ourselves; the parent continues us.
            unsafe { libc::raise(libc::SIGSTOP) };
        });
        let mut st = 0;
        // SAFETY: waits for our own child to stop.
        unsafe { libc::waitpid(child, &mut st, libc::WUNTRACED) };
        assert!(libc::WIFSTOPPED(st));
        assert_eq!(km.state(), KeeperState::Held);
        // SAFETY: continues and reaps our child.
        unsafe {
            libc::kill(child, libc::SIGCONT);
            libc::waitpid(child, &mut st, 0);
        }
        assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0);
        assert_eq!(
            km.state(),
            KeeperState::Held,
            "the child's exit left it alone"
        );
        drop(k);
        assert_eq!(km.state(), KeeperState::Unheld);
    }

    #[test]
    #[cfg_attr(miri, ignore = "forks and starts keepers")]
    fn slot_alive_reads_the_keeper_first() {
        let s = Shared::new();
        let km = s.km();
        let me = owner::me().expect("/proc/self");
        // No keeper: /proc, in our own namespace.
        assert!(slot_alive(km, &me));
        let bogus = OwnerIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!slot_alive(km, &bogus));
        // Another namespace: maybe alive, never reclaimed.
        let elsewhere = OwnerIdentity {
            pidns: me.pidns.wrapping_add(1),
            ..bogus
        };
        assert!(slot_alive(km, &elsewhere));
        // Held: alive whatever the identity says.
        let k = Keeper::spawn().expect("thread");
        assert!(k.hold(km));
        assert!(slot_alive(km, &bogus));
        assert!(!slot_alive(km, &OwnerIdentity::default()));
        drop(k);
    }
}
