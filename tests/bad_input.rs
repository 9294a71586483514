//! Bad input to a real `Pool`: each is an `Err` and leaves the pool exactly
//! as it was (stats, check and debug_info identical before and after). Bad
//! shm names are refused and create nothing; good ones are any bytes. A
//! pool's memory stays mapped while a `KeepAlive` of it lives (what keeps
//! OCaml's blocks of a closed pool from landing in another pool).

mod common;

use shmpool::{mapping, CreateOptions, Error, Pool};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

fn pool(bytes: usize) -> Pool {
    Pool::create(bytes, &CreateOptions::default()).unwrap()
}

/// Everything observable, to compare before/after.
fn picture(p: &Pool) -> (shmpool::Stats, Vec<String>, String) {
    (p.stats(), p.check(), p.debug_info())
}

/// A pool with small and tree runs free and blocks of various sizes live.
/// Returns the pool and its live blocks `(offset, bytes)`.
fn fragmented() -> (Pool, Vec<(usize, usize)>) {
    let p = pool(4 << 20);
    let pg = p.geometry().page_size;
    let sizes = [1usize, 3, 2, 200, 1, 5, 1, 150, 4, 1];
    let offs: Vec<usize> = sizes.iter().map(|&n| p.alloc(n * pg).unwrap()).collect();
    let mut live = Vec::new();
    for (i, (&o, &n)) in offs.iter().zip(&sizes).enumerate() {
        if [1, 3, 5, 8].contains(&i) {
            live.push((o, n * pg));
        } else {
            p.free(o).unwrap();
        }
    }
    assert!(p.check().is_empty());
    (p, live)
}

#[test]
fn bad_sizes() {
    let (p, _) = fragmented();
    let before = picture(&p);
    assert!(before.1.is_empty(), "{:?}", before.1);
    let s = before.0;
    let cases: Vec<(usize, Error)> = vec![
        (0, Error::BadSize),
        (s.payload_bytes + 1, Error::OutOfMemory),
        (s.total_bytes * 2, Error::OutOfMemory),
        (s.largest_free_bytes + 1, Error::OutOfMemory),
        (s.free_bytes + 1, Error::OutOfMemory),
        (usize::MAX, Error::OutOfMemory),
        (usize::MAX - s.page_size, Error::OutOfMemory),
        ((u32::MAX as usize + 1) * s.page_size, Error::OutOfMemory),
        (1 << 62, Error::OutOfMemory),
    ];
    for (bytes, want) in cases {
        assert_eq!(p.alloc(bytes), Err(want), "alloc({bytes})");
        assert_eq!(picture(&p), before, "alloc({bytes}) changed the pool");
    }
}

#[test]
fn bad_addresses() {
    let (p, live) = fragmented();
    let g = p.geometry();
    let pg = g.page_size;
    let (dead, dead_len) = live[0]; // 3 pages
    assert_eq!(p.free(dead), Ok(dead_len));
    let before = picture(&p);
    assert!(before.1.is_empty());
    let (big, big_len) = live[1]; // 200 pages
    assert_eq!(big_len, 200 * pg);
    let mut bad = vec![
        dead,                    // double free
        dead + pg,               // inside the freed block
        big + pg,                // interior page of a live block
        big + big_len - pg,      // its last page
        big + 1,                 // unaligned inside a live block
        big + pg / 2,            // unaligned
        big - 1,                 // unaligned, just before it
        0,                       // the header
        8,                       // the header, aligned to 8
        g.desc_offset,           // the descriptors
        g.payload_offset - pg,   // last page before the payload
        g.payload_offset - 1,    // unaligned before the payload
        g.total_len,             // one past the end
        g.total_len + pg,        // further out
        g.total_len - 1,         // unaligned last byte
        usize::MAX,              // nonsense
        usize::MAX - pg + 1,     // page-aligned nonsense
        isize::MAX as usize + 1, // nonsense
    ];
    // Heads of free runs (never blocks), and a page in the last free run.
    bad.push(g.payload_offset);
    bad.push(g.payload_offset + 1);
    bad.push(g.total_len - pg);
    for off in bad {
        assert_eq!(p.free(off), Err(Error::NotABlock), "free({off:#x})");
        assert_eq!(p.size(off), Err(Error::NotABlock), "size({off:#x})");
        assert_eq!(p.owner_of(off), Err(Error::NotABlock), "owner_of({off:#x})");
        assert_eq!(picture(&p), before, "free({off:#x}) changed the pool");
    }
    // The live blocks are still fine and free normally.
    for &(o, n) in &live {
        if o != dead {
            assert_eq!(p.size(o), Ok(n));
            assert_eq!(p.free(o), Ok(n));
        }
    }
    let s = p.stats();
    assert_eq!((s.free_bytes, s.live_blocks), (s.payload_bytes, 0));
    assert!(p.check().is_empty());
}

