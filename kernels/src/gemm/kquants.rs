//! SIMD kernels for the K-quant super-block types: Q4_K, Q6_K.
//!
//! Both compute what [`crate::qdot::dot_in`] computes, bit for bit: exact integer sums
//! per super-block (or part of one), taken to f32 in the order llama.cpp's x86 kernel for
//! the row's [`RowShape`] has it.
//!
//! * Q4_K alone (`ggml_gemv_q4_K_8x8_q8_K`): per super-block `acc = fma(Σ, d_w·d_a, acc)`
//!   and `acc_min = fma(Σ_min, dmin_w·d_a, acc_min)`; in a group of four
//!   (`ggml_gemm_q4_K_8x8_q8_K`) the same two steps per pair of sub-blocks; the result is
//!   `acc − acc_min`.
//! * Q6_K alone or in a batch under 8 (`ggml_vec_dot_q6_K_q8_K`): eight i32 lanes per
//!   super-block (lane `l` over elements `4l..4l + 4` of each 32-element chunk, less its
//!   share of `32 · Σ scale · bsum`), `acc[l] = fma(d_a·d_w, lane, acc[l])`, then
//!   `hsum_float_8`; in a batch of 8 (the tiled GEMM) `acc = fma(Σ · d_w, d_a, acc)`.
//!
//! * Few tokens (decode): each weight row is streamed once per token, several rows per
//!   pass sharing the activation loads. The quants are unsigned, so `vpmaddubsw` takes
//!   them against the signed activations directly; `vpmaddwd`/`vpdpwssd` with the
//!   sub-block scale in every word then applies the scales in integers. Q4_K's mins and
//!   Q6_K's −32 offset come from the activation block sums (`bsums`). The lanes of the
//!   integer sums are arranged so that ggml's partial sums (Q4_K's pairs of sub-blocks,
//!   Q6_K's eight lanes) are sums of whole halves.
//! * Many tokens (prefill, AVX-512): each panel of 32 weight rows is unpacked once into
//!   i16 values already multiplied by their sub-block scale (`sc · q` ≤ 945 for Q4_K,
//!   `|sc · (q − 32)|` ≤ 4096 for Q6_K) and transposed so that one zmm holds one pair of
//!   columns of 16 rows; activations are widened to i16 once per call. The micro-kernel
//!   then takes one `vpdpwssd` (activation pair broadcast from memory) per 32
//!   multiply-adds, reuses each weight load across a tile of tokens, and keeps one
//!   accumulator lane per row, so no horizontal sums. It visits Q4_K's columns one pair
//!   of sub-blocks at a time. Q6_K rows that are not in a batch of 8 take the decode path.
//! * AVX2 takes the decode scheme, 256 bits wide, for every token count.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{hsum8, transpose16, OutMatrix, RowShape, SimdLevel};
use crate::quant::{GgmlType, QK_K};

/// Bytes of a Q8_K activation block: `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]`.
const Q8K_BYTES: usize = 4 + QK_K + 32;
/// Offset of `bsums` in a Q8_K block.
const BSUMS: usize = 4 + QK_K;
/// Bytes of a Q4_K block: `d, dmin: f16`, `scales: [u8; 12]`, `qs: [u8; 128]`.
const Q4K_BYTES: usize = 144;
/// Bytes of a Q6_K block: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`.
const Q6K_BYTES: usize = 210;

/// Rows per pass of the decode kernels (they share each activation load).
const DECODE_ROWS: usize = 4;
/// How far ahead (at least) the AVX-512 decode kernel prefetches the weights.
const PREFETCH_BYTES: usize = 4096;
/// Which cache level the prefetches fill.
const PREFETCH_HINT: i32 = _MM_HINT_T1;

/// Runs the kernel for `ty` at `level`; returns false when there is none (the caller
/// then takes the scalar path).
///
/// # Safety
/// `level` is supported by this CPU, and the slices have the sizes `super::gemm_at`
/// checked.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    level: SimdLevel,
    ty: GgmlType,
    weights: &[u8],
    n_rows: usize,
    cols: usize,
    acts: &[u8],
    n_tokens: usize,
    shapes: &[RowShape],
    out: OutMatrix,
) -> bool {
    let nsb = cols / QK_K;
    let k = Problem {
        weights,
        n_rows,
        nsb,
        acts,
        n_tokens,
        shapes,
        out,
    };
    // SAFETY: the caller guarantees the CPU features of `level` and the slice sizes.
    unsafe {
        match (level, ty) {
            (SimdLevel::Avx512Vnni, GgmlType::Q4_K) => x512::gemm::<false>(&k),
            (SimdLevel::Avx512Vnni, GgmlType::Q6_K) => x512::gemm::<true>(&k),
            (SimdLevel::Avx2, GgmlType::Q4_K) => x256::gemm::<false>(&k),
            (SimdLevel::Avx2, GgmlType::Q6_K) => x256::gemm::<true>(&k),
            _ => return false,
        }
    }
    true
}

/// One call's operands: `n_rows` weight rows of `nsb` super-blocks, `n_tokens`
/// activation rows of `nsb` Q8_K blocks.
struct Problem<'a> {
    weights: &'a [u8],
    n_rows: usize,
    nsb: usize,
    acts: &'a [u8],
    n_tokens: usize,
    /// One per token, or empty (every token alone).
    shapes: &'a [RowShape],
    out: OutMatrix,
}

impl Problem<'_> {
    fn row_bytes(&self, q6: bool) -> usize {
        self.nsb * if q6 { Q6K_BYTES } else { Q4K_BYTES }
    }

    /// Whether token `t` takes the other order of its type: Q4_K in a group of four,
    /// Q6_K in a batch of 8.
    fn grouped(&self, q6: bool, t: usize) -> bool {
        let shape = self.shapes.get(t).copied().unwrap_or_default();
        if q6 {
            shape.in_batch_of_8
        } else {
            shape.in_group_of_4
        }
    }
}

/// # Safety
/// `p` is valid for reading 4 bytes.
#[inline(always)]
unsafe fn rd_u32(p: *const u8) -> u32 {
    // SAFETY: the caller's contract; unaligned reads are allowed.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// # Safety
/// `p` is valid for reading 4 bytes.
#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    f32::from_bits(unsafe { rd_u32(p) })
}

