//! Float kernels on slices: dot products, norms, rotary embeddings, activations, attention.
//!
//! These are the reference kernels: plain, always correct, written so that the compiler
//! vectorizes them. Where the CPU has AVX2+FMA the hot loops are compiled a second time
//! for it and chosen at run time.

/// Dot product of two equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Whether this CPU has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Sixteen independent accumulators let the compiler keep several vector registers busy
/// without reassociating float additions itself (which it may not do).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..c * LANES + LANES], &b[c * LANES..c * LANES + LANES]);
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut sum = 0f32;
    for i in chunks * LANES..a.len() {
        sum = a[i].mul_add(b[i], sum);
    }
    acc.iter().sum::<f32>() + sum
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = x.mul_add(a, *y);
    }
}

/// RMS normalization of one row in place: `x = x / rms(x) * weight`, rounded as ggml
/// rounds it (f32 squares summed in f64, then the scale, then the weight).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { rms_norm_avx2(x, weight, eps) };
        }
    }
    rms_norm_portable(x, weight, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_avx2(x: &mut [f32], weight: &[f32], eps: f32) {
    rms_norm_portable(x, weight, eps)
}

#[inline(always)]
fn rms_norm_portable(x: &mut [f32], weight: &[f32], eps: f32) {
    // Squares in f32 (as ggml), summed in f64 over four lanes so the loop vectorizes;
    // the f64 sum of a few thousand f32 squares rounds to the same f32 either way
    // except in the rarest ties.
    let mut lanes = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|v| (v * v) as f64).sum();
    for c in chunks {
        for l in 0..4 {
            lanes[l] += (c[l] * c[l]) as f64;
        }
    }
    let mean_square = (lanes.iter().sum::<f64>() + tail) / x.len() as f64;
    let inv = 1.0 / ((mean_square as f32) + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = (*v * inv) * w;
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF llama checkpoints, whose q/k rows were permuted for it.
    Interleaved,
    /// Halves (i, i + d/2): GPT-NeoX, Hugging Face checkpoints, Qwen and Gemma in GGUF.
    Neox,
}

/// The `(sin, cos)` of every rotated pair at each of `positions`, appended to `out`
/// position after position, computed as ggml does: the angle of pair `i` is `pos · s^i`
/// with `s = theta^(-2 / rope_dims)`, built by multiplying by `s` pair after pair (in
/// f32, rounding at each step), then libm's `sinf`/`cosf`.
pub fn rope_angles(positions: &[u32], rope_dims: usize, theta: f32, out: &mut Vec<(f32, f32)>) {
    let step = theta.powf(-2.0 / rope_dims as f32);
    for &pos in positions {
        let mut angle = pos as f32;
        for _ in 0..rope_dims / 2 {
            out.push((angle.sin(), angle.cos()));
            angle *= step;
        }
    }
}

/// Rotates one head by precomputed `(sin, cos)` per pair (`table.len()` pairs rotate);
/// heads of one position share a table. Each output is one product and one fused
/// multiply-add, as ggml's x86 build contracts `x0·cos − x1·sin` and `x0·sin + x1·cos`.
pub fn rope_with(head: &mut [f32], table: &[(f32, f32)], style: RopeStyle) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { rope_with_fma(head, table, style) };
        }
    }
    rope_with_portable(head, table, style)
}

/// [`rope_with`] compiled with FMA, so `mul_add` is one instruction rather than a call
/// (the same rounding either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_with_fma(head: &mut [f32], table: &[(f32, f32)], style: RopeStyle) {
    rope_with_portable(head, table, style)
}

#[inline(always)]
fn rope_with_portable(head: &mut [f32], table: &[(f32, f32)], style: RopeStyle) {
    let half = table.len();
    for (i, &(sin, cos)) in table.iter().enumerate() {
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0.mul_add(cos, -(x1 * sin));
        head[b] = x0.mul_add(sin, x1 * cos);
    }
}

