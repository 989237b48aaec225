//! SIMD kernels for the 32-element block types: Q4_0, Q4_1, Q5_0, Q8_0.
//!
//! They compute what [`crate::qdot::dot`] computes, bit for bit, at every token count:
//! ggml's x86 order. A weight block against an activation block gives eight i32 lanes,
//! lane `l` the exact sum over elements `4l..4l + 4`; each lane accumulates
//! `fma(lane, d_w · d_a, acc)` block after block; the eight lanes are summed as
//! `hsum_float_8` does; Q4_1 adds its `Σ m · s` chain (fused multiply-adds) at the end.
//!
//! * **Lanes.** A 256-bit half holds one block of one row as 32 unsigned bytes in element
//!   order (low nibbles are elements 0..16, high nibbles 16..32), so `vpdpbusd` (or
//!   `vpmaddubsw` + `vpmaddwd`) against the block's 32 signed activation bytes leaves
//!   exactly ggml's eight lanes. Signed weights are stored shifted up by `off` (Q4_0: 8,
//!   Q5_0: 16, Q8_0 at AVX-512: 128); a per-lane correction `-off · Σ a`, prepared with
//!   the activations, starts each lane's sum. AVX2 keeps Q8_0 signed and moves the
//!   signs onto the activations (`vpmaddubsw` would saturate on `w + 128`).
//! * **AVX-512** puts two rows' blocks in the two halves of a zmm, so one `vpdpbusd`,
//!   conversion and FMA serve 64 weights, with a scale vector `[d ×8 | d' ×8]`. Q4_0 and
//!   Q4_1 leave the high nibbles unshifted (16 times the value, exact in i32 and f32)
//!   and scale those lanes by `d / 16`: the product is the same real number, so the FMA
//!   rounds it the same. Up to `STREAM_MAX_TOKENS` tokens (decode) the weights are
//!   unpacked in registers straight from their blocks; beyond, each band of rows is
//!   repacked once into that layout and swept by a tile of rows × tokens.
//! * **AVX2** streams every row from its blocks, one block per ymm.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{hsum8, OutMatrix, SimdLevel};
use crate::quant::GgmlType;

/// Rows per AVX-512 tile (four pairs); row blocks are padded with zero rows to a multiple.
const MR: usize = 8;
/// Pairs of rows per AVX-512 tile.
const PAIRS: usize = MR / 2;
/// Bytes per block of a repacked band: the `PAIRS` pairs' values, then the rows' scales.
const BAND_UNIT: usize = 64 * (PAIRS + 1);
/// Tokens per AVX-512 tile (a group of four, see [`prep_s16`]).
const NT512: usize = 4;
/// Up to this many tokens, AVX-512 streams the weights straight from their blocks
/// instead of repacking them: each group of rows is unpacked in registers once per
/// group of up to `STREAM_GROUP` tokens (the rows stay in L1 between groups).
const STREAM_MAX_TOKENS: usize = 16;
/// Most tokens per streaming kernel call: batched decode of 8 sessions unpacks each
/// weight block once. (Q4_0 and Q8_0 ran faster in groups of 4 while the kernel gathered
/// its scales per 16 blocks, whose registers made the compiler spill accumulators at 8;
/// without the gathers, `gemm_bench --tokens 8` gives them 7-15% more at 8.)
const STREAM_GROUP: usize = 8;
/// Tokens per AVX2 kernel call, and rows.
const T256: usize = 3;
const R256: usize = 2;
/// Bytes of repacked weights per row block for many tokens (kept in L2 while every
/// token tile passes over it).
const PREFILL_BLOCK_BYTES: usize = 192 << 10;
/// Decode prefetches the weights this many bytes ahead of the rows being multiplied.
/// The hardware prefetchers stop at 4 KiB pages (model weights are a file mapping with
/// 4 KiB pages), which leaves a DRAM stream waiting at each page boundary. (Measured
/// single-session decode, interleaved: SmolLM2 2 KiB 323-359, 4 KiB 375-436, 8 KiB
/// 395-448, 12 KiB 396-409, 16 KiB 379-393 t/s; Gemma-3 4 → 8 KiB 210 → 227 t/s.)
const PREFETCH_AHEAD: usize = 8 << 10;

/// 64-byte aligned scratch storage, only ever accessed through raw pointers.
#[allow(dead_code)]
#[repr(align(64))]
#[derive(Clone, Copy)]
pub(super) struct Line([u8; 64]);

/// Per-thread buffers, grown on demand and reused by later calls.
#[derive(Default)]
struct Scratch {
    /// Repacked activations ([`repack_acts`]), when the caller brought none.
    acts: Vec<Line>,
    weights: Vec<Line>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A pointer to at least `bytes` bytes of `v`, growing it if needed.
fn lines(v: &mut Vec<Line>, bytes: usize) -> *mut u8 {
    let n = bytes.div_ceil(64);
    if v.len() < n {
        v.resize(n, Line([0; 64]));
    }
    v.as_mut_ptr().cast()
}

/// The weight type's block layout and how its stored values relate to the true ones.
#[derive(Clone, Copy)]
struct Kind {
    ty: GgmlType,
    /// Bytes per weight block, and the offset of its quants.
    wb: usize,
    wqs: usize,
    /// Bytes per activation block and the offset of its quants.
    ab: usize,
    aqs: usize,
    /// Stored weight = true weight + `off` (folded in through the activation sums).
    off: i32,
    /// Q4_1: add `m · s` per block.
    min: bool,
    /// AVX-512 Q4_0/Q4_1: high nibbles stay unshifted (16 times their value), so their
    /// lanes take `d / 16` and (Q4_0) 16 times the offset correction.
    hi16: bool,
}

impl Kind {
    fn new(ty: GgmlType, avx512: bool) -> Option<Kind> {
        let (wb, wqs, off) = match ty {
            GgmlType::Q4_0 => (18, 2, 8),
            GgmlType::Q4_1 => (20, 4, 0),
            GgmlType::Q5_0 => (22, 6, 16),
            GgmlType::Q8_0 => (34, 2, if avx512 { 128 } else { 0 }),
            _ => return None,
        };
        let min = ty == GgmlType::Q4_1;
        Some(Kind {
            ty,
            wb,
            wqs,
            ab: if min { 36 } else { 34 },
            aqs: if min { 4 } else { 2 },
            off,
            min,
            hi16: avx512 && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1),
        })
    }
}