/// Prefetches the cache lines of a block of `len` bytes at `p` (one per 64 bytes; a
/// line that the block shares with the next one comes with that one's prefetch).
#[inline(always)]
fn prefetch_block(p: *const u8, len: usize) {
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
        unsafe { _mm_prefetch::<PREFETCH_HINT>(p.wrapping_add(off).cast()) };
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K block (the 12 bytes at `s`),
/// one per byte, sub-block `j` in byte `j`: `(scales, mins)`. For `j < 4` they are the
/// low 6 bits of bytes `j` and `j + 4`; for `j ≥ 4` the nibbles of byte `j + 4` plus the
/// top 2 bits of bytes `j − 4` and `j` — done here on all four sub-blocks at once.
///
/// # Safety
/// `s` is valid for reading 12 bytes.
#[inline(always)]
unsafe fn q4k_scales_mins(s: *const u8) -> (u64, u64) {
    // SAFETY: the caller's contract: 12 bytes.
    let (w0, w1, w2) = unsafe { (rd_u32(s), rd_u32(s.add(4)), rd_u32(s.add(8))) };
    let sc_hi = (w2 & 0x0F0F_0F0F) | ((w0 >> 2) & 0x3030_3030);
    let mn_hi = ((w2 >> 4) & 0x0F0F_0F0F) | ((w1 >> 2) & 0x3030_3030);
    (
        (w0 & 0x3F3F_3F3F) as u64 | (sc_hi as u64) << 32,
        (w1 & 0x3F3F_3F3F) as u64 | (mn_hi as u64) << 32,
    )
}

/// The kernels for AVX-512 (F, BW, VL, VNNI).
mod x512 {
    use super::*;

    /// `acc + Σ pairs a · b` in one `vpdpwssd`: LLVM expands `_mm512_dpwssd_epi32` into
    /// `vpmaddwd` + `vpaddd` unless tuning for a CPU known to run it fast, which
    /// `target_feature` cannot ask for. Unsafe (inline assembly); needs AVX512-VNNI.
    macro_rules! dpwssd {
        ($acc:expr, $a:expr, $b:expr) => {{
            let mut acc: __m512i = $acc;
            asm!(
                "vpdpwssd {acc}, {a}, {b}",
                acc = inout(zmm_reg) acc,
                a = in(zmm_reg) $a,
                b = in(zmm_reg) $b,
                options(pure, nomem, nostack, preserves_flags),
            );
            acc
        }};
    }

    /// Decode below this many tokens; from here on, unpacking each weight panel once
    /// for the prefill micro-kernel pays for itself.
    const PREFILL_MIN_TOKENS: usize = 4;
    /// 16-row blocks per prefill panel.
    const RB: usize = 2;
    /// Weight rows per prefill panel.
    const PANEL_ROWS: usize = 16 * RB;
    /// Tokens per prefill micro-kernel tile.
    const TILE_T: usize = 8;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemm<const Q6: bool>(k: &Problem) {
        let many = k.n_tokens >= PREFILL_MIN_TOKENS;
        // The micro-kernel computes Q6_K's batch-of-8 order: rows in smaller batches
        // take the decode path (afterwards, over what it wrote).
        let any_batched = !Q6 || (0..k.n_tokens).any(|t| k.grouped(true, t));
        if many && any_batched {
            // SAFETY: the caller's contract.
            unsafe { prefill::<Q6>(k) };
        }
        for t in 0..k.n_tokens {
            if !many || (Q6 && !k.grouped(true, t)) {
                // SAFETY: the caller's contract; t < n_tokens.
                unsafe { decode::<Q6>(k, t) };
            }
        }
    }

    /// Two 32-byte loads into the low and high halves of a zmm.
    ///
    /// # Safety
    /// `lo` and `hi` are valid for reading 32 bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn halves(lo: *const u8, hi: *const u8) -> __m512i {
        // SAFETY: the caller's contract.
        let (lo, hi) = unsafe { (_mm256_loadu_si256(lo.cast()), _mm256_loadu_si256(hi.cast())) };
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// A `vpermw` index putting word `a` in 128-bit lane 0, `b` in lane 1, `c` in 2, `d`
    /// in 3.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn lanes4(a: i32, b: i32, c: i32, d: i32) -> __m512i {
        let w = |x: i32| x | x << 16;
        _mm512_set_epi32(
            w(d),
            w(d),
            w(d),
            w(d),
            w(c),
            w(c),
            w(c),
            w(c),
            w(b),
            w(b),
            w(b),
            w(b),
            w(a),
            w(a),
            w(a),
            w(a),
        )
    }

    /// `out[t][r]` for every row and the one token `t`, `DECODE_ROWS` rows per pass.
    ///
    /// The weights are prefetched a whole number of passes ahead, at least
    /// `PREFETCH_BYTES`: the hardware prefetchers stop at each 4 KiB page (real weights
    /// are a file mapping of 4 KiB pages), and without software prefetches two threads
    /// streaming from DRAM reach only about half its bandwidth. Whole passes keep the
    /// prefetches in the order the loads will come.
    ///
    /// # Safety
    /// As [`super::gemm`]; `t < k.n_tokens`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn decode<const Q6: bool>(k: &Problem, t: usize) {
        let row_bytes = k.row_bytes(Q6);
        let a = k.acts[t * k.nsb * Q8K_BYTES..][..k.nsb * Q8K_BYTES].as_ptr();
        let w = k.weights.as_ptr();
        let pass = DECODE_ROWS * row_bytes;
        let ahead = PREFETCH_BYTES.div_ceil(pass) * pass;
        let grouped = k.grouped(Q6, t);
        let mut r = 0;
        while r + DECODE_ROWS <= k.n_rows {
            // SAFETY: rows r..r + DECODE_ROWS exist; `a` is one whole activation row.
            let v =
                unsafe { decode_rows::<Q6, DECODE_ROWS>(w.add(r * row_bytes), row_bytes, k.nsb, a, ahead, grouped) };
            for (i, &x) in v.iter().enumerate() {
                // SAFETY: (t, r + i) is in the caller's band.
                unsafe { k.out.write(t, r + i, x) };
            }
            r += DECODE_ROWS;
        }
        for r in r..k.n_rows {
            // SAFETY: as above, for one row.
            unsafe {
                let [x] = decode_rows::<Q6, 1>(w.add(r * row_bytes), row_bytes, k.nsb, a, ahead, grouped);
                k.out.write(t, r, x);
            }
        }
    }

    /// The dots of `R` (1 or 4) consecutive weight rows (at `w`, `row_bytes` apart) with
    /// one activation row `a`.
    ///
    /// The activations of a super-block are loaded once for all `R` rows, as four zmm
    /// whose 32-byte halves are the element chunks that the weight bytes, as loaded,
    /// hold: Q4_K bytes 0..64 carry chunks 0 and 2 in their low nibbles and 1 and 3 in
    /// their high ones; Q6_K `ql` bytes 0..32 and 64..96 carry chunks 0 and 4 (low
    /// nibbles) and 2 and 6 (high), with the matching `qh` bits of bytes 0..64.
    ///
    /// Lane `i` of an xmm holds row `i`'s f32 state, taken from its integer sums in the
    /// order of the module documentation for `grouped` (see [`Sb`]), so a result is the
    /// same bits whichever path and row group computed it.
    ///
    /// Each weight block is prefetched `ahead` bytes on (prefetches do not fault, so
    /// past the band's end they only cost a wasted line).
    ///
    /// # Safety
    /// `R` rows of `nsb` blocks at `w`, `nsb` Q8_K blocks at `a`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn decode_rows<const Q6: bool, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        nsb: usize,
        a: *const u8,
        ahead: usize,
        grouped: bool,
    ) -> [f32; R] {
        let mut state = Sb::new();
        let m4 = _mm512_set1_epi8(0x0F);
        let m2 = _mm512_set1_epi8(0x30);
        // Sub-block scale words per 128-bit lane of the four quant vectors.
        let idx = if Q6 {
            [
                lanes4(0, 1, 8, 9),
                lanes4(2, 3, 10, 11),
                lanes4(4, 5, 12, 13),
                lanes4(6, 7, 14, 15),
            ]
        } else {
            [
                lanes4(0, 0, 2, 2),
                lanes4(1, 1, 3, 3),
                lanes4(4, 4, 6, 6),
                lanes4(5, 5, 7, 7),
            ]
        };
        for sb in 0..nsb {
            // Per row: the integer dot in 16 lanes (Q4_K: sub-blocks 0..4 and 4..8 apart),
            // `d` (Q4_K: `d`, `dmin`) as f16 bits, Q4_K's eight 6-bit mins.
            let mut isum = [_mm512_setzero_si512(); 4];
            let mut isum_hi = [_mm512_setzero_si512(); 4];
            let mut dbits = [0u32; 4];
            let mut mins = [0u64; 4];
            // SAFETY: block sb of the activation row and of each of the R weight rows.
            unsafe {
                let ab = a.add(sb * Q8K_BYTES);
                let q = ab.add(4);
                let bsums = _mm256_loadu_si256(ab.add(BSUMS).cast());
                if Q6 {
                    let av = [
                        halves(q, q.add(128)),
                        halves(q.add(32), q.add(160)),
                        halves(q.add(64), q.add(192)),
                        halves(q.add(96), q.add(224)),
                    ];
                    for i in 0..R {
                        let wb = w.add(i * row_bytes + sb * Q6K_BYTES);
                        prefetch_block(wb.wrapping_add(ahead), Q6K_BYTES);
                        let x = halves(wb, wb.add(64));
                        let y = halves(wb.add(32), wb.add(96));
                        let h = _mm512_loadu_si512(wb.add(128).cast());
                        let v = [
                            _mm512_or_si512(_mm512_and_si512(x, m4), _mm512_and_si512(_mm512_slli_epi16::<4>(h), m2)),
                            _mm512_or_si512(_mm512_and_si512(y, m4), _mm512_and_si512(_mm512_slli_epi16::<2>(h), m2)),
                            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(x), m4), _mm512_and_si512(h, m2)),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(y), m4),
                                _mm512_and_si512(_mm512_srli_epi16::<2>(h), m2),
                            ),
                        ];
                        let sw = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192).cast()));
                        // The stored quants are q + 32: start from −32 · Σ scale · bsum.
                        let neg = _mm256_mullo_epi16(sw, _mm256_set1_epi16(-32));
                        let mut acc = dpwssd!(
                            _mm512_setzero_si512(),
                            _mm512_zextsi256_si512(neg),
                            _mm512_zextsi256_si512(bsums)
                        );
                        let swz = _mm512_zextsi256_si512(sw);
                        for j in 0..4 {
                            let p = _mm512_maddubs_epi16(v[j], av[j]);
                            acc = dpwssd!(acc, p, _mm512_permutexvar_epi16(idx[j], swz));
                        }
                        isum[i] = acc;
                        dbits[i] = wb.add(208).cast::<u16>().read_unaligned() as u32;
                    }
                } else {
                    let av = [
                        halves(q, q.add(64)),
                        halves(q.add(32), q.add(96)),
                        halves(q.add(128), q.add(192)),
                        halves(q.add(160), q.add(224)),
                    ];
                    for i in 0..R {
                        let wb = w.add(i * row_bytes + sb * Q4K_BYTES);
                        prefetch_block(wb.wrapping_add(ahead), Q4K_BYTES);
                        let (sc, mn) = q4k_scales_mins(wb.add(4));
                        let p0 = _mm512_loadu_si512(wb.add(16).cast());
                        let p1 = _mm512_loadu_si512(wb.add(80).cast());
                        let v = [
                            _mm512_and_si512(p0, m4),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(p0), m4),
                            _mm512_and_si512(p1, m4),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(p1), m4),
                        ];
                        let sw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                        // Halves of `lo`: sub-blocks 0 + 1 and 2 + 3; of `hi`: 4 + 5, 6 + 7.
                        let mut lo = _mm512_setzero_si512();
                        let mut hi = _mm512_setzero_si512();
                        for j in 0..2 {
                            let p = _mm512_maddubs_epi16(v[j], av[j]);
                            lo = dpwssd!(lo, p, _mm512_permutexvar_epi16(idx[j], sw));
                            let p = _mm512_maddubs_epi16(v[j + 2], av[j + 2]);
                            hi = dpwssd!(hi, p, _mm512_permutexvar_epi16(idx[j + 2], sw));
                        }
                        isum[i] = lo;
                        isum_hi[i] = hi;
                        dbits[i] = rd_u32(wb);
                        mins[i] = mn;
                    }
                }
                let da = _mm_set1_ps(rd_f32(ab));
                if Q6 {
                    state.q6(&isum, dbits, da, grouped);
                } else {
                    state.q4(&isum, &isum_hi, dbits, mins, bsums, da, grouped);
                }
            }
        }
        let res = state.finish::<Q6>(grouped);
        std::array::from_fn(|i| res[i])
    }

    /// The f32 state of up to four rows of the decode path (row `i` in lane `i`), fed one
    /// super-block at a time.
    struct Sb {
        /// Q4_K's `acc` and `acc_min`; Q6_K's batch-of-8 `acc`.
        acc: __m128,
        acc_min: __m128,
        /// Q6_K's eight lanes per row, alone or in a small batch.
        lanes: [__m256; 4],
    }

    impl Sb {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn new() -> Sb {
            Sb {
                acc: _mm_setzero_ps(),
                acc_min: _mm_setzero_ps(),
                lanes: [_mm256_setzero_ps(); 4],
            }
        }

        /// A Q6_K super-block: `isum[i]` is row `i`'s sums, ggml's lane `l` being the sum
        /// of lanes `l` and `l + 8`; `dbits[i]` its f16 `d`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q6(&mut self, isum: &[__m512i; 4], dbits: [u32; 4], da: __m128, batched: bool) {
            let d4 = _mm_setr_epi32(dbits[0] as i32, dbits[1] as i32, dbits[2] as i32, dbits[3] as i32);
            let dw = _mm_cvtph_ps(_mm_packus_epi32(d4, d4));
            if batched {
                let s = _mm_cvtepi32_ps(hsum4_epi32(isum));
                self.acc = _mm_fmadd_ps(_mm_mul_ps(s, dw), da, self.acc);
            } else {
                let d = _mm_mul_ps(da, dw);
                let mut dd = [0f32; 4];
                // SAFETY: `dd` has 4 f32.
                unsafe { _mm_storeu_ps(dd.as_mut_ptr(), d) };
                for (i, lanes) in self.lanes.iter_mut().enumerate() {
                    let l8 = _mm256_add_epi32(_mm512_castsi512_si256(isum[i]), _mm512_extracti64x4_epi64::<1>(isum[i]));
                    *lanes = _mm256_fmadd_ps(_mm256_set1_ps(dd[i]), _mm256_cvtepi32_ps(l8), *lanes);
                }
            }
        }

        /// A Q4_K super-block: the halves of `lo[i]` and `hi[i]` are row `i`'s sums of
        /// sub-blocks 0..2, 2..4, 4..6 and 6..8; `dbits[i]` its `d | dmin << 16`, `mins[i]`
        /// its mins (a byte each); `bsums` the activation sums per 16.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q4(
            &mut self,
            lo: &[__m512i; 4],
            hi: &[__m512i; 4],
            dbits: [u32; 4],
            mins: [u64; 4],
            bsums: __m256i,
            da: __m128,
            grouped: bool,
        ) {
            let d4 = _mm_setr_epi32(dbits[0] as i32, dbits[1] as i32, dbits[2] as i32, dbits[3] as i32);
            // [d0, d1, d2, d3, dmin0, dmin1, dmin2, dmin3].
            let split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
            let dd = _mm256_cvtph_ps(_mm_shuffle_epi8(d4, split));
            let d = _mm_mul_ps(_mm256_castps256_ps128(dd), da);
            let dmin = _mm_mul_ps(_mm256_extractf128_ps::<1>(dd), da);
            // Σ min_j · bsum_j per pair of sub-blocks, the four rows' mins in the four
            // 128-bit lanes: dword k of lane i is row i's pair k.
            let bs2 = _mm256_cvtepi32_epi16(_mm256_madd_epi16(bsums, _mm256_set1_epi16(1)));
            let mn = _mm256_setr_epi64x(mins[0] as i64, mins[1] as i64, mins[2] as i64, mins[3] as i64);
            let pm = _mm512_madd_epi16(_mm512_cvtepu8_epi16(mn), _mm512_broadcast_i32x4(bs2));
            // Pair k of every row: dword k of each lane.
            let pair_min = |k: i32| {
                _mm512_castsi512_si128(_mm512_permutexvar_epi32(
                    _mm512_setr_epi32(k, k + 4, k + 8, k + 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                    pm,
                ))
            };
            let (s01, s23) = hsum4_halves_epi32(lo);
            let (s45, s67) = hsum4_halves_epi32(hi);
            if grouped {
                for (k, s) in [s01, s23, s45, s67].into_iter().enumerate() {
                    self.acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, self.acc);
                    self.acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(pair_min(k as i32)), dmin, self.acc_min);
                }
            } else {
                let s = _mm_add_epi32(_mm_add_epi32(s01, s23), _mm_add_epi32(s45, s67));
                let m = _mm_add_epi32(
                    _mm_add_epi32(pair_min(0), pair_min(1)),
                    _mm_add_epi32(pair_min(2), pair_min(3)),
                );
                self.acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, self.acc);
                self.acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(m), dmin, self.acc_min);
            }
        }

        /// The rows' results.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn finish<const Q6: bool>(&self, grouped: bool) -> [f32; 4] {
            let mut res = [0f32; 4];
            if Q6 && !grouped {
                for (r, lanes) in res.iter_mut().zip(&self.lanes) {
                    *r = hsum8(*lanes);
                }
            } else {
                let v = if Q6 {
                    self.acc
                } else {
                    _mm_sub_ps(self.acc, self.acc_min)
                };
                // SAFETY: `res` has 4 f32.
                unsafe { _mm_storeu_ps(res.as_mut_ptr(), v) };
            }
            res
        }
    }

    /// The sums of the low and of the high 256-bit halves of four vectors of i32:
    /// `([Σ lo a0, .., Σ lo a3], [Σ hi a0, .., Σ hi a3])`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn hsum4_halves_epi32(a: &[__m512i; 4]) -> (__m128i, __m128i) {
        // Per 128-bit lane: the four vectors' sums of that lane, as in `hsum4_epi32`.
        let x = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
        let y = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
        let z = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
        let lo = _mm512_castsi512_si256(z);
        let hi = _mm512_extracti64x4_epi64::<1>(z);
        (
            _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256::<1>(lo)),
            _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256::<1>(hi)),
        )
    }

    /// `[Σ a0, Σ a1, Σ a2, Σ a3]` of four vectors of i32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn hsum4_epi32(a: &[__m512i; 4]) -> __m128i {
        // Per 128-bit lane: [a0 0+2, a1 0+2, a0 1+3, a1 1+3], then the four lane sums.
        let x = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
        let y = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
        let z = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
        let h = _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64::<1>(z));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }

    /// One zmm of a packed panel, aligned so the micro-kernel's loads are.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Z([i32; 16]);

    /// Per-thread buffers of the prefill kernel, kept across calls so that they are
    /// allocated once.
    #[derive(Default)]
    struct Scratch {
        /// One panel of weights; see [`pack_panel`].
        panel: Vec<Z>,
        /// Every token's activations; see [`pack_acts`].
        acts: Vec<i32>,
        /// `d` of every activation block, `[token][super-block]`.
        ascale: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// Column pairs per super-block in the packed layouts: the 128 pairs of quants, then
    /// for Q4_K the 4 pairs of mins (weights) against the activation sums per 32.
    const fn pairs(q6: bool) -> usize {
        if q6 {
            128
        } else {
            132
        }
    }

    /// Zmm per super-block of a packed panel: `pairs × RB`, then `d` and `dmin` per
    /// 16-row block.
    const fn panel_sb(q6: bool) -> usize {
        (pairs(q6) + 2) * RB
    }

    /// The prefill path: for each panel of 32 rows, unpack it once, then run the
    /// micro-kernel over tiles of tokens.
    ///
    /// # Safety
    /// As [`super::gemm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn prefill<const Q6: bool>(k: &Problem) {
        let np = pairs(Q6);
        let row_bytes = k.row_bytes(Q6);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            s.acts.resize(k.n_tokens * k.nsb * np, 0);
            s.ascale.resize(k.n_tokens * k.nsb, 0.0);
            s.panel.resize(k.nsb * panel_sb(Q6), Z([0; 16]));
            // SAFETY: the buffers were just sized for the call.
            unsafe { pack_acts::<Q6>(k.acts, &mut s.acts, &mut s.ascale) };
            for r0 in (0..k.n_rows).step_by(PANEL_ROWS) {
                let rows = (k.n_rows - r0).min(PANEL_ROWS);
                // SAFETY: rows r0..r0 + rows exist; the panel holds nsb super-blocks.
                unsafe {
                    pack_panel::<Q6>(
                        &k.weights[r0 * row_bytes..][..rows * row_bytes],
                        rows,
                        k.nsb,
                        &mut s.panel,
                    )
                };
                let mut t0 = 0;
                while t0 < k.n_tokens {
                    let nt = (k.n_tokens - t0).min(TILE_T);
                    let tile = Tile {
                        panel: s.panel.as_ptr(),
                        acts: s.acts[t0 * k.nsb * np..].as_ptr(),
                        ascale: s.ascale[t0 * k.nsb..].as_ptr(),
                        nsb: k.nsb,
                        out: k.out.offset_cols(r0),
                        t0,
                        rows,
                        grouped: std::array::from_fn(|t| t < nt && k.grouped(Q6, t0 + t)),
                    };
                    // SAFETY: tokens t0..t0 + nt are packed; rows < PANEL_ROWS of the
                    // band at r0.
                    unsafe {
                        match nt {
                            8 => micro::<Q6, 8>(&tile),
                            7 => micro::<Q6, 7>(&tile),
                            6 => micro::<Q6, 6>(&tile),
                            5 => micro::<Q6, 5>(&tile),
                            4 => micro::<Q6, 4>(&tile),
                            3 => micro::<Q6, 3>(&tile),
                            2 => micro::<Q6, 2>(&tile),
                            _ => micro::<Q6, 1>(&tile),
                        }
                    }
                    t0 += nt;
                }
            }
        });
    }

    /// The element chunks (32 each) whose values fill the low and high halves of column
    /// block `j` (16 column pairs) of a packed super-block: those that the weight bytes
    /// hold side by side, as loaded by [`q4k_values`] and [`q6k_values`].
    const fn chunk_pairs(q6: bool) -> [(usize, usize); 4] {
        if q6 {
            [(0, 4), (1, 5), (2, 6), (3, 7)]
        } else {
            [(0, 2), (1, 3), (4, 6), (5, 7)]
        }
    }

    /// Widens every activation block to i16 pairs: block `b` (token `b / nsb`) takes
    /// `pairs` i32 at `dst[b * pairs..]`; for Q4_K then the four pairs of sums per 32
    /// elements. `scale[b]` is its `d`.
    ///
    /// The pairs are not consecutive elements but those the weight unpacking yields
    /// without shuffles: for each entry `(c, c')` of [`chunk_pairs`], two column blocks,
    /// the even then the odd elements of each 4: block `2j` lane `i` (dword) holds
    /// elements `4i, 4i + 2` of chunk `c` (lanes 0..8) or `c'` (lanes 8..16, `i − 8`),
    /// block `2j + 1` elements `4i + 1, 4i + 3`.
    ///
    /// # Safety
    /// `dst` and `scale` have room for every block of `acts`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn pack_acts<const Q6: bool>(acts: &[u8], dst: &mut [i32], scale: &mut [f32]) {
        let np = pairs(Q6);
        for (b, blk) in acts.chunks_exact(Q8K_BYTES).enumerate() {
            // SAFETY: `blk` is one Q8_K block; `dst` has `np` i32 for it.
            unsafe {
                let src = blk.as_ptr();
                scale[b] = rd_f32(src);
                let d = dst.as_mut_ptr().add(b * np);
                for (j, (c0, c1)) in chunk_pairs(Q6).into_iter().enumerate() {
                    let x = halves(src.add(4 + 32 * c0), src.add(4 + 32 * c1));
                    // Each word holds two activations: sign-extend the low, then the high.
                    let even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(x));
                    let odd = _mm512_srai_epi16::<8>(x);
                    _mm512_storeu_si512(d.add(32 * j).cast(), even);
                    _mm512_storeu_si512(d.add(32 * j + 16).cast(), odd);
                }
                if !Q6 {
                    let bsums = _mm256_loadu_si256(src.add(BSUMS).cast());
                    let bs2 = _mm256_cvtepi32_epi16(_mm256_madd_epi16(bsums, _mm256_set1_epi16(1)));
                    _mm_storeu_si128(d.add(128).cast(), bs2);
                }
            }
        }
    }

    /// One Q4_K block as scaled i16 pairs in the column order of [`pack_acts`]; plus
    /// `d`, `dmin` and the mins as four i16 pairs.
    ///
    /// Each dword of `qs` holds four bytes; masking its words takes the low nibbles of
    /// bytes 0 and 2 (elements `4i`, `4i + 2` of the low-nibble chunk), shifting first
    /// by 8, 4 or 12 the other three pairs: no byte shuffles.
    ///
    /// # Safety
    /// `wb` is one Q4_K block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4k_values(wb: *const u8, v: &mut [__m512i; 8]) -> (f32, f32, [i32; 4]) {
        let m = _mm512_set1_epi16(0x0F);
        // SAFETY: the reads stay within the 144 bytes of the block.
        unsafe {
            let (sc, mn) = q4k_scales_mins(wb.add(4));
            let sw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            for z in 0..2 {
                let x = _mm512_loadu_si512(wb.add(16 + 64 * z).cast());
                for nib in 0..2 {
                    let (c0, c1) = chunk_pairs(false)[2 * z + nib];
                    let scale = _mm512_permutexvar_epi16(lanes4(c0 as i32, c0 as i32, c1 as i32, c1 as i32), sw);
                    let (even, odd) = if nib == 0 {
                        (x, _mm512_srli_epi16::<8>(x))
                    } else {
                        (_mm512_srli_epi16::<4>(x), _mm512_srli_epi16::<12>(x))
                    };
                    let j = 2 * z + nib;
                    v[2 * j] = _mm512_mullo_epi16(_mm512_and_si512(even, m), scale);
                    v[2 * j + 1] = _mm512_mullo_epi16(_mm512_and_si512(odd, m), scale);
                }
            }
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(rd_u32(wb) as i32));
            let byte = |j: usize| (mn >> (8 * j)) as u8 as i32;
            let mins = [0, 1, 2, 3].map(|p| byte(2 * p) | byte(2 * p + 1) << 16);
            (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)), mins)
        }
    }

    /// One Q6_K block as scaled i16 pairs `scale · (q − 32)` in the column order of
    /// [`pack_acts`] (the nibble and 2-bit fields taken per word, as in [`q4k_values`]);
    /// plus `d`.
    ///
    /// # Safety
    /// `wb` is one Q6_K block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q6k_values(wb: *const u8, v: &mut [__m512i; 8]) -> f32 {
        let m4 = _mm512_set1_epi16(0x0F);
        let m2 = _mm512_set1_epi16(0x30);
        let off = _mm512_set1_epi16(32);
        // SAFETY: the reads stay within the 210 bytes of the block.
        unsafe {
            // Low and high halves: the two 128-element halves of the block, whose
            // `ql`/`qh` bytes line up.
            let x = halves(wb, wb.add(64));
            let y = halves(wb.add(32), wb.add(96));
            let h = _mm512_loadu_si512(wb.add(128).cast());
            let sw = _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192).cast())));
            // Per chunk pair j: the 4-bit field (ql source, shift) and the 2-bit field's
            // shift in `qh`, for the even element of each word; the odd one is 8 bits up.
            let field = |j: usize, odd: bool| {
                let (ql, qh) = match (j, odd) {
                    (0, false) => (x, _mm512_slli_epi16::<4>(h)),
                    (0, true) => (_mm512_srli_epi16::<8>(x), _mm512_srli_epi16::<4>(h)),
                    (1, false) => (y, _mm512_slli_epi16::<2>(h)),
                    (1, true) => (_mm512_srli_epi16::<8>(y), _mm512_srli_epi16::<6>(h)),
                    (2, false) => (_mm512_srli_epi16::<4>(x), h),
                    (2, true) => (_mm512_srli_epi16::<12>(x), _mm512_srli_epi16::<8>(h)),
                    (3, false) => (_mm512_srli_epi16::<4>(y), _mm512_srli_epi16::<2>(h)),
                    _ => (_mm512_srli_epi16::<12>(y), _mm512_srli_epi16::<10>(h)),
                };
                let q = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(qh, m2));
                _mm512_sub_epi16(q, off)
            };
            for j in 0..4 {
                let (c0, c1) = chunk_pairs(true)[j];
                // 128-bit lane k of a column block: dwords 4k..4k + 4, elements of
                // sub-block 2c0, 2c0 + 1, 2c1, 2c1 + 1.
                let (s0, s1) = (2 * c0 as i32, 2 * c1 as i32);
                let scale = _mm512_permutexvar_epi16(lanes4(s0, s0 + 1, s1, s1 + 1), sw);
                v[2 * j] = _mm512_mullo_epi16(field(j, false), scale);
                v[2 * j + 1] = _mm512_mullo_epi16(field(j, true), scale);
            }
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                wb.add(208).cast::<u16>().read_unaligned() as i32,
            )))
        }
    }

    /// Unpacks `rows` (≤ 32) weight rows into `panel`: per super-block, for each column
    /// pair `p` (in the order of [`pack_acts`]) and 16-row block `rb`, zmm `p * RB + rb`
    /// holds in lane `i` the two scaled i16 values of row `16 rb + i`, for Q4_K followed
    /// by the mins pairs; then `d` and `dmin` of each 16-row block as f32 lanes. Rows past
    /// `rows` are zero.
    ///
    /// # Safety
    /// `w` holds `rows` rows of `nsb` blocks; `panel` has `nsb * panel_sb` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn pack_panel<const Q6: bool>(w: &[u8], rows: usize, nsb: usize, panel: &mut [Z]) {
        let (wsize, np) = (if Q6 { Q6K_BYTES } else { Q4K_BYTES }, pairs(Q6));
        let row_bytes = nsb * wsize;
        let mut vals = [[_mm512_setzero_si512(); 8]; 16];
        for sb in 0..nsb {
            let dst = &mut panel[sb * panel_sb(Q6)..][..panel_sb(Q6)];
            for rb in 0..RB {
                let mut d = [0f32; 16];
                let mut dmin = [0f32; 16];
                let mut mins = [[0i32; 4]; 16];
                for (i, v) in vals.iter_mut().enumerate() {
                    let r = 16 * rb + i;
                    if r >= rows {
                        *v = [_mm512_setzero_si512(); 8];
                        continue;
                    }
                    let wb = w[r * row_bytes + sb * wsize..][..wsize].as_ptr();
                    // SAFETY: `wb` is one whole block.
                    unsafe {
                        if Q6 {
                            d[i] = q6k_values(wb, v);
                        } else {
                            (d[i], dmin[i], mins[i]) = q4k_values(wb, v);
                        }
                    }
                }
                // Column block `blk` of every row: pairs 16 blk..16 blk + 16.
                for blk in 0..8 {
                    let cols = transpose16(&std::array::from_fn(|i| vals[i][blk]));
                    for (j, &col) in cols.iter().enumerate() {
                        // SAFETY: `Z` is 64 bytes, aligned to 64.
                        unsafe { _mm512_store_si512((&mut dst[(16 * blk + j) * RB + rb] as *mut Z).cast(), col) };
                    }
                }
                if !Q6 {
                    for p in 0..4 {
                        dst[(128 + p) * RB + rb] = Z(std::array::from_fn(|i| mins[i][p]));
                    }
                }
                dst[np * RB + rb] = Z(d.map(f32::to_bits).map(|b| b as i32));
                dst[(np + 1) * RB + rb] = Z(dmin.map(f32::to_bits).map(|b| b as i32));
            }
        }
    }

    /// What one micro-kernel call works on: a packed panel, the packed activations from
    /// token `t0` on, and where to write.
    struct Tile {
        panel: *const Z,
        acts: *const i32,
        ascale: *const f32,
        nsb: usize,
        /// Output from the panel's first row on.
        out: OutMatrix,
        t0: usize,
        /// Valid rows of the panel.
        rows: usize,
        /// Per token: Q4_K in a group of four (the sums go to f32 per pair of sub-blocks).
        grouped: [bool; TILE_T],
    }

    /// The column pairs of a packed Q4_K super-block holding sub-blocks `2g` and `2g + 1`
    /// (see [`pack_acts`]): four runs of 8, starting here.
    const Q4K_GROUP_RUNS: [[usize; 4]; 4] = [[0, 16, 32, 48], [8, 24, 40, 56], [64, 80, 96, 112], [72, 88, 104, 120]];

    /// `T` tokens × 32 rows: per super-block, integer dot products over the 128 column
    /// pairs (one `vpdpwssd` per 16 rows and token), taken to f32 in the order of the
    /// module documentation: Q6_K (batch of 8) per super-block; Q4_K per pair of
    /// sub-blocks for grouped tokens and per super-block for the others.
    ///
    /// # Safety
    /// `k.panel` is packed for `k.nsb` super-blocks; `T` tokens are packed at `k.acts`,
    /// `k.ascale`; the outputs of `k.rows` rows and tokens `k.t0..k.t0 + T` are the
    /// caller's.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn micro<const Q6: bool, const T: usize>(k: &Tile) {
        let np = pairs(Q6);
        let tstride = k.nsb * np;
        let mut accf = [[_mm512_setzero_ps(); T]; RB];
        let mut accm = [[_mm512_setzero_ps(); T]; RB];
        for sb in 0..k.nsb {
            // SAFETY: super-block sb of the panel and of each token's packed row.
            unsafe {
                let w = k.panel.add(sb * panel_sb(Q6)).cast::<__m512i>();
                let a = k.acts.add(sb * np);
                let dots = |acc: &mut [[__m512i; T]; RB], p: usize| {
                    let wv: [__m512i; RB] = std::array::from_fn(|rb| _mm512_load_si512(w.add(p * RB + rb)));
                    for t in 0..T {
                        let b = _mm512_set1_epi32(*a.add(t * tstride + p));
                        for rb in 0..RB {
                            acc[rb][t] = dpwssd!(acc[rb][t], wv[rb], b);
                        }
                    }
                };
                let dv: [__m512; RB] = std::array::from_fn(|rb| _mm512_load_ps(w.add(np * RB + rb).cast()));
                let da: [__m512; T] = std::array::from_fn(|t| _mm512_set1_ps(*k.ascale.add(t * k.nsb + sb)));
                if Q6 {
                    let mut acc = [[_mm512_setzero_si512(); T]; RB];
                    for p in 0..128 {
                        dots(&mut acc, p);
                    }
                    for rb in 0..RB {
                        for t in 0..T {
                            let f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[rb][t]), dv[rb]);
                            accf[rb][t] = _mm512_fmadd_ps(f, da[t], accf[rb][t]);
                        }
                    }
                    continue;
                }
                let dm: [__m512; RB] = std::array::from_fn(|rb| _mm512_load_ps(w.add((np + 1) * RB + rb).cast()));
                let mut total = [[_mm512_setzero_si512(); T]; RB];
                let mut total_min = [[_mm512_setzero_si512(); T]; RB];
                for (g, runs) in Q4K_GROUP_RUNS.iter().enumerate() {
                    let mut acc = [[_mm512_setzero_si512(); T]; RB];
                    for &run in runs {
                        for p in run..run + 8 {
                            dots(&mut acc, p);
                        }
                    }
                    let mut macc = [[_mm512_setzero_si512(); T]; RB];
                    dots(&mut macc, 128 + g);
                    for rb in 0..RB {
                        for t in 0..T {
                            if k.grouped[t] {
                                let d = _mm512_mul_ps(dv[rb], da[t]);
                                let dmin = _mm512_mul_ps(dm[rb], da[t]);
                                accf[rb][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[rb][t]), d, accf[rb][t]);
                                accm[rb][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(macc[rb][t]), dmin, accm[rb][t]);
                            } else {
                                total[rb][t] = _mm512_add_epi32(total[rb][t], acc[rb][t]);
                                total_min[rb][t] = _mm512_add_epi32(total_min[rb][t], macc[rb][t]);
                            }
                        }
                    }
                }
                for rb in 0..RB {
                    for t in 0..T {
                        if !k.grouped[t] {
                            let d = _mm512_mul_ps(dv[rb], da[t]);
                            let dmin = _mm512_mul_ps(dm[rb], da[t]);
                            accf[rb][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[rb][t]), d, accf[rb][t]);
                            accm[rb][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total_min[rb][t]), dmin, accm[rb][t]);
                        }
                    }
                }
            }
        }
        for rb in 0..RB {
            for t in 0..T {
                let v = if Q6 {
                    accf[rb][t]
                } else {
                    _mm512_sub_ps(accf[rb][t], accm[rb][t])
                };
                let mut lanes = [0f32; 16];
                // SAFETY: `lanes` has 16 f32.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
                for (i, &x) in lanes.iter().enumerate().take(k.rows.saturating_sub(16 * rb)) {
                    // SAFETY: row 16 rb + i < rows, token t0 + t: in the caller's band.
                    unsafe { k.out.write(k.t0 + t, 16 * rb + i, x) };
                }
            }
        }
    }
}

