//! The `kiln` command line.

mod chat;
mod render;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln::runtime::BackendChoice;
use kiln::{registry, Engine, EngineOptions, GenerateOptions, Sampling, SessionOptions};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Run language models fast on the machine you have")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where and how a model runs, for the commands that run one interactively.
#[derive(Args)]
struct RunArgs {
    #[arg(short, long)]
    threads: Option<usize>,
    /// Context length (default: the model's, at most 4096).
    #[arg(short = 'c', long)]
    ctx: Option<usize>,
    /// auto (a real GPU when there is one, else the CPU), cpu or gpu.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
}

impl RunArgs {
    fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            threads: self.threads,
            n_ctx: self.ctx,
            backend: self.backend,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model: replies stream as they are generated. With stdin from a pipe,
    /// answers it once and exits.
    Chat {
        /// A GGUF file, a Hugging Face checkpoint directory, or a model name (pulled on
        /// first use).
        #[arg(short, long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// The system prompt.
        #[arg(short, long)]
        system: Option<String>,
        #[arg(short = 'n', long, default_value_t = 512)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Print the prompt a chat template makes of some messages, exactly (no newline added).
    Render {
        /// A Jinja chat template file.
        #[arg(long, conflicts_with = "model", required_unless_present = "model")]
        template: Option<PathBuf>,
        /// Take the template (and BOS/EOS) from this model.
        #[arg(short, long)]
        model: Option<String>,
        /// A JSON file: an array of messages, or an object with `messages`.
        #[arg(long)]
        messages: PathBuf,
        /// A JSON file: an array of tools (JSON schemas).
        #[arg(long)]
        tools: Option<PathBuf>,
        #[arg(long)]
        add_generation_prompt: bool,
        #[arg(long)]
        bos_token: Option<String>,
        #[arg(long)]
        eos_token: Option<String>,
    },
    /// Continue a prompt and print only the generated text (timings go to stderr).
    Generate {
        /// A GGUF file, a Hugging Face checkpoint directory, or a pulled model's name.
        #[arg(short, long)]
        model: String,
        #[arg(short, long)]
        prompt: String,
        #[arg(short = 'n', long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Perplexity of a text file, computed as llama-perplexity does.
    Perplexity {
        #[arg(short, long)]
        model: String,
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(short = 'c', long, default_value_t = 512)]
        ctx: usize,
        #[arg(short, long)]
        threads: Option<usize>,
    },
    /// Measure prefill (ppN) and decode (tgN) speed as llama-bench does; prints its table or JSON.
    Bench {
        /// A GGUF file, a Hugging Face checkpoint directory, or a model name.
        #[arg(short, long, required_unless_present = "synthetic", conflicts_with = "synthetic")]
        model: Option<String>,
        /// Random weights in a real model's shapes instead of a file: qwen2-0.5b,
        /// llama-1b or llama-8b (written once to $KILN_HOME/synthetic).
        #[arg(long)]
        synthetic: Option<String>,
        /// The quantization of a synthetic model: q4_k_m or q8_0.
        #[arg(long, default_value = "q4_k_m", requires = "synthetic")]
        quant: String,
        /// Prompt lengths to prefill, comma-separated; 0 skips.
        #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_value = "512")]
        n_prompt: Vec<usize>,
        /// Numbers of single-token decode steps, comma-separated; 0 skips.
        #[arg(short = 'n', long = "n-gen", value_delimiter = ',', default_value = "128")]
        n_gen: Vec<usize>,
        /// Context depths, comma-separated: each test runs after this many random tokens
        /// already in the context (untimed), as llama-bench's `-d` (`tg128 @ d4096`).
        #[arg(short = 'd', long = "n-depth", value_delimiter = ',', default_value = "0")]
        n_depth: Vec<usize>,
        /// Timed runs of each test (after a warm-up of at least half a second).
        #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
        repetitions: usize,
        #[arg(short, long)]
        threads: Option<usize>,
        /// auto (a real GPU when there is one, else the CPU), cpu or gpu.
        #[arg(long, default_value = "auto")]
        backend: kiln_bench::Backend,
        /// Most tokens per forward pass (default: the engine's).
        #[arg(short = 'b', long = "batch-size")]
        batch: Option<usize>,
        /// Prompt length of the time-to-first-token measurement; 0 skips it.
        #[arg(long, default_value_t = 512)]
        ttft: usize,
        /// Run every test as N concurrent sessions through the engine's scheduler and
        /// report their aggregate tokens/s; a comma list (e.g. 1,8) runs each count,
        /// interleaved, and prints each count's ratio to the first's.
        #[arg(long, value_delimiter = ',')]
        sessions: Vec<usize>,
        /// First-turn prompt length of a second-turn measurement: time to first token of
        /// a conversation's second turn sent as a new session, with and without prefix
        /// reuse; 0 skips it.
        #[arg(long, default_value_t = 0)]
        second_turn: usize,
        #[arg(short, long, value_enum, default_value_t = Output::Md)]
        output: Output,
    },
    /// Fetch a known model into the cache.
    Pull { name: String },
    /// List the models in the cache and those kiln can pull.
    Models,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// llama-bench's markdown table, then kiln's extras.
    Md,
    /// llama-bench's JSON rows, with kiln's extras as extra fields.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a model, pulling it first when it is a known name not yet in the cache.
fn load(model: &str, options: EngineOptions) -> Result<Engine, kiln::EngineError> {
    match Engine::load(model, options.clone()) {
        Err(kiln::EngineError::NotPulled(name)) => {
            registry::pull(&name, &mut |line| eprintln!("{line}"))?;
            Engine::load(model, options)
        }
        other => other,
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Chat {
            model,
            system,
            max_tokens,
            temperature,
            seed,
            run,
        } => {
            let engine = load(&model, run.engine_options())?;
            let generate = chat::generate_options(max_tokens, temperature, seed);
            chat::run(&engine, chat::ChatArgs { system, generate })?;
        }
        Command::Render {
            template,
            model,
            messages,
            tools,
            add_generation_prompt,
            bos_token,
            eos_token,
        } => {
            let text = render::render(render::RenderArgs {
                template,
                model,
                messages,
                tools,
                add_generation_prompt,
                bos_token,
                eos_token,
            })?;
            let mut stdout = std::io::stdout();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            run,
        } => {
            let engine = load(&model, run.engine_options())?;
            let mut session = engine.session(SessionOptions::default());
            let options = GenerateOptions {
                max_tokens,
                sampling: Sampling {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                    ..Sampling::default()
                },
                ..Default::default()
            };
            let mut stdout = std::io::stdout();
            // Text appears as it is generated.
            let generation = session.generate_with(&prompt, &options, |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            let t = &generation.timings;
            eprintln!(
                "\nload {:.2} s | prompt {} tokens, {:.1} t/s | generated {} tokens, {:.1} t/s | finish: {:?}",
                engine.load_time().as_secs_f64(),
                t.prompt_tokens,
                t.prefill_tokens_per_second(),
                t.generated_tokens,
                t.decode_tokens_per_second(),
                generation.finish_reason
            );
        }
        Command::Perplexity {
            model,
            file,
            ctx,
            threads,
        } => {
            let text = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let text = String::from_utf8(text).map_err(|e| format!("{} is not valid UTF-8: {e}", file.display()))?;
            // llama-perplexity drops one trailing newline from the file; so do we, to score the same tokens.
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let engine = load(
                &model,
                EngineOptions {
                    threads,
                    ..Default::default()
                },
            )?;
            let report = engine.perplexity(text, ctx, |i, ppl| eprint!("[{}]{ppl:.4} ", i + 1))?;
            eprintln!();
            println!("PPL = {:.4}", report.ppl);
            eprintln!(
                "{} chunks of {} tokens, {} tokens scored",
                report.n_chunks, report.n_ctx, report.scored
            );
        }
        Command::Bench {
            model,
            synthetic,
            quant,
            n_prompt,
            n_gen,
            n_depth,
            repetitions,
            threads,
            backend,
            batch,
            ttft,
            sessions,
            second_turn,
            output,
        } => {
            let options = kiln_bench::Options {
                n_prompt,
                n_gen,
                n_depth,
                repetitions,
                threads,
                backend,
                batch,
                ttft_prompt: ttft,
                sessions,
                second_turn,
            };
            let model = match (model, synthetic) {
                (Some(model), _) => model,
                (None, Some(name)) => {
                    let dir = registry::home().join("synthetic");
                    let path = kiln_bench::synthetic::ensure(&name, &quant, &dir)?;
                    path.to_string_lossy().into_owned()
                }
                (None, None) => unreachable!("clap requires --model or --synthetic"),
            };
            let engine = load(&model, options.engine_options()?)?;
            let report = kiln_bench::run(&engine, &model, &options)?;
            print!(
                "{}",
                match output {
                    Output::Md => report.markdown(),
                    Output::Json => report.json(),
                }
            );
        }
        Command::Pull { name } => {
            registry::pull(&name, &mut |line| eprintln!("{line}"))?;
        }
        Command::Models => {
            let cached = registry::cached_models();
            println!("cached in {}:", registry::home().join("models").display());
            if cached.is_empty() {
                println!("  (none)");
            }
            for (name, size) in &cached {
                println!("  {name:<32} {:>6} MB", size / 1_000_000);
            }
            println!("known (kiln pull NAME):");
            for m in registry::KNOWN_MODELS {
                println!("  {:<32} {}", m.name, m.description);
            }
        }
    }
    Ok(())
}
