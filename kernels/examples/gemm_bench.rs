//! Throughput of the matrix kernels on one thread, per weight type, for a decode shape
//! (one token) and a prefill shape (many tokens):
//! `cargo run --release -p kiln-kernels --example gemm_bench [-- TYPE...]`.
//!
//! With `--dram`, decode only, over a 256 MiB matrix (far beyond the caches) on two
//! threads, each taking half the rows: the memory-bound case of real models' decode
//! (with `--tokens N` as well, N tokens: batched decode over weights streamed from DRAM).
//! With `--model-prefill`, prefill only, at the shapes of the small models' matrices
//! (rows × cols × 512 tokens). With `--tokens N`, SmolLM2's matrix shapes at a batch of
//! N tokens (batched decode).

use std::time::Instant;

use kiln_kernels::gemm::{gemm, simd_level, OutMatrix, RowShape};
use kiln_kernels::qdot::{activation_format, quantize_activations};
use kiln_kernels::GgmlType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dram = args.iter().any(|a| a == "--dram");
    let model_prefill = args.iter().any(|a| a == "--model-prefill");
    // `--tokens N`: SmolLM2's shapes at a batch of N tokens.
    let tokens_arg: Option<usize> = args
        .iter()
        .position(|a| a == "--tokens")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok());
    let wanted: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .collect();
    println!("SIMD level: {:?}", simd_level());
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        if !wanted.is_empty() && !wanted.iter().any(|w| w.eq_ignore_ascii_case(&ty.to_string())) {
            continue;
        }
        // Decode: a 2048 × 1024 matrix (a few MiB, L2/L3) and one token; prefill: 256
        // rows × 1024 cols against 512 tokens.
        let shapes: Vec<(usize, usize, usize)> = if dram {
            let cols = if ty.block_size() == 256 { 1024 } else { 896 };
            vec![((256 << 20) / ty.row_bytes(cols).unwrap(), cols, tokens_arg.unwrap_or(1))]
        } else if let Some(n) = tokens_arg {
            // SmolLM2's widest matrices (ffn gate/up: 1536 × 576, down: 576 × 1536) at a
            // small batch: the shape of batched decode across sessions.
            vec![(1536, 576, n), (576, 1536, n)]
        } else if model_prefill {
            // Gemma-3-270M attn_output and ffn_down, Qwen2.5-0.5B ffn_down.
            vec![(640, 1024, 512), (640, 2048, 512), (896, 4864, 512)]
        } else {
            vec![(2048, 1024, 1), (256, 1024, 512)]
        };
        // SmolLM2's widths are not whole 256-value blocks: K-quants skip those shapes.
        for (rows, cols, tokens) in shapes.into_iter().filter(|s| s.1 % ty.block_size() == 0) {
            let rb = ty.row_bytes(cols).unwrap();
            let weights: Vec<u8> = (0..rows * rb).map(|i| ((i * 2654435761usize) >> 7) as u8).collect();
            let mut weights = weights;
            // Sane scales: overwrite every block's first f16 field (d) with 0.01.
            let ts = ty.type_size();
            let d_at = if ty == GgmlType::Q6_K { 208 } else { 0 };
            for b in 0..weights.len() / ts {
                weights[b * ts + d_at..b * ts + d_at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
            let fmt = activation_format(ty);
            let mut acts = Vec::new();
            let mut one = Vec::new();
            for t in 0..tokens {
                let x: Vec<f32> = (0..cols).map(|i| ((i * 7 + t * 13) % 17) as f32 - 8.0).collect();
                quantize_activations(fmt, &x, &mut one);
                acts.extend_from_slice(&one);
            }
            // A prefill shape is one sequence's prompt, whose rows the model passes with
            // their shapes (which pick llama.cpp's batched order, and kernel, for
            // K-quants); batched decode's tokens are each a sequence of one.
            let row_shapes: Vec<RowShape> = if tokens > 1 && tokens_arg.is_none() {
                RowShape::of_sequence(tokens).collect()
            } else {
                Vec::new()
            };
            let row_shapes = &row_shapes;
            let mut out = vec![0f32; rows * tokens];
            let threads = if dram { 2 } else { 1 };
            let run = |out: &mut Vec<f32>| {
                // SAFETY: out holds tokens × rows; each thread writes its own rows.
                let o = unsafe { OutMatrix::new(out.as_mut_ptr(), rows) };
                if threads == 1 {
                    // Inline: spawning a thread per call would cost more than a small product.
                    gemm(ty, &weights, rows, cols, &acts, tokens, row_shapes, o);
                    return;
                }
                let per = rows.div_ceil(threads);
                std::thread::scope(|s| {
                    for i in 0..threads {
                        let (r0, r1) = (i * per, rows.min((i + 1) * per));
                        let (w, acts) = (&weights[r0 * rb..r1 * rb], &acts);
                        s.spawn(move || gemm(ty, w, r1 - r0, cols, acts, tokens, row_shapes, o.offset_cols(r0)));
                    }
                });
            };
            run(&mut out);
            let reps = (2e9 / (rows * cols * tokens) as f64).clamp(3.0, 2000.0) as usize;
            let start = Instant::now();
            for _ in 0..reps {
                run(&mut out);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let macs = (rows * cols * tokens) as f64;
            println!(
                "{ty:5} rows {rows:5} cols {cols} tokens {tokens:3}: {:8.1} µs  {:6.1} GMAC/s  {:5.1} GB/s weights",
                secs * 1e6,
                macs / secs / 1e9,
                (rows * rb) as f64 / secs / 1e9
            );
        }
    }
}
