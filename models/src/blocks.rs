//! The pieces every architecture here is built from: the key/value cache, scratch
//! buffers, weight loading with shape checks, the attention block and the gated FFN.

use kiln_runtime::{Activation, Attention, AttnSeq, Backend, BufId, RopeStyle, WeightId};

use crate::{Checkpoint, Hyper, ModelError};

/// Key/value storage shared by every sequence: per layer one buffer of keys and one of
/// values, each `n_pages` pages of `page_size` rows of `kv_dim` values (`row_floats`
/// buffer floats a row, as the backend stores them). Which pages a sequence's positions
/// use is its page table, kept by whoever schedules sequences.
pub struct KvStore {
    pub layers: Vec<(BufId, BufId)>,
    pub page_size: usize,
    pub n_pages: usize,
    pub row_floats: usize,
}

impl KvStore {
    pub fn new(be: &mut dyn Backend, hyper: &Hyper, n_pages: usize, page_size: usize) -> KvStore {
        let row_floats = be.kv_row_floats(hyper.kv_dim());
        let len = n_pages * page_size * row_floats;
        let layers = (0..hyper.n_layer).map(|_| (be.alloc(len), be.alloc(len))).collect();
        KvStore {
            layers,
            page_size,
            n_pages,
            row_floats,
        }
    }

    /// Buffer floats of one page of one layer's keys (or values).
    pub fn page_floats(&self) -> usize {
        self.page_size * self.row_floats
    }

    /// Bytes one page takes (keys and values of every layer).
    pub fn bytes_per_page(&self) -> usize {
        2 * self.layers.len() * self.page_floats() * std::mem::size_of::<f32>()
    }

    /// Bytes one page takes on `be` (keys and values of every layer).
    pub fn page_bytes(be: &dyn Backend, hyper: &Hyper, page_size: usize) -> usize {
        2 * hyper.n_layer * page_size * be.kv_row_floats(hyper.kv_dim()) * std::mem::size_of::<f32>()
    }

    pub fn free(self, be: &mut dyn Backend) {
        for (k, v) in self.layers {
            be.free(k);
            be.free(v);
        }
    }
}

/// One sequence's part of a forward pass: `tokens` at positions `start..`, whose keys
/// and values go to (and are read from) the rows `pages` gives them, and how many of
/// its last tokens want logits.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub pages: &'a [u32],
    pub n_logits: usize,
}

/// One sequence in a contiguous store of its own: for tools and tests that run a single
/// sequence without a scheduler.
pub struct KvCache {
    pub store: KvStore,
    /// Tokens stored so far: the position of the next token.
    pub len: usize,
}

impl KvCache {
    pub fn new(be: &mut dyn Backend, hyper: &Hyper, capacity: usize) -> KvCache {
        KvCache {
            store: KvStore::new(be, hyper, 1, capacity),
            len: 0,
        }
    }

    /// Runs `tokens` after those already stored and returns the logits of the last
    /// `n_logits` of them (see [`crate::Model::forward`]).
    pub fn forward(
        &mut self,
        model: &dyn crate::Model,
        be: &mut dyn Backend,
        scratch: &mut Scratch,
        tokens: &[u32],
        n_logits: usize,
    ) -> BufId {
        let seq = SeqInput {
            tokens,
            start: self.len,
            pages: &[0],
            n_logits,
        };
        let out = model.forward(be, &self.store, scratch, &[seq]);
        self.len += tokens.len();
        out
    }

    pub fn free(self, be: &mut dyn Backend) {
        self.store.free(be)
    }
}

/// Activation buffers for one forward pass of up to `max_tokens` tokens, allocated once
/// and reused by every pass, and the per-pass bookkeeping of its sequences.
pub struct Scratch {
    pub max_tokens: usize,
    pub max_logits: usize,
    /// Residual stream, `max_tokens × d_model`.
    pub x: BufId,
    /// Normalized input of a block, then its output; `max_tokens × d_model`.
    pub xb: BufId,
    pub q: BufId,
    pub k: BufId,
    pub v: BufId,
    pub attn: BufId,
    pub gate: BufId,
    pub up: BufId,
    pub logits: BufId,
    /// Position of each token of the pass.
    pub positions: Vec<u32>,
    /// Cache row of each token of the pass.
    pub kv_rows: Vec<u32>,
    /// Every sequence's attention call and page table.
    pub attn_seqs: Vec<AttnSeq>,
    pub page_table: Vec<u32>,
    /// Rows of the pass whose logits are wanted, in order.
    pub logit_rows: Vec<u32>,
    /// Tokens and logits wanted of each sequence of the pass.
    pub seq_tokens: Vec<usize>,
    pub seq_logits: Vec<usize>,
    /// Every token of the pass.
    pub tokens: Vec<u32>,
    pub page_size: usize,
}

