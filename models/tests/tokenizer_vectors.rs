//! Tokenizers built from GGUF metadata against reference token ids:
//!
//! * llama.cpp's tokenizer test vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`,
//!   made by Hugging Face tokenizers; read as llama.cpp's `test-tokenizer-0` reads them,
//!   encoded without BOS and with `parse_special = false`), from the llama.cpp source
//!   that `scripts/fetch-llama-cpp-src.sh` fetches;
//! * the real models kiln runs (`$KILN_HOME/models/NAME.gguf`, `kiln pull NAME`) on
//!   `tests/fixtures/tokenizer/mixed.txt`, against `llama-tokenize` output and, where a
//!   `tokenizer.json` is published, Hugging Face tokenizers output, both committed as
//!   fixtures by `scripts/fixtures/tokenizer.sh`; and decoding back to the same text.

use std::path::{Path, PathBuf};

use kiln_models::gguf::GgufFile;
use kiln_models::tokenizer::{GgufVocab, TokenizerInfo};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("models/ is in the repo")
        .to_path_buf()
}

fn llama_cpp_models() -> PathBuf {
    let dir = repo_root().join("third_party/llama-cpp-python-0.3.36/vendor/llama.cpp/models");
    assert!(
        dir.join("ggml-vocab-gpt-2.gguf.inp").is_file(),
        "llama.cpp's tokenizer test vectors are missing from {}: run scripts/fetch-llama-cpp-src.sh",
        dir.display()
    );
    dir
}

fn load_gguf(path: &Path) -> TokenizerInfo {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let vocab = GgufVocab::from_gguf(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    kiln_models::tokenizer::from_gguf_vocab(&vocab).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cases of a `.inp`/`.out` pair: inputs separated by "\n__ggml_vocab_test__\n",
/// one line of space-separated ids per input.
fn read_cases(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(inp).unwrap();
    let out = std::fs::read_to_string(out).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(i) => {
                inputs.push(inp[pos..pos + i].to_string());
                pos += i + sep.len();
            }
            None => {
                inputs.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{} inputs, {} outputs",
        inputs.len(),
        outputs.len()
    );
    inputs.into_iter().zip(outputs).collect()
}

fn check_vocab(name: &str) {
    let dir = llama_cpp_models();
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let mut info = load_gguf(&gguf);
    // llama.cpp's test-tokenizer-0: parse_special = false (user-defined tokens are still
    // matched whole, control tokens are text).
    info.tokenizer.set_encode_special_tokens(true);
    let cases = read_cases(
        &dir.join(format!("ggml-vocab-{name}.gguf.inp")),
        &dir.join(format!("ggml-vocab-{name}.gguf.out")),
    );
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = info.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        if &got != want {
            let show = |ids: &[u32]| {
                ids.iter()
                    .map(|&i| format!("{i} {:?}", info.tokenizer.id_to_token(i).unwrap_or_default()))
                    .collect::<Vec<_>>()
            };
            failures.push(format!(
                "  {text:?}\n    want {:?}\n    got  {:?}",
                show(want),
                show(&got)
            ));
        }
    }
    println!(
        "ggml-vocab-{name}: {}/{} cases pass",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "ggml-vocab-{name}: {} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn vocab_gpt_2() {
    check_vocab("gpt-2");
}

#[test]
fn vocab_llama_bpe() {
    check_vocab("llama-bpe");
}

#[test]
fn vocab_qwen2() {
    check_vocab("qwen2");
}

#[test]
fn vocab_llama_spm() {
    check_vocab("llama-spm");
}

#[test]
fn vocab_phi_3() {
    check_vocab("phi-3");
}

// Beyond what kiln's models need: every other vocabulary llama.cpp ships vectors for,
// except bert-bge (WordPiece).

#[test]
fn vocab_deepseek_coder() {
    check_vocab("deepseek-coder");
}

#[test]
fn vocab_deepseek_llm() {
    check_vocab("deepseek-llm");
}

#[test]
fn vocab_starcoder() {
    check_vocab("starcoder");
}

#[test]
fn vocab_falcon() {
    check_vocab("falcon");
}

#[test]
fn vocab_refact() {
    check_vocab("refact");
}

#[test]
fn vocab_command_r() {
    check_vocab("command-r");
}

#[test]
fn vocab_mpt() {
    check_vocab("mpt");
}

#[test]
fn vocab_qwen35() {
    check_vocab("qwen35");
}

#[test]
fn vocab_gemma_4() {
    check_vocab("gemma-4");
}

// ---------------------------------------------------------------------------------------
// Real models on mixed text.

fn kiln_model(name: &str) -> PathBuf {
    let home = std::env::var_os("KILN_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME or KILN_HOME is set")).join(".cache/kiln")
    });
    let path = home.join("models").join(format!("{name}.gguf"));
    assert!(path.is_file(), "{} is missing: run `kiln pull {name}`", path.display());
    path
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/tokenizer").join(name)
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Where two id sequences part, with the tokens around it.
fn first_difference(info: &TokenizerInfo, want: &[u32], got: &[u32]) -> String {
    let i = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let show = |ids: &[u32]| {
        let lo = i.saturating_sub(3);
        ids[lo..(i + 5).min(ids.len())]
            .iter()
            .map(|&t| format!("{t} {:?}", String::from_utf8_lossy(info.token_bytes(t))))
            .collect::<Vec<_>>()
    };
    format!(
        "{} vs {} tokens, first difference at {i}:\n  want {:?}\n  got  {:?}",
        want.len(),
        got.len(),
        show(want),
        show(got)
    )
}

