//! The session engine on the default model (SmolLM2-135M-Instruct): batched sessions
//! give what each gives alone, prefix reuse, forks, stop strings and UTF-8 across
//! tokens, cancellation, the key/value budget, saved sessions, and the page pool's books
//! under random use.

use std::sync::Arc;

use kiln::{
    registry, CancelToken, Engine, EngineError, EngineOptions, FinishReason, GenerateOptions, KvBudget, KvPolicy,
    Sampling, Session, SessionOptions, StreamEvent,
};

fn model_path(name: &str) -> String {
    let path = registry::cached_path(name);
    assert!(path.exists(), "{} is missing: run `kiln pull {name}`", path.display());
    path.to_str().unwrap().to_string()
}

fn engine(options: EngineOptions) -> Engine {
    Engine::load(&model_path("smollm2-135m-instruct"), options).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: Sampling::greedy(),
        ..Default::default()
    }
}

/// A chat-formatted prompt, so the instruct model answers.
fn chat(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

const PROMPTS: [&str; 8] = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that adds two numbers.",
    "Why is the sky blue?",
    "Name a famous painter.",
];

/// Eight sessions decoding together (one forward pass per step for all of them, with a
/// long prompt's prefill chunks in between) produce exactly what each produces alone:
/// the kernels give every token the same result in any batch, and the scheduler splits
/// prompts at fixed positions.
#[test]
fn concurrent_sessions_match_alone() {
    let engine = engine(EngineOptions {
        n_ctx: Some(1024),
        max_batch: 64,
        ..Default::default()
    });
    // One prompt long enough to be prefilled in several chunks while others decode, and
    // whose decode steps see over 512 keys (each step's keys split into parts).
    let long = chat(&"Summarize: the quick brown fox jumps over the lazy dog. ".repeat(45));
    let prompts: Vec<String> = PROMPTS.iter().map(|p| chat(p)).chain([long]).collect();
    let options = greedy(24);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            engine
                .session(SessionOptions::default())
                .generate(p, &options)
                .unwrap()
                .tokens
        })
        .collect();
    engine.clear_prefix_cache();
    let together: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let runs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (engine, options) = (&engine, &options);
                scope.spawn(move || {
                    engine
                        .session(SessionOptions::default())
                        .generate(p, options)
                        .unwrap()
                        .tokens
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.is_empty());
        assert_eq!(a, t, "prompt {i}: batched output differs from the session alone");
    }
}