impl Scratch {
    pub fn new(be: &mut dyn Backend, h: &Hyper, max_tokens: usize, max_logits: usize) -> Scratch {
        let n = max_tokens;
        Scratch {
            max_tokens,
            max_logits,
            x: be.alloc(n * h.d_model),
            xb: be.alloc(n * h.d_model),
            q: be.alloc(n * h.n_head * h.head_dim),
            k: be.alloc(n * h.kv_dim()),
            v: be.alloc(n * h.kv_dim()),
            attn: be.alloc(n * h.n_head * h.head_dim),
            gate: be.alloc(n * h.d_ffn),
            up: be.alloc(n * h.d_ffn),
            logits: be.alloc(max_logits * h.vocab),
            positions: Vec::with_capacity(n),
            kv_rows: Vec::with_capacity(n),
            attn_seqs: Vec::with_capacity(n),
            page_table: Vec::new(),
            logit_rows: Vec::with_capacity(max_logits),
            seq_tokens: Vec::new(),
            seq_logits: Vec::new(),
            tokens: Vec::with_capacity(n),
            page_size: 0,
        }
    }

    pub fn free(self, be: &mut dyn Backend) {
        for b in [
            self.x,
            self.xb,
            self.q,
            self.k,
            self.v,
            self.attn,
            self.gate,
            self.up,
            self.logits,
        ] {
            be.free(b);
        }
    }
}

/// Loads a tensor and checks its shape.
pub fn weight(
    ck: &Checkpoint,
    be: &mut dyn Backend,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<WeightId, ModelError> {
    let w = ck.weight(name)?;
    if (w.rows, w.cols) != (rows, cols) {
        return Err(ModelError::Shape {
            name: name.to_string(),
            found: (w.rows, w.cols),
            expected: (rows, cols),
        });
    }
    Ok(be.upload(w)?)
}

/// The output projection, or the embedding table when the model ties them.
pub fn output_weight(
    ck: &Checkpoint,
    be: &mut dyn Backend,
    h: &Hyper,
    embed: WeightId,
) -> Result<WeightId, ModelError> {
    if ck.has("output.weight") {
        weight(ck, be, "output.weight", h.vocab, h.d_model)
    } else {
        Ok(embed)
    }
}

/// Which optional tensors an attention block has.
#[derive(Clone, Copy)]
pub struct AttnExtras {
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before rotary embeddings (Qwen3, Gemma 3).
    pub qk_norm: bool,
}

pub struct AttnWeights {
    pub q: WeightId,
    pub k: WeightId,
    pub v: WeightId,
    pub o: WeightId,
    pub qkv_bias: Option<[WeightId; 3]>,
    pub qk_norm: Option<[WeightId; 2]>,
}

impl AttnWeights {
    pub fn load(
        ck: &Checkpoint,
        be: &mut dyn Backend,
        h: &Hyper,
        layer: usize,
        extras: AttnExtras,
    ) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{layer}.{t}");
        let (q_dim, kv_dim) = (h.n_head * h.head_dim, h.kv_dim());
        let qkv_bias = if extras.qkv_bias {
            Some([
                weight(ck, be, &name("attn_q.bias"), 1, q_dim)?,
                weight(ck, be, &name("attn_k.bias"), 1, kv_dim)?,
                weight(ck, be, &name("attn_v.bias"), 1, kv_dim)?,
            ])
        } else {
            None
        };
        let qk_norm = if extras.qk_norm {
            Some([
                weight(ck, be, &name("attn_q_norm.weight"), 1, h.head_dim)?,
                weight(ck, be, &name("attn_k_norm.weight"), 1, h.head_dim)?,
            ])
        } else {
            None
        };
        Ok(AttnWeights {
            q: weight(ck, be, &name("attn_q.weight"), q_dim, h.d_model)?,
            k: weight(ck, be, &name("attn_k.weight"), kv_dim, h.d_model)?,
            v: weight(ck, be, &name("attn_v.weight"), kv_dim, h.d_model)?,
            o: weight(ck, be, &name("attn_output.weight"), h.d_model, q_dim)?,
            qkv_bias,
            qk_norm,
        })
    }
}

