//! Liveness as the kernel tracks it (issue 10.5) and what `stats` promises
//! after processes die (issue 9.3), with real forked processes:
//!
//! - workers SIGKILLed mid-work again and again (200 kills in `make test`,
//!   1000 under `make torture`): their caches go back to the free runs at
//!   the next lock acquisition, their owner slots are reused, and
//!   allocating `largest_free_bytes` again and again until it is 0 obtains
//!   exactly `free_bytes`, while a live idle process holds blocks in its
//!   cache;
//! - a process in another PID namespace (if `unshare` works here): alive
//!   while it lives (its keeper), never reclaimed on the word of our
//!   `/proc`, reclaimable once the kernel says it died.

mod common;

use common::*;
use shmpool::{CreateOptions, Pool};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn clean(p: &Pool) {
    assert_eq!(p.check(), Vec::<String>::new());
}

/// Allocates `largest_free_bytes` until it is 0; returns the blocks.
/// Every such allocation must succeed.
fn greedy(p: &Pool) -> Vec<usize> {
    let mut got = Vec::new();
    loop {
        let c = p.stats().largest_free_bytes;
        if c == 0 {
            return got;
        }
        match p.alloc(c) {
            Ok(o) => got.push(o),
            Err(e) => panic!(
                "stats said {c} bytes contiguous, alloc said {e:?}\n{}",
                p.debug_info()
            ),
        }
    }
}

#[repr(C)]
struct Board {
    /// Operations done by each running worker (indexed by batch lane).
    ops: [AtomicU64; 4],
    /// The idle sitter: 1 once it has cached its blocks; 1 in `go` to end.
    sitter_ready: AtomicU64,
    go: AtomicU64,
    /// The sitter's cached blocks.
    sitter_offs: [AtomicU64; 6],
}

/// A worker: allocates and frees blocks of 1..=80 pages at random, keeping
/// up to 12, so that it always has blocks cached (small and large) and live.
fn worker(p: &Pool, ops: &AtomicU64, seed: u64) -> Result<(), String> {
    die_with_parent();
    let pg = p.geometry().page_size;
    let mut rng = Rng(seed);
    let mut held: Vec<usize> = Vec::new();
    loop {
        if held.len() < 12 && rng.below(3) != 0 {
            let n = if rng.below(8) == 0 {
                65 + rng.below(16)
            } else {
                1 + rng.below(8)
            };
            if let Ok(o) = p.alloc(n as usize * pg) {
                held.push(o);
            }
        } else if !held.is_empty() {
            let o = held.swap_remove(rng.below(held.len() as u64) as usize);
            p.free(o).map_err(|e| format!("free: {e}"))?;
        }
        ops.fetch_add(1, SeqCst);
    }
}

