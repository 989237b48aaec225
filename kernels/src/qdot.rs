//! Quantized dot products the way ggml's CPU backend computes them.
//!
//! llama.cpp does not dequantize weights for a matrix-vector product. It quantizes the
//! activation row once to an 8-bit block format (the weight type's "vec_dot_type") and
//! takes integer dot products block by block, scaling each block's integer sum by the
//! weight and activation scales:
//!
//! | weight                          | activations ([`ActFormat`])   |
//! |---------------------------------|-------------------------------|
//! | Q4_0, Q5_0, Q8_0                | [`ActFormat::Q8_0`]           |
//! | Q4_1, Q5_1                      | [`ActFormat::Q8_1`]           |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K    | [`ActFormat::Q8_K`]           |
//! | F32                             | [`ActFormat::F32`]            |
//! | F16                             | [`ActFormat::F16`]            |
//! | BF16                            | [`ActFormat::BF16`]           |
//!
//! This module is the scalar reference of that scheme: [`quantize_activations`] turns an
//! f32 row into the activation format, and [`dot`] takes one weight row against it.
//!
//! Numerics, chosen to match ggml (commit 0c1e570) bit for bit where it matters:
//! * Activation quantization follows ggml-cpu's `quantize_row_q8_0`/`_q8_1` as built for
//!   x86 (AVX2) — `d = amax / 127` stored as f16, `q = round_half_even(x * (127 / amax))`
//!   — and `quantize_row_q8_K_ref` for Q8_K (f32 `d = 1 / (-127 / max)` where `max` is the
//!   signed element of largest magnitude, `q = min(127, round_half_even(x * -127 / max))`,
//!   i16 sums per 16). The portable `_ref` Q8_0/Q8_1 differ only in rare last-bit cases
//!   (`1 / (amax / 127)` instead of `127 / amax`, ties away from zero); see
//!   [`quantize_q8_0_block`].
//! * Dot products follow ggml-cpu's generic (scalar) `ggml_vec_dot_*` functions: integer
//!   sums per block (exact), then the same f32 products and the same f32 accumulation
//!   order (for Q3_K..Q6_K the eight per-lane f32 accumulators of the generic code).
//!   ggml's SIMD versions reorder the f32 sums, which moves the result by a few ulps of
//!   the sum of magnitudes; the integer parts are identical.

use crate::gemm::RowShape;
use crate::quant::{GgmlType, QK_K};
use half::{bf16, f16};

/// Elements per block of Q8_0 / Q8_1.
pub const QK8: usize = 32;

/// The format an activation row is converted to before a dot with a weight row.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// Little-endian f32 per element (weights F32).
    F32,
    /// Little-endian IEEE half per element (weights F16; ggml rounds activations to f16).
    F16,
    /// Little-endian bf16 per element (weights BF16; ggml rounds activations to bf16).
    BF16,
    /// 34-byte blocks of 32: `d: f16`, `qs: [i8; 32]`; value = `d * q`.
    Q8_0,
    /// 36-byte blocks of 32: `d: f16`, `s: f16` (= `d * Σq`, rounded to f16),
    /// `qs: [i8; 32]`.
    Q8_1,
    /// 292-byte blocks of 256: `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]` (sums of
    /// each 16 consecutive `qs`).
    Q8_K,
}

impl ActFormat {
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            ActFormat::F32 | ActFormat::F16 | ActFormat::BF16 => 1,
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK8,
            ActFormat::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            ActFormat::F32 => 4,
            ActFormat::F16 | ActFormat::BF16 => 2,
            ActFormat::Q8_0 => 2 + QK8,
            ActFormat::Q8_1 => 4 + QK8,
            ActFormat::Q8_K => 4 + QK_K + 2 * (QK_K / 16),
        }
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

/// The activation format ggml pairs with weights of type `weight` (its `vec_dot_type`).
pub fn activation_format(weight: GgmlType) -> ActFormat {
    match weight {
        GgmlType::F32 => ActFormat::F32,
        GgmlType::F16 => ActFormat::F16,
        GgmlType::BF16 => ActFormat::BF16,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActFormat::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => ActFormat::Q8_1,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => ActFormat::Q8_K,
    }
}

/// Quantizes (or converts) the activation row `x` to `format`, replacing the contents of
/// `out` with `format.row_bytes(x.len())` bytes. `out` keeps its capacity, so reusing one
/// buffer across calls does not allocate.
///
/// # Panics
/// If `x.len()` is not a whole number of `format` blocks.
pub fn quantize_activations(format: ActFormat, x: &[f32], out: &mut Vec<u8>) {
    let n = x.len();
    let Some(bytes) = format.row_bytes(n) else {
        panic!(
            "quantize_activations: {n} elements is not a whole number of {format:?} blocks of {}",
            format.block_size()
        );
    };
    out.clear();
    out.resize(bytes, 0);
    quantize_activations_into(format, x, out);
}

