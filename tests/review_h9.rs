//! Regression tests from the independent review of issues 9 and 10
//! (branch h9-review). Each test names the finding it demonstrates.

mod common;

use common::*;
use shmpool::{CreateOptions, Pool};
use std::ffi::CString;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const EXEC_ENV: &str = "SHMPOOL_REVIEW_EXEC_POOL";
const NOBODY: libc::uid_t = 65534;

/// Finding: a process that `execve`s keeps its pid and start time, so the
/// new program, attaching the same pool, is matched to its old owner slot
/// by `owner_slot`'s "registered already" path, which does not erase the
/// `OWNER_DIED` mark the exec left on the slot's keeper mutex. If the new
/// program cannot start a keeper (here: no thread may be created), the
/// live process reads as dead for ever: `owners()` says `alive: false`,
/// every lock acquisition takes its cache back under it, and
/// `reclaim_dead` frees its live blocks.
#[test]
fn an_execd_process_without_a_keeper_is_not_taken_for_dead() {
    let _serial = serial();
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        skipped(
            "an_execd_process_without_a_keeper_is_not_taken_for_dead",
            "needs root (to drop to an unprivileged uid whose thread limit holds)",
        );
        return;
    }
    let _w = Watchdog::new("exec keeperless", 60);
    let name = ShmName::new();
    let opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: false,
    };
    let p = Pool::create(256 * 4096, &opts).unwrap();
    let path = format!("/dev/shm/{}", name.as_str().trim_start_matches('/'));
    let cpath = CString::new(path).unwrap();
    // SAFETY: a valid C string; makes the object usable by the child's uid.
    assert_eq!(unsafe { libc::chmod(cpath.as_ptr(), 0o666) }, 0);
    let exe = std::env::current_exe().unwrap();
    let nm = name.as_str().to_string();
    let mut child = fork_child(move || {
        // The first program: registers a slot (its keeper holds the slot's
        // keeper mutex) and keeps a block live; then execs.
        let q = Pool::attach(&nm).map_err(|e| format!("{e:?}"))?;
        let _x = q.alloc(4096).map_err(|e| format!("{e:?}"))?;
        let exe = CString::new(exe.as_os_str().as_encoded_bytes()).unwrap();
        let args = [
            exe.clone(),
            CString::new("exec_child_of_review").unwrap(),
            CString::new("--exact").unwrap(),
            CString::new("--ignored").unwrap(),
            CString::new("--nocapture").unwrap(),
        ];
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        std::env::set_var(EXEC_ENV, &nm);
        // SAFETY: drops privileges (every thread, glibc's setxid), then
        // replaces the program with valid NUL-terminated argv.
        unsafe {
            if libc::setuid(NOBODY) != 0 {
                return Err("setuid".into());
            }
            libc::execv(exe.as_ptr(), argv.as_ptr());
        }
        Err("execv failed".into())
    });
    // The exec'd program registers again and holds two live blocks.
    let pid = child.pid;
    let seen = wait_until(T, || {
        p.owners()
            .unwrap()
            .iter()
            .any(|o| o.pid == pid && o.blocks >= 2)
            || child.poll().is_some()
    });
    assert!(seen.is_ok(), "the exec'd child never allocated");
    assert!(child.poll().is_none(), "the exec'd child died early");
    let me = p
        .owners()
        .unwrap()
        .into_iter()
        .find(|o| o.pid == pid)
        .unwrap();
    let r = p.reclaim_dead().unwrap();
    let still_running = child.poll().is_none();
    child.kill();
    assert!(still_running);
    assert!(
        me.alive,
        "a live (exec'd) process reads as dead: {me:?}; reclaim_dead: {r:?}"
    );
    assert!(
        !r.owners.iter().any(|&(q, _)| q == pid),
        "reclaim_dead freed the live blocks of a running process: {r:?}"
    );
}

/// The program the test above execs (does nothing when run directly).
#[test]
#[ignore = "run by an_execd_process_without_a_keeper_is_not_taken_for_dead through exec"]
fn exec_child_of_review() {
    let _serial = serial();
    let Some(name) = std::env::var_os(EXEC_ENV) else {
        return;
    };
    // No new thread from now on: the keeper cannot start.
    let lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: sets a resource limit of this process.
    unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lim) };
    let q = Pool::attach(&name).unwrap();
    let _y = q.alloc(4096).unwrap();
    let z = q.alloc(4096).unwrap();
    q.free(z).unwrap(); // cached
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
