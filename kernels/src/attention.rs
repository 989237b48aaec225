//! Causal self-attention over a key/value cache, split into work items that threads
//! take independently: grouped-query heads read their shared keys and values in place
//! (no copies per head), and a sliding window limits what each query sees.
//!
//! Four kernels, chosen per call from its geometry alone (so a sequence's results never
//! depend on what else runs), by the run of queries the call belongs to (so a prompt
//! computed in several calls, or after cached positions, gives the bits it gives in one
//! call):
//!
//! - **f16 accumulator**, for runs of fewer than 64 queries (short prompts and decode
//!   steps) over an f16 cache and fewer than 512 keys: llama.cpp's CPU flash
//!   attention for a handful of queries, operation for operation, so that kiln decodes
//!   the tokens llama.cpp decodes. Per head: the
//!   query rounded to f16; for each key in order, the score as ggml's AVX-512
//!   `ggml_vec_dot_f16` sums it (16-lane products, its reduction tree), times the scale;
//!   an online softmax with libm's `expf` and `S = fma(S, ms, vs)`; the weighted values
//!   accumulated in f16, every update rounded; at the end the accumulator times `1 / S`.
//!   An item is one query × the heads of one KV group, each head its own chain, so every
//!   key and value row is widened once per group. From 512 keys on, runs take the next
//!   kernel: there llama.cpp's decode splits the keys across threads (an order that
//!   depends on the thread count), and a chunk of a few queries would pay a scalar `expf`
//!   per key, query and head.
//! - **Few queries over many keys** (AVX-512, runs of fewer than 64 queries over an f16
//!   cache from 512 keys on, heads of 64, 128 or 256): the same items, in f32 — per
//!   block of 16 keys the scores, one rescale where the block raises the maximum, the 16
//!   weights by one vector `exp`, the values accumulated in registers. (Other levels and
//!   head sizes take the f32 kernel, with the same items.) A decode step (a run of one
//!   query) also splits its keys into `KEY_PARTS` items per KV group, each leaving a
//!   partial softmax that [`combine`] merges in order: one session's step keeps every
//!   thread busy (SmolLM2 has three groups) and reads the cache in long runs of rows.
//! - **Tiled, as llama.cpp** (AVX-512, runs of 64 queries or more over an f16 cache):
//!   llama.cpp's tiled CPU flash attention, operation for operation — keys in tiles of 64 from
//!   position 0, scores as in-order FMA chains of the f32 query against the f16 keys,
//!   `ggml_v_expf` per score, sums per 16 reduced as GCC does and added in f64, values
//!   accumulated by an FMA chain over each tile's keys — so that long prompts, too, give
//!   llama.cpp's bits.
//! - **f32 flash attention** (everything else): an item is a tile of queries × the heads
//!   of one KV group (up to four SIMD vectors of query lanes). For each block of keys it
//!   computes the score block like a small GEMM (a key element broadcast against the
//!   transposed queries, queries in lanes), masks it (causal, window), runs the online
//!   softmax with the queries still in lanes, and accumulates `P·V` in f32. It differs
//!   from [`ops::attend`] only in summation order, a polynomial `exp` (~2 ulp), the scale
//!   folded into the query, and normalization at the end: ~1e-6 relative.
//!
//! The cache holds f32 rows, or f16 rows ([`CacheRows`]) that each block of keys and
//! values is widened from into L1 scratch before the f32 kernel reads it.
//!
//! The f32 kernel runs at the best [`SimdLevel`] of the CPU (AVX-512, else AVX2 + FMA);
//! its scalar level runs [`ops::attend`] per (query, head). The f16-accumulator kernel
//! is the same operations at every level.

use std::array;
use std::cell::RefCell;
use std::ops::Range;

use crate::gemm::{simd_level, OutMatrix, SimdLevel};
use crate::ops;

/// Geometry of one attention call: `n_tokens` queries at positions
/// `start_pos..start_pos + n_tokens`, each row of `q` holding `n_head` heads of
/// `head_dim`; cache rows hold `n_kv_head` heads (`kv_stride` floats apart).
#[derive(Clone, Copy, Debug)]
pub struct AttnGeometry {
    pub n_tokens: usize,
    pub start_pos: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub kv_stride: usize,
    pub scale: f32,
    /// A query at position p sees keys in `p + 1 - window ..= p`.
    pub window: Option<usize>,
    /// The cache holds f16 rows ([`CacheRows::F16`]); calls of few queries then take the
    /// f16-accumulator kernel (see the module documentation).
    pub f16_cache: bool,
    /// The run of queries this call is part of: positions `run_start..run_end`
    /// (`start_pos..start_pos + n_tokens` for a call that is a run of its own). A caller
    /// that computes a run, such as a prompt, in several calls gives each the whole run,
    /// and every call then takes the kernel the run would in one call: no query's result
    /// depends on how its run was split.
    pub run_start: usize,
    pub run_end: usize,
}

/// Runs of fewer queries than this take the f16-accumulator kernel (llama.cpp's
/// `GGML_FA_TILE_Q`: from 64 queries on it tiles in f32).
const F16_ACC_MAX_TOKENS: usize = 64;
/// Runs whose last query sees this many keys or more take the f32 kernel.
const F16_ACC_MAX_KEYS: usize = 512;

/// Whether a call whose run ([`AttnGeometry::run_start`]) is `run_tokens` queries from
/// position `run_start`, over an f16 cache, runs the f16-accumulator kernel: other
/// backends that mean to give the same bits (the GPU's `attention_f16.wgsl`) choose by
/// this too.
pub fn f16_accumulator_call(run_tokens: usize, run_start: usize) -> bool {
    run_tokens < F16_ACC_MAX_TOKENS && run_start + run_tokens < F16_ACC_MAX_KEYS
}

impl AttnGeometry {
    fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    /// Queries of the run this call is part of (0 for an inconsistent run, which
    /// `run_item_at` refuses).
    fn run_tokens(&self) -> usize {
        self.run_end.saturating_sub(self.run_start)
    }

    /// Whether this call runs the f16-accumulator kernel (see the module docs).
    fn f16_accumulator(&self) -> bool {
        self.f16_cache && f16_accumulator_call(self.run_tokens(), self.run_start)
    }

    /// Whether this call is a run of few queries over an f16 cache (decode steps, short
    /// prompts): one item per query and KV group, the f16-accumulator kernel's split,
    /// whichever kernel computes them.
    fn few_queries(&self) -> bool {
        self.f16_cache && self.run_tokens() < F16_ACC_MAX_TOKENS
    }

    /// The keys query `t` sees: `first..=pos`.
    fn visible(&self, t: usize) -> (usize, usize) {
        let pos = self.start_pos + t;
        (self.window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos)
    }
}

/// The key or value rows of a cache, as stored.
#[derive(Clone, Copy, Debug)]
pub enum CacheRows<'a> {
    F32(&'a [f32]),
    /// f16 bit patterns.
    F16(&'a [u16]),
}

impl CacheRows<'_> {
    /// Elements (f32 or f16).
    pub fn len(&self) -> usize {
        match self {
            CacheRows::F32(x) => x.len(),
            CacheRows::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `at..at + out.len()` as f32.
    fn widen(&self, at: usize, out: &mut [f32]) {
        match self {
            CacheRows::F32(x) => out.copy_from_slice(&x[at..at + out.len()]),
            CacheRows::F16(x) => ops::f16_to_f32_slice(&x[at..at + out.len()], out),
        }
    }
}

/// Where each position's key and value rows live in the cache: the cache is a pool of
/// pages of `page_size` rows, and position `p` is row `p % page_size` of page
/// `pages[p / page_size]`. A contiguous cache is one page as large as any context.
#[derive(Clone, Copy, Debug)]
pub struct KvPages<'a> {
    pub pages: &'a [u32],
    pub page_size: usize,
}

impl KvPages<'static> {
    /// Position `p` at row `p`.
    pub fn contiguous() -> Self {
        KvPages {
            pages: &[0],
            page_size: usize::MAX,
        }
    }
}

impl KvPages<'_> {
    /// The cache row of position `p`.
    #[inline]
    pub fn row(&self, p: usize) -> usize {
        self.pages[p / self.page_size] as usize * self.page_size + p % self.page_size
    }

    /// [`Self::row`], or `None` where the table has no page for `p` or the row number
    /// overflows.
    fn checked_row(&self, p: usize) -> Option<usize> {
        let page = *self.pages.get(p.checked_div(self.page_size)?)? as usize;
        page.checked_mul(self.page_size)?.checked_add(p % self.page_size)
    }

    /// The end of the run of consecutive rows that holds position `p`: the first position
    /// of the next page.
    #[inline]
    fn run_end(&self, p: usize) -> usize {
        (p - p % self.page_size).saturating_add(self.page_size)
    }

    /// Whether the rows of positions `0..n` lie in `0..rows`.
    fn fits(&self, n: usize, rows: usize) -> bool {
        let needed = n.div_ceil(self.page_size);
        needed <= self.pages.len()
            && self.pages[..needed].iter().enumerate().all(|(i, &page)| {
                let used = self.page_size.min(n - i * self.page_size);
                (page as usize)
                    .checked_mul(self.page_size)
                    .and_then(|first| first.checked_add(used))
                    .is_some_and(|end| end <= rows)
            })
    }
}

/// The cache rows of consecutive positions from a first one on, without a division and
/// a page-table load per position (a decode step's attention computed both for every key
/// it read, on the path to the key's load): one per page. It ends where the table has no
/// page for a position (or the row number overflows).
struct RowWalk<'a> {
    pages: KvPages<'a>,
    pos: usize,
    row: usize,
    /// The first position of the next page: where the walk looks up the table again.
    page_end: usize,
}

impl<'a> RowWalk<'a> {
    fn new(pages: KvPages<'a>, pos: usize) -> Self {
        RowWalk {
            pages,
            pos,
            row: 0,
            page_end: pos,
        }
    }
}

impl Iterator for RowWalk<'_> {
    type Item = usize;

    /// The row of the current position; the walk moves on to the next.
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.pos == self.page_end {
            self.row = self.pages.checked_row(self.pos)?;
            self.page_end = self.pages.run_end(self.pos);
        }
        self.pos += 1;
        self.row = self.row.wrapping_add(1);
        Some(self.row.wrapping_sub(1))
    }
}

/// Keys per block: scores, weights and probabilities of a block stay in L1.
const KEY_BLOCK: usize = 64;

/// The blocks of keys `first..=last`: at most [`KEY_BLOCK`] keys each, never across a
/// page, as `(first position, keys, first cache row)`.
fn key_blocks(pages: KvPages<'_>, first: usize, last: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut kb = first;
    std::iter::from_fn(move || {
        if kb > last {
            return None;
        }
        let nb = KEY_BLOCK.min(last + 1 - kb).min(pages.run_end(kb) - kb);
        let block = (kb, nb, pages.row(kb));
        kb += nb;
        Some(block)
    })
}

