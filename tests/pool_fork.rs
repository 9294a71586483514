//! The real `Pool` shared by forked processes: anonymous (memfd) and named
//! pools, attach by name, rejection of non-pools, per-process usage and
//! reclaiming the blocks of dead processes.

mod common;

use common::*;
use shmpool::{CreateOptions, Error, Pool};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn anon(bytes: usize) -> Pool {
    Pool::create(bytes, &CreateOptions::default()).expect("create anonymous pool")
}

fn named(name: &ShmName, bytes: usize) -> Pool {
    let opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: false,
    };
    Pool::create(bytes, &opts).expect("create named pool")
}

fn me() -> i32 {
    std::process::id() as i32
}

fn ok(p: &Pool) {
    let v = p.check();
    assert!(v.is_empty(), "check: {v:#?}");
}

/// Stats without the recovery counter's noise: (free, largest, live).
fn shape(p: &Pool) -> (usize, usize, u64) {
    let s = p.stats();
    (s.free_bytes, s.largest_free_bytes, s.live_blocks)
}

const N: usize = 4;
const M: usize = 24;
const ROUNDS: u32 = 4;

#[repr(C)]
struct Board {
    /// Children arrived at barriers, cumulative.
    arrived: AtomicU32,
    /// Highest barrier released by the parent.
    released: AtomicU32,
    pids: [AtomicI32; N],
    /// Pages each child holds at the first barrier of a round.
    pages: [AtomicU64; N],
    offs: [[AtomicU64; M]; N],
    sizes: [[AtomicU64; M]; N],
}

fn word(pid: i32, j: usize, round: u32) -> u64 {
    (pid as u64) << 32 | (round as u64) << 16 | j as u64
}

/// Child `i` of `children_share_alloc_and_free_each_others_blocks`.
fn worker(pool: &Pool, b: &Board, i: usize) -> Result<(), String> {
    let pid = me();
    let pg = pool.geometry().page_size;
    b.pids[i].store(pid, Ordering::SeqCst);
    let mut barrier_no = 0u32;
    let mut barrier = || -> Result<(), String> {
        barrier_no += 1;
        b.arrived.fetch_add(1, Ordering::SeqCst);
        wait_until(T, || b.released.load(Ordering::SeqCst) >= barrier_no)
    };
    let mut rng = Rng(0x5eed + i as u64);
    for round in 0..ROUNDS {
        // 1. Allocate and stamp M blocks, publish them.
        let mut total = 0;
        for j in 0..M {
            let pages = if rng.below(8) == 0 {
                1 + rng.below(40)
            } else {
                1 + rng.below(6)
            } as usize;
            let off = pool
                .alloc(pages * pg - rng.below(pg as u64) as usize)
                .map_err(|e| format!("alloc: {e}"))?;
            stamp(pool, off, pages * pg, word(pid, j, round));
            b.offs[i][j].store(off as u64, Ordering::SeqCst);
            b.sizes[i][j].store((pages * pg) as u64, Ordering::SeqCst);
            total += pages as u64;
        }
        b.pages[i].store(total, Ordering::SeqCst);
        barrier()?; // the parent checks owners() and overlaps
                    // 2. Everybody's stamps are intact: no block was handed out twice.
        let k = (i + 1) % N;
        let kpid = b.pids[k].load(Ordering::SeqCst);
        for j in 0..M {
            for (who, wpid) in [(i, pid), (k, kpid)] {
                let off = b.offs[who][j].load(Ordering::SeqCst) as usize;
                let sz = b.sizes[who][j].load(Ordering::SeqCst) as usize;
                if !stamped(pool, off, sz, word(wpid, j, round)) {
                    return Err(format!(
                        "round {round}: block {j} of child {who} overwritten"
                    ));
                }
                if pool.size(off) != Ok(sz) {
                    return Err(format!("size({off}) = {:?}, want {sz}", pool.size(off)));
                }
            }
        }
        barrier()?;
        // 3. Free our even blocks and our neighbour's odd ones.
        for j in 0..M {
            let who = if j % 2 == 0 { i } else { k };
            let off = b.offs[who][j].load(Ordering::SeqCst) as usize;
            let sz = b.sizes[who][j].load(Ordering::SeqCst) as usize;
            match pool.free(off) {
                Ok(s) if s == sz => {}
                r => return Err(format!("free of block {j} of child {who}: {r:?}")),
            }
        }
        // Our own freed blocks may sit in this process's cache; give them
        // back so that they coalesce before the parent looks.
        pool.flush_cache().map_err(|e| e.to_string())?;
        barrier()?; // the parent checks that everything is free again
    }
    Ok(())
}

