//! Quantized matrix products: a band of weight rows times a batch of activation rows.
//!
//! One call computes `out[t][r] = dot(weight row r, activation row t)` for every weight
//! row of the band and every activation row, with the arithmetic of [`crate::qdot`]:
//! activations quantized once per row to the weight type's 8-bit block format
//! ([`crate::qdot::activation_format`]), integer products per block, f32 scales. The
//! integer parts are exact, so a SIMD kernel differs from the scalar reference only in
//! the order of the f32 sums.
//!
//! The caller (the runtime) splits the weight rows of a matrix into bands across
//! threads; a kernel sees one band and every token, so it can reuse each unpacked weight
//! block across tokens (prefill) or stream its rows once (decode, one token).
//!
//! At a given SIMD level every element is the same bits whatever else is in the call:
//! the number of tokens and the band a row falls in choose which kernel computes it
//! (decode or prefill, tile widths, row groups and tails), never its operations or their
//! order. Batching several sessions' tokens into one call thus changes no session's
//! results (`gemm_is_batch_invariant` in `tests/gemm.rs`).
//!
//! Kernels are chosen at run time from what the CPU has: AVX-512 VNNI, then AVX2, then
//! the portable scalar path ([`crate::qdot::dot`] per element), which is always correct.

use crate::qdot;
use crate::quant::GgmlType;

#[cfg(target_arch = "x86_64")]
mod blocks32;
#[cfg(target_arch = "x86_64")]
mod kquants;

/// Where a kernel writes its results: element `(t, r)` at `ptr + t * ld + r`.
///
/// Several threads write one output matrix at once, each through its own `OutMatrix`
/// over a disjoint band of columns `r`; a raw pointer lets them do so without aliasing
/// `&mut` slices.
#[derive(Clone, Copy)]
pub struct OutMatrix {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: an `OutMatrix` is only a place to write; `new`'s contract makes concurrent
// writers touch disjoint elements.
unsafe impl Send for OutMatrix {}
unsafe impl Sync for OutMatrix {}

impl OutMatrix {
    /// # Safety
    /// For every `(t, r)` a kernel is asked to compute, `ptr + t * ld + r` must be valid
    /// for writes and written by no one else while the kernel runs.
    pub unsafe fn new(ptr: *mut f32, ld: usize) -> Self {
        OutMatrix { ptr, ld }
    }

    /// The same matrix seen from column `r0` on: element `(t, r)` is `(t, r0 + r)` here.
    pub fn offset_cols(self, r0: usize) -> Self {
        OutMatrix {
            ptr: self.ptr.wrapping_add(r0),
            ld: self.ld,
        }
    }

    /// The same matrix seen from row `t0` on: element `(t, r)` is `(t0 + t, r)` here.
    pub fn offset_rows(self, t0: usize) -> Self {
        OutMatrix {
            ptr: self.ptr.wrapping_add(t0 * self.ld),
            ld: self.ld,
        }
    }

    /// Stores `v` at `(t, r)`.
    ///
    /// # Safety
    /// `(t, r)` is one of the elements `new`'s contract covers.
    #[inline(always)]
    pub unsafe fn write(self, t: usize, r: usize, v: f32) {
        unsafe { *self.ptr.add(t * self.ld + r) = v }
    }
}

/// The SIMD level a kernel runs at, detected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (plus AVX2/FMA/F16C and BMI2, which every such CPU has).
    Avx512Vnni,
}

/// The best SIMD level this CPU supports (`KILN_SIMD=scalar|avx2` lowers it, for tests
/// and comparisons).
pub fn simd_level() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        match std::env::var("KILN_SIMD").as_deref() {
            Ok("scalar") => SimdLevel::Scalar,
            Ok("avx2") => best.min(SimdLevel::Avx2),
            _ => best,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("bmi2");
    if avx512 {
        SimdLevel::Avx512Vnni
    } else if avx2 {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// ggml's `hsum_float_8`, the last step of its x86 dot products:
/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let x = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// Transposes a 16 × 16 matrix of 32-bit lanes, one row per zmm.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: &[std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + j], 128-bit lane L: rows 4i..4i + 4 of column 4L + j.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut o = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let v02 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[j], u[4 + j]);
        let v13 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[j], u[4 + j]);
        let w02 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + j], u[12 + j]);
        let w13 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + j], u[12 + j]);
        o[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v02, w02);
        o[8 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v02, w02);
        o[4 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v13, w13);
        o[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v13, w13);
    }
    o
}

