//! Every op of the GPU backend against the CPU backend (`Numerics::Quantized`) on fresh
//! random inputs of awkward sizes: odd row counts, token counts that leave partial tiles,
//! float rows of odd length, weights split into several bindings, several sequences per
//! attention call over shuffled pages. GPU outputs are poisoned with NaN first, so an
//! element the GPU never writes fails.
//!
//! Both backends quantize activations the same way and take the same integer products,
//! so they differ by f32 summation order (and `exp` in attention); the tolerances below
//! are relative to the largest output magnitude. Fails when no GPU adapter exists (Mesa's
//! lavapipe is one) unless `KILN_NO_GPU=1`.

mod common;

use common::Rng;
use half::{bf16, f16};
use kiln_runtime::{
    Activation, Attention, AttnSeq, Backend, BufId, CpuBackend, GgmlType, GpuBackend, HostBytes, RopeStyle, WeightId,
    WeightSource,
};

/// Elementwise ops and copies run the same f32 operations: only contraction into fused
/// multiply-adds may differ.
const TOL_ELEMENTWISE: f32 = 1e-6;
/// Reductions (norms, dot products of a few hundred terms, softmax) in another order:
/// a few ulps of the sum of magnitudes (measured: below 3e-7).
const TOL_REDUCTION: f32 = 1e-5;
/// Attention over a few queries with heads the GPU's exact kernel does not take (40
/// here), which the CPU accumulates in f16 as llama.cpp does (each update of the weighted
/// sum of values rounded to 11 bits, ~2.4e-4 relative, over up to ~130 keys here) while
/// the GPU keeps f32. (Other heads: see `short_attention_repeats_the_cpu`.)
const TOL_F16_ACCUMULATOR: f32 = 5e-3;
/// Quantized products: as reductions, plus the rare activation whose quantized value
/// differs by one step when `x * 127 / amax` lands within an ulp of a rounding tie
/// (division rounding may differ on a GPU): one step of one term, ~1/127 of one product
/// in a sum of hundreds. (Measured on lavapipe: below 3e-7, no such flip.)
const TOL_MATMUL: f32 = 1e-4;

fn gpu() -> Option<GpuBackend> {
    common::adapter().map(|adapter| GpuBackend::new(&adapter).expect("starting the GPU backend"))
}