/// Where things live in a repacked activation row (all offsets multiples of 64): per
/// block 64 bytes (its 32 quants, then eight i32 corrections `-off · Σ a`), then `d_a`
/// per block (`nb16` f32), then for Q4_1 `s` per block (`nb16` f32).
#[derive(Clone, Copy)]
struct Geo {
    nb: usize,
    nb16: usize,
    a_da: usize,
    a_s: usize,
    a_stride: usize,
}

impl Geo {
    fn new(k: &Kind, cols: usize) -> Geo {
        let nb = cols / 32;
        let nb16 = nb.div_ceil(16) * 16;
        let a_da = nb * 64;
        let a_s = a_da + nb16 * 4;
        let a_stride = a_s + if k.min { nb16 * 4 } else { 0 };
        Geo {
            nb,
            nb16,
            a_da,
            a_s,
            a_stride,
        }
    }

    /// Bytes per repacked band of `MR` weight rows: per block `BAND_UNIT` bytes (see
    /// [`prep_band`]), then the rows' `m` per block (Q4_1).
    fn band_stride(&self, k: &Kind) -> usize {
        (self.nb * BAND_UNIT + if k.min { self.nb * 4 * MR } else { 0 }).next_multiple_of(64)
    }
}

/// The kernels' kind of weights and geometry of repacked activations for `ty` at
/// `level`, where there are kernels.
fn layout(level: SimdLevel, ty: GgmlType, cols: usize) -> Option<(Kind, Geo)> {
    let avx512 = match level {
        SimdLevel::Avx512Vnni => true,
        SimdLevel::Avx2 => false,
        SimdLevel::Scalar => return None,
    };
    let k = Kind::new(ty, avx512)?;
    let g = Geo::new(&k, cols);
    Some((k, g))
}

/// Whether the repacked activations carry Q4_1's sums per group of four tokens (AVX-512
/// with several tokens; one token's chains read its own `s`).
fn grouped(level: SimdLevel, k: &Kind, n_tokens: usize) -> bool {
    level == SimdLevel::Avx512Vnni && k.min && n_tokens > 1
}

/// Whether [`gemm`] at `level` streams `ty`'s rows once for all `n_tokens` tokens (see
/// `super::streams_weights`); `None` where it has no kernel for them. (AVX2 streams the
/// rows for every `T256` tokens: beyond those, bands of rows are better kept short, so
/// that they stay in cache from one group of tokens to the next.)
pub(super) fn streams(level: SimdLevel, ty: GgmlType, n_tokens: usize) -> Option<bool> {
    let avx512 = match level {
        SimdLevel::Avx512Vnni => true,
        SimdLevel::Avx2 => false,
        SimdLevel::Scalar => return None,
    };
    Kind::new(ty, avx512)?;
    Some(n_tokens <= if avx512 { STREAM_MAX_TOKENS } else { T256 })
}

/// Bytes of `n_tokens` repacked activation rows: the rows, then the group sums
/// ([`prep_s16`]) where there are any.
fn repacked_bytes(level: SimdLevel, k: &Kind, g: &Geo, n_tokens: usize) -> usize {
    let sums = if grouped(level, k, n_tokens) {
        n_tokens.div_ceil(4) * g.nb * 64
    } else {
        0
    };
    n_tokens * g.a_stride + sums
}

/// Repacks `n_tokens` activation rows (as `super::gemm` takes them) for the kernels of
/// `ty` at `level` into `into`, which it resizes; false when there are no such kernels.
/// Every band of a product can then share them ([`gemm`]'s `repacked`).
///
/// # Safety
/// `level` is supported by this CPU; `acts` holds `n_tokens` rows of `cols` quantized
/// to `ty`'s activation format.
pub(super) unsafe fn repack_acts(
    level: SimdLevel,
    ty: GgmlType,
    cols: usize,
    acts: &[u8],
    n_tokens: usize,
    into: &mut Vec<Line>,
) -> bool {
    let Some((k, g)) = layout(level, ty, cols) else {
        return false;
    };
    assert!(acts.len() >= n_tokens * g.nb * k.ab, "repack_acts: activation bytes");
    let a = lines(into, repacked_bytes(level, &k, &g, n_tokens));
    // SAFETY: the sizes were checked and reserved above; the CPU has `level`.
    unsafe { repack_into(level, &k, &g, acts.as_ptr(), n_tokens, a) };
    true
}

/// [`repack_acts`] into `a`, which has room for them.
///
/// # Safety
/// `acts` holds the rows; `a` has [`repacked_bytes`] writable bytes, 64-byte aligned;
/// the CPU has `level`.
unsafe fn repack_into(level: SimdLevel, k: &Kind, g: &Geo, acts: *const u8, n_tokens: usize, a: *mut u8) {
    for t in 0..n_tokens {
        // SAFETY: token t's activation row is in `acts`, and `a` has room for n_tokens
        // repacked rows.
        unsafe { prep_acts(k, g, acts.add(t * g.nb * k.ab), a.add(t * g.a_stride)) };
    }
    if grouped(level, k, n_tokens) {
        // SAFETY: `a` holds n_tokens repacked rows, then room for every group's sums.
        unsafe { prep_s16(g, a, n_tokens, a.add(n_tokens * g.a_stride).cast()) };
    }
}

