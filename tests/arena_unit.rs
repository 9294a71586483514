//! Unit tests of the allocator on plain memory (no mapping, no lock):
//! `AllocState` + a `Vec<u64>` of descriptors viewed as an `Arena`.

mod common;
use common::Rng;
use shmpool::arena::SMALL_MAX;
use shmpool::desc::{self, NIL};
use shmpool::{AllocState, Arena, Error, PageStats};

/// A pool on the heap: the allocator state and its descriptors.
struct Mem {
    st: AllocState,
    d: Vec<u64>,
}

/// Everything observable about a pool, to compare before/after.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snap {
    stats: PageStats,
    runs: Vec<(u32, u32)>,
    live: Vec<(u32, u32, u16)>,
    check: Vec<String>,
    d: Vec<u64>,
}

impl Mem {
    fn new(n: u32) -> Mem {
        let mut m = Mem {
            st: AllocState::new(n),
            d: vec![0; n as usize],
        };
        m.a().format();
        m
    }

    fn a(&mut self) -> Arena<'_> {
        Arena::new(&mut self.st, &mut self.d).expect("arena")
    }

    fn alloc(&mut self, pages: u32) -> u32 {
        self.a()
            .alloc(pages, 1)
            .unwrap_or_else(|e| panic!("alloc({pages}): {e}"))
    }

    fn free(&mut self, p: u32) -> u32 {
        self.a()
            .free(p)
            .unwrap_or_else(|e| panic!("free({p}): {e}"))
    }

    fn runs(&mut self) -> Vec<(u32, u32)> {
        self.a().free_runs()
    }

    fn check(&mut self) -> Vec<String> {
        self.a().check()
    }

    fn assert_ok(&mut self) {
        let v = self.check();
        assert!(v.is_empty(), "check failed: {v:#?}");
    }

    fn snap(&mut self) -> Snap {
        let a = self.a();
        Snap {
            stats: a.stats(),
            runs: a.free_runs(),
            live: a.live_blocks(),
            check: a.check(),
            d: self.d.clone(),
        }
    }

    /// Allocates blocks of `sizes` back to back from the start of an empty
    /// pool, then frees those whose index is in `free`. Returns the pages.
    fn layout(n: u32, sizes: &[u32], free: &[usize]) -> (Mem, Vec<u32>) {
        let mut m = Mem::new(n);
        let mut pages = Vec::new();
        let mut next = 0;
        for (i, &s) in sizes.iter().enumerate() {
            let p = m.a().alloc(s, (i % 5) as u16).unwrap();
            assert_eq!(p, next, "layout must be sequential");
            next += s;
            pages.push(p);
        }
        for &i in free {
            assert_eq!(m.free(pages[i]), sizes[i]);
        }
        m.assert_ok();
        (m, pages)
    }
}

#[test]
fn format_makes_one_free_run() {
    for n in [1u32, 2, 3, 4, 5, 126, 127, 128, 129, 130, 1000, 70_000] {
        let mut m = Mem::new(n);
        m.assert_ok();
        assert_eq!(m.runs(), vec![(0, n)], "n={n}");
        assert_eq!(
            m.a().stats(),
            PageStats {
                npages: n,
                free_pages: n as u64,
                largest_free_run: n,
                live_blocks: 0
            }
        );
        assert!(m.a().live_blocks().is_empty());
    }
}

#[test]
fn arena_new_rejects_mismatched_descriptors() {
    let mut st = AllocState::new(10);
    let mut d = vec![0u64; 9];
    assert!(matches!(
        Arena::new(&mut st, &mut d),
        Err(Error::Corrupt(_))
    ));
    let mut st = AllocState::new(0);
    let mut d = vec![];
    assert!(matches!(
        Arena::new(&mut st, &mut d),
        Err(Error::Corrupt(_))
    ));
}