#[test]
fn after_many_kills_contiguous_allocations_obtain_exactly_free() {
    let _serial = serial();
    let kills = (200 * scale()).min(1000);
    let _w = Watchdog::new("kills and greedy allocation", 120 + kills / 2);
    let pg = shmpool::mapping::page_size();
    let p = Pool::create(4096 * pg, &CreateOptions::default()).unwrap();
    // SAFETY: Board is atomics only, valid when zeroed.
    let b = unsafe { SharedMem::<Board>::new() };
    // A live process that holds blocks in its cache and idles: the greedy
    // allocations must get those too.
    let mut sitter = fork_child(|| {
        die_with_parent();
        let v: Vec<usize> = [1usize, 2, 3, 70, 5, 1]
            .iter()
            .map(|&n| p.alloc(n * pg).unwrap())
            .collect();
        for (i, &o) in v.iter().enumerate() {
            p.free(o).map_err(|e| e.to_string())?;
            b.sitter_offs[i].store(o as u64, SeqCst);
        }
        b.sitter_ready.store(1, SeqCst);
        wait_until(Duration::from_secs(3600), || b.go.load(SeqCst) == 1)
    });
    wait_until(T, || b.sitter_ready.load(SeqCst) == 1).unwrap();
    let sitters: Vec<usize> = b
        .sitter_offs
        .iter()
        .map(|o| o.load(SeqCst) as usize)
        .collect();
    let mut rng = Rng(0x5eed);
    let mut done = 0u64;
    let mut greedy_checks = 0;
    let mut max_slots = 0;
    while done < kills {
        // A batch of up to 4 workers running together, each killed at a
        // random point of its work.
        let n = (kills - done).min(1 + rng.below(4)) as usize;
        let base: Vec<u64> = (0..n).map(|i| b.ops[i].load(SeqCst)).collect();
        let mut kids: Vec<Child> = (0..n)
            .map(|i| {
                let seed = rng.next();
                let ops = &b.ops[i];
                let pp = &p;
                fork_child(move || worker(pp, ops, seed))
            })
            .collect();
        for (i, k) in kids.iter_mut().enumerate() {
            let target = base[i] + rng.below(300);
            wait_until(T, || b.ops[i].load(SeqCst) >= target || k.poll().is_some()).unwrap();
            assert!(k.poll().is_none(), "worker ended by itself");
            let st = k.kill();
            assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL);
        }
        done += n as u64;
        // Dead processes' caches went back at the next lock acquisition:
        // the only cached blocks left are (some of) the sitter's.
        p.flush_cache().unwrap();
        let d = p.debug_info();
        let cached = d
            .lines()
            .find(|l| l.starts_with("cached in processes"))
            .unwrap()
            .to_string();
        let listed = cached
            .split(['{', ',', '}'])
            .filter_map(|e| e.split("->").next()?.parse::<usize>().ok());
        for o in listed {
            assert!(
                sitters.contains(&o),
                "after {done} kills, a cached block not the sitter's: {cached}"
            );
        }
        let s = p.stats();
        let owners = p.owners().unwrap();
        max_slots = max_slots.max(owners.len());
        if done % 50 == 0 || done == kills {
            // The greedy allocation: every byte `free` reports is obtained.
            clean(&p);
            let free = s.free_bytes;
            let got = greedy(&p);
            let total: usize = got.iter().map(|&o| p.size(o).unwrap()).sum();
            assert_eq!(
                total, free,
                "after {done} kills: greedy got {total} of {free}"
            );
            assert_eq!(p.stats().free_bytes, 0);
            clean(&p);
            for o in got {
                p.free(o).unwrap();
            }
            greedy_checks += 1;
            // The dead workers' live blocks, and their owner slots.
            p.reclaim_dead().unwrap();
            clean(&p);
        }
    }
    assert!(
        max_slots < 200,
        "owner slots of dead workers are not reused ({max_slots} in use)"
    );
    b.go.store(1, SeqCst);
    sitter.wait_ok(T).unwrap();
    p.reclaim_dead().unwrap();
    let s = p.stats();
    assert_eq!(s.free_bytes, s.payload_bytes);
    assert_eq!(s.largest_free_bytes, s.payload_bytes);
    clean(&p);
    println!(
        "torture liveness: {done} workers SIGKILLed, {greedy_checks} greedy checks exact, \
         at most {max_slots} owner slots in use"
    );
}

/// `unshare(CLONE_NEWPID | CLONE_NEWNS)` in a child, then a grandchild that
/// is pid 1 of a new PID namespace with its own `/proc` (as in a container
/// sharing our `/dev/shm`), running `f`. `None` if this machine does not
/// allow it.
fn in_new_pid_namespace(f: impl FnOnce() -> Result<(), String>) -> Option<Child> {
    // SAFETY: Flag is atomics only, valid when zeroed.
    let ok = unsafe { SharedMem::<AtomicU64>::new() };
    let c = fork_child(|| {
        die_with_parent();
        // SAFETY: unshare with flags only.
        if unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) } != 0 {
            ok.store(2, SeqCst);
            return Ok(());
        }
        let mut g = fork_child(|| {
            die_with_parent();
            // SAFETY: mount calls with valid C strings; the mount namespace
            // is ours alone (made private first), so the host's /proc is
            // untouched.
            let mounted = unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                    && libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        0,
                        std::ptr::null(),
                    ) == 0
            };
            if !mounted || std::process::id() != 1 {
                ok.store(2, SeqCst);
                return Ok(());
            }
            ok.store(1, SeqCst);
            f()
        });
        g.wait_ok(Duration::from_secs(3600))
    });
    wait_until(T, || ok.load(SeqCst) != 0).unwrap();
    if ok.load(SeqCst) == 2 {
        let mut c = c;
        let _ = c.wait_ok(T);
        return None;
    }
    Some(c)
}

#[repr(C)]
struct NsBoard {
    /// 1: blocks allocated and cached; 2: pool closed (keeper released).
    step: AtomicU64,
    /// 1: close the pool; 2: exit.
    go: AtomicU64,
    block: AtomicU64,
}