/// [`quantize_activations`] into a slice of exactly `format.row_bytes(x.len())` bytes,
/// for callers that quantize many rows into one buffer from several threads.
///
/// # Panics
/// If `x.len()` is not a whole number of `format` blocks or `out` is not that size.
pub fn quantize_activations_into(format: ActFormat, x: &[f32], out: &mut [u8]) {
    assert_eq!(
        Some(out.len()),
        format.row_bytes(x.len()),
        "quantize_activations_into: output size"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let blocks = matches!(format, ActFormat::Q8_0 | ActFormat::Q8_1 | ActFormat::Q8_K);
        if blocks && crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx512Vnni {
            // SAFETY: the CPU supports AVX-512 F/BW (detected by `simd_level`).
            return unsafe { quantize_avx512(format, x, out) };
        }
        if crate::ops::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { quantize_avx2(format, x, out) };
        }
    }
    quantize_portable(format, x, out)
}

/// The 8-bit block formats with AVX-512: the same arithmetic as the portable code (the
/// conversion instruction rounds half to even, as `round_half_even` does), sixteen
/// lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_avx512(format: ActFormat, x: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let (bs, ts) = (format.block_size(), format.type_size());
    for (xb, yb) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
        let halves = bs / 16;
        // SAFETY: xb holds `bs` floats, a multiple of 16.
        let load = |h: usize| unsafe { _mm512_loadu_ps(xb.as_ptr().add(16 * h)) };
        let mut amax = _mm512_setzero_ps();
        for h in 0..halves {
            amax = _mm512_max_ps(amax, _mm512_abs_ps(load(h)));
        }
        let amax = _mm512_reduce_max_ps(amax);
        match format {
            ActFormat::Q8_0 | ActFormat::Q8_1 => {
                let d = amax / 127.0;
                let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let head = if format == ActFormat::Q8_0 { 2 } else { 4 };
                let mut sum = 0i32;
                for h in 0..halves {
                    let q = _mm512_cvtps_epi32(_mm512_mul_ps(load(h), id));
                    sum += _mm512_reduce_add_epi32(q);
                    // SAFETY: 16 bytes at head + 16h lie within the block's quants.
                    unsafe { _mm_storeu_si128(yb.as_mut_ptr().add(head + 16 * h).cast(), _mm512_cvtepi32_epi8(q)) };
                }
                yb[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                if format == ActFormat::Q8_1 {
                    // ggml: s = fp16(d * Σq) with the f32 d (before rounding to f16).
                    yb[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
                }
            }
            _ => {
                if amax == 0.0 {
                    yb.fill(0);
                    continue;
                }
                // The signed value of largest magnitude, the first one on ties.
                let first = xb.iter().position(|v| v.abs() == amax).expect("amax is some |x|");
                let iscale = -127.0f32 / xb[first];
                let scale = _mm512_set1_ps(iscale);
                for h in 0..halves {
                    let q = _mm512_min_epi32(
                        _mm512_cvtps_epi32(_mm512_mul_ps(load(h), scale)),
                        _mm512_set1_epi32(127),
                    );
                    let sum = _mm512_reduce_add_epi32(q) as i16;
                    // SAFETY: 16 bytes at 4 + 16h lie within the block's quants.
                    unsafe { _mm_storeu_si128(yb.as_mut_ptr().add(4 + 16 * h).cast(), _mm512_cvtepi32_epi8(q)) };
                    let at = 4 + QK_K + 2 * h;
                    yb[at..at + 2].copy_from_slice(&sum.to_le_bytes());
                }
                yb[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
            }
        }
    }
}

/// [`quantize_portable`] compiled for AVX2: the same operations, vectorized.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(format: ActFormat, x: &[f32], out: &mut [u8]) {
    quantize_portable(format, x, out)
}

#[inline(always)]
fn quantize_portable(format: ActFormat, x: &[f32], out: &mut [u8]) {
    let bs = format.block_size();
    let ts = format.type_size();
    for (xb, yb) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
        match format {
            ActFormat::F32 => yb.copy_from_slice(&xb[0].to_le_bytes()),
            ActFormat::F16 => yb.copy_from_slice(&f16::from_f32(xb[0]).to_le_bytes()),
            ActFormat::BF16 => yb.copy_from_slice(&bf16::from_f32(xb[0]).to_le_bytes()),
            ActFormat::Q8_0 => {
                let (d, qs) = yb.split_at_mut(2);
                let (d32, _) = quantize_q8_0_block(xb, qs);
                d.copy_from_slice(&f16::from_f32(d32).to_le_bytes());
            }
            ActFormat::Q8_1 => {
                let (head, qs) = yb.split_at_mut(4);
                let (d, sum) = quantize_q8_0_block(xb, qs);
                // ggml: s = fp16(d * Σq) with the f32 d (before rounding to f16).
                head[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                head[2..].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
            }
            ActFormat::Q8_K => quantize_q8_k_block(xb, yb),
        }
    }
}