impl Rng {
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random blocks of `ty` with sane scales (random bytes elsewhere).
fn random_weight(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> WeightSource {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    let h = |v: f32| f16::from_f32(v).to_le_bytes();
    for _ in 0..rows * cols / ty.block_size() {
        let mut b = rng.bytes(ty.type_size());
        match ty {
            GgmlType::F32 => b.copy_from_slice(&rng.f().to_le_bytes()),
            GgmlType::F16 => b.copy_from_slice(&h(rng.f())),
            GgmlType::BF16 => b.copy_from_slice(&bf16::from_f32(rng.f()).to_le_bytes()),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => b[..2].copy_from_slice(&h(0.01 + 0.02 * rng.f().abs())),
            GgmlType::Q4_1 | GgmlType::Q4_K => {
                b[..2].copy_from_slice(&h(0.01 + 0.02 * rng.f().abs()));
                b[2..4].copy_from_slice(&h(0.02 * rng.f()));
            }
            GgmlType::Q6_K => b[208..].copy_from_slice(&h(0.001 + 0.002 * rng.f().abs())),
            _ => unreachable!("not tested"),
        }
        bytes.extend_from_slice(&b);
    }
    WeightSource {
        name: format!("{ty} {rows}x{cols}"),
        ty,
        rows,
        cols,
        bytes: HostBytes::from_vec(bytes),
    }
}

/// Both backends, driven by the same calls.
struct Pair {
    cpu: CpuBackend,
    gpu: GpuBackend,
}

impl Pair {
    fn new() -> Option<Pair> {
        Some(Pair {
            cpu: CpuBackend::new(Some(2)),
            gpu: gpu()?,
        })
    }

    fn upload(&mut self, w: &WeightSource) -> WeightId {
        let a = self.cpu.upload(w.clone()).unwrap();
        let b = self.gpu.upload(w.clone()).unwrap();
        assert_eq!(a, b);
        a
    }

    /// A buffer holding `data` on both; on the GPU its tail past `data` is NaN.
    fn buffer(&mut self, len: usize, data: &[f32]) -> BufId {
        let a = self.cpu.alloc(len);
        let b = self.gpu.alloc(len);
        assert_eq!(a, b);
        self.cpu.write(a, 0, data);
        let mut poisoned = data.to_vec();
        poisoned.resize(len, f32::NAN);
        self.gpu.write(b, 0, &poisoned);
        a
    }

    /// A key/value cache of `rows` rows of `row_len` values, each backend's own layout
    /// (the CPU packs f16 pairs into floats), filled from random values by `store_kv`.
    fn cache(&mut self, rng: &mut Rng, rows: usize, row_len: usize) -> BufId {
        let a = self.cpu.alloc(rows * self.cpu.kv_row_floats(row_len));
        let b = self.gpu.alloc(rows * self.gpu.kv_row_floats(row_len));
        assert_eq!(a, b);
        let src = self.buffer(rows * row_len, &rng.vec(rows * row_len, 1.0));
        let all: Vec<u32> = (0..rows as u32).collect();
        self.run(|be| be.store_kv(src, a, row_len, &all));
        a
    }

    /// The values of a cache of `rows` rows of `row_len` on the CPU and on the GPU.
    fn cache_values(&mut self, cache: BufId, rows: usize, row_len: usize) -> (Vec<f32>, Vec<f32>) {
        let values = |be: &mut dyn Backend| {
            let floats = be.kv_row_floats(row_len);
            let mut raw = vec![0f32; rows * floats];
            be.read(cache, 0, &mut raw);
            if floats == row_len {
                return raw;
            }
            // Two f16 values a float, the first in the low half.
            raw.chunks(floats)
                .flat_map(|row| {
                    row.iter()
                        .flat_map(|v| [v.to_bits() as u16, (v.to_bits() >> 16) as u16])
                        .take(row_len)
                        .map(|h| f16::from_bits(h).to_f32())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        (values(&mut self.cpu), values(&mut self.gpu))
    }

    fn run(&mut self, f: impl Fn(&mut dyn Backend)) {
        f(&mut self.cpu);
        f(&mut self.gpu);
    }

    /// The bits of the GPU's first `len` floats of `buf` (for outputs that must equal
    /// another GPU path's exactly).
    fn gpu_bits(&mut self, buf: BufId, len: usize) -> Vec<u32> {
        let mut v = vec![0f32; len];
        self.gpu.read(buf, 0, &mut v);
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Largest difference over the largest magnitude of `buf`'s first `len` floats.
    fn compare(&mut self, what: &str, buf: BufId, len: usize, tol: f32) -> f32 {
        self.compare_counting(what, buf, len, tol).0
    }

    /// [`Pair::compare`], also returning the fraction of elements within 1e-6 of their own
    /// magnitude (the same up to an f32 rounding or two).
    fn compare_counting(&mut self, what: &str, buf: BufId, len: usize, tol: f32) -> (f32, f64) {
        let mut a = vec![0.0; len];
        let mut b = vec![0.0; len];
        self.cpu.read(buf, 0, &mut a);
        self.gpu.read(buf, 0, &mut b);
        let same = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| (*x - *y).abs() <= 1e-6 * x.abs())
            .count() as f64
            / len as f64;
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let mut worst = 0f32;
        let mut shown = 0;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(y.is_finite(), "{what}: element {i} is {y} on the GPU (CPU {x})");
            if (x - y).abs() / scale > tol && shown < 5 {
                println!("  {what}: element {i}: cpu {x} gpu {y}");
                shown += 1;
            }
            worst = worst.max((x - y).abs() / scale);
        }
        println!("{what}: max rel error {worst:.2e}, {:.2}% within 1e-6", 100.0 * same);
        assert!(worst <= tol, "{what}: max rel error {worst:e} over {tol:e}");
        (worst, same)
    }
}

/// Weight types and row lengths: Q5_0 twice, as rows of an odd number of blocks (the
/// generic kernels) and of an even number (also the 16-byte decode kernel).
const TYPES: [(GgmlType, usize); 10] = [
    (GgmlType::F32, 45),
    (GgmlType::F16, 45),
    (GgmlType::BF16, 47),
    (GgmlType::Q4_0, 224),
    (GgmlType::Q4_1, 224),
    (GgmlType::Q5_0, 224),
    (GgmlType::Q5_0, 256),
    (GgmlType::Q8_0, 224),
    (GgmlType::Q4_K, 768),
    (GgmlType::Q6_K, 768),
];

#[test]
fn matmul_every_weight_type() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (ty, cols) in TYPES {
        let rows = 37;
        let w = p.upload(&random_weight(&mut rng, ty, rows, cols));
        for n in [1, 3, 4, 5, 11] {
            let x = p.buffer(n * cols, &rng.vec(n * cols, 2.0));
            let out = p.buffer(n * rows, &[]);
            p.run(|be| be.matmul(w, x, n, out));
            p.compare(
                &format!("matmul {ty} {rows}x{cols}, {n} rows"),
                out,
                n * rows,
                TOL_MATMUL,
            );
        }
    }
}

/// Prefill-sized products (the 64 × 64 tiled kernel): rows and input rows that leave
/// partial tiles, columns that leave a partial step of four chunks (224 = 7 chunks).
#[test]
fn matmul_tiled_every_weight_type() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(0x5eed_7113);
    for (ty, cols) in TYPES {
        let rows = 150;
        let w = p.upload(&random_weight(&mut rng, ty, rows, cols));
        for n in [32, 97] {
            let x = p.buffer(n * cols, &rng.vec(n * cols, 2.0));
            let out = p.buffer(n * rows, &[]);
            p.run(|be| be.matmul(w, x, n, out));
            p.compare(
                &format!("tiled matmul {ty} {rows}x{cols}, {n} rows"),
                out,
                n * rows,
                TOL_MATMUL,
            );
        }
    }
}

/// More than 65535 workgroups of rows: the grid folds into two dimensions, and the
/// groups past its end must write nothing (the rows after the output stay NaN).
#[test]
fn matmul_grid_folding() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(23);
    // Enough rows to fold the matvec grid (n = 2) too, at up to 16 rows a workgroup.
    let (rows, cols) = (16 * 65_535 + 9, 3);
    let w = p.upload(&random_weight(&mut rng, GgmlType::F32, rows, cols));
    for n in [2, 9] {
        let x = p.buffer(n * cols, &rng.vec(n * cols, 1.0));
        // Room for a whole tile of rows, where a stray group would write.
        let out = p.buffer(10 * rows, &[]);
        p.run(|be| be.matmul(w, x, n, out));
        p.compare(&format!("matmul of {rows} rows, {n} rows"), out, n * rows, TOL_MATMUL);
        let mut after = vec![0f32; (10 - n) * rows];
        p.gpu.read(out, n * rows, &mut after);
        assert!(after.iter().all(|v| v.is_nan()), "matmul wrote past its output rows");
    }
}

#[test]
fn matmul_many_shared_and_mixed_formats() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(7);
    let (cols, n) = (256, 3);
    // Q4_0, Q5_0 and Q8_0 share Q8_0 activations; Q4_K and Q4_1 need their own.
    let tys = [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q4_1,
    ];
    let ws: Vec<WeightId> = tys
        .iter()
        .enumerate()
        .map(|(i, &ty)| p.upload(&random_weight(&mut rng, ty, 19 + 6 * i, cols)))
        .collect();
    let x = p.buffer(n * cols, &rng.vec(n * cols, 1.0));
    let outs: Vec<BufId> = (0..tys.len()).map(|i| p.buffer(n * (19 + 6 * i), &[])).collect();
    for group in [&[0, 1, 2][..], &[3, 0, 4]] {
        let products: Vec<(WeightId, BufId)> = group.iter().map(|&i| (ws[i], outs[i])).collect();
        p.run(|be| be.matmul_many(x, n, &products));
        for &i in group {
            p.compare(
                &format!("matmul_many {}", tys[i]),
                outs[i],
                n * (19 + 6 * i),
                TOL_MATMUL,
            );
        }
    }
}