/// SiLU (swish): `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU with the tanh approximation, as Gemma uses it.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `exp(x)` as ggml's vectorized `ggml_v_expf` computes it (a polynomial after range
/// reduction, at most ~1.5 ulp from the exact value), so that [`silu_ggml`] rounds as
/// llama.cpp does.
#[inline(always)]
pub fn exp_ggml(x: f32) -> f32 {
    // The constants as hexadecimal floats: 0x1.8p23, 0x1.715476p+0 (log2 e),
    // 0x1.62e4p-1 and 0x1.7f7d1cp-20 (ln 2 in two parts), then the polynomial's.
    let round = f32::from_bits(0x4b40_0000);
    let (log2e, ln2_hi, ln2_lo) = (
        f32::from_bits(0x3fb8_aa3b),
        f32::from_bits(0x3f31_7200),
        f32::from_bits(0x35bf_be8e),
    );
    let c = [0x3c07_2010, 0x3d2b_9f17, 0x3e2a_af33, 0x3eff_fedb, 0x3f7f_fff6].map(f32::from_bits);
    let n = x.mul_add(log2e, round) - round;
    let b = (-n).mul_add(ln2_lo, (-n).mul_add(ln2_hi, x));
    let u = b * b;
    let j = c[0]
        .mul_add(b, c[1])
        .mul_add(u, c[2].mul_add(b, c[3]))
        .mul_add(u, c[4].mul_add(b, 1.0));
    if n.abs() > 126.0 {
        // Near or past the ends of the f32 range: scale in f64 and round once, as
        // `scalef` does (subnormal results, overflow to infinity, underflow to 0).
        if n.abs() > 192.0 {
            return if n <= 0.0 { 0.0 } else { f32::INFINITY };
        }
        return (j as f64 * 2f64.powi(n as i32)) as f32;
    }
    // j · 2^n with |n| ≤ 126 is exact in f32: build 2^n from its exponent bits.
    j * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// SiLU as llama.cpp's CPU backend computes it: `x / (1 + exp(-x))` with [`exp_ggml`].
#[inline(always)]
pub fn silu_ggml(x: f32) -> f32 {
    x / (1.0 + exp_ggml(-x))
}

/// `gate[i] = silu_ggml(gate[i]) * up[i]`: SwiGLU as llama.cpp computes it.
pub fn swiglu_ggml(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx512Vnni {
            // SAFETY: the CPU supports AVX-512 F (detected by `simd_level`).
            return unsafe { swiglu_ggml_avx512(gate, up) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above. (Without FMA
            // enabled, `mul_add` in `exp_ggml` is a libm call per element.)
            return unsafe { swiglu_ggml_avx2(gate, up) };
        }
    }
    swiglu_portable(gate, up)
}

/// [`swiglu_ggml`] sixteen lanes at a time: [`exp_ggml`]'s operations one for one, its
/// final `j · 2^n` as one `scalef` (which rounds once, as the scalar code does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn swiglu_ggml_avx512(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    assert!(up.len() >= gate.len());
    let f = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let (round, log2e, ln2_hi, ln2_lo) = (f(0x4b40_0000), f(0x3fb8_aa3b), f(0x3f31_7200), f(0x35bf_be8e));
    let c = [0x3c07_2010, 0x3d2b_9f17, 0x3e2a_af33, 0x3eff_fedb, 0x3f7f_fff6].map(f);
    let one = _mm512_set1_ps(1.0);
    let n_len = gate.len();
    let mut i = 0;
    while i + 16 <= n_len {
        // SAFETY: i + 16 ≤ len for both slices.
        unsafe {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
            let n = _mm512_sub_ps(_mm512_fmadd_ps(neg, log2e, round), round);
            let b = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, neg));
            let u = _mm512_mul_ps(b, b);
            let j = _mm512_fmadd_ps(
                _mm512_fmadd_ps(_mm512_fmadd_ps(c[0], b, c[1]), u, _mm512_fmadd_ps(c[2], b, c[3])),
                u,
                _mm512_fmadd_ps(c[4], b, one),
            );
            let e = _mm512_scalef_ps(j, n);
            // |n| > 192: exactly 0 or infinity, as the scalar code returns.
            let abs_n = _mm512_abs_ps(n);
            let far = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs_n, _mm512_set1_ps(192.0));
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(n, _mm512_setzero_ps());
            let e = _mm512_mask_mov_ps(e, far & !positive, _mm512_setzero_ps());
            let e = _mm512_mask_mov_ps(e, far & positive, _mm512_set1_ps(f32::INFINITY));
            let silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_storeu_ps(
                gate.as_mut_ptr().add(i),
                _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(i))),
            );
        }
        i += 16;
    }
    swiglu_portable(&mut gate[i..], &up[i..n_len]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_ggml_avx2(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu_ggml(*g) * u;
    }
}