/// A second turn sent as a new session with the whole history reuses the first turn's
/// cached pages: only the tail is prefilled, and the reply is the one a cold engine gives.
#[test]
fn second_turn_reuses_the_first_turns_pages() {
    let first = chat(&format!(
        "Here are some notes.\n{}\nWhat do they say?",
        (0..120)
            .map(|i| format!("Note {i}: item {} is ready.", i * 7))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    let warm = engine(EngineOptions {
        n_ctx: Some(2048),
        ..Default::default()
    });
    let mut s = warm.session(SessionOptions::default());
    let reply = s.generate(&first, &greedy(16)).unwrap();
    assert!(
        reply.timings.prompt_tokens >= 1000,
        "the first turn has {} tokens",
        reply.timings.prompt_tokens
    );
    let history = s.tokens();
    drop(s);
    assert!(warm.kv_stats().pages.cached > 0, "the first turn's pages are kept");
    let second = warm
        .encode(&format!("<|im_end|>\n{}", chat("And the last note?")))
        .unwrap();
    let prompt: Vec<u32> = history.iter().copied().chain(second).collect();
    let mut s = warm.session(SessionOptions::default());
    let reused = s.generate_from_tokens(&prompt, &greedy(16)).unwrap();
    assert!(
        reused.timings.cached_tokens >= 960,
        "only {} of {} prompt tokens came from the cache",
        reused.timings.cached_tokens,
        prompt.len()
    );
    let cold = engine(EngineOptions {
        n_ctx: Some(2048),
        prefix_cache: false,
        ..Default::default()
    });
    let fresh = cold
        .session(SessionOptions::default())
        .generate_from_tokens(&prompt, &greedy(16))
        .unwrap();
    assert_eq!(fresh.timings.cached_tokens, 0);
    assert_eq!(reused.tokens, fresh.tokens, "prefix reuse changed the reply");
}

/// A prompt whose beginning comes from the prefix cache gives the reply the whole prompt
/// gives computed afresh, also when the part left to compute is short (under 64 tokens,
/// where a run of its own would take another attention kernel than the whole prompt):
/// attention computes every chunk as part of the whole prompt. Random tokens make the
/// greedy choices close calls, which any change of arithmetic would flip somewhere.
#[test]
fn a_cached_prefix_gives_the_reply_of_the_whole_prompt() {
    let options = |prefix_cache| EngineOptions {
        n_ctx: Some(1024),
        prefix_cache,
        ..Default::default()
    };
    let (warm, cold) = (engine(options(true)), engine(options(false)));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 49152) as u32
            })
            .collect()
    };
    // (shared beginning, new tokens): the cache holds the beginning's full pages.
    for (shared, new) in [(130, 20), (200, 16), (300, 10), (96, 1)] {
        let beginning = random(shared);
        warm.session(SessionOptions::default())
            .generate_from_tokens(&beginning, &greedy(1))
            .unwrap();
        let prompt: Vec<u32> = beginning.iter().copied().chain(random(new)).collect();
        let reused = warm
            .session(SessionOptions::default())
            .generate_from_tokens(&prompt, &greedy(24))
            .unwrap();
        assert!(
            reused.timings.cached_tokens > 0 && prompt.len() - reused.timings.cached_tokens < 64,
            "{} of {} tokens cached",
            reused.timings.cached_tokens,
            prompt.len()
        );
        let fresh = cold
            .session(SessionOptions::default())
            .generate_from_tokens(&prompt, &greedy(24))
            .unwrap();
        assert_eq!(
            reused.tokens, fresh.tokens,
            "{shared} cached + {new} new tokens: the reply differs from the whole prompt's"
        );
    }
}

/// A fork shares every page until one of the two writes; then only the written page
/// is copied.
#[test]
fn fork_uses_no_pages_until_it_diverges() {
    let engine = engine(EngineOptions {
        n_ctx: Some(1024),
        ..Default::default()
    });
    let mut s = engine.session(SessionOptions::default());
    let tokens: Vec<u32> = (0..500).map(|i| 100 + i % 1000).collect();
    s.feed(&tokens).unwrap();
    let before = engine.kv_stats();
    let pages = 500usize.div_ceil(before.page_size);
    assert_eq!(before.pages.used, pages);
    let mut fork = s.fork().unwrap();
    assert_eq!(engine.kv_stats().pages.used, pages, "forking took pages");
    assert_eq!(fork.kv_pages(), pages);
    let a = s.feed(&[7]).unwrap().to_vec();
    // s wrote into the shared partial page: it got its own copy.
    assert_eq!(engine.kv_stats().pages.used, pages + 1);
    let b = fork.feed(&[7]).unwrap().to_vec();
    // The fork now holds the original partial page alone and writes it in place.
    assert_eq!(engine.kv_stats().pages.used, pages + 1);
    assert_eq!(a, b, "a fork continues exactly as its parent");
    let c = fork.feed(&[8]).unwrap().to_vec();
    assert_ne!(a, c);
}