/// Decode products of one input row that the GPU reads in one dispatch (stacks of up to
/// three weights of one width and activation format, of one type or mixed): stacks of 3
/// and 2, mixed stacks in several orders, a weight of another format that ends a stack,
/// and rows that leave a partial workgroup in each weight.
#[test]
fn matmul_many_stacked_decode() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(41);
    let cases: [&[(GgmlType, usize)]; 7] = [
        &[(GgmlType::Q4_K, 45), (GgmlType::Q4_K, 13), (GgmlType::Q4_K, 13)],
        &[(GgmlType::Q5_0, 29), (GgmlType::Q5_0, 11), (GgmlType::Q8_0, 6)],
        &[(GgmlType::Q6_K, 5), (GgmlType::Q4_K, 12), (GgmlType::Q6_K, 7)],
        &[(GgmlType::Q8_0, 9), (GgmlType::Q4_K, 12), (GgmlType::Q6_K, 7)],
        &[(GgmlType::Q6_K, 7), (GgmlType::Q6_K, 30)],
        &[(GgmlType::Q8_0, 33), (GgmlType::Q8_0, 5), (GgmlType::Q8_0, 2)],
        &[(GgmlType::Q4_K, 17), (GgmlType::Q4_K, 9), (GgmlType::Q6_K, 21)],
    ];
    let cols = 512;
    let x = p.buffer(cols, &rng.vec(cols, 1.0));
    for case in cases {
        let ws: Vec<WeightId> = case
            .iter()
            .map(|&(ty, rows)| p.upload(&random_weight(&mut rng, ty, rows, cols)))
            .collect();
        let outs: Vec<BufId> = case.iter().map(|&(_, rows)| p.buffer(rows, &[])).collect();
        let products: Vec<(WeightId, BufId)> = ws.iter().copied().zip(outs.iter().copied()).collect();
        p.run(|be| be.matmul_many(x, 1, &products));
        for (i, &(ty, rows)) in case.iter().enumerate() {
            p.compare(
                &format!("stacked {ty} {rows}x{cols}, product {i}"),
                outs[i],
                rows,
                TOL_MATMUL,
            );
        }
    }
}

/// A norm whose rows feed products: from the second time on, the norm's dispatch also
/// quantizes its rows for them (one dispatch fewer), in the words the quantize kernel
/// writes, so the products' bits do not change. Block formats Q8_1 (Q4_1), Q8_0 (Q5_0,
/// Q8_0) and Q8_K (Q4_K, Q6_K), one and several rows, rows with an all-zero block and
/// with the largest magnitude twice in both signs (the first sets the scale's sign); and
/// an op between the norm and the products, after which the products must quantize the
/// rows again.
#[test]
fn norms_quantize_for_the_products_after_them() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(0xace5);
    for (tys, cols) in [
        (&[GgmlType::Q4_1][..], 512),
        (&[GgmlType::Q5_0, GgmlType::Q5_0, GgmlType::Q8_0][..], 896),
        (&[GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K][..], 2048),
    ] {
        let norm = p.upload(&random_weight(&mut rng, GgmlType::F32, 1, cols));
        let ws: Vec<WeightId> = tys
            .iter()
            .enumerate()
            .map(|(i, &ty)| p.upload(&random_weight(&mut rng, ty, 19 + 8 * i, cols)))
            .collect();
        for n in [1, 3] {
            let mut x = rng.vec(n * cols, 2.0);
            let y = rng.vec(n * cols, 1.0);
            let block = if tys[0] == GgmlType::Q4_K { 256 } else { 32 };
            x[block..2 * block].fill(0.0);
            x[2 * block + 5] = -40.0;
            x[2 * block + 17] = 40.0;
            let xb = p.buffer(n * cols, &x);
            let yb = p.buffer(n * cols, &y);
            let outs: Vec<BufId> = ws
                .iter()
                .enumerate()
                .map(|(i, _)| p.buffer(n * (19 + 8 * i), &[]))
                .collect();
            let products: Vec<(WeightId, BufId)> = ws.iter().copied().zip(outs.iter().copied()).collect();
            let mut runs = Vec::new();
            for (round, between) in [(0, false), (1, false), (2, true)] {
                p.run(|be| {
                    be.write(xb, 0, &x);
                    be.write(yb, 0, &y);
                });
                let before = p.gpu.dispatches();
                p.run(|be| {
                    be.add_rms_norm(xb, yb, norm, n, 1e-6);
                    if between {
                        be.scale(yb, n * cols, 0.5);
                    }
                    be.matmul_many(yb, n, &products);
                });
                let used = p.gpu.dispatches() - before;
                let mut bits = Vec::new();
                for (i, &out) in outs.iter().enumerate() {
                    let what = format!("{:?} {cols} wide, {n} rows, round {round}, product {i}", tys[i]);
                    p.compare(&what, out, n * (19 + 8 * i), TOL_MATMUL);
                    bits.push(p.gpu_bits(out, n * (19 + 8 * i)));
                }
                runs.push((used, bits));
            }
            // The first round of all learned the format and quantized apart; later ones
            // save that dispatch, but for the scale's in round 2, after which the
            // products quantize again.
            let learning = usize::from(n == 1) as u64;
            assert_eq!(
                runs[1].0 + learning,
                runs[0].0,
                "{tys:?}: dispatches {} then {}",
                runs[0].0,
                runs[1].0
            );
            assert_eq!(
                runs[2].0,
                runs[1].0 + 2,
                "{tys:?}: the scale's dispatch, and a quantize"
            );
            assert!(
                runs[0].1 == runs[1].1,
                "{tys:?}, {n} rows: the norm's quantization changed the products' bits"
            );
        }
    }
}

