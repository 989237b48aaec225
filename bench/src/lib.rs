//! kiln-bench: measures prefill and decode speed as llama-bench does, reported in llama-bench's table and JSON.

pub mod synthetic;

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_engine::{
    registry, Engine, EngineError, EngineOptions, GenerateOptions, KvBudget, Sampling, Session, SessionOptions,
};
use kiln_models::checkpoint::Format;
use kiln_models::Checkpoint;
use kiln_runtime::BackendChoice;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Where the forward passes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A real GPU when there is one, else the CPU.
    Auto,
    Cpu,
    Gpu,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "gpu" => Ok(Backend::Gpu),
            _ => Err(format!("unknown backend `{s}` (cpu, gpu or auto)")),
        }
    }
}

impl Backend {
    /// The engine's backend choice for this flag.
    pub fn choice(self) -> BackendChoice {
        match self {
            Backend::Auto => BackendChoice::Auto,
            Backend::Cpu => BackendChoice::Cpu,
            Backend::Gpu => BackendChoice::Gpu,
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Prompt lengths, one `ppN` test each; 0 is skipped.
    pub n_prompt: Vec<usize>,
    /// Decode lengths, one `tgN` test each; 0 is skipped.
    pub n_gen: Vec<usize>,
    /// Context depths: every test runs once per depth, after that many random tokens
    /// were fed into the context (untimed), as llama-bench's `-d` does. Empty means 0.
    pub n_depth: Vec<usize>,
    /// Timed runs per test, after a warm-up of at least `WARM_UP`.
    pub repetitions: usize,
    /// CPU threads; default: one per core.
    pub threads: Option<usize>,
    pub backend: Backend,
    /// Most tokens per forward pass; default: the engine's.
    pub batch: Option<usize>,
    /// Prompt length of the time-to-first-token measurement; 0 skips it.
    pub ttft_prompt: usize,
    /// Run each test as each of these numbers of concurrent sessions through the engine's
    /// scheduler (generation with greedy sampling), reporting their aggregate tokens/s,
    /// the counts' runs interleaved so that they see the same machine; empty drives one
    /// session's forward passes directly, as llama-bench does.
    pub sessions: Vec<usize>,
    /// First-turn prompt length of the second-turn measurement (time to first token of
    /// a conversation's second turn sent as a new session, with and without prefix
    /// reuse); 0 skips it.
    pub second_turn: usize,
}

impl Options {
    /// Checks the options and gives the engine options to load the model with: a context
    /// just long enough for the longest test, as llama-bench sizes its context.
    pub fn engine_options(&self) -> Result<EngineOptions> {
        if self.repetitions == 0 {
            return Err(BenchError::Invalid("repetitions must be at least 1".into()));
        }
        if self.threads == Some(0) || self.batch == Some(0) || self.sessions.contains(&0) {
            return Err(BenchError::Invalid(
                "threads, batch size and sessions must be positive".into(),
            ));
        }
        let deepest = self.n_depth.iter().copied().max().unwrap_or(0);
        if deepest > 0 && !self.sessions.is_empty() {
            return Err(BenchError::Invalid(
                "a context depth applies to single-session tests (no --sessions)".into(),
            ));
        }
        let second_turn = (self.second_turn > 0).then(|| self.second_turn + 3 * TURN_TAIL);
        let tests = self.n_prompt.iter().chain(&self.n_gen).map(|&n| deepest + n);
        let longest = tests.chain([self.ttft_prompt]).chain(second_turn);
        // A generation needs one position more than its tokens.
        let n_ctx = longest.max().unwrap_or(0).max(1) + 1;
        // The second-turn measurement keeps the first turn's pages while the second runs.
        let sessions = self
            .sessions
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .max(if second_turn.is_some() { 2 } else { 1 });
        let defaults = EngineOptions::default();
        Ok(EngineOptions {
            n_ctx: Some(n_ctx),
            threads: self.threads,
            max_batch: self.batch.unwrap_or(defaults.max_batch),
            max_sessions_per_step: defaults.max_sessions_per_step.max(sessions),
            // Every session's whole context, in pages.
            kv_budget: Some(KvBudget::Tokens(sessions * n_ctx.next_multiple_of(defaults.page_size))),
            prefix_cache: second_turn.is_some(),
            backend: self.backend.choice(),
            ..defaults
        })
    }
}

/// The timed runs of one test.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Tokens each run processed.
    pub n_tokens: usize,
    /// Each run's time in nanoseconds.
    pub ns: Vec<u64>,
}

impl Samples {
    /// Tokens per second of each run.
    pub fn ts(&self) -> Vec<f64> {
        self.ns
            .iter()
            .map(|&ns| self.n_tokens as f64 * 1e9 / ns.max(1) as f64)
            .collect()
    }
}

/// One `ppN` or `tgN` test.
#[derive(Clone, Debug)]
pub struct TestResult {
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Tokens already in the context when the test ran.
    pub n_depth: usize,
    /// Concurrent sessions (1 when driving one session directly).
    pub n_sessions: usize,
    /// When the test started, UTC, RFC 3339 as llama-bench writes it.
    pub test_time: String,
    pub samples: Samples,
}

impl TestResult {
    /// The test as llama-bench names it: `ppN` or `tgN`.
    pub fn test(&self) -> String {
        if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        }
    }

