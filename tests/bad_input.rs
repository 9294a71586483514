//! Bad input to a real `Pool`: each is an `Err` and leaves the pool exactly
//! as it was (stats, check and debug_info identical before and after).

use shmpool::{CreateOptions, Error, Pool};

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
