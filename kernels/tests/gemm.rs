//! The SIMD matrix kernels (`gemm`) against the scalar reference (`qdot::dot`, itself
//! tested against ggml and an f64 reference in `qdot.rs`), on fresh random inputs of odd
//! sizes: band heights and token counts that are not multiples of any tile, rows of one
//! block and of many.

mod common;

use common::Rng;
use kiln_kernels::gemm::{gemm, gemm_at, gemm_repacked, simd_level, OutMatrix, RepackedActs, RowShape, SimdLevel};
use kiln_kernels::qdot::{activation_format, dot_in, quantize_activations};
use kiln_kernels::GgmlType;

/// The types with SIMD kernels (the others take the scalar path at every level).
const TYPES: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Random weight rows: random quant bytes, every f16 scale field set to a finite value
/// of magnitude 1e-3..1 (random bytes there would give NaN and infinity).
fn random_weights(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let scale_fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!(),
    };
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let blocks = rows * cols / bs;
    let mut raw: Vec<u8> = (0..blocks * ts).map(|_| rng.next_u64() as u8).collect();
    for b in 0..blocks {
        for &off in scale_fields {
            let mag = 10f32.powf(-3.0 * rng.unit() as f32);
            let v = if rng.unit() < 0.5 { mag } else { -mag };
            raw[b * ts + off..b * ts + off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    raw
}

fn levels() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
        .into_iter()
        .filter(|&l| l <= simd_level())
        .collect()
}

/// Every level's `gemm` equals `qdot::dot_in` element by element, bit for bit: the
/// kernels only vectorize the scalar reference's operations (ggml's x86 order), so the
/// same integers are scaled and summed in the same order. Each token randomly is or is
/// not in a group of four and in a batch of 8 ([`RowShape`]), which changes the orders of
/// Q4_K and Q6_K.
#[test]
fn simd_gemm_matches_scalar_dot_exactly() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng(seed);
    let mut acts = Vec::new();
    let mut one = Vec::new();
    let mut failures = Vec::new();
    for ty in TYPES {
        let bs = ty.block_size().max(32);
        for &(rows, blocks, tokens) in &[(1, 1, 1), (3, 2, 1), (17, 3, 5), (8, 9, 13), (37, 7, 2), (5, 24, 67)] {
            let cols = bs * blocks;
            let weights = random_weights(&mut rng, ty, rows, cols);
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.normal() * 0.5).collect();
            let shapes: Vec<RowShape> = (0..tokens)
                .map(|_| RowShape {
                    in_group_of_4: rng.unit() < 0.5,
                    in_batch_of_8: rng.unit() < 0.5,
                })
                .collect();
            let fmt = activation_format(ty);
            acts.clear();
            for row in x.chunks_exact(cols) {
                quantize_activations(fmt, row, &mut one);
                acts.extend_from_slice(&one);
            }
            let (rb, ab) = (ty.row_bytes(cols).unwrap(), fmt.row_bytes(cols).unwrap());
            let mut expect = vec![0f32; tokens * rows];
            for r in 0..rows {
                for t in 0..tokens {
                    let w = &weights[r * rb..][..rb];
                    expect[t * rows + r] = dot_in(ty, w, &acts[t * ab..][..ab], cols, shapes[t]);
                }
            }
            for level in levels() {
                let mut got = vec![f32::NAN; tokens * rows];
                // SAFETY: got has tokens × rows elements, ld = rows, one writer.
                let out = unsafe { OutMatrix::new(got.as_mut_ptr(), rows) };
                gemm_at(level, ty, &weights, rows, cols, &acts, tokens, &shapes, out);
                let bad: Vec<usize> = (0..tokens * rows)
                    .filter(|&i| got[i].to_bits() != expect[i].to_bits())
                    .collect();
                if let Some(&i) = bad.first() {
                    failures.push(format!(
                        "{ty} {level:?} rows {rows} cols {cols} tokens {tokens}: {} differ, first (t {}, r {}): \
                         got {:e} want {:e}",
                        bad.len(),
                        i / rows,
                        i % rows,
                        got[i],
                        expect[i]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// Each output element is the same bits whatever else is in the call: every prefix of
/// the tokens (the decode and prefill paths, each tile width and remainder) and every
/// split of the rows into bands at odd boundaries (4-row groups and tails) give exactly
/// the values of one call over all rows and tokens, at every SIMD level. The engine
/// relies on it to batch sessions without changing any one's output.
#[test]
fn gemm_is_batch_invariant() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng(seed);
    let (rows, tokens) = (37, 67);
    let bands = [0, 5, 21, 37];
    let mut one = Vec::new();
    let mut failures = Vec::new();
    for ty in TYPES {
        let bs = ty.block_size().max(32);
        for blocks in [1, 3, 16, 33] {
            let cols = bs * blocks;
            let weights = random_weights(&mut rng, ty, rows, cols);
            let fmt = activation_format(ty);
            let mut acts = Vec::new();
            for _ in 0..tokens {
                let x: Vec<f32> = (0..cols).map(|_| rng.normal() * 0.5).collect();
                quantize_activations(fmt, &x, &mut one);
                acts.extend_from_slice(&one);
            }
            let (rb, ab) = (ty.row_bytes(cols).unwrap(), fmt.row_bytes(cols).unwrap());
            for level in levels() {
                let mut full = vec![f32::NAN; tokens * rows];
                // SAFETY: full has tokens × rows elements, ld = rows, one writer.
                let out = unsafe { OutMatrix::new(full.as_mut_ptr(), rows) };
                gemm_at(level, ty, &weights, rows, cols, &acts, tokens, &[], out);
                for n in [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17] {
                    let a = &acts[..n * ab];
                    let mut whole = vec![f32::NAN; n * rows];
                    let mut banded = vec![f32::NAN; n * rows];
                    // SAFETY: as above, n × rows.
                    let out = unsafe { OutMatrix::new(whole.as_mut_ptr(), rows) };
                    gemm_at(level, ty, &weights, rows, cols, a, n, &[], out);
                    // SAFETY: as above; the bands write disjoint columns.
                    let out = unsafe { OutMatrix::new(banded.as_mut_ptr(), rows) };
                    for b in bands.windows(2) {
                        let w = &weights[b[0] * rb..b[1] * rb];
                        gemm_at(level, ty, w, b[1] - b[0], cols, a, n, &[], out.offset_cols(b[0]));
                    }
                    for (how, got) in [("one call", &whole), ("bands 0..5, 5..21, 21..37", &banded)] {
                        let bad: Vec<usize> = (0..n * rows)
                            .filter(|&i| got[i].to_bits() != full[i].to_bits())
                            .collect();
                        if let Some(&i) = bad.first() {
                            failures.push(format!(
                                "{ty} {level:?} cols {cols}, {n} tokens in {how}: {} elements differ, first (t {}, r {}): \
                                 {:e} but {:e} among {tokens} tokens",
                                bad.len(),
                                i / rows,
                                i % rows,
                                got[i],
                                full[i]
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// Activations repacked once and shared by bands of rows give the bits of `gemm`
/// repacking them per call, and a repack made for another token count is not used.
#[test]
fn repacked_activations_give_the_same_bits() {
    let mut rng = Rng(0x5eed_0a11);
    let rows = 29;
    let mut one = Vec::new();
    for ty in TYPES {
        let cols = ty.block_size().max(32) * 19;
        let weights = random_weights(&mut rng, ty, rows, cols);
        let rb = ty.row_bytes(cols).unwrap();
        let fmt = activation_format(ty);
        for n in [1, 3, 8, 13, 40] {
            let mut acts = Vec::new();
            for _ in 0..n {
                let x: Vec<f32> = (0..cols).map(|_| rng.normal() * 0.5).collect();
                quantize_activations(fmt, &x, &mut one);
                acts.extend_from_slice(&one);
            }
            let mut want = vec![f32::NAN; n * rows];
            // SAFETY: n × rows elements, ld = rows, one writer.
            gemm(ty, &weights, rows, cols, &acts, n, &[], unsafe {
                OutMatrix::new(want.as_mut_ptr(), rows)
            });
            let mut repacked = RepackedActs::default();
            // Stale first (fewer tokens, where n > 1), then the right one.
            for m in [n.div_ceil(2), n] {
                repacked.prepare(ty, cols, &acts[..m * fmt.row_bytes(cols).unwrap()], m);
                let mut got = vec![f32::NAN; n * rows];
                // SAFETY: as above; the two bands write disjoint columns.
                let out = unsafe { OutMatrix::new(got.as_mut_ptr(), rows) };
                for (r0, r1) in [(0, 11), (11, rows)] {
                    let w = &weights[r0 * rb..r1 * rb];
                    gemm_repacked(ty, w, r1 - r0, cols, &acts, &repacked, n, &[], out.offset_cols(r0));
                }
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty}, {n} tokens, prepared for {m}");
            }
        }
    }
}
