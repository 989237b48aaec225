//! `kiln chat`: an interactive chat on a terminal, or one question answered when stdin
//! is a pipe.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::sync::{Arc, Mutex};

use kiln::{
    CancelToken, Conversation, ConversationOptions, Engine, EngineError, GenerateOptions, Generation, Sampling,
    SessionOptions,
};

pub struct ChatArgs {
    pub system: Option<String>,
    pub generate: GenerateOptions,
}

const HELP: &str = "\
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (no TEXT: remove it)
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /stats          tokens and key/value cache use
  /help           this list
  /exit           leave (or Ctrl-D)
  A line ending in \\ continues on the next line; \"\"\" opens and closes a block of lines.
  Ctrl-C stops a reply.";

/// Runs the chat until `/exit`, end of input, or (piped stdin) one answer.
pub fn run(engine: &Engine, args: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    let interactive = std::io::stdin().is_terminal();
    // Ctrl-C cancels the reply in progress; at the prompt it only reminds how to leave.
    let current: Arc<Mutex<Option<CancelToken>>> = Arc::default();
    {
        let current = current.clone();
        ctrlc::set_handler(move || match current.lock().unwrap().as_ref() {
            Some(cancel) => cancel.cancel(),
            None => eprint!("\n(Ctrl-D or /exit to leave)\n> "),
        })?;
    }
    let options = ConversationOptions {
        system: args.system,
        generate: args.generate,
        ..Default::default()
    };
    let mut chat = match Conversation::new(engine, options.clone()) {
        Ok(chat) => Chat::Templated(Box::new(chat)),
        Err(EngineError::NoChatTemplate) => {
            eprintln!(
                "{} has no chat template: plain completion (each input continues the text)",
                engine.name()
            );
            Chat::Plain(Box::new(Plain {
                session: engine.session(SessionOptions::default()),
                generate: options.generate,
            }))
        }
        Err(e) => return Err(e.into()),
    };
    if !interactive {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        let input = input.trim();
        if !input.is_empty() {
            chat.turn(input, &current)?;
        }
        return Ok(());
    }
    eprintln!("{} — /help for commands, Ctrl-D to leave", engine.name());
    let mut lines = std::io::stdin().lock().lines();
    loop {
        let Some(input) = read_message(&mut lines)? else {
            eprintln!();
            return Ok(());
        };
        let input = input.trim();
        if input.is_empty() {
            continue;
        }
        if let Some(command) = input.strip_prefix('/') {
            let (name, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
            let rest = rest.trim();
            match (name, &mut chat) {
                ("exit" | "quit" | "bye", _) => return Ok(()),
                ("help", _) => eprintln!("{HELP}"),
                ("reset", Chat::Templated(c)) => {
                    c.reset();
                    eprintln!("(conversation cleared)");
                }
                ("reset", Chat::Plain(plain)) => {
                    plain.session.reset();
                    eprintln!("(text cleared)");
                }
                ("system", Chat::Templated(c)) => {
                    c.set_system((!rest.is_empty()).then(|| rest.to_string()));
                    eprintln!("(system prompt {})", if rest.is_empty() { "removed" } else { "set" });
                }
                ("save", Chat::Templated(c)) if !rest.is_empty() => match c.save(rest) {
                    Ok(()) => eprintln!("(saved {} messages to {rest})", c.messages().len()),
                    Err(e) => eprintln!("error: {e}"),
                },
                ("load", Chat::Templated(c)) if !rest.is_empty() => match c.load(rest) {
                    Ok(()) => eprintln!("(loaded {} messages from {rest})", c.messages().len()),
                    Err(e) => eprintln!("error: {e}"),
                },
                ("stats", chat) => chat.print_stats(engine),
                ("system" | "save" | "load", Chat::Plain(_)) => {
                    eprintln!("(/{name} needs a chat template; this model has none)")
                }
                _ => eprintln!("unknown command /{name}; /help lists them"),
            }
            continue;
        }
        if let Err(e) = chat.turn(input, &current) {
            eprintln!("error: {e}");
        }
    }
}

enum Chat {
    Templated(Box<Conversation>),
    /// A model with no chat template: each input continues the text.
    Plain(Box<Plain>),
}

struct Plain {
    session: kiln::Session,
    generate: GenerateOptions,
}

impl Chat {
    /// One reply, streamed to stdout, with its speed after it on stderr.
    fn turn(&mut self, input: &str, current: &Mutex<Option<CancelToken>>) -> Result<(), EngineError> {
        let cancel = CancelToken::new();
        *current.lock().unwrap() = Some(cancel.clone());
        let mut stdout = std::io::stdout();
        let print = |piece: &str| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        };
        let result = match self {
            Chat::Templated(c) => {
                c.options_mut().generate.cancel = Some(cancel);
                c.send_with(input, print).map(|r| r.generation)
            }
            Chat::Plain(plain) => {
                let options = GenerateOptions {
                    cancel: Some(cancel),
                    ..plain.generate.clone()
                };
                plain.session.generate_with(input, &options, print)
            }
        };
        *current.lock().unwrap() = None;
        let generation = result?;
        println!();
        report(&generation);
        Ok(())
    }

    fn print_stats(&self, engine: &Engine) {
        let kv = engine.kv_stats();
        match self {
            Chat::Templated(c) => {
                let s = c.stats();
                eprintln!(
                    "{} turns, {} messages | {} tokens in context | prefilled {} (re-run {}), generated {}",
                    s.turns,
                    c.messages().len(),
                    c.session().tokens().len(),
                    s.prefill_tokens,
                    s.reprefilled_tokens,
                    s.generated_tokens
                );
            }
            Chat::Plain(plain) => eprintln!("{} tokens in context", plain.session.tokens().len()),
        }
        eprintln!(
            "KV cache: {} of {} pages in use, {} cached, {} free ({} tokens a page, {:.1} MiB in all)",
            kv.pages.used,
            kv.pages.total,
            kv.pages.cached,
            kv.pages.free,
            kv.page_size,
            kv.pool_bytes as f64 / (1024.0 * 1024.0)
        );
    }
}