/// Runs the kernel for `ty` at `level`; returns false when there is none (the caller
/// then takes the scalar path). `repacked` holds the activations as [`repack_acts`]
/// left them for this call's type, columns and tokens, or is empty (then each call
/// repacks them itself).
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
    out: OutMatrix,
    repacked: &[Line],
) -> bool {
    let Some((k, g)) = layout(level, ty, cols) else {
        return false;
    };
    let avx512 = level == SimdLevel::Avx512Vnni;
    if n_rows == 0 || n_tokens == 0 {
        return true;
    }
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        let bytes = repacked_bytes(level, &k, &g, n_tokens);
        let a = if repacked.is_empty() {
            let a = lines(&mut s.acts, bytes);
            // SAFETY: sizes checked by the caller; `a` has room; the CPU has `level`.
            unsafe { repack_into(level, &k, &g, acts.as_ptr(), n_tokens, a) };
            a.cast_const()
        } else {
            assert!(repacked.len() * 64 >= bytes, "gemm: repacked activations too short");
            repacked.as_ptr().cast::<u8>()
        };
        // The group sums follow the rows (read only where `grouped`).
        let s16 = a.wrapping_add(n_tokens * g.a_stride).cast::<f32>();
        if !avx512 {
            // SAFETY: AVX2 is present; the sizes were checked by the caller.
            unsafe { stream256(&k, &g, weights, n_rows, a, n_tokens, out) };
        } else if n_tokens <= STREAM_MAX_TOKENS {
            let mins = lines(&mut s.weights, g.nb16 * 4).cast::<f32>();
            // SAFETY: AVX-512 VNNI is present; the sizes were checked by the caller,
            // `mins` has room for one row's minimums, `s16` holds every group (Q4_1,
            // several tokens).
            unsafe { stream512_rows(&k, &g, weights, n_rows, a, n_tokens, mins, s16, out) };
        } else {
            let band = g.band_stride(&k);
            let block_rows = (PREFILL_BLOCK_BYTES / band).max(1) * MR;
            let w = lines(&mut s.weights, block_rows.min(n_rows.next_multiple_of(MR)) / MR * band);
            for r0 in (0..n_rows).step_by(block_rows) {
                let rows = block_rows.min(n_rows - r0);
                for q in 0..rows.div_ceil(MR) {
                    let first = r0 + MR * q;
                    let present = (n_rows - first).min(MR);
                    // SAFETY: rows first..first + present are in `weights`; `w` has room
                    // for this block's bands.
                    unsafe {
                        prep_band(
                            &k,
                            &g,
                            weights.as_ptr().add(first * g.nb * k.wb),
                            present,
                            w.add(q * band),
                        )
                    };
                }
                for t0 in (0..n_tokens).step_by(NT512) {
                    let tn = NT512.min(n_tokens - t0);
                    let f = pick_tile(&k, tn);
                    for q in 0..rows.div_ceil(MR) {
                        let valid = (rows - MR * q).min(MR);
                        // SAFETY: band q and tokens t0..t0 + tn are repacked; the outputs
                        // written are (t0 + t, r0 + MR q + r) for t < tn, r < valid, inside
                        // the caller's band; AVX-512 VNNI is present.
                        unsafe {
                            f(
                                &g,
                                w.add(q * band),
                                a.add(t0 * g.a_stride),
                                s16.wrapping_add(t0 / 4 * g.nb * 16),
                                out,
                                t0,
                                r0 + MR * q,
                                valid,
                            )
                        };
                    }
                }
            }
        }
    });
    true
}

/// Reads the little-endian u16 at `p`.
///
/// # Safety
/// `p` is valid for reading 2 bytes.
#[inline]
unsafe fn rd_u16(p: *const u8) -> u16 {
    // SAFETY: the caller's contract; unaligned reads are allowed.
    unsafe { p.cast::<u16>().read_unaligned() }
}

/// Reads the little-endian u32 at `p`.
///
/// # Safety
/// `p` is valid for reading 4 bytes.
#[inline]
unsafe fn rd_u32(p: *const u8) -> u32 {
    // SAFETY: the caller's contract; unaligned reads are allowed.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// The f16 at `p` as f32.
///
/// # Safety
/// `p` is valid for reading 2 bytes.
#[inline]
unsafe fn rd_f16(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    half::f16::from_bits(unsafe { rd_u16(p) }).to_f32()
}

/// Repacks one activation row (`g.nb` blocks at `src`) to `dst` (see [`Geo`]).
///
/// # Safety
/// `src` holds the row; `dst` has `g.a_stride` writable bytes; AVX2 is present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep_acts(k: &Kind, g: &Geo, src: *const u8, dst: *mut u8) {
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for b in 0..g.nb {
        // SAFETY: block b is in the row; every write is inside the row's `a_stride`
        // bytes by `Geo`'s layout.
        unsafe {
            let p = src.add(b * k.ab);
            let q = _mm256_loadu_si256(p.add(k.aqs).cast());
            _mm256_storeu_si256(dst.add(64 * b).cast(), q);
            if k.off != 0 {
                // Σ a over each lane's four bytes (1 · a pairs, then pairs of pairs).
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
                let hi = if k.hi16 { 16 * k.off } else { k.off };
                let nz = _mm256_mullo_epi32(
                    sums,
                    _mm256_setr_epi32(-k.off, -k.off, -k.off, -k.off, -hi, -hi, -hi, -hi),
                );
                _mm256_storeu_si256(dst.add(64 * b + 32).cast(), nz);
            }
            dst.add(g.a_da).cast::<f32>().add(b).write(rd_f16(p));
            if k.min {
                dst.add(g.a_s).cast::<f32>().add(b).write(rd_f16(p.add(2)));
            }
        }
    }
    for b in g.nb..g.nb16 {
        // SAFETY: b < nb16, inside the row's `da` and `s` areas.
        unsafe {
            dst.add(g.a_da).cast::<f32>().add(b).write(0.0);
            if k.min {
                dst.add(g.a_s).cast::<f32>().add(b).write(0.0);
            }
        }
    }
}

