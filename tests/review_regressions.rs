//! Regressions found by review: an unreadable /proc must never make a live
//! process look dead, and threads registering at once must not strand
//! cached blocks.

mod common;

use common::*;
use shmpool::Error;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Opens file descriptors until the process has none left; returns them.
fn exhaust_fds() -> Vec<i32> {
    let mut fds = Vec::new();
    loop {
        // SAFETY: dup of stdin's descriptor (0) or of /dev/null; no memory.
        let fd = unsafe { libc::dup(2) };
        if fd < 0 {
            return fds;
        }
        fds.push(fd);
    }
}

/// Lowers this (child) process's descriptor limit, so it can run out.
fn limit_fds() {
    // SAFETY: setrlimit on this process only, with a valid struct.
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 64,
            rlim_max: 64,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn release(fds: Vec<i32>) {
    for fd in fds {
        // SAFETY: closes descriptors this process opened.
        unsafe {
            libc::close(fd);
        }
    }
}

#[test]
fn reclaim_dead_without_file_descriptors_frees_no_live_block() {
    let _serial = serial();
    let _w = Watchdog::new("reclaim without fds", 30);
    let p = anon(64);
    let pg = p.geometry().page_size;
    let mut c = fork_child(|| {
        limit_fds();
        let a = p.alloc(3 * pg).map_err(|e| e.to_string())?;
        let fds = exhaust_fds();
        // /proc cannot be read now: nobody may be taken for dead.
        let r = p.reclaim_dead().map_err(|e| e.to_string());
        release(fds);
        let r = r?;
        if r.blocks != 0 {
            return Err(format!("reclaimed {r:?} with /proc unreadable"));
        }
        match p.size(a) {
            Ok(n) if n == 3 * pg => Ok(()),
            other => Err(format!("our block is gone: {other:?}")),
        }
    });
    c.wait_ok(T).unwrap();
}

#[test]
fn registering_without_file_descriptors_records_no_dead_identity() {
    let _serial = serial();
    let _w = Watchdog::new("register without fds", 30);
    let p = anon(64);
    let pg = p.geometry().page_size;
    let mut c = fork_child(|| {
        limit_fds();
        let fds = exhaust_fds();
        let a = p.alloc(2 * pg).map_err(|e| e.to_string());
        release(fds);
        let a = a?;
        // Descriptors are back: reclaiming must still spare our block.
        let r = p.reclaim_dead().map_err(|e| e.to_string())?;
        if r.blocks != 0 {
            return Err(format!(
                "reclaimed {r:?}: a live process was recorded as dead"
            ));
        }
        p.size(a)
            .map(|_| ())
            .map_err(|e| format!("our block is gone: {e}"))
    });
    c.wait_ok(T).unwrap();
    assert_eq!(p.check(), Vec::<String>::new());
}

#[test]
fn threads_registering_at_once_strand_no_cached_block() {
    let _serial = serial();
    for round in 0..200 {
        let p = anon(256);
        let pg = p.geometry().page_size;
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..8 {
                        let a = p.alloc(pg).unwrap();
                        p.free(a).unwrap();
                    }
                });
            }
        });
        p.flush_cache().unwrap();
        let d = p.debug_info();
        assert!(
            d.contains("cached in processes (offs->bsize): {}"),
            "round {round}: cached blocks stranded after flush:\n{d}"
        );
        assert_eq!(p.stats().largest_free_bytes, 256 * pg, "round {round}");
        assert_eq!(p.check(), Vec::<String>::new());
        assert_eq!(p.size(0), Err(Error::NotABlock));
    }
}