#[test]
fn children_share_alloc_and_free_each_others_blocks() {
    let _serial = serial();
    let _w = Watchdog::new("children_share", 60);
    let pool = anon(64 << 20);
    let pg = pool.geometry().page_size;
    let mbox = pool.alloc(std::mem::size_of::<Board>()).unwrap();
    // SAFETY: a fresh block (zeroed memfd pages) large enough for Board.
    let b: &Board = unsafe { shared(&pool, mbox) };
    let initial = shape(&pool);
    let mut kids: Vec<Child> = (0..N)
        .map(|i| {
            let pool = &pool;
            fork_child(move || worker(pool, b, i))
        })
        .collect();
    // Waits for all children at barrier n; fails at once if one ended.
    let release = |kids: &mut Vec<Child>, n: u32| -> Result<(), String> {
        wait_until(T, || {
            b.arrived.load(Ordering::SeqCst) >= n * N as u32
                || kids.iter_mut().any(|k| k.poll().is_some())
        })?;
        for (i, k) in kids.iter_mut().enumerate() {
            if let Some(st) = k.poll() {
                return Err(format!("child {i} ended early: {}", describe(st)));
            }
        }
        Ok(())
    };
    for round in 0..ROUNDS {
        let base = round * 3;
        release(&mut kids, base + 1).unwrap();
        // Every child's blocks: owners() per process, no overlap, sizes.
        ok(&pool);
        let owners = pool.owners().unwrap();
        let mut spans = Vec::new();
        for (i, k) in kids.iter().enumerate() {
            assert_eq!(b.pids[i].load(Ordering::SeqCst), k.pid);
            let o = owners
                .iter()
                .find(|o| o.pid == k.pid)
                .expect("child in owners()");
            assert!(o.alive);
            assert_eq!(
                o.pages,
                b.pages[i].load(Ordering::SeqCst),
                "child {i} pages"
            );
            assert_eq!(o.blocks, M as u64);
            for j in 0..M {
                let off = b.offs[i][j].load(Ordering::SeqCst) as usize;
                let sz = b.sizes[i][j].load(Ordering::SeqCst) as usize;
                assert_eq!(pool.owner_of(off), Ok(k.pid));
                spans.push((off, off + sz));
            }
        }
        let me_o = owners
            .iter()
            .find(|o| o.pid == me())
            .expect("parent in owners()");
        assert_eq!((me_o.pages, me_o.blocks), (1, 1));
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "blocks overlap: {w:?}");
        }
        let held: usize = spans.iter().map(|s| s.1 - s.0).sum();
        assert_eq!(pool.stats().free_bytes, initial.0 - held);
        b.released.store(base + 1, Ordering::SeqCst);
        release(&mut kids, base + 2).unwrap();
        b.released.store(base + 2, Ordering::SeqCst);
        release(&mut kids, base + 3).unwrap();
        ok(&pool);
        assert_eq!(
            shape(&pool),
            initial,
            "round {round}: not back to the initial state"
        );
        b.released.store(base + 3, Ordering::SeqCst);
    }
    for k in kids.iter_mut() {
        k.wait_ok(T).unwrap();
    }
    ok(&pool);
    assert_eq!(shape(&pool), initial);
    // The children are gone: their slots hold nothing, reclaim frees nothing.
    let owners = pool.owners().unwrap();
    for k in &kids {
        let o = owners.iter().find(|o| o.pid == k.pid).unwrap();
        assert!(!o.alive);
        assert_eq!((o.pages, o.blocks), (0, 0));
    }
    let r = pool.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (0, 0));
    assert_eq!(r.owners.len(), N);
    assert!(pool.owners().unwrap().iter().all(|o| o.pid == me()));
    pool.free(mbox).unwrap();
    assert_eq!(pool.stats().free_bytes, pool.stats().payload_bytes);
    assert_eq!(pool.stats().largest_free_bytes, pool.stats().payload_bytes);
    assert_eq!(pg, pool.stats().page_size);
}