/// Checkpoints rewind the context; continuing from one gives what it gave the first time.
#[test]
fn rewind_to_a_checkpoint() {
    let engine = engine(EngineOptions {
        n_ctx: Some(512),
        ..Default::default()
    });
    let mut s = engine.session(SessionOptions::default());
    let prompt = chat("Tell me about cats.");
    let first = s.generate(&prompt, &greedy(8)).unwrap();
    let cp = s.checkpoint();
    let a = s.generate(" More please.", &greedy(8)).unwrap();
    s.rewind(&cp).unwrap();
    assert_eq!(s.tokens().len(), cp_len(&engine, &prompt, &first));
    let b = s.generate(" More please.", &greedy(8)).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

fn cp_len(engine: &Engine, prompt: &str, first: &kiln::Generation) -> usize {
    engine.encode(prompt).unwrap().len() + first.tokens.len()
}

/// A stop string that spans tokens stops generation with the text before it.
#[test]
fn stop_string_across_tokens() {
    let engine = engine(EngineOptions {
        n_ctx: Some(512),
        ..Default::default()
    });
    let prompt = chat("Count from one to twenty in words, separated by commas.");
    let full = engine
        .session(SessionOptions::default())
        .generate(&prompt, &greedy(40))
        .unwrap();
    // A stop string made of the end of one token and the start of the next.
    let pieces: Vec<String> = full
        .tokens
        .iter()
        .map(|&t| String::from_utf8_lossy(&engine.decode_bytes(&[t])).into_owned())
        .collect();
    let i = (4..pieces.len() - 1)
        .find(|&i| {
            pieces[i].chars().count() >= 2
                && pieces[i + 1].chars().count() >= 2
                && pieces[i].is_ascii()
                && pieces[i + 1].is_ascii()
        })
        .expect("two multi-character tokens in a row");
    let stop = format!("{}{}", &pieces[i][pieces[i].len() - 1..], &pieces[i + 1][..1]);
    let before: String = pieces[..i].concat() + &pieces[i][..pieces[i].len() - 1];
    let at = full.text.find(&stop).unwrap();
    assert!(at <= before.len());
    let options = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(40)
    };
    let mut streamed = String::new();
    let stopped = engine
        .session(SessionOptions::default())
        .generate_with(&prompt, &options, |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::StopString);
    assert_eq!(stopped.text, full.text[..at], "stop {stop:?}");
    assert_eq!(
        streamed, stopped.text,
        "the stream never showed the stop string's start"
    );
}

/// Text streamed as it is generated is whole characters even when one character's bytes
/// come in several tokens (CJK and emoji in a byte-level BPE vocabulary).
#[test]
fn utf8_split_across_tokens() {
    let engine = engine(EngineOptions {
        n_ctx: Some(512),
        ..Default::default()
    });
    for prompt in ["请用中文介绍一下月亮。", "Reply with five emoji: 🌙🐱🚀🎉🍕"] {
        let mut pieces = Vec::new();
        let g = engine
            .session(SessionOptions::default())
            .generate_with(&chat(prompt), &greedy(48), |t| pieces.push(t.to_string()))
            .unwrap();
        let bytes = engine.decode_bytes(&g.tokens);
        assert_eq!(pieces.concat(), String::from_utf8_lossy(&bytes));
        // The token limit may cut the last character short; only that tail may show as
        // U+FFFD, and only when the bytes really end mid-character.
        let (body, last) = pieces.split_at(pieces.len() - 1);
        assert!(
            !body.concat().contains('\u{fffd}'),
            "{prompt}: a character was split: {pieces:?}"
        );
        if last[0].contains('\u{fffd}') {
            let cut_short = std::str::from_utf8(&bytes).is_err_and(|e| e.error_len().is_none());
            assert!(
                cut_short && g.finish_reason == FinishReason::MaxTokens,
                "{prompt}: {pieces:?}"
            );
            assert!(
                !last[0].trim_end_matches('\u{fffd}').contains('\u{fffd}'),
                "{prompt}: {pieces:?}"
            );
        }
        let split = g
            .tokens
            .iter()
            .any(|&t| std::str::from_utf8(&engine.decode_bytes(&[t])).is_err());
        assert!(
            split,
            "{prompt}: no token split a character, so this checked nothing: {:?}",
            g.text
        );
    }
}

