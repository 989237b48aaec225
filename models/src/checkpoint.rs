//! A model file opened for loading: a GGUF file, or a Hugging Face safetensors directory
//! whose tensor names are translated to GGUF's, so architecture files ask for one naming.

use std::path::Path;

use kiln_runtime::{GgmlType, HostBytes, WeightSource};

use crate::gguf::GgufFile;
use crate::safetensors::SafetensorsCheckpoint;
use crate::ModelError;

pub struct Checkpoint {
    /// The architecture in GGUF's spelling: `llama`, `qwen2`, `qwen3`, `gemma3`.
    pub arch: String,
    pub format: Format,
}

pub enum Format {
    Gguf(GgufFile),
    Hf(SafetensorsCheckpoint),
}

impl Checkpoint {
    /// Opens a `.gguf` file or a directory holding `config.json` and safetensors.
    pub fn open(path: &Path) -> Result<Checkpoint, ModelError> {
        let format = if path.is_dir() {
            Format::Hf(SafetensorsCheckpoint::open(path)?)
        } else if path.exists() {
            let file = GgufFile::open(path).map_err(|source| ModelError::File {
                path: path.display().to_string(),
                source,
            })?;
            Format::Gguf(file)
        } else {
            return Err(ModelError::NotFound(path.display().to_string()));
        };
        Ok(Checkpoint {
            arch: architecture(&format)?,
            format,
        })
    }

    /// Whether a tensor with this GGUF name exists.
    pub fn has(&self, name: &str) -> bool {
        match &self.format {
            Format::Gguf(g) => g.tensor(name).is_some(),
            Format::Hf(h) => h.has(&hf_name(name, &self.arch)),
        }
    }

    /// A tensor by its GGUF name.
    pub fn weight(&self, name: &str) -> Result<WeightSource, ModelError> {
        if !self.has(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        match &self.format {
            Format::Gguf(g) => Ok(g.weight(name)?),
            Format::Hf(h) => {
                let mut w = h.weight(&hf_name(name, &self.arch))?;
                w.name = name.to_string();
                if self.arch == "gemma3" && name.ends_with("norm.weight") {
                    w = gemma_norm_offset(w);
                }
                Ok(w)
            }
        }
    }

    /// Whether rotary embeddings pair adjacent dimensions for a Llama checkpoint: GGUF's
    /// converter permutes Llama's q/k rows for that, Hugging Face keeps the NeoX halves.
    pub fn llama_rope_is_interleaved(&self) -> bool {
        matches!(self.format, Format::Gguf(_))
    }
}

/// The architecture name in GGUF's spelling.
fn architecture(format: &Format) -> Result<String, ModelError> {
    match format {
        Format::Gguf(g) => Ok(g.architecture()?.to_string()),
        Format::Hf(h) => {
            let model_type = h
                .config()
                .get("model_type")
                .and_then(|v| v.as_str())
                .ok_or_else(|| ModelError::MissingKey("config.json: model_type".into()))?;
            Ok(match model_type {
                "gemma3_text" => "gemma3",
                other => other,
            }
            .to_string())
        }
    }
}

/// Hugging Face Gemma RMSNorms scale by `1 + weight`; GGUF stores the sum, so the
/// forward pass stays one plain RMSNorm.
fn gemma_norm_offset(w: WeightSource) -> WeightSource {
    let mut values = vec![0f32; w.rows * w.cols];
    kiln_kernels::dequant::dequantize_row(w.ty, w.bytes.as_slice(), &mut values);
    let bytes = values.iter().flat_map(|v| (v + 1.0).to_le_bytes()).collect();
    WeightSource {
        ty: GgmlType::F32,
        bytes: HostBytes::from_vec(bytes),
        ..w
    }
}

/// The Hugging Face name of a tensor given its GGUF name.
fn hf_name(gguf: &str, arch: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, tensor)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let (stem, suffix) = tensor.rsplit_once('.').unwrap_or((tensor, "weight"));
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        // Both namings call the norm before the FFN `ffn_norm`'s counterpart, but HF's
        // Llama-style blocks name it post-attention while Gemma has four norms per block.
        "ffn_norm" if arch == "gemma3" => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        other => other,
    };
    format!("model.layers.{layer}.{hf}.{suffix}")
}
