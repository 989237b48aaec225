//! Hyper-parameters shared by the decoder-only transformers kiln runs, read from GGUF
//! metadata (`{arch}.block_count`, …) or from a Hugging Face `config.json`.

use serde_json::Value as Json;

use crate::checkpoint::{Checkpoint, Format};
use crate::ModelError;

/// What every architecture file needs to know about the shapes of its model.
#[derive(Clone, Debug)]
pub struct Hyper {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub d_ffn: usize,
    pub vocab: usize,
    pub n_ctx_train: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    /// Sliding attention window in tokens (a query sees itself and `window - 1` earlier keys).
    pub sliding_window: Option<usize>,
}

impl Hyper {
    /// Reads the hyper-parameters of architecture `arch` from a checkpoint.
    pub fn read(ck: &Checkpoint) -> Result<Hyper, ModelError> {
        let arch = &ck.arch;
        match &ck.format {
            Format::Gguf(g) => {
                let key = |k: &str| format!("{arch}.{k}");
                let req = |k: &str| g.get_usize(&key(k)).ok_or_else(|| ModelError::MissingKey(key(k)));
                let n_head = req("attention.head_count")?;
                let d_model = req("embedding_length")?;
                let vocab = match g.get_usize(&key("vocab_size")) {
                    Some(v) => v,
                    None => g
                        .tensor("token_embd.weight")
                        .map(|t| t.dims[1])
                        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
                };
                Ok(Hyper {
                    n_layer: req("block_count")?,
                    d_model,
                    n_head,
                    n_kv_head: g.get_usize(&key("attention.head_count_kv")).unwrap_or(n_head),
                    head_dim: g.get_usize(&key("attention.key_length")).unwrap_or(d_model / n_head),
                    d_ffn: req("feed_forward_length")?,
                    vocab,
                    n_ctx_train: req("context_length")?,
                    norm_eps: g
                        .get_f32(&key("attention.layer_norm_rms_epsilon"))
                        .ok_or_else(|| ModelError::MissingKey(key("attention.layer_norm_rms_epsilon")))?,
                    rope_theta: g.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
                    sliding_window: g.get_usize(&key("attention.sliding_window")),
                })
            }
            Format::Hf(h) => {
                let c = h.config();
                let req = |k: &str| json_usize(c, k).ok_or_else(|| ModelError::MissingKey(format!("config.json: {k}")));
                let n_head = req("num_attention_heads")?;
                let d_model = req("hidden_size")?;
                Ok(Hyper {
                    n_layer: req("num_hidden_layers")?,
                    d_model,
                    n_head,
                    n_kv_head: json_usize(c, "num_key_value_heads").unwrap_or(n_head),
                    head_dim: json_usize(c, "head_dim").unwrap_or(d_model / n_head),
                    d_ffn: req("intermediate_size")?,
                    vocab: req("vocab_size")?,
                    n_ctx_train: req("max_position_embeddings")?,
                    norm_eps: json_f32(c, "rms_norm_eps").unwrap_or(1e-6),
                    rope_theta: hf_rope_theta(c, "full_attention").unwrap_or(10_000.0),
                    // Qwen2 configs name a window but switch it off with `use_sliding_window`.
                    sliding_window: json_usize(c, "sliding_window")
                        .filter(|_| c.get("use_sliding_window").and_then(Json::as_bool) != Some(false)),
                })
            }
        }
    }

    /// Floats in one token's row of the key (or value) cache.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Checks the shapes fit together, so a corrupt file fails at load, not mid-forward.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: &str| Err(ModelError::BadConfig(why.to_string()));
        if self.n_layer == 0 || self.d_model == 0 || self.n_head == 0 || self.head_dim == 0 || self.vocab == 0 {
            return bad("a layer count, width, head count or vocabulary size is zero");
        }
        if self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad("attention heads are not a multiple of key/value heads");
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head dimension is odd, so rotary embeddings cannot pair it");
        }
        Ok(())
    }
}

/// The RoPE base of one kind of layer in a Hugging Face config: transformers 5 writes
/// `rope_parameters` (per layer kind where kinds differ), older configs `rope_theta`
/// and, for Gemma 3's sliding layers, `rope_local_base_freq`.
pub(crate) fn hf_rope_theta(c: &Json, layer_kind: &str) -> Option<f32> {
    let params = c.get("rope_parameters");
    let from_params = params
        .and_then(|p| p.get(layer_kind).or(Some(p)))
        .and_then(|p| p.get("rope_theta"))
        .and_then(Json::as_f64);
    let legacy = match layer_kind {
        "sliding_attention" => "rope_local_base_freq",
        _ => "rope_theta",
    };
    from_params.or_else(|| c.get(legacy)?.as_f64()).map(|v| v as f32)
}

pub(crate) fn json_usize(c: &Json, key: &str) -> Option<usize> {
    c.get(key)?.as_u64().map(|v| v as usize)
}

pub(crate) fn json_f32(c: &Json, key: &str) -> Option<f32> {
    c.get(key)?.as_f64().map(|v| v as f32)
}
