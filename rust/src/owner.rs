//! Who owns a block: a process identified by its pid *and* its start time
//! (field 22 of `/proc/<pid>/stat`, in clock ticks since boot), so that a
//! recycled pid is never taken for the process that died, and by its PID
//! namespace, since a pid names a process only within one.
//!
//! Asking `/proc` whether a process lives is the fallback: the kernel's
//! own answer, the slot's keeper mutex (`liveness.rs`), comes first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

// The owner table lives in the shared header.
pub use crate::layout::OwnerIdentity;

/// What the system says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or stopped), started at this time.
    Alive(u64),
    /// No such process, or a zombie (which never runs again, so its blocks
    /// are as dead as it is).
    Gone,
    /// Could not tell (`/proc` unreadable: out of file descriptors or
    /// memory, a `hidepid` mount, ...). Callers must treat it as alive:
    /// taking a live process for dead would free blocks it still uses.
    Unknown,
}

/// Probes `pid` through `/proc/<pid>/stat` (field 22: start time in clock
/// ticks since boot), confirming a missing entry with `kill(pid, 0)`.
pub fn probe(pid: i32) -> Liveness {
    if pid <= 0 {
        return Liveness::Gone;
    }
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // SAFETY: kill with signal 0 only checks for existence.
            let r = unsafe { libc::kill(pid, 0) };
            let gone =
                r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            return if gone {
                Liveness::Gone
            } else {
                Liveness::Unknown
            };
        }
        Err(_) => return Liveness::Unknown,
    };
    // The command name (field 2) is in parentheses and may contain spaces
    // or parentheses: parse after the last ')'.
    let Some(close) = stat.rfind(')') else {
        return Liveness::Unknown;
    };
    let mut fields = stat[close + 1..].split_ascii_whitespace();
    match fields.next() {
        Some("Z") | Some("X") => return Liveness::Gone,
        Some(_) => {}
        None => return Liveness::Unknown,
    }
    let Some(seen) = fields.nth(18).and_then(|f| f.parse::<u64>().ok()) else {
        return Liveness::Unknown;
    };
    // The kernel adds the *reader's* boot-time offset (its time namespace)
    // to the start time it shows: taking ours off gives the same figure
    // to every reader, whatever its namespace.
    match boottime_offset_ticks().and_then(|o| seen.checked_add_signed(o.checked_neg()?)) {
        Some(t) => Liveness::Alive(t),
        None => Liveness::Unknown,
    }
}

/// This process's boot-time offset in clock ticks (`/proc/self/
/// timens_offsets`, time namespaces, Linux 5.6+; 0 without them), read once
/// per fork generation, or `None` if it cannot be known: the file
/// unreadable, or a process that gave its *children* another time
/// namespace than its own (the file then shows the children's). With
/// `None`, `probe` answers `Unknown` for every running process, so nothing
/// of such a process is taken for dead, nor does it record a start time.
/// An offset that is not a whole number of ticks can make two readers'
/// figures differ by one tick.
fn boottime_offset_ticks() -> Option<i64> {
    const UNKNOWN: i64 = i64::MIN;
    static GEN: AtomicU64 = AtomicU64::new(u64::MAX);
    static OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(UNKNOWN);
    let gen = fork_generation();
    if GEN.load(Ordering::Acquire) == gen {
        let o = OFFSET.load(Ordering::Relaxed);
        return (o != UNKNOWN).then_some(o);
    }
    let o = read_boottime_offset_ticks();
    OFFSET.store(o.unwrap_or(UNKNOWN), Ordering::Relaxed);
    GEN.store(gen, Ordering::Release);
    o
}