/// Products with a bias each (a projection's q, k and v): the GPU adds biases as it
/// writes decode products (stacked ones from one slot of the stack's biases) and after
/// other products. The same bits as the products and then `add_biases`, and within
/// `TOL_MATMUL` of the CPU: a mixed decode stack, decode rows of a weight the 16-byte
/// kernel does not read, a few rows (unstacked) and a prefill.
#[test]
fn products_with_biases() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(0xb1a5);
    let cols = 896;
    for tys in [
        [GgmlType::Q5_0, GgmlType::Q5_0, GgmlType::Q8_0],
        [GgmlType::Q4_1, GgmlType::Q4_1, GgmlType::Q4_1],
    ] {
        let rows = [64, 16, 16];
        let ws: Vec<WeightId> = tys
            .iter()
            .zip(rows)
            .map(|(&ty, r)| p.upload(&random_weight(&mut rng, ty, r, cols)))
            .collect();
        let biases: Vec<WeightId> = rows
            .iter()
            .map(|&r| p.upload(&random_weight(&mut rng, GgmlType::F32, 1, r)))
            .collect();
        for n in [1, 3, 40] {
            let x = p.buffer(n * cols, &rng.vec(n * cols, 1.0));
            let outs: Vec<BufId> = rows.iter().map(|&r| p.buffer(n * r, &[])).collect();
            let products: Vec<(WeightId, BufId)> = ws.iter().copied().zip(outs.iter().copied()).collect();
            let mut bits = Vec::new();
            for fused in [true, false] {
                if fused {
                    p.run(|be| be.matmul_many_biased(x, n, &products, &biases));
                } else {
                    let pairs: Vec<(BufId, WeightId)> = outs.iter().copied().zip(biases.iter().copied()).collect();
                    p.run(|be| {
                        be.matmul_many(x, n, &products);
                        be.add_biases(&pairs, n);
                    });
                }
                let mut run = Vec::new();
                for (i, &r) in rows.iter().enumerate() {
                    p.compare(
                        &format!("biased {:?} product {i}, {n} rows", tys[i]),
                        outs[i],
                        n * r,
                        TOL_MATMUL,
                    );
                    run.extend(p.gpu_bits(outs[i], n * r));
                }
                bits.push(run);
            }
            assert!(
                bits[0] == bits[1],
                "{tys:?}, {n} rows: the fused biases changed the bits"
            );
        }
    }
}

/// The feed-forward's down projection with the gated activation fused into the
/// quantization of its input: every activation format, one and several rows.
#[test]
fn matmul_gated_every_activation_format() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(21);
    for (ty, cols) in [
        (GgmlType::F32, 45),
        (GgmlType::F16, 45),
        (GgmlType::Q5_0, 224),
        (GgmlType::Q4_1, 224),
        (GgmlType::Q6_K, 768),
    ] {
        let rows = 29;
        let w = p.upload(&random_weight(&mut rng, ty, rows, cols));
        for (n, act) in [(1, Activation::Silu), (5, Activation::GeluTanh), (40, Activation::Silu)] {
            // Gates over GELU's table edges (±10) and SiLU's saturation.
            let gate = p.buffer(n * cols, &rng.vec(n * cols, 12.0));
            let up = p.buffer(n * cols, &rng.vec(n * cols, 2.0));
            let out = p.buffer(n * rows, &[]);
            p.run(|be| be.matmul_gated(w, gate, up, act, n, out));
            p.compare(
                &format!("matmul_gated {ty} {act:?}, {n} rows"),
                out,
                n * rows,
                TOL_MATMUL,
            );
        }
    }
}

#[test]
fn weights_split_across_bindings() {
    let Some(mut p) = Pair::new() else { return };
    // Bindings of 2 KiB: a 37-row Q8_0 weight of 224 columns (7 blocks in two groups of
    // 36 words, 288 bytes a row) splits into six parts of at most 7 rows.
    p.gpu.set_weight_part_bytes(2048);
    let mut rng = Rng(11);
    let (rows, cols) = (37, 224);
    let w = p.upload(&random_weight(&mut rng, GgmlType::Q8_0, rows, cols));
    for n in [1, 9] {
        let x = p.buffer(n * cols, &rng.vec(n * cols, 1.0));
        let out = p.buffer(n * rows, &[]);
        p.run(|be| be.matmul(w, x, n, out));
        p.compare("matmul over split weight", out, n * rows, TOL_MATMUL);
    }
    let tokens = [36u32, 0, 17, 8, 9, 35];
    let e = p.buffer(tokens.len() * cols, &[]);
    p.run(|be| be.embed(w, &tokens, e));
    p.compare("embed from split weight", e, tokens.len() * cols, 0.0);
}

#[test]
fn embed_every_weight_type() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(3);
    for (ty, cols) in TYPES {
        let w = p.upload(&random_weight(&mut rng, ty, 23, cols));
        let tokens = [22u32, 0, 5, 5, 13];
        let out = p.buffer(tokens.len() * cols + 3, &[]);
        p.run(|be| be.embed(w, &tokens, out));
        // Dequantization is the same few f32 operations on both.
        p.compare(&format!("embed {ty}"), out, tokens.len() * cols, TOL_ELEMENTWISE);
    }
}

