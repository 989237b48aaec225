//! Bad input gets a one-line error naming the problem and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::models::gguf::GgufBuilder;
use kiln::registry;

/// A scratch directory unique to one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-bad-input-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `kiln generate` on `model` and returns its stderr, checking it failed cleanly.
fn generate_fails(model: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--temperature", "0", "-n", "4", "-m"])
        .arg(model)
        .args(if extra.is_empty() { &["-p", "hello"][..] } else { extra })
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kiln succeeded on bad input: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1 (not a signal or panic): {stderr}"
    );
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    // A loaded model's engine says once which backend runs it ("kiln: cpu: ...").
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("kiln: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    stderr
}

/// A small valid GGUF of a Llama model with no weights beyond one tensor.
fn tiny_gguf(arch: &str) -> Vec<u8> {
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", arch);
    b.tensor_f32("token_embd.weight", &[4, 8], &[0.5; 32]);
    b.build()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The offset within `file` of the tensor-info fields that follow `name`:
/// n_dims (u32), dims (u64 each), type (u32), offset (u64).
fn tensor_info_after_name(file: &[u8], name: &str) -> usize {
    file.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len()
}

#[test]
fn truncated_gguf() {
    let dir = scratch("truncated");
    let full = tiny_gguf("llama");
    for cut in [10, 40, full.len() / 2, full.len() - 1] {
        let path = write(&dir, "cut.gguf", &full[..cut]);
        let err = generate_fails(&path, &[]);
        assert!(
            err.contains("truncated") || err.contains("past the end"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn wrong_magic() {
    let dir = scratch("magic");
    let mut bytes = tiny_gguf("llama");
    bytes[..4].copy_from_slice(b"GGML");
    let err = generate_fails(&write(&dir, "magic.gguf", &bytes), &[]);
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn tensor_offset_past_the_end() {
    let dir = scratch("offset");
    let mut bytes = tiny_gguf("llama");
    let at = tensor_info_after_name(&bytes, "token_embd.weight") + 4 + 2 * 8 + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let err = generate_fails(&write(&dir, "offset.gguf", &bytes), &[]);
    assert!(
        err.contains("token_embd.weight") && err.contains("past the end"),
        "{err}"
    );
}

#[test]
fn unknown_quant_type() {
    let dir = scratch("qtype");
    let mut bytes = tiny_gguf("llama");
    let at = tensor_info_after_name(&bytes, "token_embd.weight") + 4 + 2 * 8;
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = generate_fails(&write(&dir, "qtype.gguf", &bytes), &[]);
    assert!(err.contains("token_embd.weight") && err.contains("99"), "{err}");
}

#[test]
fn unknown_architecture() {
    let dir = scratch("arch");
    let err = generate_fails(&write(&dir, "arch.gguf", &tiny_gguf("mamba")), &[]);
    assert!(err.contains("unknown architecture `mamba`"), "{err}");
}

#[test]
fn missing_metadata() {
    let dir = scratch("meta");
    let err = generate_fails(&write(&dir, "meta.gguf", &tiny_gguf("llama")), &[]);
    assert!(err.contains("llama.attention.head_count"), "{err}");
}

#[test]
fn corrupt_safetensors_header() {
    let dir = scratch("safetensors");
    write(&dir, "config.json", br#"{"model_type": "llama"}"#);
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json");
    write(&dir, "model.safetensors", &bytes);
    let err = generate_fails(&dir, &[]);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_config_json() {
    let dir = scratch("config");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama/model.safetensors");
    std::fs::copy(source, dir.join("model.safetensors")).unwrap();
    let err = generate_fails(&dir, &[]);
    assert!(err.contains("config.json") && err.contains("not found"), "{err}");
}

#[test]
fn missing_model_file() {
    let err = generate_fails(Path::new("/nonexistent/model.gguf"), &[]);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn prompt_longer_than_the_context() {
    let model = registry::cached_path("smollm2-135m-instruct");
    assert!(model.exists(), "run `kiln pull smollm2-135m-instruct`");
    let prompt = "word ".repeat(100);
    let err = generate_fails(&model, &["-c", "32", "-p", &prompt]);
    assert!(err.contains("context holds 32"), "{err}");
}