fn read_boottime_offset_ticks() -> Option<i64> {
    use std::io::ErrorKind::NotFound;
    let own = match std::fs::read_link("/proc/self/ns/time") {
        Ok(l) => l,
        Err(e) if e.kind() == NotFound => return Some(0), // no time namespaces
        Err(_) => return None,
    };
    if std::fs::read_link("/proc/self/ns/time_for_children").ok()? != own {
        return None;
    }
    let text = match std::fs::read_to_string("/proc/self/timens_offsets") {
        Ok(t) => t,
        Err(e) if e.kind() == NotFound => return Some(0),
        Err(_) => return None,
    };
    let Some(line) = text
        .lines()
        .find(|l| l.split_ascii_whitespace().next() == Some("boottime"))
    else {
        return Some(0);
    };
    let mut f = line.split_ascii_whitespace().skip(1);
    let secs: i128 = f.next()?.parse().ok()?;
    let nsecs: i128 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    let ticks = (secs * 1_000_000_000 + nsecs) * hz as i128;
    i64::try_from(ticks.div_euclid(1_000_000_000)).ok()
}

/// Start time of `pid` if it is known to run.
pub fn start_time_of(pid: i32) -> Option<u64> {
    match probe(pid) {
        Liveness::Alive(t) => Some(t),
        _ => None,
    }
}

/// The inode number of this process's PID namespace (`/proc/self/ns/pid`),
/// or 0 if it cannot be read. Read once per fork generation: a child may
/// be in another namespace than its parent (after `unshare`).
pub fn pid_namespace() -> u32 {
    static CACHED: AtomicU64 = AtomicU64::new(u64::MAX);
    let gen = fork_generation();
    let c = CACHED.load(Ordering::Relaxed);
    if c != u64::MAX && c >> 32 == gen & 0xFFFF_FFFF {
        return c as u32;
    }
    use std::os::unix::fs::MetadataExt;
    // A `/proc` mounted for another PID namespace than ours (e.g. after
    // `unshare -pf` without a new mount) names other processes by our pids:
    // then nothing read there speaks of us, so the namespace is "unknown"
    // (0), and no verdict of `/proc` is ever trusted for this process.
    let own_proc = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        == Some(std::process::id());
    // Namespace inodes are 32-bit in the kernel (`ns_common.inum`).
    let ns = std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .filter(|_| own_proc)
        .and_then(|m| u32::try_from(m.ino()).ok())
        .unwrap_or(0);
    CACHED.store((gen & 0xFFFF_FFFF) << 32 | ns as u64, Ordering::Relaxed);
    ns
}

/// Identity of the calling process, or `None` if its start time cannot be
/// read now (the process then allocates as an unrecorded owner, slot 0,
/// rather than under an identity that would look dead to everyone).
pub fn me() -> Option<OwnerIdentity> {
    let pid = std::process::id() as i32;
    start_time_of(pid).map(|start_time| OwnerIdentity {
        pid,
        pidns: pid_namespace(),
        start_time,
    })
}

/// Whether the process recorded in `id` may still run, by `/proc`: only a
/// process known to be gone, or a different process under a reused pid,
/// is dead, and only if `id` was recorded in our own PID namespace
/// (elsewhere its pid means nothing to our `/proc`: "maybe alive").
pub fn is_alive(id: &OwnerIdentity) -> bool {
    if id.pid <= 0 {
        return false;
    }
    let ns = pid_namespace();
    if ns == 0 || id.pidns != ns {
        return true;
    }
    match probe(id.pid) {
        Liveness::Alive(t) => t == id.start_time,
        Liveness::Gone => false,
        Liveness::Unknown => true,
    }
}

/// Incremented in every child right after `fork`, so cached per-process
/// state (the owner slot and token) is looked up again instead of being
/// inherited.
pub(crate) static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static HOOKED: AtomicBool = AtomicBool::new(false);

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the fork handler, once per process. Called whenever a pool
/// is opened, so it is in place before any fork that could copy a pool's
/// cached identity. Never blocks (a `Once` could, in a child forked while
/// another thread was inside it).
pub fn ensure_fork_hook() {
    if HOOKED
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        // SAFETY: registers a handler that only touches an atomic, which is
        // valid in the child after fork.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    }
}

/// The current fork generation of this process.
#[inline]
pub fn fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn me_is_alive_and_a_bogus_start_time_is_not() {
        let m = me().expect("/proc/self/stat");
        assert!(m.start_time > 0);
        assert!(is_alive(&m));
        assert!(!is_alive(&OwnerIdentity {
            start_time: m.start_time + 1,
            ..m
        }));
        assert!(!is_alive(&OwnerIdentity::default()));
    }
}
