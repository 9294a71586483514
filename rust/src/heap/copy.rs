//! Copy-in: a deep copy of an OCaml value graph into the heap, keeping
//! sharing and cycles, in one allocation.
//!
//! 1. **Validation and size pass** over the source, depth first with an
//!    explicit stack. Each distinct block gets its place in one span (a
//!    map keyed by source address, which keeps sharing and cycles).
//!    Refused before anything is allocated, so a refused value changes
//!    nothing: closures, objects, unforced lazies, infix and abstract
//!    blocks, custom blocks other than int32/int64/nativeint/bigarray, and
//!    pointers the caller does not recognise as OCaml values (naked
//!    pointers). A forced lazy (`Forward_tag`) is replaced by its value.
//!    Atoms (zero-size blocks, in the runtime's static table: the same
//!    address in every forked worker) are kept as they are, and so are
//!    blocks already in this heap when sharing is asked (`add_immutable`).
//! 2. **One span** of the total size is allocated (out of pool memory is
//!    reported here, still before any write). A GC this allocation runs
//!    takes the source's blocks that are in this heap as extra roots: the
//!    source may be the only thing still reaching them (a value unlinked
//!    and re-added in one `modify`).
//! 3. **Copy pass**: every block is written at its place, with the size
//!    and tag of its plan (never a header read again), with a black
//!    header, pointer fields translated through the map, other blocks
//!    copied word for word. A bigarray's data is copied inside its own
//!    custom block, after its dimensions, flagged `CAML_BA_EXTERNAL`
//!    without a proxy, so no finaliser ever runs on it and the heap's GC
//!    sees one block.
//!
//! Nothing reachable points into the span until the caller stores the
//! result (a single word store): a death during the copy leaves garbage
//! that the next GC or recovery reclaims. The span is rooted until the
//! outermost unlock ([`Heap::keep`]).

use super::chunks::find_in;
use super::value::*;
use super::{HResult, Heap, HeapError};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Source addresses are distinct multiples of 8: one multiplication mixes
/// them well enough, far cheaper than SipHash (the map is half of a small
/// copy's cost).
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (x >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Buffers of one copy, kept by the heap handle between copies so a copy
/// allocates nothing in the common case.
///
/// The places of the first `SMALL` blocks are looked up linearly (most
/// values copied are small, and a scan of a few words beats hashing); a
/// larger graph moves them to the hash map.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Keys of the first SMALL places, scanned linearly (8-byte stride).
    keys: Vec<u64>,
    plans: Vec<Plan>,
    big: bool,
    map: HashMap<u64, Plan, BuildHasherDefault<AddrHasher>>,
    order: Vec<u64>,
    stack: Vec<u64>,
}

const SMALL: usize = 16;

impl Scratch {
    fn clear(&mut self) {
        if self.big && (self.map.capacity() > 4096 || self.order.capacity() > 4096) {
            *self = Scratch::default();
            return;
        }
        if self.big {
            self.map.clear();
            self.big = false;
        }
        self.keys.clear();
        self.plans.clear();
        self.order.clear();
        self.stack.clear();
    }

    #[inline]
    fn get(&self, x: u64) -> Option<&Plan> {
        if self.big {
            self.map.get(&x)
        } else {
            self.keys
                .iter()
                .position(|&k| k == x)
                .map(|i| &self.plans[i])
        }
    }

    fn insert(&mut self, x: u64, p: Plan) {
        if !self.big && self.keys.len() < SMALL {
            self.keys.push(x);
            self.plans.push(p);
            return;
        }
        if !self.big {
            self.big = true;
            self.map
                .extend(self.keys.drain(..).zip(self.plans.drain(..)));
        }
        self.map.insert(x, p);
    }
}

// caml/bigarray.h
const BA_KIND_MASK: u64 = 0xFF;
const BA_MANAGED_MASK: u64 = 0x600;
/// Words of `struct caml_ba_array` before `dim[]`: data, num_dims, flags,
/// proxy.
const BA_FIXED_WORDS: u64 = 4;

fn ba_elt_size(kind: u64) -> Option<u64> {
    Some(match kind {
        0 => 4,     // float32
        1 => 8,     // float64
        2 | 3 => 1, // (u)int8
        4 | 5 => 2, // (u)int16
        6 => 4,     // int32
        7..=9 => 8, // int64, caml_int, nativeint
        10 => 8,    // complex32
        11 => 16,   // complex64
        12 => 1,    // char
        _ => return None,
    })
}

/// Reads the word at address `a` of the source graph.
///
/// # Safety
/// `a` is a header or field address of a block the caller's `is_value`
/// accepted (OCaml memory, readable), and the graph does not change during
/// the copy (the OCaml stub does not allocate).
#[inline]
unsafe fn src(a: u64) -> u64 {
    // SAFETY: contract above.
    unsafe { std::ptr::read(a as *const u64) }
}

