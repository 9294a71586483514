//! Values pinned by `with_value` between its `find` (under the lock) and
//! the end of its `process` (without it).
//!
//! A pin is a heap block `[value; pid; pid namespace; start time; next]`
//! (tag 0; the owner's identity as OCaml ints) on a list whose head, `pin_head`, is a GC root:
//! the GC reaches the pinned values through it like through any value.
//! The owner's identity lets the GC and recovery drop the pins of a
//! process that died during `process` (no lock is abandoned there, so no
//! recovery would clear them otherwise): `prune_dead_pins` unlinks them
//! before each collection. There is no limit on the number of pins.
//!
//! Commit points (under the lock): a pin is written completely, then linked
//! by one store of `pin_head`; it is unlinked by one store of its
//! predecessor's `next` (or of `pin_head`).

use super::value::*;
use super::{HResult, Heap};
use crate::owner::{self, OwnerIdentity};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// This process's identity, read once per fork generation.
///
/// The cache is only ever *tried*: a child forked while another thread of
/// its parent held the mutex inherits it locked, with no thread left to
/// unlock it, and must not wait for it. Without the cache the identity is
/// simply read again.
fn me() -> Option<OwnerIdentity> {
    static ME: Mutex<Option<(u64, OwnerIdentity)>> = Mutex::new(None);
    let gen = owner::fork_generation();
    let mut g = match ME.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return owner::me(),
    };
    match *g {
        Some((g0, id)) if g0 == gen => Some(id),
        _ => {
            let id = owner::me()?;
            *g = Some((gen, id));
            Some(id)
        }
    }
}

const VALUE: u64 = 0;
const PID: u64 = 1;
const PIDNS: u64 = 2;
const START: u64 = 3;
const NEXT: u64 = 4;
const PIN_FIELDS: usize = 5;

impl Heap<'_> {
    fn pin_field(&self, pin: u64, k: u64) -> u64 {
        // SAFETY: `pin` is a block of the pin list (reachable, PIN_FIELDS fields) of
        // this heap; lock held by the caller.
        unsafe { self.rd(pin - self.base() + 8 * k) }
    }

    fn set_pin_field(&self, pin: u64, k: u64, x: u64) {
        // SAFETY: as in `pin_field`.
        unsafe { self.wr(pin - self.base() + 8 * k, x) }
    }

    /// Pins `v` for this process (lock held); returns the pin to give to
    /// [`Heap::unpin`], or 0 when `v` is not a block of this heap (an
    /// immediate, an atom, a private value: nothing of this heap to keep,
    /// and a private value may move, so nothing could find its pin again).
    pub fn pin_shared(&self, v: u64) -> HResult<u64> {
        self.local()?;
        if !is_block(v)
            || self
                .find_chunk(v.wrapping_sub(self.base()).wrapping_sub(8))
                .is_none()
        {
            return Ok(0);
        }
        owner::ensure_fork_hook();
        // Without a readable identity, pidns 0 makes the pin count as alive
        // for as long as it is pinned (see `owner::is_alive`).
        let id = me().unwrap_or(OwnerIdentity {
            pid: std::process::id() as i32,
            pidns: 0,
            start_time: 0,
        });
        let d = self.desc();
        // `v` may be reachable from nothing but the caller (a value just
        // taken out of a structure under this lock, as `pop_p` does): the
        // GC the pin's own allocation may run must keep it.
        self.keep(v)?;
        let p = self.alloc(PIN_FIELDS, 0)?;
        self.set_pin_field(p, VALUE, v);
        self.set_pin_field(p, PID, val_int(id.pid as i64));
        self.set_pin_field(p, PIDNS, val_int(id.pidns as i64));
        // Clock ticks since boot: far below 2^62.
        self.set_pin_field(p, START, val_int(id.start_time as i64));
        self.set_pin_field(p, NEXT, d.pin_head.load(Relaxed));
        d.pin_head.store(p, Relaxed); // commit
        crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapPinWritten);
        Ok(p)
    }

    /// Removes `pin` if it is on the list (lock held; 0 is no pin). By the
    /// pin block alone: it identifies the pin, whatever it pins.
    pub fn unpin(&self, pin: u64) -> HResult<()> {
        self.local()?;
        if pin != 0 {
            self.unlink_pins(|p| p == pin);
            crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapPinRemoved);
        }
        Ok(())
    }

    /// Unlinks every pin for which `drop` holds.
    fn unlink_pins(&self, mut drop: impl FnMut(u64) -> bool) {
        let d = self.desc();
        let mut prev: Option<u64> = None;
        let mut cur = d.pin_head.load(Relaxed);
        // Bounded: a cycle could only come from a damaged heap.
        let mut budget = d.heap_words.load(Relaxed) / 5 + 1;
        while is_block(cur) && budget > 0 {
            budget -= 1;
            let next = self.pin_field(cur, NEXT);
            if drop(cur) {
                match prev {
                    Some(p) => self.set_pin_field(p, NEXT, next),
                    None => d.pin_head.store(next, Relaxed),
                }
            } else {
                prev = Some(cur);
            }
            cur = next;
        }
    }

    /// Unlinks the pins of processes that are gone (lock held), as the
    /// pool judges its owners (`owner::is_alive`: a pid of another PID
    /// namespace, or an identity unreadable when pinned, counts as alive).
    pub(crate) fn prune_dead_pins(&self) {
        let mut seen: Vec<(OwnerIdentity, bool)> = Vec::new();
        self.unlink_pins(|p| {
            let id = OwnerIdentity {
                pid: int_val(self.pin_field(p, PID)) as i32,
                pidns: int_val(self.pin_field(p, PIDNS)) as u32,
                start_time: int_val(self.pin_field(p, START)) as u64,
            };
            let alive = match seen.iter().find(|(s, _)| *s == id) {
                Some(&(_, alive)) => alive,
                None => {
                    let alive = owner::is_alive(&id);
                    seen.push((id, alive));
                    alive
                }
            };
            !alive
        });
    }

    /// Pins on the list (lock held).
    pub(crate) fn count_pins(&self) -> u64 {
        let mut n = 0;
        self.unlink_pins(|_| {
            n += 1;
            false
        });
        n
    }
}
