//! Causal self-attention over a key/value cache, split into work items that threads
//! take independently: grouped-query heads read their shared keys and values in place
//! (no copies per head), and a sliding window limits what each query sees.

use crate::gemm::OutMatrix;
use crate::ops;

/// The arithmetic of an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPrecision {
    /// As llama.cpp's CPU flash attention: batches under 64 queries round the query to
    /// f16 and accumulate values in f16; larger batches accumulate in f32.
    Ggml,
    /// f32 throughout (the reference).
    F32,
}

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
    pub precision: AttnPrecision,
}

/// How many work items a call splits into.
pub fn work_items(g: &AttnGeometry) -> usize {
    g.n_tokens * g.n_head
}

/// Computes work item `item` (< [`work_items`]): some heads of some queries, written
/// to `out` as element `(t, h * head_dim + i)`.
///
/// `q` holds `n_tokens × n_head × head_dim` floats; `keys` and `values` hold at least
/// `start_pos + n_tokens` rows of `kv_stride`.
pub fn run_item(g: &AttnGeometry, q: &[f32], keys: &[f32], values: &[f32], item: usize, out: OutMatrix) {
    let d = g.head_dim;
    let (t, h) = (item / g.n_head, item % g.n_head);
    let pos = g.start_pos + t;
    let first = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let query = &q[item * d..(item + 1) * d];
    let offset = (h / (g.n_head / g.n_kv_head)) * d;
    SCRATCH.with_borrow_mut(|(scratch, head_out)| {
        scratch.resize(scratch.len().max(pos + 1).max(d), 0.0);
        head_out.resize(d, 0.0);
        let kernel = if g.precision == AttnPrecision::Ggml && g.n_tokens < 64 {
            ops::attend_f16_accumulator
        } else {
            ops::attend
        };
        kernel(query, keys, values, g.kv_stride, offset, first, pos + 1, g.scale, scratch, head_out);
        for (i, &v) in head_out.iter().enumerate() {
            // SAFETY: the caller's OutMatrix covers row t, columns of head h.
            unsafe { out.write(t, h * d + i, v) };
        }
    });
}

thread_local! {
    /// Per-thread scratch: scores (or the f16 query) and one head's output.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}