    /// The test's name in the table: [`Self::test`], with ` @ dN` at a context depth of
    /// N (llama-bench's name) and ` xN` for N sessions.
    pub fn name(&self) -> String {
        let mut name = self.test();
        if self.n_depth > 0 {
            name += &format!(" @ d{}", self.n_depth);
        }
        if self.n_sessions > 1 {
            name += &format!(" x{}", self.n_sessions);
        }
        name
    }
}

/// The model as llama-bench describes it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub filename: String,
    /// Architecture, size label and quantization, e.g. `llama 135M Q4_1`.
    pub model_type: String,
    /// Bytes of tensor data.
    pub size: u64,
    pub n_params: u64,
}

impl ModelInfo {
    pub fn read(path: &Path) -> Result<ModelInfo> {
        let checkpoint = Checkpoint::open(path)?;
        let (size, n_params, label, format) = match &checkpoint.format {
            Format::Gguf(g) => {
                let size = g.tensors().iter().map(|t| t.n_bytes() as u64).sum();
                let n_params = g.tensors().iter().map(|t| t.n_elements() as u64).sum();
                let format = match g.get_u32("general.file_type") {
                    Some(ftype) => ftype_name(ftype),
                    None => "unknown type".into(),
                };
                (
                    size,
                    n_params,
                    g.get_str("general.size_label").map(str::to_string),
                    format,
                )
            }
            Format::Hf(h) => {
                let (mut size, mut n_params) = (0, 0);
                for name in h.names() {
                    let n = h.shape(name).unwrap_or_default().iter().product::<usize>() as u64;
                    let width = match h.dtype(name).as_deref() {
                        Some("F32" | "I32" | "U32") => 4,
                        Some("F64" | "I64" | "U64") => 8,
                        Some("I8" | "U8" | "BOOL") => 1,
                        _ => 2,
                    };
                    n_params += n;
                    size += n * width;
                }
                (size, n_params, None, "safetensors".into())
            }
        };
        let label = label.unwrap_or_else(|| size_label(n_params));
        Ok(ModelInfo {
            filename: path.display().to_string(),
            model_type: format!("{} {label} {format}", checkpoint.arch),
            size,
            n_params,
        })
    }
}

/// llama.cpp's name of a GGUF `general.file_type` (`llama_model_ftype_name`).
fn ftype_name(ftype: u32) -> String {
    let name = match ftype {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        21 => "Q2_K - Small",
        32 => "BF16",
        _ => return format!("ftype {ftype}"),
    };
    name.to_string()
}

/// A parameter count as a model size label: `135M`, `1.5B`.
fn size_label(n_params: u64) -> String {
    let n = n_params as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.0}M", n / 1e6)
    }
}

/// Everything one `kiln bench` run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub model: ModelInfo,
    pub threads: usize,
    pub batch: usize,
    pub tests: Vec<TestResult>,
    pub load_time: Duration,
    /// Prefill of a prompt (`n_tokens` long) plus picking the first token.
    pub ttft: Option<Samples>,
    pub second_turn: Option<SecondTurn>,
    /// The process's peak resident memory (VmHWM) in bytes, where the OS reports it.
    pub peak_rss: Option<u64>,
    pub cpu_info: String,
    /// What the forward passes ran on: "CPU", or the GPU's API ("Vulkan").
    pub backends: String,
}