#[test]
fn bad_create_sizes() {
    assert_eq!(
        Pool::create(0, &CreateOptions::default()).err(),
        Some(Error::BadSize)
    );
    assert_eq!(
        Pool::create(usize::MAX, &CreateOptions::default()).err(),
        Some(Error::BadSize)
    );
    // The smallest pool: one page.
    let p = pool(1);
    let pg = p.geometry().page_size;
    assert_eq!(p.stats().payload_bytes, pg);
    let a = p.alloc(pg).unwrap();
    assert_eq!(p.alloc(1), Err(Error::OutOfMemory));
    assert_eq!(p.free(a), Ok(pg));
    assert_eq!(p.free(a), Err(Error::NotABlock));
    assert!(p.check().is_empty());
}

#[test]
fn sizes_round_up_to_pages() {
    let p = pool(1 << 20);
    let pg = p.geometry().page_size;
    for (bytes, pages) in [
        (1usize, 1usize),
        (pg - 1, 1),
        (pg, 1),
        (pg + 1, 2),
        (3 * pg, 3),
    ] {
        let o = p.alloc(bytes).unwrap();
        assert_eq!((o - p.geometry().payload_offset) % pg, 0);
        assert_eq!(p.size(o), Ok(pages * pg));
        assert_eq!(p.free(o), Ok(pages * pg));
    }
    assert!(p.check().is_empty());
}

/// Names `shm_open` would misread or refuse: empty, no slash, nothing
/// after it, extra slashes, NUL bytes, longer than 254 bytes after the
/// slash. Not UTF-8 is not a reason.
fn bad_names() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        &b""[..],
        b"noslash",
        b"/",
        b"//a",
        b"/a/",
        b"/a/b",
        b"/a\0b",
        b"\0",
        b"/\0",
        b"/\xff/\xfe",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    v.push([&b"/"[..], &[b'x'; 255]].concat());
    v.push(vec![b'/'; 300]);
    v
}

#[test]
fn bad_names_are_refused_and_create_nothing() {
    // glibc would take "//x" and "x" for "/x": refused, nothing appears.
    let unique = common::ShmName::new();
    let bare = &unique.as_str()[1..];
    let mut names = bad_names();
    names.push(format!("/{}", unique.as_str()).into_bytes());
    names.push(bare.as_bytes().to_vec());
    for n in names {
        let name = OsStr::from_bytes(&n);
        let bad = |r: Result<(), Error>, what: &str| {
            assert!(
                matches!(r, Err(Error::BadName(_))),
                "{what}({name:?}): {r:?}"
            );
        };
        bad(Pool::attach(name).map(drop), "attach");
        let opts = CreateOptions {
            name: Some(name.to_owned()),
            prefault: false,
        };
        bad(Pool::create(1, &opts).map(drop), "create");
        bad(mapping::unlink(name), "unlink");
        bad(mapping::prefault_named(name, None), "prefault_named");
    }
    assert!(!std::path::Path::new("/dev/shm").join(bare).exists());
}

/// Unlinks a byte name on drop.
struct Unlink(OsString);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = nix::sys::mman::shm_unlink(self.0.as_os_str());
    }
}

#[test]
fn names_are_bytes() {
    let base = common::ShmName::new();
    // Not UTF-8, control bytes, and the longest name.
    let odd = Unlink(
        OsStr::from_bytes(&[base.as_str().as_bytes(), b"\xff\xc3(\x01"].concat()).to_owned(),
    );
    let pad = 255 - base.as_str().len();
    let longest = Unlink(
        OsStr::from_bytes(&[base.as_str().as_bytes(), &vec![b'x'; pad]].concat()).to_owned(),
    );
    assert_eq!(longest.0.len(), 255);
    for n in [&odd.0, &longest.0] {
        let opts = CreateOptions {
            name: Some(n.clone()),
            prefault: true,
        };
        let p = Pool::create(1, &opts).unwrap();
        assert_eq!(p.name(), Some(n.as_os_str()));
        let q = Pool::attach(n).unwrap();
        assert_eq!(q.name(), Some(n.as_os_str()));
        let o = q.alloc(1).unwrap();
        assert_eq!(p.stats().live_blocks, 1);
        assert!(q.free(o).is_ok());
        assert_eq!(mapping::prefault_named(n, None), Ok(()));
        assert_eq!(p.unlink(), Ok(()));
        assert!(matches!(
            Pool::attach(n),
            Err(Error::Io(_, nix::errno::Errno::ENOENT))
        ));
    }
}