/// GELU-tanh as llama.cpp's CPU backend computes it: from a table indexed by the input
/// rounded to f16, holding f16 results (inputs beyond ±10 pass through or vanish).
#[inline]
pub fn gelu_tanh_ggml(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        gelu_f16_table()[half::f16::from_f32(x).to_bits() as usize]
    }
}

/// GELU-tanh of every f16 value, rounded to f16 (ggml's `table_gelu_f16`) and held as
/// f32, indexed by the input's f16 bits; built once.
fn gelu_f16_table() -> &'static [f32] {
    use std::sync::OnceLock;
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                const COEF_A: f32 = 0.044_715;
                // `1 + a·x·x` as one fused multiply-add, as GCC contracts ggml's
                // `ggml_gelu_f32`.
                let inner = (SQRT_2_OVER_PI * x) * (COEF_A * x).mul_add(x, 1.0);
                round_to_f16((0.5 * x) * (1.0 + inner.tanh()))
            })
            .collect()
    })
}

/// `gate[i] = gelu_tanh_ggml(gate[i]) * up[i]`: GeGLU as llama.cpp computes it.
pub fn geglu_ggml(gate: &mut [f32], up: &[f32]) {
    let table = gelu_f16_table();
    #[cfg(target_arch = "x86_64")]
    {
        if crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx512Vnni {
            // SAFETY: the CPU supports AVX-512 F and F16C (detected by `simd_level`).
            return unsafe { geglu_ggml_avx512(gate, up, table) };
        }
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh_ggml(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
unsafe fn geglu_ggml_avx512(gate: &mut [f32], up: &[f32], table: &[f32]) {
    use std::arch::x86_64::*;
    assert!(up.len() >= gate.len() && table.len() == 1 << 16);
    let n = gate.len();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n for both slices; gather indices are f16 bit patterns
        // (< 65536), inside the table.
        unsafe {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            let looked_up = _mm512_i32gather_ps::<4>(bits, table.as_ptr().cast());
            // Beyond ±10 the table is bypassed: x itself above, 0 below.
            let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(10.0));
            let low = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, _mm512_set1_ps(-10.0));
            let y = _mm512_mask_mov_ps(looked_up, high, x);
            let y = _mm512_mask_mov_ps(y, low, _mm512_setzero_ps());
            _mm512_storeu_ps(
                gate.as_mut_ptr().add(i),
                _mm512_mul_ps(y, _mm512_loadu_ps(up.as_ptr().add(i))),
            );
        }
        i += 16;
    }
    for j in i..n {
        gate[j] = gelu_tanh_ggml(gate[j]) * up[j];
    }
}

/// Softmax in place, stable against large inputs.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Causal attention of one query head over cached keys and values.
///
/// `keys` and `values` hold `n_ctx` rows of `stride` floats; this head's slice starts at
/// `offset` in each row and is `q.len()` long. Positions `first..n_ctx` are visible.
/// `scores` is scratch of at least `n_ctx` floats.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    first: usize,
    n_ctx: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let scores = &mut scores[first..n_ctx];
    for (j, s) in scores.iter_mut().enumerate() {
        let row = (first + j) * stride + offset;
        *s = dot(q, &keys[row..row + d]) * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        let row = (first + j) * stride + offset;
        axpy(*p, &values[row..row + d], out);
    }
}