/// How long each test's warm-up runs at least (see `Bench::warm_up`).
const WARM_UP: Duration = Duration::from_millis(500);

/// Runs `run` until `WARM_UP` has passed, at least once.
fn repeat_for_warm_up(mut run: impl FnMut() -> Result<()>) -> Result<()> {
    let started = Instant::now();
    loop {
        run()?;
        if started.elapsed() >= WARM_UP {
            return Ok(());
        }
    }
}

/// Runs the tests of `options` on `engine`, loaded from `model` with [`Options::engine_options`].
///
/// A `ppN` test prefills N random token ids into an empty context; a `tgN` test runs N
/// single-token decode steps from an empty context, feeding a random token each step
/// without sampling. Each test has a warm-up (its run, for tg one step as llama-bench
/// does, repeated for at least `WARM_UP`), then `repetitions` timed runs; only the
/// forward passes are timed. kiln adds the model's load time, the time to first token of
/// a prompt (its prefill plus a greedy pick) and the process's peak resident memory.
pub fn run(engine: &Engine, model: &str, options: &Options) -> Result<Report> {
    let engine_options = options.engine_options()?;
    let model = ModelInfo::read(&registry::resolve(model)?)?;
    let mut bench = Bench {
        engine,
        session: engine.session(SessionOptions::default()),
        vocab: engine.model().hyper().vocab as u64,
        bos: engine.tokenizer().bos.filter(|_| engine.tokenizer().add_bos),
        rng: 0x5eed,
    };
    let mut tests = Vec::new();
    let cases = options
        .n_prompt
        .iter()
        .map(|&p| (p, 0))
        .chain(options.n_gen.iter().map(|&n| (0, n)));
    let depths = if options.n_depth.is_empty() {
        &[0][..]
    } else {
        &options.n_depth
    };
    let cases: Vec<_> = depths
        .iter()
        .flat_map(|&d| cases.clone().map(move |(p, n)| (p, n, d)))
        .collect();
    for (n_prompt, n_gen, n_depth) in cases.into_iter().filter(|&(p, n, _)| p + n > 0) {
        let test_time = rfc3339(SystemTime::now());
        if !options.sessions.is_empty() {
            let counts = &options.sessions;
            let all = concurrent(&mut bench, counts, n_prompt, n_gen, options.repetitions)?;
            for (&n_sessions, samples) in counts.iter().zip(all) {
                tests.push(TestResult {
                    n_prompt,
                    n_gen,
                    n_depth,
                    n_sessions,
                    test_time: test_time.clone(),
                    samples,
                });
            }
            continue;
        }
        let samples = if n_prompt > 0 {
            bench.warm_up(|b| b.prompt(n_depth, n_prompt))?;
            bench.repeat(options.repetitions, n_prompt, |b| b.prompt(n_depth, n_prompt))?
        } else {
            // llama-bench warms decode up with a single step.
            bench.warm_up(|b| b.tokens_per_step(n_depth, 1))?;
            bench.repeat(options.repetitions, n_gen, |b| b.tokens_per_step(n_depth, n_gen))?
        };
        tests.push(TestResult {
            n_prompt,
            n_gen,
            n_depth,
            n_sessions: 1,
            test_time,
            samples,
        });
    }
    let second_turn = match options.second_turn {
        0 => None,
        n => Some(second_turn(&mut bench, n, options.repetitions)?),
    };
    let ttft = match options.ttft_prompt {
        0 => None,
        n => {
            // The tests before warmed the model up; a full prefill more would only cost time.
            if tests.is_empty() {
                bench.session.reset();
                bench.first_token(n)?;
            }
            Some(bench.repeat(options.repetitions, n, |b| b.first_token(n))?)
        }
    };
    Ok(Report {
        model,
        threads: options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        batch: engine_options.max_batch.min(engine.n_ctx()),
        tests,
        load_time: engine.load_time(),
        ttft,
        second_turn,
        peak_rss: peak_rss(),
        cpu_info: cpu_info(),
        backends: kiln_runtime::backend_api(engine_options.backend),
    })
}