/// How a call is split: an item is `tokens` consecutive queries × `heads` consecutive
/// heads of one KV group over one of `key_parts` parts of their keys; a group has `parts`
/// items per tile of queries and part of keys.
struct Split {
    heads: usize,
    parts: usize,
    tokens: usize,
    tiles: usize,
    key_parts: usize,
}

impl Split {
    /// Items per part of the keys.
    fn per_key_part(&self, g: &AttnGeometry) -> usize {
        g.n_kv_head * self.parts * self.tiles
    }
}

/// Parts a decode step's keys are split into from 512 keys on: each part is an item
/// (per KV group) whose partial softmax [`combine`] merges, so that one session's step
/// keeps every thread busy (SmolLM2 has 3 KV groups) and a thread reads the cache in
/// long runs of rows.
const KEY_PARTS: usize = 16;

fn split(g: &AttnGeometry) -> Split {
    let group = g.group();
    if g.few_queries() {
        // Only runs of one query split their keys: a run's queries must all take the
        // same arithmetic however the run is split into calls.
        let split_keys = g.run_tokens() == 1 && !g.f16_accumulator();
        return Split {
            heads: group,
            parts: 1,
            tokens: 1,
            tiles: g.n_tokens,
            key_parts: if split_keys { KEY_PARTS } else { 1 },
        };
    }
    let heads = group.min(TILE_LANES);
    let tokens = (TILE_LANES / heads).max(1);
    Split {
        heads,
        parts: group.div_ceil(heads),
        tokens,
        tiles: g.n_tokens.div_ceil(tokens),
        key_parts: 1,
    }
}

/// Query lanes (query × head) of an f32 tile: enough to reuse each key and value row
/// loaded from L2 many times, few enough that the tile's transposed queries, outputs
/// and score block stay in L1/L2 (64 × 256 floats = 64 KiB each at head_dim 256).
const TILE_LANES: usize = 64;

/// How many work items a call splits into.
pub fn work_items(g: &AttnGeometry) -> usize {
    let s = split(g);
    s.per_key_part(g) * s.key_parts
}

/// Floats of scratch a call's items leave their partial results in for [`combine`]
/// (0: the items write the output themselves).
pub fn partial_floats(g: &AttnGeometry) -> usize {
    let s = split(g);
    if s.key_parts > 1 {
        g.n_tokens * g.n_head * s.key_parts * (g.head_dim + 2)
    } else {
        0
    }
}

/// Where a call's items leave partial results: [`partial_floats`] floats, which several
/// threads write at once, each item its own.
#[derive(Clone, Copy)]
pub struct Partials {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `Partials` is only a place to write; `new`'s contract makes concurrent items
// write disjoint floats.
unsafe impl Send for Partials {}
unsafe impl Sync for Partials {}

impl Partials {
    /// # Safety
    /// `ptr` is valid for writes of `len` floats, which no one else touches while the
    /// call's items run.
    pub unsafe fn new(ptr: *mut f32, len: usize) -> Self {
        Partials { ptr, len }
    }

    /// The `len` floats from `at` on, for one call of several sharing the floats.
    ///
    /// # Panics
    /// If they are not all inside.
    pub fn range(self, at: usize, len: usize) -> Self {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len),
            "attention: partials range"
        );
        Partials {
            ptr: self.ptr.wrapping_add(at),
            len,
        }
    }

    /// Where query `t`'s head `h` over key part `p` of `parts` starts: `head_dim + 2`
    /// floats, all inside.
    fn slot(&self, g: &AttnGeometry, (t, h): (usize, usize), (p, parts): (usize, usize)) -> *mut f32 {
        let d = g.head_dim;
        let at = ((t * g.n_head + h) * parts + p) * (d + 2);
        assert!(at + d + 2 <= self.len, "attention: partials");
        self.ptr.wrapping_add(at)
    }

    /// Writes query `t`'s head `h` over key part `p` of `parts`: its weighted sum of
    /// values (relative to its largest score), that score and the sum of its weights.
    fn write(&self, g: &AttnGeometry, th: (usize, usize), part: (usize, usize), acc: &[f32], max: f32, sum: f32) {
        let d = g.head_dim;
        assert_eq!(acc.len(), d, "attention: partials");
        let at = self.slot(g, th, part);
        // SAFETY: `slot` checked the d + 2 floats lie inside the `len` floats `new`
        // vouched for; they are this item's own.
        unsafe {
            std::ptr::copy_nonoverlapping(acc.as_ptr(), at, d);
            at.add(d).write(max);
            at.add(d + 1).write(sum);
        }
    }

    /// Writes query `t`'s head `h` over an empty part `p` of `parts`: nothing seen.
    fn write_empty(&self, g: &AttnGeometry, th: (usize, usize), part: (usize, usize)) {
        let d = g.head_dim;
        let at = self.slot(g, th, part);
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::write_bytes(at, 0, d);
            at.add(d).write(f32::NEG_INFINITY);
            at.add(d + 1).write(0.0);
        }
    }
}

/// The keys `first..=pos` of part `p` of `parts` (equal runs, the last shorter), or
/// `None` when that part is empty.
fn key_part((first, pos): (usize, usize), (p, parts): (usize, usize)) -> Option<(usize, usize)> {
    let size = (pos + 1 - first).div_ceil(parts);
    let lo = first + p * size;
    (lo <= pos).then(|| (lo, (lo + size).min(pos + 1) - 1))
}

/// After every item of a call that left partial results ([`partial_floats`] > 0):
/// merges each query's and head's parts, in order, into `out` as element `(t, h *
/// head_dim + i)`. Does nothing for other calls.
pub fn combine(g: &AttnGeometry, partials: &[f32], out: OutMatrix) {
    let s = split(g);
    if s.key_parts <= 1 {
        return;
    }
    let d = g.head_dim;
    assert!(partials.len() >= partial_floats(g), "attention: partials");
    SCRATCH.with_borrow_mut(|sc| {
        let acc = aligned(&mut sc.o, d);
        for t in 0..g.n_tokens {
            for h in 0..g.n_head {
                let parts = &partials[(t * g.n_head + h) * s.key_parts * (d + 2)..][..s.key_parts * (d + 2)];
                let max = parts
                    .chunks_exact(d + 2)
                    .filter(|p| p[d + 1] > 0.0)
                    .fold(f32::NEG_INFINITY, |m, p| m.max(p[d]));
                let mut sum = 0f32;
                acc.fill(0.0);
                for p in parts.chunks_exact(d + 2).filter(|p| p[d + 1] > 0.0) {
                    let w = (p[d] - max).exp();
                    sum = p[d + 1].mul_add(w, sum);
                    for (a, v) in acc.iter_mut().zip(&p[..d]) {
                        *a = v.mul_add(w, *a);
                    }
                }
                let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
                for (i, &a) in acc.iter().enumerate() {
                    // SAFETY: the caller's OutMatrix covers the call's rows.
                    unsafe { out.write(t, h * d + i, a * inv) };
                }
            }
        }
    });
}

/// Computes work item `item` (< [`work_items`]): some heads of some queries, written
/// to `out` as element `(t, h * head_dim + i)`, or for calls that split their keys
/// ([`partial_floats`] > 0) left in `partials` for [`combine`] once every item ran.
///
/// `q` holds `n_tokens × n_head × head_dim` floats; `keys` and `values` hold rows of
/// `kv_stride` elements (both f32 or both f16), with positions `0..start_pos + n_tokens`
/// where `pages` puts them.
#[allow(clippy::too_many_arguments)]
pub fn run_item(
    g: &AttnGeometry,
    q: &[f32],
    keys: CacheRows,
    values: CacheRows,
    pages: KvPages,
    item: usize,
    out: OutMatrix,
    partials: Partials,
) {
    run_item_at(simd_level(), g, q, keys, values, pages, item, out, partials)
}

/// Keys whose rows the f16-accumulator kernel asks the cache for ahead of using them:
/// in batched decode the cache rows of the other sessions and layers have pushed an
/// item's rows out to DRAM, and a load per key would wait on each. (8 sessions of
/// SmolLM2 decoding 128 tokens: the kernel's share of the time 11.1-11.6% asking 32 keys
/// ahead, 9.2-9.3% at 64, 8.2-8.7% at 128, 15.6% at 16; 64 keys of SmolLM2's heads are 16
/// KiB, a third of L1.)
const PREFETCH_KEYS: usize = 64;

/// Hints the CPU to fetch the first key and value rows that work item `item` reads, so
/// that a caller running items one after another can overlap the next item's DRAM
/// latency with the current item's work. Only the f16-accumulator kernel (few queries
/// over an f16 cache) gains from it; for other calls, or an item or rows the cache does
/// not hold, it does nothing. It never reads memory.
pub fn prefetch_item(g: &AttnGeometry, keys: CacheRows, values: CacheRows, pages: KvPages, item: usize) {
    #[cfg(target_arch = "x86_64")]
    if let (CacheRows::F16(keys), CacheRows::F16(values), true) = (keys, values, g.few_queries()) {
        if g.n_kv_head == 0 || !g.n_head.is_multiple_of(g.n_kv_head) {
            return;
        }
        let s = split(g);
        if item >= s.per_key_part(g) * s.key_parts {
            return;
        }
        let (part, item) = (item / s.per_key_part(g), item % s.per_key_part(g));
        let kv = item / s.tiles / s.parts;
        let Some((first, pos)) = key_part(g.visible(item % s.tiles), (part, s.key_parts)) else {
            return;
        };
        // A prefetch never faults, so wrapping arithmetic is enough for where it points.
        for row in RowWalk::new(pages, first).take((pos + 1 - first).min(PREFETCH_KEYS)) {
            let at = row.wrapping_mul(g.kv_stride).wrapping_add(kv * g.head_dim);
            prefetch_row(keys, values, at, g.head_dim);
        }
    }
}

/// Asks for the cache lines of the `d` keys and values at element `at` of each cache.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_row(keys: &[u16], values: &[u16], at: usize, d: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for off in (0..d).step_by(32) {
        // SAFETY: SSE is part of x86_64; a prefetch only hints the cache and never
        // faults, wherever it points.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(keys.as_ptr().wrapping_add(at.wrapping_add(off)).cast());
            _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(at.wrapping_add(off)).cast());
        }
    }
}