/// Time to first token and decode speed, dim on a terminal.
fn report(g: &Generation) {
    let t = &g.timings;
    let line = format!(
        "{} tokens | first token {:.0} ms ({} prompt tokens) | {:.1} tokens/s{}",
        t.generated_tokens,
        t.prefill.as_secs_f64() * 1e3,
        t.prompt_tokens,
        t.decode_tokens_per_second(),
        match g.finish_reason {
            kiln::FinishReason::Cancelled => " | stopped",
            kiln::FinishReason::MaxTokens => " | max tokens",
            kiln::FinishReason::ContextFull => " | context full",
            _ => "",
        }
    );
    if std::io::stderr().is_terminal() {
        eprintln!("\x1b[2m{line}\x1b[0m");
    } else {
        eprintln!("{line}");
    }
}

/// Reads one message at the `> ` prompt: a line, lines joined by a trailing `\`, or a
/// `"""` block. `None` at end of input.
fn read_message(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> std::io::Result<Option<String>> {
    eprint!("> ");
    let mut message = String::new();
    let mut block = false;
    loop {
        let Some(line) = lines.next().transpose()? else {
            return Ok((!message.is_empty()).then_some(message));
        };
        if line.trim() == "\"\"\"" {
            if block {
                return Ok(Some(message));
            }
            block = true;
        } else if block {
            message.push_str(&line);
            message.push('\n');
        } else if let Some(part) = line.strip_suffix('\\') {
            message.push_str(part);
            message.push('\n');
        } else {
            message.push_str(&line);
            return Ok(Some(message));
        }
        eprint!(". ");
    }
}

/// The default options of a chat reply.
pub fn generate_options(max_tokens: usize, temperature: f32, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: Sampling {
            temperature,
            seed,
            ..Sampling::default()
        },
        ..Default::default()
    }
}
