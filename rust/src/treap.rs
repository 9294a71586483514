//! The ordered structure for free runs longer than `SMALL_MAX` pages: a
//! treap keyed by `(length, first page)`, stored in the runs' own
//! descriptors, so it needs no node array and has no capacity limit.
//!
//! A node is the free run whose head is at page `h`:
//! - its key length is the `LEN` word at `h+1`,
//! - its children are in the `LINKS` word at `h+2`,
//! - its parent is in the `UP` word at `h+3`,
//! - its priority is a hash of `h`, so it is never stored and a rebuilt
//!   treap has the same shape as before.
//!
//! Invariants (checked by `check.rs`): T1 in-order keys strictly increase;
//! T2 a parent's priority is `>=` its children's; T3 parent links mirror
//! child links; T4 every node is a free run longer than `SMALL_MAX`.
//! Expected depth is O(log n) because priorities are independent of keys.

use crate::arena::Arena;
use crate::desc::*;

/// The priority of the node at page `h`: a 32-bit mix (the finaliser of
/// MurmurHash3) so that neighbouring pages get unrelated priorities.
#[inline]
pub(crate) fn priority(h: u32) -> u32 {
    let mut x = h ^ 0x9e37_79b9;
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

impl Arena<'_> {
    #[inline]
    pub(crate) fn node_len(&self, h: u32) -> u32 {
        aux_payload(self.w(h + 1)) as u32
    }
    #[inline]
    pub(crate) fn left(&self, h: u32) -> u32 {
        links_left(self.w(h + 2))
    }
    #[inline]
    pub(crate) fn right(&self, h: u32) -> u32 {
        links_right(self.w(h + 2))
    }
    #[inline]
    pub(crate) fn parent(&self, h: u32) -> u32 {
        (aux_payload(self.w(h + 3)) as u32) & NIL
    }
    #[inline]
    fn set_left(&mut self, h: u32, c: u32) {
        let r = self.right(h);
        self.set(h + 2, links_word(c, r));
    }
    #[inline]
    fn set_right(&mut self, h: u32, c: u32) {
        let l = self.left(h);
        self.set(h + 2, links_word(l, c));
    }
    #[inline]
    fn set_parent(&mut self, h: u32, p: u32) {
        self.set(h + 3, up_word(p));
    }

    #[inline]
    fn key(&self, h: u32) -> (u32, u32) {
        (self.node_len(h), h)
    }

    /// Replaces `old` by `new` in `old`'s parent (or at the root).
    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NIL {
            self.st.tree_root = new;
        } else if self.left(parent) == old {
            self.set_left(parent, new);
        } else {
            self.set_right(parent, new);
        }
        if new != NIL {
            self.set_parent(new, parent);
        }
    }

    /// Rotates `x` above its parent, keeping the in-order sequence.
    fn rotate_up(&mut self, x: u32) {
        let p = self.parent(x);
        let g = self.parent(p);
        if self.left(p) == x {
            let b = self.right(x);
            self.set_left(p, b);
            if b != NIL {
                self.set_parent(b, p);
            }
            self.set_right(x, p);
        } else {
            let b = self.left(x);
            self.set_right(p, b);
            if b != NIL {
                self.set_parent(b, p);
            }
            self.set_left(x, p);
        }
        self.set_parent(p, x);
        self.replace_child(g, p, x);
    }

    /// Inserts the run at `h` (its `LEN`, `LINKS`=NIL and `UP`=NIL words
    /// already written).
    pub(crate) fn treap_insert(&mut self, h: u32, len: u32) {
        let key = (len, h);
        let mut parent = NIL;
        let mut cur = self.st.tree_root;
        let mut steps = 0u32;
        while cur != NIL && steps <= self.st.npages {
            parent = cur;
            cur = if key < self.key(cur) {
                self.left(cur)
            } else {
                self.right(cur)
            };
            steps += 1;
        }
        self.set_parent(h, parent);
        if parent == NIL {
            self.st.tree_root = h;
        } else if key < self.key(parent) {
            self.set_left(parent, h);
        } else {
            self.set_right(parent, h);
        }
        let ph = priority(h);
        // Bounded like every walk here: damaged links may form a cycle.
        let mut steps = 0u32;
        while self.parent(h) != NIL && priority(self.parent(h)) < ph && steps <= self.st.npages {
            self.rotate_up(h);
            steps += 1;
        }
    }

    /// Removes the run at `h`: rotate it down below its higher-priority
    /// child until it has at most one child, then splice it out.
    pub(crate) fn treap_remove(&mut self, h: u32) {
        let mut steps = 0u32;
        loop {
            let (l, r) = (self.left(h), self.right(h));
            if l == NIL || r == NIL || steps > self.st.npages {
                let child = if l == NIL { r } else { l };
                let p = self.parent(h);
                self.replace_child(p, h, child);
                return;
            }
            let up = if priority(l) >= priority(r) { l } else { r };
            self.rotate_up(up);
            steps += 1;
        }
    }

    /// The run with the smallest key whose length is `>= k`, or `NIL`.
    pub(crate) fn treap_lower_bound(&self, k: u32) -> u32 {
        let mut best = NIL;
        let mut cur = self.st.tree_root;
        let mut steps = 0u32;
        while cur != NIL && steps <= self.st.npages {
            if self.node_len(cur) >= k {
                best = cur;
                cur = self.left(cur);
            } else {
                cur = self.right(cur);
            }
            steps += 1;
        }
        best
    }

    /// Length of the longest run in the treap (its rightmost node), or 0.
    pub(crate) fn treap_max_len(&self) -> u32 {
        let mut cur = self.st.tree_root;
        if cur == NIL {
            return 0;
        }
        let mut steps = 0u32;
        while self.right(cur) != NIL && steps <= self.st.npages {
            cur = self.right(cur);
            steps += 1;
        }
        self.node_len(cur)
    }
}