/// `eog`: llama.cpp's end-of-generation set for the model, as its loader prints it
/// ("printing all EOG tokens"), the model's eos first.
fn check_real_model(name: &str, chat_end: &str, eog: &[u32]) -> TokenizerInfo {
    let text = std::fs::read_to_string(fixture("mixed.txt")).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.ids.json"))).unwrap()).unwrap();
    let info = load_gguf(&kiln_model(name));

    let got = info.encode(&text).unwrap();
    let want = ids_of(&reference["llama_cpp"]["ids"]);
    assert!(
        got == want,
        "{name}: differs from llama-tokenize: {}",
        first_difference(&info, &want, &got)
    );
    let hf = &reference["hf"];
    let also = if hf.is_null() {
        ""
    } else {
        if !hf["ids"].is_null() {
            let want = ids_of(&hf["ids"]);
            assert!(
                got == want,
                "{name}: differs from tokenizer.json: {}",
                first_difference(&info, &want, &got)
            );
        }
        " and Hugging Face tokenizer.json"
    };
    println!(
        "{name}: {} tokens of mixed.txt identical to llama-tokenize{also}",
        got.len()
    );

    // Exact bytes back, through kiln's pieces and through the tokenizers decoder.
    assert!(
        info.decode_bytes(&got) == text.as_bytes(),
        "{name}: decode_bytes(encode(text)) != text"
    );
    let pieces: Vec<u8> = got.iter().flat_map(|&t| info.token_bytes(t).to_vec()).collect();
    assert!(pieces == text.as_bytes(), "{name}: joined token_bytes != text");
    assert!(
        info.tokenizer.decode(&got, false).unwrap() == text,
        "{name}: Tokenizer::decode(encode(text)) != text"
    );

    // The chat turn's end token is one token and ends generation.
    let end = info.encode(chat_end).unwrap();
    assert_eq!(end.len(), 1, "{name}: {chat_end} is not one token");
    assert!(
        info.is_eog(end[0]),
        "{name}: {chat_end} ({}) is not end-of-generation: {:?}",
        end[0],
        info.eos
    );
    assert_eq!(info.eos, eog, "{name}: end-of-generation ids");
    println!("{name}: bos {:?} add_bos {} eos {:?}", info.bos, info.add_bos, info.eos);
    info
}

#[test]
fn real_smollm2_135m_instruct() {
    let info = check_real_model("smollm2-135m-instruct", "<|im_end|>", &[2, 0, 4]);
    assert_eq!((info.bos, info.add_bos), (Some(1), false));
}

