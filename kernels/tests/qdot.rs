//! kiln's quantized dot products (`qdot`) against
//!  * an f64 reference built from kiln's dequantizer (itself tested bit-exact against the
//!    PyPI `gguf` package): Σ dequant(weight) · dequant(quantized activations);
//!  * ggml itself: `tests/fixtures/qdot.json`, written by `scripts/fixtures/qdot.py`
//!    from llama.cpp's libggml-cpu (commit 0c1e570): its activation quantizers, its
//!    generic scalar `ggml_vec_dot_*` and the SIMD `vec_dot` it runs on this machine.

mod common;

use common::Rng;
use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::qdot::{activation_format, dequantize_activations, dot, quantize_activations, ActFormat};
use kiln_kernels::GgmlType;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/qdot.json");

/// Byte offsets of the f16 scale fields (d, m, dmin) in each quantized block.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
    }
}

/// A random weight row of `n` elements: random bytes, with every f16 scale field set to a
/// finite value of either sign with magnitude 1e-4..1 (as scripts/fixtures/dequant.py
/// does); float types get random normal values.
fn random_weights(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| rng.normal().to_le_bytes()).collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.normal()).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.normal()).to_le_bytes())
            .collect(),
        _ => {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let mut raw: Vec<u8> = (0..n / bs * ts).map(|_| rng.next_u64() as u8).collect();
            for b in 0..n / bs {
                for &off in f16_fields(ty) {
                    let mag = 10f64.powf(-4.0 * rng.unit()) as f32;
                    let v = if rng.unit() < 0.5 { mag } else { -mag };
                    raw[b * ts + off..b * ts + off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
            raw
        }
    }
}

/// Random activations at a random scale, with a few large outliers.
fn random_acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    let scale = 10f64.powf(-2.0 + 3.0 * rng.unit()) as f32;
    let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
    for _ in 0..n.div_ceil(64) {
        let i = (rng.next_u64() % n as u64) as usize;
        x[i] *= 8.0;
    }
    x
}

/// The f64 reference for `dot(ty, w, acts, n)` and the magnitude its error is measured
/// against.
///
/// The reference is Σ dequant(w) · dequant(acts) in f64, with one correction: for Q8_1
/// activations ggml does not use Σq_a · d_a for the min term but the stored
/// `s = f16(d_a · Σq_a)`, so the reference adds Σ_blocks m_w · (s − d_a · Σq_a).
///
/// The magnitude is Σ |a_i| (|w_i| + max_block |w|): every f32 rounding on either side
/// (dequantizing `d·sc·q − dmin·m`, scaling block sums, accumulating blocks) is at most
/// an ulp of a quantity bounded by it.
fn reference(ty: GgmlType, w: &[u8], acts: &[u8], n: usize) -> (f64, f64) {
    let fmt = activation_format(ty);
    let mut wf = vec![0f32; n];
    dequantize_row(ty, w, &mut wf);
    let mut af = vec![0f32; n];
    dequantize_activations(fmt, acts, &mut af);
    let bs = ty.block_size().max(32);
    let mut sum = 0f64;
    let mut mag = 0f64;
    for (wb, ab) in wf.chunks(bs).zip(af.chunks(bs)) {
        let wmax = wb.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        for (&x, &y) in wb.iter().zip(ab) {
            sum += x as f64 * y as f64;
            mag += y.abs() as f64 * (x.abs() as f64 + wmax);
        }
    }
    if fmt == ActFormat::Q8_1 {
        let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f64();
        for (wb, ab) in w.chunks_exact(ty.type_size()).zip(acts.chunks_exact(fmt.type_size())) {
            let (m, d, s) = (f16(wb, 2), f16(ab, 0), f16(ab, 2));
            let qsum: i64 = ab[4..36].iter().map(|&q| q as i8 as i64).sum();
            sum += m * (s - d * qsum as f64);
            mag += (m * s).abs();
        }
    }
    (sum, mag)
}

