//! Chat on the default model (SmolLM2-135M-Instruct): the Conversation API prefills
//! only new tokens turn after turn, `kiln chat` answers a piped question, and in a real
//! terminal (tmux) it streams, stops on Ctrl-C, resets and exits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::{registry, Conversation, ConversationOptions, Engine, EngineOptions, GenerateOptions, Message, Sampling};

fn model_path() -> String {
    let path = registry::cached_path("smollm2-135m-instruct");
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull smollm2-135m-instruct`",
        path.display()
    );
    path.to_str().unwrap().to_string()
}

/// Ten turns: each prefills only the new message and the template's glue around it, so
/// the prefilled and generated tokens add up to the context exactly and no history
/// token runs twice.
#[test]
fn ten_turns_prefill_only_new_tokens() {
    let engine = Engine::load(
        &model_path(),
        EngineOptions {
            n_ctx: Some(4096),
            ..Default::default()
        },
    )
    .unwrap();
    let options = ConversationOptions {
        system: Some("You are a helpful assistant. Answer briefly.".into()),
        generate: GenerateOptions {
            max_tokens: 40,
            sampling: Sampling::greedy(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut chat = Conversation::new(&engine, options).unwrap();
    let questions = [
        "What is the capital of France?",
        "And of Italy?",
        "Name a famous painter.",
        "What colour is the sky?",
        "How many legs does a spider have?",
        "What is 2 + 2?",
        "Say hello in Spanish.",
        "What is water made of?",
        "Name a planet.",
        "Thank you!",
    ];
    let mut per_turn = Vec::new();
    for q in questions {
        let before = chat.stats();
        let history = chat.session().tokens().len();
        let reply = chat.send(q).unwrap();
        let prefilled = chat.stats().prefill_tokens - before.prefill_tokens;
        assert_eq!(prefilled, reply.generation.timings.prompt_tokens);
        per_turn.push((history, prefilled, reply.generation.tokens.len()));
    }
    let stats = chat.stats();
    assert_eq!(stats.turns, 10);
    assert_eq!(stats.reprefilled_tokens, 0, "history tokens ran again: {per_turn:?}");
    assert_eq!(
        stats.prefill_tokens + stats.generated_tokens,
        chat.session().tokens().len(),
        "prefilled + generated tokens differ from the context: {per_turn:?}"
    );
    // After the first turn a turn's prefill is its message and the template's markup,
    // a few dozen tokens, while the history grows to hundreds.
    for &(history, prefilled, _) in &per_turn[1..] {
        assert!(prefilled < 40, "a turn prefilled {prefilled} tokens: {per_turn:?}");
        assert!(history > 0);
    }
    assert!(per_turn[9].0 > 200, "the history stayed short: {per_turn:?}");
}

/// `echo QUESTION | kiln chat` prints an answer and exits 0.
#[test]
fn piped_question_gets_an_answer() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--model", &model_path()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("Paris"), "the answer: {stdout:?}");
}

/// A real terminal: tmux runs `kiln chat`; the test types, watches the screen, presses
/// Ctrl-C mid-reply, clears the chat and leaves.
#[test]
fn interactive_chat_in_a_terminal() {
    let session = format!("kiln-test-{}", std::process::id());
    let status_file = std::env::temp_dir().join(format!("{session}.status"));
    let _ = std::fs::remove_file(&status_file);
    // A shell records kiln's exit status (tmux's own record of it proved unreliable); it
    // catches SIGINT itself so that Ctrl-C reaches only kiln (handlers reset on exec).
    let command = format!(
        "trap : INT; {} chat --model {} -n 400; echo $? > {}",
        env!("CARGO_BIN_EXE_kiln"),
        model_path(),
        status_file.display()
    );
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux").args(args).output().expect("tmux is installed");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tmux(&["new-session", "-d", "-s", &session, "-x", "200", "-y", "50", &command]);
    let _cleanup = KillSession(session.clone());
    let screen = || tmux(&["capture-pane", "-p", "-t", &session, "-S", "-200"]);
    let wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let started = Instant::now();
        loop {
            let s = screen();
            if pred(&s) {
                return s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "waited for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The prompt is `> ` (capture-pane trims the trailing space of an empty one).
    let is_prompt = |l: &str| l == ">" || l.starts_with("> ");
    let prompt_after = |s: &str, marker: &str| s.rsplit(marker).next().is_some_and(|tail| tail.lines().any(is_prompt));
    wait_for("the prompt", &|s| s.lines().any(is_prompt));
    let question = "Write a very long story about a dragon who learns to bake bread.";
    tmux(&["send-keys", "-t", &session, question, "Enter"]);
    // The reply's first words appear while it is still going (no stats line yet).
    wait_for("streamed text", &|s| {
        let reply = s.split(question).nth(1).unwrap_or("");
        reply.trim().len() > 20 && !reply.contains("tokens/s")
    });
    tmux(&["send-keys", "-t", &session, "C-c"]);
    wait_for("the reply to stop", &|s| s.contains("| stopped"));
    wait_for("a new prompt", &|s| prompt_after(s, "| stopped"));
    tmux(&["send-keys", "-t", &session, "/reset", "Enter"]);
    wait_for("the reset", &|s| s.contains("(conversation cleared)"));
    tmux(&["send-keys", "-t", &session, "/stats", "Enter"]);
    wait_for("stats", &|s| s.contains("0 turns, 0 messages"));
    tmux(&["send-keys", "-t", &session, "/exit", "Enter"]);
    let started = Instant::now();
    while !std::fs::read_to_string(&status_file).is_ok_and(|s| s.ends_with('\n')) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "kiln chat did not exit:\n{}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = std::fs::read_to_string(&status_file).unwrap();
    let _ = std::fs::remove_file(&status_file);
    assert_eq!(status.trim(), "0", "kiln chat's exit status");
}

struct KillSession(String);

impl Drop for KillSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
    }
}

/// Tools on Qwen2.5 (whose template speaks Hermes-style `<tool_call>`): the model's call
/// comes back parsed, and the tool's result goes back to it as a `tool` message.
#[test]
fn tool_calls_round_trip() {
    let path = registry::cached_path("qwen2.5-coder-0.5b-instruct");
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull qwen2.5-coder-0.5b-instruct`",
        path.display()
    );
    let engine = Engine::load(
        path.to_str().unwrap(),
        EngineOptions {
            n_ctx: Some(2048),
            ..Default::default()
        },
    )
    .unwrap();
    let weather = serde_json::json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": { "city": { "type": "string", "description": "The city's name" } },
                "required": ["city"]
            }
        }
    });
    let options = ConversationOptions {
        tools: vec![weather],
        generate: GenerateOptions {
            max_tokens: 64,
            sampling: Sampling::greedy(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut chat = Conversation::new(&engine, options).unwrap();
    let call = chat.send("What is the weather in Paris right now?").unwrap();
    println!("reply: {:?}", call.generation.text);
    assert_eq!(call.tool_calls.len(), 1, "no tool call in {:?}", call.generation.text);
    assert_eq!(call.tool_calls[0].name, "get_weather");
    assert_eq!(call.tool_calls[0].arguments["city"], "Paris");
    let answer = chat
        .send(Message::tool("get_weather", r#"{"temperature_c": 21, "sky": "sunny"}"#))
        .unwrap();
    println!("answer: {:?}", answer.text);
    let prompt = chat.render(false).unwrap();
    assert!(prompt.contains("<tool_response>"), "{prompt}");
    assert!(answer.tool_calls.is_empty());
    assert!(
        answer.text.contains("21") || answer.text.to_lowercase().contains("sunny"),
        "{:?}",
        answer.text
    );
}

/// A saved conversation loads back into a new one on the same engine: the same history
/// and prompt, and it goes on from there.
#[test]
fn saved_conversation_loads_back() {
    let engine = Engine::load(&model_path(), EngineOptions::default()).unwrap();
    let options = ConversationOptions {
        system: Some("Answer in one sentence.".into()),
        generate: GenerateOptions {
            max_tokens: 24,
            sampling: Sampling::greedy(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut first = Conversation::new(&engine, options.clone()).unwrap();
    first.send("Name a large city in Japan.").unwrap();
    let file = std::env::temp_dir().join(format!("kiln-conversation-{}.json", std::process::id()));
    first.save(&file).unwrap();
    let mut second = Conversation::new(&engine, ConversationOptions::default()).unwrap();
    second.load(&file).unwrap();
    assert_eq!(second.messages(), first.messages());
    assert_eq!(second.options().system, options.system);
    assert_eq!(second.render(true).unwrap(), first.render(true).unwrap());
    let reply = second.send("And one in Italy?").unwrap();
    assert!(!reply.text.is_empty());
    assert_eq!(second.messages().len(), 5);
    std::fs::write(&file, "{\"messages\": 3}").unwrap();
    let err = second.load(&file).unwrap_err().to_string();
    assert!(err.contains("not a saved conversation"), "{err}");
    let _ = std::fs::remove_file(&file);
}