/// [`run_item`] at a given SIMD level (at most [`simd_level`]), whose items are those of
/// [`work_items`]: for tests that compare levels.
///
/// # Panics
/// If the level is not supported, the slices are too short, or the geometry is
/// inconsistent.
#[allow(clippy::too_many_arguments)]
pub fn run_item_at(
    level: SimdLevel,
    g: &AttnGeometry,
    q: &[f32],
    keys: CacheRows,
    values: CacheRows,
    pages: KvPages,
    item: usize,
    out: OutMatrix,
    partials: Partials,
) {
    assert!(
        level <= simd_level(),
        "attention: {level:?} is not supported by this CPU"
    );
    let d = g.head_dim;
    assert!(
        g.n_kv_head > 0 && g.n_head.is_multiple_of(g.n_kv_head),
        "attention: heads per KV head"
    );
    assert!(g.n_kv_head * d <= g.kv_stride, "attention: KV row stride");
    assert!(
        g.run_start <= g.start_pos && g.start_pos + g.n_tokens <= g.run_end,
        "attention: a call outside its run"
    );
    assert!(q.len() >= g.n_tokens * g.n_head * d, "attention: query length");
    assert!(
        matches!(
            (keys, values, g.f16_cache),
            (CacheRows::F32(_), CacheRows::F32(_), false) | (CacheRows::F16(_), CacheRows::F16(_), true)
        ),
        "attention: keys and values in the format the geometry says"
    );
    let rows = keys.len().min(values.len()) / g.kv_stride;
    assert!(
        g.kv_stride > 0 && pages.page_size > 0 && pages.fits(g.start_pos + g.n_tokens, rows),
        "attention: the cache pages of positions 0..{} are not all in the cache",
        g.start_pos + g.n_tokens
    );
    let s = split(g);
    assert!(item < s.per_key_part(g) * s.key_parts, "attention: item {item}");
    assert!(partials.len >= partial_floats(g), "attention: partials");
    let (part_of_keys, item) = (item / s.per_key_part(g), item % s.per_key_part(g));
    let (tile, rest) = (item % s.tiles, item / s.tiles);
    let (part, kv) = (rest % s.parts, rest / s.parts);
    let group = g.group();
    let h0 = kv * group + part * s.heads;
    let t0 = tile * s.tokens;
    let job = Item {
        g,
        q,
        keys,
        values,
        pages,
        heads: h0..(h0 + s.heads).min((kv + 1) * group),
        tokens: t0..(t0 + s.tokens).min(g.n_tokens),
        kv_offset: kv * d,
        out,
        key_part: (s.key_parts > 1).then_some((part_of_keys, s.key_parts)),
        partials,
    };
    if let Some(part) = job.key_part {
        // Items over parts of the keys have one query. An empty part (a short window) is
        // written here, once for every kernel: nothing seen.
        let t = job.tokens.start;
        if key_part(g.visible(t), part).is_none() {
            for h in job.heads.clone() {
                partials.write_empty(g, (t, h), part);
            }
            return;
        }
    }
    SCRATCH.with_borrow_mut(|sc| match level {
        _ if g.f16_accumulator() => f16_acc(level, &job, sc),
        SimdLevel::Scalar if job.key_part.is_some() => part_portable(&job, sc),
        SimdLevel::Scalar => run_portable(&job, sc),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            // SAFETY: AVX2 and FMA are present (level ≤ simd_level()); the slice
            // lengths were checked above.
            unsafe { run_avx2(&job, sc) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => match (keys, values) {
            (CacheRows::F16(k), CacheRows::F16(v)) if g.few_queries() && matches!(g.head_dim, 64 | 128 | 256) => {
                // SAFETY: AVX-512 F/BW/VL, FMA and F16C are present (level ≤ simd_level());
                // the visible rows were checked to lie in the caches above.
                unsafe { few_queries_item_avx512(&job, sc, k, v) }
            }
            (CacheRows::F16(k), CacheRows::F16(v))
                if g.head_dim.is_multiple_of(16) && g.run_tokens() >= F16_ACC_MAX_TOKENS =>
            {
                // SAFETY: AVX-512 F/BW/VL, FMA and F16C are present (level ≤ simd_level());
                // the visible rows were checked to lie in the caches above.
                unsafe { tiled_item_avx512(&job, sc, k, v) }
            }
            _ => {
                // SAFETY: AVX-512 F/BW/VL, AVX2 and FMA are present (level ≤ simd_level());
                // the slice lengths were checked above.
                unsafe { run_avx512(&job, sc) }
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => run_portable(&job, sc),
    });
}

/// One work item, its bounds checked.
struct Item<'a> {
    g: &'a AttnGeometry,
    q: &'a [f32],
    keys: CacheRows<'a>,
    values: CacheRows<'a>,
    pages: KvPages<'a>,
    heads: Range<usize>,
    tokens: Range<usize>,
    kv_offset: usize,
    out: OutMatrix,
    /// Which part of its keys the item takes, of how many, when the call splits them.
    key_part: Option<(usize, usize)>,
    partials: Partials,
}

impl Item<'_> {
    /// The keys query `t` sees in this item, `first..=pos`: all it sees, or one part of
    /// them (never empty: `run_item_at` writes empty parts itself).
    fn seen(&self, t: usize) -> (usize, usize) {
        match self.key_part {
            Some(part) => key_part(self.g.visible(t), part).expect("run_item_at wrote the empty parts"),
            None => self.g.visible(t),
        }
    }

    fn query(&self, t: usize, h: usize) -> &[f32] {
        let d = self.g.head_dim;
        &self.q[(t * self.g.n_head + h) * d..][..d]
    }
}

/// Per-thread scratch, grown to the largest item seen and reused.
struct Scratch {
    q: Vec<f32>,
    o: Vec<f32>,
    s: Vec<f32>,
    w: Vec<f32>,
    r: Vec<f32>,
    stats: Vec<f32>,
    /// A block of keys and one of values widened from f16.
    kb: Vec<f32>,
    vb: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            q: Vec::new(),
            o: Vec::new(),
            s: Vec::new(),
            w: Vec::new(),
            r: Vec::new(),
            stats: Vec::new(),
            kb: Vec::new(),
            vb: Vec::new(),
        })
    };
}

/// `n` floats of `buf` starting on a 64-byte boundary, so that full-width loads never
/// split a cache line.
fn aligned(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n + 16 {
        buf.resize(n + 16, 0.0);
    }
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..skip + n]
}

/// The reference kernel per (query, head), over the visible rows of the item's KV head
/// gathered into one contiguous run.
fn run_portable(it: &Item, sc: &mut Scratch) {
    let g = it.g;
    let d = g.head_dim;
    let head_out = aligned(&mut sc.o, d);
    for t in it.tokens.clone() {
        let (first, pos) = g.visible(t);
        let n = pos + 1 - first;
        let (keys, rest) = aligned(&mut sc.w, 2 * n * d).split_at_mut(n * d);
        let values = rest;
        for (j, p) in (first..=pos).enumerate() {
            let row = it.pages.row(p) * g.kv_stride + it.kv_offset;
            it.keys.widen(row, &mut keys[j * d..][..d]);
            it.values.widen(row, &mut values[j * d..][..d]);
        }
        let scratch = aligned(&mut sc.s, n.max(d));
        for h in it.heads.clone() {
            let query = it.query(t, h);
            ops::attend(query, keys, values, d, 0, 0, n, g.scale, scratch, head_out);
            for (i, &v) in head_out.iter().enumerate() {
                // SAFETY: the caller's OutMatrix covers row t, columns of head h.
                unsafe { it.out.write(t, h * d + i, v) };
            }
        }
    }
}

/// An item over one part of its keys at the scalar level (the SIMD levels' kernels take
/// parts themselves): each head's partial softmax left in the partials.
fn part_portable(it: &Item, sc: &mut Scratch) {
    let g = it.g;
    let d = g.head_dim;
    let part = it.key_part.expect("an item over a part of its keys");
    let acc = aligned(&mut sc.o, d);
    let key = aligned(&mut sc.kb, d);
    let value = aligned(&mut sc.vb, d);
    for t in it.tokens.clone() {
        let (first, pos) = it.seen(t);
        for h in it.heads.clone() {
            acc.fill(0.0);
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
            for p in first..=pos {
                let row = it.pages.row(p) * g.kv_stride + it.kv_offset;
                it.keys.widen(row, key);
                it.values.widen(row, value);
                let score = it.query(t, h).iter().zip(key.iter()).map(|(q, k)| q * k).sum::<f32>() * g.scale;
                if score > max {
                    let rescale = (max - score).exp();
                    acc.iter_mut().for_each(|a| *a *= rescale);
                    sum *= rescale;
                    max = score;
                }
                let w = (score - max).exp();
                sum += w;
                for (a, v) in acc.iter_mut().zip(value.iter()) {
                    *a = v.mul_add(w, *a);
                }
            }
            it.partials.write(g, (t, h), part, acc, max, sum);
        }
    }
}

/// The f16-accumulator kernel at `level`: the same operations at every level (the
/// SIMD levels only let the compiler vectorize them), so the same bits.
fn f16_acc(level: SimdLevel, it: &Item, sc: &mut Scratch) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => match (it.keys, it.values) {
            (CacheRows::F16(keys), CacheRows::F16(values)) if matches!(it.g.head_dim, 64 | 128 | 256) => {
                // SAFETY: the level was detected on this CPU, and run_item_at checked that
                // every visible row lies in the caches.
                unsafe { f16_acc_item_avx512(it, sc, keys, values) }
            }
            _ => {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512(it: &Item, sc: &mut Scratch) {
                    f16_acc_item(it, sc)
                }
                // SAFETY: the level was detected on this CPU (run_item_at checked it).
                unsafe { avx512(it, sc) }
            }
        },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2(it: &Item, sc: &mut Scratch) {
                f16_acc_item(it, sc)
            }
            // SAFETY: as above.
            unsafe { avx2(it, sc) }
        }
        _ => f16_acc_item(it, sc),
    }
}

/// Writes query `t`'s head `h`: the accumulated values times `1 / sum` (0 when nothing
/// was seen), as llama.cpp's kernels end.
fn write_normalized(it: &Item, t: usize, h: usize, acc: &[f32], sum: f32) {
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (i, &a) in acc.iter().enumerate() {
        // SAFETY: the caller's OutMatrix covers row t, columns of head h.
        unsafe { it.out.write(t, h * it.g.head_dim + i, a * inv) };
    }
}

/// One item of the f16-accumulator kernel (see the module docs).
#[inline(always)]
fn f16_acc_item(it: &Item, sc: &mut Scratch) {
    let g = it.g;
    let (d, hp) = (g.head_dim, it.heads.len());
    let q = aligned(&mut sc.q, hp * d);
    let acc = aligned(&mut sc.o, hp * d);
    let (maxes, sums) = aligned(&mut sc.stats, 2 * hp).split_at_mut(hp);
    let key = aligned(&mut sc.kb, d);
    let value = aligned(&mut sc.vb, d);
    for t in it.tokens.clone() {
        let (first, pos) = g.visible(t);
        for (hi, h) in it.heads.clone().enumerate() {
            q[hi * d..][..d].copy_from_slice(it.query(t, h));
        }
        ops::round_to_f16_in_place(q);
        acc.fill(0.0);
        maxes.fill(f32::NEG_INFINITY);
        sums.fill(0.0);
        for p in first..=pos {
            let row = it.pages.row(p) * g.kv_stride + it.kv_offset;
            it.keys.widen(row, key);
            it.values.widen(row, value);
            for hi in 0..hp {
                let acc = &mut acc[hi * d..][..d];
                let score = dot_f16_ggml(key, &q[hi * d..][..d]) * g.scale;
                let (rescale, weight) = if score > maxes[hi] {
                    let rescale = (maxes[hi] - score).exp();
                    maxes[hi] = score;
                    acc.iter_mut().for_each(|a| *a *= rescale);
                    ops::round_to_f16_in_place(acc);
                    (rescale, 1.0)
                } else {
                    (1.0, (score - maxes[hi]).exp())
                };
                for (a, v) in acc.iter_mut().zip(value.iter()) {
                    *a = v.mul_add(weight, *a);
                }
                ops::round_to_f16_in_place(acc);
                sums[hi] = sums[hi].mul_add(rescale, weight);
            }
        }
        for (hi, h) in it.heads.clone().enumerate() {
            write_normalized(it, t, h, &acc[hi * d..][..d], sums[hi]);
        }
    }
}

