//! Who owns a block: a process identified by its pid *and* its start time
//! (field 22 of `/proc/<pid>/stat`, in clock ticks since boot), so that a
//! recycled pid is never taken for the process that died.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One slot of the shared owner table (the truth about who a slot is).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerIdentity {
    /// 0 = slot unused.
    pub pid: i32,
    pub _pad: u32,
    pub start_time: u64,
}

/// Start time of `pid`, or `None` if it does not exist or is a zombie
/// (a zombie never runs again, so its blocks are as dead as it is).
pub fn start_time_of(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces
    // or parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok() // field 22
}

/// Identity of the calling process.
pub fn me() -> OwnerIdentity {
    let pid = std::process::id() as i32;
    OwnerIdentity {
        pid,
        _pad: 0,
        start_time: start_time_of(pid).unwrap_or(0),
    }
}

/// Whether the process recorded in `id` still runs.
pub fn is_alive(id: &OwnerIdentity) -> bool {
    id.pid > 0 && start_time_of(id.pid) == Some(id.start_time)
}

/// Incremented in every child right after `fork`, so cached per-process
/// state (the owner slot and token) is looked up again instead of being
/// inherited.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
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
        let m = me();
        assert!(m.start_time > 0);
        assert!(is_alive(&m));
        assert!(!is_alive(&OwnerIdentity {
            start_time: m.start_time + 1,
            ..m
        }));
        assert!(!is_alive(&OwnerIdentity::default()));
    }
}