#[repr(C)]
struct Mail {
    offs: [AtomicU64; 8],
    count: AtomicU32,
    go: AtomicU32,
}

#[test]
fn named_pool_attached_by_a_child() {
    let _serial = serial();
    let _w = Watchdog::new("named_pool_attached_by_a_child", 30);
    let name = ShmName::new();
    let pool = named(&name, 4 << 20);
    assert_eq!(pool.name(), Some(name.as_str().as_ref()));
    let pg = pool.geometry().page_size;
    let mbox = pool.alloc(pg).unwrap();
    let initial = shape(&pool);
    let geo = pool.geometry();
    let n = name.as_str().to_string();
    let mut child = fork_child(move || {
        // A fresh mapping of the object, at another address.
        let p = Pool::attach(&n).map_err(|e| format!("attach: {e}"))?;
        if p.geometry() != geo || p.name() != Some(n.as_str().as_ref()) {
            return Err("attached geometry differs".into());
        }
        // SAFETY: the parent's mailbox block, zeroed.
        let m: &Mail = unsafe { shared(&p, mbox) };
        let pid = me();
        for (i, pages) in [3usize, 1, 7, 2].into_iter().enumerate() {
            let off = p.alloc(pages * pg).map_err(|e| e.to_string())?;
            stamp(&p, off, pages * pg, pid as u64 + i as u64);
            m.offs[i].store(off as u64, Ordering::SeqCst);
        }
        // Free the second one ourselves; the parent sees the other three.
        p.free(m.offs[1].load(Ordering::SeqCst) as usize)
            .map_err(|e| e.to_string())?;
        m.count.store(4, Ordering::SeqCst);
        Ok(())
    });
    child.wait_ok(T).unwrap();
    // SAFETY: as above.
    let m: &Mail = unsafe { shared(&pool, mbox) };
    assert_eq!(m.count.load(Ordering::SeqCst), 4);
    ok(&pool);
    let mut child_pages = 0;
    for (i, pages) in [(0usize, 3usize), (2, 7), (3, 2)] {
        let off = m.offs[i].load(Ordering::SeqCst) as usize;
        assert_eq!(pool.size(off), Ok(pages * pg));
        assert_eq!(pool.owner_of(off), Ok(child.pid));
        assert!(stamped(&pool, off, pages * pg, child.pid as u64 + i as u64));
        child_pages += pages;
    }
    assert_eq!(
        pool.size(m.offs[1].load(Ordering::SeqCst) as usize),
        Err(Error::NotABlock)
    );
    assert_eq!(pool.stats().free_bytes, initial.0 - child_pages * pg);
    // The child is dead: reclaim_dead returns exactly its pages.
    let r = pool.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (3, child_pages as u64));
    assert_eq!(r.owners, vec![(child.pid, child_pages as u64)]);
    assert_eq!(shape(&pool), initial);
    ok(&pool);
    // Unlink: the name is gone, the mapping still works.
    pool.unlink().unwrap();
    assert!(matches!(
        Pool::attach(name.as_str()),
        Err(Error::Io(_, nix::errno::Errno::ENOENT))
    ));
    let off = pool.alloc(1).unwrap();
    pool.free(off).unwrap();
    ok(&pool);
    drop(pool);
    drop(name);
    assert_no_leftover_shm();
}

fn shm_object(name: &ShmName, len: i64) {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let fd = nix::sys::mman::shm_open(
        name.as_str(),
        OFlag::O_CREAT | OFlag::O_RDWR,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, len).unwrap();
}