/// The 32 values of the block at `p` as unsigned bytes in element order (stored values:
/// `w + off`; Q8_0 at AVX2 signed), one block per ymm.
///
/// # Safety
/// `p` points at a whole block of `k.ty`; AVX2 is present.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack256(k: &Kind, p: *const u8) -> __m256i {
    // SAFETY: every read is inside the block.
    unsafe {
        if k.ty == GgmlType::Q8_0 {
            return _mm256_loadu_si256(p.add(2).cast());
        }
        let x = _mm_loadu_si128(p.add(k.wqs).cast());
        let low = _mm256_set1_epi8(0x0F);
        let v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(x), x), low);
        if k.ty != GgmlType::Q5_0 {
            return v;
        }
        // Bit i of qh is the fifth bit of element i.
        let qh = rd_u32(p.add(2));
        let idx = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let sel = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), idx);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let on = _mm256_cmpeq_epi8(_mm256_and_si256(sel, bit), bit);
        _mm256_or_si256(v, _mm256_and_si256(on, _mm256_set1_epi8(0x10)))
    }
}

/// The AVX2 kernel: every row read straight from its blocks, `R256` rows × `T256`
/// tokens at a time (fewer at the edges), one block per ymm.
///
/// # Safety
/// `weights` holds `n_rows` rows of `g.nb` blocks; `n_tokens` tokens are repacked at `a`;
/// the outputs are the caller's; AVX2 + FMA + F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream256(k: &Kind, g: &Geo, weights: &[u8], n_rows: usize, a: *const u8, n_tokens: usize, out: OutMatrix) {
    let row_bytes = g.nb * k.wb;
    let ones16 = _mm256_set1_epi16(1);
    for r0 in (0..n_rows).step_by(R256) {
        let rn = R256.min(n_rows - r0);
        for t0 in (0..n_tokens).step_by(T256) {
            let tn = T256.min(n_tokens - t0);
            let mut acc = [[_mm256_setzero_ps(); T256]; R256];
            let mut mins = [[0f32; T256]; R256];
            for b in 0..g.nb {
                for r in 0..rn {
                    // SAFETY: block b of row r0 + r is in `weights`; tokens t0.. t0 + tn
                    // are repacked at `a`.
                    unsafe {
                        let p = weights.as_ptr().add((r0 + r) * row_bytes + b * k.wb);
                        let u = unpack256(k, p);
                        let dw = rd_f16(p);
                        let m = if k.min { rd_f16(p.add(2)) } else { 0.0 };
                        for t in 0..tn {
                            let at = a.add((t0 + t) * g.a_stride);
                            let q = _mm256_loadu_si256(at.add(64 * b).cast());
                            let da = at.add(g.a_da).cast::<f32>().add(b).read();
                            let sums = if k.ty == GgmlType::Q8_0 {
                                // |w| against a with w's signs: pair sums stay in i16.
                                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(q, u));
                                _mm256_madd_epi16(pairs, ones16)
                            } else {
                                let s = _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), ones16);
                                if k.off != 0 {
                                    _mm256_add_epi32(s, _mm256_loadu_si256(at.add(64 * b + 32).cast()))
                                } else {
                                    s
                                }
                            };
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * da), acc[r][t]);
                            if k.min {
                                let s = at.add(g.a_s).cast::<f32>().add(b).read();
                                mins[r][t] = m.mul_add(s, mins[r][t]);
                            }
                        }
                    }
                }
            }
            for r in 0..rn {
                for t in 0..tn {
                    // SAFETY: the caller's contract.
                    unsafe { out.write(t0 + t, r0 + r, hsum8(acc[r][t]) + mins[r][t]) };
                }
            }
        }
    }
}

/// Byte masks for the low and the (unshifted) high nibbles.
const M0F: i64 = 0x0F0F_0F0F_0F0F_0F0F;
const MF0: i64 = 0xF0F0_F0F0_F0F0_F0F0u64 as i64;

/// Blocks at `p0` (low half) and `p1` (high half) as a zmm of stored unsigned bytes in
/// element order (see the module documentation).
///
/// # Safety
/// Both point at a whole block of type `TY`; AVX-512 VNNI is present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn unpack512<const TY: u8>(p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: every read is inside one of the two blocks.
    unsafe {
        if TY == Q80 {
            let x = _mm512_castsi256_si512(_mm256_loadu_si256(p0.add(2).cast()));
            let x = _mm512_inserti64x4::<1>(x, _mm256_loadu_si256(p1.add(2).cast()));
            return _mm512_xor_si512(x, _mm512_set1_epi8(-128));
        }
        let qs = match TY {
            Q40 => 2,
            Q41 => 4,
            _ => 6,
        };
        // Block 0's 16 packed bytes in 128-bit lanes 0 and 1, block 1's in 2 and 3.
        let x = _mm512_broadcast_i32x4(_mm_loadu_si128(p0.add(qs).cast()));
        let x = _mm512_mask_broadcast_i32x4(x, 0xFF00, _mm_loadu_si128(p1.add(qs).cast()));
        if TY != Q50 {
            return _mm512_and_si512(x, _mm512_setr_epi64(M0F, M0F, MF0, MF0, M0F, M0F, MF0, MF0));
        }
        let x = _mm512_mask_srli_epi16::<4>(x, 0xFF00_FF00, x);
        let v = _mm512_and_si512(x, _mm512_set1_epi8(0x0F));
        // Bit i of qh is the fifth bit of element i.
        let m = rd_u32(p0.add(2)) as u64 | (rd_u32(p1.add(2)) as u64) << 32;
        _mm512_mask_add_epi8(v, m, v, _mm512_set1_epi8(0x10))
    }
}