struct Bench<'e> {
    engine: &'e Engine,
    session: Session,
    vocab: u64,
    /// The first prompt token, as llama-bench does: BOS where the model adds one.
    bos: Option<u32>,
    rng: u64,
}

impl Bench<'_> {
    /// An empty context: the session reset and the prefix cache emptied, so that no run
    /// can reuse what an earlier one left (as llama-bench clears its cache between runs).
    fn clear(&mut self) {
        self.session.reset();
        self.engine.clear_prefix_cache();
    }

    /// The warm-up of a test: its run repeated until `WARM_UP` has passed (at least once),
    /// so that the timed runs find the device at its working clocks. (On an H200 after a
    /// few idle seconds, one warm-up run left the first timed pp512 of a Qwen2-0.5B shape
    /// at a fifth of the others' speed: 14.4k ± 8.8k tokens/s over three runs, 19.4k
    /// steady.)
    fn warm_up(&mut self, mut once: impl FnMut(&mut Bench) -> Result<Duration>) -> Result<()> {
        repeat_for_warm_up(|| {
            self.clear();
            once(self).map(drop)
        })
    }

    /// `reps` timed runs of `once`, each from an empty context.
    fn repeat(
        &mut self,
        reps: usize,
        n_tokens: usize,
        mut once: impl FnMut(&mut Bench) -> Result<Duration>,
    ) -> Result<Samples> {
        let mut ns = Vec::with_capacity(reps);
        for _ in 0..reps {
            self.clear();
            ns.push(once(self)?.as_nanos() as u64);
        }
        Ok(Samples { n_tokens, ns })
    }

    /// Random token ids (splitmix64), drawn before the clock starts.
    fn random_tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.rng;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                ((z ^ (z >> 31)) % self.vocab) as u32
            })
            .collect()
    }

    fn prompt_tokens(&mut self, n: usize) -> Vec<u32> {
        let mut tokens = self.random_tokens(n);
        if let (Some(bos), Some(first)) = (self.bos, tokens.first_mut()) {
            *first = bos;
        }
        tokens
    }

    /// `depth` random tokens fed into the empty context (a prompt, untimed), and the
    /// test's `n` tokens to follow them: a prompt's own when the context is empty.
    fn context_then(&mut self, depth: usize, n: usize) -> Result<Vec<u32>> {
        if depth == 0 {
            return Ok(self.prompt_tokens(n));
        }
        let context = self.prompt_tokens(depth);
        self.session.feed(&context)?;
        Ok(self.random_tokens(n))
    }

    /// Prefill of `n` tokens in one call (the session splits it into batches) after
    /// `depth` tokens.
    fn prompt(&mut self, depth: usize, n: usize) -> Result<Duration> {
        let tokens = self.context_then(depth, n)?;
        let started = Instant::now();
        self.session.feed(&tokens)?;
        Ok(started.elapsed())
    }

    /// `n` decode steps of one token each after `depth` tokens.
    fn tokens_per_step(&mut self, depth: usize, n: usize) -> Result<Duration> {
        let tokens = self.context_then(depth, n)?;
        let started = Instant::now();
        for token in &tokens {
            self.session.feed(std::slice::from_ref(token))?;
        }
        Ok(started.elapsed())
    }

    /// Prefill of `n` tokens and the greedy pick of the first generated token.
    fn first_token(&mut self, n: usize) -> Result<Duration> {
        let tokens = self.prompt_tokens(n);
        let started = Instant::now();
        let logits = self.session.feed(&tokens)?;
        let first = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        std::hint::black_box(first);
        Ok(started.elapsed())
    }
}