#[test]
fn real_gemma3_270m() {
    // 212 is `</s>`, a user-defined HTML tag in Gemma 3 that llama.cpp's EOG list catches.
    let info = check_real_model("gemma3-270m", "<end_of_turn>", &[1, 106, 212]);
    assert_eq!((info.bos, info.add_bos, info.add_space_prefix), (Some(2), true, false));
    // Runs of spaces, tabs and newlines are user-defined tokens, matched before merging.
    assert_eq!(info.encode("a   b\n\n\nc").unwrap(), [236746, 139, 236763, 109, 236755]);
}

#[test]
fn real_qwen2_5_coder_0_5b_instruct() {
    // 128247 is the ordinary token `</s>`: llama.cpp's EOG list catches it too and makes it
    // a control token, so `</s>` in a prompt is one token (`llama-tokenize -p 'a</s>b'`
    // gives [64, 128247, 65]; Hugging Face gives [64, 522, 82, 51407]).
    let info = check_real_model(
        "qwen2.5-coder-0.5b-instruct",
        "<|im_end|>",
        &[151645, 128247, 151643, 151662, 151663, 151664],
    );
    assert_eq!((info.bos, info.add_bos), (Some(151643), false));
    assert_eq!(info.encode("a</s>b").unwrap(), [64, 128247, 65]);
}

// ---------------------------------------------------------------------------------------
// tokenizer.json loading: a GGUF-built tokenizer written out as tokenizer.json (with a
// tokenizer_config.json beside it) loads back to the same encodings and metadata.

fn check_tokenizer_json(vocab: &str, config: serde_json::Value, want_bos: Option<u32>, want_eos_first: u32) {
    let dir = llama_cpp_models();
    let gguf = load_gguf(&dir.join(format!("ggml-vocab-{vocab}.gguf")));
    let tmp = std::env::temp_dir().join(format!("kiln-tokenizer-json-{vocab}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("tokenizer.json"), gguf.tokenizer.to_string(false).unwrap()).unwrap();
    std::fs::write(tmp.join("tokenizer_config.json"), config.to_string()).unwrap();
    let from_dir = kiln_models::tokenizer::from_tokenizer_json(&tmp, None);
    let from_file = kiln_models::tokenizer::from_tokenizer_json(tmp.join("tokenizer.json"), Some(&config));
    std::fs::remove_dir_all(&tmp).unwrap();
    for hf in [from_dir.unwrap(), from_file.unwrap()] {
        assert_eq!(hf.bos, want_bos, "{vocab}: bos");
        assert_eq!(hf.add_bos, gguf.add_bos, "{vocab}: add_bos");
        assert_eq!(hf.add_space_prefix, gguf.add_space_prefix, "{vocab}: add_space_prefix");
        assert_eq!(hf.eos.first(), Some(&want_eos_first), "{vocab}: eos {:?}", hf.eos);
        let cases = read_cases(
            &dir.join(format!("ggml-vocab-{vocab}.gguf.inp")),
            &dir.join(format!("ggml-vocab-{vocab}.gguf.out")),
        );
        for (text, _) in &cases {
            let ids = gguf.encode(text).unwrap();
            assert_eq!(hf.encode(text).unwrap(), ids, "{vocab}: {text:?}");
            assert_eq!(hf.decode_bytes(&ids), gguf.decode_bytes(&ids), "{vocab}: {text:?}");
        }
        for id in 0..gguf.vocab_size() as u32 {
            assert_eq!(hf.token_bytes(id), gguf.token_bytes(id), "{vocab}: token {id}");
        }
    }
}

#[test]
fn tokenizer_json_byte_level() {
    let config = serde_json::json!({"bos_token": null, "eos_token": "<|endoftext|>", "add_bos_token": false});
    check_tokenizer_json("qwen2", config, None, 151643);
}

#[test]
fn tokenizer_json_sentencepiece() {
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "add_bos_token": true,
    });
    check_tokenizer_json("llama-spm", config, Some(1), 2);
}