/// Whether a product of `ty` over `n_tokens` activation rows streams its weights from
/// their blocks, row after row (decode, and small batches of the 32-value block types),
/// rather than sweeping bands of repacked rows. A caller splitting the rows across
/// threads should then let each thread walk one run of rows: every new run starts with
/// a stall until the prefetchers catch on (SmolLM2's decode went from 172 to 243
/// tokens/s with two runs per thread instead of eight or more scattered ones).
pub fn streams_weights(ty: GgmlType, n_tokens: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(streams) = blocks32::streams(simd_level(), ty, n_tokens) {
            return streams;
        }
    }
    n_tokens == 1
}

/// Where llama.cpp's CPU backend would place an activation row when it multiplies it,
/// which picks its kernel and so the order of some f32 sums: as one of a group of four
/// rows (its repacked 4-row Q4_K GEMM rounds per 64 elements, [`qdot::dot_in`]) and in a
/// batch of at least 8 rows (its tiled K-quant GEMM takes Q6_K's super-blocks to f32 in
/// another order). llama.cpp decides both per call from the row count; kiln decides them
/// per sequence ([`RowShape::of_sequence`]), as llama.cpp would run that sequence alone,
/// so a sequence's results never depend on what else is batched with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowShape {
    pub in_group_of_4: bool,
    pub in_batch_of_8: bool,
}

impl RowShape {
    /// The shapes of the `len` rows of one sequence's chunk, in order: the first
    /// `len - len % 4` are in groups of four, and all are in a batch of 8 when `len ≥ 8`.
    pub fn of_sequence(len: usize) -> impl Iterator<Item = RowShape> {
        let grouped = len - len % 4;
        (0..len).map(move |i| RowShape {
            in_group_of_4: i < grouped,
            in_batch_of_8: len >= 8,
        })
    }
}

/// `out[t][r] = dot(weights row r, acts row t)` for `r < n_rows`, `t < n_tokens`.
///
/// `weights` holds `n_rows` consecutive rows of `cols` elements of `ty` as stored in
/// GGUF; `acts` holds `n_tokens` consecutive rows quantized by
/// [`qdot::quantize_activations`] to [`qdot::activation_format`]`(ty)`.
///
/// `shapes` gives each token's [`RowShape`]; empty means every token alone (a row of
/// one).
///
/// # Panics
/// If the slices are not exactly those sizes.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    ty: GgmlType,
    weights: &[u8],
    n_rows: usize,
    cols: usize,
    acts: &[u8],
    n_tokens: usize,
    shapes: &[RowShape],
    out: OutMatrix,
) {
    gemm_at(simd_level(), ty, weights, n_rows, cols, acts, n_tokens, shapes, out)
}

/// Activation rows repacked once for every band of one product.
///
/// The SIMD kernels for 32-element blocks read activations in a layout of their own;
/// [`gemm`] repacks them on every call, which for a prefill split into many bands of
/// rows means repacking every token once per band. A caller that splits one product
/// into bands prepares them here once and passes them to [`gemm_repacked`].
#[derive(Default)]
pub struct RepackedActs {
    #[cfg(target_arch = "x86_64")]
    lines: Vec<blocks32::Line>,
    /// The weight type, columns and tokens they were repacked for; `None` when the
    /// kernels take the activations as they are.
    key: Option<(GgmlType, usize, usize)>,
}