fn not_a_pool(name: &ShmName) -> String {
    match Pool::attach(name.as_str()) {
        Err(Error::NotAPool(why)) => why,
        Err(e) => panic!("attach gave {e:?}, want NotAPool"),
        Ok(_) => panic!("attach accepted a non-pool"),
    }
}

#[test]
fn attach_rejects_what_is_not_a_pool() {
    let _serial = serial();
    let pg = shmpool::mapping::page_size();
    // Objects that never were pools: zeros of various sizes, and empty.
    for len in [0i64, 1, 100, 4096, 1 << 20] {
        let name = ShmName::new();
        shm_object(&name, len);
        let why = not_a_pool(&name);
        assert!(!why.is_empty(), "{len}");
    }
    // A pool truncated to less than its geometry.
    let name = ShmName::new();
    let total = {
        let p = named(&name, 64 * pg);
        let a = p.alloc(5 * pg).unwrap();
        p.free(a).unwrap();
        p.stats().total_bytes
    };
    // Still fine whole (another process attaching).
    {
        let p = Pool::attach(name.as_str()).unwrap();
        assert_eq!(p.stats().total_bytes, total);
        ok(&p);
    }
    let header = shmpool::layout::Geometry::for_pages(64, pg)
        .unwrap()
        .payload_offset;
    for len in [total - 1, total - pg, total / 2, header, 4096, 64, 8] {
        shm_object(&name, len as i64);
        let why = not_a_pool(&name);
        assert!(!why.is_empty());
    }
    // Wrong version or page size in an otherwise valid pool.
    let name2 = ShmName::new();
    let p = named(&name2, 16 * pg);
    let hdr = p.base();
    for (off, bytes) in [(8usize, 0xdead_u32), (12, 12345)] {
        // SAFETY: the header's layout_version (offset 8) and page_size
        // (offset 12) fields of our own pool; restored right after.
        unsafe {
            let f = hdr.add(off).cast::<u32>();
            let old = f.read();
            f.write(bytes);
            let why = not_a_pool(&name2);
            assert!(!why.is_empty());
            f.write(old);
        }
    }
    assert!(Pool::attach(name2.as_str()).is_ok());
    // Missing object, bad names.
    let gone = ShmName::new();
    assert!(matches!(
        Pool::attach(gone.as_str()),
        Err(Error::Io(_, nix::errno::Errno::ENOENT))
    ));
    for bad in ["noslash", "/a/b", "/", ""] {
        assert!(
            matches!(Pool::attach(bad), Err(Error::BadName(_))),
            "{bad:?}"
        );
    }
    // Creating over an existing name fails and leaves it alone.
    let opts = CreateOptions {
        name: Some(name2.as_str().into()),
        prefault: true,
    };
    assert!(matches!(
        Pool::create(pg, &opts),
        Err(Error::Io(_, nix::errno::Errno::EEXIST))
    ));
    assert!(Pool::attach(name2.as_str()).is_ok());
    drop(p);
}

#[repr(C)]
struct Hold {
    ready: AtomicU32,
    done: AtomicU32,
    offs: [AtomicU64; 4],
}

