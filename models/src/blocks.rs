//! The pieces every architecture here is built from: the key/value cache, scratch
//! buffers, weight loading with shape checks, the attention block and the gated FFN.

use kiln_runtime::{Activation, Attention, AttnSeq, Backend, BufId, RopeStyle, WeightId};

use crate::{Checkpoint, Hyper, ModelError};

/// How the layers' keys and values are laid out in cache pages.
///
/// Layers are split into groups of `group_size` layers that share a sliding window (or
/// have none); one page of the pool holds `page_size` positions of every layer of one
/// group, and each sequence has one page table per group. Pages of a group whose layers
/// see only a window of positions can be let go once every later query's window has
/// passed them (Gemma 3's five sliding layers of six), while the other groups keep theirs.
/// All pages are the same size, so the groups draw on one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// The window of each group's layers (`None`: they see every earlier position).
    pub windows: Vec<Option<usize>>,
    /// Each layer's group and slot (its place in the group).
    pub layers: Vec<(usize, usize)>,
    pub group_size: usize,
}

impl KvLayout {
    /// Every layer in one group: pages hold all positions of all layers.
    pub fn single(n_layer: usize) -> KvLayout {
        KvLayout {
            windows: vec![None],
            layers: (0..n_layer).map(|l| (0, l)).collect(),
            group_size: n_layer,
        }
    }

    /// Layers grouped by their attention window. Groups are as large as the layer counts
    /// of all windows allow (their greatest common divisor): fewer groups, fewer tables.
    pub fn by_window(windows: &[Option<usize>]) -> KvLayout {
        let mut classes: Vec<(Option<usize>, usize)> = Vec::new();
        for &w in windows {
            match classes.iter_mut().find(|(cw, _)| *cw == w) {
                Some((_, count)) => *count += 1,
                None => classes.push((w, 1)),
            }
        }
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let group_size = classes.iter().fold(0, |g, &(_, count)| gcd(g, count)).max(1);
        // Each window's groups follow the previous window's.
        let mut first_group = Vec::with_capacity(classes.len());
        let mut group_windows = Vec::new();
        for &(w, count) in &classes {
            first_group.push(group_windows.len());
            group_windows.extend(std::iter::repeat_n(w, count / group_size));
        }
        let mut seen = vec![0; classes.len()];
        let layers = windows
            .iter()
            .map(|w| {
                let c = classes.iter().position(|(cw, _)| cw == w).expect("classified");
                let k = seen[c];
                seen[c] += 1;
                (first_group[c] + k / group_size, k % group_size)
            })
            .collect();
        KvLayout {
            windows: group_windows,
            layers,
            group_size,
        }
    }

    pub fn groups(&self) -> usize {
        self.windows.len()
    }

    /// The window of a layer (its group's).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.windows[self.layers[layer].0]
    }
}

/// Key/value storage shared by every sequence: `n_pages` pages of `page_size` rows of
/// `kv_dim` values (`row_floats` buffer floats a row, as the backend stores them) for
/// each layer of a group ([`KvLayout`]). Slot `i` of every page lives in the `i`-th pair
/// of buffers (keys, values): a layer reads its slot's buffers at the pages of its
/// group's table. Which pages a sequence's positions use is its page tables, kept by
/// whoever schedules sequences.
pub struct KvStore {
    pub slots: Vec<(BufId, BufId)>,
    pub layout: KvLayout,
    pub page_size: usize,
    pub n_pages: usize,
    pub row_floats: usize,
}

/// Where one layer's keys and values are: its slot's buffers, and its group's table.
#[derive(Clone, Copy, Debug)]
pub struct LayerKv {
    pub keys: BufId,
    pub values: BufId,
    pub group: usize,
}

impl KvStore {
    pub fn new(be: &mut dyn Backend, hyper: &Hyper, layout: KvLayout, n_pages: usize, page_size: usize) -> KvStore {
        assert_eq!(layout.layers.len(), hyper.n_layer, "a layout for another model");
        let row_floats = be.kv_row_floats(hyper.kv_dim());
        let len = n_pages * page_size * row_floats;
        let slots = (0..layout.group_size).map(|_| (be.alloc(len), be.alloc(len))).collect();
        KvStore {
            slots,
            layout,
            page_size,
            n_pages,
            row_floats,
        }
    }

    pub fn layer(&self, layer: usize) -> LayerKv {
        let (group, slot) = self.layout.layers[layer];
        let (keys, values) = self.slots[slot];
        LayerKv { keys, values, group }
    }

    /// Buffer floats of one page of one layer's keys (or values).
    pub fn page_floats(&self) -> usize {
        self.page_size * self.row_floats
    }

    /// Bytes one page takes (keys and values of every layer of a group).
    pub fn bytes_per_page(&self) -> usize {
        2 * self.slots.len() * self.page_floats() * std::mem::size_of::<f32>()
    }

    /// Bytes one page of `layout` takes on `be`.
    pub fn page_bytes(be: &dyn Backend, hyper: &Hyper, layout: &KvLayout, page_size: usize) -> usize {
        2 * layout.group_size * page_size * be.kv_row_floats(hyper.kv_dim()) * std::mem::size_of::<f32>()
    }