#[test]
fn exact_fit_reuses_the_hole_without_split() {
    let mut m = Mem::new(10);
    let a = m.alloc(3);
    let b = m.alloc(4);
    let c = m.alloc(3);
    assert_eq!((a, b, c), (0, 3, 7));
    assert!(m.runs().is_empty());
    assert_eq!(m.a().stats().largest_free_run, 0);
    assert_eq!(m.free(b), 4);
    assert_eq!(m.runs(), vec![(3, 4)]);
    assert_eq!(m.alloc(4), 3);
    assert!(m.runs().is_empty());
    assert_eq!(m.a().size(3), Ok(4));
    m.assert_ok();
}

#[test]
fn split_leaves_the_remainder_free() {
    for (n, k) in [(100u32, 10u32), (300, 10), (300, 200), (129, 1), (128, 127)] {
        let mut m = Mem::new(n);
        assert_eq!(m.alloc(k), 0);
        assert_eq!(m.runs(), vec![(k, n - k)]);
        let s = m.a().stats();
        assert_eq!(
            (s.free_pages, s.largest_free_run, s.live_blocks),
            ((n - k) as u64, n - k, 1)
        );
        m.assert_ok();
        assert_eq!(m.free(0), k);
        assert_eq!(m.runs(), vec![(0, n)]);
        m.assert_ok();
    }
}

#[test]
fn coalesce_left_right_and_both() {
    // Sizes cover small and tree neighbours: [a][b][c][guard][rest].
    for (sa, sb, sc) in [
        (1u32, 1u32, 1u32),
        (2, 3, 4),
        (200, 5, 300),
        (5, 200, 1),
        (64, 64, 64),
    ] {
        let n = sa + sb + sc + 1 + 50;
        let (base, pg) = Mem::layout(n, &[sa, sb, sc, 1], &[]);
        let (a, b, c) = (pg[0], pg[1], pg[2]);

        // Left: free a, then b merges into a's run.
        let mut m = Mem {
            st: base.st.clone(),
            d: base.d.clone(),
        };
        m.free(a);
        m.free(b);
        assert_eq!(m.runs(), vec![(0, sa + sb), (pg[3] + 1, 50)]);
        m.assert_ok();

        // Right: free c, then b merges with c's run.
        let mut m = Mem {
            st: base.st.clone(),
            d: base.d.clone(),
        };
        m.free(c);
        m.free(b);
        assert_eq!(m.runs(), vec![(b, sb + sc), (pg[3] + 1, 50)]);
        m.assert_ok();

        // Both: free a and c, then b joins all three.
        let mut m = Mem {
            st: base.st.clone(),
            d: base.d.clone(),
        };
        m.free(a);
        m.free(c);
        assert_eq!(m.runs().len(), 3);
        m.free(b);
        assert_eq!(m.runs(), vec![(0, sa + sb + sc), (pg[3] + 1, 50)]);
        m.assert_ok();

        // Freeing the guard merges with the tail too: one run again.
        m.free(pg[3]);
        assert_eq!(m.runs(), vec![(0, n)]);
        assert_eq!(m.a().stats().largest_free_run, n);
        m.assert_ok();
    }
}

#[test]
fn tree_and_small_runs_and_best_fit() {
    // Holes: 200 (tree) 130 (tree) 127 (small max) 128 (tree min) 5 3 8 4,
    // separated by 1-page guards, then a tail.
    let sizes = [
        200u32,
        1,
        130,
        1,
        SMALL_MAX,
        1,
        SMALL_MAX + 1,
        1,
        5,
        1,
        3,
        1,
        8,
        1,
        4,
        1,
    ];
    let holes = [0usize, 2, 4, 6, 8, 10, 12, 14];
    let used: u32 = sizes.iter().sum();
    let n = used + 1000;
    let (mut m, pg) = Mem::layout(n, &sizes, &holes);
    let s = m.a().stats();
    assert_eq!(s.largest_free_run, 1000);
    assert_eq!(s.free_pages, 1000 + 200 + 130 + 127 + 128 + 5 + 3 + 8 + 4);

    // Small best fit: the smallest class that fits.
    assert_eq!(m.alloc(4), pg[14], "exact 4");
    assert_eq!(m.alloc(4), pg[8], "4 from the 5-hole");
    assert_eq!(m.alloc(3), pg[10], "exact 3");
    assert_eq!(
        m.alloc(2),
        pg[12],
        "2 from the 8-hole (1-hole left from the 5 is too small)"
    );
    m.assert_ok();
    // The tree: 128 is an exact tree fit, 127 an exact small fit.
    assert_eq!(m.alloc(SMALL_MAX + 1), pg[6]);
    assert_eq!(m.alloc(SMALL_MAX), pg[4]);
    // 129 comes from the 130 run (remainder 1), 150 from the 200 run.
    assert_eq!(m.alloc(129), pg[2]);
    assert_eq!(m.alloc(150), pg[0]);
    // 51 does not fit the 50 left of the 200 run: it comes from the tail.
    assert_eq!(m.alloc(51), used);
    m.assert_ok();
    // 50 now fits the remainder of the 200 run exactly.
    assert_eq!(m.alloc(50), pg[0] + 150);
    m.assert_ok();
}

