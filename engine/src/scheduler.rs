//! The engine loop: one worker thread runs every session's generation as a series of
//! forward passes over batches of sequences.
//!
//! Each step takes the decode token of every generating session that is ready (up to
//! `max_seqs`, round-robin when more wait) and one chunk of one prompt being prefilled,
//! and runs them as one forward pass: the weights are read once for all of them, so
//! aggregate throughput grows with the sessions. Prompt chunks end at multiples of the
//! chunk size in absolute positions, so a prompt is split the same way however busy the
//! engine is, and the kernels give each token the same result in any batch: a session's
//! output does not depend on what else runs.
//!
//! Sessions talk to the worker through the shared [`State`] (under a mutex, never held
//! during a forward pass) and get their results through each job's [`Sink`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use kiln_models::tokenizer::TokenizerInfo;
use kiln_models::{KvStore, Model, Scratch, SeqInput};
use kiln_runtime::Backend;

use crate::kv::{Exhausted, PageCopy, PagePool, SeqPages};
use crate::sampling::Sampler;
use crate::session::{Event, FinishReason, Generation, StreamEvent, Timings};
use crate::text::{StopMatcher, Utf8Stream};
use crate::{EngineError, KvPolicy};

/// What the worker thread and the sessions share.
pub(crate) struct Core {
    pub model: Box<dyn Model>,
    pub tokenizer: TokenizerInfo,
    pub n_ctx: usize,
    /// Prompt tokens per chunk.
    pub chunk: usize,
    /// Sequences per step.
    pub max_seqs: usize,
    pub policy: KvPolicy,
    pub device: Mutex<Device>,
    pub state: Mutex<State>,
    /// Signals the worker that there may be work (or that it should stop).
    pub work: Condvar,
}

/// The backend, the key/value pool's storage on it, and the scratch of its forward
/// passes; one pass runs at a time.
pub(crate) struct Device {
    pub be: Box<dyn Backend>,
    pub scratch: Scratch,
    pub store: KvStore,
}

impl Device {
    /// Makes the page copies that copy-on-write asked for, in every slot (a page holds
    /// the same slot of each layer of its group).
    pub fn copy_pages(&mut self, copies: &[PageCopy], page_floats: usize) {
        for &(from, to) in copies {
            for &(k, v) in &self.store.slots {
                for buf in [k, v] {
                    self.be
                        .copy_within(buf, from as usize * page_floats, to as usize * page_floats, page_floats);
                }
            }
        }
    }
}

pub(crate) struct State {
    pub pool: PagePool,
    pub seqs: HashMap<u64, Seq>,
    pub next_id: u64,
    /// Where the next step's round-robin starts.
    rotation: usize,
    pub shutdown: bool,
}

impl State {
    pub fn new(pool: PagePool) -> Self {
        State {
            pool,
            seqs: HashMap::new(),
            next_id: 0,
            rotation: 0,
            shutdown: false,
        }
    }
}

/// A session's sequence.
pub(crate) struct Seq {
    pub pages: SeqPages,
    /// Every token of the context: `pages.len` of them computed, the rest pending.
    pub tokens: Vec<u32>,
    pub job: Option<Job>,
    /// A forward pass over this sequence is running (the worker's or a `feed`).
    pub in_flight: bool,
    /// Its session is gone: release it once no pass uses it.
    pub dropped: bool,
}

impl Seq {
    pub fn new(n_ctx: usize, pool: &PagePool) -> Self {
        Seq {
            pages: pool.new_seq(n_ctx),
            // The context never outgrows n_ctx: one allocation, none while decoding.
            tokens: Vec::with_capacity(n_ctx),
            job: None,
            in_flight: false,
            dropped: false,
        }
    }

    pub fn busy(&self) -> bool {
        self.job.is_some() || self.in_flight
    }
}

/// A cancellation flag shared between a caller and a running generation: once set, the
/// generation stops before its next decode step.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a generation's text and result go.
pub(crate) enum Sink {
    /// A blocking caller; `deltas`: it wants the text as it comes.
    Blocking {
        tx: mpsc::Sender<Event>,
        deltas: bool,
    },
    Stream(tokio::sync::mpsc::UnboundedSender<Result<StreamEvent, EngineError>>),
}

