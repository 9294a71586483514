//! Helpers shared by the fork-based test files: children that are always
//! killed and reaped, shm names that are always unlinked, a watchdog that
//! turns a hang into a failure, and stamping of block contents.
//!
//! Every guard checks that it is dropped in the process that created it,
//! so a forked child that unwinds never kills its siblings or unlinks the
//! parent's objects.
//!
//! # Forks and the test harness's threads
//!
//! The harness runs the tests of a file on several threads of one process.
//! A fork copies only the forking thread: a lock another thread held at
//! that instant (this module's registries, std's environment, stdio or
//! panic locks, a pool's in-process state) stays held forever in the
//! child, which then hangs on its first use of it (it happened in CI).
//! So every test of a file that forks runs under [`serial`]: one test at
//! a time per test binary, and no other test thread is running code when a
//! test forks (the others wait on the mutex, holding nothing). [`fork_child`]
//! refuses to fork on a thread that does not hold it, so a forking test
//! that forgets it fails at once instead of hanging now and then.
#![allow(dead_code)]

pub mod torture;

use shmpool::Pool;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static NEXT_NAME: AtomicU32 = AtomicU32::new(0);
/// Live children and shm names of this process, for the watchdog.
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The one-test-at-a-time mutex of this test binary (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds `SERIAL` (a forked child inherits the
    /// forking thread's value: its own forks are allowed too).
    static SERIAL_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Held for a whole test by every test of a file that forks: the tests of
/// this binary then run one at a time (see the module doc). A test that
/// panicked earlier does not poison it for the next ones.
pub struct Serial {
    _g: std::sync::MutexGuard<'static, ()>,
}

pub fn serial() -> Serial {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    SERIAL_HELD.with(|h| h.set(true));
    Serial { _g: g }
}

impl Drop for Serial {
    fn drop(&mut self) {
        SERIAL_HELD.with(|h| h.set(false));
    }
}

fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Writes straight to fd 2: the test harness's output capture does not
/// reach a forked child, and a child should not take std's locks.
pub fn say(msg: &str) {
    let s = format!("[pid {}] {msg}\n", pid());
    // SAFETY: writes a valid buffer to fd 2.
    unsafe {
        libc::write(2, s.as_ptr().cast(), s.len());
    }
}

/// Reports that `test` could not run here (a missing capability: root,
/// a mount namespace...), so that it never passes silently: prints
/// `SKIPPED: <test>: <reason>` on stderr (past the harness's capture) and
/// appends that line to the file named by `SHMPOOL_SKIP_LOG`, if set, where
/// `scripts/test.sh` collects every skip and lists them at the end. The
/// caller then returns without asserting anything.
pub fn skipped(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {test}: {reason}\n");
    // SAFETY: writes a valid buffer to fd 2.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
    }
    if let Some(path) = std::env::var_os("SHMPOOL_SKIP_LOG") {
        // One write of one short line with O_APPEND: lines of tests running
        // at once do not interleave.
        let logged = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = logged {
            panic!("cannot record the skip in {path:?}: {e}");
        }
    }
}

/// Whether the shm object `name` (with its leading `/`) exists.
pub fn shm_exists(name: &str) -> bool {
    let path = format!("/dev/shm/{}", name.trim_start_matches('/'));
    match std::fs::symlink_metadata(&path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("cannot tell whether {path} exists: {e}"),
    }
}

/// A unique POSIX shm name, unlinked on drop (ignoring "not found").
pub struct ShmName {
    name: String,
    creator: i32,
}

impl ShmName {
    pub fn new() -> ShmName {
        let name = format!(
            "/shmpool-test-{}-{}",
            pid(),
            NEXT_NAME.fetch_add(1, Ordering::Relaxed)
        );
        NAMES.lock().unwrap().push(name.clone());
        ShmName {
            name,
            creator: pid(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for ShmName {
    fn drop(&mut self) {
        if pid() == self.creator {
            let _ = nix::sys::mman::shm_unlink(self.name.as_str());
            NAMES.lock().unwrap().retain(|n| n != &self.name);
        }
    }
}

/// A forked child, SIGKILLed and reaped on drop unless already reaped.
pub struct Child {
    pub pid: i32,
    creator: i32,
    /// The wait status once reaped.
    status: Option<i32>,
}

/// Forks; the child runs `f` and `_exit`s: 0 on `Ok`, 1 on `Err` (the
/// message goes to stderr), 2 on a panic. The child never returns.
pub fn fork_child(f: impl FnOnce() -> Result<(), String>) -> Child {
    assert!(
        SERIAL_HELD.with(|h| h.get()),
        "fork_child outside common::serial(): a test that forks must hold it \
         for its whole run (see tests/common/mod.rs)"
    );
    // SAFETY: the child only runs `f` (allocator and pool calls; glibc
    // makes malloc usable after fork) and then _exit, never returning into
    // the test harness.
    let p = unsafe { libc::fork() };
    assert!(p >= 0, "fork failed");
    if p == 0 {
        let code = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => 0,
            Ok(Err(msg)) => {
                say(&format!("child failed: {msg}"));
                1
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                say(&format!("child panicked: {msg}"));
                2
            }
        };
        // SAFETY: terminates the child without running the parent's
        // atexit handlers or destructors.
        unsafe { libc::_exit(code) }
    }
    CHILDREN.lock().unwrap().push(p);
    Child {
        pid: p,
        creator: pid(),
        status: None,
    }
}

impl Child {
    fn reaped(&mut self, st: i32) {
        self.status = Some(st);
        CHILDREN.lock().unwrap().retain(|&c| c != self.pid);
    }

    /// Polls `waitpid` until the child exits (reaping it) or, with
    /// `stopped`, until it stops. Err on timeout (the child is then killed).
    fn wait_for(&mut self, timeout: Duration, stopped: bool) -> Result<i32, String> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let t0 = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            let mut st = 0;
            let flags = libc::WNOHANG | if stopped { libc::WUNTRACED } else { 0 };
            // SAFETY: waits for our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut st, flags) };
            if r == self.pid {
                if libc::WIFSTOPPED(st) {
                    return Ok(st);
                }
                self.reaped(st);
                return Ok(st);
            }
            if r < 0 {
                return Err(format!(
                    "waitpid({}): {}",
                    self.pid,
                    nix::errno::Errno::last()
                ));
            }
            if t0.elapsed() > timeout {
                self.kill();
                return Err(format!(
                    "child {} not {} within {timeout:?}",
                    self.pid,
                    if stopped { "stopped" } else { "exited" }
                ));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    /// Waits until the child exits; Ok(()) if it exited with status 0.
    pub fn wait_ok(&mut self, timeout: Duration) -> Result<(), String> {
        let st = self.wait_for(timeout, false)?;
        if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
            Ok(())
        } else {
            Err(format!("child {} ended with {}", self.pid, describe(st)))
        }
    }

    /// Waits until the child stops itself (SIGSTOP). Err if it exits
    /// instead, or does not stop within `timeout` (it is then killed).
    pub fn wait_stopped(&mut self, timeout: Duration) -> Result<(), String> {
        let st = self.wait_for(timeout, true)?;
        if libc::WIFSTOPPED(st) {
            Ok(())
        } else {
            Err(format!(
                "child {} ended with {} instead of stopping",
                self.pid,
                describe(st)
            ))
        }
    }

    /// SIGKILLs and reaps the child (a no-op once reaped). Returns the
    /// wait status.
    pub fn kill(&mut self) -> i32 {
        if let Some(st) = self.status {
            return st;
        }
        let mut st = 0;
        // SAFETY: signals and reaps our own, not yet reaped, child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            while libc::waitpid(self.pid, &mut st, 0) < 0
                && nix::errno::Errno::last() == nix::errno::Errno::EINTR
            {}
        }
        self.reaped(st);
        st
    }

    /// Reaps the child if it has exited; returns its status then.
    pub fn poll(&mut self) -> Option<i32> {
        if self.status.is_none() {
            let mut st = 0;
            // SAFETY: waits (without blocking) for our own child.
            if unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) } == self.pid {
                self.reaped(st);
            }
        }
        self.status
    }

    /// What the (live, unreaped) child is doing, for a test that found it
    /// stalled: per thread its scheduler state, CPU ticks used, kernel wait
    /// channel and kernel stack (from `/proc`), then user stacks from gdb if
    /// it is installed (20 s at most). Nothing fails if some of it
    /// cannot be read.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks {
            let t = t.to_string_lossy();
            let base = format!("/proc/{}/task/{t}", self.pid);
            let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).unwrap_or_default();
            let stat = read("stat");
            // After the ")" of the command: state, ..., utime is field 14.
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, r)| r.split_whitespace().collect());
            out += &format!(
                "task {t} ({}): state {} utime {} stime {} wchan {}\n{}",
                read("comm").trim(),
                rest.first().unwrap_or(&"?"),
                rest.get(11).unwrap_or(&"?"),
                rest.get(12).unwrap_or(&"?"),
                read("wchan"),
                read("stack")
            );
        }
        let gdb = std::process::Command::new("timeout")
            .args(["20", "gdb", "-p", &self.pid.to_string(), "-batch", "-nx"])
            .args(["-ex", "thread apply all bt 12"])
            .output();
        if let Ok(o) = gdb {
            let text = String::from_utf8_lossy(&o.stdout);
            out += &text
                .lines()
                .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        out
    }

    pub fn is_reaped(&self) -> bool {
        self.status.is_some()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if pid() == self.creator && self.status.is_none() {
            self.kill();
        }
    }
}