#[test]
fn reclaim_dead_frees_exactly_the_dead_and_spares_the_living() {
    let _serial = serial();
    let _w = Watchdog::new("reclaim_dead", 30);
    let pool = anon(8 << 20);
    let pg = pool.geometry().page_size;
    let mbox = pool.alloc(pg).unwrap();
    // The parent's own blocks, stamped.
    let mine: Vec<(usize, usize)> = [2usize, 9, 1]
        .iter()
        .map(|&n| {
            let o = pool.alloc(n * pg).unwrap();
            stamp(&pool, o, n * pg, 0xAAAA_0000 + n as u64);
            (o, n)
        })
        .collect();
    let initial = shape(&pool);
    // SAFETY: the mailbox block, zeroed.
    let h: &Hold = unsafe { shared(&pool, mbox) };
    const SIZES_A: [usize; 3] = [4, 1, 130];
    const SIZES_B: [usize; 2] = [3, 6];
    const SIZES_C: [usize; 1] = [2];
    let (sizes_a, sizes_b, sizes_c) = (&SIZES_A, &SIZES_B, &SIZES_C);
    let holder = |sizes: &'static [usize], stay: bool| {
        let pool = &pool;
        move || -> Result<(), String> {
            for (i, &n) in sizes.iter().enumerate() {
                let o = pool.alloc(n * pg).map_err(|e| e.to_string())?;
                stamp(pool, o, n * pg, me() as u64);
                if stay {
                    h.offs[i].store(o as u64, Ordering::SeqCst);
                }
            }
            if stay {
                h.ready.store(1, Ordering::SeqCst);
                wait_until(T, || h.done.load(Ordering::SeqCst) == 1)?;
                for (i, &n) in sizes.iter().enumerate() {
                    let o = h.offs[i].load(Ordering::SeqCst) as usize;
                    if !stamped(pool, o, n * pg, me() as u64) {
                        return Err("a live block was touched".into());
                    }
                    pool.free(o).map_err(|e| format!("free own block: {e}"))?;
                }
                pool.flush_cache().map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    };
    // A: exits holding blocks. B: stays alive. C: exits, not yet reaped.
    let mut a = fork_child(holder(sizes_a, false));
    a.wait_ok(T).unwrap();
    let mut b = fork_child(holder(sizes_b, true));
    wait_until(T, || h.ready.load(Ordering::SeqCst) == 1).unwrap();
    let c = fork_child(holder(sizes_c, false));
    // C exits and is not reaped: dead for reclaim_dead once its threads
    // are gone (the kernel then marks its keeper mutex, a moment after its
    // /proc entry says zombie).
    wait_until(T, || {
        shmpool::owner::start_time_of(c.pid).is_none()
            && pool
                .owners()
                .unwrap()
                .iter()
                .any(|o| o.pid == c.pid && !o.alive)
    })
    .unwrap();
    ok(&pool);
    let pa: u64 = sizes_a.iter().sum::<usize>() as u64;
    let pb: u64 = sizes_b.iter().sum::<usize>() as u64;
    let pc: u64 = sizes_c.iter().sum::<usize>() as u64;
    let owners = pool.owners().unwrap();
    let find = |pid: i32| *owners.iter().find(|o| o.pid == pid).unwrap();
    assert_eq!(
        (find(a.pid).alive, find(a.pid).pages, find(a.pid).blocks),
        (false, pa, 3)
    );
    assert_eq!(
        (find(b.pid).alive, find(b.pid).pages, find(b.pid).blocks),
        (true, pb, 2)
    );
    assert_eq!((find(c.pid).alive, find(c.pid).pages), (false, pc));
    assert_eq!(
        (find(me()).alive, find(me()).pages, find(me()).blocks),
        (true, 13, 4)
    );
    assert_eq!(
        pool.stats().free_bytes,
        initial.0 - (pa + pb + pc) as usize * pg
    );

    let r = pool.reclaim_dead().unwrap();
    assert_eq!((r.blocks, r.pages), (4, pa + pc));
    let mut ro = r.owners.clone();
    ro.sort();
    let mut want = vec![(a.pid, pa), (c.pid, pc)];
    want.sort();
    assert_eq!(ro, want);
    ok(&pool);
    assert_eq!(pool.stats().free_bytes, initial.0 - pb as usize * pg);
    // B's and the parent's blocks are untouched.
    for (i, &n) in sizes_b.iter().enumerate() {
        let o = h.offs[i].load(Ordering::SeqCst) as usize;
        assert_eq!(pool.size(o), Ok(n * pg));
        assert_eq!(pool.owner_of(o), Ok(b.pid));
    }
    for &(o, n) in &mine {
        assert_eq!(pool.size(o), Ok(n * pg));
        assert!(stamped(&pool, o, n * pg, 0xAAAA_0000 + n as u64));
    }
    // Nothing more to reclaim; the dead slots are gone.
    let r2 = pool.reclaim_dead().unwrap();
    assert_eq!((r2.blocks, r2.pages, r2.owners.len()), (0, 0, 0));
    let owners = pool.owners().unwrap();
    assert!(owners.iter().all(|o| o.pid != a.pid && o.pid != c.pid));
    // B checks its stamps, frees its blocks and exits.
    h.done.store(1, Ordering::SeqCst);
    b.wait_ok(T).unwrap();
    drop(c);
    ok(&pool);
    assert_eq!(shape(&pool), initial);
    for (o, _) in mine {
        pool.free(o).unwrap();
    }
    pool.free(mbox).unwrap();
    let s = pool.stats();
    assert_eq!((s.free_bytes, s.live_blocks), (s.payload_bytes, 0));
}

#[test]
fn a_child_inherits_an_anonymous_pool_and_registers_itself() {
    let _serial = serial();
    let _w = Watchdog::new("inherit", 30);
    let pool = anon(1 << 20);
    let pg = pool.geometry().page_size;
    // The parent registers first (its slot is cached); the child must not
    // reuse that cached slot after fork.
    let a = pool.alloc(pg).unwrap();
    let pool_ref = &pool;
    let mut k = fork_child(move || {
        let o = pool_ref.alloc(2 * pg).map_err(|e| e.to_string())?;
        if pool_ref.owner_of(o) != Ok(me()) {
            return Err(format!("owner_of = {:?}", pool_ref.owner_of(o)));
        }
        if pool_ref.owner_of(a) == Ok(me()) {
            return Err("the parent's block is attributed to the child".into());
        }
        Ok(())
    });
    k.wait_ok(T).unwrap();
    assert_eq!(pool.owner_of(a), Ok(me()));
    let owners = pool.owners().unwrap();
    let c = owners.iter().find(|o| o.pid == k.pid).expect("child slot");
    assert_eq!((c.pages, c.blocks, c.alive), (2, 1, false));
    let p = owners.iter().find(|o| o.pid == me()).unwrap();
    assert_eq!((p.pages, p.blocks, p.alive), (1, 1, true));
    assert_eq!(pool.reclaim_dead().unwrap().pages, 2);
    pool.free(a).unwrap();
    ok(&pool);
}

/// A named pool's object is in /dev/shm from `create` until `unlink`, and
/// gone after it. Only this test's own names are looked at (other tests
/// run alongside), and all of it before the name guards unlink them: the
/// guards' cleanup cannot make it pass.
#[test]
fn no_shm_left_behind() {
    let _serial = serial();
    let pg = shmpool::mapping::page_size();
    let names: Vec<ShmName> = (0..2).map(|_| ShmName::new()).collect();
    for (name, prefault) in names.iter().zip([false, true]) {
        let n = name.as_str();
        let opts = CreateOptions {
            name: Some(n.into()),
            prefault,
        };
        let p = Pool::create(64 * pg, &opts).unwrap();
        // The check below can see objects: this one is there.
        assert!(shm_exists(n), "{n}: created, but not in /dev/shm");
        // Creating it again fails and leaves it alone.
        assert!(matches!(
            Pool::create(pg, &opts),
            Err(Error::Io(_, nix::errno::Errno::EEXIST))
        ));
        assert!(shm_exists(n), "{n}: removed by a failed create");
        let a = p.alloc(3 * pg).unwrap();
        p.free(a).unwrap();
        // Closing a pool keeps its name, for processes attaching later.
        drop(p);
        assert!(shm_exists(n), "{n}: removed by closing the pool");
        let q = Pool::attach(n).unwrap();
        q.unlink().unwrap();
        assert!(!shm_exists(n), "{n}: still in /dev/shm after unlink");
        // The mapping outlives the name; the name is not unlinked twice.
        let b = q.alloc(pg).unwrap();
        q.free(b).unwrap();
        ok(&q);
        assert!(matches!(
            q.unlink(),
            Err(Error::Io(_, nix::errno::Errno::ENOENT))
        ));
        drop(q);
        assert!(!shm_exists(n), "{n}: back in /dev/shm");
    }
}