/// Rows of 4096 take the GPU norm's steps of four values an invocation exactly; a row of
/// 4096 + 75 ends with values one at a time.
#[test]
fn norms_of_long_rows() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(17);
    for (n, cols) in [(2, 4096), (3, 4096 + 75)] {
        let len = n * cols;
        let norm = p.upload(&random_weight(&mut rng, GgmlType::F16, 1, cols));
        let x = p.buffer(len + 10, &rng.vec(len + 10, 3.0));
        p.run(|be| be.rms_norm(x, norm, n, 1e-5));
        p.compare(&format!("rms_norm {cols}"), x, len + 10, TOL_REDUCTION);
        let residual = p.buffer(len, &rng.vec(len, 3.0));
        let block_out = p.buffer(len + 10, &rng.vec(len + 10, 3.0));
        p.run(|be| be.add_rms_norm(residual, block_out, norm, n, 1e-5));
        p.compare(&format!("add_rms_norm {cols}: sum"), residual, len, TOL_ELEMENTWISE);
        p.compare(
            &format!("add_rms_norm {cols}: norm"),
            block_out,
            len + 10,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn elementwise_ops_and_copies() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(5);
    let (n, cols) = (7, 75);
    let len = n * cols;
    let x = p.buffer(len + 10, &rng.vec(len + 10, 3.0));
    let y = p.buffer(len, &rng.vec(len, 3.0));
    let bias = p.upload(&random_weight(&mut rng, GgmlType::F32, 1, cols));
    let norm = p.upload(&random_weight(&mut rng, GgmlType::F16, 1, cols));
    p.run(|be| be.add(x, y, len - 3));
    p.compare("add", x, len + 10, TOL_ELEMENTWISE);
    p.run(|be| be.scale(x, len - 1, 0.37));
    p.compare("scale", x, len + 10, TOL_ELEMENTWISE);
    p.run(|be| be.add_bias(x, bias, n));
    p.compare("add_bias", x, len + 10, TOL_ELEMENTWISE);
    // Four pairs: one pass of three, then one of one; two of different widths.
    let wide = p.upload(&random_weight(&mut rng, GgmlType::F32, 1, 2 * cols));
    let pairs: Vec<(BufId, WeightId)> = (0..4)
        .map(|i| {
            let width = if i == 1 { 2 * cols } else { cols };
            (
                p.buffer(n * width + 5, &rng.vec(n * width + 5, 3.0)),
                if i == 1 { wide } else { bias },
            )
        })
        .collect();
    p.run(|be| be.add_biases(&pairs, n));
    for (i, &(buf, _)) in pairs.iter().enumerate() {
        let width = if i == 1 { 2 * cols } else { cols };
        p.compare(&format!("add_biases {i}"), buf, n * width + 5, TOL_ELEMENTWISE);
    }
    p.run(|be| be.rms_norm(x, norm, n, 1e-5));
    p.compare("rms_norm", x, len + 10, TOL_REDUCTION);
    let residual = p.buffer(len, &rng.vec(len, 3.0));
    let block_out = p.buffer(len + 10, &rng.vec(len + 10, 3.0));
    p.run(|be| be.add_rms_norm(residual, block_out, norm, n - 1, 1e-5));
    p.compare("add_rms_norm: sum", residual, len, TOL_ELEMENTWISE);
    p.compare("add_rms_norm: norm", block_out, len + 10, TOL_REDUCTION);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let g = p.buffer(len, &rng.vec(len, 12.0));
        p.run(|be| be.gated_activation(g, y, len - 5, act));
        p.compare(&format!("gated_activation {act:?}"), g, len, TOL_ELEMENTWISE);
    }
    let z = p.buffer(len, &rng.vec(len, 1.0));
    // From y, which both backends hold exactly (x went through rms_norm, whose f32
    // rounding may differ on a GPU).
    p.run(|be| be.copy(y, 13, z, 101, 211));
    p.compare("copy", z, len, 0.0);
    p.run(|be| be.copy_within(z, 0, 300, 190));
    p.compare("copy_within", z, len, 0.0);
    let data = rng.vec(33, 1.0);
    p.run(|be| be.write(z, 41, &data));
    p.compare("write", z, len, 0.0);
    let mut part = [0f32; 9];
    p.gpu.read(z, 45, &mut part);
    assert_eq!(part, data[4..13], "read at an offset");
}

/// Greedy picks on the device: random rows of a vocabulary-sized width, a tie (the
/// first wins), NaN (never wins) and a row with no number (0).
#[test]
fn argmax_rows_ties_and_nan() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(23);
    let (rows, len) = (5, 151_937);
    let mut data = rng.vec(rows * len, 30.0);
    data[len + 1000] = 100.0;
    data[len + 90_000] = 100.0;
    data[2 * len] = f32::NAN;
    data[2 * len + 7] = 1e30;
    data[3 * len..4 * len].fill(f32::NAN);
    data[4 * len + len - 1] = 1e30;
    let buf = p.buffer(rows * len, &data);
    let (mut cpu, mut gpu) = ([0u32; 5], [9u32; 5]);
    p.cpu.argmax_rows(buf, len, &mut cpu);
    p.gpu.argmax_rows(buf, len, &mut gpu);
    assert_eq!(cpu, gpu, "argmax_rows: the backends pick differently");
    assert_eq!(
        &cpu[1..],
        &[1000, 7, 0, len as u32 - 1],
        "argmax_rows: ties, NaN, no number, last"
    );
    let first = data[..len].iter().copied().fold(f32::MIN, f32::max);
    assert_eq!(data[cpu[0] as usize], first, "argmax_rows: not the largest");
}

/// Top-k selection on the device: the same set as the CPU's, with ties at the cut (the
/// lowest indices kept), NaN and -inf left out, rows with fewer numbers than k, and k
/// past the first radix byte's bucket.
#[test]
fn top_k_rows_ties_and_short_rows() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(29);
    let len = 151_937;
    for k in [1, 40, 256] {
        let rows = 4;
        // Values on a grid of 64 steps, so thousands tie; row 2 has 30 numbers only.
        let mut data: Vec<f32> = rng.vec(rows * len, 1.0).iter().map(|v| (v * 32.0).round()).collect();
        data[7] = f32::NAN;
        data[len + 3] = f32::NEG_INFINITY;
        data[len + 4] = f32::INFINITY;
        data[2 * len..3 * len].fill(f32::NEG_INFINITY);
        for i in 0..30 {
            data[2 * len + i * 5000] = i as f32 * 0.5 - 3.0;
        }
        data[3 * len..4 * len].fill(-0.0);
        data[3 * len + 100] = 0.0;
        let buf = p.buffer(rows * len, &data);
        let mut picked = Vec::new();
        for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
            let mut counts = vec![0u32; rows];
            let mut top = vec![(0u32, 0f32); rows * k];
            be.top_k_rows(buf, len, k, &mut counts, &mut top);
            let sets: Vec<Vec<(u32, u32)>> = (0..rows)
                .map(|r| {
                    let mut set: Vec<(u32, u32)> = top[r * k..r * k + counts[r] as usize]
                        .iter()
                        .map(|(i, v)| (*i, v.to_bits()))
                        .collect();
                    set.sort_unstable();
                    set
                })
                .collect();
            picked.push((counts, sets));
        }
        assert_eq!(
            picked[0], picked[1],
            "top_k_rows (k {k}): the backends select differently"
        );
        let (counts, sets) = &picked[0];
        assert_eq!(counts[2] as usize, k.min(30), "top_k_rows: a row of 30 numbers");
        assert_eq!(counts[0] as usize, k, "top_k_rows: a full row");
        // The +0 beats the -0s; then the lowest indices of the -0s.
        let mut want: Vec<(u32, u32)> = (0..len as u32)
            .filter(|&i| i != 100)
            .take(k - 1)
            .map(|i| (i, (-0.0f32).to_bits()))
            .chain([(100, 0f32.to_bits())])
            .collect();
        want.sort_unstable();
        assert_eq!(sets[3], want, "top_k_rows: signed zeros and ties (k {k})");
        assert!(
            sets[1].contains(&(4, f32::INFINITY.to_bits())),
            "top_k_rows: +inf first"
        );
    }
}