/// Weight types as const generic parameters of the AVX-512 kernels.
const Q40: u8 = 0;
const Q41: u8 = 1;
const Q50: u8 = 2;
const Q80: u8 = 3;

/// `[1 ×4, 1/16 ×4]` per 256-bit half: the scale factors of the low- and
/// unshifted high-nibble lanes of Q4_0/Q4_1.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn nibble_scales() -> __m512 {
    let s = 1.0 / 16.0;
    _mm512_setr_ps(1.0, 1.0, 1.0, 1.0, s, s, s, s, 1.0, 1.0, 1.0, 1.0, s, s, s, s)
}

/// The 32 bytes at `p` in both halves of a zmm.
///
/// # Safety
/// `p` is valid for reading 32 bytes; AVX-512 F is present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast256(p: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(p.cast()) })
}

/// Q4_1's activation sums `s`, rearranged per group of four tokens: for group `j` and
/// block `b`, 16 f32 at `dst + 16 (j · nb + b)`, lane `4t + r` holding token `4j + t`'s
/// `s` (0 past the last token), so that one FMA with the four rows' minimums repeated
/// steps the `m · s` chains of a 4 rows × 4 tokens tile (lane `4t + r`).
///
/// # Safety
/// `a` holds `n_tokens` rows repacked with geometry `g`; `dst` has room for
/// `n_tokens.div_ceil(4) * g.nb * 16` f32.
unsafe fn prep_s16(g: &Geo, a: *const u8, n_tokens: usize, dst: *mut f32) {
    for j in 0..n_tokens.div_ceil(4) {
        for b in 0..g.nb {
            for t in 0..4 {
                let token = 4 * j + t;
                let v = if token < n_tokens {
                    // SAFETY: token's row holds nb16 `s` values.
                    unsafe { a.add(token * g.a_stride + g.a_s).cast::<f32>().add(b).read() }
                } else {
                    0.0
                };
                for r in 0..4 {
                    // SAFETY: inside the group's 16 × nb f32.
                    unsafe { dst.add(16 * (j * g.nb + b) + 4 * t + r).write(v) };
                }
            }
        }
    }
}

/// ggml's `hsum_float_8` of each half of `v`: (low, high). The same three additions as
/// [`hsum8`] per element, on both halves at once.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn hsum8_halves(v: __m512) -> (f32, f32) {
    // Lanes i and 4 + i of each half, then 0 + 2 and 1 + 3 of each 128-bit lane, then
    // those two.
    let x = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    let x = _mm512_add_ps(x, _mm512_permute_ps::<0b11_10_11_10>(x));
    let x = _mm512_add_ps(x, _mm512_permute_ps::<0b11_11_01_01>(x));
    (_mm512_cvtss_f32(x), _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(x)))
}

/// The AVX-512 decode path over a band of rows: groups of 4 rows (then single rows),
/// every group against the tokens `STREAM_GROUP` at a time, with prefetch.
///
/// # Safety
/// As [`stream512`], for `n_tokens` tokens; `mins` has room for `g.nb16` f32; for Q4_1
/// with several tokens, `s16` holds every group's sums ([`prep_s16`]).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn stream512_rows(
    k: &Kind,
    g: &Geo,
    weights: &[u8],
    n_rows: usize,
    a: *const u8,
    n_tokens: usize,
    mins: *mut f32,
    s16: *const f32,
    out: OutMatrix,
) {
    // Token groups of 8, then 4, then the rest (so every group starts at a multiple of
    // 4, as the Q4_1 group sums do), and their kernels: the same for every row group.
    // At most STREAM_MAX_TOKENS = 16 tokens make at most four (15 = 4 + 4 + 4 + 3).
    const { assert!(STREAM_MAX_TOKENS <= 16) };
    let mut groups = [(0, pick_stream(k.ty, 1)); 4];
    let (mut n_groups, mut t0) = (0, 0);
    while t0 < n_tokens {
        let n = match n_tokens - t0 {
            rest if rest >= STREAM_GROUP => STREAM_GROUP,
            rest if rest >= 4 => 4,
            rest => rest,
        };
        groups[n_groups] = (t0, pick_stream(k.ty, n));
        n_groups += 1;
        t0 += n;
    }
    let row_bytes = g.nb * k.wb;
    let mut r = 0;
    while r < n_rows {
        // The 4 rows about to be multiplied, PREFETCH_AHEAD further on, prefetched by
        // the first token group's kernel as it goes. Near the band's end that is the
        // rows after it, which the caller's thread most often takes next (prefetches
        // never fault, wherever they point).
        let from = weights.as_ptr().wrapping_add(r * row_bytes + PREFETCH_AHEAD);
        let mut ahead = Ahead {
            from,
            lines: (4 * row_bytes).div_ceil(64),
        };
        let four = n_rows - r >= 4;
        for &(t0, (f4, f1)) in &groups[..n_groups] {
            let f = if four { f4 } else { f1 };
            // SAFETY: rows r.. are in `weights` (f4 only runs with 4 rows left), the
            // group's tokens are repacked at `a` from token t0 on, `mins` has room for 4
            // rows' `m`, the outputs are the caller's.
            unsafe {
                f(
                    k,
                    g,
                    weights.as_ptr().add(r * row_bytes),
                    a.add(t0 * g.a_stride),
                    mins,
                    s16.wrapping_add(t0 / 4 * g.nb * 16),
                    out.offset_rows(t0),
                    r,
                    ahead,
                )
            };
            ahead.lines = 0;
        }
        r += if four { 4 } else { 1 };
    }
}

/// A streaming kernel: `(kind, geo, first weight row, repacked tokens, Q4_1 minimums
/// scratch, Q4_1 group sums, out, r0, weights to prefetch)`.
type StreamFn = unsafe fn(&Kind, &Geo, *const u8, *const u8, *mut f32, *const f32, OutMatrix, usize, Ahead);

