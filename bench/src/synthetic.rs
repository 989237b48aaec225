//! Models with random weights in the shapes and quantization mixes of real ones, written
//! as GGUF files, so that speed can be measured where the real files cannot travel (a
//! lent GPU machine) or are not at hand. The weights are noise: only the timings mean
//! anything.

use std::path::{Path, PathBuf};

use kiln_models::gguf::GgufBuilder;
use kiln_runtime::GgmlType;

use crate::{BenchError, Result};

/// The architectures a synthetic model can take, by the name of a real model.
#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    arch: &'static str,
    n_layer: usize,
    d_model: usize,
    n_head: usize,
    n_kv_head: usize,
    d_ff: usize,
    vocab: usize,
    /// The output projection is the embedding table.
    tied: bool,
    /// q/k/v have biases (Qwen2).
    qkv_bias: bool,
    rope_theta: f32,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "qwen2-0.5b",
        arch: "qwen2",
        n_layer: 24,
        d_model: 896,
        n_head: 14,
        n_kv_head: 2,
        d_ff: 4864,
        vocab: 151_936,
        tied: true,
        qkv_bias: true,
        rope_theta: 1_000_000.0,
    },
    Shape {
        name: "llama-1b",
        arch: "llama",
        n_layer: 16,
        d_model: 2048,
        n_head: 32,
        n_kv_head: 8,
        d_ff: 8192,
        vocab: 128_256,
        tied: true,
        qkv_bias: false,
        rope_theta: 500_000.0,
    },
    Shape {
        name: "llama-8b",
        arch: "llama",
        n_layer: 32,
        d_model: 4096,
        n_head: 32,
        n_kv_head: 8,
        d_ff: 14_336,
        vocab: 128_256,
        tied: false,
        qkv_bias: false,
        rope_theta: 500_000.0,
    },
];

/// The names `--synthetic` takes.
pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

/// Quantization mixes, as llama.cpp's `llama-quantize` lays them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    /// Q4_K, with Q6_K for attn_v, ffn_down and the output (llama.cpp's Q4_K_M keeps
    /// more of those in Q6_K; this is its weight-byte budget to within a few percent).
    Q4KM,
    Q8_0,
}

impl Mix {
    fn parse(s: &str) -> Result<Mix> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Ok(Mix::Q4KM),
            "q8_0" => Ok(Mix::Q8_0),
            _ => Err(BenchError::Invalid(format!(
                "unknown quantization `{s}` (q4_k_m or q8_0)"
            ))),
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Mix::Q4KM => 15,
            Mix::Q8_0 => 7,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Mix::Q4KM => "Q4_K_M",
            Mix::Q8_0 => "Q8_0",
        }
    }

    /// The type of a weight matrix with this name's role and row length. Rows that are
    /// not whole 256-value super-blocks fall back as llama-quantize's do: Q4_K to Q5_0,
    /// Q6_K to Q8_0.
    fn ty(self, role: &str, cols: usize) -> GgmlType {
        let whole = cols.is_multiple_of(256);
        match self {
            Mix::Q8_0 => GgmlType::Q8_0,
            Mix::Q4KM if matches!(role, "attn_v" | "ffn_down" | "output") => {
                if whole {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q8_0
                }
            }
            Mix::Q4KM if whole => GgmlType::Q4_K,
            Mix::Q4KM => GgmlType::Q5_0,
        }
    }
}

/// The path of the synthetic model `name` in `quant` under `dir`, writing it first if
/// it is not there (a few seconds for the 8B shape; the file is as large as the real
/// model's).
pub fn ensure(name: &str, quant: &str, dir: &Path) -> Result<PathBuf> {
    let shape = SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        BenchError::Invalid(format!(
            "unknown synthetic model `{name}` ({})",
            shape_names().join(", ")
        ))
    })?;
    let mix = Mix::parse(quant)?;
    let path = dir.join(format!("synthetic-{}-{}.gguf", shape.name, mix.tag()));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| BenchError::Invalid(format!("{}: {e}", dir.display())))?;
    let bytes = build(shape, mix);
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| BenchError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(path)
}