    pub fn free(self, be: &mut dyn Backend) {
        for (k, v) in self.slots {
            be.free(k);
            be.free(v);
        }
    }
}

/// One sequence's part of a forward pass: `tokens` at positions `start..`, whose keys
/// and values go to (and are read from) the rows its page tables give them, and how many
/// of its last tokens want logits. `pages` holds one table per group of the store's
/// layout, one after another, each `pages.len() / groups` entries long; entries for
/// positions before a group's window (pages let go) may name any page of the store.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    /// The run these tokens belong to, positions `run.0..run.1`: the tokens themselves,
    /// or the prompt they are a chunk of (its beginning perhaps computed by earlier
    /// passes, or taken from the prefix cache). Attention computes them as part of the
    /// whole run, so how a prompt is split changes no result.
    pub run: (usize, usize),
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
            store: KvStore::new(be, hyper, KvLayout::single(hyper.n_layer), 1, capacity),
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
            run: (self.len, self.len + tokens.len()),
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
    /// Cache row of each token of the pass, per layer group.
    pub kv_rows: Vec<Vec<u32>>,
    /// Every sequence's attention call, and per layer group every sequence's page
    /// table (each group's tables are laid out alike, so the calls fit them all).
    pub attn_seqs: Vec<AttnSeq>,
    pub page_tables: Vec<Vec<u32>>,
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
            kv_rows: Vec::new(),
            attn_seqs: Vec::with_capacity(n),
            page_tables: Vec::new(),
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
pub fn attention(be: &mut dyn Backend, h: &Hyper, w: &AttnWeights, s: &Scratch, kv: LayerKv, plan: AttnPlan) {
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
        (kv.keys, kv.values),
        &s.kv_rows[kv.group],
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
    be.attention(
        s.q,
        kv.keys,
        kv.values,
        shape,
        &s.attn_seqs,
        &s.page_tables[kv.group],
        s.attn,
    );
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
/// If the batch does not fit the scratch, or a sequence's page tables do not cover its
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
    let groups = kv.layout.groups();
    s.positions.clear();
    s.kv_rows.resize_with(groups, Vec::new);
    s.page_tables.resize_with(groups, Vec::new);
    for g in 0..groups {
        s.kv_rows[g].clear();
        s.page_tables[g].clear();
    }
    s.attn_seqs.clear();
    s.logit_rows.clear();
    s.seq_tokens.clear();
    s.seq_logits.clear();
    s.tokens.clear();
    s.page_size = kv.page_size;
    let ps = kv.page_size;
    for q in batch {
        let (row0, end) = (s.positions.len(), q.start + q.tokens.len());
        assert!(
            !q.tokens.is_empty() && q.n_logits <= q.tokens.len() && q.run.0 <= q.start && end <= q.run.1,
            "a sequence without tokens, with too many logits or outside its run"
        );
        let (n_pages, stride) = (end.div_ceil(ps), q.pages.len() / groups);
        assert!(
            q.pages.len() % groups == 0 && n_pages <= stride && q.pages.iter().all(|&p| (p as usize) < kv.n_pages),
            "page tables do not cover positions 0..{end} in the store"
        );
        s.tokens.extend_from_slice(q.tokens);
        s.seq_tokens.push(q.tokens.len());
        s.seq_logits.push(q.n_logits);
        s.positions.extend((q.start..end).map(|pos| pos as u32));
        s.attn_seqs.push(AttnSeq {
            row0,
            n_tokens: q.tokens.len(),
            start_pos: q.start,
            run_start: q.run.0,
            run_end: q.run.1,
            page0: s.page_tables[0].len(),
            n_pages,
        });
        for (g, table) in q.pages.chunks_exact(stride).enumerate() {
            let rows = q.start..end;
            s.kv_rows[g].extend(rows.map(|pos| (table[pos / ps] as usize * ps + pos % ps) as u32));
            s.page_tables[g].extend_from_slice(&table[..n_pages]);
        }
        s.logit_rows
            .extend((row0 + q.tokens.len() - q.n_logits..row0 + q.tokens.len()).map(|r| r as u32));
    }
    be.set_batch(&s.seq_tokens);
    n
}

#[cfg(test)]
mod tests {
    use super::KvLayout;

    #[test]
    fn layers_group_by_window() {
        // Gemma 3 270M: five sliding layers, then a global one, three times.
        let windows: Vec<Option<usize>> = (0..18).map(|i| (i % 6 != 5).then_some(512)).collect();
        let layout = KvLayout::by_window(&windows);
        assert_eq!(layout.group_size, 3);
        assert_eq!(
            layout.windows,
            [Some(512), Some(512), Some(512), Some(512), Some(512), None]
        );
        assert_eq!(layout.layers[..6], [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (5, 0)]);
        assert_eq!(layout.layers[17], (5, 2));
        // Every (group, slot) holds one layer.
        let mut seen = layout.layers.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 18);
        // Layer counts with no common divisor make groups of one; no window, one group.
        assert_eq!(KvLayout::by_window(&[Some(4), Some(4), None, Some(4)]).group_size, 1);
        assert_eq!(KvLayout::by_window(&[None; 30]), KvLayout::single(30));
    }
}