pub fn describe(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exit status {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("signal {}", libc::WTERMSIG(st))
    } else if libc::WIFSTOPPED(st) {
        format!("stop by signal {}", libc::WSTOPSIG(st))
    } else {
        format!("wait status {st:#x}")
    }
}

/// Fails the whole test binary (after killing every child and unlinking
/// every name) if not dropped within `secs`: a deadlock must not hang the
/// test suite.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(what: &'static str, secs: u64) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !d.load(Ordering::Relaxed) {
                if t0.elapsed() > Duration::from_secs(secs) {
                    say(&format!(
                        "WATCHDOG: {what} still running after {secs} s: aborting"
                    ));
                    for &c in CHILDREN.lock().unwrap().iter() {
                        // SAFETY: signals our own children.
                        unsafe {
                            libc::kill(c, libc::SIGKILL);
                        }
                    }
                    for n in NAMES.lock().unwrap().iter() {
                        let _ = nix::sys::mman::shm_unlink(n.as_str());
                    }
                    // SAFETY: ends the test process: the hang is the failure.
                    unsafe { libc::_exit(99) }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The shared value of type `T` at byte offset `off` of the pool (a block
/// allocated for it). `T` must be made of atomics and be valid when zeroed.
///
/// # Safety
/// The block must be at least `size_of::<T>()` bytes, suitably aligned,
/// zeroed or holding a valid `T`, and live as long as the reference.
pub unsafe fn shared<T>(pool: &Pool, off: usize) -> &T {
    &*pool.addr(off).cast::<T>()
}

/// Fills the block at `off` (`bytes` long) with the word `v`.
pub fn stamp(pool: &Pool, off: usize, bytes: usize, v: u64) {
    // SAFETY: the caller owns the block [off, off+bytes) of the mapping.
    let s = unsafe { std::slice::from_raw_parts_mut(pool.addr(off).cast::<u64>(), bytes / 8) };
    s.fill(v);
}

/// Whether every word of the block at `off` is still `v`.
pub fn stamped(pool: &Pool, off: usize, bytes: usize, v: u64) -> bool {
    // SAFETY: the block lies inside the mapping; nobody writes it while we
    // read unless the allocator handed it out twice, which this detects.
    let s = unsafe { std::slice::from_raw_parts(pool.addr(off).cast::<u64>(), bytes / 8) };
    s.iter().all(|&w| w == v)
}

/// SplitMix64: a small deterministic generator (usable in children).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Spins (with short sleeps) until `cond` holds; Err after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let t0 = Instant::now();
    let mut spins = 0u32;
    while !cond() {
        if t0.elapsed() > timeout {
            return Err(format!("condition not reached within {timeout:?}"));
        }
        spins += 1;
        if spins < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Ok(())
}

/// Asserts that no shm object named by this process is left in /dev/shm.
pub fn assert_no_leftover_shm() {
    let prefix = format!("shmpool-test-{}-", pid());
    // An unreadable /dev/shm must fail the check, not pass it.
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .expect("read /dev/shm")
        .map(|e| {
            e.expect("read /dev/shm")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Names of tests still running in other threads are allowed.
    let live = NAMES.lock().unwrap().clone();
    let stray: Vec<&String> = left
        .iter()
        .filter(|n| !live.iter().any(|l| l.trim_start_matches('/') == n.as_str()))
        .collect();
    assert!(stray.is_empty(), "left in /dev/shm: {stray:?}");
}

/// A zeroed `MAP_SHARED` anonymous mapping holding a `T`, shared with
/// children forked later (a side channel independent of the pool).
pub struct SharedMem<T> {
    p: *mut T,
    len: usize,
}

impl<T> SharedMem<T> {
    /// # Safety
    /// `T` must be valid when all-zero and safe to share between processes
    /// (made of atomics).
    pub unsafe fn new() -> SharedMem<T> {
        let len = std::mem::size_of::<T>().max(1);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap failed");
        SharedMem { p: p.cast(), len }
    }
}

impl<T> std::ops::Deref for SharedMem<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: mapped, zero-initialised and valid for T (contract of new).
        unsafe { &*self.p }
    }
}

impl<T> Drop for SharedMem<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new mapped; no reference outlives self.
        unsafe {
            libc::munmap(self.p.cast(), self.len);
        }
    }
}