fn build(s: &Shape, mix: Mix) -> Vec<u8> {
    let mut b = GgufBuilder::new();
    let arch = s.arch;
    let head_dim = s.d_model / s.n_head;
    b.metadata("general.architecture", arch)
        .metadata("general.name", format!("synthetic {} {}", s.name, mix.tag()))
        .metadata("general.file_type", mix.file_type())
        .metadata(format!("{arch}.block_count"), s.n_layer as u32)
        .metadata(format!("{arch}.context_length"), 32_768u32)
        .metadata(format!("{arch}.embedding_length"), s.d_model as u32)
        .metadata(format!("{arch}.feed_forward_length"), s.d_ff as u32)
        .metadata(format!("{arch}.attention.head_count"), s.n_head as u32)
        .metadata(format!("{arch}.attention.head_count_kv"), s.n_kv_head as u32)
        .metadata(format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-6f32)
        .metadata(format!("{arch}.rope.freq_base"), s.rope_theta);
    // A SentencePiece-style vocabulary of placeholder pieces: the benchmark feeds ids.
    let tokens: Vec<String> = (0..s.vocab).map(|i| format!("<t{i}>")).collect();
    b.metadata("tokenizer.ggml.model", "llama")
        .metadata("tokenizer.ggml.tokens", tokens)
        .metadata("tokenizer.ggml.scores", vec![0f32; s.vocab])
        .metadata("tokenizer.ggml.bos_token_id", 1u32)
        .metadata("tokenizer.ggml.eos_token_id", 2u32);
    let mut rng = 0x5eed_u64;
    let kv_dim = s.n_kv_head * head_dim;
    let mut matrix = |b: &mut GgufBuilder, name: String, role: &str, cols: usize, rows: usize| {
        let ty = mix.ty(role, cols);
        b.tensor(name, &[cols, rows], ty, random_blocks(ty, cols * rows, &mut rng));
    };
    matrix(&mut b, "token_embd.weight".into(), "token_embd", s.d_model, s.vocab);
    if !s.tied {
        matrix(&mut b, "output.weight".into(), "output", s.d_model, s.vocab);
    }
    b.tensor_f32("output_norm.weight", &[s.d_model], &vec![1.0; s.d_model]);
    for l in 0..s.n_layer {
        let p = format!("blk.{l}");
        b.tensor_f32(format!("{p}.attn_norm.weight"), &[s.d_model], &vec![1.0; s.d_model]);
        b.tensor_f32(format!("{p}.ffn_norm.weight"), &[s.d_model], &vec![1.0; s.d_model]);
        matrix(&mut b, format!("{p}.attn_q.weight"), "attn_q", s.d_model, s.d_model);
        matrix(&mut b, format!("{p}.attn_k.weight"), "attn_k", s.d_model, kv_dim);
        matrix(&mut b, format!("{p}.attn_v.weight"), "attn_v", s.d_model, kv_dim);
        matrix(
            &mut b,
            format!("{p}.attn_output.weight"),
            "attn_output",
            s.d_model,
            s.d_model,
        );
        matrix(&mut b, format!("{p}.ffn_gate.weight"), "ffn_gate", s.d_model, s.d_ff);
        matrix(&mut b, format!("{p}.ffn_up.weight"), "ffn_up", s.d_model, s.d_ff);
        matrix(&mut b, format!("{p}.ffn_down.weight"), "ffn_down", s.d_ff, s.d_model);
        if s.qkv_bias {
            for (name, n) in [("attn_q", s.d_model), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                b.tensor_f32(format!("{p}.{name}.bias"), &[n], &vec![0.0; n]);
            }
        }
    }
    b.build()
}

/// `n` values of `ty` as random blocks whose scales are small (|w| ≲ 0.05) and whose
/// weights average zero, so that activations stay finite through the layers.
fn random_blocks(ty: GgmlType, n: usize, rng: &mut u64) -> Vec<u8> {
    let bytes = ty.row_bytes(n).expect("whole blocks");
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let r = rng.to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let scale = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Where each type keeps its f16 scales within a block.
    let (block, fields): (usize, &[(usize, f32)]) = match ty {
        GgmlType::Q4_K => (144, &[(0, 2e-4), (2, 1.5e-3)]),
        GgmlType::Q6_K => (210, &[(208, 1e-3)]),
        GgmlType::Q8_0 => (34, &[(0, 3e-4)]),
        GgmlType::Q5_0 => (22, &[(0, 3e-3)]),
        _ => unreachable!("synthetic mixes use Q4_K, Q5_0, Q6_K and Q8_0"),
    };
    for b in data.chunks_exact_mut(block) {
        for &(at, value) in fields {
            b[at..at + 2].copy_from_slice(&scale(value));
        }
        if ty == GgmlType::Q4_K {
            // Sub-block scales equal to their mins (17 in the first four, 1 in the last),
            // with dmin = 7.5·d: weights of mean zero. Random mins would give every row
            // the same positive mean, one direction that dominates every product and
            // makes the output hang on rounding, so that no two backends could agree.
            b[4..16].fill(0x11);
        }
    }
    data
}