/// Whether the line of /proc/self/maps covering `addr` mentions `what`.
fn mapped_as(addr: *const u8, what: &str) -> bool {
    // Bytes, not text: another test of this binary maps a non-UTF-8 name.
    let maps = String::from_utf8_lossy(&std::fs::read("/proc/self/maps").unwrap()).into_owned();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap_or("");
        let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
        let lo = usize::from_str_radix(lo, 16).unwrap_or(0);
        let hi = usize::from_str_radix(hi, 16).unwrap_or(0);
        (lo..hi).contains(&(addr as usize)) && l.contains(what)
    })
}

#[test]
fn keep_alive_outlives_the_pool() {
    let name = common::ShmName::new();
    let opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: true,
    };
    let p = Pool::create(4 << 12, &opts).unwrap();
    let a = p.addr(p.alloc(1).unwrap());
    let keep = p.keep_alive().expect("a pool we mapped");
    let keep2 = keep.clone();
    drop(p);
    // SAFETY: the KeepAlives keep the page mapped (what this test checks).
    unsafe {
        a.write_volatile(7);
        assert_eq!(a.read_volatile(), 7);
    }
    drop(keep);
    assert!(
        mapped_as(a, &name.as_str()[1..]),
        "unmapped under a KeepAlive"
    );
    drop(keep2);
    assert!(
        !mapped_as(a, &name.as_str()[1..]),
        "still mapped after the last holder"
    );
    // Memory someone else mapped is never ours to keep.
    let len = 64 << 12;
    let lay = std::alloc::Layout::from_size_align(len, 1 << 16).unwrap();
    // SAFETY: a non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(lay) };
    assert!(!buf.is_null());
    // SAFETY: `buf` is zeroed, outlives `q` and nothing else uses it.
    let q = unsafe { Pool::format_in_place(buf, len, true) }.unwrap();
    assert!(q.keep_alive().is_none());
    drop(q);
    // SAFETY: allocated above with `lay`; `q` is gone.
    unsafe { std::alloc::dealloc(buf, lay) };
}

/// Sizes and offsets become pages by shifts (the page size is a power of
/// two): every size up to three pages, one below, at and above each
/// multiple up to past the pool, and the largest ones round up exactly as
/// a division would; every offset that is not a page boundary, before the
/// payload or past its end is no block.
#[test]
fn sizes_and_offsets_become_pages_as_by_division() {
    let p = pool(300 * mapping::page_size());
    p.set_caching(false).unwrap();
    let pg = p.geometry().page_size;
    let base = p.geometry().payload_offset;
    let npages = p.geometry().npages as usize;
    let mut sizes: Vec<usize> = (1..=3 * pg).collect();
    for k in 1..=npages + 2 {
        sizes.extend([k * pg - 1, k * pg, k * pg + 1]);
    }
    sizes.extend([
        usize::MAX,
        usize::MAX - pg + 1,
        usize::MAX / 2,
        u32::MAX as usize * pg,
        (u32::MAX as usize + 1) * pg + 1,
    ]);
    for &b in &sizes {
        let want = b.div_ceil(pg);
        match p.alloc(b) {
            Ok(o) => {
                assert_eq!(p.size(o), Ok(want * pg), "alloc({b})");
                for d in [1, pg / 2 + 1, pg - 1] {
                    assert_eq!(p.size(o + d), Err(Error::NotABlock), "alloc({b}) + {d}");
                }
                p.free(o).unwrap();
            }
            Err(e) => assert!(want > npages, "alloc({b}): {e:?}, {want} pages"),
        }
    }
    let a = p.alloc(pg).unwrap();
    assert_eq!(a, base);
    for off in base.saturating_sub(2 * pg)..base + 3 * pg {
        let want = if off == base {
            Ok(pg)
        } else {
            Err(Error::NotABlock)
        };
        assert_eq!(p.size(off), want, "size({off})");
    }
    for off in [base + npages * pg, base + (npages + 1) * pg, usize::MAX] {
        assert_eq!(p.size(off), Err(Error::NotABlock), "size({off})");
        assert_eq!(p.free(off), Err(Error::NotABlock), "free({off})");
    }
    p.free(a).unwrap();
    assert!(shmpool::layout::Geometry::for_pages(16, pg).is_some());
    assert!(shmpool::layout::Geometry::for_pages(16, pg + pg / 2).is_none());
}
