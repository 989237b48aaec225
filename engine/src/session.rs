//! A session: one sequence's context (its tokens and its pages of the key/value cache)
//! on a shared engine, and generation from it — blocking, with a callback, or as an
//! async stream — plus forking, checkpoints and direct forward passes.

use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::kv::PageCopy;
use crate::sampling::{Sampler, Sampling};
use crate::scheduler::{CancelToken, Job, Seq, Sink};
use crate::text::{StopMatcher, Utf8Stream};
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
    /// Stop at the model's end-of-generation tokens (true unless benchmarking).
    pub stop_at_eog: bool,
    /// Cancels the generation from elsewhere.
    pub cancel: Option<CancelToken>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: Sampling::default(),
            stop: Vec::new(),
            stop_at_eog: true,
            cancel: None,
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
    /// The generation was cancelled.
    Cancelled,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache, not computed.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// From the call to the first generated token's logits (tokenize, wait, prefill).
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

/// An item of [`Session::stream`]: new text (always whole UTF-8 characters), then the
/// finished generation.
#[derive(Clone, Debug)]
pub enum StreamEvent {
    Text(String),
    Done(Generation),
}

/// What the worker sends a blocking caller.
pub(crate) enum Event {
    Text(String),
    Done(Result<Generation>),
}

/// A point in a session's context to come back to with [`Session::rewind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    session: u64,
    len: usize,
}

pub struct Session {
    pub(crate) engine: Engine,
    pub(crate) id: u64,
    /// `feed`'s buffers, sized once: its last logits, the tokens it runs, its page table
    /// and the page copies it asks for.
    logits: Vec<f32>,
    pending: Vec<u32>,
    table: Vec<u32>,
    copies: Vec<PageCopy>,
}

impl Session {
    pub(crate) fn new(engine: Engine, _options: SessionOptions) -> Session {
        let core = engine.core();
        let id = {
            let mut state = core.lock_state();
            let seq = Seq::new(core.n_ctx, &state.pool);
            let id = state.next_id;
            state.next_id += 1;
            state.seqs.insert(id, seq);
            id
        };
        Self::with_id(engine, id)
    }

    fn with_id(engine: Engine, id: u64) -> Session {
        let core = engine.core();
        let table_len = core.lock_state().pool.groups() * (core.n_ctx.div_ceil(engine.page_size()) + 1);
        Session {
            logits: vec![0.0; core.model.hyper().vocab],
            pending: Vec::with_capacity(core.chunk),
            table: Vec::with_capacity(table_len),
            copies: Vec::with_capacity(4),
            id,
            engine,
        }
    }

    /// Runs `f` on this session's sequence.
    fn with_seq<T>(&self, f: impl FnOnce(&mut crate::kv::PagePool, &mut Seq) -> T) -> T {
        let mut state = self.engine.core().lock_state();
        let state = &mut *state;
        let seq = state.seqs.get_mut(&self.id).expect("a live session has a sequence");
        f(&mut state.pool, seq)
    }

    /// The tokens in this session's context.
    pub fn tokens(&self) -> Vec<u32> {
        self.with_seq(|_, seq| seq.tokens.clone())
    }

    /// Pages of the key/value cache this session's context holds (shared ones included).
    pub fn kv_pages(&self) -> usize {
        self.with_seq(|_, seq| seq.pages.held())
    }

    /// Continues the context with `prompt` and generates a reply to it.
    pub fn generate(&mut self, prompt: &str, options: &GenerateOptions) -> Result<Generation> {
        self.generate_with(prompt, options, |_| {})
    }

    /// [`Session::generate`], handing each piece of text to `on_text` as it is generated
    /// (on this thread; pieces are whole UTF-8 characters).
    pub fn generate_with(
        &mut self,
        prompt: &str,
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let started = Instant::now();
        let tokens = self.prompt_tokens(prompt)?;
        let (tx, rx) = mpsc::channel();
        self.submit(&tokens, options, Sink::Blocking { tx, deltas: true }, started)?;
        wait(rx, &mut on_text)
    }

    /// Continues the context with `prompt` token ids (BOS is not added) and generates.
    pub fn generate_from_tokens(&mut self, prompt: &[u32], options: &GenerateOptions) -> Result<Generation> {
        let (tx, rx) = mpsc::channel();
        self.submit(prompt, options, Sink::Blocking { tx, deltas: false }, Instant::now())?;
        wait(rx, &mut |_| {})
    }

    /// [`Session::generate_from_tokens`], handing each piece of text to `on_text` as it
    /// is generated.
    pub fn generate_from_tokens_with(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let (tx, rx) = mpsc::channel();
        self.submit(prompt, options, Sink::Blocking { tx, deltas: true }, Instant::now())?;
        wait(rx, &mut on_text)
    }