/// Weights a streaming kernel prefetches while it works: `lines` cache lines from
/// `from` (a hint, so it may point past the weights), a few per block, so the loads
/// overlap the arithmetic. (A burst of prefetches
/// before the arithmetic stalls once the core's line-fill buffers are full, and then
/// the memory idles while the kernel computes.)
#[derive(Clone, Copy)]
struct Ahead {
    from: *const u8,
    lines: usize,
}

/// Streaming kernels for 4 rows and for 1 row at `n` tokens (1..=4, or 8).
fn pick_stream(ty: GgmlType, n: usize) -> (StreamFn, StreamFn) {
    macro_rules! by_t {
        ($ty:expr) => {
            match n {
                1 => (
                    stream512::<$ty, 1, 4> as StreamFn,
                    stream512::<$ty, 1, 1> as StreamFn,
                ),
                2 => (stream512::<$ty, 2, 4>, stream512::<$ty, 2, 1>),
                3 => (stream512::<$ty, 3, 4>, stream512::<$ty, 3, 1>),
                4 => (stream512::<$ty, 4, 4>, stream512::<$ty, 4, 1>),
                _ => (stream512::<$ty, 8, 4>, stream512::<$ty, 8, 1>),
            }
        };
    }
    match ty {
        GgmlType::Q4_0 => by_t!(Q40),
        GgmlType::Q4_1 => by_t!(Q41),
        GgmlType::Q5_0 => by_t!(Q50),
        _ => by_t!(Q80),
    }
}

/// The AVX-512 decode kernel: `R` weight rows at `w` (4, as two pairs, or 1, doubled
/// into a pair whose high half is dropped), read straight from their blocks, against
/// `T` repacked tokens at `a`; writes `(t, r0 + r)`. A pair of blocks costs its unpack,
/// the load and permute of its two f16 scales (and Q4_1 minimums) and their scaling
/// (with one token premultiplied by the token's scale), and per token a `vpdpbusd`,
/// conversion and FMA. Q4_1's `m · s` chains of four rows × the group's tokens run
/// alongside in one zmm against the group's sums at `s16` ([`prep_s16`]); a single
/// row's minimums wait at `mins` for a scalar chain at the end. Prefetches of the rows
/// to come (`ahead`) are spread over the blocks.
///
/// # Safety
/// `R` rows of `g.nb` blocks of `TY` at `w`; `T` tokens repacked with geometry `g` at
/// `a`; `mins` is writable for `g.nb16` f32; for Q4_1 with `T > 1`, `s16` holds the
/// group's sums ([`prep_s16`]); those outputs are the caller's to write; the CPU has AVX-512
/// F/BW/VL/VNNI.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn stream512<const TY: u8, const T: usize, const R: usize>(
    k: &Kind,
    g: &Geo,
    w: *const u8,
    a: *const u8,
    mins: *mut f32,
    s16: *const f32,
    out: OutMatrix,
    r0: usize,
    ahead: Ahead,
) {
    const { assert!(R == 4 || R == 1) };
    let pairs = R.div_ceil(2);
    let ahead_per_block = ahead.lines.div_ceil(g.nb);
    let row_bytes = g.nb * k.wb;
    let row = |r: usize| if R == 1 { 0 } else { r };
    let nib = if k.hi16 { nibble_scales() } else { _mm512_set1_ps(1.0) };
    // Lanes 0..8 take a pair's first `d` (lane 0 of `[d_a, m_a, d_b, m_b]`), 8..16 its
    // second (lane 2).
    let pair_d = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let mut acc = [[_mm512_setzero_ps(); T]; 2];
    // Q4_1's `m · s` chains, token t's row r in lane 4 (t % 4) + r of `chain[t / 4]`
    // (one token: row r in lane r of `chain1`).
    let mut chain = [_mm512_setzero_ps(); 2];
    let mut chain1 = _mm_setzero_ps();
    for b in 0..g.nb {
        for line in b * ahead_per_block..ahead.lines.min((b + 1) * ahead_per_block) {
            // A prefetch only hints the cache: it never faults, wherever `ahead` points.
            _mm_prefetch::<_MM_HINT_T0>(ahead.from.wrapping_add(64 * line).cast());
        }
        // Each pair's block unpacked and scaled once, then every token against the pairs:
        // a token's loads are live only while its products run, which keeps 8 tokens × 2
        // pairs of accumulators in registers. A pair's scales come from its two blocks'
        // first four bytes, `[d_a, m_a, d_b, m_b]` (m is Q4_1's; the others' is never
        // read), spread to the pair's lanes by one permute. (Gathering 16 blocks' scales
        // per row at once cost more than these loads: a 4-row group of SmolLM2's 576
        // columns took 79 ns, 2 of its 18 blocks in a second gathered chunk, against
        // 57 ns for 16 blocks; without gathers 1536 × 576 Q4_1 went from 29 to 52 GMAC/s.)
        let mut u = [_mm512_setzero_si512(); 2];
        let mut s = [_mm512_setzero_ps(); 2];
        let mut dm = [_mm_setzero_ps(); 2];
        // With one token the block's scale products are premultiplied by its scale:
        // d · (d_a · nib) is the same exact product as (d · d_a) · nib.
        let nib = if T == 1 {
            // SAFETY: the per-block `da` area holds nb16 f32.
            _mm512_mul_ps(
                nib,
                _mm512_set1_ps(unsafe { a.add(g.a_da).cast::<f32>().add(b).read() }),
            )
        } else {
            nib
        };
        for p in 0..pairs {
            let pa = w.wrapping_add(row(2 * p) * row_bytes + b * k.wb);
            let pb = w.wrapping_add(row(2 * p + 1) * row_bytes + b * k.wb);
            // SAFETY: block b is in rows 2p and 2p + 1 (or row 0 twice).
            unsafe {
                u[p] = unpack512::<TY>(pa, pb);
                dm[p] = _mm_cvtph_ps(_mm_setr_epi32(rd_u32(pa) as i32, rd_u32(pb) as i32, 0, 0));
            }
            s[p] = _mm512_mul_ps(_mm512_permutexvar_ps(pair_d, _mm512_castps128_ps512(dm[p])), nib);
        }
        if TY == Q41 && R == 4 {
            // One step of the chains: the four rows' `m` of this block against the
            // token's `s` (one token) or the group's (several).
            let m4 = _mm_shuffle_ps::<0b11_01_11_01>(dm[0], dm[1]);
            // SAFETY: token 0's row holds nb16 `s`; with several tokens `s16` holds the
            // group's 16 f32 per block.
            unsafe {
                if T == 1 {
                    chain1 = _mm_fmadd_ps(m4, _mm_set1_ps(*a.add(g.a_s).cast::<f32>().add(b)), chain1);
                } else {
                    let m16 = _mm512_broadcast_f32x4(m4);
                    for (gi, chain) in chain.iter_mut().enumerate().take(T.div_ceil(4)) {
                        let sums = _mm512_loadu_ps(s16.add(gi * g.nb * 16 + 16 * b));
                        *chain = _mm512_fmadd_ps(m16, sums, *chain);
                    }
                }
            }
        } else if TY == Q41 {
            // One row: its `m` waits for the scalar chain at the end.
            // SAFETY: `mins` holds nb16 f32.
            unsafe { mins.add(b).write(_mm_cvtss_f32(_mm_movehdup_ps(dm[0]))) };
        }
        // t indexes the inner dimension of every pair's accumulators at once.
        #[allow(clippy::needless_range_loop)]
        for t in 0..T {
            // SAFETY: block b of token t is repacked.
            let (av, nz, da) = unsafe {
                let at = a.add(t * g.a_stride);
                (
                    bcast256(at.add(64 * b)),
                    if TY != Q41 {
                        bcast256(at.add(64 * b + 32))
                    } else {
                        _mm512_setzero_si512()
                    },
                    if T > 1 {
                        _mm512_set1_ps(at.add(g.a_da).cast::<f32>().add(b).read())
                    } else {
                        _mm512_setzero_ps()
                    },
                )
            };
            for p in 0..pairs {
                let sc = if T == 1 { s[p] } else { _mm512_mul_ps(s[p], da) };
                let q = _mm512_dpbusd_epi32(nz, u[p], av);
                acc[p][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), sc, acc[p][t]);
            }
        }
    }
    // t indexes the inner dimension of every pair's accumulators at once.
    #[allow(clippy::needless_range_loop)]
    for t in 0..T {
        let mut sums = [0f32; 4];
        for p in 0..pairs {
            (sums[2 * p], sums[2 * p + 1]) = hsum8_halves(acc[p][t]);
        }
        let mut chains = [0f32; 4];
        if TY == Q41 && R == 4 && T == 1 {
            // SAFETY: `chains` has 4 f32.
            unsafe { _mm_storeu_ps(chains.as_mut_ptr(), chain1) };
        } else if TY == Q41 && R == 4 {
            let mut all = [0f32; 16];
            // SAFETY: `all` has 16 f32.
            unsafe { _mm512_storeu_ps(all.as_mut_ptr(), chain[t / 4]) };
            chains.copy_from_slice(&all[4 * (t % 4)..4 * (t % 4) + 4]);
        } else if TY == Q41 {
            // One row: the `m · s` chain, block after block.
            for b in 0..g.nb {
                // SAFETY: stored above; the `s` area holds nb16 f32.
                let (m, s) = unsafe {
                    (
                        mins.add(b).read(),
                        a.add(t * g.a_stride + g.a_s).cast::<f32>().add(b).read(),
                    )
                };
                chains[0] = m.mul_add(s, chains[0]);
            }
        }
        for (r, &sum) in sums.iter().enumerate().take(R) {
            let total = if TY == Q41 { sum + chains[r] } else { sum };
            // SAFETY: the caller's contract.
            unsafe { out.write(t, r0 + r, total) };
        }
    }
}