/// Quantizes 32 values to `qs` as ggml-cpu's x86 `quantize_row_q8_0` does: `d = amax /
/// 127` (the caller stores it as f16), `q = round_half_even(x * (127 / amax))`. Returns
/// the f32 `d` and `Σq`.
///
/// (ggml's portable `quantize_row_q8_0_ref` multiplies by `1 / d` and rounds ties away
/// from zero; the two differ only when `x * id` lands on an exact tie or within an ulp of
/// one, which is rare.)
#[inline(always)]
fn quantize_q8_0_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = round_half_even(v * id);
        sum += r;
        *q = r as i8 as u8;
    }
    (d, sum)
}

/// Rounds to the nearest integer, ties to even, for |v| < 2^22 (ggml's `nearest_int`;
/// the same as `f32::round_ties_even`, which without SSE4.1 is a libm call per element).
/// Adding and subtracting 1.5 * 2^23 leaves an f32 with no fraction bits.
#[inline(always)]
fn round_half_even(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC) - MAGIC) as i32
}

/// Quantizes 256 values to one Q8_K block as `quantize_row_q8_K_ref` does.
#[inline(always)]
fn quantize_q8_k_block(x: &[f32], y: &mut [u8]) {
    // The signed value of largest magnitude (the first one on ties).
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    let iscale = -127.0f32 / max;
    let (d, rest) = y.split_at_mut(4);
    let (qs, bsums) = rest.split_at_mut(QK_K);
    for (q, &v) in qs.iter_mut().zip(x) {
        // ggml's nearest_int: round half to even.
        let r = round_half_even(iscale * v).min(127);
        *q = r as i8 as u8;
    }
    for (j, bsum) in bsums.chunks_exact_mut(2).enumerate() {
        let s: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| q as i8 as i32).sum();
        bsum.copy_from_slice(&(s as i16).to_le_bytes());
    }
    d.copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// The dot product of one weight row (`n` elements of `weight_ty`, as stored in GGUF)
/// with one activation row quantized by [`quantize_activations`] to
/// [`activation_format`]`(weight_ty)`.
///
/// # Panics
/// If `n` is not a whole number of blocks, or either slice is not exactly the bytes of
/// `n` elements.
pub fn dot(weight_ty: GgmlType, weight_row: &[u8], acts: &[u8], n: usize) -> f32 {
    dot_in(weight_ty, weight_row, acts, n, RowShape::default())
}

/// [`dot`] for an activation row of the given [`RowShape`], which picks the order of the
/// f32 sums of Q4_K and Q6_K as llama.cpp's kernel for such a row has it; other types
/// ignore it.
pub fn dot_in(weight_ty: GgmlType, weight_row: &[u8], acts: &[u8], n: usize, shape: RowShape) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::ops::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_avx2(weight_ty, weight_row, acts, n, shape) };
        }
    }
    dot_portable(weight_ty, weight_row, acts, n, shape)
}

/// [`dot_in`] compiled for AVX2 + FMA: the same operations (fused multiply-adds stay
/// exactly where the portable code asks for them), vectorized and without libm calls.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(weight_ty: GgmlType, weight_row: &[u8], acts: &[u8], n: usize, shape: RowShape) -> f32 {
    dot_portable(weight_ty, weight_row, acts, n, shape)
}

#[inline(always)]
fn dot_portable(weight_ty: GgmlType, weight_row: &[u8], acts: &[u8], n: usize, shape: RowShape) -> f32 {
    let fmt = activation_format(weight_ty);
    let (Some(wb), Some(ab)) = (weight_ty.row_bytes(n), fmt.row_bytes(n)) else {
        panic!("qdot::dot: {n} elements is not a whole number of {weight_ty} blocks");
    };
    assert_eq!(
        weight_row.len(),
        wb,
        "qdot::dot: {n} elements of {weight_ty} take {wb} bytes, but the weight row has {}",
        weight_row.len()
    );
    assert_eq!(
        acts.len(),
        ab,
        "qdot::dot: {n} activations as {fmt:?} take {ab} bytes, but acts has {}",
        acts.len()
    );
    match weight_ty {
        GgmlType::F32 => dot_float(weight_row, acts, 4, f32_at, 4, f32_at),
        GgmlType::F16 => dot_float(weight_row, acts, 2, f16_at, 2, f16_at),
        GgmlType::BF16 => dot_float(weight_row, acts, 2, bf16_at, 2, bf16_at),
        GgmlType::Q4_0 => dot_q4_0(weight_row, acts),
        GgmlType::Q4_1 => dot_q4_1(weight_row, acts),
        GgmlType::Q5_0 => dot_q5_0(weight_row, acts),
        GgmlType::Q5_1 => dot_q5_1(weight_row, acts),
        GgmlType::Q8_0 => dot_q8_0(weight_row, acts),
        GgmlType::Q2_K => dot_q2_k(weight_row, acts),
        GgmlType::Q3_K => dot_q3_k(weight_row, acts),
        GgmlType::Q4_K => dot_q4_k(weight_row, acts, shape.in_group_of_4),
        GgmlType::Q5_K => dot_q5_k(weight_row, acts),
        GgmlType::Q6_K => dot_q6_k(weight_row, acts, shape.in_batch_of_8),
    }
}