/// The kernels for AVX2 + FMA + F16C: the decode scheme, 256 bits wide, for every
/// token count (rows in fours, each group against every token while its weights are
/// in L1).
mod x256 {
    use super::*;

    /// # Safety
    /// As [`super::gemm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm<const Q6: bool>(k: &Problem) {
        let row_bytes = k.row_bytes(Q6);
        let act_bytes = k.nsb * Q8K_BYTES;
        let w = k.weights.as_ptr();
        let mut r = 0;
        while r < k.n_rows {
            let n = (k.n_rows - r).min(DECODE_ROWS);
            for t in 0..k.n_tokens {
                let a = k.acts[t * act_bytes..][..act_bytes].as_ptr();
                let grouped = k.grouped(Q6, t);
                // SAFETY: rows r..r + n exist; `a` is one whole activation row; (t, r..r
                // + n) is in the caller's band.
                unsafe {
                    if n == DECODE_ROWS {
                        let v = rows::<Q6, DECODE_ROWS>(w.add(r * row_bytes), row_bytes, k.nsb, a, grouped);
                        for (i, &x) in v.iter().enumerate() {
                            k.out.write(t, r + i, x);
                        }
                    } else {
                        for i in r..r + n {
                            let [x] = rows::<Q6, 1>(w.add(i * row_bytes), row_bytes, k.nsb, a, grouped);
                            k.out.write(t, i, x);
                        }
                    }
                }
            }
            r += n;
        }
    }

    /// The dots of `R` consecutive weight rows (at `w`, `row_bytes` apart) with one
    /// activation row `a`, in the order of the module documentation for `grouped`; each
    /// 32 weight bytes hold one 32-element chunk per nibble (a Q4_K pair of sub-blocks),
    /// so the activations are used as stored, and a 32-element chunk's `vpmaddwd` lanes
    /// are ggml's.
    ///
    /// # Safety
    /// `R` rows of `nsb` blocks at `w`, `nsb` Q8_K blocks at `a`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const Q6: bool, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        nsb: usize,
        a: *const u8,
        grouped: bool,
    ) -> [f32; R] {
        let mut lanes = [_mm256_setzero_ps(); R];
        let mut acc = [0f32; R];
        let mut acc_min = [0f32; R];
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x30);
        for sb in 0..nsb {
            // SAFETY: block sb of the activation row and of each of the R weight rows.
            unsafe {
                let ab = a.add(sb * Q8K_BYTES);
                let da = rd_f32(ab);
                let q = ab.add(4);
                let bsums = _mm256_loadu_si256(ab.add(BSUMS).cast());
                if Q6 {
                    for (i, l) in lanes.iter_mut().enumerate() {
                        let wb = w.add(i * row_bytes + sb * Q6K_BYTES);
                        let sc = _mm_loadu_si128(wb.add(192).cast());
                        let scb = _mm256_broadcastsi128_si256(sc);
                        let mut sum = _mm256_setzero_si256();
                        for h in 0..2 {
                            let qa = _mm256_loadu_si256(wb.add(64 * h).cast());
                            let qb = _mm256_loadu_si256(wb.add(64 * h + 32).cast());
                            let qh = _mm256_loadu_si256(wb.add(128 + 32 * h).cast());
                            let v = [
                                _mm256_or_si256(
                                    _mm256_and_si256(qa, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(qb, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(qa), m4),
                                    _mm256_and_si256(qh, m2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(qb), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                                ),
                            ];
                            for (j, &vj) in v.iter().enumerate() {
                                let c = 4 * h + j;
                                let p = _mm256_maddubs_epi16(vj, _mm256_loadu_si256(q.add(32 * c).cast()));
                                // Scales 2c (low lane) and 2c + 1 (high lane) in every
                                // word: shuffled into the high byte, shifted down signed.
                                let ctl = |s: usize| _mm_set1_epi16(((s as i16) << 8) | 0x80);
                                let ctl = _mm256_set_m128i(ctl(2 * c + 1), ctl(2 * c));
                                let s = _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(scb, ctl));
                                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, s));
                            }
                        }
                        // The stored quants are q + 32: subtract 32 · Σ scale · bsum,
                        // lane l taking the groups 2l and 2l + 1.
                        let offs = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc), bsums);
                        sum = _mm256_sub_epi32(sum, _mm256_slli_epi32::<5>(offs));
                        let dw = half::f16::from_bits(wb.add(208).cast::<u16>().read_unaligned()).to_f32();
                        if grouped {
                            acc[i] = (hsum_epi32(sum) as f32 * dw).mul_add(da, acc[i]);
                        } else {
                            *l = _mm256_fmadd_ps(_mm256_set1_ps(da * dw), _mm256_cvtepi32_ps(sum), *l);
                        }
                    }
                } else {
                    let s2 = _mm256_madd_epi16(bsums, _mm256_set1_epi16(1));
                    // Sums of the activations per 32, as words.
                    let bs2 = _mm_packs_epi32(_mm256_castsi256_si128(s2), _mm256_extracti128_si256::<1>(s2));
                    for i in 0..R {
                        let wb = w.add(i * row_bytes + sb * Q4K_BYTES);
                        let (sc, mn) = q4k_scales_mins(wb.add(4));
                        let scb = _mm256_set1_epi64x(sc as i64);
                        // Scale j zero-extended into every word.
                        let scale = |j: i16| _mm256_shuffle_epi8(scb, _mm256_set1_epi16(j | -0x8000));
                        // Σ min · bsum per pair of sub-blocks.
                        let mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64)), bs2);
                        let mut m = [0i32; 4];
                        _mm_storeu_si128(m.as_mut_ptr().cast(), mins);
                        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(rd_u32(wb) as i32));
                        let d = _mm_cvtss_f32(dd) * da;
                        let dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd)) * da;
                        let (mut sum, mut sum_min) = (0i32, 0i32);
                        for (c, &pair_min) in m.iter().enumerate() {
                            let x = _mm256_loadu_si256(wb.add(16 + 32 * c).cast());
                            let lo = _mm256_and_si256(x, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                            let plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q.add(64 * c).cast()));
                            let phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q.add(64 * c + 32).cast()));
                            let pair = _mm256_add_epi32(
                                _mm256_madd_epi16(plo, scale(2 * c as i16)),
                                _mm256_madd_epi16(phi, scale(2 * c as i16 + 1)),
                            );
                            if grouped {
                                acc[i] = (hsum_epi32(pair) as f32).mul_add(d, acc[i]);
                                acc_min[i] = (pair_min as f32).mul_add(dmin, acc_min[i]);
                            } else {
                                sum += hsum_epi32(pair);
                                sum_min += pair_min;
                            }
                        }
                        if !grouped {
                            acc[i] = (sum as f32).mul_add(d, acc[i]);
                            acc_min[i] = (sum_min as f32).mul_add(dmin, acc_min[i]);
                        }
                    }
                }
            }
        }
        std::array::from_fn(|i| {
            if !Q6 {
                acc[i] - acc_min[i]
            } else if grouped {
                acc[i]
            } else {
                hsum8(lanes[i])
            }
        })
    }

    /// The sum of the eight i32 lanes (exact, any order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_epi32(v: __m256i) -> i32 {
        let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let x = _mm_add_epi32(x, _mm_shuffle_epi32::<0b01_00_11_10>(x));
        _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32::<0b10_11_00_01>(x)))
    }
}
