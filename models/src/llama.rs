//! Llama (SmolLM2, Llama 2/3): pre-norm decoder blocks of RMSNorm → attention with
//! rotary embeddings and grouped key/value heads → RMSNorm → SwiGLU feed-forward.
//! Qwen2 and Qwen3 are this model with small additions (see their files).

use kiln_runtime::{Activation, Backend, BufId, RopeStyle, WeightId};

use crate::blocks::{self, AttnExtras, AttnPlan, AttnWeights, FfnWeights, KvStore, Scratch};
use crate::{Checkpoint, Hyper, Model, ModelError, SeqInput};

pub struct Llama {
    hyper: Hyper,
    rope_style: RopeStyle,
    embed: WeightId,
    layers: Vec<Layer>,
    output_norm: WeightId,
    output: WeightId,
}

struct Layer {
    attn_norm: WeightId,
    attn: AttnWeights,
    ffn_norm: WeightId,
    ffn: FfnWeights,
}

pub fn load(ck: &Checkpoint, hyper: Hyper, be: &mut dyn Backend) -> Result<Llama, ModelError> {
    let extras = AttnExtras {
        qkv_bias: false,
        qk_norm: false,
    };
    let style = if ck.llama_rope_is_interleaved() {
        RopeStyle::Interleaved
    } else {
        RopeStyle::Neox
    };
    load_family(ck, hyper, be, extras, style)
}

/// Loads a Llama-family model whose attention blocks carry `extras`.
pub(crate) fn load_family(
    ck: &Checkpoint,
    hyper: Hyper,
    be: &mut dyn Backend,
    extras: AttnExtras,
    rope_style: RopeStyle,
) -> Result<Llama, ModelError> {
    let h = &hyper;
    let embed = blocks::weight(ck, be, "token_embd.weight", h.vocab, h.d_model)?;
    let mut layers = Vec::with_capacity(h.n_layer);
    for i in 0..h.n_layer {
        layers.push(Layer {
            attn_norm: blocks::weight(ck, be, &format!("blk.{i}.attn_norm.weight"), 1, h.d_model)?,
            attn: AttnWeights::load(ck, be, h, i, extras)?,
            ffn_norm: blocks::weight(ck, be, &format!("blk.{i}.ffn_norm.weight"), 1, h.d_model)?,
            ffn: FfnWeights::load(ck, be, h, i)?,
        });
    }
    let output_norm = blocks::weight(ck, be, "output_norm.weight", 1, h.d_model)?;
    let output = blocks::output_weight(ck, be, h, embed)?;
    Ok(Llama {
        hyper,
        rope_style,
        embed,
        layers,
        output_norm,
        output,
    })
}

impl Model for Llama {
    fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    fn forward(&self, be: &mut dyn Backend, kv: &KvStore, s: &mut Scratch, batch: &[SeqInput]) -> BufId {
        let h = &self.hyper;
        let mut n = blocks::begin(be, kv, s, batch);
        let plan = AttnPlan {
            rope_theta: h.rope_theta,
            rope_style: self.rope_style,
            query_scale: 1.0,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            window: None,
        };
        be.embed(self.embed, &s.tokens, s.x);
        blocks::first_norm(be, h, s, self.layers[0].attn_norm, n);
        for (i, layer) in self.layers.iter().enumerate() {
            // Attention: x += attn(norm(x)), xb holding norm(x).
            blocks::attention(be, h, &layer.attn, s, kv.layer(i), plan);
            let last = i + 1 == self.layers.len();
            n = blocks::residual_norm(be, h, s, layer.ffn_norm, n, last);
            if n == 0 {
                return s.logits;
            }
            // Feed-forward: x += ffn(norm(x)); then xb = the next layer's norm of x.
            blocks::feed_forward(be, &layer.ffn, s, n, Activation::Silu);
            let next_norm = self.layers.get(i + 1).map_or(self.output_norm, |l| l.attn_norm);
            blocks::residual_norm(be, h, s, next_norm, n, false);
        }
        be.matmul(self.output, s.xb, n, s.logits);
        s.logits
    }
}