/// Dequantizes one activation row (as [`quantize_activations`] wrote it) to f32: the
/// values the integer dot products actually use. For tests and diagnostics.
pub fn dequantize_activations(format: ActFormat, acts: &[u8], out: &mut [f32]) {
    let n = out.len();
    assert_eq!(Some(acts.len()), format.row_bytes(n), "dequantize_activations: size");
    let bs = format.block_size();
    for (b, y) in acts.chunks_exact(format.type_size()).zip(out.chunks_exact_mut(bs)) {
        match format {
            ActFormat::F32 => y[0] = f32_at(b, 0),
            ActFormat::F16 => y[0] = f16_at(b, 0),
            ActFormat::BF16 => y[0] = bf16_at(b, 0),
            ActFormat::Q8_0 | ActFormat::Q8_1 => {
                let d = f16_at(b, 0);
                let off = if format == ActFormat::Q8_0 { 2 } else { 4 };
                for (o, &q) in y.iter_mut().zip(&b[off..off + QK8]) {
                    *o = d * q as i8 as f32;
                }
            }
            ActFormat::Q8_K => {
                let d = f32_at(b, 0);
                for (o, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
                    *o = d * q as i8 as f32;
                }
            }
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline(always)]
fn bf16_at(b: &[u8], at: usize) -> f32 {
    bf16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline(always)]
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline(always)]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&q| q as i8 as i32)
}

/// Float rows: products in f32, summed in 8 f32 lanes (vectorizable), lanes then added
/// in order. (ggml's SIMD f32/f16 dots also use lane accumulators, of a different
/// width, so this matches it to rounding only.)
#[inline(always)]
fn dot_float(
    w: &[u8],
    a: &[u8],
    wsz: usize,
    wget: fn(&[u8], usize) -> f32,
    asz: usize,
    aget: fn(&[u8], usize) -> f32,
) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (i, (wc, ac)) in w.chunks_exact(wsz).zip(a.chunks_exact(asz)).enumerate() {
        lanes[i % 8] += wget(wc, 0) * aget(ac, 0);
    }
    lanes.iter().sum()
}

/// The 16 activation quants of a Q8_0 block at `b`: `(d, qs)`.
#[inline(always)]
fn q8_0_block(b: &[u8]) -> (f32, &[u8]) {
    (f16_at(b, 0), &b[2..2 + QK8])
}

/// The 32-element block types in the order of ggml's x86 (AVX2) dot products, which
/// llama.cpp's CPU backend runs on any x86 build with AVX2, AVX-512 included:
///
/// * per block, eight lanes of integer sums, lane `l` over elements `4l..4l + 4` in
///   ggml's element order (low nibbles are elements 0..16, high nibbles 16..32);
/// * `acc[l] = fma(lane[l], d_w * d_a, acc[l])`, block after block;
/// * the lanes summed as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`;
/// * for Q4_1/Q5_1, plus `Σ m_w * s_a` accumulated by fused multiply-adds.
///
/// Summing in exactly this order (not only with the same integers) is what lets greedy
/// decoding follow llama.cpp's tokens: small models have many near-ties, and an ulp of
/// difference in one activation can flip an 8-bit rounding a few layers later.
#[inline(always)]
fn dot_blocks32(nb: usize, mut block: impl FnMut(usize) -> (f32, [i32; 8], f32, f32)) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for b in 0..nb {
        let (scale, lanes, m, s) = block(b);
        for (a, &l) in acc.iter_mut().zip(&lanes) {
            *a = (l as f32).mul_add(scale, *a);
        }
        mins = m.mul_add(s, mins);
    }
    hsum8(&acc) + mins
}

/// ggml's `hsum_float_8`: `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Lane sums of a block: lane `l` is `Σ w[j] a[j]` for `j` in `4l..4l + 4`.
#[inline(always)]
fn lane_sums(w: &[i32; 32], a: &[u8]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for (j, (&x, &y)) in w.iter().zip(a).enumerate() {
        lanes[j / 4] += x * y as i8 as i32;
    }
    lanes
}

/// The 32 four-bit values of a block's `qs`, in element order, minus `off`.
#[inline(always)]
fn q4_values(qs: &[u8], off: i32) -> [i32; 32] {
    let mut v = [0i32; 32];
    for j in 0..16 {
        v[j] = (qs[j] & 0x0F) as i32 - off;
        v[j + 16] = (qs[j] >> 4) as i32 - off;
    }
    v
}

/// Q4_0 × Q8_0: `(q_w - 8) q_a` per element; scale `d_w * d_a`.
#[inline(always)]
fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks32(w.len() / 18, |b| {
        let (wb, ab) = (&w[18 * b..][..18], &a[34 * b..][..34]);
        let (da, qa) = q8_0_block(ab);
        let lanes = lane_sums(&q4_values(&wb[2..18], 8), qa);
        (f16_at(wb, 0) * da, lanes, 0.0, 0.0)
    })
}