impl Sink {
    fn text(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        // A receiver that hung up has cancelled (or dropped) the generation; nothing to do.
        match self {
            Sink::Blocking { tx, deltas: true } => {
                let _ = tx.send(Event::Text(text.to_string()));
            }
            Sink::Blocking { deltas: false, .. } => {}
            Sink::Stream(tx) => {
                let _ = tx.send(Ok(StreamEvent::Text(text.to_string())));
            }
        }
    }

    fn done(&self, result: Result<Generation, EngineError>) {
        match self {
            Sink::Blocking { tx, .. } => {
                let _ = tx.send(Event::Done(result));
            }
            Sink::Stream(tx) => {
                let _ = tx.send(result.map(StreamEvent::Done));
            }
        }
    }
}

/// One generation in progress.
pub(crate) struct Job {
    pub sampler: Sampler,
    pub max_tokens: usize,
    pub stop_at_eog: bool,
    pub generated: Vec<u32>,
    pub text: String,
    pub utf8: Utf8Stream,
    pub stops: StopMatcher,
    pub sink: Sink,
    pub cancel: CancelToken,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// Positions of the prompt, cached ones included: every chunk of it is computed as
    /// part of this one run (`SeqInput::run`), so its results are the same whether the
    /// prefix cache held its beginning or not.
    pub prompt_run: std::ops::Range<usize>,
    pub started: Instant,
    pub first_token: Option<Instant>,
    /// Set when the pool had no page for it this step and the policy is to wait.
    pub waiting: bool,
    /// Reused buffer for each step's new text.
    pub delta: String,
}

/// One sequence of a step.
struct Entry {
    id: u64,
    start: usize,
    end: usize,
    /// The run its tokens belong to (`SeqInput::run`).
    run: (usize, usize),
    /// Its page table in `Step::pages`.
    pages: std::ops::Range<usize>,
    /// Its tokens in `Step::tokens`.
    tokens: std::ops::Range<usize>,
}

/// A step's plan and buffers, reused from step to step.
#[derive(Default)]
struct Step {
    entries: Vec<Entry>,
    tokens: Vec<u32>,
    pages: Vec<u32>,
    copies: Vec<PageCopy>,
    logits: Vec<f32>,
    /// How many of each row's most likely tokens every sequence of the step needs at
    /// most ([`Sampler::candidates_needed`]), if each needs only those: then the backend
    /// picks the token (one) or selects them (`top`, `top_counts`), and `logits` is
    /// not read.
    candidates: Option<usize>,
    picked: Vec<u32>,
    top: Vec<(u32, f32)>,
    top_counts: Vec<u32>,
    order: Vec<u64>,
}

/// The most candidates a step has the backend select (`Backend::top_k_rows`); samplers
/// that want more see whole rows of logits.
const MAX_TOP_K: usize = 256;

