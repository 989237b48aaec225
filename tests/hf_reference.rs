//! kiln's forward pass against Hugging Face `transformers` (PyTorch, f32, CPU).
//!
//! Fixtures come from `scripts/fixtures/hf_tiny.py`: tiny random-weight checkpoints of
//! each architecture with the logits transformers computes for a fixed token sequence,
//! and, for the three real GGUF models, transformers' top-5 logits at 256 teacher-forced
//! positions after it dequantized the same file to f32.

use std::path::{Path, PathBuf};

use kiln::models::{self, Checkpoint, KvCache, Model, Scratch};
use kiln::registry;
use kiln::runtime::{Backend, CpuBackend, Numerics};
use serde::Deserialize;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(path)
}

/// Runs `tokens` through a fresh cache in chunks of `chunk` tokens and returns every
/// position's logits, so positions past the first chunk read keys and values cached by
/// an earlier pass.
fn all_logits(model: &dyn Model, be: &mut dyn Backend, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let h = model.hyper().clone();
    let mut cache = KvCache::new(be, &h, tokens.len());
    let mut scratch = Scratch::new(be, &h, chunk, chunk);
    let mut logits = vec![0f32; tokens.len() * h.vocab];
    for (i, part) in tokens.chunks(chunk).enumerate() {
        let out = cache.forward(model, be, &mut scratch, part, part.len());
        let start = i * chunk * h.vocab;
        be.read(out, 0, &mut logits[start..start + part.len() * h.vocab]);
    }
    logits
}

fn load(path: &Path) -> (Box<dyn Model>, CpuBackend) {
    // The f32 reference path: transformers computes in f32 from the same dequantized weights.
    let mut be = CpuBackend::with_numerics(None, Numerics::Reference);
    let checkpoint = Checkpoint::open(path).unwrap();
    let model = models::load_model(&checkpoint, &mut be).unwrap();
    (model, be)
}

#[derive(Deserialize)]
struct TinyLogits {
    tokens: Vec<u32>,
    logits: Vec<Vec<f64>>,
}

/// Both sides compute in f32 from the same f32 weights; only the order of additions
/// differs, so logits agree to ~1e-6 relative. 1e-4 leaves room for that while every
/// plausible modelling mistake (a window off by one, a swapped RoPE base, a dropped bias
/// or norm) moves logits by 1e-2 or more.
const TINY_TOLERANCE: f64 = 1e-4;

fn tiny_checkpoint_matches_transformers(dir: &str, logits_from: &str) {
    let reference: TinyLogits =
        serde_json::from_str(&std::fs::read_to_string(fixture(logits_from).join("logits.json")).unwrap()).unwrap();
    let (model, mut be) = load(&fixture(dir));
    for chunk in [reference.tokens.len(), 7] {
        let ours = all_logits(model.as_ref(), &mut be, &reference.tokens, chunk);
        let expected: Vec<f64> = reference.logits.iter().flatten().copied().collect();
        assert_eq!(ours.len(), expected.len());
        let max_ref = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let max_err = ours
            .iter()
            .zip(&expected)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        let rel = max_err / max_ref;
        eprintln!("{dir} (chunks of {chunk}): max |error| {max_err:.3e}, relative {rel:.3e}");
        assert!(
            rel <= TINY_TOLERANCE,
            "{dir}: relative error {rel:.3e} over {TINY_TOLERANCE:e}"
        );
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    tiny_checkpoint_matches_transformers("llama", "llama");
}

#[test]
fn tiny_llama_sharded_checkpoint_matches_transformers() {
    tiny_checkpoint_matches_transformers("llama-sharded", "llama");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    tiny_checkpoint_matches_transformers("qwen2", "qwen2");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    tiny_checkpoint_matches_transformers("qwen3", "qwen3");
}

#[test]
fn tiny_gemma3_matches_transformers() {
    tiny_checkpoint_matches_transformers("gemma3", "gemma3");
}

#[derive(Deserialize)]
struct Top5 {
    tokens: Vec<u32>,
    top5_ids: Vec<Vec<u32>>,
}

/// Teacher-forced over 256 positions, kiln's most likely next token must equal
/// transformers' at ≥ 99% of them. Both dequantize the same GGUF to f32; a position may
/// differ only where the top two logits nearly tie.
fn real_gguf_top1_matches_transformers(name: &str) {
    let reference: Top5 =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("gguf_{name}_top5.json"))).unwrap()).unwrap();
    let path = registry::cached_path(name);
    assert!(path.exists(), "{} is missing: run `kiln pull {name}`", path.display());
    let (model, mut be) = load(&path);
    let inputs = &reference.tokens[..reference.top5_ids.len()];
    let logits = all_logits(model.as_ref(), &mut be, inputs, 64);
    let vocab = model.hyper().vocab;
    let agree = logits
        .chunks(vocab)
        .zip(&reference.top5_ids)
        .filter(|(row, top5)| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, v)| if *v > row[b] { i } else { b });
            best as u32 == top5[0]
        })
        .count();
    eprintln!(
        "{name}: top-1 agrees with transformers at {agree}/{} positions",
        inputs.len()
    );
    assert!(
        agree * 100 >= inputs.len() * 99,
        "{name}: only {agree}/{} agree",
        inputs.len()
    );
}

#[test]
fn smollm2_gguf_top1_matches_transformers() {
    real_gguf_top1_matches_transformers("smollm2-135m-instruct");
}

#[test]
fn gemma3_gguf_top1_matches_transformers() {
    real_gguf_top1_matches_transformers("gemma3-270m");
}

#[test]
fn qwen2_gguf_top1_matches_transformers() {
    real_gguf_top1_matches_transformers("qwen2.5-coder-0.5b-instruct");
}