/// Q4_1 × Q8_1: `q_w q_a` per element; scale `d_w * d_a`, plus `m_w * s_a` per block.
#[inline(always)]
fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks32(w.len() / 20, |b| {
        let (wb, ab) = (&w[20 * b..][..20], &a[36 * b..][..36]);
        let lanes = lane_sums(&q4_values(&wb[4..20], 0), &ab[4..36]);
        (f16_at(wb, 0) * f16_at(ab, 0), lanes, f16_at(wb, 2), f16_at(ab, 2))
    })
}

/// The 32 five-bit values of a Q5_0/Q5_1 block (`qh`, `qs` as stored), unsigned 0..32.
#[inline(always)]
fn q5_values(qh: u32, qs: &[u8]) -> [i32; 32] {
    let mut v = q4_values(qs, 0);
    for (j, x) in v.iter_mut().enumerate() {
        *x |= (((qh >> j) & 1) << 4) as i32;
    }
    v
}

/// Q5_0 × Q8_0: `(q_w - 16) q_a` per element; scale `d_w * d_a`.
#[inline(always)]
fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks32(w.len() / 22, |b| {
        let (wb, ab) = (&w[22 * b..][..22], &a[34 * b..][..34]);
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let mut v = q5_values(qh, &wb[6..22]);
        v.iter_mut().for_each(|x| *x -= 16);
        let (da, qa) = q8_0_block(ab);
        (f16_at(wb, 0) * da, lane_sums(&v, qa), 0.0, 0.0)
    })
}

/// Q5_1 × Q8_1: `q_w q_a` per element; scale `d_w * d_a`, plus `m_w * s_a` per block.
#[inline(always)]
fn dot_q5_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks32(w.len() / 24, |b| {
        let (wb, ab) = (&w[24 * b..][..24], &a[36 * b..][..36]);
        let qh = u32::from_le_bytes([wb[4], wb[5], wb[6], wb[7]]);
        let lanes = lane_sums(&q5_values(qh, &wb[8..24]), &ab[4..36]);
        (f16_at(wb, 0) * f16_at(ab, 0), lanes, f16_at(wb, 2), f16_at(ab, 2))
    })
}

/// Q8_0 × Q8_0: `q_w q_a` per element; scale `d_w * d_a`.
#[inline(always)]
fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks32(w.len() / 34, |b| {
        let (wb, ab) = (&w[34 * b..][..34], &a[34 * b..][..34]);
        let (dw, qw) = q8_0_block(wb);
        let (da, qa) = q8_0_block(ab);
        let mut v = [0i32; 32];
        for (x, &q) in v.iter_mut().zip(qw) {
            *x = q as i8 as i32;
        }
        (dw * da, lane_sums(&v, qa), 0.0, 0.0)
    })
}

/// A Q8_K block: `(d, qs, bsums)`.
#[inline(always)]
fn q8_k_block(b: &[u8]) -> (f32, &[u8], [i32; 16]) {
    let mut bsums = [0i32; 16];
    for (j, s) in bsums.iter_mut().enumerate() {
        let at = 4 + QK_K + 2 * j;
        *s = i16::from_le_bytes([b[at], b[at + 1]]) as i32;
    }
    (f32_at(b, 0), &b[4..4 + QK_K], bsums)
}

/// Q8_K blocks are this many bytes.
const Q8K_SIZE: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Adds `scale * q_w[e] * q_a[e]` for the elements `e` of `range` (a multiple of 8 long,
/// starting at a multiple of 8) into lane `e % 8`, as ggml's generic K-quant dots do.
#[inline(always)]
fn lanes_add(aux32: &mut [i32; 8], scale: i32, qw: &[i8], qa: &[u8]) {
    for (cw, ca) in qw.chunks_exact(8).zip(qa.chunks_exact(8)) {
        for l in 0..8 {
            aux32[l] += scale * (cw[l] as i32 * ca[l] as i8 as i32);
        }
    }
}

/// Q2_K × Q8_K: per super-block `sumf += (d_a * d_w) * isum - (d_a * dmin_w) * summs`,
/// where `isum = Σ_sub scale_sub Σ q_w q_a` and `summs = Σ_sub bsum_sub * min_sub`.
#[inline(always)]
fn dot_q2_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(84).zip(a.chunks_exact(Q8K_SIZE)) {
        let sc = &wb[0..16];
        let q2 = &wb[16..80];
        let (da, qa, bsums) = q8_k_block(ab);
        let summs: i32 = bsums.iter().zip(sc).map(|(&b, &s)| b * (s >> 4) as i32).sum();
        let dall = da * f16_at(wb, 80);
        let dmin = da * f16_at(wb, 82);
        let mut isum = 0i32;
        for half in 0..2 {
            let q = &q2[32 * half..32 * half + 32];
            for k in 0..4 {
                let shift = 2 * k;
                for part in 0..2 {
                    let sub = 8 * half + 2 * k + part;
                    let e0 = 16 * sub;
                    let isuml: i32 = q[16 * part..16 * part + 16]
                        .iter()
                        .zip(i8s(&qa[e0..e0 + 16]))
                        .map(|(&x, y)| ((x >> shift) & 3) as i32 * y)
                        .sum();
                    isum += (sc[sub] & 0x0F) as i32 * isuml;
                }
            }
        }
        sumf += (isum as f32).mul_add(dall, -(dmin * summs as f32));
    }
    sumf
}