/// kiln's dot agrees with the f64 reference for every weight type on random rows of 1, 3
/// and 7 blocks.
///
/// Tolerance: 1e-6 × magnitude (see [`reference`]). kiln's result is the f64 value up to
/// f32 roundings: the product of two scales, its product with an exact integer sum, and
/// at most a handful of f32 additions per block (≤ 7 blocks, or 8 lanes + 8 for K-quants),
/// each ≤ 2^-24 ≈ 6e-8 relative to a partial sum bounded by the magnitude: well under
/// 1e-6. A wrong nibble, bit, scale or sign moves the result by ~1e-3 of the magnitude
/// or more.
#[test]
fn dot_matches_f64_reference() {
    let mut rng = Rng(0x6b69_6c6e_7164_6f74);
    let mut acts = Vec::new();
    let mut worst = 0f64;
    for ty in GgmlType::ALL {
        let bs = ty.block_size().max(32);
        for blocks in [1, 3, 7] {
            for _ in 0..20 {
                let n = blocks * bs;
                let w = random_weights(&mut rng, ty, n);
                let x = random_acts(&mut rng, n);
                quantize_activations(activation_format(ty), &x, &mut acts);
                let got = dot(ty, &w, &acts, n) as f64;
                let (want, mag) = reference(ty, &w, &acts, n);
                let err = (got - want).abs() / mag.max(f64::MIN_POSITIVE);
                worst = worst.max(err);
                assert!(
                    err <= 1e-6,
                    "{ty} n={n}: kiln {got} vs f64 {want} (error {err:e} of magnitude {mag})"
                );
            }
        }
    }
    eprintln!("dot vs f64 reference: worst error {worst:e} of magnitude");
}

