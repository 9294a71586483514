//! A process opening a pool whose derived metadata was damaged repairs it
//! before use (and counts a recovery); a sound pool is left alone.

mod common;

use common::ShmName;
use shmpool::{CreateOptions, Pool};

fn named(name: &ShmName, bytes: usize) -> Pool {
    let opts = CreateOptions {
        name: Some(name.as_str().into()),
        prefault: false,
    };
    Pool::create(bytes, &opts).unwrap()
}

#[test]
fn attach_repairs_damaged_derived_state_and_keeps_blocks() {
    let name = ShmName::new();
    let pg = shmpool::mapping::page_size();
    let p = named(&name, 64 * pg);
    let a = p.alloc(3 * pg).unwrap();
    let b = p.alloc(40 * pg).unwrap();
    p.free(b).unwrap();
    p.flush_cache().unwrap();
    let before = p.stats();

    // A sound pool: attaching changes nothing.
    let q = Pool::attach(name.as_str()).unwrap();
    assert_eq!(q.stats().recoveries, 0);
    drop(q);

    // Damage derived state only: the free-page counter in the header
    // (AllocState::free_pages, found by its value).
    let hdr = p.base() as *mut u64;
    let words = std::mem::size_of::<shmpool::layout::Header>() / 8;
    let free_pages = before.free_bytes as u64 / pg as u64;
    // SAFETY: reads and writes words of our own pool's header, in bounds.
    let hits = unsafe {
        (0..words)
            .filter(|&i| *hdr.add(i) == free_pages)
            .inspect(|&i| *hdr.add(i) = 7)
            .count()
    };
    assert!(hits >= 1, "free_pages counter not found");
    assert!(
        !p.check().is_empty(),
        "the damage must be visible to check()"
    );

    let q = Pool::attach(name.as_str()).unwrap();
    assert_eq!(q.check(), Vec::<String>::new());
    let s = q.stats();
    assert_eq!(s.recoveries, 1);
    assert_eq!(
        (s.free_bytes, s.largest_free_bytes, s.live_blocks),
        (before.free_bytes, before.largest_free_bytes, 1)
    );
    assert_eq!(q.size(a), Ok(3 * pg));
    q.free(a).unwrap();
    q.flush_cache().unwrap();
    assert_eq!(q.stats().free_bytes, 64 * pg);
}