/// The instance of a heads pass (`f16_acc_heads`, `f32_heads`) for `n` heads of `d`
/// values, `d` being 64, 128 or 256 and `n` at most what keeps the accumulators in 16
/// registers (`256 / d`).
#[cfg(target_arch = "x86_64")]
macro_rules! heads_pass {
    ($pass:ident, $d:expr, $n:expr) => {
        match ($d, $n) {
            (64, 1) => $pass::<1, 4>,
            (64, 2) => $pass::<2, 4>,
            (64, 3) => $pass::<3, 4>,
            (64, _) => $pass::<4, 4>,
            (128, 1) => $pass::<1, 8>,
            (128, _) => $pass::<2, 8>,
            _ => $pass::<1, 16>,
        }
    };
}

/// [`f16_acc_item`] written out in AVX-512 for heads of 64, 128 or 256 over an f16
/// cache: the same operations in the same order (so the same bits), with the keys and
/// values converted in registers instead of widened into scratch, and the accumulators
/// of as many heads as fit in 16 registers kept there through a pass over the keys.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA and F16C are present; every visible row of the item lies in
/// `keys` and `values` (as `run_item_at` checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_acc_item_avx512(it: &Item, sc: &mut Scratch, keys: &[u16], values: &[u16]) {
    use std::arch::x86_64::*;
    let g = it.g;
    let (d, hp) = (g.head_dim, it.heads.len());
    let q = aligned(&mut sc.q, hp * d);
    let acc = aligned(&mut sc.o, hp * d);
    let sums = aligned(&mut sc.stats, hp);
    let round = |x: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
    // Heads a pass over the keys takes: as many as keep their accumulators in 16
    // registers (one pass for SmolLM2's 3 heads of 64, two for Qwen2.5-0.5B's 7).
    let chunk = (256 / d).max(1);
    for t in it.tokens.clone() {
        let (first, pos) = g.visible(t);
        for (hi, h) in it.heads.clone().enumerate() {
            for (c, chunk) in it.query(t, h).chunks_exact(16).enumerate() {
                // SAFETY: 16 floats each side.
                unsafe {
                    _mm512_storeu_ps(
                        q.as_mut_ptr().add(hi * d + 16 * c),
                        round(_mm512_loadu_ps(chunk.as_ptr())),
                    )
                };
            }
        }
        for h0 in (0..hp).step_by(chunk) {
            let n = chunk.min(hp - h0);
            let pass: HeadsPass = heads_pass!(f16_acc_heads, d, n);
            // SAFETY: q, acc and sums hold every head's d (or 1) values; the rows are in
            // the caches (the caller's contract).
            unsafe {
                pass(
                    it,
                    keys,
                    values,
                    (first, pos),
                    q.as_ptr().add(h0 * d),
                    acc.as_mut_ptr().add(h0 * d),
                    &mut sums[h0..h0 + n],
                )
            };
        }
        for (hi, h) in it.heads.clone().enumerate() {
            write_normalized(it, t, h, &acc[hi * d..][..d], sums[hi]);
        }
    }
}

/// One pass of [`f16_acc_item_avx512`]'s online softmax over the visible keys
/// `first..=pos` for `sums.len()` heads of `d` values: their rounded queries at `q`,
/// their f16-rounded weighted sums of values left at `acc` and sums of weights in
/// `sums`.
type HeadsPass = unsafe fn(&Item, &[u16], &[u16], (usize, usize), *const f32, *mut f32, &mut [f32]);

/// [`HeadsPass`] for `HP` heads of `16 DC` values, accumulators in registers: llama.cpp
/// keeps them in f16, so every update rounds them, and an accumulator in memory waits
/// on a store and a load per key.
///
/// # Safety
/// As [`f16_acc_item_avx512`]; `q` and `acc` hold `HP · 16 DC` floats, `sums` has `HP`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_acc_heads<const HP: usize, const DC: usize>(
    it: &Item,
    keys: &[u16],
    values: &[u16],
    (first, pos): (usize, usize),
    q: *const f32,
    acc_out: *mut f32,
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    let g = it.g;
    let d = 16 * DC;
    let round = |x: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
    let table = expf_table_512();
    let mut acc = [[_mm512_setzero_ps(); DC]; HP];
    let mut maxes = [f32::NEG_INFINITY; HP];
    let mut sum = [0f32; HP];
    let at = |row: usize| row * g.kv_stride + it.kv_offset;
    // Keys in blocks of 16: every score of the block first, then per head the running
    // maximum and each key's one `exp` argument (the rescale `max - score` where the
    // maximum grows, else the weight's `score - max`) and their 16 `exp`s at once, then
    // the accumulation key by key, as the scalar pass orders it. Each key and value
    // vector is widened once for all the heads. The rows are asked for PREFETCH_KEYS
    // keys ahead (the first ones at once; `prefetch_item` may have asked already): a
    // load per key waiting on DRAM, not arithmetic, was most of this kernel's time in
    // batched decode.
    // The rows of the keys read and of those asked for ahead, each walked in order (the
    // caller checked that the table covers them).
    let (mut reading, mut ahead) = (RowWalk::new(it.pages, first), RowWalk::new(it.pages, first));
    let next_row = |walk: &mut RowWalk| walk.next().expect("run_item_at checked the page table");
    let prefetch = |row: usize| prefetch_row(keys, values, at(row), d);
    for _ in first..=pos.min(first + PREFETCH_KEYS - 1) {
        prefetch(next_row(&mut ahead));
    }
    for p0 in (first..=pos).step_by(16) {
        let n = (pos + 1 - p0).min(16);
        let mut scores = [[0f32; 16]; HP];
        // Where the block's keys and values start in the caches.
        let mut rows = [0usize; 16];
        for j in 0..n {
            if p0 + PREFETCH_KEYS + j <= pos {
                prefetch(next_row(&mut ahead));
            }
            rows[j] = at(next_row(&mut reading));
            // SAFETY: the row's d keys lie in the cache (the caller's contract).
            let kp = unsafe { keys.as_ptr().add(rows[j]) };
            // ggml's four chains per head: chain c % 4 takes values 16 c.. in order.
            let mut chains = [[_mm512_setzero_ps(); 4]; HP];
            for c in 0..DC {
                // SAFETY: 16 keys at 16 c < d; head hi's query is d floats at q.
                unsafe {
                    let k = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(16 * c).cast()));
                    for (hi, chains) in chains.iter_mut().enumerate() {
                        chains[c % 4] = _mm512_fmadd_ps(k, _mm512_loadu_ps(q.add(hi * d + 16 * c)), chains[c % 4]);
                    }
                }
            }
            for (scores, s) in scores.iter_mut().zip(&chains) {
                let x = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
                scores[j] = reduce_add_gcc(x) * g.scale;
            }
        }
        let mut exps = [[0f32; 16]; HP];
        let mut grew = [0u32; HP];
        for hi in 0..HP {
            let mut args = [0f32; 16];
            for j in 0..n {
                let score = scores[hi][j];
                if score > maxes[hi] {
                    args[j] = maxes[hi] - score;
                    maxes[hi] = score;
                    grew[hi] |= 1 << j;
                } else {
                    args[j] = score - maxes[hi];
                }
            }
            // SAFETY: 16 floats each side.
            unsafe {
                _mm512_storeu_ps(
                    exps[hi].as_mut_ptr(),
                    expf_libm512(_mm512_loadu_ps(args.as_ptr()), &table),
                )
            };
        }
        // j and c index the inner dimension of every head's arrays at once.
        #[allow(clippy::needless_range_loop)]
        for j in 0..n {
            let mut w = [_mm512_setzero_ps(); HP];
            for hi in 0..HP {
                let e = exps[hi][j];
                let (rescale, weight) = if grew[hi] & (1 << j) != 0 {
                    for a in &mut acc[hi] {
                        *a = round(_mm512_mul_ps(*a, _mm512_set1_ps(e)));
                    }
                    (e, 1.0)
                } else {
                    (1.0, e)
                };
                w[hi] = _mm512_set1_ps(weight);
                sum[hi] = sum[hi].mul_add(rescale, weight);
            }
            // SAFETY: the row's d values lie in the cache.
            let vp = unsafe { values.as_ptr().add(rows[j]) };
            #[allow(clippy::needless_range_loop)]
            for c in 0..DC {
                // SAFETY: 16 values at 16 c < d.
                let v = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(16 * c).cast())) };
                for hi in 0..HP {
                    acc[hi][c] = round(_mm512_fmadd_ps(v, w[hi], acc[hi][c]));
                }
            }
        }
    }
    for hi in 0..HP {
        for (c, a) in acc[hi].iter().enumerate() {
            // SAFETY: head hi's d floats at acc_out.
            unsafe { _mm512_storeu_ps(acc_out.add(hi * d + 16 * c), *a) };
        }
        sums[hi] = sum[hi];
    }
}

/// The constants of glibc's `expf` (the algorithm of its `__expf_fma`, which
/// [`expf_libm512`] runs on 16 lanes): `x · 32/ln 2 = k + r` in double,
/// `2^(k/32)` from a 32-entry table with `k`'s high bits added to the exponent, a cubic
/// in `r`, one rounding to float. llama.cpp's f16 attention calls `expf` once per key;
/// this gives the same bits (checked against libm over every float of [-88, 88] when
/// written; `vector_expf_matches_libm` checks a sample) and lets a block of keys share
/// one evaluation.
#[cfg(target_arch = "x86_64")]
mod libm_expf {
    /// `32 / ln 2`, and `1.5 · 2^52`, whose addition leaves `round(z)` in the low
    /// mantissa bits.
    pub(super) const INV_LN2_N: u64 = 0x4047_1547_652b_82fe;
    pub(super) const SHIFT: u64 = 0x4338_0000_0000_0000;
    /// The cubic's coefficients for `r` scaled by 1/32: `C[0] r³ + C[1] r² + C[2] r + 1`.
    pub(super) const C: [u64; 3] = [0x3ebc_6af8_4b91_2394, 0x3f2e_bfce_50fa_c4f3, 0x3f96_2e42_ff0c_52d6];

    /// `2^(i/32)` with `i << 47` taken off, so that adding `k << 47` (k ≡ i mod 32)
    /// makes `2^(k/32)`.
    pub(super) fn table() -> &'static [u64; 32] {
        static TABLE: std::sync::OnceLock<[u64; 32]> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| std::array::from_fn(|i| (i as f64 / 32.0).exp2().to_bits().wrapping_sub((i as u64) << 47)))
    }
}

