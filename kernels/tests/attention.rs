//! Attention work items at every SIMD level this CPU has, against the per-(query, head)
//! references [`ops::attend`] and [`ops::attend_f16_accumulator`], on fresh random
//! inputs (the seed comes from the clock and is printed on failure) at odd sizes.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_kernels::attention::{run_item_at, work_items, AttnGeometry, AttnPrecision};
use kiln_kernels::gemm::{simd_level, OutMatrix, SimdLevel};
use kiln_kernels::ops;

/// xorshift64*: enough randomness for inputs, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Every item of the call, in order, at `level`; unwritten outputs stay NaN.
fn run_items(level: SimdLevel, g: &AttnGeometry, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; g.n_tokens * g.n_head * g.head_dim];
    // SAFETY: out holds n_tokens rows of n_head × head_dim; items run one at a time.
    let o = unsafe { OutMatrix::new(out.as_mut_ptr(), g.n_head * g.head_dim) };
    for item in 0..work_items(g) {
        run_item_at(level, g, q, keys, values, item, o);
    }
    out
}

/// The reference per (query, head), as the runtime called it before work items.
fn reference(g: &AttnGeometry, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    let d = g.head_dim;
    let mut out = vec![0.0; g.n_tokens * g.n_head * d];
    let mut scratch = vec![0.0; (g.start_pos + g.n_tokens).max(d)];
    for (i, head_out) in out.chunks_mut(d).enumerate() {
        let (t, h) = (i / g.n_head, i % g.n_head);
        let pos = g.start_pos + t;
        let first = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let offset = h / (g.n_head / g.n_kv_head) * d;
        let query = &q[i * d..(i + 1) * d];
        if g.precision == AttnPrecision::Ggml && g.n_tokens < 64 {
            ops::attend_f16_accumulator(
                query,
                keys,
                values,
                g.kv_stride,
                offset,
                first,
                pos + 1,
                g.scale,
                &mut scratch,
                head_out,
            );
        } else {
            ops::attend(
                query,
                keys,
                values,
                g.kv_stride,
                offset,
                first,
                pos + 1,
                g.scale,
                &mut scratch,
                head_out,
            );
        }
    }
    out
}

#[test]
fn work_items_match_the_references_at_every_level() {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let levels: Vec<SimdLevel> = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
        .into_iter()
        .filter(|&l| l <= simd_level())
        .collect();
    let n_kv_head = 2;
    for head_dim in [64, 256, 48, 40] {
        for ratio in [1, 3, 4] {
            for n_tokens in [1, 3, 63, 64, 100] {
                for start_pos in [0, 29] {
                    for window in [None, Some(7)] {
                        for precision in [AttnPrecision::Ggml, AttnPrecision::F32] {
                            let n_head = n_kv_head * ratio;
                            // Rows a little wider than the heads, as a fused KV buffer might be.
                            let kv_stride = n_kv_head * head_dim + 8;
                            let rows = start_pos + n_tokens;
                            let g = AttnGeometry {
                                n_tokens,
                                start_pos,
                                n_head,
                                n_kv_head,
                                head_dim,
                                kv_stride,
                                scale: 1.0 / (head_dim as f32).sqrt(),
                                window,
                                precision,
                            };
                            // Queries large enough for peaked softmaxes (new maxima, tiny weights);
                            // the cache holds f16 values, as the contract requires.
                            let q: Vec<f32> = (0..n_tokens * n_head * head_dim).map(|_| 4.0 * rng.uniform()).collect();
                            let mut cache = || -> Vec<f32> {
                                (0..rows * kv_stride)
                                    .map(|_| ops::round_to_f16(2.0 * rng.uniform()))
                                    .collect()
                            };
                            let (keys, values) = (cache(), cache());
                            let want = reference(&g, &q, &keys, &values);
                            let f16_path = precision == AttnPrecision::Ggml && n_tokens < 64;
                            for &level in &levels {
                                let got = run_items(level, &g, &q, &keys, &values);
                                for (i, (w, o)) in want.chunks(head_dim).zip(got.chunks(head_dim)).enumerate() {
                                    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                                    for (j, (a, b)) in w.iter().zip(o).enumerate() {
                                        // The f16 kernel makes the reference's roundings in its order, so
                                        // it must agree exactly (one differing f16 rounding would move an
                                        // element by ~5e-4). The f32 kernel sums in another order and uses
                                        // a ~2 ulp polynomial exp: ~1e-6 of the head's largest output
                                        // (relative to the row, as single outputs may cancel to ~0).
                                        let ok = if f16_path {
                                            a == b
                                        } else {
                                            (a - b).abs() <= 1e-5 * scale
                                        };
                                        assert!(
                                            ok,
                                            "seed {seed}: {level:?} {g:?}: (query {}, head {}) [{j}]: {b} vs {a}",
                                            i / n_head,
                                            i % n_head
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