/// A lighter stamp: the first word of each page of the block only.
pub fn mark(pool: &Pool, off: usize, bytes: usize, v: u64) {
    let pg = pool.geometry().page_size;
    for p in (off..off + bytes).step_by(pg) {
        // SAFETY: the caller owns the block [off, off+bytes) of the mapping.
        unsafe { pool.addr(p).cast::<u64>().write_volatile(v) }
    }
}

/// Whether every page of the block still starts with `v`.
pub fn marked(pool: &Pool, off: usize, bytes: usize, v: u64) -> bool {
    let pg = pool.geometry().page_size;
    // SAFETY: as for `stamped`.
    (off..off + bytes)
        .step_by(pg)
        .all(|p| unsafe { pool.addr(p).cast::<u64>().read_volatile() } == v)
}

/// The size multiplier of the torture suites: `SHMPOOL_TORTURE` (default 1,
/// as in `make test`; `make torture` uses 35).
pub fn scale() -> u64 {
    std::env::var("SHMPOOL_TORTURE")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Makes the calling (forked) process die with its parent, so a test that
/// is killed leaves no workers behind.
pub fn die_with_parent() {
    // SAFETY: prctl with integer arguments has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
}

/// An anonymous pool of `pages` payload pages (shared with children forked
/// later, gone with the last of them).
pub fn anon(pages: usize) -> Pool {
    let bytes = pages * shmpool::mapping::page_size();
    Pool::create(bytes, &shmpool::CreateOptions::default()).expect("create anonymous pool")
}

/// Asserts that `p` holds no block any more and is consistent: `stats`
/// (which takes every cache back) counts the whole payload free and no
/// live block, and `check` finds nothing wrong afterwards.
pub fn assert_all_free(p: &Pool) {
    let st = p.stats();
    assert_eq!((st.free_bytes, st.live_blocks), (st.payload_bytes, 0));
    assert_eq!(p.check(), Vec::<String>::new());
}