/// The signed 6-bit scale of Q3_K sub-block `k` (0..16), bias removed.
#[inline(always)]
fn scale_k3(k: usize, s: &[u8]) -> i32 {
    let low = if k < 8 { s[k] & 0x0F } else { s[k - 8] >> 4 };
    let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// The 6-bit scale and min of Q4_K/Q5_K sub-block `j` (0..8).
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((s[j] & 63) as i32, (s[j + 4] & 63) as i32)
    } else {
        (
            ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4)) as i32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as i32,
        )
    }
}

/// Final reduction of the generic K-quant dots: `sumf` (carrying any min terms), plus
/// the eight lane sums in order.
#[inline(always)]
fn reduce_lanes(mut sumf: f32, sums: &[f32; 8]) -> f32 {
    for &s in sums {
        sumf += s;
    }
    sumf
}

/// Q3_K × Q8_K, following ggml's generic code: integer products per element, scaled by
/// the sub-block's signed scale, accumulated in eight i32 lanes (element index mod 8);
/// per super-block each lane adds `(d_w * d_a) * lane` to an f32 lane sum; the lane
/// sums are added at the end.
#[inline(always)]
fn dot_q3_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut q = [0i8; QK_K];
    for (wb, ab) in w.chunks_exact(110).zip(a.chunks_exact(Q8K_SIZE)) {
        let hmask = &wb[0..32];
        let qs = &wb[32..96];
        let scales = &wb[96..108];
        let (da, qa, _) = q8_k_block(ab);
        for half in 0..2 {
            let ql = &qs[32 * half..32 * half + 32];
            for k in 0..4 {
                let (shift, hbit) = (2 * k, 4 * half + k);
                let out = &mut q[128 * half + 32 * k..128 * half + 32 * k + 32];
                for l in 0..32 {
                    let low = ((ql[l] >> shift) & 3) as i8;
                    out[l] = if (hmask[l] >> hbit) & 1 == 1 { low } else { low - 4 };
                }
            }
        }
        let mut aux32 = [0i32; 8];
        for sub in 0..16 {
            let r = 16 * sub..16 * sub + 16;
            lanes_add(&mut aux32, scale_k3(sub, scales), &q[r.clone()], &qa[r]);
        }
        let d = f16_at(wb, 108) * da;
        for (s, &x) in sums.iter_mut().zip(&aux32) {
            *s = d.mul_add(x as f32, *s);
        }
    }
    reduce_lanes(0.0, &sums)
}

/// Q4_K and Q5_K × Q8_K (ggml's generic code): the scale terms as in [`dot_q3_k`] with
/// 32-element sub-blocks, and per super-block `sumf -= (dmin_w * d_a) * Σ bsum * min`.
/// `q` receives the unsigned quants; `decode` fills it from the weight block.
#[inline(always)]
fn dot_q45_k(w: &[u8], a: &[u8], wsize: usize, decode: impl Fn(&[u8], &mut [i8; QK_K])) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    let mut q = [0i8; QK_K];
    for (wb, ab) in w.chunks_exact(wsize).zip(a.chunks_exact(Q8K_SIZE)) {
        let scales = &wb[4..16];
        let (da, qa, bsums) = q8_k_block(ab);
        decode(wb, &mut q);
        let mut sc = [0i32; 8];
        let mut mn = [0i32; 8];
        for j in 0..8 {
            (sc[j], mn[j]) = scale_min_k4(j, scales);
        }
        let sumi: i32 = bsums.iter().enumerate().map(|(j, &b)| b * mn[j / 2]).sum();
        let mut aux32 = [0i32; 8];
        for (sub, &s) in sc.iter().enumerate() {
            let r = 32 * sub..32 * sub + 32;
            lanes_add(&mut aux32, s, &q[r.clone()], &qa[r]);
        }
        let d = f16_at(wb, 0) * da;
        for (s, &x) in sums.iter_mut().zip(&aux32) {
            *s = d.mul_add(x as f32, *s);
        }
        let dmin = f16_at(wb, 2) * da;
        sumf = (-dmin).mul_add(sumi as f32, sumf);
    }
    reduce_lanes(sumf, &sums)
}