/// How one layer's attention positions its tokens.
#[derive(Clone, Copy)]
pub struct AttnPlan {
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Queries are multiplied by `query_scale` after the rotation, and scores by `scale`
    /// (llama.cpp scales Gemma's queries and other models' scores; the same numbers,
    /// rounded differently).
    pub query_scale: f32,
    pub scale: f32,
    pub window: Option<usize>,
}

/// Self-attention of the normalized rows in `s.xb` (their positions, cache rows and
/// sequences set by [`begin`]), whose output (after the output projection) replaces them
/// in `s.xb`. Stores this layer's keys and values of those positions in the cache.
pub fn attention(be: &mut dyn Backend, h: &Hyper, w: &AttnWeights, s: &Scratch, kv: (BufId, BufId), plan: AttnPlan) {
    let n = s.positions.len();
    let products = [(w.q, s.q), (w.k, s.k), (w.v, s.v)];
    match w.qkv_bias {
        Some(biases) => be.matmul_many_biased(s.xb, n, &products, &biases),
        None => be.matmul_many(s.xb, n, &products),
    }
    if let Some([qn, kn]) = w.qk_norm {
        be.rms_norm(s.q, qn, n * h.n_head, h.norm_eps);
        be.rms_norm(s.k, kn, n * h.n_kv_head, h.norm_eps);
    }
    be.rope_qk_store_kv(
        (s.q, s.k, s.v),
        &s.positions,
        (h.n_head, h.n_kv_head),
        h.head_dim,
        plan.rope_theta,
        plan.rope_style,
        kv,
        &s.kv_rows,
    );
    if plan.query_scale != 1.0 {
        be.scale(s.q, n * h.n_head * h.head_dim, plan.query_scale);
    }
    let shape = Attention {
        n_head: h.n_head,
        n_kv_head: h.n_kv_head,
        head_dim: h.head_dim,
        scale: plan.scale,
        window: plan.window,
        page_size: s.page_size,
    };
    be.attention(s.q, kv.0, kv.1, shape, &s.attn_seqs, &s.page_table, s.attn);
    be.matmul(w.o, s.attn, n, s.xb);
}

pub struct FfnWeights {
    pub gate: WeightId,
    pub up: WeightId,
    pub down: WeightId,
}

impl FfnWeights {
    pub fn load(ck: &Checkpoint, be: &mut dyn Backend, h: &Hyper, layer: usize) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{layer}.{t}");
        Ok(FfnWeights {
            gate: weight(ck, be, &name("ffn_gate.weight"), h.d_ffn, h.d_model)?,
            up: weight(ck, be, &name("ffn_up.weight"), h.d_ffn, h.d_model)?,
            down: weight(ck, be, &name("ffn_down.weight"), h.d_model, h.d_ffn)?,
        })
    }
}

/// Gated feed-forward of the `n` normalized rows in `s.xb`, whose output replaces them.
pub fn feed_forward(be: &mut dyn Backend, w: &FfnWeights, s: &Scratch, n: usize, act: Activation) {
    be.matmul_many(s.xb, n, &[(w.gate, s.gate), (w.up, s.up)]);
    be.matmul_gated(w.down, s.gate, s.up, act, n, s.xb);
}

/// Keeps only the rows of the residual stream that want logits (`s.logit_rows`), moved
/// to its first rows in order, and returns their count. Models call it before the last
/// layer's feed-forward, whose other rows nothing reads (the cache holds keys and values
/// only), as llama.cpp does; the backend is told the new batch shape.
pub fn keep_logit_rows(be: &mut dyn Backend, h: &Hyper, s: &Scratch) -> usize {
    let d = h.d_model;
    // Runs of consecutive rows (a sequence's last tokens) move in one copy; rows only
    // move towards the front, and a run never overlaps where it lands unless in place.
    let rows = &s.logit_rows;
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j] == rows[j - 1] + 1 {
            j += 1;
        }
        let from = rows[i] as usize;
        if from != i {
            let len = j - i;
            let mut done = 0;
            // Overlapping ranges go in pieces no longer than the distance moved.
            let step = from - i;
            while done < len {
                let take = step.min(len - done);
                be.copy_within(s.x, (from + done) * d, (i + done) * d, take * d);
                done += take;
            }
        }
        i = j;
    }
    be.set_batch(&s.seq_logits);
    rows.len()
}