#[test]
fn a_process_in_another_pid_namespace_is_never_reclaimed_while_it_lives() {
    let _serial = serial();
    let _w = Watchdog::new("pid namespace", 120);
    let pg = shmpool::mapping::page_size();
    let name = ShmName::new();
    let p = Pool::create(
        256 * pg,
        &CreateOptions {
            name: Some(name.as_str().into()),
            prefault: false,
        },
    )
    .unwrap();
    // SAFETY: NsBoard is atomics only, valid when zeroed.
    let b = unsafe { SharedMem::<NsBoard>::new() };
    let nm = name.as_str().to_string();
    let child = in_new_pid_namespace(|| {
        let q = Pool::attach(&nm).map_err(|e| e.to_string())?;
        let keep = q.alloc(3 * pg).map_err(|e| e.to_string())?;
        let c = q.alloc(pg).map_err(|e| e.to_string())?;
        q.free(c).map_err(|e| e.to_string())?; // cached
        b.block.store(keep as u64, SeqCst);
        b.step.store(1, SeqCst);
        wait_until(Duration::from_secs(3600), || b.go.load(SeqCst) >= 1)?;
        drop(q); // closes: cache flushed, keeper released; still alive
        b.step.store(2, SeqCst);
        wait_until(Duration::from_secs(3600), || b.go.load(SeqCst) >= 2)
    });
    let Some(mut child) = child else {
        println!(
            "SKIPPED: unshare(CLONE_NEWPID | CLONE_NEWNS) or mounting /proc is not allowed here"
        );
        return;
    };
    wait_until(T, || b.step.load(SeqCst) == 1).unwrap();
    let keep = b.block.load(SeqCst) as usize;
    // It lives (its keeper holds its mutex): it is alive, its blocks and
    // its cache stay, whatever our /proc says of its pid (1).
    let o = p.owners().unwrap();
    assert_eq!(o.len(), 1, "{o:?}");
    assert!(o[0].alive, "{o:?}");
    assert_eq!(o[0].pid, 1, "its pid in its own namespace");
    assert_eq!(p.reclaim_dead().unwrap().blocks, 0);
    assert_eq!(p.size(keep), Ok(3 * pg));
    assert_eq!(
        p.stats().free_bytes,
        253 * pg,
        "its cached page counts as free"
    );
    clean(&p);
    // It closes the pool but lives on: no keeper now, and our /proc cannot
    // speak for its namespace, so it is still "maybe alive".
    b.go.store(1, SeqCst);
    wait_until(T, || b.step.load(SeqCst) == 2).unwrap();
    assert_eq!(p.reclaim_dead().unwrap().blocks, 0);
    assert!(p.owners().unwrap()[0].alive);
    assert_eq!(p.size(keep), Ok(3 * pg));
    // It exits. With its keeper released at close, nothing tells us across
    // namespaces that it died: its block stays (the documented limit).
    b.go.store(2, SeqCst);
    child.wait_ok(T).unwrap();
    assert_eq!(p.reclaim_dead().unwrap().blocks, 0);
    assert_eq!(p.size(keep), Ok(3 * pg));
    clean(&p);
    println!(
        "liveness pid namespace: a process of another namespace was never reclaimed while it lived"
    );
}

#[test]
fn a_process_of_another_pid_namespace_that_dies_is_reclaimed() {
    let _serial = serial();
    let _w = Watchdog::new("pid namespace death", 120);
    let pg = shmpool::mapping::page_size();
    let p = anon(256);
    // SAFETY: NsBoard is atomics only, valid when zeroed.
    let b = unsafe { SharedMem::<NsBoard>::new() };
    let child = in_new_pid_namespace(|| {
        let keep = p.alloc(3 * pg).map_err(|e| e.to_string())?;
        let c = p.alloc(2 * pg).map_err(|e| e.to_string())?;
        p.free(c).map_err(|e| e.to_string())?; // cached
        b.block.store(keep as u64, SeqCst);
        b.step.store(1, SeqCst);
        wait_until(Duration::from_secs(3600), || false)
    });
    let Some(mut child) = child else {
        println!(
            "SKIPPED: unshare(CLONE_NEWPID | CLONE_NEWNS) or mounting /proc is not allowed here"
        );
        return;
    };
    wait_until(T, || b.step.load(SeqCst) == 1).unwrap();
    assert_eq!(p.reclaim_dead().unwrap().blocks, 0, "alive");
    assert_eq!(p.stats().largest_free_bytes, 251 * pg);
    // Killing the intermediate child kills the namespace's init (its
    // parent-death signal), which is our grandchild.
    child.kill();
    // The grandchild may outlive the child by a moment: wait for the kernel
    // to mark its keeper.
    wait_until(T, || p.owners().unwrap().iter().all(|o| !o.alive)).unwrap();
    // Its cache went back at the next lock acquisition.
    let d = p.debug_info();
    assert!(d.contains("cached in processes (offs->bsize): {}"), "{d}");
    assert_eq!(p.stats().largest_free_bytes, 253 * pg);
    let r = p.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (1, 3));
    let s = p.stats();
    assert_eq!((s.free_bytes, s.largest_free_bytes), (256 * pg, 256 * pg));
    clean(&p);
}
