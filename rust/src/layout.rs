//! The on-shm layout. Everything in it is an offset or a page number, never
//! a pointer, so a pool works at any address and an unrelated process can
//! attach to it by name.
//!
//! ```text
//! 0               Header (magic, version, geometry, lock, owner table,
//!                 allocator state)                       size_of::<Header>()
//! desc_offset     page descriptors, one u64 per payload page   8 * npages
//! payload_offset  payload pages (page-aligned)            npages * page_size
//! total_len
//! ```
//!
//! The metadata never shares a page with user data, so a user overrunning
//! its block cannot corrupt the allocator. Overhead: about 25 KiB plus 8
//! bytes per page, 0.23 % of a 64 MiB pool and 0.197 % of a 1 GiB one.

use crate::arena::{AllocState, MAX_OWNERS};
use crate::cache::SlotCache;
use crate::desc::MAX_PAGES;
use crate::lock::MutexStorage;
use crate::owner::OwnerIdentity;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// "SHMPOOL" and a format byte; stored last when a pool is formatted, so
/// a half-formatted pool is never mistaken for a pool.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMPOOL\x01");
/// Bumped whenever the meaning or position of any shared field changes.
pub const LAYOUT_VERSION: u32 = 3;

/// The shared header at offset 0 of every pool.
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub layout_version: u32,
    pub page_size: u32,
    pub total_len: u64,
    pub desc_offset: u64,
    pub payload_offset: u64,
    /// How many times the lock was found abandoned (or the metadata
    /// inconsistent) and the derived state rebuilt. Under the lock.
    pub recoveries: u64,
    /// One more than the highest owner slot ever used (bounds the loops
    /// over `slot_cache`).
    pub owners_hwm: AtomicU32,
    /// Bit `s` set when owner slot `s` may hold cached blocks (see
    /// `cache.rs`), so `stats` reads only those slots' counters.
    pub cache_slots: [AtomicU64; 4],
    pub lock: MutexStorage,
    /// Owner slot identities (slot 0 = "unrecorded owner"). Under the lock.
    pub owners: [OwnerIdentity; MAX_OWNERS],
    pub alloc: AllocState,
    /// What each owner's per-process cache holds (see `pool.rs`). Written by
    /// the owner without the pool lock, and by whoever takes cached blocks
    /// back under it; each slot on its own cache line so that processes do
    /// not share one.
    pub slot_cache: [SlotCache; MAX_OWNERS],
}

/// Where each part of a pool of `npages` payload pages lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub page_size: usize,
    pub npages: u32,
    pub desc_offset: usize,
    pub payload_offset: usize,
    pub total_len: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Geometry {
    /// The layout for `npages` payload pages, or `None` if out of range.
    pub fn for_pages(npages: u32, page_size: usize) -> Option<Geometry> {
        if npages == 0 || npages > MAX_PAGES {
            return None;
        }
        let desc_offset = round_up(std::mem::size_of::<Header>(), 64);
        let payload_offset = round_up(desc_offset + 8 * npages as usize, page_size);
        let total_len = payload_offset.checked_add((npages as usize).checked_mul(page_size)?)?;
        Some(Geometry {
            page_size,
            npages,
            desc_offset,
            payload_offset,
            total_len,
        })
    }

    /// The layout whose payload holds at least `bytes` bytes.
    pub fn for_payload(bytes: usize, page_size: usize) -> Option<Geometry> {
        let pages = bytes.div_ceil(page_size);
        Self::for_pages(u32::try_from(pages).ok()?, page_size)
    }

    /// The largest layout that fits in `len` bytes (memory mapped by
    /// someone else), or `None` if not even one payload page fits.
    pub fn fitting(len: usize, page_size: usize) -> Option<Geometry> {
        let fixed = round_up(std::mem::size_of::<Header>(), 64);
        let guess = len.checked_sub(fixed)? / (page_size + 8);
        let mut n = guess.min(MAX_PAGES as usize) as u32;
        while n > 0 && Self::for_pages(n, page_size).is_none_or(|g| g.total_len > len) {
            n -= 1;
        }
        Self::for_pages(n, page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_under_a_quarter_percent_from_64_mib() {
        for mib in [64usize, 256, 1024, 16384] {
            let g = Geometry::for_payload(mib << 20, 4096).unwrap();
            let overhead = g.payload_offset as f64 / g.total_len as f64;
            assert!(overhead <= 0.0025, "{mib} MiB: {overhead}");
        }
    }

    #[test]
    fn fitting_inverts_for_pages() {
        for n in [1u32, 2, 3, 100, 4095, 4096, 100_000] {
            let g = Geometry::for_pages(n, 4096).unwrap();
            assert_eq!(Geometry::fitting(g.total_len, 4096), Some(g));
            assert_eq!(Geometry::fitting(g.total_len + 4095, 4096), Some(g));
            if n > 1 {
                assert_eq!(
                    Geometry::fitting(g.total_len - 1, 4096).unwrap().npages,
                    n - 1
                );
            }
        }
        assert_eq!(Geometry::fitting(100, 4096), None);
        assert_eq!(Geometry::for_pages(0, 4096), None);
        assert_eq!(Geometry::for_pages(MAX_PAGES + 1, 4096), None);
    }

    #[test]
    fn payload_is_page_aligned() {
        for ps in [4096usize, 16384, 65536] {
            let g = Geometry::for_pages(7, ps).unwrap();
            assert_eq!(g.payload_offset % ps, 0);
            assert!(g.desc_offset + 8 * 7 <= g.payload_offset);
        }
    }
}
