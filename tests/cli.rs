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

/// `--sessions 1,2` measures both counts in one run (their rounds interleaved): a row
/// each, with its own samples, and the ratio of their aggregate tokens/s in the table's
/// notes.
#[test]
fn bench_compares_session_counts_in_one_run() {
    let args = "bench -m smollm2-135m-instruct -p 0 -n 4 -r 2 --ttft 0 --backend cpu --sessions 1,2";
    let args: Vec<&str> = args.split(' ').collect();
    let json: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
    let out = kiln(&json, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let counts: Vec<_> = rows.iter().map(|r| r["n_sessions"].as_u64()).collect();
    assert_eq!(counts, [Some(1), Some(2)]);
    for row in &rows {
        assert_eq!(row["samples_ts"].as_array().unwrap().len(), 2, "{row}");
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0, "{row}");
    }
    let out = kiln(&args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let ratio = text
        .lines()
        .find_map(|l| l.strip_prefix("tg4: 2 sessions / 1 = "))
        .and_then(|rest| rest.strip_suffix("x the tokens/s"))
        .and_then(|x| x.parse::<f64>().ok());
    assert!(ratio.is_some_and(|r| r > 0.0), "no ratio line in:\n{text}");
}

/// `--backend gpu` runs on any GPU adapter (Mesa's lavapipe here) and says so in the
/// rows; without one it must fail clearly, unless `KILN_NO_GPU=1`.
#[test]
fn bench_runs_on_the_gpu() {
    if std::env::var("KILN_NO_GPU").as_deref() == Ok("1") {
        println!("KILN_NO_GPU=1: GPU bench test skipped");
        return;
    }
    // Lavapipe is slow: tiny tests, and no time-to-first-token run.
    let args: Vec<&str> = "bench -m smollm2-135m-instruct --backend gpu -p 8 -n 2 -r 1 --ttft 0 -o json"
        .split(' ')
        .collect();
    let out = kiln(&args, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("kiln: gpu: "), "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_ne!(row["backends"], "CPU", "{row}");
    }
}

/// `kiln render` prints exactly what transformers renders (the prompts crate's reference
/// fixture), with no newline added; a template's own error exits non-zero with its text.
#[test]
fn render_prints_the_template_exactly() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prompts/tests/fixtures");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("templates.json")).unwrap()).unwrap();
    let name = "Qwen-Qwen2.5-7B-Instruct.jinja";
    let template = reference["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap();
    let home = temp_home("render");
    let mut checked = 0;
    for case in template["cases"].as_array().unwrap() {
        let conversation = &reference["conversations"][case["conversation"].as_str().unwrap()];
        let messages = home.join("messages.json");
        std::fs::write(&messages, conversation["messages"].to_string()).unwrap();
        let template_file = fixtures.join("templates").join(name);
        let mut args = vec![
            "render".to_string(),
            "--template".into(),
            template_file.to_string_lossy().into(),
            "--messages".into(),
            messages.to_string_lossy().into(),
        ];
        if let Some(tools) = conversation.get("tools").filter(|t| !t.is_null()) {
            let file = home.join("tools.json");
            std::fs::write(&file, tools.to_string()).unwrap();
            args.extend(["--tools".into(), file.to_string_lossy().into()]);
        }
        if case["add_generation_prompt"] == true {
            args.push("--add-generation-prompt".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = kiln(&args, Some(&home));
        match case.get("output") {
            Some(expected) => {
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                assert_eq!(String::from_utf8(out.stdout).unwrap(), expected.as_str().unwrap());
            }
            None => {
                assert!(!out.status.success(), "{case}");
                assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
            }
        }
        checked += 1;
    }
    assert!(checked >= 10);
    // A template that raises: its message is the error.
    let raising = home.join("raise.jinja");
    std::fs::write(&raising, "{{ raise_exception('roles must alternate') }}").unwrap();
    let messages = home.join("messages.json");
    std::fs::write(&messages, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let out = kiln(
        &[
            "render",
            "--template",
            raising.to_str().unwrap(),
            "--messages",
            messages.to_str().unwrap(),
        ],
        Some(&home),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("roles must alternate"));
}