/// What the copy does with one source block.
struct Plan {
    /// Where its header goes, in words from the start of the span.
    at: u64,
    /// Words in the copy (header included).
    words: u64,
    /// The source's wosize and tag when planned: the copy pass uses these,
    /// never the header read again, so what it writes is what was sized.
    n: u64,
    tag: u8,
}

/// The identifier of a custom block's operations (`ops->identifier`).
///
/// # Safety
/// `v` is a custom block of OCaml memory.
unsafe fn custom_id(v: u64) -> &'static [u8] {
    // SAFETY: field 0 of a custom block points to its custom_operations,
    // whose first member is a NUL-terminated identifier (runtime data,
    // static for the life of the process).
    unsafe {
        let ops = src(v) as *const *const libc::c_char;
        if ops.is_null() || (*ops).is_null() {
            return b"";
        }
        std::ffi::CStr::from_ptr(*ops).to_bytes()
    }
}

/// The result of the validation and size pass (the places are in the
/// scratch's map, in the order of its `order`).
struct Layout {
    /// The value to return when nothing is entered (an immediate, an
    /// atom, a shared value), else the top block.
    top: u64,
    enter: bool,
    total: u64,
}

/// The value a source word stands for, after its forwards, and whether it
/// is a block to copy (else it is stored as it is).
#[inline(always)]
fn resolve(
    mut x: u64,
    keep: &impl Fn(u64) -> bool,
    is_value: &impl Fn(u64) -> bool,
) -> Result<(u64, bool), HeapError> {
    for _ in 0..64 {
        if !is_block(x) || keep(x) {
            return Ok((x, false));
        }
        if !is_value(x) {
            return Err(HeapError::Uncopyable("pointer outside OCaml memory"));
        }
        // SAFETY: x is a block of OCaml memory (is_value).
        let hd = unsafe { src(x - 8) };
        if wosize(hd) == 0 {
            return Ok((x, false));
        }
        match tag(hd) {
            FORWARD_TAG => {
                // SAFETY: as above, wosize >= 1.
                x = unsafe { src(x) };
                continue;
            }
            CLOSURE_TAG | INFIX_TAG => return Err(HeapError::Uncopyable("closure")),
            OBJECT_TAG => return Err(HeapError::Uncopyable("object")),
            LAZY_TAG => return Err(HeapError::Uncopyable("lazy")),
            ABSTRACT_TAG => return Err(HeapError::Uncopyable("abstract")),
            _ => return Ok((x, true)),
        }
    }
    Err(HeapError::Uncopyable("chain of forwards"))
}

/// Words of the copy of custom block `x` (wosize `n`), or a refusal.
fn custom_words(x: u64, n: u64) -> Result<u64, HeapError> {
    // SAFETY: x is a custom block of OCaml memory.
    let id = unsafe { custom_id(x) };
    match id {
        b"_i" | b"_j" | b"_n" => Ok(n + 1),
        _ if id.starts_with(b"_bigarr") => {
            // SAFETY: a bigarray's custom block holds a caml_ba_array.
            let (ndims, flags) = unsafe { (src(x + 16), src(x + 24)) };
            if ndims > 16 || n < 1 + BA_FIXED_WORDS + ndims {
                return Err(HeapError::Uncopyable("bigarray"));
            }
            let elt =
                ba_elt_size(flags & BA_KIND_MASK).ok_or(HeapError::Uncopyable("bigarray kind"))?;
            let mut count = 1u64;
            for i in 0..ndims {
                // SAFETY: i < ndims, inside the block (checked above).
                let d = unsafe { src(x + 8 * (1 + BA_FIXED_WORDS + i)) };
                count = count
                    .checked_mul(d)
                    .ok_or(HeapError::Uncopyable("bigarray size"))?;
            }
            let bytes = count
                .checked_mul(elt)
                .ok_or(HeapError::Uncopyable("bigarray size"))?;
            Ok(1 + BA_FIXED_WORDS + ndims + bytes.div_ceil(8) + 1)
        }
        _ => Err(HeapError::Uncopyable("custom block")),
    }
}

/// Pass 1: validates the value whose `resolve` gave `first` and places
/// every block to copy.
fn plan(
    first: (u64, bool),
    keep: &impl Fn(u64) -> bool,
    is_value: &impl Fn(u64) -> bool,
    sc: &mut Scratch,
) -> Result<Layout, HeapError> {
    sc.clear();
    let (top, enter) = first;
    let mut l = Layout {
        top,
        enter,
        total: 0,
    };
    if !enter {
        return Ok(l);
    }
    place(top, sc, &mut l)?;
    while let Some(x) = sc.stack.pop() {
        // SAFETY: x was placed: a scanned block of OCaml memory.
        let n = wosize(unsafe { src(x - 8) });
        for k in 0..n {
            // SAFETY: k < wosize of an OCaml block.
            let f = unsafe { src(x + 8 * k) };
            // Immediates and blocks placed already need no more.
            if !is_block(f) || sc.get(f).is_some() {
                continue;
            }
            let (y, enter) = resolve(f, keep, is_value)?;
            if enter && (y == f || sc.get(y).is_none()) {
                place(y, sc, &mut l)?;
            }
        }
    }
    Ok(l)
}