/// Repacks `present` (1..=`MR`) weight rows at `src` into one band at `dst` (see
/// [`Geo::band_stride`]); missing rows are zero (zero values and scales), and their
/// outputs are never written.
///
/// # Safety
/// `present` rows of `g.nb` blocks are at `src`; `dst` has `g.band_stride(k)` writable
/// bytes; AVX-512 VNNI is present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn prep_band(k: &Kind, g: &Geo, src: *const u8, present: usize, dst: *mut u8) {
    let row_bytes = g.nb * k.wb;
    let nib = if k.hi16 { 1.0 / 16.0 } else { 1.0 };
    for b in 0..g.nb {
        let unit = dst.wrapping_add(BAND_UNIT * b);
        let block = |r: usize| src.wrapping_add(r * row_bytes + b * k.wb);
        for p in 0..PAIRS {
            let (ra, rb) = (2 * p, 2 * p + 1);
            // SAFETY: rows below `present` hold block b; the pair's 64 bytes are inside
            // the block's unit.
            unsafe {
                let u = match (ra < present, rb < present) {
                    (true, true) => unpack_pair(k.ty, block(ra), block(rb)),
                    (true, false) => _mm512_maskz_mov_epi64(0x0F, unpack_pair(k.ty, block(ra), block(ra))),
                    _ => _mm512_setzero_si512(),
                };
                _mm512_storeu_si512(unit.add(64 * p).cast(), u);
            }
        }
        // The rows' scales, then the same scaled for the high-nibble lanes (see `Kind`).
        let d = |r: usize| {
            // SAFETY: row r < present holds block b.
            if r < present {
                unsafe { rd_f16(block(r)) }
            } else {
                0.0
            }
        };
        for r in 0..MR {
            // SAFETY: 16 f32 at the unit's end.
            unsafe {
                let scales = unit.add(64 * PAIRS).cast::<f32>();
                let d = d(r);
                scales.add(r).write(d);
                scales.add(MR + r).write(d * nib);
            }
        }
        if k.min {
            for r in 0..MR {
                // SAFETY: as above; the minimums follow the blocks.
                unsafe {
                    let m = if r < present {
                        rd_f16(src.add(r * row_bytes + b * k.wb + 2))
                    } else {
                        0.0
                    };
                    dst.add(BAND_UNIT * g.nb).cast::<f32>().add(MR * b + r).write(m);
                }
            }
        }
    }
}