/// Cancelling stops a generation within a step, from another thread or by dropping its
/// stream; the session is usable right after.
#[test]
fn cancellation_mid_decode() {
    let engine = engine(EngineOptions {
        n_ctx: Some(1024),
        ..Default::default()
    });
    let mut s = engine.session(SessionOptions::default());
    let cancel = CancelToken::new();
    let options = GenerateOptions {
        cancel: Some(cancel.clone()),
        stop_at_eog: false,
        ..greedy(500)
    };
    let mut seen = 0;
    let g = s
        .generate_with(&chat("Write a long story."), &options, |_| {
            seen += 1;
            if seen == 5 {
                cancel.cancel();
            }
        })
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(
        g.tokens.len() >= 5 && g.tokens.len() <= 7,
        "{} tokens after cancelling at 5",
        g.tokens.len()
    );
    // The stream variant: drop it after two pieces, then generate again.
    let rt = tokio_runtime();
    rt.block_on(async {
        use futures_util::StreamExt;
        let mut stream = s.stream(" Go on.", &greedy(200)).unwrap();
        let mut texts = 0;
        while let Some(event) = stream.next().await {
            if let StreamEvent::Text(_) = event.unwrap() {
                texts += 1;
                if texts == 2 {
                    break;
                }
            }
        }
    });
    // The dropped stream's generation ends within a step; the session then takes more.
    let again = loop {
        match s.generate(" The end.", &greedy(4)) {
            Err(EngineError::Busy) => std::thread::yield_now(),
            other => break other.unwrap(),
        }
    };
    assert_eq!(again.tokens.len(), 4);
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

/// With a small budget, a request that needs more pages than are free fails cleanly
/// (or waits, as configured) while the session holding them goes on.
#[test]
fn kv_budget_exhaustion() {
    let options = |policy| EngineOptions {
        n_ctx: Some(256),
        page_size: 16,
        kv_budget: Some(KvBudget::Tokens(128)),
        when_kv_full: policy,
        prefix_cache: false,
        ..Default::default()
    };
    // a fills 6 of the 8 pages: its prompt and 80 tokens past any end of text.
    let long = GenerateOptions {
        stop_at_eog: false,
        ..greedy(80)
    };
    let engine = engine(options(KvPolicy::Fail));
    let mut a = engine.session(SessionOptions::default());
    a.generate(&chat("Hi there, how are you today?"), &long).unwrap();
    assert!(engine.kv_stats().pages.used >= 6);
    let mut b = engine.session(SessionOptions::default());
    let err = b
        .generate(&chat("Tell me a story about a dragon and a knight."), &greedy(60))
        .unwrap_err();
    assert!(matches!(err, EngineError::KvExhausted), "{err}");
    // a goes on (it may use its reserved pages), and b works once a is gone.
    drop(a);
    b.reset();
    b.generate(&chat("Tell me a story."), &greedy(8)).unwrap();

    let engine = engine_wait(options(KvPolicy::Wait));
    let mut a = engine.session(SessionOptions::default());
    a.generate(&chat("Hi there, how are you today?"), &long).unwrap();
    let waiting = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut b = engine.session(SessionOptions::default());
            b.generate(&chat("Tell me a story about a dragon and a knight."), &greedy(40))
                .map(|g| g.tokens.len())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!waiting.is_finished(), "the request did not wait for pages");
    drop(a);
    assert!(waiting.join().unwrap().unwrap() > 0);
}

fn engine_wait(options: EngineOptions) -> Engine {
    engine(options)
}