impl RepackedActs {
    /// Repacks `n_tokens` rows of `acts` (as [`gemm`] takes them) for weights of `ty`
    /// with `cols` columns, replacing what was here.
    ///
    /// # Panics
    /// If `acts` is shorter than `n_tokens` rows.
    pub fn prepare(&mut self, ty: GgmlType, cols: usize, acts: &[u8], n_tokens: usize) {
        self.key = None;
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the level was detected on this CPU; repack_acts checks the size.
            let done = unsafe { blocks32::repack_acts(simd_level(), ty, cols, acts, n_tokens, &mut self.lines) };
            if done {
                self.key = Some((ty, cols, n_tokens));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ty, cols, acts, n_tokens);
    }

    /// The repacked lines, when they were made for this product.
    #[cfg(target_arch = "x86_64")]
    fn lines_for(&self, ty: GgmlType, cols: usize, n_tokens: usize) -> &[blocks32::Line] {
        if self.key == Some((ty, cols, n_tokens)) {
            &self.lines
        } else {
            &[]
        }
    }
}

/// [`gemm`] with the activations also repacked in `repacked` (when it was prepared for
/// this type, these columns and tokens; otherwise the call repacks them itself). Same
/// results, bit for bit.
///
/// # Panics
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_repacked(
    ty: GgmlType,
    weights: &[u8],
    n_rows: usize,
    cols: usize,
    acts: &[u8],
    repacked: &RepackedActs,
    n_tokens: usize,
    shapes: &[RowShape],
    out: OutMatrix,
) {
    gemm_with(
        simd_level(),
        ty,
        weights,
        n_rows,
        cols,
        acts,
        Some(repacked),
        n_tokens,
        shapes,
        out,
    )
}

/// [`gemm`] at a given SIMD level (at most [`simd_level`]): for tests that compare levels.
#[allow(clippy::too_many_arguments)]
pub fn gemm_at(
    level: SimdLevel,
    ty: GgmlType,
    weights: &[u8],
    n_rows: usize,
    cols: usize,
    acts: &[u8],
    n_tokens: usize,
    shapes: &[RowShape],
    out: OutMatrix,
) {
    gemm_with(level, ty, weights, n_rows, cols, acts, None, n_tokens, shapes, out)
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
    level: SimdLevel,
    ty: GgmlType,
    weights: &[u8],
    n_rows: usize,
    cols: usize,
    acts: &[u8],
    repacked: Option<&RepackedActs>,
    n_tokens: usize,
    shapes: &[RowShape],
    out: OutMatrix,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = repacked;
    let row_bytes = ty
        .row_bytes(cols)
        .expect("gemm: cols is a whole number of weight blocks");
    let act_bytes = qdot::activation_format(ty)
        .row_bytes(cols)
        .expect("gemm: cols is a whole number of activation blocks");
    assert_eq!(weights.len(), n_rows * row_bytes, "gemm: weight bytes");
    assert_eq!(acts.len(), n_tokens * act_bytes, "gemm: activation bytes");
    assert!(level <= simd_level(), "gemm: {level:?} is not supported by this CPU");
    assert!(
        shapes.is_empty() || shapes.len() == n_tokens,
        "gemm: one row shape per token"
    );
    let shape = |t: usize| shapes.get(t).copied().unwrap_or_default();
    #[cfg(target_arch = "x86_64")]
    if level != SimdLevel::Scalar {
        // SAFETY: `level` was detected on this CPU, and the sizes were checked above.
        let done = unsafe {
            match ty {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                    // Repacked activations were made at the detected level.
                    let lines = match repacked {
                        Some(r) if level == simd_level() => r.lines_for(ty, cols, n_tokens),
                        _ => &[],
                    };
                    blocks32::gemm(level, ty, weights, n_rows, cols, acts, n_tokens, out, lines)
                }
                GgmlType::Q4_K | GgmlType::Q6_K => {
                    kquants::gemm(level, ty, weights, n_rows, cols, acts, n_tokens, shapes, out)
                }
                _ => false,
            }
        };
        if done {
            return;
        }
    }
    for r in 0..n_rows {
        let w = &weights[r * row_bytes..][..row_bytes];
        for t in 0..n_tokens {
            let a = &acts[t * act_bytes..][..act_bytes];
            // SAFETY: (t, r) is in the band the caller handed us.
            unsafe { out.write(t, r, qdot::dot_in(ty, w, a, cols, shape(t))) };
        }
    }
}