/// Gives block `x` (entered, not yet placed) its place after the others;
/// a block with fields to scan goes on the stack.
#[inline]
fn place(x: u64, sc: &mut Scratch, l: &mut Layout) -> Result<(), HeapError> {
    // SAFETY: x came from resolve: a block of OCaml memory.
    let hd = unsafe { src(x - 8) };
    let n = wosize(hd);
    let t = tag(hd);
    let words = match t {
        CUSTOM_TAG => custom_words(x, n)?,
        t => {
            if t < NO_SCAN_TAG {
                sc.stack.push(x);
            }
            n + 1
        }
    };
    sc.insert(
        x,
        Plan {
            at: l.total,
            words,
            n,
            tag: t,
        },
    );
    sc.order.push(x);
    l.total = l
        .total
        .checked_add(words)
        .ok_or(HeapError::Uncopyable("too large"))?;
    Ok(())
}

/// Words a copy of `v` takes in a heap (0 for a value nothing is copied
/// of), or why it cannot be copied.
pub fn measure(v: u64, is_value: &impl Fn(u64) -> bool) -> Result<u64, HeapError> {
    let first = resolve(v, &|_| false, is_value)?;
    plan(first, &|_| false, is_value, &mut Scratch::default()).map(|l| l.total)
}

impl Heap<'_> {
    /// Copies `v` into the heap (lock held) and returns the copy (or `v`
    /// itself for an immediate, an atom, or with `share` a value of this
    /// heap). `is_value(a)` tells whether the address `a` is a block of
    /// OCaml memory (the stub asks the runtime's page table).
    pub fn copy_in(
        &self,
        v: u64,
        share: bool,
        is_value: &impl Fn(u64) -> bool,
    ) -> Result<u64, HeapError> {
        let mut first = None;
        if !share {
            // Resolved once, for both paths (a refusal is the one the
            // general path would report first, before any allocation).
            let (x, enter) = resolve(v, &|_| false, is_value)?;
            if enter {
                if let Some(r) = self.copy_flat(x) {
                    return r;
                }
            }
            first = Some((x, enter));
        }
        let mut sc = std::mem::take(&mut self.local()?.scratch);
        let r = if share {
            let ranges = self.ranges();
            let base = self.base();
            let keep = |x: u64| find_in(&ranges, x.wrapping_sub(base).wrapping_sub(8)).is_some();
            self.copy_planned(v, None, &keep, is_value, &mut sc)
        } else {
            self.copy_planned(v, first, &|_| false, is_value, &mut sc)
        };
        if let Ok(local) = self.local() {
            local.scratch = sc;
        }
        r
    }

    /// The copy of a value that is one block without pointers (a string,
    /// a boxed float, a float array: tags between `No_scan_tag` and
    /// `Custom_tag`, exclusive), or `None` for any other value, which the
    /// general path copies (or refuses). No map, no plan, no order: one
    /// validation (the same `resolve`), one span, one header, one memcpy
    /// (the string's words are never looked at one by one). Measured
    /// (callgrind, `bench/prof_heap.exe ours string10k`): 11,846 -> 11,361
    /// instructions per `modify` + `add` of a 10 KB string, of which the
    /// memcpy is most; the general path's cost is the map, the plan and the
    /// order of a graph.
    /// `x` is what `resolve` returned for the value, to be entered.
    fn copy_flat(&self, x: u64) -> Option<HResult<u64>> {
        // SAFETY: resolve accepted x: a block of OCaml memory, wosize >= 1.
        let hd = unsafe { src(x - 8) };
        let (n, t) = (wosize(hd), tag(hd));
        if t <= NO_SCAN_TAG || t == CUSTOM_TAG {
            return None;
        }
        // A GC this allocation runs keeps the source too, as in the
        // general path (it may be a block of this heap that only the
        // private caller still reaches).
        let span = match self.alloc_span_rooted(n + 1, &|out: &mut Vec<u64>| out.push(x)) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        // SAFETY: the span holds n + 1 fresh words of our area; x has n
        // words of fields (its header, read once above, sized the span);
        // lock held (alloc_span_rooted checked).
        unsafe {
            self.wr(span, make_header(n, t));
            std::ptr::copy_nonoverlapping(
                x as *const u8,
                self.pool.addr(span as usize + 8),
                n as usize * 8,
            );
        }
        let out = self.base() + span + 8;
        Some(self.keep(out).map(|()| out))
    }

    /// `first`: `resolve(v, keep, is_value)`, if the caller has it.
    fn copy_planned(
        &self,
        v: u64,
        first: Option<(u64, bool)>,
        keep: &impl Fn(u64) -> bool,
        is_value: &impl Fn(u64) -> bool,
        sc: &mut Scratch,
    ) -> HResult<u64> {
        let base = self.base();
        let first = match first {
            Some(f) => f,
            None => resolve(v, keep, is_value)?,
        };
        let l = plan(first, keep, is_value, sc)?;
        if !l.enter {
            return Ok(l.top);
        }
        // The allocation may collect. Until the copy is written, the
        // source's blocks that are in this heap (entered ones: a value read
        // from the heap and unlinked in the same `modify`; kept ones of
        // `add_immutable`) may be reachable from nothing but the source,
        // which is private: they are extra roots of that collection.
        let sc_ro: &Scratch = sc;
        let source_roots = |out: &mut Vec<u64>| {
            for &x in &sc_ro.order {
                out.push(x);
                let Some(p) = sc_ro.get(x) else { continue };
                if p.tag >= NO_SCAN_TAG {
                    continue;
                }
                for k in 0..p.n {
                    // SAFETY: x is an OCaml block of wosize p.n (pass 1),
                    // unchanged since: nothing was freed or written yet.
                    let f = unsafe { src(x + 8 * k) };
                    if is_block(f) && sc_ro.get(f).is_none() {
                        if let Ok((y, false)) = resolve(f, keep, is_value) {
                            out.push(y);
                        }
                    }
                }
            }
        };
        let span = self.alloc_span_rooted(l.total, &source_roots)?;
        // Every block of `order` and every entered field has a place (pass 1).
        let at = |x: u64| sc.get(x).map_or(0, |p| p.at);
        let dst = |x: u64| base + span + at(x) * 8 + 8;
        let half = sc.order.len() / 2;
        for (i, &x) in sc.order.iter().enumerate() {
            if i == half {
                crate::crashpoint::hit(crate::crashpoint::CrashPoint::HeapCopyHalfDone);
            }
            let Some(p) = sc.get(x) else { continue };
            let to = span + p.at * 8;
            // SAFETY: x is an OCaml block (pass 1); `to` starts p.words
            // words of our fresh span; lock held.
            unsafe {
                let n = p.n;
                self.wr(to, make_header(p.words - 1, p.tag));
                if p.tag < NO_SCAN_TAG {
                    for k in 0..n {
                        let f = src(x + 8 * k);
                        let t = if !is_block(f) {
                            f
                        } else if let Some(p) = sc.get(f) {
                            base + span + p.at * 8 + 8
                        } else {
                            // A forward, or a block kept as it is.
                            // Validated by pass 1: resolve cannot fail.
                            match resolve(f, keep, is_value) {
                                Ok((y, true)) => dst(y),
                                Ok((y, false)) => y,
                                Err(_) => VAL_UNIT,
                            }
                        };
                        self.wr(to + 8 + 8 * k, t);
                    }
                } else {
                    std::ptr::copy_nonoverlapping(
                        x as *const u8,
                        self.pool.addr(to as usize + 8),
                        n as usize * 8,
                    );
                    if p.tag == CUSTOM_TAG && p.words > n + 1 {
                        self.fix_bigarray(x, to + 8);
                    }
                }
            }
        }
        let out = dst(l.top);
        self.keep(out)?;
        Ok(out)
    }

    /// Points the copied bigarray at `fields` (its copy's first field) to
    /// its data, copied right after its dimensions.
    ///
    /// # Safety
    /// `x` is the source bigarray, `fields` its copy in our span, sized by
    /// `custom_words`; lock held.
    unsafe fn fix_bigarray(&self, x: u64, fields: u64) {
        // SAFETY: contract above.
        unsafe {
            let ndims = src(x + 16);
            let flags = src(x + 24);
            let data_at = fields + 8 * (1 + BA_FIXED_WORDS + ndims);
            let elt = ba_elt_size(flags & BA_KIND_MASK).unwrap_or(1);
            let mut count = 1u64;
            for i in 0..ndims {
                count *= src(x + 8 * (1 + BA_FIXED_WORDS + i));
            }
            std::ptr::copy_nonoverlapping(
                src(x + 8) as *const u8,
                self.pool.addr(data_at as usize),
                (count * elt) as usize,
            );
            self.wr(fields + 8, self.base() + data_at); // data
            self.wr(fields + 24, flags & !BA_MANAGED_MASK); // CAML_BA_EXTERNAL
            self.wr(fields + 32, 0); // no proxy
        }
    }

    /// Roots a value of this heap obtained otherwise (lock held).
    pub fn add_root(&self, v: u64) -> HResult<()> {
        self.keep(v)
    }
}