#[test]
fn tree_best_fit_breaks_ties_by_lowest_page() {
    // Three tree holes: 300, 200, 200, 250 (in address order), guards between.
    let sizes = [300u32, 1, 200, 1, 200, 1, 250, 1];
    let (mut m, pg) = Mem::layout(2000, &sizes, &[0, 2, 4, 6]);
    assert_eq!(m.alloc(150), pg[2], "smallest fitting run, lowest page");
    assert_eq!(m.alloc(200), pg[4], "exact tree fit");
    assert_eq!(m.alloc(201), pg[6]);
    assert_eq!(m.alloc(260), pg[0]);
    m.assert_ok();
}

#[test]
fn fill_whole_pool_with_one_page_blocks() {
    for n in [1u32, 2, 127, 128, 129, 1000, 4096, 20_000] {
        let mut m = Mem::new(n);
        let mut pages: Vec<u32> = (0..n).map(|_| m.alloc(1)).collect();
        let mut sorted = pages.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        assert_eq!(m.a().alloc(1, 1), Err(Error::OutOfMemory));
        let s = m.a().stats();
        assert_eq!(
            (s.free_pages, s.largest_free_run, s.live_blocks),
            (0, 0, n as u64)
        );
        m.assert_ok();
        // Free in a shuffled order, checking now and then.
        let mut rng = Rng(n as u64);
        for i in (1..pages.len()).rev() {
            pages.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(m.free(*p), 1);
            if i % 97 == 0 {
                m.assert_ok();
            }
        }
        assert_eq!(m.runs(), vec![(0, n)]);
        m.assert_ok();
    }
}

#[test]
fn one_page_pool() {
    let mut m = Mem::new(1);
    assert_eq!(m.a().alloc(2, 0), Err(Error::OutOfMemory));
    assert_eq!(m.alloc(1), 0);
    assert_eq!(m.a().alloc(1, 0), Err(Error::OutOfMemory));
    assert_eq!(m.a().size(0), Ok(1));
    m.assert_ok();
    assert_eq!(m.free(0), 1);
    assert_eq!(m.a().free(0), Err(Error::NotABlock));
    assert_eq!(m.runs(), vec![(0, 1)]);
    m.assert_ok();
}

fn fragmented() -> (Mem, Vec<u32>) {
    let sizes = [5u32, 1, 3, 1, 300, 2, 200, 1, 4, 2, 150, 1, 7, 1, 130];
    Mem::layout(1200, &sizes, &[0, 2, 4, 6, 8, 10, 12])
}

#[test]
fn out_of_memory_leaves_the_pool_unchanged() {
    let (mut m, _) = fragmented();
    let before = m.snap();
    assert!(before.check.is_empty());
    let largest = before.stats.largest_free_run;
    let free = before.stats.free_pages as u32;
    for k in [largest + 1, free, free + 1, 1200, 1201, NIL, u32::MAX] {
        assert_eq!(m.a().alloc(k, 3), Err(Error::OutOfMemory), "k={k}");
        assert_eq!(m.snap(), before, "k={k}");
    }
}

#[test]
fn bad_size_leaves_the_pool_unchanged() {
    let (mut m, _) = fragmented();
    let before = m.snap();
    assert_eq!(m.a().alloc(0, 1), Err(Error::BadSize));
    assert_eq!(m.snap(), before);
}

