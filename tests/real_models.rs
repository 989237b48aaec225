//! kiln against llama.cpp on the three real models: greedy continuations and perplexity.
//!
//! The fixtures were produced by llama.cpp (commit 0c1e570) with
//! `scripts/fixtures/greedy.sh` and `llama-perplexity`; the models come from `kiln pull`
//! (`scripts/test` pulls them first).

use std::path::PathBuf;

use kiln::{registry, Engine, EngineOptions, GenerateOptions, Sampling, SessionOptions};
use serde::Deserialize;

const MODELS: [&str; 3] = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn engine(name: &str, n_ctx: usize) -> Engine {
    let path = registry::cached_path(name);
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull {name}` (scripts/test does)",
        path.display()
    );
    Engine::load(
        path.to_str().unwrap(),
        EngineOptions {
            n_ctx: Some(n_ctx),
            ..Default::default()
        },
    )
    .unwrap()
}

#[derive(Deserialize)]
struct GreedyCase {
    prompt: String,
    output: String,
    tokens: Vec<u32>,
}

/// Greedy 32-token continuations against llama.cpp's on the same GGUF.
///
/// kiln computes as llama.cpp does (activations quantized to 8-bit blocks, integer dot
/// products, an f16 key/value cache, f16 accumulation in attention), but sums in another
/// order, and these small models are sensitive: llama.cpp's own logits move by ~0.1 when
/// its cache switches from f16 to f32. Where the top two logits are that close, the two
/// engines may pick different tokens and the continuations diverge from there.
///
/// So the first token, computed from identical inputs, must agree for at least 90% of
/// the prompts, and the first 20 characters for at least 60%. (The goal is 90% on the
/// first 20 characters; Qwen2.5 reaches it, SmolLM2 and Gemma 3 not yet.)
fn greedy_agrees_with_llama_cpp(model: &str) {
    let cases: Vec<GreedyCase> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("greedy/{model}.json"))).unwrap())
            .unwrap();
    assert!(cases.len() >= 10, "the fixture needs at least 10 prompts");
    let engine = engine(model, 512);
    let options = GenerateOptions {
        max_tokens: 32,
        sampling: Sampling::greedy(),
        stop: vec![],
    };
    let (mut agree, mut first_token_agree) = (0, 0);
    for case in &cases {
        let mut session = engine.session(SessionOptions::default());
        let generation = session.generate(&case.prompt, &options).unwrap();
        let ours = generation.text;
        if generation.tokens.first() == case.tokens.first() {
            first_token_agree += 1;
        }
        let (a, b): (String, String) = (ours.chars().take(20).collect(), case.output.chars().take(20).collect());
        if a == b {
            agree += 1;
        } else {
            eprintln!(
                "{model}: prompt {:?}\n  kiln:      {ours:?}\n  llama.cpp: {:?}",
                case.prompt, case.output
            );
        }
    }
    eprintln!(
        "{model}: {agree}/{} greedy continuations agree on their first 20 characters, {first_token_agree}/{} on the first token",
        cases.len(),
        cases.len()
    );
    assert!(
        first_token_agree * 10 >= cases.len() * 9,
        "{model}: the first token agrees for only {first_token_agree}/{}",
        cases.len()
    );
    assert!(
        agree * 10 >= cases.len() * 6,
        "{model}: only {agree}/{} agree",
        cases.len()
    );
}

#[test]
fn greedy_smollm2() {
    greedy_agrees_with_llama_cpp(MODELS[0]);
}

#[test]
fn greedy_gemma3() {
    greedy_agrees_with_llama_cpp(MODELS[1]);
}

#[test]
fn greedy_qwen2() {
    greedy_agrees_with_llama_cpp(MODELS[2]);
}

#[derive(Deserialize)]
struct PerplexityFixture {
    ppl: f64,
}

/// Perplexity over the same text with the same chunking must be within 1% of
/// llama-perplexity's.
fn perplexity_agrees_with_llama_cpp(model: &str) {
    let all: std::collections::HashMap<String, PerplexityFixture> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("perplexity/llama_cpp.json")).unwrap()).unwrap();
    let reference = all[model].ppl;
    let text = std::fs::read_to_string(fixtures().join("perplexity/text.txt")).unwrap();
    let ours = engine(model, 512).perplexity(&text, 512, |_, _| {}).unwrap().ppl;
    let rel = (ours - reference).abs() / reference;
    eprintln!(
        "{model}: PPL kiln {ours:.4}, llama.cpp {reference:.4}, relative difference {:.3}%",
        rel * 100.0
    );
    assert!(rel <= 0.01, "{model}: PPL {ours:.4} vs llama.cpp {reference:.4}");
}

#[test]
fn perplexity_smollm2() {
    perplexity_agrees_with_llama_cpp(MODELS[0]);
}

#[test]
fn perplexity_gemma3() {
    perplexity_agrees_with_llama_cpp(MODELS[1]);
}

#[test]
fn perplexity_qwen2() {
    perplexity_agrees_with_llama_cpp(MODELS[2]);
}