/// One test run as each of `counts` sessions generating at once through the engine loop,
/// each on its own thread: a ppN test is N random prompt tokens and one generated token
/// per session, a tgN test is a one-token prompt and N generated tokens (greedy, past
/// any end-of-text). Warm-up rounds for at least `WARM_UP`, then `reps` timed rounds,
/// each a run of every count in turn from empty contexts (interleaved, so that a noisy
/// machine's slow spells fall on every count alike); a run lasts from the moment all its
/// sessions start until the last one finishes, and counts the tokens of all of them.
/// Samples per count.
fn concurrent(bench: &mut Bench, counts: &[usize], n_prompt: usize, n_gen: usize, reps: usize) -> Result<Vec<Samples>> {
    let most = counts.iter().copied().max().unwrap_or(0);
    let engine = bench.engine;
    let mut sessions: Vec<Session> = (0..most).map(|_| engine.session(SessionOptions::default())).collect();
    let options = GenerateOptions {
        max_tokens: n_gen.max(1),
        sampling: Sampling::greedy(),
        stop_at_eog: false,
        ..Default::default()
    };
    repeat_for_warm_up(|| {
        for &n_sessions in counts {
            concurrent_run(bench, &mut sessions[..n_sessions], n_prompt, &options)?;
        }
        Ok(())
    })?;
    let mut ns = vec![Vec::with_capacity(reps); counts.len()];
    for _ in 0..reps {
        for (count, &n_sessions) in counts.iter().enumerate() {
            let elapsed = concurrent_run(bench, &mut sessions[..n_sessions], n_prompt, &options)?;
            ns[count].push(elapsed.as_nanos() as u64);
        }
    }
    let n_tokens = |n_sessions: usize| n_sessions * if n_prompt > 0 { n_prompt } else { n_gen };
    Ok(counts
        .iter()
        .zip(ns)
        .map(|(&n, ns)| Samples {
            n_tokens: n_tokens(n),
            ns,
        })
        .collect())
}

/// One run of `sessions` generating at once with `options`, from empty contexts.
fn concurrent_run(
    bench: &mut Bench,
    sessions: &mut [Session],
    n_prompt: usize,
    options: &GenerateOptions,
) -> Result<Duration> {
    let prompts: Vec<Vec<u32>> = (0..sessions.len())
        .map(|_| bench.prompt_tokens(n_prompt.max(1)))
        .collect();
    for s in sessions.iter_mut() {
        s.reset();
    }
    let barrier = std::sync::Barrier::new(sessions.len() + 1);
    std::thread::scope(|scope| -> Result<Duration> {
        let runs: Vec<_> = sessions
            .iter_mut()
            .zip(&prompts)
            .map(|(session, prompt)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    session.generate_from_tokens(prompt, options)
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        for run in runs {
            run.join().expect("a bench session panicked")?;
        }
        Ok(started.elapsed())
    })
}

/// Tokens the first turn generates, the second turn adds, and the second turn generates
/// in the second-turn measurement.
const TURN_TAIL: usize = 16;

/// Time to first token of a conversation's second turn, sent as a new session with the
/// whole history (as a stateless chat server does), with and without prefix reuse.
#[derive(Clone, Debug)]
pub struct SecondTurn {
    /// First-turn prompt tokens.
    pub n_first: usize,
    /// Second-turn prompt tokens: the first turn's prompt and reply and the new message.
    pub n_prompt: usize,
    /// Of those, the tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Whether the reply was the same with and without prefix reuse in every repetition.
    pub same_reply: bool,
    /// Time to first token with the first turn's pages in the prefix cache.
    pub reused: Samples,
    /// The same with the prefix cache emptied: every token prefilled.
    pub cold: Samples,
}

/// Per repetition: a first turn of `n_first` random tokens and 16 greedy ones in one
/// session, which then ends (its pages stay in the prefix cache); a new session sends
/// that history plus 16 new tokens and its time to first token is taken; then the prefix
/// cache is emptied and the same second turn runs again. Both replies must be the same
/// where the reused pages hold only first-turn prompt tokens. Pages that also hold tokens
/// the first turn generated carry what decode steps computed for them, which a prompt
/// computes with other arithmetic (llama.cpp's too): there the replies may differ, and
/// the result says whether they did.
fn second_turn(bench: &mut Bench, n_first: usize, reps: usize) -> Result<SecondTurn> {
    let engine = bench.engine;
    let options = GenerateOptions {
        max_tokens: TURN_TAIL,
        sampling: Sampling::greedy(),
        stop_at_eog: false,
        ..Default::default()
    };
    let (mut reused, mut cold, mut n_prompt, mut cached_tokens) = (Vec::new(), Vec::new(), 0, 0);
    let mut same_reply = true;
    for rep in 0..=reps {
        engine.clear_prefix_cache();
        let first = bench.prompt_tokens(n_first);
        let mut session = engine.session(SessionOptions::default());
        session.generate_from_tokens(&first, &options)?;
        let mut prompt = session.tokens();
        drop(session);
        prompt.extend(bench.random_tokens(TURN_TAIL));
        let warm = engine
            .session(SessionOptions::default())
            .generate_from_tokens(&prompt, &options)?;
        engine.clear_prefix_cache();
        let fresh = engine
            .session(SessionOptions::default())
            .generate_from_tokens(&prompt, &options)?;
        if warm.tokens != fresh.tokens {
            if warm.timings.cached_tokens <= n_first {
                return Err(BenchError::Invalid(
                    "the second turn's reply differs with prefix reuse".into(),
                ));
            }
            same_reply = false;
        }
        if rep > 0 {
            reused.push(warm.timings.prefill.as_nanos() as u64);
            cold.push(fresh.timings.prefill.as_nanos() as u64);
        }
        (n_prompt, cached_tokens) = (prompt.len(), warm.timings.cached_tokens);
    }
    Ok(SecondTurn {
        n_first,
        n_prompt,
        cached_tokens,
        same_reply,
        reused: Samples {
            n_tokens: n_prompt,
            ns: reused,
        },
        cold: Samples {
            n_tokens: n_prompt,
            ns: cold,
        },
    })
}

/// Mean and sample standard deviation (n - 1), 0 for one sample, as llama-bench computes them.
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn mean_ns(samples: &Samples) -> f64 {
    mean_sd(&samples.ns.iter().map(|&ns| ns as f64).collect::<Vec<_>>()).0
}

/// VmHWM from /proc/self/status: the most resident memory the process has had.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn cpu_info() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find(|l| l.starts_with("model name"));
    model
        .and_then(|l| l.split_once(':'))
        .map_or(String::new(), |(_, v)| v.trim().to_string())
}