/// [`unpack512`] for a runtime type.
///
/// # Safety
/// As [`unpack512`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn unpack_pair(ty: GgmlType, p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        match ty {
            GgmlType::Q4_0 => unpack512::<Q40>(p0, p1),
            GgmlType::Q4_1 => unpack512::<Q41>(p0, p1),
            GgmlType::Q5_0 => unpack512::<Q50>(p0, p1),
            _ => unpack512::<Q80>(p0, p1),
        }
    }
}

/// A tile kernel: `(geo, repacked band, repacked token rows, Q4_1 group sums, out, t0,
/// r0, valid rows)`.
type TileFn = unsafe fn(&Geo, *const u8, *const u8, *const f32, OutMatrix, usize, usize, usize);

/// The AVX-512 tile kernel for `tn` tokens (1..=NT512).
fn pick_tile(k: &Kind, tn: usize) -> TileFn {
    macro_rules! by_t {
        ($nz:literal, $min:literal) => {
            match tn {
                1 => tile512::<1, $nz, $min>,
                2 => tile512::<2, $nz, $min>,
                3 => tile512::<3, $nz, $min>,
                _ => tile512::<NT512, $nz, $min>,
            }
        };
    }
    if k.min {
        by_t!(false, true)
    } else {
        by_t!(true, false)
    }
}

/// The AVX-512 tile: a repacked band of `MR` weight rows at `w` × `T` repacked tokens
/// at `a` (of the group whose Q4_1 sums are at `s16`); writes `(t0 + t, r0 + r)` for
/// `t < T`, `r < rn`.
///
/// # Safety
/// The band and `T` tokens are repacked there with geometry `g`; those outputs are the
/// caller's to write; the CPU has AVX-512 F/BW/VL/VNNI.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const T: usize, const NZ: bool, const MIN: bool>(
    g: &Geo,
    w: *const u8,
    a: *const u8,
    s16: *const f32,
    out: OutMatrix,
    t0: usize,
    r0: usize,
    rn: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; PAIRS];
    // Q4_1's `m · s` chains: rows 4h..4h + 4 in `chain[h]`, token t's row in lane 4t + r.
    let mut chain = [_mm512_setzero_ps(); MR / 4];
    // Pair p's lanes of a token's scale products (see below): row 2p's product for the
    // low and high nibbles, then row 2p + 1's.
    let pick: [__m512i; PAIRS] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        let (ha, hb) = (a + MR as i32, b + MR as i32);
        _mm512_setr_epi32(a, a, a, a, ha, ha, ha, ha, b, b, b, b, hb, hb, hb, hb)
    });
    for b in 0..g.nb {
        // SAFETY: block b of the band is repacked.
        let (u, scales): ([__m512i; PAIRS], __m512) = unsafe {
            let unit = w.add(BAND_UNIT * b);
            (
                std::array::from_fn(|p| _mm512_loadu_si512(unit.add(64 * p).cast())),
                _mm512_loadu_ps(unit.add(64 * PAIRS).cast()),
            )
        };
        if MIN {
            // SAFETY: the band's minimums follow its blocks; `s16` holds the group's 16
            // f32 per block.
            unsafe {
                let sums = _mm512_loadu_ps(s16.add(16 * b));
                let m = w.add(BAND_UNIT * g.nb).cast::<f32>().add(MR * b);
                for (h, chain) in chain.iter_mut().enumerate() {
                    let m16 = _mm512_broadcast_f32x4(_mm_loadu_ps(m.add(4 * h)));
                    *chain = _mm512_fmadd_ps(m16, sums, *chain);
                }
            }
        }
        // t indexes the inner dimension of every pair's accumulators at once.
        #[allow(clippy::needless_range_loop)]
        for t in 0..T {
            // SAFETY: block b of token t is repacked.
            let (av, nz, da) = unsafe {
                let at = a.add(t * g.a_stride);
                (
                    bcast256(at.add(64 * b)),
                    if NZ {
                        bcast256(at.add(64 * b + 32))
                    } else {
                        _mm512_setzero_si512()
                    },
                    _mm512_set1_ps(at.add(g.a_da).cast::<f32>().add(b).read()),
                )
            };
            // The block's 16 scale products for this token in one multiply, each pair's
            // lanes then picked from them: the same products as `s · d_a` per pair.
            let products = _mm512_mul_ps(scales, da);
            for p in 0..PAIRS {
                let q = _mm512_dpbusd_epi32(nz, u[p], av);
                let sc = _mm512_permutexvar_ps(pick[p], products);
                acc[p][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), sc, acc[p][t]);
            }
        }
    }
    let mut chains = [[0f32; 16]; MR / 4];
    for (c, v) in chains.iter_mut().zip(&chain) {
        // SAFETY: `c` has 16 f32.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), *v) };
    }
    for t in 0..T {
        let mut sums = [0f32; MR];
        for p in 0..PAIRS {
            (sums[2 * p], sums[2 * p + 1]) = hsum8_halves(acc[p][t]);
        }
        for (r, v) in sums.into_iter().enumerate().take(rn) {
            // SAFETY: the caller's contract.
            unsafe { out.write(t0 + t, r0 + r, v + chains[r / 4][4 * t + r % 4]) };
        }
    }
}
