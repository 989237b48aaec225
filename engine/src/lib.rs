//! kiln-engine: loads a model once (weights, tokenizer, chat template) and runs
//! lightweight sessions on it: tokenization, prefill, decode, sampling and stopping.
//! The engine drives models through the runtime's backend and knows no kernel.

pub mod perplexity;
pub mod registry;
pub mod sampling;
mod session;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_models::tokenizer::TokenizerInfo;
use kiln_models::{Checkpoint, Model, ModelError, Scratch};
use kiln_runtime::{Backend, CpuBackend};

pub use sampling::Sampling;
pub use session::{FinishReason, GenerateOptions, Generation, Session, SessionOptions, Timings};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("unknown model `{0}`: not a file, not in the cache, and not a name kiln can pull (see `kiln models`)")]
    UnknownModel(String),
    #[error("model `{0}` is not in the cache yet: run `kiln pull {0}`")]
    NotPulled(String),
    #[error("pull failed: {0}")]
    Pull(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("the prompt needs {needed} tokens but the context holds {n_ctx}")]
    ContextOverflow { needed: usize, n_ctx: usize },
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Context length of each session; default: the model's, capped at 4096.
    pub n_ctx: Option<usize>,
    /// CPU threads; default: all cores.
    pub threads: Option<usize>,
    /// Most tokens run in one forward pass; longer prompts are prefilled in chunks.
    pub max_batch: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_ctx: None,
            threads: None,
            max_batch: 256,
        }
    }
}

/// A loaded model, shared by every session made from it. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    model: Box<dyn Model>,
    tokenizer: TokenizerInfo,
    chat_template: Option<String>,
    n_ctx: usize,
    max_batch: usize,
    load_time: Duration,
    device: Mutex<Device>,
}

/// The backend and the scratch buffers of its forward passes; one pass runs at a time.
pub(crate) struct Device {
    pub be: Box<dyn Backend>,
    pub scratch: Scratch,
}

impl Engine {
    /// Loads a GGUF file, a Hugging Face checkpoint directory, or a pulled model by name.
    pub fn load(path_or_name: &str, options: EngineOptions) -> Result<Engine> {
        let started = Instant::now();
        let path = registry::resolve(path_or_name)?;
        let checkpoint = Checkpoint::open(&path)?;
        let mut be: Box<dyn Backend> = Box::new(CpuBackend::new(options.threads));
        let model = kiln_models::load_model(&checkpoint, be.as_mut())?;
        let tokenizer = kiln_models::load_tokenizer(&checkpoint)?;
        let chat_template = kiln_models::chat_template(&checkpoint);
        let hyper = model.hyper();
        let n_ctx = options.n_ctx.unwrap_or(hyper.n_ctx_train.min(4096));
        if n_ctx == 0 || options.max_batch == 0 {
            return Err(EngineError::InvalidOption(
                "context length and batch size must be positive".into(),
            ));
        }
        let max_batch = options.max_batch.min(n_ctx);
        let scratch = Scratch::new(be.as_mut(), hyper, max_batch, 1);
        Ok(Engine {
            shared: Arc::new(Shared {
                name: model_name(&path),
                model,
                tokenizer,
                chat_template,
                n_ctx,
                max_batch,
                load_time: started.elapsed(),
                device: Mutex::new(Device { be, scratch }),
            }),
        })
    }

    /// A new session with an empty context.
    pub fn session(&self, options: SessionOptions) -> Session {
        Session::new(self.clone(), options)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn n_ctx(&self) -> usize {
        self.shared.n_ctx
    }

    pub fn load_time(&self) -> Duration {
        self.shared.load_time
    }

    /// The chat template the model file carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.shared.chat_template.as_deref()
    }

    /// Token ids of `text`, special tokens in it parsed, without BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.shared
            .tokenizer
            .encode(text)
            .map_err(|e| EngineError::Tokenize(e.to_string()))
    }

    /// The exact bytes that token ids stand for.
    pub fn decode_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        self.shared.tokenizer.decode_bytes(tokens)
    }

    pub fn tokenizer(&self) -> &TokenizerInfo {
        &self.shared.tokenizer
    }

    pub fn model(&self) -> &dyn Model {
        self.shared.model.as_ref()
    }

    pub(crate) fn max_batch(&self) -> usize {
        self.shared.max_batch
    }

    pub(crate) fn device(&self) -> MutexGuard<'_, Device> {
        // A panic mid-forward leaves only scratch contents behind, which the next pass
        // overwrites, so a poisoned lock is safe to take over.
        self.shared.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}