/// [`libm_expf::table`] in four registers of eight entries.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn expf_table_512() -> [std::arch::x86_64::__m512i; 4] {
    use std::arch::x86_64::*;
    let t = libm_expf::table();
    // SAFETY: entries 8 i..8 i + 8 of 32.
    std::array::from_fn(|i| unsafe { _mm512_loadu_si512(t.as_ptr().add(8 * i).cast()) })
}

/// glibc's `expf` (see [`libm_expf`]) on 16 lanes; lanes with `|x| ≥ 88` (or NaN) take
/// libm itself.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn expf_libm512(x: std::arch::x86_64::__m512, table: &[std::arch::x86_64::__m512i; 4]) -> std::arch::x86_64::__m512 {
    use libm_expf::{C, INV_LN2_N, SHIFT};
    use std::arch::x86_64::*;
    let eight = |xd: __m512d| -> __m256 {
        let inv = _mm512_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm512_set1_pd(f64::from_bits(SHIFT));
        let kd = _mm512_fmadd_pd(inv, xd, shift);
        let ki = _mm512_castpd_si512(kd);
        let r = _mm512_fmsub_pd(inv, xd, _mm512_sub_pd(kd, shift));
        // Entry ki mod 32: the low four bits pick among 16 of two registers, bit 4 the
        // pair.
        let low = _mm512_permutex2var_epi64(table[0], ki, table[1]);
        let high = _mm512_permutex2var_epi64(table[2], ki, table[3]);
        let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let c = |i: usize| _mm512_set1_pd(f64::from_bits(C[i]));
        let y = _mm512_fmadd_pd(
            _mm512_fmadd_pd(c(0), r, c(1)),
            _mm512_mul_pd(r, r),
            _mm512_fmadd_pd(c(2), r, _mm512_set1_pd(1.0)),
        );
        _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
    };
    let low = eight(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    let high = eight(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(x),
    ))));
    let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(low)),
        _mm256_castps_pd(high),
    ));
    let abs = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff));
    let special = _mm512_cmpge_epu32_mask(abs, _mm512_set1_epi32(0x42b0_0000));
    if special == 0 {
        return y;
    }
    let (mut xs, mut ys) = ([0f32; 16], [0f32; 16]);
    // SAFETY: 16 floats each.
    unsafe {
        _mm512_storeu_ps(xs.as_mut_ptr(), x);
        _mm512_storeu_ps(ys.as_mut_ptr(), y);
    }
    for l in 0..16 {
        if special & (1 << l) != 0 {
            ys[l] = xs[l].exp();
        }
    }
    // SAFETY: 16 floats.
    unsafe { _mm512_loadu_ps(ys.as_ptr()) }
}

/// A run of few queries over many keys of an f16 cache (decode beyond
/// `F16_ACC_MAX_KEYS`, where llama.cpp's order depends on its thread count, so kiln keeps
/// none of its roundings): f32 flash attention with the keys in blocks of 16, the values
/// accumulated in registers. Per block and head: the 16 scores, one rescale of the
/// accumulators where the block raises the maximum, 16 weights by one vector `exp`, and
/// an FMA per value vector and key. The f32 kernel it replaces here puts queries × heads
/// in SIMD lanes, three of sixteen for a decode step of SmolLM2's groups.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA and F16C are present; every visible row of the item lies in
/// `keys` and `values` (as `run_item_at` checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn few_queries_item_avx512(it: &Item, sc: &mut Scratch, keys: &[u16], values: &[u16]) {
    let g = it.g;
    let (d, hp) = (g.head_dim, it.heads.len());
    let q = aligned(&mut sc.q, hp * d);
    let acc = aligned(&mut sc.o, hp * d);
    let sums = aligned(&mut sc.stats, hp);
    // Heads a pass over the keys takes: as many as keep their accumulators in 16
    // registers.
    let chunk = (256 / d).max(1);
    let maxes = aligned(&mut sc.r, hp);
    for t in it.tokens.clone() {
        let (first, pos) = it.seen(t);
        for (hi, h) in it.heads.clone().enumerate() {
            q[hi * d..][..d].copy_from_slice(it.query(t, h));
        }
        for h0 in (0..hp).step_by(chunk) {
            let n = chunk.min(hp - h0);
            let pass: F32HeadsPass = heads_pass!(f32_heads, d, n);
            // SAFETY: q, acc and sums hold every head's d (or 1) values; the rows are in
            // the caches (the caller's contract).
            unsafe {
                pass(
                    it,
                    keys,
                    values,
                    (first, pos),
                    q.as_ptr().add(h0 * d),
                    acc.as_mut_ptr().add(h0 * d),
                    &mut sums[h0..h0 + n],
                    &mut maxes[h0..h0 + n],
                )
            };
        }
        for (hi, h) in it.heads.clone().enumerate() {
            let acc = &acc[hi * d..][..d];
            match it.key_part {
                Some(part) => it.partials.write(g, (t, h), part, acc, maxes[hi], sums[hi]),
                None => write_normalized(it, t, h, acc, sums[hi]),
            }
        }
    }
}

/// One pass of [`few_queries_item_avx512`] over keys `first..=pos`: as [`HeadsPass`],
/// with each head's largest score left in the last slice.
type F32HeadsPass = unsafe fn(&Item, &[u16], &[u16], (usize, usize), *const f32, *mut f32, &mut [f32], &mut [f32]);

/// [`F32HeadsPass`] of [`few_queries_item_avx512`] for `HP` heads of `16 DC` values: their
/// f32 queries at `q`, their weighted sums of values (relative to the final maximum)
/// left at `acc`, their sums of weights in `sums` and their largest scores in `maxes_out`.
///
/// # Safety
/// As [`few_queries_item_avx512`]; `q` and `acc` hold `HP · 16 DC` floats, `sums` has `HP`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn f32_heads<const HP: usize, const DC: usize>(
    it: &Item,
    keys: &[u16],
    values: &[u16],
    (first, pos): (usize, usize),
    q: *const f32,
    acc_out: *mut f32,
    sums: &mut [f32],
    maxes_out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let g = it.g;
    let d = 16 * DC;
    let mut acc = [[_mm512_setzero_ps(); DC]; HP];
    let mut maxes = [f32::NEG_INFINITY; HP];
    let mut sum = [0f32; HP];
    // The queries, scaled once.
    let mut qs = [[_mm512_setzero_ps(); DC]; HP];
    for (hi, qs) in qs.iter_mut().enumerate() {
        for (c, v) in qs.iter_mut().enumerate() {
            // SAFETY: head hi's query is d floats at q.
            *v = _mm512_mul_ps(
                unsafe { _mm512_loadu_ps(q.add(hi * d + 16 * c)) },
                _mm512_set1_ps(g.scale),
            );
        }
    }
    let at = |row: usize| row * g.kv_stride + it.kv_offset;
    // The rows read and those asked for PREFETCH_KEYS ahead, as `f16_acc_heads` walks
    // them (the caller checked that the table covers them).
    let (mut reading, mut ahead) = (RowWalk::new(it.pages, first), RowWalk::new(it.pages, first));
    let next_row = |walk: &mut RowWalk| walk.next().expect("run_item_at checked the page table");
    let prefetch = |row: usize| prefetch_row(keys, values, at(row), d);
    for _ in first..=pos.min(first + PREFETCH_KEYS - 1) {
        prefetch(next_row(&mut ahead));
    }
    for p0 in (first..=pos).step_by(16) {
        let n = (pos + 1 - p0).min(16);
        let mut scores = [[f32::NEG_INFINITY; 16]; HP];
        let mut rows = [0usize; 16];
        for j in 0..n {
            if p0 + PREFETCH_KEYS + j <= pos {
                prefetch(next_row(&mut ahead));
            }
            rows[j] = at(next_row(&mut reading));
            // SAFETY: the row's d keys lie in the cache (the caller's contract).
            let kp = unsafe { keys.as_ptr().add(rows[j]) };
            let mut dots = [[_mm512_setzero_ps(); 2]; HP];
            for c in 0..DC {
                // SAFETY: 16 keys at 16 c < d.
                let k = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(kp.add(16 * c).cast()) });
                for (hi, dots) in dots.iter_mut().enumerate() {
                    dots[c % 2] = _mm512_fmadd_ps(k, qs[hi][c], dots[c % 2]);
                }
            }
            for (scores, dots) in scores.iter_mut().zip(&dots) {
                scores[j] = _mm512_reduce_add_ps(_mm512_add_ps(dots[0], dots[1]));
            }
        }
        let mut weights = [[0f32; 16]; HP];
        for hi in 0..HP {
            // SAFETY: 16 floats each side.
            let s = unsafe { _mm512_loadu_ps(scores[hi].as_ptr()) };
            let block_max = _mm512_reduce_max_ps(s);
            if block_max > maxes[hi] {
                // The first block's rescale is exp(-∞) = 0 of nothing accumulated yet.
                let rescale = (maxes[hi] - block_max).exp();
                for a in &mut acc[hi] {
                    *a = _mm512_mul_ps(*a, _mm512_set1_ps(rescale));
                }
                sum[hi] *= rescale;
                maxes[hi] = block_max;
            }
            // Keys past the block's end score -∞: weight 0.
            let w = expf_ggml512(_mm512_sub_ps(s, _mm512_set1_ps(maxes[hi])));
            sum[hi] += _mm512_reduce_add_ps(w);
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(weights[hi].as_mut_ptr(), w) };
        }
        for (j, &row) in rows.iter().enumerate().take(n) {
            // SAFETY: the row's d values lie in the cache.
            let vp = unsafe { values.as_ptr().add(row) };
            // c indexes the inner dimension of every head's accumulators at once.
            #[allow(clippy::needless_range_loop)]
            for c in 0..DC {
                // SAFETY: 16 values at 16 c < d.
                let v = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(vp.add(16 * c).cast()) });
                for hi in 0..HP {
                    acc[hi][c] = _mm512_fmadd_ps(v, _mm512_set1_ps(weights[hi][j]), acc[hi][c]);
                }
            }
        }
    }
    for hi in 0..HP {
        for (c, a) in acc[hi].iter().enumerate() {
            // SAFETY: head hi's d floats at acc_out.
            unsafe { _mm512_storeu_ps(acc_out.add(hi * d + 16 * c), *a) };
        }
        sums[hi] = sum[hi];
        maxes_out[hi] = maxes[hi];
    }
}

/// GCC's `_mm512_reduce_add_ps`: halves, quarters, then lanes 0 + 2 and 1 + 3, then
/// those two.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn reduce_add_gcc(x: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm256_add_ps(
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
        _mm512_castps512_ps256(x),
    );
    let f = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
    let f = _mm_add_ps(f, _mm_movehl_ps(f, f));
    _mm_cvtss_f32(f) + _mm_cvtss_f32(_mm_movehdup_ps(f))
}