/// Q4_K × Q8_K in the order of ggml's x86 repacked kernels, which llama.cpp's CPU
/// backend runs for every Q4_K matrix of a multiple of 8 rows. Per super-block, the exact
/// integer sums `Σ_sub scale · Σ q_w q_a` and `Σ_sub min · bsums` go to two f32
/// accumulators by `fma(sum, d_w * d_a, acc)` and `fma(mins, dmin_w * d_a, acc_min)`;
/// the result is `acc - acc_min`. A token that llama.cpp multiplies in a group of four
/// (`quad`: `ggml_gemm_q4_K_8x8_q8_K`) takes those two steps per pair of sub-blocks (64
/// elements) instead of per super-block (`ggml_gemv_q4_K_8x8_q8_K`).
#[inline(always)]
fn dot_q4_k(w: &[u8], a: &[u8], quad: bool) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (wb, ab) in w.chunks_exact(144).zip(a.chunks_exact(Q8K_SIZE)) {
        let (da, qa, bsums) = q8_k_block(ab);
        let (d, dmin) = (f16_at(wb, 0) * da, f16_at(wb, 2) * da);
        let (mut sum, mut mins) = (0i32, 0i32);
        for pair in 0..4 {
            let bytes = &wb[16 + 32 * pair..][..32];
            for half in 0..2 {
                let sub = 2 * pair + half;
                let (sc, mn) = scale_min_k4(sub, &wb[4..16]);
                let qa = &qa[32 * sub..][..32];
                let dot: i32 = bytes
                    .iter()
                    .zip(qa)
                    .map(|(&b, &y)| ((b >> (4 * half)) & 0x0F) as i32 * y as i8 as i32)
                    .sum();
                sum += sc * dot;
                mins += mn * (bsums[2 * sub] + bsums[2 * sub + 1]);
            }
            if quad {
                acc = (sum as f32).mul_add(d, acc);
                acc_min = (mins as f32).mul_add(dmin, acc_min);
                (sum, mins) = (0, 0);
            }
        }
        if !quad {
            acc = (sum as f32).mul_add(d, acc);
            acc_min = (mins as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
}

/// Q5_K × Q8_K; see [`dot_q45_k`].
#[inline(always)]
fn dot_q5_k(w: &[u8], a: &[u8]) -> f32 {
    dot_q45_k(w, a, 176, |wb, q| {
        let qh = &wb[16..48];
        let qs = &wb[48..176];
        for chunk in 0..4 {
            let (s1, s2) = (2 * chunk, 2 * chunk + 1);
            for l in 0..32 {
                let b = qs[32 * chunk + l];
                q[64 * chunk + l] = ((b & 0x0F) | (((qh[l] >> s1) & 1) << 4)) as i8;
                q[64 * chunk + 32 + l] = ((b >> 4) | (((qh[l] >> s2) & 1) << 4)) as i8;
            }
        }
    })
}

/// Q6_K × Q8_K as llama.cpp's x86 CPU backend computes it. A row multiplied alone or in
/// a batch of fewer than 8 goes through `ggml_vec_dot_q6_K_q8_K` (AVX2): per super-block
/// eight i32 lanes, lane `l` summing `scale · q_w q_a` over elements `32c + 4l .. 32c + 4l
/// + 4` of every 32-element chunk `c` with the unsigned quants (0..64), less
/// `32 · Σ bsum · scale` over the 16-element groups `2l` and `2l + 1`; then
/// `acc[l] = fma(d_a * d_w, lane, acc[l])`, the lanes summed as [`hsum8`]. A row in a
/// batch of 8 or more (`tiled`) goes through the tiled K-quant GEMM: per super-block the
/// whole exact sum `S`, then `acc = fma((f32) S · d_w, d_a, acc)`.
#[inline(always)]
fn dot_q6_k(w: &[u8], a: &[u8], tiled: bool) -> f32 {
    let mut acc = [0f32; 8];
    let mut total = 0f32;
    let mut q = [0i32; QK_K];
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(Q8K_SIZE)) {
        let (da, qa, bsums) = q8_k_block(ab);
        for half in 0..2 {
            let ql = &wb[64 * half..64 * half + 64];
            let qh = &wb[128 + 32 * half..128 + 32 * half + 32];
            let out = &mut q[128 * half..128 * half + 128];
            for l in 0..32 {
                out[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32;
                out[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32;
                out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
            }
        }
        let scales: [i32; 16] = std::array::from_fn(|g| wb[192 + g] as i8 as i32);
        let mut lanes = [0i32; 8];
        for (e, (&x, &y)) in q.iter().zip(qa).enumerate() {
            lanes[(e % 32) / 4] += scales[e / 16] * x * y as i8 as i32;
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane -= 32 * (bsums[2 * l] * scales[2 * l] + bsums[2 * l + 1] * scales[2 * l + 1]);
        }
        let dw = f16_at(wb, 208);
        if tiled {
            total = (lanes.iter().sum::<i32>() as f32 * dw).mul_add(da, total);
        } else {
            let d = da * dw;
            for (s, &x) in acc.iter_mut().zip(&lanes) {
                *s = d.mul_add(x as f32, *s);
            }
        }
    }
    if tiled {
        total
    } else {
        hsum8(&acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize(format: ActFormat, x: &[f32]) -> Vec<u8> {
        let mut out = vec![0xAA; 3]; // stale contents must be replaced
        quantize_activations(format, x, &mut out);
        out
    }

    #[test]
    fn q8_0_rounds_ties_to_even() {
        // amax = 127, so the scale is exactly 1 and x * id lands on exact ties.
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        x[4] = 2.4;
        let y = quantize(ActFormat::Q8_0, &x);
        assert_eq!(y.len(), 34);
        assert_eq!(f16_at(&y, 0), 1.0);
        let q: Vec<i8> = y[2..7].iter().map(|&b| b as i8).collect();
        assert_eq!(q, [127, 0, 2, -2, 2]);
    }

    #[test]
    fn round_half_even_matches_std() {
        for i in -400_000..400_000 {
            let v = i as f32 * 0.000_5 + 0.000_25 * (i % 3) as f32;
            assert_eq!(round_half_even(v), v.round_ties_even() as i32, "{v}");
        }
        assert_eq!(round_half_even(-0.5), 0);
        assert_eq!(round_half_even(126.5), 126);
        assert_eq!(round_half_even(-127.49999), -127);
    }

    /// The AVX-512 quantizer writes the same bytes as the portable one, ties, zero
    /// blocks, repeated maxima of either sign and the Q8_K clamp included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantizer_matches_portable_bytes() {
        if crate::gemm::simd_level() < crate::gemm::SimdLevel::Avx512Vnni {
            return;
        }
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..400 {
            let n = 512;
            let mut x: Vec<f32> = (0..n)
                .map(|_| ((next() % 2001) as f32 - 1000.0) * 10f32.powi((next() % 5) as i32 - 3))
                .collect();
            match round % 4 {
                0 => x[..256].fill(0.0),
                1 => {
                    // Equal magnitudes of both signs: the first one sets Q8_K's sign.
                    x[7] = -5000.0;
                    x[9] = 5000.0;
                }
                2 => x.iter_mut().for_each(|v| *v = v.round()), // exact ties at scale 1
                _ => {}
            }
            for format in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
                let bytes = format.row_bytes(n).unwrap();
                let (mut fast, mut plain) = (vec![0u8; bytes], vec![1u8; bytes]);
                // SAFETY: the level check above.
                unsafe { quantize_avx512(format, &x, &mut fast) };
                quantize_portable(format, &x, &mut plain);
                assert_eq!(fast, plain, "{format:?} round {round}");
            }
        }
    }

    #[test]
    fn q8_1_stores_scaled_sum() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let y = quantize(ActFormat::Q8_1, &x);
        let d = 21.0f32 / 127.0;
        let qsum: i32 = y[4..].iter().map(|&b| b as i8 as i32).sum();
        assert_eq!(f16_at(&y, 0), f16::from_f32(d).to_f32());
        assert_eq!(f16_at(&y, 2), f16::from_f32(d * qsum as f32).to_f32());
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        for fmt in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
            let y = quantize(fmt, &vec![0.0; fmt.block_size()]);
            assert!(y.iter().all(|&b| b == 0), "{fmt:?}");
        }
    }

    #[test]
    fn q8_k_scale_takes_the_sign_of_the_largest_element() {
        // The largest-magnitude element maps to -127 (iscale = -127 / max), so d < 0 for
        // a positive max and d > 0 for a negative one; d * q reproduces x either way.
        for sign in [1.0f32, -1.0] {
            let mut x = vec![0.0f32; QK_K];
            x[3] = 2.0 * sign;
            x[200] = -sign;
            let y = quantize(ActFormat::Q8_K, &x);
            let d = f32_at(&y, 0);
            assert_eq!(d, 1.0 / (-127.0 / (2.0 * sign)));
            assert_eq!(y[4 + 3] as i8, -127);
            assert_eq!(y[4 + 200] as i8, 64); // 63.5 rounds to even
            let bsum0 = i16::from_le_bytes([y[4 + QK_K], y[5 + QK_K]]);
            assert_eq!(bsum0, -127);
        }
    }

    #[test]
    fn q8_0_dot_by_hand() {
        // Weight block: d = 0.5, q = 1..=32; activations all 1 except the max 127.
        let mut w = vec![0u8; 34];
        w[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for j in 0..32 {
            w[2 + j] = (j as i8 + 1) as u8;
        }
        let mut x = vec![1.0f32; 32];
        x[31] = 127.0;
        let a = quantize(ActFormat::Q8_0, &x);
        let want = 0.5 * ((1..=31).sum::<i32>() + 32 * 127) as f32;
        assert_eq!(dot(GgmlType::Q8_0, &w, &a, 32), want);
    }

    #[test]
    #[should_panic(expected = "not a whole number of Q8_K blocks")]
    fn partial_block_panics() {
        quantize_activations(ActFormat::Q8_K, &[0.0; 300], &mut Vec::new());
    }

    #[test]
    #[should_panic(expected = "but acts has")]
    fn wrong_activation_format_panics() {
        let a = quantize(ActFormat::Q8_0, &[1.0; 256]);
        dot(GgmlType::Q4_K, &[0u8; 144], &a, 256);
    }
}
