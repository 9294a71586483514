//! Values pinned by `with_value` between its `find` (under the lock) and
//! the end of its `process` (without it): GC roots recorded in the shared
//! descriptor with the identity of the process that pinned them, so the
//! pins of a process killed during `process` stop counting as roots as soon
//! as it is gone (no lock is abandoned there, so no recovery would clear
//! them).
//!
//! Invariant P1: an entry with `value != 0` is a pin; its owner fields were
//! written before `value` (all under the lock).

use super::layout::MAX_PINS;
use super::{HResult, Heap, HeapError};
use crate::owner::{self, OwnerIdentity};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// This process's identity, read once per fork generation.
fn me() -> Option<OwnerIdentity> {
    static ME: Mutex<Option<(u64, OwnerIdentity)>> = Mutex::new(None);
    let gen = owner::fork_generation();
    let mut g = ME.lock().unwrap_or_else(|e| e.into_inner());
    match *g {
        Some((g0, id)) if g0 == gen => Some(id),
        _ => {
            let id = owner::me()?;
            *g = Some((gen, id));
            Some(id)
        }
    }
}

impl Heap<'_> {
    /// Pins `v` for this process (lock held); returns the entry to give to
    /// [`Heap::unpin`].
    pub fn pin_shared(&self, v: u64) -> HResult<usize> {
        self.local()?;
        owner::ensure_fork_hook();
        let id = me().unwrap_or(OwnerIdentity {
            pid: std::process::id() as i32,
            _pad: 0,
            start_time: 0,
        });
        let d = self.desc();
        let i = (0..MAX_PINS)
            .find(|&i| d.pins[i].value.load(Relaxed) == 0)
            .ok_or(HeapError::TooManyPins)?;
        d.pins[i].pid.store(id.pid as u64, Relaxed);
        d.pins[i].start_time.store(id.start_time, Relaxed);
        d.pins[i].value.store(v, Relaxed);
        super::crash::hit(super::crash::HeapPoint::PinWritten);
        Ok(i)
    }

    /// Removes pin `i` if it still pins `v` (lock held).
    pub fn unpin(&self, i: usize, v: u64) -> HResult<()> {
        self.local()?;
        if let Some(p) = self.desc().pins.get(i) {
            if p.value.load(Relaxed) == v {
                p.value.store(0, Relaxed);
            }
        }
        Ok(())
    }

    /// The pinned values of live processes; pins of dead ones are dropped
    /// (lock held). A start time of 0 (identity unreadable when pinned)
    /// counts as alive while the pid exists.
    pub(crate) fn live_pins(&self) -> Vec<u64> {
        let d = self.desc();
        let mut out = Vec::new();
        for p in &d.pins {
            let v = p.value.load(Relaxed);
            if v == 0 {
                continue;
            }
            let pid = p.pid.load(Relaxed) as i32;
            let st = p.start_time.load(Relaxed);
            let alive = match owner::probe(pid) {
                owner::Liveness::Alive(t) => st == 0 || t == st,
                owner::Liveness::Gone => false,
                owner::Liveness::Unknown => true,
            };
            if alive {
                out.push(v);
            } else {
                p.value.store(0, Relaxed);
            }
        }
        out
    }
}