    /// Starts generating a reply to `prompt` and returns its text as an async stream
    /// (`futures::Stream`, usable from tokio): [`StreamEvent::Text`] pieces, then
    /// [`StreamEvent::Done`] (or an error). Dropping the stream cancels the generation.
    /// The session is busy until the stream ends.
    pub fn stream(&mut self, prompt: &str, options: &GenerateOptions) -> Result<GenerationStream> {
        let started = Instant::now();
        let tokens = self.prompt_tokens(prompt)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = options.cancel.clone().unwrap_or_default();
        let options = GenerateOptions {
            cancel: Some(cancel.clone()),
            ..options.clone()
        };
        self.submit(&tokens, &options, Sink::Stream(tx), started)?;
        Ok(GenerationStream { rx, cancel })
    }

    fn prompt_tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        let tok = self.engine.tokenizer();
        let mut tokens = Vec::new();
        if tok.add_bos && self.with_seq(|_, seq| seq.tokens.is_empty()) {
            tokens.extend(tok.bos);
        }
        tokens.extend(self.engine.encode(prompt)?);
        Ok(tokens)
    }

    /// Hands a generation to the engine loop.
    fn submit(&mut self, prompt: &[u32], options: &GenerateOptions, sink: Sink, started: Instant) -> Result<()> {
        let core = self.engine.core();
        let vocab = core.model.hyper().vocab;
        if prompt.is_empty() {
            return Err(EngineError::InvalidOption("the prompt is empty".into()));
        }
        if options.max_tokens == 0 {
            return Err(EngineError::InvalidOption("max_tokens must be at least 1".into()));
        }
        options.sampling.validate().map_err(EngineError::InvalidOption)?;
        if let Some((id, _)) = options.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(EngineError::InvalidOption(format!(
                "logit bias for token {id}, outside the vocabulary of {vocab}"
            )));
        }
        check_ids(prompt, vocab)?;
        let mut state = core.lock_state();
        let state = &mut *state;
        let seq = state.seqs.get_mut(&self.id).expect("a live session has a sequence");
        if seq.busy() {
            return Err(EngineError::Busy);
        }
        // One position stays free for the first generated token.
        let needed = seq.tokens.len() + prompt.len() + 1;
        if needed > core.n_ctx {
            return Err(EngineError::ContextOverflow {
                needed,
                n_ctx: core.n_ctx,
            });
        }
        let run_start = seq.pages.len;
        let cached_tokens = if seq.tokens.is_empty() {
            state.pool.attach_prefix(&mut seq.pages, prompt)
        } else {
            0
        };
        seq.tokens.extend_from_slice(prompt);
        let mut sampler = Sampler::new(options.sampling.clone());
        for &t in &seq.tokens {
            sampler.accept(t);
        }
        seq.job = Some(Job {
            sampler,
            max_tokens: options.max_tokens,
            stop_at_eog: options.stop_at_eog,
            generated: Vec::with_capacity(options.max_tokens.min(core.n_ctx)),
            text: String::new(),
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(&options.stop),
            sink,
            cancel: options.cancel.clone().unwrap_or_default(),
            prompt_tokens: prompt.len(),
            cached_tokens,
            prompt_run: run_start..seq.tokens.len(),
            started,
            first_token: None,
            waiting: false,
            delta: String::new(),
        });
        core.work.notify_all();
        Ok(())
    }

    /// Appends `tokens` to the context and runs them through the model, with no
    /// tokenization or sampling, returning the last token's logits (`vocab` floats). For
    /// tools that drive the forward pass directly, such as benchmarks; `generate` is this
    /// plus tokenization, sampling and stopping, scheduled with other sessions.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidOption("no tokens to feed".into()));
        }
        let core = self.engine.core();
        check_ids(tokens, self.logits.len())?;
        // What is pending once the tokens are in is one run, however many chunks compute it.
        let run = {
            let mut state = core.lock_state();
            let seq = state.seqs.get_mut(&self.id).expect("a live session has a sequence");
            if seq.busy() {
                return Err(EngineError::Busy);
            }
            let needed = seq.tokens.len() + tokens.len();
            if needed > core.n_ctx {
                return Err(EngineError::ContextOverflow {
                    needed,
                    n_ctx: core.n_ctx,
                });
            }
            seq.tokens.extend_from_slice(tokens);
            (seq.pages.len, seq.tokens.len())
        };
        let page_size = self.engine.page_size();
        let page_floats = core.page_floats();
        loop {
            // Plan a chunk: the pending tokens up to the next chunk boundary.
            let start = {
                let mut state = core.lock_state();
                let state = &mut *state;
                let seq = state.seqs.get_mut(&self.id).expect("a live session has a sequence");
                let start = seq.pages.len;
                if start == seq.tokens.len() {
                    break;
                }
                let end = seq.tokens.len().min(start - start % core.chunk + core.chunk);
                self.copies.clear();
                if state.pool.reserve(&mut seq.pages, end, &mut self.copies).is_err() {
                    // The context keeps what was computed; the rest is not in it.
                    seq.tokens.truncate(start);
                    return Err(EngineError::KvExhausted);
                }
                seq.in_flight = true;
                self.pending.clear();
                self.pending.extend_from_slice(&seq.tokens[start..end]);
                self.table.clear();
                seq.pages.tables_for(end, page_size, &mut self.table);
                start
            };
            {
                let mut device = core.lock_device();
                let device = &mut *device;
                device.copy_pages(&self.copies, page_floats);
                let input = kiln_models::SeqInput {
                    tokens: &self.pending,
                    start,
                    run,
                    pages: &self.table,
                    n_logits: 1,
                };
                let out = core
                    .model
                    .forward(device.be.as_mut(), &device.store, &mut device.scratch, &[input]);
                device.be.read(out, 0, &mut self.logits);
            }
            let mut state = core.lock_state();
            let state = &mut *state;
            let seq = state.seqs.get_mut(&self.id).expect("a live session has a sequence");
            seq.in_flight = false;
            state
                .pool
                .commit(&mut seq.pages, start + self.pending.len(), &seq.tokens);
        }
        Ok(&self.logits)
    }

    /// A new session with this one's context, sharing its cache pages until one of them
    /// writes (copy-on-write): forking costs no pages and no computation.
    pub fn fork(&self) -> Result<Session> {
        let core = self.engine.core();
        let id = {
            let mut state = core.lock_state();
            let state = &mut *state;
            let seq = state.seqs.get(&self.id).expect("a live session has a sequence");
            if seq.busy() {
                return Err(EngineError::Busy);
            }
            let mut copy = Seq::new(core.n_ctx, &state.pool);
            copy.tokens.extend_from_slice(&seq.tokens);
            copy.pages = state.pool.fork(&seq.pages);
            let id = state.next_id;
            state.next_id += 1;
            state.seqs.insert(id, copy);
            id
        };
        Ok(Self::with_id(self.engine.clone(), id))
    }

    /// The current end of the context, to [`Session::rewind`] to later.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            session: self.id,
            len: self.with_seq(|_, seq| seq.tokens.len()),
        }
    }

    /// Forgets everything after `checkpoint` (taken on this session, before the context
    /// got shorter than it).
    pub fn rewind(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        if checkpoint.session != self.id {
            return Err(EngineError::InvalidOption(
                "the checkpoint is not of this session's current context".into(),
            ));
        }
        self.truncate(checkpoint.len)
    }

    /// Keeps the first `len` tokens of the context and forgets the rest.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.with_seq(|pool, seq| {
            if len > seq.tokens.len() {
                return Err(EngineError::InvalidOption(format!(
                    "cannot keep {len} tokens of a context of {}",
                    seq.tokens.len()
                )));
            }
            if seq.busy() {
                return Err(EngineError::Busy);
            }
            seq.tokens.truncate(len);
            pool.truncate(&mut seq.pages, len);
            if seq.pages.len == 0 && len > 0 {
                // A sliding window had let go of pages the shorter context needs: take
                // what the prefix cache still has; the rest is recomputed before the next
                // token.
                pool.attach_prefix(&mut seq.pages, &seq.tokens);
            }
            Ok(())
        })
    }

    /// Forgets the context.
    pub fn reset(&mut self) {
        self.with_seq(|pool, seq| {
            if let Some(job) = &seq.job {
                job.cancel.cancel();
            }
            if !seq.busy() {
                seq.tokens.clear();
                pool.release(&mut seq.pages);
            }
        });
        self.engine.core().work.notify_all();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let core = self.engine.core();
        let mut state = core.lock_state();
        let state = &mut *state;
        let Some(seq) = state.seqs.get_mut(&self.id) else {
            return;
        };
        if let Some(job) = &seq.job {
            job.cancel.cancel();
        }
        if seq.in_flight || seq.job.is_some() {
            // The worker releases it when its pass is over.
            seq.dropped = true;
        } else {
            state.pool.release(&mut seq.pages);
            state.seqs.remove(&self.id);
        }
        core.work.notify_all();
    }
}

fn check_ids(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|t| **t as usize >= vocab) {
        Some(bad) => Err(EngineError::InvalidOption(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Waits for a blocking generation's events.
fn wait(rx: mpsc::Receiver<Event>, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    loop {
        match rx.recv() {
            Ok(Event::Text(text)) => on_text(&text),
            Ok(Event::Done(result)) => return result,
            Err(_) => return Err(EngineError::Stopped),
        }
    }
}

/// The async stream of [`Session::stream`].
pub struct GenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<StreamEvent>>,
    cancel: CancelToken,
}

impl GenerationStream {
    /// Stops the generation before its next decode step; the stream then ends with
    /// [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl futures_core::Stream for GenerationStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
