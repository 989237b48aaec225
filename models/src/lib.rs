//! kiln-models: reading model files (GGUF, Hugging Face safetensors checkpoints), building
//! their tokenizers, and one forward pass per architecture written against the runtime's
//! backend interface. Models know nothing about sessions or scheduling.

pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod gemma3;
pub mod gguf;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod safetensors;
pub mod tokenizer;

use kiln_runtime::{Backend, BufId};

pub use blocks::{KvCache, KvLayout, KvStore, LayerKv, Scratch, SeqInput};
pub use checkpoint::Checkpoint;
pub use config::Hyper;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {0}")]
    NotFound(String),
    #[error("{path}: {source}")]
    File { path: String, source: gguf::GgufError },
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafetensorsError),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("unknown architecture `{0}` (kiln runs llama, qwen2, qwen3, gemma3)")]
    UnknownArchitecture(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("missing metadata `{0}`")]
    MissingKey(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: (usize, usize),
        expected: (usize, usize),
    },
    #[error("bad model configuration: {0}")]
    BadConfig(String),
}

/// A decoder-only language model ready to run on a backend.
pub trait Model: Send + Sync {
    fn hyper(&self) -> &Hyper;

    /// Runs one forward pass over a batch of sequences: each sequence's tokens at its
    /// positions, storing their keys and values in `kv` where its page table says, and
    /// attending over what its table already holds. Returns a buffer holding the logits
    /// of each sequence's last `n_logits` tokens, sequence after sequence (rows of `vocab`
    /// floats). The batch must fit the scratch, and page tables must cover the positions.
    fn forward(&self, be: &mut dyn Backend, kv: &KvStore, scratch: &mut Scratch, batch: &[SeqInput]) -> BufId;

    /// The attention window of each layer (`None`: it sees every earlier position); the
    /// cache lets go of what no later query of a windowed layer sees.
    fn layer_windows(&self) -> Vec<Option<usize>> {
        vec![None; self.hyper().n_layer]
    }
}

/// Builds the model a checkpoint holds, uploading its weights to `be`.
pub fn load_model(ck: &Checkpoint, be: &mut dyn Backend) -> Result<Box<dyn Model>, ModelError> {
    type Loader = fn(&Checkpoint, Hyper, &mut dyn Backend) -> Result<Box<dyn Model>, ModelError>;
    let load: Loader = match ck.arch.as_str() {
        "llama" => |ck, h, be| Ok(Box::new(llama::load(ck, h, be)?)),
        "qwen2" => |ck, h, be| Ok(Box::new(qwen2::load(ck, h, be)?)),
        "qwen3" => |ck, h, be| Ok(Box::new(qwen3::load(ck, h, be)?)),
        "gemma3" => |ck, h, be| Ok(Box::new(gemma3::load(ck, h, be)?)),
        other => return Err(ModelError::UnknownArchitecture(other.to_string())),
    };
    let hyper = Hyper::read(ck)?;
    hyper.validate()?;
    load(ck, hyper, be)
}

/// The tokenizer of a checkpoint: built from GGUF metadata, or a checkpoint directory's
/// `tokenizer.json`.
pub fn load_tokenizer(ck: &Checkpoint) -> Result<tokenizer::TokenizerInfo, ModelError> {
    Ok(match &ck.format {
        checkpoint::Format::Gguf(g) => tokenizer::TokenizerInfo::from_gguf(g)?,
        checkpoint::Format::Hf(h) => tokenizer::from_tokenizer_json(h.dir(), None)?,
    })
}

/// The chat template a checkpoint carries: GGUF's `tokenizer.chat_template`, or
/// `chat_template` in a checkpoint directory's `tokenizer_config.json`.
pub fn chat_template(ck: &Checkpoint) -> Option<String> {
    match &ck.format {
        checkpoint::Format::Gguf(g) => g.get_str("tokenizer.chat_template").map(str::to_string),
        checkpoint::Format::Hf(h) => {
            let text = std::fs::read_to_string(h.dir().join("tokenizer_config.json")).ok()?;
            let config: serde_json::Value = serde_json::from_str(&text).ok()?;
            config.get("chat_template")?.as_str().map(str::to_string)
        }
    }
}
