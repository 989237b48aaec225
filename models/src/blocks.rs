//! The pieces every architecture here is built from: the key/value cache, scratch
//! buffers, weight loading with shape checks, the attention block and the gated FFN.

use kiln_runtime::{Activation, Attention, Backend, BufId, RopeStyle, WeightId};

use crate::{Checkpoint, Hyper, ModelError};

/// Keys and values of every token a sequence has run, one buffer pair per layer, each
/// `capacity` rows of `kv_dim` floats.
pub struct KvCache {
    pub layers: Vec<(BufId, BufId)>,
    pub capacity: usize,
    /// Tokens stored so far: the position of the next token.
    pub len: usize,
}

impl KvCache {
    pub fn new(be: &mut dyn Backend, hyper: &Hyper, capacity: usize) -> KvCache {
        let rows = capacity * hyper.kv_dim();
        let layers = (0..hyper.n_layer).map(|_| (be.alloc(rows), be.alloc(rows))).collect();
        KvCache {
            layers,
            capacity,
            len: 0,
        }
    }

    pub fn free(self, be: &mut dyn Backend) {
        for (k, v) in self.layers {
            be.free(k);
            be.free(v);
        }
    }
}

/// Activation buffers for one forward pass of up to `max_tokens` tokens, allocated once
/// and reused by every pass.
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
    pub positions: Vec<u32>,
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
    pub scale: f32,
    pub window: Option<usize>,
}

/// Self-attention of the normalized rows in `s.xb`, one per position in `s.positions`,
/// whose output (after the output projection) replaces them in `s.xb`. Appends this
/// layer's keys and values to the cache rows of those positions.
pub fn attention(be: &mut dyn Backend, h: &Hyper, w: &AttnWeights, s: &Scratch, kv: (BufId, BufId), plan: AttnPlan) {
    let (start, n) = (s.positions[0] as usize, s.positions.len());
    be.matmul_many(s.xb, n, &[(w.q, s.q), (w.k, s.k), (w.v, s.v)]);
    if let Some([qb, kb, vb]) = w.qkv_bias {
        be.add_bias(s.q, qb, n);
        be.add_bias(s.k, kb, n);
        be.add_bias(s.v, vb, n);
    }
    if let Some([qn, kn]) = w.qk_norm {
        be.rms_norm(s.q, qn, n * h.n_head, h.norm_eps);
        be.rms_norm(s.k, kn, n * h.n_kv_head, h.norm_eps);
    }
    be.rope(
        s.q,
        &s.positions,
        h.n_head,
        h.head_dim,
        plan.rope_theta,
        plan.rope_style,
    );
    be.rope(
        s.k,
        &s.positions,
        h.n_kv_head,
        h.head_dim,
        plan.rope_theta,
        plan.rope_style,
    );
    be.store_kv(s.k, kv.0, n, h.kv_dim(), start);
    be.store_kv(s.v, kv.1, n, h.kv_dim(), start);
    let shape = Attention {
        n_tokens: n,
        start_pos: start,
        n_head: h.n_head,
        n_kv_head: h.n_kv_head,
        head_dim: h.head_dim,
        scale: plan.scale,
        window: plan.window,
    };
    be.attention(s.q, kv.0, kv.1, shape, s.attn);
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
pub fn feed_forward(be: &mut dyn Backend, h: &Hyper, w: &FfnWeights, s: &Scratch, n: usize, act: Activation) {
    be.matmul_many(s.xb, n, &[(w.gate, s.gate), (w.up, s.up)]);
    be.gated_activation(s.gate, s.up, n * h.d_ffn, act);
    be.matmul(w.down, s.gate, n, s.xb);
}

/// Final norm and classifier over the last `n_logits` of `n` rows of the residual stream.
pub fn logits(
    be: &mut dyn Backend,
    h: &Hyper,
    norm: WeightId,
    output: WeightId,
    s: &Scratch,
    n: usize,
    n_logits: usize,
) -> BufId {
    let d = h.d_model;
    be.copy(s.x, (n - n_logits) * d, s.xb, 0, n_logits * d);
    be.rms_norm(s.xb, norm, n_logits, h.norm_eps);
    be.matmul(output, s.xb, n_logits, s.logits);
    s.logits
}

/// Sets `s.positions` for `n` tokens starting at `cache.len`, checking they fit.
pub fn begin(cache: &KvCache, s: &mut Scratch, n: usize, n_logits: usize) {
    assert!(
        n > 0 && n <= s.max_tokens,
        "{n} tokens do not fit a scratch of {}",
        s.max_tokens
    );
    assert!(n_logits <= n && n_logits <= s.max_logits, "too many logits requested");
    assert!(cache.len + n <= cache.capacity, "the key/value cache is full");
    s.positions.clear();
    s.positions.extend((cache.len..cache.len + n).map(|p| p as u32));
}