#[test]
fn rope_both_styles() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(9);
    let (heads, head_dim) = (3, 18);
    let positions = [0u32, 1, 2, 77, 4095];
    let len = positions.len() * heads * head_dim;
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let x = p.buffer(len, &rng.vec(len, 2.0));
        let k = p.buffer(len, &rng.vec(len, 2.0));
        // Two calls with the same positions share one angle table on the GPU.
        p.run(|be| {
            be.rope(x, &positions, heads, head_dim, 10000.0, style);
            be.rope(k, &positions[..3], heads, head_dim, 10000.0, style);
        });
        p.compare(&format!("rope {style:?}"), x, len, TOL_ELEMENTWISE);
        p.compare(&format!("rope {style:?}, fewer rows"), k, len, TOL_ELEMENTWISE);
        // Queries and keys with different head counts in one call.
        let (q_heads, k_heads) = (4, 2);
        let q = p.buffer(
            positions.len() * q_heads * head_dim + 7,
            &rng.vec(positions.len() * q_heads * head_dim + 7, 2.0),
        );
        let k = p.buffer(
            positions.len() * k_heads * head_dim + 7,
            &rng.vec(positions.len() * k_heads * head_dim + 7, 2.0),
        );
        p.run(|be| be.rope_qk(q, k, &positions, (q_heads, k_heads), head_dim, 500000.0, style));
        p.compare(
            &format!("rope_qk {style:?}: q"),
            q,
            positions.len() * q_heads * head_dim + 7,
            TOL_ELEMENTWISE,
        );
        p.compare(
            &format!("rope_qk {style:?}: k"),
            k,
            positions.len() * k_heads * head_dim + 7,
            TOL_ELEMENTWISE,
        );
    }
}

/// Rope of queries and keys with the rotated keys and the values stored in the cache in
/// the same pass (the GPU's fused kernel): both styles, rows stored out of order.
#[test]
fn rope_with_the_cache_stores() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(31);
    let (q_heads, k_heads, head_dim) = (6, 2, 64);
    let positions = [3u32, 4, 5, 900];
    let rows = [11u32, 2, 7, 0];
    let row_len = k_heads * head_dim;
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let q_len = positions.len() * q_heads * head_dim;
        let kv_len = positions.len() * row_len;
        let q = p.buffer(q_len, &rng.vec(q_len, 2.0));
        let k = p.buffer(kv_len, &rng.vec(kv_len, 2.0));
        let v = p.buffer(kv_len, &rng.vec(kv_len, 2.0));
        let keys = p.cache(&mut rng, 12, row_len);
        let values = p.cache(&mut rng, 12, row_len);
        p.run(|be| {
            be.rope_qk_store_kv(
                (q, k, v),
                &positions,
                (q_heads, k_heads),
                head_dim,
                10000.0,
                style,
                (keys, values),
                &rows,
            )
        });
        p.compare(&format!("rope_qk_store_kv {style:?}: q"), q, q_len, TOL_ELEMENTWISE);
        p.compare(&format!("rope_qk_store_kv {style:?}: k"), k, kv_len, TOL_ELEMENTWISE);
        // Keys equal to an f32 contraction may round to neighbouring f16 values: one
        // f16 step is 2^-10 of the value.
        let (want, got) = p.cache_values(keys, 12, row_len);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= scale / 1024.0,
            "rope_qk_store_kv {style:?}: cached keys differ by {worst}"
        );
        let (want, got) = p.cache_values(values, 12, row_len);
        assert!(want == got, "rope_qk_store_kv {style:?}: the value caches differ");
    }
}

#[test]
fn store_kv_rounds_to_f16() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(13);
    let row = 25;
    let cache = p.cache(&mut rng, 16, row);
    let src = p.buffer(4 * row, &rng.vec(4 * row, 100.0));
    p.run(|be| be.store_kv(src, cache, row, &[9, 2, 15, 3]));
    let (want, got) = p.cache_values(cache, 16, row);
    assert!(
        want.iter().zip(&got).all(|(a, b)| a == b),
        "store_kv: the caches hold different values"
    );
    println!("store_kv: identical f16 values");
    let values = p.cache(&mut rng, 16, row);
    let v = p.buffer(4 * row, &rng.vec(4 * row, 100.0));
    p.run(|be| be.store_kv_pair(src, v, (cache, values), row, &[1, 14, 0, 7]));
    for (what, c) in [("keys", cache), ("values", values)] {
        let (want, got) = p.cache_values(c, 16, row);
        assert!(
            want.iter().zip(&got).all(|(a, b)| a == b),
            "store_kv_pair: the {what} caches hold different values"
        );
    }
}

/// An attention geometry with the usual `1 / √head_dim` score scale.
fn attention_shape(
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    window: Option<usize>,
    page_size: usize,
) -> Attention {
    Attention {
        n_head,
        n_kv_head,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window,
        page_size,
    }
}