/// A saved session loads back into a session that continues exactly as the original;
/// a truncated file, a corrupted one and one from another model are clear errors.
#[test]
fn saved_sessions() {
    let engine = engine(EngineOptions {
        n_ctx: Some(512),
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(format!("kiln-session-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.kiln");
    let mut s = engine.session(SessionOptions::default());
    s.generate(&chat("Name three colors."), &greedy(12)).unwrap();
    s.save(&path).unwrap();
    let mut loaded = Session::load(&engine, &path).unwrap();
    assert_eq!(loaded.tokens(), s.tokens());
    let a = s.generate(" And three animals?", &greedy(12)).unwrap();
    let b = loaded.generate(" And three animals?", &greedy(12)).unwrap();
    assert_eq!(a.tokens, b.tokens);

    let bytes = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: &str| {
        let bad = dir.join("bad.kiln");
        std::fs::write(&bad, bytes).unwrap();
        match Session::load(&engine, &bad) {
            Err(e @ EngineError::SessionFile { .. }) => assert!(e.to_string().contains(want), "{e}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a bad file ({want}) loaded"),
        }
    };
    check(&bytes[..bytes.len() / 2], "truncated");
    check(&bytes[..10], "not a kiln session file");
    let mut flipped = bytes.clone();
    let at = bytes.len() - 100;
    flipped[at] ^= 1;
    check(&flipped, "checksum");
    let gemma = Engine::load(
        &model_path("gemma3-270m"),
        EngineOptions {
            n_ctx: Some(512),
            ..Default::default()
        },
    )
    .unwrap();
    match Session::load(&gemma, &path) {
        Err(e) => assert!(e.to_string().contains("another model"), "{e}"),
        Ok(_) => panic!("a SmolLM2 session loaded into Gemma"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Many sessions starting, forking, generating, cancelling and ending at random (fixed
/// seed) on a small pool: it never holds more than its budget, its counts always add up,
/// and once every session is gone no page is in use.
#[test]
fn random_session_lifecycles_stay_in_budget() {
    let budget = 24 * 16;
    let engine = engine(EngineOptions {
        n_ctx: Some(256),
        page_size: 16,
        kv_budget: Some(KvBudget::Tokens(budget)),
        ..Default::default()
    });
    let stats = engine.kv_stats();
    assert_eq!(stats.pages.total * stats.page_size, budget);
    let mut rng = 42u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n) as usize
    };
    let engine = Arc::new(engine);
    let mut sessions: Vec<Session> = Vec::new();
    for step in 0..60 {
        match next(5) {
            0 | 1 if sessions.len() < 6 => {
                let mut s = engine.session(SessionOptions::default());
                let prompt = chat(PROMPTS[next(PROMPTS.len() as u64)]);
                match s.generate(&prompt, &greedy(next(20) + 1)) {
                    Ok(_) | Err(EngineError::KvExhausted) => {}
                    Err(e) => panic!("step {step}: {e}"),
                }
                sessions.push(s);
            }
            2 if !sessions.is_empty() => {
                let i = next(sessions.len() as u64);
                if let Ok(f) = sessions[i].fork() {
                    sessions.push(f);
                }
            }
            3 if !sessions.is_empty() => {
                let i = next(sessions.len() as u64);
                let cancel = CancelToken::new();
                cancel.cancel();
                let options = GenerateOptions {
                    cancel: Some(cancel),
                    ..greedy(30)
                };
                match sessions[i].generate(" more", &options) {
                    Ok(g) => assert_eq!(g.finish_reason, FinishReason::Cancelled),
                    Err(EngineError::KvExhausted | EngineError::ContextOverflow { .. }) => {}
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
            _ if !sessions.is_empty() => {
                let i = next(sessions.len() as u64);
                sessions.swap_remove(i);
            }
            _ => {}
        }
        let s = engine.kv_stats();
        assert!(s.pool_bytes <= budget * s.page_bytes / s.page_size);
        assert_eq!(s.pages.used + s.pages.cached + s.pages.free, s.pages.total);
    }
    sessions.clear();
    assert_eq!(engine.kv_stats().pages.used, 0);
}
