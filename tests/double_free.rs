//! A double free racing with a re-allocation of the same block (issue
//! 10.4): a free that has read the block's descriptor before the block was
//! freed and handed out again must fail with `NotABlock` and change
//! nothing, from a sibling thread (the lock-free cache path) as from
//! another process (the locked path).
//!
//! The crash-point hook `FreeLoaded` (test builds) pauses the late free
//! exactly between its read of the descriptor and its commit, so the race
//! is not left to luck: before the generation tag these tests failed on
//! every run. Without the `crash-points` feature they print SKIPPED.

mod common;

#[cfg(feature = "crash-points")]
mod with_hooks {
    use super::common::*;
    use shmpool::crashpoint::{self, CrashPoint};
    use shmpool::{Error, Pool};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(20);

    /// The hook is process-wide: tests that install it run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Where a paused free and the test meet: in shared memory, so that the
    /// paused thread may be in another process.
    #[repr(C)]
    struct Gate {
        /// Set by the paused free when it reaches `FreeLoaded`.
        reached: AtomicU32,
        /// Set by the test to let it go on.
        go: AtomicU32,
        /// For the stress test: how long to spin at the hook (0: wait for
        /// `go` instead).
        spin: AtomicU64,
    }

    static GATE: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        /// Only frees of a thread that sets this are paused.
        static PAUSE_HERE: Cell<bool> = const { Cell::new(false) };
    }

    fn gate() -> &'static Gate {
        // SAFETY: GATE holds the address of a live SharedMem<Gate> for as
        // long as the hook is installed (set before, cleared after).
        unsafe { &*(GATE.load(Ordering::SeqCst) as *const Gate) }
    }

    /// The hook: a marked thread reaching `FreeLoaded` says so, then spins
    /// `spin` rounds, or (`spin == 0`) waits for `go`.
    fn pause(p: CrashPoint) {
        if p == CrashPoint::FreeLoaded && PAUSE_HERE.with(|c| c.get()) {
            let g = gate();
            g.reached.store(1, Ordering::SeqCst);
            let spin = g.spin.load(Ordering::SeqCst);
            if spin == 0 {
                let _ = wait_until(T, || g.go.load(Ordering::SeqCst) == 1);
            }
            for i in 0..spin {
                if i % 256 == 255 {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        }
    }

    fn with_gate<R>(f: impl FnOnce(&Gate) -> R) -> R {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: Gate is made of atomics, valid when zero.
        let g = unsafe { SharedMem::<Gate>::new() };
        GATE.store(&*g as *const Gate as u64, Ordering::SeqCst);
        crashpoint::on_hit(Some(pause));
        let r = f(&g);
        crashpoint::on_hit(None);
        GATE.store(0, Ordering::SeqCst);
        r
    }

    fn clean(p: &Pool) {
        assert_eq!(p.check(), Vec::<String>::new());
    }

    /// Thread A frees block b and is paused after reading its descriptor;
    /// thread B (same process) frees b (into the process's cache) and
    /// allocates the same length, getting b back. A's free must now fail:
    /// b is B's live allocation.
    #[test]
    fn a_late_double_free_from_a_sibling_thread_fails() {
        let _serial = serial();
        let _w = Watchdog::new("double free, threads", 60);
        with_gate(|g| {
            let p = Arc::new(anon(256));
            let pg = p.geometry().page_size;
            let b = p.alloc(pg).unwrap();
            let p2 = p.clone();
            let late = std::thread::spawn(move || {
                PAUSE_HERE.with(|c| c.set(true));
                p2.free(b)
            });
            wait_until(T, || g.reached.load(Ordering::SeqCst) == 1).unwrap();
            assert_eq!(p.free(b), Ok(pg), "the first free");
            assert_eq!(p.alloc(pg), Ok(b), "the re-allocation (from the cache)");
            g.go.store(1, Ordering::SeqCst);
            let r = late.join().unwrap();
            assert_eq!(r, Err(Error::NotABlock), "the late double free");
            // The pool is unchanged: b is still live and is not handed out
            // again.
            assert_eq!(p.size(b), Ok(pg));
            let c = p.alloc(pg).unwrap();
            assert_ne!(c, b, "b handed out twice");
            clean(&p);
        });
    }

    /// The same from another process: its free of the parent's block goes
    /// through the pool lock, and is paused before it (after reading the
    /// descriptor) while the parent frees and re-allocates the block.
    #[test]
    fn a_late_double_free_from_another_process_fails() {
        let _serial = serial();
        let _w = Watchdog::new("double free, processes", 60);
        with_gate(|g| {
            let p = anon(256);
            let pg = p.geometry().page_size;
            let b = p.alloc(pg).unwrap();
            let _keep = p.alloc(pg).unwrap();
            let mut child = fork_child(|| {
                die_with_parent();
                PAUSE_HERE.with(|c| c.set(true));
                match p.free(b) {
                    Err(Error::NotABlock) => Ok(()),
                    r => Err(format!("late free from another process gave {r:?}")),
                }
            });
            wait_until(T, || g.reached.load(Ordering::SeqCst) == 1).unwrap();
            assert_eq!(p.free(b), Ok(pg), "the first free");
            assert_eq!(p.alloc(pg), Ok(b), "the re-allocation (from the cache)");
            g.go.store(1, Ordering::SeqCst);
            child.wait_ok(T).unwrap();
            assert_eq!(p.size(b), Ok(pg), "b is still the parent's");
            p.set_caching(false).unwrap();
            let c = p.alloc(pg).unwrap();
            assert_ne!(c, b, "b handed out twice");
            clean(&p);
        });
    }

    /// The same when the block went back to the free runs in between and
    /// was allocated again from them (the locked path on both sides).
    #[test]
    fn a_late_double_free_across_a_reallocation_from_the_runs_fails() {
        let _serial = serial();
        let _w = Watchdog::new("double free, runs", 60);
        with_gate(|g| {
            let p = Arc::new(anon(256));
            p.set_caching(false).unwrap();
            let pg = p.geometry().page_size;
            let b = p.alloc(3 * pg).unwrap();
            let p2 = p.clone();
            let late = std::thread::spawn(move || {
                PAUSE_HERE.with(|c| c.set(true));
                p2.free(b)
            });
            wait_until(T, || g.reached.load(Ordering::SeqCst) == 1).unwrap();
            assert_eq!(p.free(b), Ok(3 * pg));
            assert_eq!(p.alloc(3 * pg), Ok(b), "best fit gives the same run back");
            g.go.store(1, Ordering::SeqCst);
            assert_eq!(late.join().unwrap(), Err(Error::NotABlock));
            assert_eq!(p.size(b), Ok(3 * pg));
            clean(&p);
        });
    }

    /// Many rounds of two concurrent frees of one block, in two threads of
    /// one process and in two processes, the winner re-allocating at once.
    /// The loser's free is held at `FreeLoaded` for a random while. The
    /// rule checked: when the loser had read the descriptor before the
    /// winner's free began, the loser must fail. (A loser that reads the
    /// descriptor only after the re-allocation frees the new block: a
    /// correct free as far as anyone can tell, so not checked.)
    ///
    /// The winner tells so by `reached` before it frees: the loser sets it
    /// after its read. Looking after the re-allocation instead (the first
    /// version) also counted a loser that read the new block's word in
    /// between, whose free rightly succeeds: a false "violation" in about
    /// 1 run in 20, on main as on the branches.
    #[test]
    fn racing_double_frees_never_free_a_reallocated_block() {
        let _serial = serial();
        let _w = Watchdog::new("double free stress", 240);
        let rounds = 400 * scale();
        with_gate(|g| {
            let mut violations = 0u64;
            let mut raced = 0u64;
            for cross_process in [false, true] {
                let p = anon(1024);
                let pg = p.geometry().page_size;
                // SAFETY: Board is made of atomics, valid when zero.
                let board = unsafe { SharedMem::<Board>::new() };
                let loser = |p: &Pool, board: &Board| -> Result<(), String> {
                    PAUSE_HERE.with(|c| c.set(true));
                    let mut rng = Rng(7);
                    for r in 1..=rounds {
                        wait_until(T, || board.posted.load(Ordering::SeqCst) == r)?;
                        gate().spin.store(1 + rng.below(3000), Ordering::SeqCst);
                        gate().reached.store(0, Ordering::SeqCst);
                        let b = board.block.load(Ordering::SeqCst) as usize;
                        board.loser_ready.store(r, Ordering::SeqCst);
                        let ok = p.free(b).is_ok();
                        board.loser_ok.store(ok as u64, Ordering::SeqCst);
                        board.loser_done.store(r, Ordering::SeqCst);
                    }
                    Ok(())
                };
                let board: &Board = &board;
                std::thread::scope(|sc| {
                    let mut child = None;
                    let mut thread = None;
                    if cross_process {
                        child = Some(fork_child(|| {
                            die_with_parent();
                            loser(&p, board)
                        }));
                    } else {
                        thread = Some(sc.spawn(|| loser(&p, board)));
                    }
                    for r in 1..=rounds {
                        let b = p.alloc(pg).unwrap();
                        board.block.store(b as u64, Ordering::SeqCst);
                        board.posted.store(r, Ordering::SeqCst);
                        wait_until(T, || board.loser_ready.load(Ordering::SeqCst) == r).unwrap();
                        // Mostly let the loser read first (the race under
                        // test), now and then not (the other orders).
                        if r % 4 != 0 {
                            let _ = wait_until(Duration::from_millis(2), || {
                                g.reached.load(Ordering::SeqCst) == 1
                            });
                        }
                        // Whether the loser's free has read the descriptor
                        // before ours begins: then it read b's live word.
                        let early = g.reached.load(Ordering::SeqCst) == 1;
                        let mine = p.free(b).is_ok();
                        let again = if mine {
                            Some(p.alloc(pg).unwrap())
                        } else {
                            None
                        };
                        wait_until(T, || board.loser_done.load(Ordering::SeqCst) == r).unwrap();
                        let theirs = board.loser_ok.load(Ordering::SeqCst) == 1;
                        assert!(mine || theirs, "round {r}: neither free succeeded");
                        if mine && early && again == Some(b) {
                            raced += 1;
                            if theirs {
                                violations += 1;
                            }
                        }
                        // Clean up: our re-allocation, unless the loser freed it.
                        if let Some(a) = again {
                            let _ = p.free(a);
                        }
                    }
                    if let Some(t) = thread {
                        t.join().unwrap().unwrap();
                    }
                    if let Some(mut c) = child {
                        c.wait_ok(T).unwrap();
                    }
                });
                clean(&p);
                p.set_caching(false).unwrap();
                let s = p.stats();
                assert_eq!(s.free_bytes, s.payload_bytes, "every block came back");
                assert_eq!(s.largest_free_bytes, s.payload_bytes);
            }
            println!(
                "torture double-free: {rounds} rounds x 2 (threads, processes), \
                 {raced} late frees caught in the window, {violations} of them succeeded"
            );
            assert_eq!(
                violations, 0,
                "late double frees freed a re-allocated block"
            );
        });
    }

    #[repr(C)]
    struct Board {
        posted: AtomicU64,
        block: AtomicU64,
        loser_ready: AtomicU64,
        loser_ok: AtomicU64,
        loser_done: AtomicU64,
    }
}

#[cfg(not(feature = "crash-points"))]
#[test]
fn double_free_races_need_crash_points() {
    let _serial = common::serial();
    println!("SKIPPED: the double-free race tests need --features crash-points");
}