#[test]
fn paged_attention_many_sequences() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(17);
    // Query heads per KV head of 3, 4, 1 and 14 (Qwen2-0.5B's).
    for (n_head, n_kv_head, head_dim, window) in [
        (6, 2, 40, None),
        (4, 1, 256, Some(70)),
        (3, 3, 64, Some(5)),
        (28, 2, 64, None),
    ] {
        let page_size = 16;
        let n_pages = 12;
        let kv_dim = n_kv_head * head_dim;
        let keys = p.cache(&mut rng, n_pages * page_size, kv_dim);
        let values = p.cache(&mut rng, n_pages * page_size, kv_dim);
        // A prefill of 5 at 0, one decode row at 130 (tiles of 64 keys), 3 rows at 20.
        let seqs = [
            AttnSeq {
                row0: 0,
                n_tokens: 5,
                start_pos: 0,
                run_start: 0,
                run_end: 5,
                page0: 0,
                n_pages: 1,
            },
            AttnSeq {
                row0: 5,
                n_tokens: 1,
                start_pos: 130,
                run_start: 130,
                run_end: 131,
                page0: 1,
                n_pages: 9,
            },
            AttnSeq {
                row0: 6,
                n_tokens: 3,
                start_pos: 20,
                run_start: 20,
                run_end: 23,
                page0: 10,
                n_pages: 2,
            },
        ];
        let page_table = [7u32, 3, 0, 11, 5, 1, 9, 2, 8, 10, 6, 4];
        let rows = 9;
        let q_len = rows * n_head * head_dim;
        let q = p.buffer(q_len, &rng.vec(q_len, 2.0));
        let shape = attention_shape(n_head, n_kv_head, head_dim, window, page_size);
        // Keys split across workgroups (few rows) and one workgroup per row and head.
        for split in [true, false] {
            p.gpu.set_attention_split(split);
            let out = p.buffer(q_len, &[]);
            p.run(|be| be.attention(q, keys, values, shape, &seqs, &page_table, out));
            p.compare(
                &format!("attention {n_head}/{n_kv_head} heads of {head_dim}, window {window:?}, split {split}"),
                out,
                q_len,
                TOL_F16_ACCUMULATOR,
            );
        }
        // One decode row over 21 keys: a single tile, not a multiple of the value loop's
        // eight keys a step.
        let short = [AttnSeq {
            row0: 0,
            n_tokens: 1,
            start_pos: 20,
            run_start: 20,
            run_end: 21,
            page0: 10,
            n_pages: 2,
        }];
        for split in [true, false] {
            p.gpu.set_attention_split(split);
            let out = p.buffer(q_len, &[]);
            p.run(|be| be.attention(q, keys, values, shape, &short, &page_table, out));
            let head_len = n_head * head_dim;
            p.compare(
                &format!("attention of one row over 21 keys, {n_head}/{n_kv_head} heads of {head_dim}, split {split}"),
                out,
                head_len,
                TOL_F16_ACCUMULATOR,
            );
        }
        // A prefill of 70 rows, which the CPU accumulates in f32 like the GPU.
        let long = [AttnSeq {
            row0: 0,
            n_tokens: 70,
            start_pos: 0,
            run_start: 0,
            run_end: 70,
            page0: 0,
            n_pages: 5,
        }];
        let long_len = 70 * n_head * head_dim;
        let q = p.buffer(long_len, &rng.vec(long_len, 2.0));
        for split in [true, false] {
            p.gpu.set_attention_split(split);
            let out = p.buffer(long_len, &[]);
            p.run(|be| be.attention(q, keys, values, shape, &long, &page_table, out));
            p.compare(
                &format!(
                    "attention of 70 rows, {n_head}/{n_kv_head} heads of {head_dim}, window {window:?}, split {split}"
                ),
                out,
                long_len,
                TOL_REDUCTION,
            );
        }
        p.gpu.set_attention_split(true);
    }
}

/// Short calls (fewer than 64 rows, fewer than 512 keys) with heads of 64, 128 or 256
/// take the GPU kernel that repeats the CPU's f16-accumulator kernel operation for
/// operation: the outputs are the CPU's up to an f32 rounding, but where an f32 operation
/// lands within an ulp of an f16 rounding tie (a driver's `fma` that is not fused, as
/// lavapipe's, or `exp`'s rare 1-ulp difference from glibc's) and one accumulator moves
/// by an f16 step (~5e-4 of itself). The f32 kernels this replaced agreed nowhere that
/// closely (every f16 update's rounding error against none).
#[test]
fn short_attention_repeats_the_cpu() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(29);
    for (n_head, n_kv_head, head_dim, window) in [(3, 1, 64, None), (8, 2, 128, Some(100)), (4, 1, 256, None)] {
        let page_size = 16;
        let n_pages = 32;
        let kv_dim = n_kv_head * head_dim;
        let keys = p.cache(&mut rng, n_pages * page_size, kv_dim);
        let values = p.cache(&mut rng, n_pages * page_size, kv_dim);
        // A 40-row prefill chunk at 0, decode rows at 130 and 510 (the last position the
        // exact kernel takes), and one at 511 (the f32 kernels').
        let seq = |row0, n_tokens, start_pos, page0, n_pages| AttnSeq {
            row0,
            n_tokens,
            start_pos,
            run_start: start_pos,
            run_end: start_pos + n_tokens,
            page0,
            n_pages,
        };
        let seqs = [
            seq(0, 40, 0, 0, 3),
            seq(40, 1, 130, 3, 9),
            seq(41, 1, 510, 0, 32),
            seq(42, 1, 511, 0, 32),
        ];
        let mut page_table: Vec<u32> = (0..n_pages as u32).collect();
        page_table.reverse();
        let rows = 43;
        let row_len = n_head * head_dim;
        let q = p.buffer(rows * row_len, &rng.vec(rows * row_len, 2.0));
        let shape = attention_shape(n_head, n_kv_head, head_dim, window, page_size);
        let out = p.buffer(rows * row_len, &[]);
        p.run(|be| be.attention(q, keys, values, shape, &seqs, &page_table, out));
        let what = format!("short attention, {n_head}/{n_kv_head} heads of {head_dim}, window {window:?}");
        // The exact rows: at most two f16 steps of one accumulator apart anywhere.
        let (_, same) = p.compare_counting(&what, out, 42 * row_len, 2e-3);
        assert!(
            same >= 0.99,
            "{what}: only {:.2}% of elements within 1e-6",
            100.0 * same
        );
    }
}