#[test]
fn not_a_block_leaves_the_pool_unchanged() {
    let (mut m, pg) = fragmented();
    let live = m.a().live_blocks();
    let (p2, l2, _) = *live.iter().find(|b| b.1 >= 2).unwrap();
    // Double free: free once (legitimately), then the bad ones.
    m.free(p2);
    let before = m.snap();
    let mut bad = vec![p2, p2 + 1, 1200, 1201, NIL, u32::MAX];
    bad.push(pg[0]); // head of a free run
    bad.push(pg[4] + 1); // LEN word of a tree run
    bad.push(pg[4] + 2); // LINKS word
    bad.push(pg[4] + 3); // UP word
                         // The 2-page block merged the runs on both sides into one tree run.
    let (h, l) = *m.runs().iter().find(|r| r.0 == pg[4]).unwrap();
    assert!(l > SMALL_MAX && h < p2 && p2 < h + l);
    bad.push(h + l - 1); // tail LEN word
    let (p3, l3, _) = *live.iter().find(|b| b.1 >= 100).unwrap();
    bad.extend(p3 + 1..p3 + l3); // interior pages of a live block
    for p in bad {
        assert_eq!(m.a().free(p), Err(Error::NotABlock), "free({p})");
        assert_eq!(m.a().size(p), Err(Error::NotABlock), "size({p})");
        assert_eq!(m.a().owner_of(p), Err(Error::NotABlock), "owner_of({p})");
        assert_eq!(m.snap(), before, "after free({p})");
    }
    assert!(l2 >= 2);
}

#[test]
fn owners_are_recorded() {
    let mut m = Mem::new(100);
    let a = m.a().alloc(3, 7).unwrap();
    let b = m.a().alloc(2, 255).unwrap();
    assert_eq!(m.a().owner_of(a), Ok(7));
    assert_eq!(m.a().owner_of(b), Ok(255));
    assert_eq!(m.st.usage[7].pages, 3);
    assert_eq!(m.st.usage[255].blocks, 1);
    assert_eq!(m.a().live_blocks(), vec![(a, 3, 7), (b, 2, 255)]);
    m.free(a);
    assert_eq!(m.st.usage[7], Default::default());
    m.assert_ok();
}

/// Builds a pool in a random state with `ops` random alloc/free.
fn random_state(n: u32, seed: u64, ops: usize) -> Mem {
    let mut m = Mem::new(n);
    let mut rng = Rng(seed);
    let mut live = Vec::new();
    for _ in 0..ops {
        if live.is_empty() || rng.below(3) != 0 {
            let k = match rng.below(10) {
                0 => 100 + rng.below(300) as u32,
                1..=3 => 1 + rng.below(40) as u32,
                _ => 1 + rng.below(4) as u32,
            };
            if let Ok(p) = m.a().alloc(k, rng.below(4) as u16) {
                live.push(p);
            }
        } else {
            let i = rng.below(live.len() as u64) as usize;
            m.free(live.swap_remove(i));
        }
    }
    m.assert_ok();
    m
}

fn assert_same_state(x: &Mem, y: &Mem) {
    assert_eq!(x.d, y.d, "descriptors differ");
    let (a, b) = (&x.st, &y.st);
    assert_eq!(a.npages, b.npages);
    assert_eq!(a.tree_root, b.tree_root);
    assert_eq!(a.tree_max, b.tree_max);
    assert_eq!(a.free_pages, b.free_pages);
    assert_eq!(a.live_blocks, b.live_blocks);
    assert_eq!(a.small_bitmap, b.small_bitmap);
    assert_eq!(a.small_head, b.small_head);
    assert_eq!(a.usage, b.usage);
}

