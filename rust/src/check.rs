//! Verification of every allocator invariant, for tests, `check()` and the
//! torture suites. It reads only, never asserts and never panics: it returns
//! the list of violations (empty when the pool is sound). O(pages).

use crate::arena::{Arena, OwnerUsage, MAX_OWNERS, SMALL_MAX};
use crate::desc::*;
use crate::treap::priority;

impl Arena<'_> {
    /// Every violated invariant, as a human-readable line, for a pool whose
    /// owners' splits and merges (`large_cache.rs`) have all been counted
    /// (every `extra` 0) and none of which is in progress.
    pub fn check(&self) -> Vec<String> {
        self.check_with(&[0; MAX_OWNERS], &[false; MAX_OWNERS])
    }

    /// [`Arena::check`] with owner `q`'s block count adjusted by
    /// `extra[q]`, and for each `loose[q]` (a slot whose lock we do not
    /// hold: its owner may be splitting or merging right now) a head of
    /// `q` tolerated inside a block of `q` whose head changed meanwhile, and
    /// `q`'s block count not compared. Ghosts (CACHED words of a block's owner inside it, L2 of
    /// `large_cache.rs`) are tolerated for every owner.
    pub fn check_with(&self, extra: &[i64; MAX_OWNERS], loose: &[bool; MAX_OWNERS]) -> Vec<String> {
        let mut v = Vec::new();
        let n = self.st.npages;
        // Where each free run head is expected to be filed: 1 = list, 2 = tree.
        let mut filed = vec![0u8; n as usize];
        let (mut free_pages, mut live) = (0u64, 0u64);
        let mut usage = vec![OwnerUsage::default(); MAX_OWNERS];
        let mut prev_free = false;
        let mut p = 0u32;
        while p < n {
            let w = self.w(p);
            match tag(w) {
                TAG_ALLOC => {
                    let len = alloc_len(w);
                    if len == 0 || p as u64 + len as u64 > n as u64 {
                        v.push(format!("D2: block at page {p} has bad length {len}"));
                        return v;
                    }
                    let owner = alloc_owner(w);
                    let lenient = loose[owner as usize % MAX_OWNERS];
                    for q in p + 1..p + len {
                        let x = self.w(q);
                        // Ghosts of the owner (CACHED words, L2 of
                        // `large_cache.rs`) in a block marked GHOSTS; for a
                        // loose owner, also a head it made since we read
                        // `w` (the head changed).
                        if x == INTERIOR
                            || is_skip(x) && skip_owner(x) == owner && w & GHOSTS != 0
                            || tag(x) == TAG_ALLOC
                                && alloc_owner(x) == owner
                                && (is_cached(x) && w & GHOSTS != 0 || lenient && self.w(p) != w)
                        {
                            continue;
                        }
                        v.push(format!(
                            "D2: page {q} inside {} block {p} is not INTERIOR (word {x:#x})",
                            if is_cached(w) { "cached" } else { "live" }
                        ));
                    }
                    live += 1;
                    let u = &mut usage[alloc_owner(w) as usize % MAX_OWNERS];
                    u.pages += len as u64;
                    u.blocks += 1;
                    prev_free = false;
                    p += len;
                }
                TAG_FREE => {
                    let len = self.free_len(p);
                    // A length word saying 0 (damage) would hold the walk
                    // on this page for good.
                    if len == 0 || p as u64 + len as u64 > n as u64 {
                        v.push(format!("D1: free run at {p} has bad length {len}"));
                        return v;
                    }
                    if prev_free {
                        v.push(format!("D3: free run at {p} follows another free run"));
                    }
                    if len >= 2 && self.w(p + len - 1) != len_word(len) {
                        v.push(format!("D1: free run at {p} lacks its tail LEN word"));
                    }
                    let tree = len > SMALL_MAX;
                    for q in p + 1..p + len.saturating_sub(1) {
                        let want = match q - p {
                            1 => len_word(len),
                            2 | 3 if tree => self.w(q), // checked with the treap
                            _ => INTERIOR,
                        };
                        if self.w(q) != want {
                            v.push(format!(
                                "D1: page {q} of free run {p} has word {:#x}",
                                self.w(q)
                            ));
                        }
                    }
                    if tree
                        && (aux_kind(self.w(p + 2)) != AUX_LINKS
                            || aux_kind(self.w(p + 3)) != AUX_UP)
                    {
                        v.push(format!("T4: tree run at {p} lacks its link words"));
                    }
                    filed[p as usize] = if tree { 2 } else { 1 };
                    free_pages += len as u64;
                    prev_free = true;
                    p += len;
                }
                // A ghost a length read before its owner merged the run led
                // us to (L3 of `large_cache.rs`), only while that owner may
                // be mid-operation: its pages are its owner's, no block.
                _ if is_skip(w)
                    && loose[skip_owner(w) as usize % MAX_OWNERS]
                    && p > 0
                    && !prev_free
                    && skip_len(w) > 0
                    && p as u64 + skip_len(w) as u64 <= n as u64 =>
                {
                    usage[skip_owner(w) as usize % MAX_OWNERS].pages += skip_len(w) as u64;
                    p += skip_len(w);
                }
                _ => {
                    v.push(format!("D1: page {p} starts no run (word {w:#x})"));
                    return v;
                }
            }
        }
        // Exact-size lists and the bitmap.
        for len in 1..=SMALL_MAX {
            let head = self.st.small_head[len as usize];
            let bit = self.st.small_bitmap[(len / 64) as usize] >> (len % 64) & 1 == 1;
            if bit != (head != NIL) {
                v.push(format!("bitmap bit {len} disagrees with its list"));
            }
            let (mut cur, mut prev, mut steps) = (head, NIL, 0u32);
            while cur != NIL {
                steps += 1;
                if cur >= n || steps > n {
                    v.push(format!("list {len}: bad link {cur} or cycle"));
                    break;
                }
                let w = self.w(cur);
                if tag(w) != TAG_FREE || self.free_len(cur) != len || filed[cur as usize] != 1 {
                    v.push(format!(
                        "list {len}: page {cur} is not a free run of that length"
                    ));
                    break;
                }
                if free_prev(w) != prev {
                    v.push(format!(
                        "list {len}: page {cur} has prev {} not {prev}",
                        free_prev(w)
                    ));
                }
                filed[cur as usize] = 0;
                prev = cur;
                cur = free_next(w);
            }
        }
        // The treap.
        let mut tree_max = 0;
        let mut stack = vec![(self.st.tree_root, NIL, (0u32, 0u32), (u32::MAX, u32::MAX))];
        let mut visited = 0u32;
        while let Some((h, parent, lo, hi)) = stack.pop() {
            if h == NIL {
                continue;
            }
            visited += 1;
            if h >= n || visited > n || filed[h as usize] != 2 {
                v.push(format!(
                    "T4: tree node {h} is not a long free run (or a cycle)"
                ));
                break;
            }
            filed[h as usize] = 0;
            let key = (self.node_len(h), h);
            if key <= lo || key >= hi {
                v.push(format!("T1: tree node {h} out of order"));
            }
            if self.parent(h) != parent {
                v.push(format!(
                    "T3: tree node {h} has parent {} not {parent}",
                    self.parent(h)
                ));
            }
            if parent != NIL && priority(parent) < priority(h) {
                v.push(format!("T2: tree node {h} outranks its parent"));
            }
            tree_max = tree_max.max(key.0);
            stack.push((self.left(h), h, lo, key));
            stack.push((self.right(h), h, key, hi));
        }
        if let Some(p) = filed.iter().position(|&f| f != 0) {
            v.push(format!("free run at {p} is on no list and not in the tree"));
        }
        if tree_max != self.st.tree_max {
            v.push(format!(
                "tree_max {} but longest tree run {tree_max}",
                self.st.tree_max
            ));
        }
        if free_pages != self.st.free_pages {
            v.push(format!(
                "free_pages {} but counted {free_pages}",
                self.st.free_pages
            ));
        }
        let extra_sum: i64 = extra.iter().sum();
        let counted = (self.st.live_blocks as i64).wrapping_add(extra_sum) as u64;
        if !loose.iter().any(|&x| x) && live != counted {
            v.push(format!(
                "live_blocks {} (+{extra_sum} split) but counted {live}",
                self.st.live_blocks
            ));
        }
        for (q, u) in usage.iter().enumerate() {
            let have = self.st.usage[q];
            let blocks = (have.blocks as i64).wrapping_add(extra[q]) as u64;
            if u.pages != have.pages || !loose[q] && u.blocks != blocks {
                v.push(format!(
                    "owner slot {q} holds {:?} (pages, blocks) but counts ({}, {} + {})",
                    (u.pages, u.blocks),
                    have.pages,
                    have.blocks,
                    extra[q]
                ));
            }
        }
        v
    }
}