/// `2026-01-31T12:00:00Z`: UTC to the second, as llama-bench writes `test_time`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil-date algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// One JSON row: llama-bench's fields (in its order, with the values that describe kiln's
/// run), then kiln's extras.
#[derive(Serialize)]
struct JsonRow<'a> {
    build_commit: &'a str,
    build_number: u32,
    cpu_info: &'a str,
    gpu_info: &'a str,
    backends: &'a str,
    model_filename: &'a str,
    model_type: &'a str,
    model_size: u64,
    model_n_params: u64,
    n_batch: usize,
    n_ubatch: usize,
    n_threads: usize,
    cpu_mask: &'a str,
    cpu_strict: bool,
    poll: u32,
    /// The CPU backend keeps its key/value cache in f16, as llama.cpp does by default.
    type_k: &'a str,
    type_v: &'a str,
    n_gpu_layers: i32,
    n_cpu_moe: u32,
    split_mode: &'a str,
    main_gpu: u32,
    no_kv_offload: bool,
    flash_attn: i32,
    devices: &'a str,
    tensor_split: &'a str,
    tensor_buft_overrides: &'a str,
    load_mode: &'a str,
    lazy_mode: &'a str,
    embeddings: bool,
    no_op_offload: u32,
    no_host: bool,
    repack: bool,
    fit_target: u32,
    fit_min_ctx: u32,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    test_time: &'a str,
    avg_ns: u64,
    stddev_ns: u64,
    avg_ts: f64,
    stddev_ts: f64,
    samples_ns: &'a [u64],
    samples_ts: Vec<f64>,
    // kiln's extras, the same on every row of a run.
    load_ns: u64,
    ttft_n_prompt: Option<usize>,
    ttft_avg_ns: Option<u64>,
    ttft_stddev_ns: Option<u64>,
    peak_rss_bytes: Option<u64>,
    /// Second-turn time to first token with and without prefix reuse (see `SecondTurn`).
    second_turn_n_prompt: Option<usize>,
    second_turn_cached_tokens: Option<usize>,
    second_turn_ttft_avg_ns: Option<u64>,
    second_turn_cold_ttft_avg_ns: Option<u64>,
    second_turn_same_reply: Option<bool>,
    /// Sessions generating at once; `avg_ts` is their aggregate.
    n_sessions: usize,
}