/// A decode step's attention leaves its output quantized for the product that read it
/// the step before (Q8_0 for Q5_0 and Q8_0 weights, Q8_1 for Q4_1): the second step saves
/// the quantize dispatch and gives the first step's bits.
#[test]
fn attention_quantizes_its_output_for_the_next_product() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(37);
    for (n_head, n_kv_head, head_dim, ty) in [
        (14, 2, 64, GgmlType::Q5_0),
        (8, 2, 128, GgmlType::Q8_0),
        (3, 1, 256, GgmlType::Q4_1),
    ] {
        let page_size = 16;
        let n_pages = 28;
        let kv_dim = n_kv_head * head_dim;
        let keys = p.cache(&mut rng, n_pages * page_size, kv_dim);
        let values = p.cache(&mut rng, n_pages * page_size, kv_dim);
        // Two sequences' decode rows (the exact kernel's calls).
        let decode_row = |row0, start_pos, page0, n_pages| AttnSeq {
            row0,
            n_tokens: 1,
            start_pos,
            run_start: start_pos,
            run_end: start_pos + 1,
            page0,
            n_pages,
        };
        let seqs = [decode_row(0, 130, 0, 9), decode_row(1, 300, 9, 19)];
        let page_table: Vec<u32> = (0..n_pages as u32).rev().collect();
        let cols = n_head * head_dim;
        let rows = 45;
        let w = p.upload(&random_weight(&mut rng, ty, rows, cols));
        let q = p.buffer(2 * cols, &rng.vec(2 * cols, 2.0));
        let shape = attention_shape(n_head, n_kv_head, head_dim, None, page_size);
        let attended = p.buffer(2 * cols, &[]);
        let mut bits = Vec::new();
        let mut dispatches = Vec::new();
        for step in 0..2 {
            let out = p.buffer(2 * rows, &[]);
            let before = p.gpu.dispatches();
            p.run(|be| {
                be.attention(q, keys, values, shape, &seqs, &page_table, attended);
                be.matmul(w, attended, 2, out);
            });
            dispatches.push(p.gpu.dispatches() - before);
            p.compare(&format!("{ty} after attention, step {step}"), out, 2 * rows, TOL_MATMUL);
            bits.push(p.gpu_bits(out, 2 * rows));
        }
        assert_eq!(bits[0], bits[1], "{ty}: the attention's quantization differs");
        assert_eq!(dispatches[1] + 1, dispatches[0], "{ty}: dispatches {dispatches:?}");
    }
}

/// Prefill chunks take the kernel that attends blocks of query rows (16, or 8 for heads
/// of 256): full and partial blocks, a chunk past 512 keys (which the CPU, too, attends in
/// f32), windows, and a decode row in the same call, against the CPU's f32 kernels.
#[test]
fn prefill_attention_in_blocks_of_rows() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = Rng(31);
    for (n_head, n_kv_head, head_dim, window) in [(6, 2, 40, None), (4, 1, 256, Some(70)), (14, 2, 64, Some(300))] {
        let page_size = 16;
        let n_pages = 48;
        let kv_dim = n_kv_head * head_dim;
        let keys = p.cache(&mut rng, n_pages * page_size, kv_dim);
        let values = p.cache(&mut rng, n_pages * page_size, kv_dim);
        let seq = |row0, n_tokens, start_pos| AttnSeq {
            row0,
            n_tokens,
            start_pos,
            run_start: start_pos,
            run_end: start_pos + n_tokens,
            page0: 0,
            n_pages,
        };
        // 70 rows from 0 (four blocks of 16 and one of 6), 9 rows from 600, one at 700.
        let seqs = [seq(0, 70, 0), seq(70, 9, 600), seq(79, 1, 700)];
        let page_table: Vec<u32> = (0..n_pages as u32).map(|i| (i * 7) % n_pages as u32).collect();
        let len = 80 * n_head * head_dim;
        let q = p.buffer(len, &rng.vec(len, 2.0));
        let shape = attention_shape(n_head, n_kv_head, head_dim, window, page_size);
        let out = p.buffer(len, &[]);
        p.run(|be| be.attention(q, keys, values, shape, &seqs, &page_table, out));
        p.compare(
            &format!("prefill attention, {n_head}/{n_kv_head} heads of {head_dim}, window {window:?}"),
            out,
            len,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn open_backend_follows_the_choice() {
    use kiln_runtime::{open_backend, BackendChoice};
    assert_eq!("gpu".parse::<BackendChoice>(), Ok(BackendChoice::Gpu));
    assert_eq!("auto".parse::<BackendChoice>(), Ok(BackendChoice::Auto));
    assert!("tpu".parse::<BackendChoice>().is_err());
    let (be, reason) = open_backend(BackendChoice::Cpu, Some(1)).unwrap();
    assert_eq!((be.name().as_str(), reason.as_str()), ("cpu", "cpu: chosen"));
    if gpu().is_none() {
        return;
    }
    let (be, reason) = open_backend(BackendChoice::Gpu, None).unwrap();
    println!(
        "--backend gpu: {reason}; auto: {}",
        open_backend(BackendChoice::Auto, None).unwrap().1
    );
    assert!(
        reason.starts_with("gpu: ") && be.name().starts_with("gpu ("),
        "{reason}"
    );
    let real_gpu = kiln_runtime::adapters()
        .iter()
        .any(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
    let (_, auto) = open_backend(BackendChoice::Auto, None).unwrap();
    assert_eq!(auto.starts_with("gpu: "), real_gpu, "{auto}");
}
