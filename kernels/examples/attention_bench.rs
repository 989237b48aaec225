//! Attention on one thread, the scalar reference path ([`ops::attend`] per query and head,
//! as before work items) against the SIMD kernel, for prefill and decode shapes of
//! Gemma 3 1B and SmolLM2:
//! `cargo run --release -p kiln-kernels --example attention_bench [-- NAME-SUBSTRING...]`.
//!
//! GFLOP/s count 4 · head_dim flops per visible (query, key) pair and head; GB/s count
//! the keys and values visible to the first query, read once (f32): the bound for decode.
//! The last column is the kernel over an f16 cache of the same values, as the CPU backend
//! keeps it (for calls of few queries, the f16-accumulator kernel).

use std::time::Instant;

use kiln_kernels::attention::{
    combine, partial_floats, run_item_at, work_items, AttnGeometry, CacheRows, KvPages, Partials,
};
use kiln_kernels::gemm::{simd_level, OutMatrix, SimdLevel};

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    println!("SIMD level: {:?}", simd_level());
    let gemma = |n_tokens, start_pos| AttnGeometry {
        n_tokens,
        start_pos,
        run_start: start_pos,
        run_end: start_pos + n_tokens,
        n_head: 4,
        n_kv_head: 1,
        head_dim: 256,
        kv_stride: 256,
        scale: 1.0 / 16.0,
        window: Some(512),
        f16_cache: false,
    };
    let smol = |n_tokens, start_pos| AttnGeometry {
        n_tokens,
        start_pos,
        run_start: start_pos,
        run_end: start_pos + n_tokens,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        kv_stride: 3 * 64,
        scale: 1.0 / 8.0,
        window: None,
        f16_cache: false,
    };
    let shapes = [
        ("gemma3  prefill 512", gemma(512, 0)),
        ("smollm2 prefill 512", smol(512, 0)),
        // Gemma 3's global layers (one in six) have no window.
        (
            "gemma3  decode  ctx 4096 global",
            AttnGeometry {
                window: None,
                ..gemma(1, 4095)
            },
        ),
        ("smollm2 decode  ctx 4096", smol(1, 4095)),
        // Batched sessions' decode: many short contexts.
        ("smollm2 decode  ctx 128", smol(1, 127)),
    ];
    for (name, g) in shapes {
        if !wanted.is_empty() && !wanted.iter().any(|w| name.contains(w.as_str())) {
            continue;
        }
        let rows = g.start_pos + g.n_tokens;
        let d = g.head_dim;
        let fill = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| half::f16::from_f32(((i * k % 1009) as f32 / 1009.0 - 0.5) * 2.0).to_f32())
                .collect()
        };
        let q = fill(g.n_tokens * g.n_head * d, 7);
        let (keys, values) = (fill(rows * g.kv_stride, 13), fill(rows * g.kv_stride, 17));
        let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect() };
        let (keys16, values16) = (bits(&keys), bits(&values));
        let mut out = vec![0f32; g.n_tokens * g.n_head * d];
        let pairs: usize = (0..g.n_tokens)
            .map(|t| {
                let pos = g.start_pos + t;
                pos + 1 - g.window.map_or(0, |w| (pos + 1).saturating_sub(w))
            })
            .sum();
        let flops = (4 * d * pairs * g.n_head) as f64;
        let first_row = g.window.map_or(0, |w| (g.start_pos + 1).saturating_sub(w));
        let bytes = (2 * (rows - first_row) * g.n_kv_head * d * 4) as f64;
        let mut time = |level: SimdLevel, f16: bool| -> f64 {
            let g = AttnGeometry { f16_cache: f16, ..g };
            let mut partials = vec![0f32; partial_floats(&g)];
            let (p_ptr, p_len) = (partials.as_mut_ptr(), partials.len());
            // SAFETY: out holds n_tokens rows of n_head × head_dim, partials what the
            // call's items need; items run one at a time.
            let (o, p) = unsafe {
                (
                    OutMatrix::new(out.as_mut_ptr(), g.n_head * d),
                    Partials::new(p_ptr, p_len),
                )
            };
            let run = || {
                for item in 0..work_items(&g) {
                    let (k, v) = if f16 {
                        (CacheRows::F16(&keys16), CacheRows::F16(&values16))
                    } else {
                        (CacheRows::F32(&keys), CacheRows::F32(&values))
                    };
                    run_item_at(level, &g, &q, k, v, KvPages::contiguous(), item, o, p);
                }
                // SAFETY: the items above are done writing the partials.
                combine(&g, unsafe { std::slice::from_raw_parts(p_ptr, p_len) }, o);
            };
            run();
            // The best of several batches of ~0.1 s: the machine is shared and noisy.
            let reps = ((0.1 / (flops * 1e-9)).max(1.0) as usize).min(10_000);
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..reps {
                        run();
                    }
                    start.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        let old = time(SimdLevel::Scalar, false);
        let new = time(simd_level(), false);
        let half = time(simd_level(), true);
        println!(
            "{name:31} old {:9.1} µs {:6.2} GFLOP/s {:6.1} GB/s | new {:9.1} µs {:6.2} GFLOP/s {:6.1} GB/s | x{:.1} | f16 cache {:9.1} µs",
            old * 1e6,
            flops / old * 1e-9,
            bytes / old * 1e-9,
            new * 1e6,
            flops / new * 1e-9,
            bytes / new * 1e-9,
            old / new,
            half * 1e6
        );
    }
}