impl Report {
    fn ttft_stats(&self) -> Option<(f64, f64)> {
        let ttft = self.ttft.as_ref()?;
        Some(mean_sd(&ttft.ns.iter().map(|&ns| ns as f64).collect::<Vec<_>>()))
    }

    /// A JSON array with one object per test, readable by llama-bench's tooling.
    pub fn json(&self) -> String {
        let build = format!("kiln {}", env!("CARGO_PKG_VERSION"));
        let ttft = self.ttft_stats();
        let second = self.second_turn.as_ref();
        let rows: Vec<JsonRow> = self
            .tests
            .iter()
            .map(|t| {
                let ns: Vec<f64> = t.samples.ns.iter().map(|&ns| ns as f64).collect();
                let (avg_ns, stddev_ns) = mean_sd(&ns);
                let ts = t.samples.ts();
                let (avg_ts, stddev_ts) = mean_sd(&ts);
                JsonRow {
                    build_commit: &build,
                    build_number: 0,
                    cpu_info: &self.cpu_info,
                    gpu_info: "",
                    backends: &self.backends,
                    model_filename: &self.model.filename,
                    model_type: &self.model.model_type,
                    model_size: self.model.size,
                    model_n_params: self.model.n_params,
                    n_batch: self.batch,
                    n_ubatch: self.batch,
                    n_threads: self.threads,
                    cpu_mask: "0x0",
                    cpu_strict: false,
                    poll: 0,
                    type_k: "f16",
                    type_v: "f16",
                    n_gpu_layers: 0,
                    n_cpu_moe: 0,
                    split_mode: "none",
                    main_gpu: 0,
                    no_kv_offload: false,
                    flash_attn: 0,
                    devices: "CPU",
                    tensor_split: "0.00",
                    tensor_buft_overrides: "none",
                    load_mode: "mmap",
                    lazy_mode: "off",
                    embeddings: false,
                    no_op_offload: 0,
                    no_host: false,
                    repack: false,
                    fit_target: 0,
                    fit_min_ctx: 0,
                    n_prompt: t.n_prompt,
                    n_gen: t.n_gen,
                    n_depth: t.n_depth,
                    test_time: &t.test_time,
                    avg_ns: avg_ns.round() as u64,
                    stddev_ns: stddev_ns.round() as u64,
                    avg_ts,
                    stddev_ts,
                    samples_ns: &t.samples.ns,
                    samples_ts: ts,
                    load_ns: self.load_time.as_nanos() as u64,
                    ttft_n_prompt: self.ttft.as_ref().map(|t| t.n_tokens),
                    ttft_avg_ns: ttft.map(|(avg, _)| avg.round() as u64),
                    ttft_stddev_ns: ttft.map(|(_, sd)| sd.round() as u64),
                    peak_rss_bytes: self.peak_rss,
                    second_turn_n_prompt: second.map(|s| s.n_prompt),
                    second_turn_cached_tokens: second.map(|s| s.cached_tokens),
                    second_turn_ttft_avg_ns: second.map(|s| mean_ns(&s.reused).round() as u64),
                    second_turn_cold_ttft_avg_ns: second.map(|s| mean_ns(&s.cold).round() as u64),
                    second_turn_same_reply: second.map(|s| s.same_reply),
                    n_sessions: t.n_sessions,
                }
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("rows of numbers and strings serialize") + "\n"
    }

    /// llama-bench's markdown table, then kiln's extras, one a line.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let size = self.model.size as f64;
        let size = if size < 1024.0 * 1024.0 * 1024.0 {
            format!("{:.2} MiB", size / 1024.0 / 1024.0)
        } else {
            format!("{:.2} GiB", size / 1024.0 / 1024.0 / 1024.0)
        };
        let params = self.model.n_params as f64;
        let params = if params < 1e9 {
            format!("{:.2} M", params / 1e6)
        } else {
            format!("{:.2} B", params / 1e9)
        };
        let _ = writeln!(
            out,
            "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} | {:>15} | {:>20} |",
            "model", "size", "params", "backend", "threads", "test", "t/s"
        );
        let _ = writeln!(
            out,
            "| {} | {}: | {}: | {} | {}: | {}: | {}: |",
            "-".repeat(30),
            "-".repeat(9),
            "-".repeat(9),
            "-".repeat(10),
            "-".repeat(6),
            "-".repeat(14),
            "-".repeat(19)
        );
        for t in &self.tests {
            let (avg, sd) = mean_sd(&t.samples.ts());
            let _ = writeln!(
                out,
                "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} | {:>15} | {:>20} |",
                self.model.model_type,
                size,
                params,
                self.backends,
                self.threads,
                t.name(),
                format!("{avg:.2} ± {sd:.2}")
            );
        }
        let _ = writeln!(out, "\nload: {:.3} s", self.load_time.as_secs_f64());
        // Several session counts of one test (`--sessions 1,8`): each count's aggregate
        // tokens/s over the first count's, from the same interleaved rounds.
        for (i, t) in self.tests.iter().enumerate() {
            let first = self.tests[..i]
                .iter()
                .find(|f| (f.n_prompt, f.n_gen, f.n_depth) == (t.n_prompt, t.n_gen, t.n_depth));
            if let Some(first) = first {
                let (avg, base) = (mean_sd(&t.samples.ts()).0, mean_sd(&first.samples.ts()).0);
                let _ = writeln!(
                    out,
                    "{}: {} sessions / {} = {:.2}x the tokens/s",
                    t.test(),
                    t.n_sessions,
                    first.n_sessions,
                    avg / base
                );
            }
        }
        if let (Some(ttft), Some((avg, sd))) = (&self.ttft, self.ttft_stats()) {
            let _ = writeln!(
                out,
                "time to first token (pp{} + 1 token): {:.1} ± {:.1} ms",
                ttft.n_tokens,
                avg / 1e6,
                sd / 1e6
            );
        }
        if let Some(s) = &self.second_turn {
            let (reused, cold) = (mean_ns(&s.reused), mean_ns(&s.cold));
            let _ = writeln!(
                out,
                "second turn, first-turn prompt {} (+{} new, {} of {} tokens cached): time to first token {:.1} ms, \
                 {:.1} ms without prefix reuse ({:.1}x)",
                s.n_first,
                s.n_prompt - s.n_first,
                s.cached_tokens,
                s.n_prompt,
                reused / 1e6,
                cold / 1e6,
                cold / reused.max(1.0)
            );
            if !s.same_reply {
                let _ = writeln!(
                    out,
                    "  the reply differed: {} of the reused tokens were generated by the first turn's decode \
                     steps, whose arithmetic differs from a prompt's",
                    s.cached_tokens - s.n_first
                );
            }
        }
        if let Some(rss) = self.peak_rss {
            let _ = writeln!(out, "peak RSS: {:.2} MiB", rss as f64 / 1024.0 / 1024.0);
        }
        let _ = writeln!(out, "build: kiln {}", env!("CARGO_PKG_VERSION"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_time_is_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap_day), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn test_names_follow_llama_bench() {
        let result = |n_prompt, n_gen, n_depth, n_sessions| TestResult {
            n_prompt,
            n_gen,
            n_depth,
            n_sessions,
            test_time: String::new(),
            samples: Samples {
                n_tokens: 1,
                ns: vec![1],
            },
        };
        assert_eq!(result(512, 0, 0, 1).name(), "pp512");
        assert_eq!(result(0, 128, 4096, 1).name(), "tg128 @ d4096");
        assert_eq!(result(0, 128, 0, 8).name(), "tg128 x8");
    }

    #[test]
    fn statistics_match_llama_bench() {
        assert_eq!(mean_sd(&[1.0, 2.0, 3.0]), (2.0, 1.0));
        assert_eq!(mean_sd(&[5.0]), (5.0, 0.0));
        let samples = Samples {
            n_tokens: 512,
            ns: vec![1_000_000_000, 2_000_000_000],
        };
        assert_eq!(samples.ts(), [512.0, 256.0]);
    }
}