/// The residual step after a block whose output is in `s.xb`: `x += xb`, then `xb` =
/// `x` normalized by `norm` for the next block (or the classifier). Before the last
/// layer's feed-forward (`keep_logits`) the rows that want no logits are dropped in
/// between (see [`keep_logit_rows`]); returns the rows left.
pub fn residual_norm(
    be: &mut dyn Backend,
    h: &Hyper,
    s: &Scratch,
    norm: WeightId,
    n: usize,
    keep_logits: bool,
) -> usize {
    if !keep_logits {
        be.add_rms_norm(s.x, s.xb, norm, n, h.norm_eps);
        return n;
    }
    be.add(s.x, s.xb, n * h.d_model);
    let n = keep_logit_rows(be, h, s);
    first_norm(be, h, s, norm, n);
    n
}

/// `xb` = the first `n` rows of `x` normalized by `norm` (the first block's input).
pub fn first_norm(be: &mut dyn Backend, h: &Hyper, s: &Scratch, norm: WeightId, n: usize) {
    if n > 0 {
        be.copy(s.x, 0, s.xb, 0, n * h.d_model);
        be.rms_norm(s.xb, norm, n, h.norm_eps);
    }
}

/// Lays out a pass over `batch`: the tokens of every sequence one after another, their
/// positions, cache rows, attention calls and logit rows, and tells the backend the
/// batch's shape. Returns the token count.
///
/// # Panics
/// If the batch does not fit the scratch, or a sequence's page table does not cover its
/// positions inside the store: callers size and check both.
pub fn begin(be: &mut dyn Backend, kv: &KvStore, s: &mut Scratch, batch: &[SeqInput]) -> usize {
    let n: usize = batch.iter().map(|q| q.tokens.len()).sum();
    let n_logits: usize = batch.iter().map(|q| q.n_logits).sum();
    assert!(
        n > 0 && n <= s.max_tokens,
        "{n} tokens do not fit a scratch of {}",
        s.max_tokens
    );
    assert!(n_logits <= s.max_logits, "too many logits requested");
    s.positions.clear();
    s.kv_rows.clear();
    s.attn_seqs.clear();
    s.page_table.clear();
    s.logit_rows.clear();
    s.seq_tokens.clear();
    s.seq_logits.clear();
    s.tokens.clear();
    s.page_size = kv.page_size;
    let ps = kv.page_size;
    for q in batch {
        let (row0, end) = (s.positions.len(), q.start + q.tokens.len());
        assert!(
            !q.tokens.is_empty() && q.n_logits <= q.tokens.len(),
            "a sequence without tokens or with too many logits"
        );
        let n_pages = end.div_ceil(ps);
        assert!(
            n_pages <= q.pages.len() && q.pages[..n_pages].iter().all(|&p| (p as usize) < kv.n_pages),
            "a page table does not cover positions 0..{end} in the store"
        );
        s.tokens.extend_from_slice(q.tokens);
        s.seq_tokens.push(q.tokens.len());
        s.seq_logits.push(q.n_logits);
        for pos in q.start..end {
            s.positions.push(pos as u32);
            s.kv_rows.push((q.pages[pos / ps] as usize * ps + pos % ps) as u32);
        }
        s.attn_seqs.push(AttnSeq {
            row0,
            n_tokens: q.tokens.len(),
            start_pos: q.start,
            page0: s.page_table.len(),
            n_pages,
        });
        s.page_table.extend_from_slice(&q.pages[..n_pages]);
        s.logit_rows
            .extend((row0 + q.tokens.len() - q.n_logits..row0 + q.tokens.len()).map(|r| r as u32));
    }
    be.set_batch(&s.seq_tokens);
    n
}
