//! Gemma 3 (text): the Llama block with four RMSNorms per layer (before and after both
//! attention and feed-forward), RMSNorm on query and key heads, a GELU-tanh gated FFN,
//! embeddings scaled by √d_model, tied output, and attention that alternates five
//! sliding-window layers (local RoPE base) with one global layer (global RoPE base).

use kiln_runtime::{Activation, Backend, BufId, RopeStyle, WeightId};

use crate::blocks::{self, AttnExtras, AttnPlan, AttnWeights, FfnWeights, KvStore, Scratch};
use crate::checkpoint::Format;
use crate::config::{hf_rope_theta, json_usize};
use crate::{Checkpoint, Hyper, Model, ModelError, SeqInput};

/// Gemma 3 models put one global-attention layer after every five sliding ones.
const SLIDING_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers; GGUF files do not store it.
const LOCAL_ROPE_THETA: f32 = 10_000.0;

pub struct Gemma3 {
    hyper: Hyper,
    embed_scale: f32,
    attn_scale: f32,
    local_rope_theta: f32,
    embed: WeightId,
    layers: Vec<Layer>,
    output_norm: WeightId,
    output: WeightId,
}

struct Layer {
    sliding: bool,
    attn_norm: WeightId,
    attn: AttnWeights,
    post_attn_norm: WeightId,
    ffn_norm: WeightId,
    ffn: FfnWeights,
    post_ffn_norm: WeightId,
}

pub fn load(ck: &Checkpoint, hyper: Hyper, be: &mut dyn Backend) -> Result<Gemma3, ModelError> {
    let h = &hyper;
    let window = h
        .sliding_window
        .ok_or_else(|| ModelError::MissingKey("sliding window".into()))?;
    if window == 0 {
        return Err(ModelError::BadConfig("sliding window of 0 tokens".into()));
    }
    let (sliding, local_rope_theta, query_scalar) = match &ck.format {
        Format::Gguf(g) => {
            if g.get_f32("gemma3.rope.scaling.factor").is_some_and(|f| f != 1.0) {
                return Err(ModelError::BadConfig("RoPE scaling is not supported yet".into()));
            }
            let sliding = (0..h.n_layer).map(|i| (i + 1) % SLIDING_PATTERN != 0).collect();
            (sliding, LOCAL_ROPE_THETA, h.head_dim)
        }
        Format::Hf(c) => {
            let c = c.config();
            let scaled = |v: &serde_json::Value| {
                v.get("rope_type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t != "default")
            };
            let rope_params = c.get("rope_parameters");
            if c.get("rope_scaling").is_some_and(|v| !v.is_null())
                || rope_params.is_some_and(|p| {
                    scaled(p)
                        || ["full_attention", "sliding_attention"]
                            .iter()
                            .any(|k| p.get(*k).is_some_and(scaled))
                })
            {
                return Err(ModelError::BadConfig("RoPE scaling is not supported yet".into()));
            }
            let sliding: Vec<bool> = match c.get("layer_types").and_then(|v| v.as_array()) {
                Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
                None => {
                    let pattern = json_usize(c, "sliding_window_pattern")
                        .or_else(|| json_usize(c, "_sliding_window_pattern"))
                        .unwrap_or(SLIDING_PATTERN);
                    (0..h.n_layer).map(|i| (i + 1) % pattern != 0).collect()
                }
            };
            if sliding.len() != h.n_layer {
                return Err(ModelError::BadConfig("layer_types does not list every layer".into()));
            }
            let local = hf_rope_theta(c, "sliding_attention").unwrap_or(LOCAL_ROPE_THETA);
            (
                sliding,
                local,
                json_usize(c, "query_pre_attn_scalar").unwrap_or(h.head_dim),
            )
        }
    };

    let embed = blocks::weight(ck, be, "token_embd.weight", h.vocab, h.d_model)?;
    let extras = AttnExtras {
        qkv_bias: false,
        qk_norm: true,
    };
    let mut layers = Vec::with_capacity(h.n_layer);
    for (i, sliding) in sliding.into_iter().enumerate() {
        let norm = |be: &mut dyn Backend, t: &str| blocks::weight(ck, be, &format!("blk.{i}.{t}"), 1, h.d_model);
        layers.push(Layer {
            sliding,
            attn_norm: norm(be, "attn_norm.weight")?,
            attn: AttnWeights::load(ck, be, h, i, extras)?,
            post_attn_norm: norm(be, "post_attention_norm.weight")?,
            ffn_norm: norm(be, "ffn_norm.weight")?,
            ffn: FfnWeights::load(ck, be, h, i)?,
            post_ffn_norm: norm(be, "post_ffw_norm.weight")?,
        });
    }
    let output_norm = blocks::weight(ck, be, "output_norm.weight", 1, h.d_model)?;
    let output = blocks::output_weight(ck, be, h, embed)?;
    Ok(Gemma3 {
        embed_scale: (h.d_model as f32).sqrt(),
        attn_scale: 1.0 / (query_scalar as f32).sqrt(),
        local_rope_theta,
        hyper,
        embed,
        layers,
        output_norm,
        output,
    })
}

impl Model for Gemma3 {
    fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    fn forward(&self, be: &mut dyn Backend, kv: &KvStore, s: &mut Scratch, batch: &[SeqInput]) -> BufId {
        let h = &self.hyper;
        let (mut n, d) = (blocks::begin(be, kv, s, batch), h.d_model);
        be.embed(self.embed, &s.tokens, s.x);
        be.scale(s.x, n * d, self.embed_scale);
        blocks::first_norm(be, h, s, self.layers[0].attn_norm, n);
        for (i, layer) in self.layers.iter().enumerate() {
            let plan = AttnPlan {
                rope_theta: if layer.sliding {
                    self.local_rope_theta
                } else {
                    h.rope_theta
                },
                rope_style: RopeStyle::Neox,
                query_scale: self.attn_scale,
                scale: 1.0,
                window: if layer.sliding { h.sliding_window } else { None },
            };
            // Attention: x += norm(attn(norm(x))), xb holding norm(x).
            blocks::attention(be, h, &layer.attn, s, kv.layer(i), plan);
            be.rms_norm(s.xb, layer.post_attn_norm, n, h.norm_eps);
            let last = i + 1 == self.layers.len();
            n = blocks::residual_norm(be, h, s, layer.ffn_norm, n, last);
            if n == 0 {
                return s.logits;
            }
            // Feed-forward: x += norm(ffn(norm(x))); then xb = the next layer's norm of x.
            blocks::feed_forward(be, &layer.ffn, s, n, Activation::GeluTanh);
            be.rms_norm(s.xb, layer.post_ffn_norm, n, h.norm_eps);
            let next_norm = self.layers.get(i + 1).map_or(self.output_norm, |l| l.attn_norm);
            blocks::residual_norm(be, h, s, next_norm, n, false);
        }
        be.matmul(self.output, s.xb, n, s.logits);
        s.logits
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        let window = self.hyper.sliding_window;
        self.layers.iter().map(|l| window.filter(|_| l.sliding)).collect()
    }
}
