//! kiln: an on-device LLM engine. Load a model once with [`Engine::load`], open
//! lightweight [`Session`]s on it, and generate.
//!
//! ```no_run
//! use kiln::{Engine, EngineOptions, GenerateOptions, Sampling, SessionOptions};
//! let engine = Engine::load("smollm2-135m-instruct", EngineOptions::default())?;
//! let mut session = engine.session(SessionOptions::default());
//! let options = GenerateOptions { max_tokens: 32, sampling: Sampling::greedy(), ..Default::default() };
//! println!("{}", session.generate("The capital of France is", &options)?.text);
//! # Ok::<(), kiln::EngineError>(())
//! ```

pub use kiln_engine::perplexity::PerplexityReport;
pub use kiln_engine::registry;
pub use kiln_engine::{
    CancelToken, Conversation, ConversationOptions, ConversationStats, Engine, EngineError, EngineOptions,
    FinishReason, GenerateOptions, Generation, GenerationStream, KvBudget, KvPolicy, KvStats, Message, PoolCounts,
    Reply, Role, Sampling, Session, SessionCheckpoint, SessionOptions, StreamEvent, Timings, ToolCall,
};

/// The layers below the engine, for tools and tests that drive a model directly.
pub use kiln_models as models;
pub use kiln_runtime as runtime;
