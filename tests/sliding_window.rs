//! Gemma 3's sliding-window layers in the paged cache: pages no later query of a local
//! layer sees are let go, and nothing a session computes changes for it. Every check
//! compares with an engine that keeps every page (`full_window_cache`, as llama.cpp's
//! `--swa-full`); both split prompts at the same positions into pages of the same size,
//! so the kernels run the same calls over the same keys and the tokens must be equal.

use kiln::{registry, Engine, EngineError, EngineOptions, GenerateOptions, Sampling, Session, SessionOptions};

fn engine(full_window_cache: bool) -> Engine {
    let path = registry::cached_path("gemma3-270m");
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull gemma3-270m`",
        path.display()
    );
    Engine::load(
        path.to_str().unwrap(),
        EngineOptions {
            n_ctx: Some(2560),
            page_size: 16,
            max_batch: 128,
            full_window_cache,
            ..Default::default()
        },
    )
    .unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop_at_eog: false,
        sampling: Sampling::greedy(),
        ..Default::default()
    }
}

/// Prompts well past Gemma 3's 512-token window, different from their first words.
fn long_prompt(topic: &str) -> String {
    let mut text = format!("Notes on {topic}.\n");
    for i in 0..70 {
        text.push_str(&format!("Item {i}: {topic} number {i} is listed here with care. "));
    }
    text.push_str("\nIn summary, the most important point about ");
    text.push_str(topic);
    text.push_str(" is");
    text
}

#[test]
fn sliding_window_pages_are_let_go_and_outputs_do_not_change() {
    let (windowed, full) = (engine(false), engine(true));
    let prompts = [long_prompt("rivers"), long_prompt("mountains")];
    assert!(
        windowed.encode(&prompts[0]).unwrap().len() > 900,
        "the prompt must pass the window twice over"
    );

    // Alone, each session gives the same tokens with either cache, and the windowed one
    // holds a fraction of the memory.
    let mut reference = Vec::new();
    for prompt in &prompts {
        let mut w = windowed.session(SessionOptions::default());
        let mut f = full.session(SessionOptions::default());
        let a = w.generate(prompt, &greedy(16)).unwrap();
        let b = f.generate(prompt, &greedy(16)).unwrap();
        assert_eq!(a.tokens, b.tokens, "windowed cache changed the output");
        let bytes = |s: &Session, e: &Engine| s.kv_pages() * e.kv_stats().page_bytes;
        let (w_bytes, f_bytes) = (bytes(&w, &windowed), bytes(&f, &full));
        // Gemma 3 270M's 18 layers make 6 groups of 3: one group of global layers keeps
        // a page per 16 positions, five of local ones only the pages of the last window.
        let len = w.tokens().len();
        assert_eq!(f.kv_pages(), len.div_ceil(16), "one page per 16 positions");
        assert!(
            w.kv_pages() <= len.div_ceil(16) + 5 * (512 / 16 + 1),
            "{} pages",
            w.kv_pages()
        );
        assert!(w_bytes * 10 < f_bytes * 7, "{w_bytes} bytes windowed vs {f_bytes} full");
        reference.push(b.tokens);
    }

    // Together: each session's let-go pages go straight to the other, which must not
    // see the difference.
    windowed.clear_prefix_cache();
    let together: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let runs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let engine = &windowed;
                scope.spawn(move || {
                    engine
                        .session(SessionOptions::default())
                        .generate(p, &greedy(16))
                        .unwrap()
                        .tokens
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(together, reference);
}

/// A session past its window saves only the rows its next query reads, loads back into
/// one that continues exactly alike, and rewinding it to before its last window
/// recomputes what was let go, with the same result.
#[test]
fn sessions_past_the_window_save_rewind_and_continue_alike() {
    let (windowed, full) = (engine(false), engine(true));
    let prompt = long_prompt("forests");
    let mut s = windowed.session(SessionOptions::default());
    s.generate(&prompt, &greedy(8)).unwrap();
    let mark = s.checkpoint();

    let dir = std::env::temp_dir().join(format!("kiln-window-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (small, large) = (dir.join("windowed.kiln"), dir.join("full.kiln"));
    s.save(&small).unwrap();
    let mut f = full.session(SessionOptions::default());
    f.generate(&prompt, &greedy(8)).unwrap();
    let (f_mark, f_mark_tokens) = (f.checkpoint(), f.tokens());
    f.save(&large).unwrap();
    assert_eq!(s.tokens(), f.tokens());
    let (small_len, large_len) = (
        std::fs::metadata(&small).unwrap().len(),
        std::fs::metadata(&large).unwrap().len(),
    );
    assert!(small_len * 10 < large_len * 7, "{small_len} vs {large_len} bytes");

    let next = " Then, the next point is";
    let expected = f.generate(next, &greedy(12)).unwrap().tokens;
    let mut loaded = Session::load(&windowed, &small).unwrap();
    assert_eq!(loaded.generate(next, &greedy(12)).unwrap().tokens, expected);
    // A full file loads into a windowed engine (it has every row); the reverse lacks rows.
    let mut from_full = Session::load(&windowed, &large).unwrap();
    assert_eq!(from_full.generate(next, &greedy(12)).unwrap().tokens, expected);
    match Session::load(&full, &small) {
        Err(e @ EngineError::SessionFile { .. }) => assert!(e.to_string().contains("sliding-window"), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a windowed file loaded into a full cache"),
    }

    // Far past the mark, then back: the pages the mark's window needs were let go, so
    // the context is recomputed from the last cached prefix. Its 8 generated positions
    // now run inside a prompt chunk, whose attention sums in another order than a
    // decode step's, so the logits after it agree with the kept ones to rounding only:
    // as closely as a fresh session's prefill of the same tokens does (which differs by
    // about 4% of the largest logit here), where a wrong page would be far off.
    s.generate(&long_prompt("deserts"), &greedy(4)).unwrap();
    s.rewind(&mark).unwrap();
    assert_eq!(s.tokens(), f_mark_tokens);
    let next_ids = windowed.encode(next).unwrap();
    let recomputed = s.feed(&next_ids).unwrap().to_vec();
    f.rewind(&f_mark).unwrap();
    let kept = f.feed(&next_ids).unwrap().to_vec();
    let mut fresh = full.session(SessionOptions::default());
    fresh.feed(&f_mark_tokens).unwrap();
    let fresh = fresh.feed(&next_ids).unwrap();
    let largest_difference = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let (rewound, prefilled) = (largest_difference(&recomputed, &kept), largest_difference(fresh, &kept));
    let scale = kept.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!(
        "largest logit difference from the kept context: rewound {rewound}, fresh prefill {prefilled} (of {scale})"
    );
    assert!(
        rewound <= 2.0 * prefilled.max(0.01 * scale),
        "rewound logits differ by {rewound}, a fresh prefill's by {prefilled}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
