//! kiln-engine: loads a model once (weights, tokenizer, chat template) and serves many
//! lightweight sessions on it: tokenization, a paged key/value cache with prefix reuse,
//! one engine loop that batches every session's work, sampling, stopping and streaming.
//! The engine drives models through the runtime's backend and knows no kernel.

pub mod conversation;
mod kv;
pub mod perplexity;
pub mod registry;
pub mod sampling;
mod scheduler;
mod session;
mod state_file;
pub mod text;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_models::tokenizer::TokenizerInfo;
use kiln_models::{Checkpoint, KvLayout, KvStore, Model, ModelError, Scratch};
use kiln_runtime::BackendChoice;

pub use conversation::{Conversation, ConversationOptions, ConversationStats, Message, Reply, Role, ToolCall};
pub use kv::PoolCounts;
pub use sampling::Sampling;
pub use scheduler::CancelToken;
pub use session::{
    Checkpoint as SessionCheckpoint, FinishReason, GenerateOptions, Generation, GenerationStream, Session,
    SessionOptions, StreamEvent, Timings,
};

use scheduler::{Core, Device, State};

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
    #[error("the key/value cache budget is used up by other sessions (raise `kv_budget`, or end sessions)")]
    KvExhausted,
    #[error("the session is busy with another generation")]
    Busy,
    #[error("the engine loop stopped")]
    Stopped,
    #[error("session file {path}: {reason}")]
    SessionFile { path: String, reason: String },
    #[error("the model has no chat template (give one, or use plain completion)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("conversation file {path}: {reason}")]
    ConversationFile { path: String, reason: String },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What a request does when the key/value cache has no free page for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPolicy {
    /// Fail it with [`EngineError::KvExhausted`]; other sessions go on.
    Fail,
    /// Hold it until other sessions release pages.
    Wait,
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Context length of each session; default: the model's, capped at 4096.
    pub n_ctx: Option<usize>,
    /// CPU threads; default: all cores.
    pub threads: Option<usize>,
    /// Most prompt tokens run in one forward pass; longer prompts are prefilled in chunks
    /// of this many, interleaved with other sessions' decode steps. Default 512, as
    /// llama.cpp's micro-batch: prefill of 512 tokens measured 256 → 512 on the CPU (this
    /// 2-core VM) SmolLM2 1574/1638 → 1668/1682 tokens/s, Gemma 3 1516/1677 →
    /// 1737/1773; on an H200, Qwen2-0.5B shape 12.8k → 18.7k, Llama-8B 1.88k → 2.04k.
    pub max_batch: usize,
    /// Most sessions decoding in one forward pass.
    pub max_sessions_per_step: usize,
    /// Size of the key/value cache, allocated once as pages; default: two full contexts.
    pub kv_budget: Option<KvBudget>,
    /// Tokens per cache page.
    pub page_size: usize,
    /// Keep full pages of finished sessions to reuse for prompts that start the same way.
    pub prefix_cache: bool,
    /// Keep every position of sliding-window layers (Gemma 3's local layers), as
    /// llama.cpp's `--swa-full` does. By default their pages are let go once no later
    /// query sees them, so a long context takes a fraction of the memory; the price is
    /// that rewinding a context to before its last window recomputes it.
    pub full_window_cache: bool,
    pub when_kv_full: KvPolicy,
    /// Which backend runs the model: a real GPU when there is one (`Auto`), or forced.
    pub backend: BackendChoice,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_ctx: None,
            threads: None,
            max_batch: 512,
            max_sessions_per_step: 16,
            kv_budget: None,
            page_size: 64,
            prefix_cache: true,
            full_window_cache: false,
            when_kv_full: KvPolicy::Fail,
            backend: BackendChoice::Auto,
        }
    }
}

/// How much key/value cache to allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBudget {
    /// At most this many bytes.
    Bytes(usize),
    /// Room for this many tokens (rounded up to whole pages).
    Tokens(usize),
}

/// The key/value cache's size and use.
#[derive(Clone, Copy, Debug)]
pub struct KvStats {
    pub page_size: usize,
    pub page_bytes: usize,
    /// Bytes allocated for the pool: `pages.total * page_bytes`, within the budget.
    pub pool_bytes: usize,
    pub pages: PoolCounts,
}