/// `x` rounded to the nearest f16 value (ties to even), as f32.
#[inline]
pub fn round_to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// `dst[i]` = the f16 bits of `src[i]`, rounded to nearest (ties to even), for
/// equal-length slices.
pub fn f32_to_f16_slice(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx2 {
            // SAFETY: the CPU supports F16C, checked just above; the lengths are equal.
            return unsafe { f32_to_f16_f16c(src, dst) };
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(*s).to_bits();
    }
}

/// `dst[i]` = the f16 with bits `src[i]`, as f32, for equal-length slices.
pub fn f16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx2 {
            // SAFETY: the CPU supports F16C, checked just above; the lengths are equal.
            return unsafe { f16_to_f32_f16c(src, dst) };
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(*s).to_f32();
    }
}

/// Rounds every value of `x` to the nearest f16 (ties to even), in place.
pub fn round_to_f16_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::gemm::simd_level() >= crate::gemm::SimdLevel::Avx2 {
            // SAFETY: the CPU supports F16C, checked just above.
            return unsafe { round_to_f16_f16c(x) };
        }
    }
    for v in x {
        *v = round_to_f16(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_to_f16_f16c(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: c holds 8 floats.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for v in chunks.into_remainder() {
        *v = round_to_f16(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= src.len() {
        // SAFETY: i + 8 ≤ len of both slices.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
        }
        i += 8;
    }
    for j in i..src.len() {
        dst[j] = half::f16::from_f32(src[j]).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= src.len() {
        // SAFETY: i + 8 ≤ len of both slices.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for j in i..src.len() {
        dst[j] = half::f16::from_bits(src[j]).to_f32();
    }
}

/// The index of the largest value, the first on ties; NaN is never the largest, and a
/// row without a number gives 0.
pub fn argmax(row: &[f32]) -> u32 {
    // Two passes the compiler vectorizes (a scan carrying the index is one compare and
    // branch per value: a vocabulary of 49k took ~20 µs): the largest value in 16
    // lanes (`v > m` keeps m where v is NaN), then its first index.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let largest = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if largest == f32::NEG_INFINITY {
        // No value beats -inf: as a scan from index 0 would, answer 0.
        return 0;
    }
    for (c, chunk) in row.chunks(LANES).enumerate() {
        // Whole chunks compared at once; only the chunk that holds it is searched.
        if chunk.iter().fold(false, |found, &v| found | (v == largest)) {
            let within = chunk.iter().position(|&v| v == largest).unwrap_or(0);
            return (c * LANES + within) as u32;
        }
    }
    0
}

/// The `out.len()` highest-ranked values of `row` (by value, then the lowest index), NaN
/// and -inf left out, as (index, value) in no particular order; returns how many (fewer
/// where the row has fewer numbers). `scratch` holds the row's candidates meanwhile.
pub fn top_k(row: &[f32], scratch: &mut Vec<(u32, f32)>, out: &mut [(u32, f32)]) -> usize {
    scratch.clear();
    let numbers = row.iter().enumerate().filter(|(_, v)| **v > f32::NEG_INFINITY);
    scratch.extend(numbers.map(|(i, v)| (i as u32, *v)));
    let k = out.len().min(scratch.len());
    if k == 0 {
        return 0;
    }
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    out[..k].copy_from_slice(&scratch[..k]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_matches_a_scan_with_ties_nan_and_infinities() {
        // The scan that defines it: the first strictly larger value wins; NaN never does.
        let scan = |row: &[f32]| {
            let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
            for (i, &v) in row.iter().enumerate() {
                if v > best_value {
                    (best, best_value) = (i, v);
                }
            }
            best as u32
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in [0, 1, 5, 16, 17, 31, 64, 100, 49_153] {
            for _ in 0..20 {
                // Few distinct values, so ties are common, with NaN and ±inf mixed in.
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 23 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 if len < 100 => f32::INFINITY,
                        r => (r % 7) as f32 - 3.0,
                    })
                    .collect();
                assert_eq!(argmax(&row), scan(&row), "len {len}: {row:?}");
            }
        }
        let all_nan = [f32::NAN; 40];
        assert_eq!(argmax(&all_nan), 0);
        let mut late = [f32::NEG_INFINITY; 40];
        late[0] = f32::NAN;
        late[37] = -1.0;
        assert_eq!(argmax(&late), 37);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn f16_conversions_round_trip_and_round_to_nearest() {
        let x: Vec<f32> = (0..37)
            .map(|i| (i as f32 * 0.731).sin() * 3000.0 + 1e-3 * i as f32)
            .collect();
        let mut bits = vec![0u16; x.len()];
        let mut back = vec![0f32; x.len()];
        f32_to_f16_slice(&x, &mut bits);
        f16_to_f32_slice(&bits, &mut back);
        for ((&a, &b), &h) in x.iter().zip(&back).zip(&bits) {
            assert_eq!(h, half::f16::from_f32(a).to_bits());
            assert_eq!(b, round_to_f16(a));
        }
    }

    #[test]
    fn dot_matches_naive_sum_on_odd_lengths() {
        for n in [0, 1, 7, 16, 17, 33, 255] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn rope_styles_agree_after_permuting_dimensions() {
        // Interleaved rope on (a0,b0,a1,b1,...) equals neox rope on (a0,a1,...,b0,b1,...).
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        let mut inter = x.clone();
        let mut table = Vec::new();
        rope_angles(&[5], d, 10000.0, &mut table);
        rope_with(&mut inter, &table, RopeStyle::Interleaved);
        let mut neox: Vec<f32> = (0..d / 2)
            .map(|i| x[2 * i])
            .chain((0..d / 2).map(|i| x[2 * i + 1]))
            .collect();
        rope_with(&mut neox, &table, RopeStyle::Neox);
        for i in 0..d / 2 {
            assert!((inter[2 * i] - neox[i]).abs() < 1e-5);
            assert!((inter[2 * i + 1] - neox[i + d / 2]).abs() < 1e-5);
        }
    }

    #[test]
    fn ggml_style_activations_stay_close_to_exact_ones() {
        for i in -400..400 {
            let x = i as f32 * 0.037;
            assert!((exp_ggml(x) - x.exp()).abs() <= 4e-7 * x.exp(), "exp({x})");
            assert!((silu_ggml(x) - silu(x)).abs() <= 1e-6 * (1.0 + x.abs()), "silu({x})");
            // f16 input and output: about 1e-3 relative.
            assert!(
                (gelu_tanh_ggml(x) - gelu_tanh(x)).abs() <= 2e-3 * (1.0 + x.abs()),
                "gelu({x})"
            );
        }
        assert_eq!(exp_ggml(-200.0), 0.0);
        assert_eq!(exp_ggml(200.0), f32::INFINITY);
        assert_eq!(gelu_tanh_ggml(12.0), 12.0);
    }

    #[test]
    fn vector_swiglu_matches_scalar() {
        let mut x: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0731).collect();
        x.extend([-1e4, -200.0, -150.0, -100.0, -88.0, 88.0, 100.0, 150.0, 1e4, 0.0, -0.0]);
        x.extend((0..16).map(|i| -87.0 - i as f32 * 0.7)); // subnormal exp(-x) range
        let up: Vec<f32> = (0..x.len()).map(|i| 0.5 + i as f32 * 0.001).collect();
        let mut gate = x.clone();
        swiglu_ggml(&mut gate, &up);
        for i in 0..x.len() {
            assert_eq!(gate[i].to_bits(), (silu_ggml(x[i]) * up[i]).to_bits(), "x = {}", x[i]);
        }
    }

    #[test]
    fn vector_geglu_matches_scalar() {
        let n = 1000;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.027).collect();
        let up: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.001).collect();
        let mut gate = x.clone();
        geglu_ggml(&mut gate, &up);
        for i in 0..n {
            assert_eq!(gate[i], gelu_tanh_ggml(x[i]) * up[i], "x = {}", x[i]);
        }
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = [1.0, 0.0];
        let keys = [0.5, 0.5];
        let values = [3.0, -2.0];
        let mut scores = [0.0; 1];
        let mut out = [0.0; 2];
        attend(&q, &keys, &values, 2, 0, 0, 1, 1.0, &mut scores, &mut out);
        assert_eq!(out, [3.0, -2.0]);
    }
}