/// The worker thread: plans a step, runs it, hands out its results; sleeps when no
/// session has work. Returns when the engine shuts down.
pub(crate) fn run_worker(core: Arc<Core>) {
    let mut step = Step::default();
    loop {
        {
            let mut state = core.lock_state();
            loop {
                if state.shutdown {
                    return;
                }
                if plan(&core, &mut state, &mut step) {
                    break;
                }
                state = core.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        execute(&core, &mut step);
        let mut state = core.lock_state();
        finish_step(&core, &mut state, &step);
    }
}

impl Core {
    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state is only changed in small steps that leave it consistent, so a panic
        // elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lock_device(&self) -> MutexGuard<'_, Device> {
        // A panic mid-forward leaves only scratch contents behind, which the next pass
        // overwrites.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn page_floats(&self) -> usize {
        self.lock_device().store.page_floats()
    }
}

/// Chooses this step's sequences and makes their pages writable. Returns false when
/// there is nothing to run.
fn plan(core: &Core, state: &mut State, step: &mut Step) -> bool {
    step.entries.clear();
    step.tokens.clear();
    step.pages.clear();
    step.copies.clear();
    step.order.clear();
    let State {
        pool, seqs, rotation, ..
    } = state;
    // Cancelled jobs end here, before they take another step.
    for seq in seqs.values_mut() {
        if seq.job.as_ref().is_some_and(|j| j.cancel.is_cancelled()) && !seq.in_flight {
            let job = seq.job.take().expect("checked");
            finish(job, FinishReason::Cancelled);
        }
    }
    step.order.extend(
        seqs.iter()
            .filter(|(_, s)| s.job.is_some() && !s.in_flight)
            .map(|(id, _)| *id),
    );
    if step.order.is_empty() {
        return false;
    }
    step.order.sort_unstable();
    let n = step.order.len();
    step.order.rotate_left(*rotation % n);
    *rotation = rotation.wrapping_add(1);
    let mut prefill_taken = false;
    for i in 0..n {
        let id = step.order[i];
        let seq = seqs.get_mut(&id).expect("listed");
        let start = seq.pages.len;
        let pending = seq.tokens.len() - start;
        let end = if pending <= 1 {
            if step.entries.len() >= core.max_seqs {
                continue;
            }
            seq.tokens.len()
        } else {
            // One prompt chunk per step, ending on a multiple of the chunk size.
            if prefill_taken {
                continue;
            }
            prefill_taken = true;
            seq.tokens.len().min(start - start % core.chunk + core.chunk)
        };
        if end == start {
            continue;
        }
        let copies_before = step.copies.len();
        match pool.reserve(&mut seq.pages, end, &mut step.copies) {
            Ok(()) => {}
            Err(Exhausted) => {
                step.copies.truncate(copies_before);
                let job = seq.job.as_mut().expect("listed");
                if core.policy == KvPolicy::Wait {
                    job.waiting = true;
                } else {
                    let job = seq.job.take().expect("listed");
                    job.sink.done(Err(EngineError::KvExhausted));
                }
                continue;
            }
        }
        seq.job.as_mut().expect("listed").waiting = false;
        seq.in_flight = true;
        let pages_before = step.pages.len();
        seq.pages.tables_for(end, pool.page_size(), &mut step.pages);
        let pages = pages_before..step.pages.len();
        let tokens = step.tokens.len()..step.tokens.len() + (end - start);
        step.tokens.extend_from_slice(&seq.tokens[start..end]);
        let run = &seq.job.as_ref().expect("listed").prompt_run;
        step.entries.push(Entry {
            id,
            start,
            end,
            run: if run.contains(&start) {
                (run.start, run.end)
            } else {
                (start, end)
            },
            pages,
            tokens,
        });
    }
    step.candidates = step.entries.iter().try_fold(1, |most, e| {
        let needed = seqs[&e.id].job.as_ref()?.sampler.candidates_needed()?;
        Some(needed.max(most)).filter(|&k| k <= MAX_TOP_K)
    });
    !step.entries.is_empty()
}

/// Runs a planned step's forward pass and reads back each sequence's last logits.
fn execute(core: &Core, step: &mut Step) {
    let vocab = core.model.hyper().vocab;
    let page_floats = core.page_floats();
    let mut device = core.lock_device();
    let device = &mut *device;
    device.copy_pages(&step.copies, page_floats);
    let inputs: Vec<SeqInput> = step
        .entries
        .iter()
        .map(|e| SeqInput {
            tokens: &step.tokens[e.tokens.clone()],
            start: e.start,
            run: e.run,
            pages: &step.pages[e.pages.clone()],
            n_logits: 1,
        })
        .collect();
    let out = core
        .model
        .forward(device.be.as_mut(), &device.store, &mut device.scratch, &inputs);
    let n = step.entries.len();
    match step.candidates {
        Some(1) => {
            step.picked.resize(n, 0);
            device.be.argmax_rows(out, vocab, &mut step.picked);
            return;
        }
        Some(k) => {
            step.top_counts.resize(n, 0);
            step.top.resize(n * k, (0, 0.0));
            device
                .be
                .top_k_rows(out, vocab, k, &mut step.top_counts, &mut step.top[..n * k]);
            return;
        }
        None => {}
    }
    let rows = n * vocab;
    if step.logits.len() < rows {
        step.logits.resize(rows, 0.0);
    }
    device.be.read(out, 0, &mut step.logits[..rows]);
}

/// Records a step's results: computed positions, then for each generation whose
/// pending tokens are all computed, its next token.
fn finish_step(core: &Core, state: &mut State, step: &Step) {
    let vocab = core.model.hyper().vocab;
    let State { pool, seqs, .. } = state;
    for (i, e) in step.entries.iter().enumerate() {
        let seq = seqs.get_mut(&e.id).expect("a sequence in flight stays");
        seq.in_flight = false;
        pool.commit(&mut seq.pages, e.end, &seq.tokens);
        if seq.dropped {
            pool.release(&mut seq.pages);
            seqs.remove(&e.id);
            continue;
        }
        if seq.pages.len < seq.tokens.len() {
            continue;
        }
        let pick = match step.candidates {
            Some(1) => Pick::Token(step.picked[i]),
            Some(k) => Pick::Top(&step.top[i * k..i * k + step.top_counts[i] as usize]),
            None => Pick::Logits(&step.logits[i * vocab..(i + 1) * vocab]),
        };
        next_token(core, seq, pick);
    }
    // Pages may have come free for waiting jobs.
    core.work.notify_all();
}

/// A sequence's next token, or the logits to sample it from.
enum Pick<'a> {
    Token(u32),
    /// At least the most likely tokens the sampler needs, with their logits.
    Top(&'a [(u32, f32)]),
    Logits(&'a [f32]),
}

/// Samples a generation's next token (unless the backend picked it), streams its text,
/// and ends the generation when it should end.
fn next_token(core: &Core, seq: &mut Seq, pick: Pick) {
    let Some(job) = seq.job.as_mut() else { return };
    if job.first_token.is_none() {
        job.first_token = Some(Instant::now());
    }
    if job.cancel.is_cancelled() {
        let job = seq.job.take().expect("checked");
        return finish(job, FinishReason::Cancelled);
    }
    let token = match pick {
        Pick::Token(token) => token,
        Pick::Top(top) => job.sampler.sample_top(top),
        Pick::Logits(logits) => job.sampler.sample(logits),
    };
    if job.stop_at_eog && core.tokenizer.is_eog(token) {
        let job = seq.job.take().expect("checked");
        return finish(job, FinishReason::EndOfText);
    }
    job.sampler.accept(token);
    job.generated.push(token);
    seq.tokens.push(token);
    job.delta.clear();
    let mut text = std::mem::take(&mut job.delta);
    let mut piece = core.tokenizer.token_bytes(token);
    // As `decode_bytes` does for a whole text: the prefix space encoding added is not
    // part of what the model says.
    if job.generated.len() == 1 && core.tokenizer.add_space_prefix && piece.first() == Some(&b' ') {
        piece = &piece[1..];
    }
    job.utf8.push(piece, &mut text);
    let mut emitted = String::new();
    let stopped = job.stops.push(&text, &mut emitted);
    job.text.push_str(&emitted);
    job.sink.text(&emitted);
    job.delta = text;
    let reason = if stopped {
        Some(FinishReason::StopString)
    } else if job.generated.len() >= job.max_tokens {
        Some(FinishReason::MaxTokens)
    } else if seq.tokens.len() >= core.n_ctx {
        Some(FinishReason::ContextFull)
    } else {
        None
    };
    if let Some(reason) = reason {
        let job = seq.job.take().expect("checked");
        finish(job, reason);
    }
}

/// Flushes a generation's held-back text and reports its result.
fn finish(mut job: Job, reason: FinishReason) {
    if reason != FinishReason::StopString {
        let mut tail = String::new();
        job.utf8.finish(&mut tail);
        let mut emitted = String::new();
        let stopped = job.stops.push(&tail, &mut emitted);
        if !stopped {
            job.stops.finish(&mut emitted);
        }
        job.text.push_str(&emitted);
        job.sink.text(&emitted);
    }
    let now = Instant::now();
    let first = job.first_token.unwrap_or(now);
    let generation = Generation {
        text: std::mem::take(&mut job.text),
        finish_reason: reason,
        timings: Timings {
            prompt_tokens: job.prompt_tokens,
            cached_tokens: job.cached_tokens,
            generated_tokens: job.generated.len(),
            prefill: first - job.started,
            decode: now - first,
        },
        tokens: std::mem::take(&mut job.generated),
    };
    job.sink.done(Ok(generation));
}