/// ggml's AVX-512 `ggml_v_expf`, lane for lane: range reduction, a degree-5 polynomial,
/// `scalef`, and 0 or ∞ where `|n| > 192`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn expf_ggml512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm512_sub_ps(z, r);
    let b = _mm512_fnmadd_ps(n, c(0x35bf_be8e), _mm512_fnmadd_ps(n, c(0x3f31_7200), x));
    let far = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
    );
    let res = _mm512_scalef_ps(j, n);
    if far == 0 {
        return res;
    }
    let below = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
    let alt = _mm512_mask_blend_ps(below, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
    _mm512_mask_blend_ps(far, res, alt)
}

/// `a[l][i] = fma(v[k][i], p[l][k], a[l][i])` for the tile's keys `k` in order, for two
/// lanes `l` (each value load feeds both chains), over `16 N` dimensions from `a[l]`
/// (the value rows `stride` apart from `v`, each lane's 64 weights at `p[l]`); returns
/// `N`. The lanes may be the same (then both chains store the same values).
///
/// # Safety
/// Each `a[l]` holds `16 N` f32; `v` holds 64 rows of at least `16 N` f32, `stride`
/// apart; each `p[l]` holds 64 f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn accumulate2<const N: usize>(a: [*mut f32; 2], v: *const f32, stride: usize, p: [*const f32; 2]) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let mut x: [[__m512; N]; 2] =
            std::array::from_fn(|l| std::array::from_fn(|i| _mm512_loadu_ps(a[l].add(16 * i))));
        for k in 0..TILE_KV {
            let w = [_mm512_set1_ps(*p[0].add(k)), _mm512_set1_ps(*p[1].add(k))];
            let [x0, x1] = &mut x;
            for (i, (x0, x1)) in x0.iter_mut().zip(x1.iter_mut()).enumerate() {
                let vv = _mm512_loadu_ps(v.add(k * stride + 16 * i));
                *x0 = _mm512_fmadd_ps(vv, w[0], *x0);
                *x1 = _mm512_fmadd_ps(vv, w[1], *x1);
            }
        }
        for (l, x) in x.iter().enumerate() {
            for (i, x) in x.iter().enumerate() {
                _mm512_storeu_ps(a[l].add(16 * i), *x);
            }
        }
    }
    N
}

/// Keys per tile of llama.cpp's tiled flash attention (`GGML_FA_TILE_KV`).
const TILE_KV: usize = 64;

/// llama.cpp's tiled CPU flash attention (`ggml_compute_forward_flash_attn_ext_tiled`),
/// which it runs for 64 queries or more, operation for operation: keys in tiles of 64
/// from position 0; per query and head, each score a chain of FMAs over the head's
/// dimensions in order (the f32 query against the f16 keys), times the scale; masked keys
/// at -∞; the tile's maximum, `expf` (libm) of the old maximum's distance to rescale the
/// accumulator and the sum, `ggml_v_expf` of every score, their sum per 16 reduced as GCC
/// does and added in f64; the values accumulated by an FMA chain over the tile's keys in
/// order; at the end the accumulator times `1 / S`. Each key tile is widened once per
/// item for all its queries and heads.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA and F16C are present; `head_dim` is a multiple of 16; every
/// visible row of the item lies in `keys` and `values` (as `run_item_at` checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tiled_item_avx512(it: &Item, sc: &mut Scratch, keys: &[u16], values: &[u16]) {
    use std::arch::x86_64::*;
    let g = it.g;
    let d = g.head_dim;
    let (nt, hp) = (it.tokens.len(), it.heads.len());
    let lanes = nt * hp;
    let acc = aligned(&mut sc.o, lanes * d);
    let (maxes, sums) = aligned(&mut sc.stats, 2 * lanes).split_at_mut(lanes);
    // Key tile as widened (key-major) and transposed (dimension-major, keys in lanes);
    // value tile (key-major).
    let kb = aligned(&mut sc.w, TILE_KV * d);
    let kt = aligned(&mut sc.kb, d * TILE_KV);
    let vt = aligned(&mut sc.vb, TILE_KV * d);
    let scores = aligned(&mut sc.s, lanes * TILE_KV);
    acc.fill(0.0);
    maxes.fill(f32::NEG_INFINITY);
    sums.fill(0.0);
    let last = g.start_pos + it.tokens.end - 1;
    // Tiles before every query's window are skipped.
    let first_seen = it.tokens.clone().map(|t| g.visible(t).0).min().unwrap_or(0);
    for c0 in (0..=last).step_by(TILE_KV) {
        if c0 + TILE_KV <= first_seen {
            continue;
        }
        // Widen the tile's keys and values (zero past the last position), then transpose
        // the keys in blocks of 16 keys × 16 dimensions.
        for k in 0..TILE_KV {
            let p = c0 + k;
            if p > last {
                kb[k * d..][..d].fill(0.0);
                vt[k * d..][..d].fill(0.0);
                continue;
            }
            let row = it.pages.row(p) * g.kv_stride + it.kv_offset;
            for c in (0..d).step_by(16) {
                // SAFETY: row..row + d lies in both caches (the caller's contract); the
                // tiles hold 64 × d f32.
                unsafe {
                    let kv = _mm512_cvtph_ps(_mm256_loadu_si256(keys.as_ptr().add(row + c).cast()));
                    _mm512_storeu_ps(kb.as_mut_ptr().add(k * d + c), kv);
                    let vv = _mm512_cvtph_ps(_mm256_loadu_si256(values.as_ptr().add(row + c).cast()));
                    _mm512_storeu_ps(vt.as_mut_ptr().add(k * d + c), vv);
                }
            }
        }
        for k0 in (0..TILE_KV).step_by(16) {
            for c in (0..d).step_by(16) {
                // SAFETY: the 16 × 16 block lies in both tiles.
                unsafe {
                    let rows: [__m512i; 16] = std::array::from_fn(|i| {
                        _mm512_castps_si512(_mm512_loadu_ps(kb.as_ptr().add((k0 + i) * d + c)))
                    });
                    for (i, col) in crate::gemm::transpose16(&rows).into_iter().enumerate() {
                        _mm512_storeu_ps(kt.as_mut_ptr().add((c + i) * TILE_KV + k0), _mm512_castsi512_ps(col));
                    }
                }
            }
        }
        // Every lane's scores for the tile, four lanes at a time (16 FMA chains sharing
        // the key loads; a short last group repeats its last lane).
        let query = |lane: usize| {
            it.query(it.tokens.start + lane / hp, it.heads.start + lane % hp)
                .as_ptr()
        };
        for l0 in (0..lanes).step_by(4) {
            let ls: [usize; 4] = std::array::from_fn(|k| (l0 + k).min(lanes - 1));
            let qs = ls.map(query);
            // SAFETY: the queries hold d f32; the key tile d × 64; the scores 64 per lane.
            unsafe {
                let mut s = [[_mm512_setzero_ps(); 4]; 4];
                for i in 0..d {
                    let q = qs.map(|q| _mm512_set1_ps(*q.add(i)));
                    for j in 0..4 {
                        let k = _mm512_loadu_ps(kt.as_ptr().add(i * TILE_KV + 16 * j));
                        for (s, q) in s.iter_mut().zip(&q) {
                            s[j] = _mm512_fmadd_ps(k, *q, s[j]);
                        }
                    }
                }
                for (s, &l) in s.iter().zip(&ls) {
                    for (j, s) in s.iter().enumerate() {
                        _mm512_storeu_ps(scores.as_mut_ptr().add(l * TILE_KV + 16 * j), *s);
                    }
                }
            }
        }
        // Per lane: the softmax step of the tile, its weights written over its scores.
        let mut seen_lanes = [0usize; 64];
        let mut n_seen = 0;
        for (ti, t) in it.tokens.clone().enumerate() {
            let (first, pos) = g.visible(t);
            if c0 > pos || c0 + TILE_KV <= first {
                continue;
            }
            for hi in 0..hp {
                let lane = ti * hp + hi;
                seen_lanes[n_seen] = lane;
                n_seen += 1;
                // SAFETY: the scores hold 64 f32 per lane; the accumulator of this lane d
                // f32.
                unsafe {
                    let mut s: [__m512; 4] =
                        std::array::from_fn(|j| _mm512_loadu_ps(scores.as_ptr().add(lane * TILE_KV + 16 * j)));
                    let mut tile_max = f32::NEG_INFINITY;
                    for (j, s) in s.iter_mut().enumerate() {
                        *s = _mm512_mul_ps(*s, _mm512_set1_ps(g.scale));
                        // Keys outside first..=pos are masked to -∞.
                        let key = _mm512_add_epi32(
                            _mm512_set1_epi32((c0 + 16 * j) as i32),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        );
                        let seen = _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(first as i32))
                            & _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(pos as i32));
                        *s = _mm512_mask_blend_ps(seen, _mm512_set1_ps(f32::NEG_INFINITY), *s);
                        tile_max = tile_max.max(_mm512_reduce_max_ps(*s));
                    }
                    let old = maxes[lane];
                    let new = old.max(tile_max);
                    let a = acc.as_mut_ptr().add(lane * d);
                    if new > old {
                        let ms = (old - new).exp();
                        for c in (0..d).step_by(16) {
                            _mm512_storeu_ps(a.add(c), _mm512_mul_ps(_mm512_loadu_ps(a.add(c)), _mm512_set1_ps(ms)));
                        }
                        sums[lane] *= ms;
                    }
                    maxes[lane] = new;
                    let mut total = 0f64;
                    for (j, s) in s.iter().enumerate() {
                        let e = expf_ggml512(_mm512_sub_ps(*s, _mm512_set1_ps(new)));
                        _mm512_storeu_ps(scores.as_mut_ptr().add(lane * TILE_KV + 16 * j), e);
                        total += reduce_add_gcc(e) as f64;
                    }
                    sums[lane] = (sums[lane] as f64 + total) as f32;
                }
            }
        }
        // Then the values, two lanes at a time (each value load feeds both), 16
        // dimensions per FMA chain over the tile's keys.
        for pair in seen_lanes[..n_seen].chunks(2) {
            let (l0, l1) = (pair[0], *pair.last().expect("a chunk is never empty"));
            let mut c = 0;
            while c < d {
                let left = (d - c) / 16;
                // SAFETY: both lanes' accumulators hold d f32, their weights 64 f32; the
                // value tile 64 × d.
                let run = unsafe {
                    let (a0, a1) = (acc.as_mut_ptr().add(l0 * d + c), acc.as_mut_ptr().add(l1 * d + c));
                    let (p0, p1) = (scores.as_ptr().add(l0 * TILE_KV), scores.as_ptr().add(l1 * TILE_KV));
                    let v = vt.as_ptr().add(c);
                    // A lone last lane runs as a pair with itself.
                    if left >= 8 {
                        accumulate2::<8>([a0, a1], v, d, [p0, p1])
                    } else if left >= 4 {
                        accumulate2::<4>([a0, a1], v, d, [p0, p1])
                    } else {
                        accumulate2::<1>([a0, a1], v, d, [p0, p1])
                    }
                };
                c += 16 * run;
            }
        }
    }
    for (ti, t) in it.tokens.clone().enumerate() {
        for (hi, h) in it.heads.clone().enumerate() {
            let lane = ti * hp + hi;
            write_normalized(it, t, h, &acc[lane * d..][..d], sums[lane]);
        }
    }
}

