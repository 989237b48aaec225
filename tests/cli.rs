//! The `kiln` command line as a user runs it: pull, models, generate, perplexity, bench.

use std::path::PathBuf;
use std::process::{Command, Output};

use kiln::registry;

fn kiln(args: &[&str], home: Option<&PathBuf>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    if let Some(home) = home {
        cmd.env("KILN_HOME", home);
    }
    cmd.output().unwrap()
}

fn temp_home(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn pull_fetches_verifies_and_lists_a_model() {
    let home = temp_home("pull");
    let out = kiln(&["pull", "smollm2-135m-instruct"], Some(&home));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = home.join("models/smollm2-135m-instruct.gguf");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256 verified"));
    let listed = String::from_utf8_lossy(&kiln(&["models"], Some(&home)).stdout).into_owned();
    assert!(listed.contains("smollm2-135m-instruct"), "{listed}");
    // No partial file or download left behind.
    let leftovers: Vec<_> = std::fs::read_dir(home.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn an_interrupted_pull_leaves_nothing_that_loads() {
    let home = temp_home("partial");
    std::fs::create_dir_all(home.join("models")).unwrap();
    std::fs::write(home.join("models/gemma3-270m.gguf.partial"), b"GGUF half a file").unwrap();
    let listed = String::from_utf8_lossy(&kiln(&["models"], Some(&home)).stdout).into_owned();
    assert!(listed.contains("(none)"), "{listed}");
}

#[test]
fn unknown_model_names_are_clear_errors() {
    let out = kiln(
        &["generate", "-m", "no-such-model", "-p", "hi"],
        Some(&temp_home("unknown")),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model `no-such-model`"), "{err}");
}

#[test]
fn generate_prints_only_the_generated_text() {
    let model = registry::cached_path("smollm2-135m-instruct");
    assert!(model.exists(), "run `kiln pull smollm2-135m-instruct`");
    let args = [
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "8",
        "--temperature",
        "0",
    ];
    let out = kiln(&args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert!(!text.contains("t/s"), "timings belong on stderr: {text:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("t/s"));
    // Seeded sampling is reproducible.
    let sampled = [
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "Once upon a time",
        "-n",
        "12",
        "--seed",
        "7",
    ];
    assert_eq!(kiln(&sampled, None).stdout, kiln(&sampled, None).stdout);
}

#[test]
fn bench_prints_llama_bench_json_rows() {
    let model = registry::cached_path("smollm2-135m-instruct");
    assert!(model.exists(), "run `kiln pull smollm2-135m-instruct`");
    // A short time-to-first-token prompt: the default 512 tokens would dominate the test's time.
    let model_arg = model.to_str().unwrap();
    let args = [
        "bench", "-m", model_arg, "-p", "8", "-n", "4", "-r", "1", "--ttft", "8", "-o", "json",
    ];
    let out = kiln(&args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let tests: Vec<_> = rows
        .iter()
        .map(|r| (r["n_prompt"].as_u64(), r["n_gen"].as_u64()))
        .collect();
    assert_eq!(tests, [(Some(8), Some(0)), (Some(0), Some(4))]);
    for row in &rows {
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["samples_ns"].as_array().unwrap().len(), 1, "{row}");
        assert_eq!(row["samples_ts"].as_array().unwrap().len(), 1, "{row}");
        assert_eq!(row["model_filename"], model.to_str().unwrap());
        for extra in ["load_ns", "ttft_avg_ns", "peak_rss_bytes"] {
            assert!(row[extra].as_u64().unwrap() > 0, "{extra}: {row}");
        }
    }
}

#[test]
fn bench_on_gpu_is_a_clear_error() {
    let out = kiln(&["bench", "-m", "smollm2-135m-instruct", "--backend", "gpu"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no GPU backend"), "{err}");
}