#[test]
fn rebuild_after_garbage_reproduces_the_state() {
    for seed in 0..40u64 {
        let n = [1u32, 2, 7, 128, 300, 1000, 5000][seed as usize % 7];
        let mut m = random_state(n, seed, 400);
        let before = m.snap();
        // The reference: a rebuild from the clean state.
        let mut clean = Mem {
            st: m.st.clone(),
            d: m.d.clone(),
        };
        let rep = clean.a().rebuild();
        clean.assert_ok();
        assert_eq!(rep.live_blocks, before.stats.live_blocks);
        assert_eq!(rep.free_pages, before.stats.free_pages);
        assert_eq!(rep.bad_alloc_words, 0);
        assert_eq!(clean.a().live_blocks(), before.live);
        assert_eq!(clean.a().free_runs(), before.runs);
        assert_eq!(clean.a().stats(), before.stats);

        // Garbage in every derived word (any tag but ALLOC) and in every
        // derived field of the state.
        let mut rng = Rng(seed ^ 0xdead_beef);
        for w in m.d.iter_mut() {
            if desc::tag(*w) != desc::TAG_ALLOC {
                let g = rng.next();
                *w = if desc::tag(g) == desc::TAG_ALLOC {
                    g ^ (3 << 62)
                } else {
                    g
                };
            }
        }
        m.st.tree_root = rng.next() as u32;
        m.st.tree_max = rng.next() as u32;
        m.st.free_pages = rng.next();
        m.st.live_blocks = rng.next();
        m.st.small_bitmap = [rng.next(), rng.next()];
        for h in m.st.small_head.iter_mut() {
            *h = rng.next() as u32;
        }
        for u in m.st.usage.iter_mut() {
            u.pages = rng.next();
            u.blocks = rng.next();
        }
        if n > 3 {
            assert!(
                !m.check().is_empty(),
                "garbage went unnoticed (seed {seed})"
            );
        }
        let rep2 = m.a().rebuild();
        assert_eq!(rep2, rep);
        m.assert_ok();
        assert_same_state(&m, &clean);
        // And the pool still works: free everything, one run remains.
        for (p, _, _) in m.a().live_blocks() {
            m.free(p);
        }
        assert_eq!(m.runs(), vec![(0, n)]);
        m.assert_ok();
    }
}

#[test]
fn rebuild_drops_impossible_alloc_words() {
    let mut m = Mem::new(50);
    let a = m.alloc(10);
    let _b = m.alloc(5);
    // An ALLOC word inside block a, and one running past the end.
    m.d[(a + 3) as usize] = desc::alloc_word(2, 1);
    m.d[40] = desc::alloc_word(20, 1);
    m.d[45] = desc::alloc_word(0, 1);
    assert!(!m.check().is_empty());
    let rep = m.a().rebuild();
    assert_eq!(rep.bad_alloc_words, 3);
    assert_eq!(rep.live_blocks, 2);
    assert_eq!(rep.free_pages, 35);
    m.assert_ok();
    assert_eq!(m.runs(), vec![(15, 35)]);
}

