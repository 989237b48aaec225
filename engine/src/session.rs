//! A session: one sequence's context (its key/value cache and tokens) on a shared engine,
//! and generation from it.

use std::time::{Duration, Instant};

use kiln_models::KvCache;

use crate::sampling::{Sampler, Sampling};
use crate::{Engine, EngineError, Result};

/// Options of a new session.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {}

/// Options of one `generate` call.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops when the text contains one of these; it is not included.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: Sampling::default(),
            stop: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfText,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the call to the first generated token's logits (tokenize + prefill).
    pub prefill: Duration,
    pub decode: Duration,
}

impl Timings {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens after the first (each needs one forward pass).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// What `generate` returns.
#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

pub struct Session {
    engine: Engine,
    cache: Option<KvCache>,
    /// Every token in the context, prompt and generated.
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

impl Session {
    pub(crate) fn new(engine: Engine, _options: SessionOptions) -> Session {
        let (hyper, n_ctx) = (engine.model().hyper().clone(), engine.n_ctx());
        let cache = KvCache::new(engine.device().be.as_mut(), &hyper, n_ctx);
        Session {
            logits: vec![0.0; hyper.vocab],
            engine,
            cache: Some(cache),
            // The context never outgrows n_ctx: one allocation, none while decoding.
            tokens: Vec::with_capacity(n_ctx),
        }
    }

    /// The tokens in this session's context.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Continues the context with `prompt` and generates a reply to it.
    pub fn generate(&mut self, prompt: &str, options: &GenerateOptions) -> Result<Generation> {
        let started = Instant::now();
        let mut prompt_tokens = Vec::new();
        let tok = self.engine.tokenizer();
        if self.tokens.is_empty() && tok.add_bos {
            prompt_tokens.extend(tok.bos);
        }
        prompt_tokens.extend(self.engine.encode(prompt)?);
        self.generate_tokens(&prompt_tokens, options, started)
    }

    /// Continues the context with `prompt` token ids (BOS is not added) and generates.
    pub fn generate_from_tokens(&mut self, prompt: &[u32], options: &GenerateOptions) -> Result<Generation> {
        self.generate_tokens(prompt, options, Instant::now())
    }

    fn generate_tokens(&mut self, prompt: &[u32], options: &GenerateOptions, started: Instant) -> Result<Generation> {
        let n_ctx = self.engine.n_ctx();
        if prompt.is_empty() {
            return Err(EngineError::InvalidOption("the prompt is empty".into()));
        }
        // One position stays free for the first generated token.
        self.check(prompt, 1)?;
        self.run(prompt);
        let prefill = started.elapsed();

        let decode_started = Instant::now();
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut generated = Vec::new();
        let mut finish = FinishReason::MaxTokens;
        let mut stopped_at = None;
        while generated.len() < options.max_tokens {
            let token = sampler.sample(&self.logits);
            if self.engine.tokenizer().is_eog(token) {
                finish = FinishReason::EndOfText;
                break;
            }
            generated.push(token);
            if !options.stop.is_empty() {
                let text = String::from_utf8_lossy(&self.engine.decode_bytes(&generated)).into_owned();
                stopped_at = options.stop.iter().filter_map(|s| text.find(s.as_str())).min();
                if stopped_at.is_some() {
                    finish = FinishReason::StopString;
                    self.tokens.push(token);
                    break;
                }
            }
            if self.tokens.len() + 1 >= n_ctx {
                finish = FinishReason::ContextFull;
                self.tokens.push(token);
                break;
            }
            if generated.len() < options.max_tokens {
                self.run(&[token]);
            } else {
                // In the context, but run only when the session continues.
                self.tokens.push(token);
            }
        }
        let mut text = String::from_utf8_lossy(&self.engine.decode_bytes(&generated)).into_owned();
        if let Some(at) = stopped_at {
            text.truncate(at);
        }
        Ok(Generation {
            text,
            finish_reason: finish,
            timings: Timings {
                prompt_tokens: prompt.len(),
                generated_tokens: generated.len(),
                prefill,
                decode: decode_started.elapsed(),
            },
            tokens: generated,
        })
    }

    /// Appends `tokens` to the context and runs them through the model, with no
    /// tokenization or sampling, returning the last token's logits (`vocab` floats). For
    /// tools that drive the forward pass directly, such as benchmarks; `generate` is this
    /// plus tokenization, sampling and stopping.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidOption("no tokens to feed".into()));
        }
        self.check(tokens, 0)?;
        self.run(tokens);
        Ok(&self.logits)
    }

    /// Checks that `tokens` are in the vocabulary and fit the context with `spare`
    /// positions left over.
    fn check(&self, tokens: &[u32], spare: usize) -> Result<()> {
        let (needed, n_ctx) = (self.tokens.len() + tokens.len() + spare, self.engine.n_ctx());
        if needed > n_ctx {
            return Err(EngineError::ContextOverflow { needed, n_ctx });
        }
        let vocab = self.logits.len();
        match tokens.iter().find(|t| **t as usize >= vocab) {
            Some(bad) => Err(EngineError::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    /// Appends tokens to the context and runs every token not yet run, leaving the last
    /// one's logits in `self.logits`. The caller has checked the tokens.
    fn run(&mut self, new: &[u32]) {
        self.tokens.extend_from_slice(new);
        let cache = self.cache.as_mut().expect("a live session has a cache");
        let model = self.engine.shared.model.as_ref();
        let mut device = self.engine.device();
        let device = &mut *device;
        let pending = &self.tokens[cache.len..];
        let mut logits = None;
        for chunk in pending.chunks(self.engine.max_batch()) {
            logits = Some(model.forward(device.be.as_mut(), cache, &mut device.scratch, chunk, 1));
        }
        if let Some(logits) = logits {
            device.be.read(logits, 0, &mut self.logits);
        }
    }

    /// Forgets the context.
    pub fn reset(&mut self) {
        self.tokens.clear();
        if let Some(cache) = self.cache.as_mut() {
            cache.len = 0;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            cache.free(self.engine.device().be.as_mut());
        }
    }
}