/// `k · q` as ggml's AVX-512 `ggml_vec_dot_f16` sums it: per 64 elements, four 16-lane
/// FMA accumulators; then `(a0 + a2) + (a1 + a3)`, the 16 lanes reduced as GCC's
/// `_mm512_reduce_add_ps` does (halves, quarters, then pairs), and elements past the
/// last multiple of 64 added one by one in f64.
#[inline(always)]
fn dot_f16_ggml(k: &[f32], q: &[f32]) -> f32 {
    let d = k.len();
    let full = d / 64 * 64;
    let mut sum = [[0f32; 16]; 4];
    for (kc, qc) in k[..full].chunks_exact(64).zip(q[..full].chunks_exact(64)) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, s) in s.iter_mut().enumerate() {
                *s = kc[16 * j + l].mul_add(qc[16 * j + l], *s);
            }
        }
    }
    let x: [f32; 16] = array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let halves: [f32; 8] = array::from_fn(|i| x[8 + i] + x[i]);
    let quarters: [f32; 4] = array::from_fn(|i| halves[4 + i] + halves[i]);
    let mut total = ((quarters[0] + quarters[2]) + (quarters[1] + quarters[3])) as f64;
    for (a, b) in k[full..].iter().zip(&q[full..]) {
        total += (a * b) as f64;
    }
    total as f32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn run_avx512(it: &Item, sc: &mut Scratch) {
    // SAFETY: the features the kernel's intrinsics need are enabled here.
    unsafe { f32_item::<x86::Avx512, 4, 4>(it, sc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(it: &Item, sc: &mut Scratch) {
    // SAFETY: the features the kernel's intrinsics need are enabled here. Sixteen ymm
    // registers: 2-key score blocks and 2-row P·V blocks.
    unsafe { f32_item::<x86::Avx2, 2, 2>(it, sc) }
}

/// The vector operations the kernel is written in. Every method is `unsafe`: it
/// needs the CPU features of its implementation, and pointers valid for a full vector.
/// Generic kernels are `#[inline(always)]` so that they compile inside the
/// `#[target_feature]` entry points above.
trait Simd {
    const LANES: usize;
    type V: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` f16 values (bit patterns) widened to f32.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c - a * b`, rounded once.
    unsafe fn fnma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `j · 2^n` for integral `n` in `-127..=0`.
    unsafe fn ldexp(j: Self::V, n: Self::V) -> Self::V;
    /// `v`, with 0 where `x < limit`.
    unsafe fn zero_below(v: Self::V, x: Self::V, limit: f32) -> Self::V;
    /// `s`, with -∞ where key position `k` is outside `lo..=hi`.
    unsafe fn mask_outside(s: Self::V, k: f32, lo: Self::V, hi: Self::V) -> Self::V;
    /// `v`, with 0 where it is -∞.
    unsafe fn neg_inf_to_zero(v: Self::V) -> Self::V;
}

/// `exp(x)` for `x ≤ 0` (or -∞) as ggml's `ggml_v_expf` computes it (range reduction,
/// then a degree-5 polynomial; ~1.5 ulp), 0 below -80: smaller weights are negligible
/// next to the maximum's 1, and would only make subnormal products (slow).
#[inline(always)]
unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    // SAFETY: the caller has S's features.
    unsafe {
        let round = S::splat(f32::from_bits(0x4b40_0000));
        let xc = S::max(x, S::splat(-80.0));
        let n = S::sub(S::fma(xc, S::splat(f32::from_bits(0x3fb8_aa3b)), round), round);
        let b = S::fnma(
            n,
            S::splat(f32::from_bits(0x35bf_be8e)),
            S::fnma(n, S::splat(f32::from_bits(0x3f31_7200)), xc),
        );
        let u = S::mul(b, b);
        let c = [0x3c07_2010, 0x3d2b_9f17, 0x3e2a_af33, 0x3eff_fedb, 0x3f7f_fff6].map(|c| S::splat(f32::from_bits(c)));
        let j = S::fma(
            S::fma(S::fma(c[0], b, c[1]), u, S::fma(c[2], b, c[3])),
            u,
            S::fma(c[4], b, S::splat(1.0)),
        );
        S::zero_below(S::ldexp(j, n), x, -80.0)
    }
}

/// The f32 flash-attention kernel (see the module documentation). Query lanes are
/// numbered head-major: lane `hi * tokens + ti`. `R` keys per score block and `RM`
/// query rows per P·V block are chosen per instruction set to fit its registers.
#[inline(always)]
unsafe fn f32_item<S: Simd, const R: usize, const RM: usize>(it: &Item, sc: &mut Scratch) {
    let g = it.g;
    let (d, stride) = (g.head_dim, g.kv_stride);
    let nt = it.tokens.len();
    let m = it.heads.len() * nt;
    let mp = m.div_ceil(S::LANES) * S::LANES;
    // P·V skips the padding lanes beyond the last P·V block: at decode a KV group's few
    // heads fill a fraction of a vector, and their outputs are the bulk of the work.
    let mr = m.next_multiple_of(RM);
    let qt = aligned(&mut sc.q, d * mp);
    let o = aligned(&mut sc.o, mp * d);
    let s = aligned(&mut sc.s, KEY_BLOCK * mp);
    let lo = aligned(&mut sc.w, mp);
    let hi = aligned(&mut sc.r, mp);
    let stats = aligned(&mut sc.stats, 3 * mp);
    // Widened blocks of f16 keys and values (unused with an f32 cache).
    let f16 = matches!(it.keys, CacheRows::F16(_));
    let widened = if f16 { KEY_BLOCK * d } else { 0 };
    let (kw, vw) = (aligned(&mut sc.kb, widened), aligned(&mut sc.vb, widened));
    let (maxes, rest) = stats.split_at_mut(mp);
    let (sums, alpha) = rest.split_at_mut(mp);
    // Transposed, scaled queries: qt[dd][lane]. Padding lanes get a zero query and the
    // first lane's keys, so they stay finite; their results are dropped. (Zeroing all of
    // qt first and then writing the real lanes costs far less than writing every lane:
    // at decode a group's few heads fill a fraction of a vector.)
    if m < mp {
        qt.fill(0.0);
    }
    for lane in 0..mp {
        let t = if lane < m {
            let t = it.tokens.start + lane % nt;
            let query = it.query(t, it.heads.start + lane / nt);
            for (dd, &x) in query.iter().enumerate() {
                qt[dd * mp + lane] = x * g.scale;
            }
            t
        } else {
            it.tokens.start
        };
        let (first, pos) = it.seen(t);
        (lo[lane], hi[lane]) = (first as f32, pos as f32);
    }
    // The window start and the position grow with the token, so the first and last
    // tokens bound what the tile sees, and what every lane sees.
    let (kmin, min_hi) = it.seen(it.tokens.start);
    let (max_lo, kmax) = it.seen(it.tokens.end - 1);
    // P·V reads and writes lanes below mr only.
    o[..mr * d].fill(0.0);
    maxes.fill(f32::NEG_INFINITY);
    sums.fill(0.0);
    // SAFETY: run_item checked that the rows of positions ≤ kmax lie in keys and values, and that
    // kv_offset + d ≤ kv_stride; the scratch slices have the sizes the kernels index.
    unsafe {
        for (kb, nb, row0) in key_blocks(it.pages, kmin, kmax) {
            // The block's rows of this KV head: in place (f32), or widened into scratch.
            let (keys, values, stride) = match (it.keys, it.values) {
                (CacheRows::F32(k), CacheRows::F32(v)) => {
                    let at = row0 * stride + it.kv_offset;
                    (k.as_ptr().add(at), v.as_ptr().add(at), stride)
                }
                (CacheRows::F16(k), CacheRows::F16(v)) => {
                    let at = row0 * stride + it.kv_offset;
                    widen_rows::<S>(&k[at..], stride, nb, d, kw);
                    widen_rows::<S>(&v[at..], stride, nb, d, vw);
                    (kw.as_ptr(), vw.as_ptr(), d)
                }
                _ => unreachable!("run_item checked that keys and values share a format"),
            };
            // At most four vectors of lanes at a time: R × 4 accumulators fill the
            // registers.
            let vecs = mp / S::LANES;
            for v0 in (0..vecs).step_by(4) {
                let lane0 = v0 * S::LANES;
                let args = (
                    qt.as_ptr().add(lane0),
                    mp,
                    keys,
                    stride,
                    nb,
                    d,
                    s.as_mut_ptr().add(lane0),
                );
                match vecs - v0 {
                    1 => score_block::<S, R, 1>(args),
                    2 => score_block::<S, R, 2>(args),
                    3 => score_block::<S, R, 3>(args),
                    _ => score_block::<S, R, 4>(args),
                }
            }
            let fully_visible = kb >= max_lo && kb + nb - 1 <= min_hi;
            softmax_block::<S>(
                s,
                mp,
                nb,
                kb,
                (!fully_visible).then_some((&*lo, &*hi)),
                maxes,
                sums,
                alpha,
            );
            pv_block::<S, RM>(o, d, (mp, mr), s, alpha, values, stride, nb);
        }
    }
    for lane in 0..m {
        let (t, h) = (it.tokens.start + lane % nt, it.heads.start + lane / nt);
        if let Some(part) = it.key_part {
            it.partials
                .write(g, (t, h), part, &o[lane * d..][..d], maxes[lane], sums[lane]);
            continue;
        }
        let inv = 1.0 / sums[lane];
        for (i, &v) in o[lane * d..][..d].iter().enumerate() {
            // SAFETY: the caller's OutMatrix covers row t, columns of head h.
            unsafe { it.out.write(t, h * d + i, v * inv) };
        }
    }
}

/// Rows `0..nb` of `d` f16 values, `stride` apart in `src`, widened into `dst` (`d`
/// apart).
#[inline(always)]
unsafe fn widen_rows<S: Simd>(src: &[u16], stride: usize, nb: usize, d: usize, dst: &mut [f32]) {
    assert!(nb > 0 && src.len() >= (nb - 1) * stride + d && dst.len() >= nb * d);
    let vectors = d / S::LANES * S::LANES;
    for j in 0..nb {
        let (from, to) = (&src[j * stride..][..d], &mut dst[j * d..][..d]);
        for c in (0..vectors).step_by(S::LANES) {
            // SAFETY: c + LANES ≤ d for both rows (asserted above); the caller has S's
            // features.
            unsafe { S::store(to.as_mut_ptr().add(c), S::load_f16(from.as_ptr().add(c))) };
        }
        for c in vectors..d {
            to[c] = half::f16::from_bits(from[c]).to_f32();
        }
    }
}

/// `s[n][lane] = Σ_dd k[n][dd] · qt[dd][lane]` for the `nb` keys of a block and `MV`
/// vectors of lanes (`qt` and `s` start at the first), `R` keys at a time: each key
/// element is broadcast against the query vectors.
#[inline(always)]
unsafe fn score_block<S: Simd, const R: usize, const MV: usize>(
    (qt, mp, keys, stride, nb, d, s): (*const f32, usize, *const f32, usize, usize, usize, *mut f32),
) {
    // SAFETY: the caller has S's features; qt holds d × mp, s holds nb × mp, key rows
    // 0..nb hold d floats each.
    unsafe {
        let mut n = 0;
        while n + R <= nb {
            score_rows::<S, R, MV>(qt, mp, array::from_fn(|r| keys.add((n + r) * stride)), d, s.add(n * mp));
            n += R;
        }
        for n in n..nb {
            score_rows::<S, 1, MV>(qt, mp, [keys.add(n * stride)], d, s.add(n * mp));
        }
    }
}

#[inline(always)]
unsafe fn score_rows<S: Simd, const R: usize, const MV: usize>(
    qt: *const f32,
    mp: usize,
    k: [*const f32; R],
    d: usize,
    s: *mut f32,
) {
    // SAFETY: as score_block.
    unsafe {
        let mut acc = [[S::splat(0.0); MV]; R];
        for dd in 0..d {
            let q: [S::V; MV] = array::from_fn(|v| S::load(qt.add(dd * mp + v * S::LANES)));
            for (acc, k) in acc.iter_mut().zip(k) {
                let kr = S::splat(*k.add(dd));
                for (acc, q) in acc.iter_mut().zip(q) {
                    *acc = S::fma(kr, q, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                S::store(s.add(r * mp + v * S::LANES), *acc);
            }
        }
    }
}

/// Online softmax over a block of scores with queries in lanes: masks the block where
/// `mask` gives the lanes' visible ranges, raises the running maxima, turns scores into
/// unnormalized probabilities in place, and leaves in `alpha` the factor by which each
/// lane's earlier sum and output shrink. A maximum still -∞ (a lane that has seen no key
/// yet) counts as 0, so that no -∞ - -∞ appears.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn softmax_block<S: Simd>(
    s: &mut [f32],
    mp: usize,
    nb: usize,
    kb: usize,
    mask: Option<(&[f32], &[f32])>,
    maxes: &mut [f32],
    sums: &mut [f32],
    alpha: &mut [f32],
) {
    // SAFETY: the caller has S's features; s holds nb × mp and the lane arrays mp.
    unsafe {
        let s = s.as_mut_ptr();
        for off in (0..mp).step_by(S::LANES) {
            let mut block_max = S::splat(f32::NEG_INFINITY);
            for n in 0..nb {
                let p = s.add(n * mp + off);
                let mut x = S::load(p);
                if let Some((lo, hi)) = mask {
                    x = S::mask_outside(
                        x,
                        (kb + n) as f32,
                        S::load(lo.as_ptr().add(off)),
                        S::load(hi.as_ptr().add(off)),
                    );
                    S::store(p, x);
                }
                block_max = S::max(block_max, x);
            }
            let old = S::load(maxes.as_ptr().add(off));
            let new = S::max(old, block_max);
            let used = S::neg_inf_to_zero(new);
            let a = exp::<S>(S::sub(old, used));
            let mut sum = S::mul(S::load(sums.as_ptr().add(off)), a);
            for n in 0..nb {
                let p = s.add(n * mp + off);
                let e = exp::<S>(S::sub(S::load(p), used));
                S::store(p, e);
                sum = S::add(sum, e);
            }
            S::store(alpha.as_mut_ptr().add(off), a);
            S::store(sums.as_mut_ptr().add(off), sum);
            S::store(maxes.as_mut_ptr().add(off), new);
        }
    }
}

/// `o[lane] = o[lane] · alpha[lane] + Σ_n p[n][lane] · v[n]` over a block of keys for
/// lanes `0..mr` of the `mp` (a multiple of `RM`): `RM` lanes × four vectors of columns
/// in registers, then single vectors, then a scalar tail.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv_block<S: Simd, const RM: usize>(
    o: &mut [f32],
    d: usize,
    (mp, mr): (usize, usize),
    p: &[f32],
    alpha: &[f32],
    values: *const f32,
    stride: usize,
    nb: usize,
) {
    // SAFETY: the caller has S's features; o holds mp × d, p nb × mp, value rows 0..nb
    // hold d floats; mr ≤ mp is a multiple of RM.
    unsafe {
        let cols = d / S::LANES;
        let args = (
            o.as_mut_ptr(),
            d,
            (mp, mr),
            p.as_ptr(),
            alpha.as_ptr(),
            values,
            stride,
            nb,
        );
        let mut c = 0;
        while c + 4 <= cols {
            pv_tile::<S, RM, 4>(c * S::LANES, args);
            c += 4;
        }
        for c in c..cols {
            pv_tile::<S, RM, 1>(c * S::LANES, args);
        }
        for i in cols * S::LANES..d {
            for lane in 0..mr {
                let mut acc = o[lane * d + i] * alpha[lane];
                for n in 0..nb {
                    acc = p[n * mp + lane].mul_add(*values.add(n * stride + i), acc);
                }
                o[lane * d + i] = acc;
            }
        }
    }
}

type PvArgs = (
    *mut f32,
    usize,
    (usize, usize),
    *const f32,
    *const f32,
    *const f32,
    usize,
    usize,
);

#[inline(always)]
unsafe fn pv_tile<S: Simd, const RM: usize, const C: usize>(
    col: usize,
    (o, d, (mp, mr), p, alpha, values, stride, nb): PvArgs,
) {
    // SAFETY: as pv_block.
    unsafe {
        for m0 in (0..mr).step_by(RM) {
            let mut acc: [[S::V; C]; RM] = array::from_fn(|r| {
                let a = S::splat(*alpha.add(m0 + r));
                array::from_fn(|c| S::mul(S::load(o.add((m0 + r) * d + col + c * S::LANES)), a))
            });
            for n in 0..nb {
                let row = values.add(n * stride + col);
                let v: [S::V; C] = array::from_fn(|c| S::load(row.add(c * S::LANES)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pr = S::splat(*p.add(n * mp + m0 + r));
                    for (acc, v) in acc.iter_mut().zip(v) {
                        *acc = S::fma(pr, v, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, acc) in acc.iter().enumerate() {
                    S::store(o.add((m0 + r) * d + col + c * S::LANES), *acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Simd;

    /// 16 lanes of `__m512`.
    pub struct Avx512;

    // SAFETY (all methods): callers hold AVX-512 F/BW/VL and pass pointers valid
    // for 16 floats.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn ldexp(j: __m512, n: __m512) -> __m512 {
            _mm512_scalef_ps(j, n)
        }
        #[inline(always)]
        unsafe fn zero_below(v: __m512, x: __m512, limit: f32) -> __m512 {
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(limit)), v)
        }
        #[inline(always)]
        unsafe fn mask_outside(s: __m512, k: f32, lo: __m512, hi: __m512) -> __m512 {
            let k = _mm512_set1_ps(k);
            let inside = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(lo, k) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(k, hi);
            _mm512_mask_blend_ps(inside, _mm512_set1_ps(f32::NEG_INFINITY), s)
        }
        #[inline(always)]
        unsafe fn neg_inf_to_zero(v: __m512) -> __m512 {
            let inf = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_set1_ps(f32::NEG_INFINITY));
            _mm512_mask_blend_ps(inf, v, _mm512_setzero_ps())
        }
    }

    /// 8 lanes of `__m256`.
    pub struct Avx2;

    // SAFETY (all methods): callers hold AVX2 and FMA, and pass pointers valid for 8
    // floats.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn ldexp(j: __m256, n: __m256) -> __m256 {
            // 2^n built from its exponent bits (n ≥ -126 after exp's clamp at -80).
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
            _mm256_mul_ps(j, _mm256_castsi256_ps(bits))
        }
        #[inline(always)]
        unsafe fn zero_below(v: __m256, x: __m256, limit: f32) -> __m256 {
            _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(limit)))
        }
        #[inline(always)]
        unsafe fn mask_outside(s: __m256, k: f32, lo: __m256, hi: __m256) -> __m256 {
            let k = _mm256_set1_ps(k);
            let inside = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(lo, k), _mm256_cmp_ps::<_CMP_LE_OQ>(k, hi));
            _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), s, inside)
        }
        #[inline(always)]
        unsafe fn neg_inf_to_zero(v: __m256) -> __m256 {
            let inf = _mm256_cmp_ps::<_CMP_EQ_OQ>(v, _mm256_set1_ps(f32::NEG_INFINITY));
            _mm256_blendv_ps(v, _mm256_setzero_ps(), inf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector `expf` must give libm's bits exactly (llama.cpp's attention calls libm):
    /// a sample of every 97th float of [-88, 88] (exhaustive when written: 0 of 2.2e9
    /// differ), and the edges where lanes fall back to libm.
    #[test]
    fn vector_expf_matches_libm() {
        let mut xs: Vec<f32> = (0..0x42b0_0000u32)
            .step_by(97)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -88.0,
            88.0,
            -103.9,
            -104.0,
            -150.0,
            88.7,
            89.0,
            -0.0,
            0.0,
        ]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            use std::arch::x86_64::*;
            xs.resize(xs.len().next_multiple_of(16), 0.0);
            for chunk in xs.chunks_exact(16) {
                let mut ys = [0f32; 16];
                // SAFETY: the CPU has the features checked above; 16 floats each side.
                unsafe {
                    let table = expf_table_512();
                    _mm512_storeu_ps(ys.as_mut_ptr(), expf_libm512(_mm512_loadu_ps(chunk.as_ptr()), &table));
                }
                for (&x, &y) in chunk.iter().zip(&ys) {
                    let libm = x.exp();
                    assert!(
                        y.to_bits() == libm.to_bits() || (y.is_nan() && libm.is_nan()),
                        "vector expf({x:e}) = {y:e}, libm {libm:e}"
                    );
                }
            }
        }
    }

    /// `prefetch_item` is only a hint: items, page tables and rows that do not exist are
    /// skipped without a panic (run_item is what refuses them).
    #[test]
    fn prefetch_item_tolerates_what_run_item_refuses() {
        let g = AttnGeometry {
            n_tokens: 1,
            start_pos: 100,
            run_start: 100,
            run_end: 101,
            n_head: 6,
            n_kv_head: 2,
            head_dim: 64,
            kv_stride: 128,
            scale: 0.125,
            window: None,
            f16_cache: true,
        };
        let cache = vec![0u16; 16 * 128];
        let rows = CacheRows::F16(&cache);
        let far_pages = [0, u32::MAX];
        for pages in [&[][..], &[0][..], &far_pages[..]] {
            let pages = KvPages { pages, page_size: 64 };
            for item in [0, 1, 2, usize::MAX] {
                prefetch_item(&g, rows, rows, pages, item);
            }
        }
        let empty = AttnGeometry { n_kv_head: 0, ..g };
        prefetch_item(&empty, rows, rows, KvPages::contiguous(), 0);
    }
}