/// Every planted corruption must be reported by check() and repaired by
/// rebuild() (when it only touches derived words).
#[test]
fn check_detects_planted_corruption() {
    type Plant = fn(&mut Mem, &[u32]);
    let plants: Vec<(&str, Plant)> = vec![
        ("small list next link", |m, pg| {
            // pg[0] (5 pages) is alone in list 5; point it at another run.
            let w = m.d[pg[0] as usize];
            m.d[pg[0] as usize] = desc::free_word(pg[2], desc::free_prev(w));
        }),
        ("small list prev link", |m, pg| {
            let w = m.d[pg[2] as usize];
            m.d[pg[2] as usize] = desc::free_word(desc::free_next(w), pg[0]);
        }),
        ("tail LEN word cleared", |m, pg| {
            m.d[(pg[0] + 4) as usize] = 0
        }),
        ("head LEN word cleared", |m, pg| {
            m.d[(pg[0] + 1) as usize] = 0
        }),
        ("tree tail LEN word cleared", |m, pg| {
            m.d[(pg[4] + 299) as usize] = 0
        }),
        ("LEN word with wrong length", |m, pg| {
            m.d[(pg[12] + 6) as usize] = desc::len_word(6)
        }),
        ("stray word inside a free run", |m, pg| {
            m.d[(pg[4] + 100) as usize] = desc::len_word(3)
        }),
        ("stray word inside a live block", |m, pg| {
            m.d[(pg[5] + 1) as usize] = desc::len_word(2)
        }),
        ("free_pages counter", |m, _| m.st.free_pages += 1),
        ("live_blocks counter", |m, _| m.st.live_blocks -= 1),
        ("tree_max", |m, _| m.st.tree_max += 1),
        ("bitmap bit of an empty class", |m, _| {
            m.st.small_bitmap[0] |= 1 << 9
        }),
        ("bitmap bit of a full class cleared", |m, _| {
            m.st.small_bitmap[0] &= !(1 << 5)
        }),
        ("list head lost", |m, _| {
            m.st.small_head[3] = NIL;
            m.st.small_bitmap[0] &= !(1 << 3);
        }),
        ("tree root lost", |m, _| m.st.tree_root = NIL),
        ("tree parent link", |m, _| {
            let r = m.st.tree_root as usize;
            m.d[r + 3] = desc::up_word(5);
        }),
        ("tree child links cut", |m, _| {
            let r = m.st.tree_root as usize;
            m.d[r + 2] = desc::links_word(NIL, NIL);
        }),
        ("tree children swapped", |m, _| {
            let r = m.st.tree_root as usize;
            let w = m.d[r + 2];
            m.d[r + 2] = desc::links_word(desc::links_right(w), desc::links_left(w));
        }),
        ("per-owner usage", |m, _| m.st.usage[2].pages += 1),
        ("block length grown over a free run", |m, pg| {
            let w = m.d[pg[1] as usize];
            m.d[pg[1] as usize] = desc::alloc_word(2, desc::alloc_owner(w));
        }),
        ("two adjacent free runs", |m, pg| {
            // Turn the 1-page block after the 5-page run into a free run
            // filed nowhere: adjacent to a free run, counters off too.
            m.d[pg[1] as usize] = desc::free_word(NIL, NIL);
        }),
        ("ALLOC word cleared", |m, pg| m.d[pg[1] as usize] = 0),
    ];
    for (name, plant) in plants {
        let (mut m, pg) = fragmented();
        // The tree must have more than one node for the link plants to bite.
        let r = m.st.tree_root as usize;
        let root_links = m.d[r + 2];
        assert!(
            desc::links_left(root_links) != NIL || desc::links_right(root_links) != NIL,
            "tree has one node"
        );
        let live_before = m.a().live_blocks();
        plant(&mut m, &pg);
        let v = m.check();
        assert!(!v.is_empty(), "check() missed: {name}");
        // Derived-only corruption is repaired by rebuild, with the same blocks.
        m.a().rebuild();
        m.assert_ok();
        if !name.contains("ALLOC") && !name.contains("block length") && !name.contains("adjacent") {
            assert_eq!(m.a().live_blocks(), live_before, "{name}");
        }
    }
}

#[test]
fn stats_largest_run_tracks_small_and_tree() {
    // Only small runs free: largest comes from the bitmap.
    let (mut m, _) = Mem::layout(20, &[3, 1, 7, 1, 2, 6], &[0, 2, 4]);
    assert_eq!(m.a().stats().largest_free_run, 7);
    let (mut m, _) = Mem::layout(200, &[64, 1, 65, 1, 69], &[0, 2]);
    assert_eq!(m.a().stats().largest_free_run, 65);
    let (mut m, _) = Mem::layout(400, &[127, 1, 3, 1, 268], &[0, 2]);
    assert_eq!(m.a().stats().largest_free_run, 127);
    m.free(127); // the guard: 127 + 1 + 3 become one tree run
    assert_eq!(m.a().stats().largest_free_run, 131);
    m.assert_ok();
    // Tree runs: taking the largest updates tree_max.
    let (mut m, _) = Mem::layout(800, &[300, 1, 200, 1, 298], &[0, 2]);
    assert_eq!(m.a().stats().largest_free_run, 300);
    m.alloc(300);
    assert_eq!(m.a().stats().largest_free_run, 200);
    m.alloc(100);
    assert_eq!(m.a().stats().largest_free_run, 100);
    m.assert_ok();
}