/// A loaded model, shared by every session made from it. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    chat_template: Option<String>,
    load_time: Duration,
    page_size: usize,
    /// What saved session files are checked against, computed on first use.
    fingerprint: OnceLock<u64>,
    core: Arc<Core>,
    worker: Option<JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.core.lock_state().shutdown = true;
        self.core.work.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Engine {
    /// Loads a GGUF file, a Hugging Face checkpoint directory, or a pulled model by name.
    pub fn load(path_or_name: &str, options: EngineOptions) -> Result<Engine> {
        let started = Instant::now();
        let path = registry::resolve(path_or_name)?;
        let checkpoint = Checkpoint::open(&path)?;
        let (mut be, reason) =
            kiln_runtime::open_backend(options.backend, options.threads).map_err(ModelError::from)?;
        let model = kiln_models::load_model(&checkpoint, be.as_mut())?;
        let tokenizer = kiln_models::load_tokenizer(&checkpoint)?;
        let chat_template = kiln_models::chat_template(&checkpoint);
        let hyper = model.hyper();
        let n_ctx = options.n_ctx.unwrap_or(hyper.n_ctx_train.min(4096));
        let invalid = |m: &str| Err(EngineError::InvalidOption(m.into()));
        if n_ctx == 0 || options.max_batch == 0 || options.max_sessions_per_step == 0 {
            return invalid("context length, batch size and sessions per step must be positive");
        }
        if options.page_size == 0 || options.page_size > 4096 {
            return invalid("page size must be 1..=4096 tokens");
        }
        let layout = if options.full_window_cache {
            KvLayout::single(hyper.n_layer)
        } else {
            KvLayout::by_window(&model.layer_windows())
        };
        let page_bytes = KvStore::page_bytes(be.as_ref(), hyper, &layout, options.page_size);
        let n_pages = match options.kv_budget.unwrap_or(KvBudget::Tokens(2 * n_ctx)) {
            KvBudget::Bytes(bytes) => bytes / page_bytes,
            // A page holds one group of layers: every group's page for each position.
            KvBudget::Tokens(tokens) => layout.groups() * tokens.div_ceil(options.page_size),
        };
        if n_pages == 0 {
            return Err(EngineError::InvalidOption(format!(
                "the key/value budget holds no page ({page_bytes} bytes of {} tokens)",
                options.page_size
            )));
        }
        let chunk = options.max_batch.min(n_ctx);
        let max_seqs = options.max_sessions_per_step;
        // A step holds one prompt chunk and one decode token per other session; each
        // sequence wants one row of logits.
        let scratch = Scratch::new(be.as_mut(), hyper, chunk + max_seqs, max_seqs + 1);
        let pool = kv::PagePool::new(n_pages, options.page_size, options.prefix_cache, layout.windows.clone());
        let store = KvStore::new(be.as_mut(), hyper, layout, n_pages, options.page_size);
        let core = Arc::new(Core {
            model,
            tokenizer,
            n_ctx,
            chunk,
            max_seqs,
            policy: options.when_kv_full,
            device: Mutex::new(Device { be, scratch, store }),
            state: Mutex::new(State::new(pool)),
            work: Default::default(),
        });
        let worker = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("kiln-engine".into())
                .spawn(move || scheduler::run_worker(core))
                .map_err(|e| EngineError::InvalidOption(format!("cannot start the engine thread: {e}")))?
        };
        // Once loaded, so that a load error stays the only line on stderr.
        eprintln!("kiln: {reason}");
        Ok(Engine {
            shared: Arc::new(Shared {
                name: model_name(&path),
                chat_template,
                load_time: started.elapsed(),
                page_size: options.page_size,
                fingerprint: OnceLock::new(),
                core,
                worker: Some(worker),
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
        self.shared.core.n_ctx
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
        self.tokenizer()
            .encode(text)
            .map_err(|e| EngineError::Tokenize(e.to_string()))
    }

    /// The exact bytes that token ids stand for.
    pub fn decode_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        self.tokenizer().decode_bytes(tokens)
    }

    pub fn tokenizer(&self) -> &TokenizerInfo {
        &self.shared.core.tokenizer
    }

    pub fn model(&self) -> &dyn Model {
        self.shared.core.model.as_ref()
    }

    /// The key/value cache's geometry and how many pages are used, cached and free.
    pub fn kv_stats(&self) -> KvStats {
        let core = &self.shared.core;
        let page_bytes = core.lock_device().store.bytes_per_page();
        let pages = core.lock_state().pool.counts();
        KvStats {
            page_size: self.shared.page_size,
            page_bytes,
            pool_bytes: pages.total * page_bytes,
            pages,
        }
    }

    /// Drops the cached prefixes no session holds (their pages become free).
    pub fn clear_prefix_cache(&self) {
        self.shared.core.lock_state().pool.clear_cache();
    }

    pub(crate) fn core(&self) -> &Core {
        &self.shared.core
    }

    pub(crate) fn page_size(&self) -> usize {
        self.shared.page_size
    }

    pub(crate) fn fingerprint(&self) -> u64 {
        *self
            .shared
            .fingerprint
            .get_or_init(|| state_file::fingerprint(&self.shared.core))
    }
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}