/// Activation quantization loses no more than 8 bits allow: per element at most half a
/// quantization step (`d / 2`), plus, for Q8_0/Q8_1, the f16 rounding of `d` (≤ 2^-11
/// relative) times |q| ≤ 127: |x − d·q| ≤ 0.5·d + 127·d·2^-11 < 0.57·d, with
/// d = amax / 127 per block. Q8_K keeps an f32 d, so 0.5·d (+ f32 slack). Also checks
/// Q8_1's `s` and Q8_K's `bsums`.
#[test]
fn activation_quantization_error_is_within_8_bits() {
    let mut rng = Rng(42);
    let mut acts = Vec::new();
    for fmt in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
        let bs = fmt.block_size();
        for blocks in [1, 3, 7] {
            let n = blocks * bs;
            let mut x = random_acts(&mut rng, n);
            x[bs / 2..bs].fill(0.0); // a partly empty block
            if blocks > 1 {
                x[bs..2 * bs].fill(0.0); // an all-zero block
            }
            quantize_activations(fmt, &x, &mut acts);
            assert_eq!(acts.len(), fmt.row_bytes(n).unwrap());
            let mut y = vec![0f32; n];
            dequantize_activations(fmt, &acts, &mut y);
            for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let bound = if fmt == ActFormat::Q8_K {
                    0.5 * d * (1.0 + 1e-5)
                } else {
                    0.57 * d
                };
                for (i, (&u, &v)) in xb.iter().zip(yb).enumerate() {
                    assert!(
                        (u - v).abs() <= bound,
                        "{fmt:?} block {b} element {i}: x {u} quantized to {v}, bound {bound}"
                    );
                }
                let blk = &acts[b * fmt.type_size()..(b + 1) * fmt.type_size()];
                match fmt {
                    ActFormat::Q8_1 => {
                        let s = half::f16::from_le_bytes([blk[2], blk[3]]);
                        let qsum: i32 = blk[4..].iter().map(|&q| q as i8 as i32).sum();
                        assert_eq!(s, half::f16::from_f32(d * qsum as f32), "Q8_1 s, block {b}");
                    }
                    ActFormat::Q8_K => {
                        for j in 0..16 {
                            let at = 4 + 256 + 2 * j;
                            let bsum = i16::from_le_bytes([blk[at], blk[at + 1]]) as i32;
                            let qsum: i32 = blk[4 + 16 * j..4 + 16 * j + 16].iter().map(|&q| q as i8 as i32).sum();
                            assert_eq!(bsum, qsum, "Q8_K bsums[{j}], block {b}");
                        }
                        assert!(blk[4..4 + 256].iter().all(|&q| q as i8 != -128));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn type_by_name(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("fixture names unknown type {name}"))
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("bad hex"))
        .collect()
}

/// Against ggml itself (fixture from scripts/fixtures/qdot.py):
///  * kiln's activation quantization reproduces ggml-cpu's `from_float` byte for byte,
///    including rows built so that every element is a rounding tie;
///  * for the types whose x86 `ggml_vec_dot_*` llama.cpp runs on a row alone (Q4_0,
///    Q4_1, Q5_0, Q5_1, Q8_0, Q6_K), kiln's dot on ggml's activation bytes equals it bit
///    for bit (same integer sums, same f32 products, same summation order);
///  * Q2_K, Q3_K and Q5_K, which kiln computes in the order of ggml's generic C code,
///    equal `ggml_vec_dot_*_generic` bit for bit;
///  * every type agrees with the SIMD `vec_dot` to 1e-6 × magnitude (Q4_K, the float
///    types and the generic-order K-quants sum the same terms in another order: for
///    Q4_K, that of the repacked kernels llama.cpp runs instead of `vec_dot`).
#[test]
fn matches_ggml_fixture() {
    let doc: Value = serde_json::from_str(FIXTURE).expect("fixture is valid JSON");
    let entries = doc["entries"].as_array().expect("entries");
    let mut acts = Vec::new();
    let mut covered = std::collections::HashSet::new();
    let mut worst_simd = 0f64;
    for e in entries {
        let ty = type_by_name(e["weight"].as_str().unwrap());
        let kind = e["kind"].as_str().unwrap();
        let n = e["n"].as_u64().unwrap() as usize;
        let w = hex_bytes(e["weight_hex"].as_str().unwrap());
        let x: Vec<f32> = hex_bytes(e["x_hex"].as_str().unwrap())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want_acts = hex_bytes(e["acts_hex"].as_str().unwrap());
        let fmt = activation_format(ty);
        assert_eq!(
            format!("{fmt:?}"),
            e["acts_format"].as_str().unwrap(),
            "{ty}: vec_dot_type"
        );

        quantize_activations(fmt, &x, &mut acts);
        assert!(
            acts == want_acts,
            "{ty} {kind} n={n}: activation bytes differ from ggml-cpu's {fmt:?}"
        );

        let got = dot(ty, &w, &want_acts, n);
        let exact = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q6_K => {
                Some(("SIMD", &e["dot_simd"]))
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q5_K => Some(("generic", &e["dot_generic"])),
            _ => None,
        };
        if let Some((which, want)) = exact {
            let want = want.as_f64().unwrap() as f32;
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{ty} {kind} n={n}: kiln {got} vs ggml {which} {want}"
            );
        }
        let simd = e["dot_simd"].as_f64().unwrap();
        let (_, mag) = reference(ty, &w, &want_acts, n);
        let err = (got as f64 - simd).abs() / mag.max(f64::MIN_POSITIVE);
        worst_simd = worst_simd.max(err);
        assert!(
            err <= 1e-6,
            "{ty} {kind} n={n}: kiln {got} vs ggml SIMD {simd} (error {err:e} of {mag})"
        );
        covered.insert(ty);
    }
    assert_eq!(
        covered.len(),
        GgmlType::ALL.len(),
        "fixture lacks types; rerun scripts/fixtures/qdot.py"
    );
    eprintln!("dot vs ggml SIMD vec_dot: worst error {worst_simd:e} of magnitude");
}
