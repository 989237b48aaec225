//! SIMD kernels for the 32-element block types: Q4_0, Q4_1, Q5_0, Q8_0.
//!
//! Every call works in two steps, the same at both SIMD levels:
//!
//! 1. Repack. Both sides are rewritten once into a thread-local scratch, in "pair"
//!    units of two consecutive blocks (64 elements): the weights as unsigned bytes
//!    (nibbles are already 0..15 / 0..31; Q8_0 is shifted by 128), the activations as
//!    their signed bytes in the same element order, each side's two f16 scales as f32
//!    lanes, and per activation pair the offset correction `-off · Σ a` of each block.
//!    Element order inside a pair: bytes 0..16 hold elements 0..16 of block 0, 16..32
//!    those of block 1, 32..48 elements 16..32 of block 0, 48..64 those of block 1. So
//!    a 32-bit lane of a `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`) result belongs to
//!    block 0 when its index mod 8 is below 4, and the scale patterns are
//!    `[d0 ×4, d1 ×4]` repeated: a 32-byte broadcast load, no shuffle in the hot loop.
//! 2. Multiply. A register tile of rows × tokens walks the pairs: per (row, token,
//!    pair) one integer dot (its accumulator starts at the offset correction, so the
//!    zero point costs nothing), one conversion, one scale product and one FMA into
//!    16 (8) f32 lanes; lanes are summed once per output at the end. Q4_1's `m · s`
//!    terms are a dense f32 dot of per-block vectors added to the same lanes, after
//!    the pairs.
//!
//! Every kernel of a level computes an output with the same operations in the same order
//! (`stream512` and `tile512` have one lane layout, one product per pair, the `m · s`
//! terms after all pairs, one summation tree for every row), so an element's bits do not
//! depend on the number of tokens or the band of rows it was computed with.
//!
//! The weights are repacked in row blocks sized for L2 (prefill) or L1 (few tokens); the
//! token tile sweeps a whole row block while its activations stay in L1. At AVX-512 with
//! at most `STREAM_MAX_TOKENS` tokens (decode), the weights skip the repacking: they are
//! unpacked in registers straight from their blocks (`stream512`), with software
//! prefetch running `PREFETCH_AHEAD` bytes in front.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{OutMatrix, SimdLevel};
use crate::quant::GgmlType;

/// Rows per AVX-512 tile; row blocks are padded with zero rows to a multiple of it.
const MR: usize = 4;
/// Tokens per AVX-512 tile.
const NT512: usize = 5;
/// Up to this many tokens, AVX-512 streams the weights straight from their blocks
/// instead of repacking them: each group of rows is unpacked in registers once per
/// `STREAM_GROUP` tokens (the rows stay in L1 between groups), which costs less than
/// writing and reading a repacked copy until the batch grows past a few groups.
const STREAM_MAX_TOKENS: usize = 16;
/// Tokens per streaming kernel call: 4 rows × 4 tokens of accumulators plus the
/// unpacked weights and activations fill the 32 zmm registers.
const STREAM_GROUP: usize = 4;
/// Rows per AVX2 tile (16 ymm registers hold fewer accumulators).
const MR256: usize = 2;
/// Tokens per AVX2 tile.
const NT256: usize = 3;
/// Bytes of repacked weights per row block for many tokens (kept in L2 while every
/// token tile passes over it) and for few tokens (kept in L1 right after repacking).
const PREFILL_BLOCK_BYTES: usize = 192 << 10;
const DECODE_BLOCK_BYTES: usize = 16 << 10;
/// Decode prefetches the weights this many bytes ahead of the rows being multiplied.
/// The hardware prefetchers stop at 4 KiB pages (model weights are a file mapping with
/// 4 KiB pages), which leaves a DRAM stream waiting at each page boundary.
const PREFETCH_AHEAD: usize = 8 << 10;

/// A zero block, standing in for the missing second block of a row with an odd number
/// of blocks: its values and scales are zero, so the pair's second half adds nothing.
static ZERO_BLOCK: [u8; 64] = [0; 64];

/// 64-byte aligned scratch storage, only ever accessed through raw pointers.
#[allow(dead_code)]
#[repr(align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Per-thread buffers, grown on demand and reused by later calls.
#[derive(Default)]
struct Scratch {
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

/// The weight type's block layout and how its repacked values relate to the true ones.
#[derive(Clone, Copy)]
struct Kind {
    ty: GgmlType,
    /// Bytes per weight block.
    wb: usize,
    /// Bytes per activation block and the offset of its quants.
    ab: usize,
    aqs: usize,
    /// Repacked weight = true weight + `off` (folded in through the activation sums).
    off: i32,
    /// Q4_1: add `m · s` per block.
    min: bool,
    /// AVX2 Q8_0: weights kept signed (`vpmaddubsw` would saturate on `w + 128`), stored
    /// as `|w|` plus the signed bytes, whose signs are moved onto the activations.
    signed: bool,
}

impl Kind {
    fn new(ty: GgmlType, avx512: bool) -> Option<Kind> {
        let (wb, off) = match ty {
            GgmlType::Q4_0 => (18, 8),
            GgmlType::Q4_1 => (20, 0),
            GgmlType::Q5_0 => (22, 16),
            GgmlType::Q8_0 => (34, if avx512 { 128 } else { 0 }),
            _ => return None,
        };
        let min = ty == GgmlType::Q4_1;
        Some(Kind {
            ty,
            wb,
            ab: if min { 36 } else { 34 },
            aqs: if min { 4 } else { 2 },
            off,
            min,
            signed: ty == GgmlType::Q8_0 && !avx512,
        })
    }
}

/// Bytes per pair in a repacked row: its 64 values, then (weights) the 32-byte scale
/// pattern twice (a whole zmm, so the AVX-512 tile reads it as a memory operand), or (activations) the 32-byte offset correction (i32
/// lanes 0 and 4) and the 32-byte scale pattern. Keeping a pair's parts together lets a
/// tile address every row and token from one base pointer each with a shared index.
const PAIR: usize = 128;
const W_DW: usize = 64;
const A_NZ: usize = 64;
const A_DA: usize = 96;

/// Where things live in the repacked rows (all offsets multiples of 64).
///
/// Weight row: pairs (np × `PAIR`) | `m` (nb16 f32, Q4_1) | signed bytes (np × 64 B,
/// AVX2 Q8_0).
/// Activation row: pairs (np × `PAIR`) | `s` (nb16 f32, Q4_1) | `da` per block (nb16
/// f32, for the decode kernel).
#[derive(Clone, Copy)]
struct Geo {
    nb: usize,
    np: usize,
    nb16: usize,
    w_m: usize,
    w_sg: usize,
    w_stride: usize,
    a_s: usize,
    a_db: usize,
    a_stride: usize,
}

impl Geo {
    fn new(k: &Kind, cols: usize) -> Geo {
        let nb = cols / 32;
        let np = nb.div_ceil(2);
        let nb16 = nb.div_ceil(16) * 16;
        let mins = if k.min { nb16 * 4 } else { 0 };
        let w_m = np * PAIR;
        let w_sg = w_m + mins;
        let w_stride = w_sg + if k.signed { np * 64 } else { 0 };
        let a_s = np * PAIR;
        let a_db = a_s + mins;
        let a_stride = a_db + nb16 * 4;
        Geo {
            nb,
            np,
            nb16,
            w_m,
            w_sg,
            w_stride,
            a_s,
            a_db,
            a_stride,
        }
    }
}

/// A tile kernel: `(geo, repacked weight rows, repacked token rows, out, t0, r0, valid
/// rows)`.
type TileFn = unsafe fn(&Geo, *const u8, *const u8, OutMatrix, usize, usize, usize);

/// A streaming kernel: `(kind, geo, first weight row, repacked tokens, Q4_1 minimums
/// scratch, out, r0)`.
type StreamFn = unsafe fn(&Kind, &Geo, *const u8, *const u8, *mut f32, OutMatrix, usize);

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
    out: OutMatrix,
) -> bool {
    let avx512 = match level {
        SimdLevel::Avx512Vnni => true,
        SimdLevel::Avx2 => false,
        SimdLevel::Scalar => return false,
    };
    let Some(k) = Kind::new(ty, avx512) else {
        return false;
    };
    if n_rows == 0 || n_tokens == 0 {
        return true;
    }
    let g = Geo::new(&k, cols);
    if avx512 && n_tokens <= STREAM_MAX_TOKENS {
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let a = lines(&mut s.acts, n_tokens * g.a_stride);
            // Q4_1's `m` of 4 rows (the weights' scratch is free: no repacking here).
            let mins = lines(&mut s.weights, if k.min { 4 * g.nb16 * 4 } else { 0 }).cast::<f32>();
            for t in 0..n_tokens {
                // SAFETY: as in the prefill path below.
                unsafe { prep_acts(&k, &g, acts.as_ptr().add(t * g.nb * k.ab), a.add(t * g.a_stride)) };
            }
            let (full, last) = (
                pick_stream(ty, STREAM_GROUP),
                pick_stream(ty, (n_tokens - 1) % STREAM_GROUP + 1),
            );
            let row_bytes = g.nb * k.wb;
            let mut r = 0;
            let end = weights.as_ptr_range().end;
            while r < n_rows {
                // The 4 rows about to be multiplied, PREFETCH_AHEAD further on.
                let base = weights.as_ptr().wrapping_add(r * row_bytes + PREFETCH_AHEAD);
                let stop = base.wrapping_add(4 * row_bytes).min(end);
                let mut p = base;
                while p < stop {
                    // SAFETY: a prefetch only hints the cache, and p is inside `weights`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
                    p = p.wrapping_add(64);
                }
                for t0 in (0..n_tokens).step_by(STREAM_GROUP) {
                    let (f4, f1) = if n_tokens - t0 >= STREAM_GROUP { full } else { last };
                    let f = if n_rows - r >= 4 { f4 } else { f1 };
                    // SAFETY: rows r.. are in `weights` (f4 only runs with 4 rows left),
                    // the group's tokens are repacked at `a` from token t0 on, `mins` has
                    // room for 4 rows' `m` (Q4_1), the outputs are the caller's; AVX-512
                    // VNNI.
                    unsafe {
                        f(
                            &k,
                            &g,
                            weights.as_ptr().add(r * row_bytes),
                            a.add(t0 * g.a_stride),
                            mins,
                            out.offset_rows(t0),
                            r,
                        )
                    };
                }
                r += if n_rows - r >= 4 { 4 } else { 1 };
            }
        });
        return true;
    }
    let (tile_rows, tile_tokens) = if avx512 { (MR, NT512) } else { (MR256, NT256) };
    let budget = if n_tokens <= tile_tokens {
        DECODE_BLOCK_BYTES
    } else {
        PREFILL_BLOCK_BYTES
    };
    let block_rows = (budget / g.w_stride / MR).max(1) * MR;
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        let a = lines(&mut s.acts, n_tokens * g.a_stride);
        let w = lines(&mut s.weights, block_rows.min(n_rows.next_multiple_of(MR)) * g.w_stride);
        for t in 0..n_tokens {
            // SAFETY: token t's activation row is in `acts` (sizes checked by the caller),
            // and `a` has room for n_tokens repacked rows.
            unsafe { prep_acts(&k, &g, acts.as_ptr().add(t * g.nb * k.ab), a.add(t * g.a_stride)) };
        }
        for r0 in (0..n_rows).step_by(block_rows) {
            let rows = block_rows.min(n_rows - r0);
            let padded = rows.next_multiple_of(MR);
            for r in 0..padded {
                let dst = w.wrapping_add(r * g.w_stride);
                if r < rows {
                    // SAFETY: row r0 + r is in `weights`; `w` has room for `padded` rows.
                    unsafe { prep_weights(&k, &g, weights.as_ptr().add((r0 + r) * g.nb * k.wb), dst) };
                } else {
                    // SAFETY: as above; a zero row yields zero results, never written.
                    unsafe { dst.write_bytes(0, g.w_stride) };
                }
            }
            for t0 in (0..n_tokens).step_by(tile_tokens) {
                let tn = tile_tokens.min(n_tokens - t0);
                let f = if avx512 { pick512(&k, tn) } else { pick256(&k, tn) };
                for rr in (0..padded).step_by(tile_rows) {
                    let valid = rows.saturating_sub(rr).min(tile_rows);
                    // SAFETY: the repacked rows rr.. rr + tile_rows and tokens t0.. t0 + tn
                    // exist; the outputs written are (t0 + t, r0 + rr + r) for t < tn,
                    // r < valid, all inside the caller's band; `level` is supported.
                    unsafe {
                        f(
                            &g,
                            w.add(rr * g.w_stride),
                            a.add(t0 * g.a_stride),
                            out,
                            t0,
                            r0 + rr,
                            valid,
                        )
                    };
                }
            }
        }
    });
    true
}

/// The AVX-512 tile kernel for `tn` tokens (1..=NT512).
fn pick512(k: &Kind, tn: usize) -> TileFn {
    macro_rules! by_t {
        ($nz:literal, $min:literal) => {
            match tn {
                1 => tile512::<1, $nz, $min>,
                2 => tile512::<2, $nz, $min>,
                3 => tile512::<3, $nz, $min>,
                4 => tile512::<4, $nz, $min>,
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

/// The AVX2 tile kernel for `tn` tokens (1..=NT256).
fn pick256(k: &Kind, tn: usize) -> TileFn {
    macro_rules! by_t {
        ($nz:literal, $min:literal, $sg:literal) => {
            match tn {
                1 => tile256::<1, $nz, $min, $sg>,
                2 => tile256::<2, $nz, $min, $sg>,
                _ => tile256::<NT256, $nz, $min, $sg>,
            }
        };
    }
    if k.min {
        by_t!(false, true, false)
    } else if k.signed {
        by_t!(false, false, true)
    } else {
        by_t!(true, false, false)
    }
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

/// 16 bytes at `lo` in the low 128-bit lane, 16 at `hi` in the high one.
///
/// # Safety
/// Both are valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes(lo: *const u8, hi: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_loadu2_m128i(hi.cast(), lo.cast()) }
}

/// The f32 scale pattern `[d0 ×4, d1 ×4]` of two f16 scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_pair(d0: u16, d1: u16) -> __m256 {
    let both = _mm_cvtsi32_si128((d0 as u32 | (d1 as u32) << 16) as i32);
    let spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
    _mm256_cvtph_ps(_mm_shuffle_epi8(both, spread))
}

/// 0x10 in byte i where bit i of `m` is set, else 0 (the fifth bit of Q5 values).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit4_bytes(m: u32) -> __m256i {
    let idx = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let sel = _mm256_shuffle_epi8(_mm256_set1_epi32(m as i32), idx);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let on = _mm256_cmpeq_epi8(_mm256_and_si256(sel, bit), bit);
    _mm256_and_si256(on, _mm256_set1_epi8(0x10))
}

/// Repacks one weight row (`g.nb` blocks at `src`) to `dst` (see [`Geo`]).
///
/// # Safety
/// `src` holds the row; `dst` has `g.w_stride` writable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep_weights(k: &Kind, g: &Geo, src: *const u8, dst: *mut u8) {
    let low = _mm256_set1_epi8(0x0F);
    for j in 0..g.np {
        // SAFETY: blocks 2j (and 2j + 1 when it exists, else the zero block) are in the
        // row; every write is inside the row's `w_stride` bytes by `Geo`'s layout.
        unsafe {
            let p0 = src.add(2 * j * k.wb);
            let p1 = if 2 * j + 1 < g.nb {
                p0.add(k.wb)
            } else {
                ZERO_BLOCK.as_ptr()
            };
            let (lo, hi) = match k.ty {
                GgmlType::Q8_0 => (lanes(p0.add(2), p1.add(2)), lanes(p0.add(18), p1.add(18))),
                _ => {
                    let qs = if k.ty == GgmlType::Q4_1 { 4 } else { k.wb - 16 };
                    let x = lanes(p0.add(qs), p1.add(qs));
                    let (lo, hi) = (_mm256_and_si256(x, low), _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                    if k.ty == GgmlType::Q5_0 {
                        let (h0, h1) = (rd_u32(p0.add(2)), rd_u32(p1.add(2)));
                        let mlo = (h0 & 0xFFFF) | h1 << 16;
                        let mhi = h0 >> 16 | (h1 & 0xFFFF_0000);
                        (
                            _mm256_or_si256(lo, bit4_bytes(mlo)),
                            _mm256_or_si256(hi, bit4_bytes(mhi)),
                        )
                    } else {
                        (lo, hi)
                    }
                }
            };
            let u = dst.add(PAIR * j);
            if k.signed {
                let sg = dst.add(g.w_sg + 64 * j);
                _mm256_storeu_si256(sg.cast(), lo);
                _mm256_storeu_si256(sg.add(32).cast(), hi);
                _mm256_storeu_si256(u.cast(), _mm256_abs_epi8(lo));
                _mm256_storeu_si256(u.add(32).cast(), _mm256_abs_epi8(hi));
            } else {
                let flip = _mm256_set1_epi8(if k.off == 128 { -128 } else { 0 });
                _mm256_storeu_si256(u.cast(), _mm256_xor_si256(lo, flip));
                _mm256_storeu_si256(u.add(32).cast(), _mm256_xor_si256(hi, flip));
            }
            let dw = scale_pair(rd_u16(p0), rd_u16(p1));
            _mm256_storeu_ps(dst.add(PAIR * j + W_DW).cast(), dw);
            _mm256_storeu_ps(dst.add(PAIR * j + W_DW + 32).cast(), dw);
            if k.min {
                let m = dst.add(g.w_m).cast::<f32>();
                m.add(2 * j).write(half::f16::from_bits(rd_u16(p0.add(2))).to_f32());
                m.add(2 * j + 1).write(half::f16::from_bits(rd_u16(p1.add(2))).to_f32());
            }
        }
    }
    if k.min {
        for b in 2 * g.np..g.nb16 {
            // SAFETY: b < nb16, inside the row's `m` area.
            unsafe { dst.add(g.w_m).cast::<f32>().add(b).write(0.0) };
        }
    }
}

/// Repacks one activation row (`g.nb` blocks at `src`) to `dst` (see [`Geo`]).
///
/// # Safety
/// `src` holds the row; `dst` has `g.a_stride` writable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep_acts(k: &Kind, g: &Geo, src: *const u8, dst: *mut u8) {
    let flip = _mm256_set1_epi8(-128);
    for j in 0..g.np {
        // SAFETY: as in `prep_weights`.
        unsafe {
            let p0 = src.add(2 * j * k.ab);
            let p1 = if 2 * j + 1 < g.nb {
                p0.add(k.ab)
            } else {
                ZERO_BLOCK.as_ptr()
            };
            let (q0, q1) = (p0.add(k.aqs), p1.add(k.aqs));
            let lo = lanes(q0, q1);
            let hi = lanes(q0.add(16), q1.add(16));
            _mm256_storeu_si256(dst.add(PAIR * j).cast(), lo);
            _mm256_storeu_si256(dst.add(PAIR * j + 32).cast(), hi);
            if k.off != 0 {
                // Σ a per block: byte sums of a + 128 (psadbw), less 32 · 128.
                let z = _mm256_setzero_si256();
                let s = _mm256_add_epi64(
                    _mm256_sad_epu8(_mm256_xor_si256(lo, flip), z),
                    _mm256_sad_epu8(_mm256_xor_si256(hi, flip), z),
                );
                let mut q = [0i64; 4];
                _mm256_storeu_si256(q.as_mut_ptr().cast(), s);
                let sum0 = (q[0] + q[1]) as i32 - 32 * 128;
                let sum1 = (q[2] + q[3]) as i32 - 32 * 128;
                let nz = _mm256_setr_epi32(-k.off * sum0, 0, 0, 0, -k.off * sum1, 0, 0, 0);
                _mm256_storeu_si256(dst.add(PAIR * j + A_NZ).cast(), nz);
            }
            _mm256_storeu_ps(dst.add(PAIR * j + A_DA).cast(), scale_pair(rd_u16(p0), rd_u16(p1)));
            let db = dst.add(g.a_db).cast::<f32>();
            db.add(2 * j).write(half::f16::from_bits(rd_u16(p0)).to_f32());
            db.add(2 * j + 1).write(half::f16::from_bits(rd_u16(p1)).to_f32());
            if k.min {
                let s = dst.add(g.a_s).cast::<f32>();
                s.add(2 * j).write(half::f16::from_bits(rd_u16(p0.add(2))).to_f32());
                s.add(2 * j + 1).write(half::f16::from_bits(rd_u16(p1.add(2))).to_f32());
            }
        }
    }
    for b in 2 * g.np..g.nb16 {
        // SAFETY: b < nb16, inside the row's `s` and per-block `da` areas.
        unsafe {
            dst.add(g.a_db).cast::<f32>().add(b).write(0.0);
            if k.min {
                dst.add(g.a_s).cast::<f32>().add(b).write(0.0);
            }
        }
    }
}

/// A 32-byte scale pattern broadcast to both halves of a zmm.
///
/// # Safety
/// `p` is valid for reading 32 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast32(p: *const u8) -> __m512 {
    // SAFETY: the caller's contract.
    _mm512_castpd_ps(_mm512_broadcast_f64x4(unsafe { _mm256_loadu_pd(p.cast()) }))
}

/// `[Σ a0, Σ a1, Σ a2, Σ a3]`, each by the same tree (lanes `i` and `i + 2` of each
/// 128-bit lane, then those two sums, then 128-bit lanes 0 + 2 and 1 + 3, then those),
/// so lane 0 of `hsum4(v, 0, 0, 0)` is any group's sum of `v`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn hsum4(a0: __m512, a1: __m512, a2: __m512, a3: __m512) -> __m128 {
    // Per 128-bit lane: [a0 0+2, a1 0+2, a0 1+3, a1 1+3], then the four full lane sums.
    let x = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    let y = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
    let z = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    );
    let h = _mm256_add_ps(
        _mm512_castps512_ps256(z),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z))),
    );
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

/// The AVX-512 tile: `MR` repacked weight rows at `w` × `T` repacked tokens at `a`;
/// writes `(t0 + t, r0 + r)` for `t < T`, `r < rn`.
///
/// # Safety
/// `MR` rows and `T` tokens are repacked there with geometry `g`; those outputs are the
/// caller's to write; the CPU has AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const T: usize, const NZ: bool, const MIN: bool>(
    g: &Geo,
    w: *const u8,
    a: *const u8,
    out: OutMatrix,
    t0: usize,
    r0: usize,
    rn: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; MR];
    for j in 0..g.np {
        let mut wv = [_mm512_setzero_si512(); MR];
        for (r, v) in wv.iter_mut().enumerate() {
            // SAFETY: pair j of row r is repacked.
            *v = unsafe { _mm512_loadu_si512(w.add(r * g.w_stride + PAIR * j).cast()) };
        }
        for t in 0..T {
            // SAFETY: pair j of token t is repacked.
            let (av, da, nz) = unsafe {
                let at = a.add(t * g.a_stride);
                let nz = if NZ {
                    _mm512_zextsi256_si512(_mm256_loadu_si256(at.add(PAIR * j + A_NZ).cast()))
                } else {
                    _mm512_setzero_si512()
                };
                (
                    _mm512_loadu_si512(at.add(PAIR * j).cast()),
                    bcast32(at.add(PAIR * j + A_DA)),
                    nz,
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: pair j of row r is repacked.
                // (A memory operand of the product: the tile's accumulators need the
                // registers.)
                let dw = unsafe { _mm512_loadu_ps(w.add(r * g.w_stride + PAIR * j + W_DW).cast()) };
                let p = _mm512_dpbusd_epi32(nz, wv[r], av);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, da), acc[t]);
            }
        }
    }
    if MIN {
        for c in (0..g.nb16).step_by(16) {
            for t in 0..T {
                // SAFETY: the `s` and `m` areas hold nb16 f32 each.
                let s = unsafe { _mm512_loadu_ps(a.add(t * g.a_stride + g.a_s + 4 * c).cast()) };
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let m = unsafe { _mm512_loadu_ps(w.add(r * g.w_stride + g.w_m + 4 * c).cast()) };
                    acc[t] = _mm512_fmadd_ps(m, s, acc[t]);
                }
            }
        }
    }
    // t indexes the inner dimension of all four rows' accumulators at once.
    #[allow(clippy::needless_range_loop)]
    for t in 0..T {
        let mut v = [0f32; MR];
        // SAFETY: v has room for 4 f32.
        unsafe { _mm_storeu_ps(v.as_mut_ptr(), hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t])) };
        for (r, &x) in v.iter().enumerate().take(rn) {
            // SAFETY: the caller's contract.
            unsafe { out.write(t0 + t, r0 + r, x) };
        }
    }
}

/// Σ of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// The AVX2 tile: `MR256` repacked weight rows at `w` × `T` repacked tokens at `a`;
/// writes `(t0 + t, r0 + r)` for `t < T`, `r < rn`. `SG`: weights are `|w|` with the
/// signed bytes alongside (Q8_0).
///
/// # Safety
/// As [`tile512`], with AVX2 + FMA + F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const T: usize, const NZ: bool, const MIN: bool, const SG: bool>(
    g: &Geo,
    w: *const u8,
    a: *const u8,
    out: OutMatrix,
    t0: usize,
    r0: usize,
    rn: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; MR256];
    for j in 0..g.np {
        let mut wv = [[_mm256_setzero_si256(); 2]; MR256];
        for (r, v) in wv.iter_mut().enumerate() {
            // SAFETY: pair j of row r is repacked.
            unsafe {
                let p = w.add(r * g.w_stride + PAIR * j);
                *v = [_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(32).cast())];
            }
        }
        for t in 0..T {
            // SAFETY: pair j of token t is repacked.
            let (alo, ahi, da) = unsafe {
                let at = a.add(t * g.a_stride);
                (
                    _mm256_loadu_si256(at.add(PAIR * j).cast()),
                    _mm256_loadu_si256(at.add(PAIR * j + 32).cast()),
                    _mm256_loadu_ps(at.add(PAIR * j + A_DA).cast()),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let wr = w.wrapping_add(r * g.w_stride);
                let p = if SG {
                    // SAFETY: the signed bytes of pair j of row r are repacked.
                    let (slo, shi) = unsafe {
                        let sg = wr.add(g.w_sg + 64 * j);
                        (_mm256_loadu_si256(sg.cast()), _mm256_loadu_si256(sg.add(32).cast()))
                    };
                    // |w| ≤ 128 and |a| ≤ 127: the pair sums of vpmaddubsw stay in i16.
                    let lo = _mm256_maddubs_epi16(wv[r][0], _mm256_sign_epi8(alo, slo));
                    let hi = _mm256_maddubs_epi16(wv[r][1], _mm256_sign_epi8(ahi, shi));
                    _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones))
                } else {
                    // Weights ≤ 31: both halves' pair sums fit one i16 together.
                    let lo = _mm256_maddubs_epi16(wv[r][0], alo);
                    let hi = _mm256_maddubs_epi16(wv[r][1], ahi);
                    _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones)
                };
                // SAFETY: pair j of token t and of row r are repacked.
                let (p, dw) = unsafe {
                    let at = a.add(t * g.a_stride);
                    let p = if NZ {
                        _mm256_add_epi32(p, _mm256_loadu_si256(at.add(PAIR * j + A_NZ).cast()))
                    } else {
                        p
                    };
                    (p, _mm256_loadu_ps(wr.add(PAIR * j + W_DW).cast()))
                };
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, da), acc[t]);
            }
        }
    }
    if MIN {
        for c in (0..g.nb16).step_by(8) {
            for t in 0..T {
                // SAFETY: the `s` and `m` areas hold nb16 f32 each.
                let s = unsafe { _mm256_loadu_ps(a.add(t * g.a_stride + g.a_s + 4 * c).cast()) };
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let m = unsafe { _mm256_loadu_ps(w.add(r * g.w_stride + g.w_m + 4 * c).cast()) };
                    acc[t] = _mm256_fmadd_ps(m, s, acc[t]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rn) {
        for (t, &v) in acc.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { out.write(t0 + t, r0 + r, hsum8(v)) };
        }
    }
}

/// Streaming kernels for 4 rows and for 1 row at `n` tokens (1..=STREAM_MAX_TOKENS).
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
                _ => (stream512::<$ty, 4, 4>, stream512::<$ty, 4, 1>),
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

/// Weight types as const generic parameters of [`stream512`].
const Q40: u8 = 0;
const Q41: u8 = 1;
const Q50: u8 = 2;
const Q80: u8 = 3;

/// The pair of weight blocks at `p0`, `p1` as a zmm of unsigned bytes in the repacked
/// order (Q8_0 shifted by 128). Q4_0 and Q4_1 keep their high nibbles in place, so the
/// upper 32 bytes are 16 times the values (see [`stream512`]).
///
/// # Safety
/// Both point at a whole block of type `TY` (or at least 64 readable bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn unpack512<const TY: u8>(p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: every read is inside one of the two blocks.
    unsafe {
        if TY == Q80 {
            // Two whole blocks, then their 16-byte halves interleaved: one shuffle.
            let x = _mm512_castsi256_si512(_mm256_loadu_si256(p0.add(2).cast()));
            let y = _mm512_castsi256_si512(_mm256_loadu_si256(p1.add(2).cast()));
            let v = _mm512_permutex2var_epi64(x, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), y);
            return _mm512_xor_si512(v, _mm512_set1_epi8(-128));
        }
        let qs = match TY {
            Q40 => 2,
            Q41 => 4,
            _ => 6,
        };
        // The 16 packed bytes of block 0 in lanes 0 and 2, those of block 1 in 1 and 3.
        let x = _mm512_broadcast_i32x4(_mm_loadu_si128(p0.add(qs).cast()));
        let x = _mm512_mask_broadcast_i32x4(x, 0xF0F0, _mm_loadu_si128(p1.add(qs).cast()));
        if TY != Q50 {
            return _mm512_and_si512(x, _mm512_setr_epi64(M0F, M0F, M0F, M0F, MF0, MF0, MF0, MF0));
        }
        let x = _mm512_mask_srli_epi16::<4>(x, 0xFFFF_0000, x);
        let v = _mm512_and_si512(x, _mm512_set1_epi8(0x0F));
        // Bit i of qh is the fifth bit of element i: block 0's low 16 bits go to mask bits
        // 0..16 and its high 16 to 32..48, block 1's to 16..32 and 48..64.
        let (h0, h1) = (rd_u32(p0.add(2)) as u64, rd_u32(p1.add(2)) as u64);
        let m = _pdep_u64(h0, 0x0000_FFFF_0000_FFFF) | _pdep_u64(h1, 0xFFFF_0000_FFFF_0000);
        _mm512_mask_add_epi8(v, m, v, _mm512_set1_epi8(0x10))
    }
}

/// Byte masks for the low and the (unshifted) high nibbles.
const M0F: i64 = 0x0F0F_0F0F_0F0F_0F0F;
const MF0: i64 = 0xF0F0_F0F0_F0F0_F0F0u64 as i64;

/// The AVX-512 decode kernel: `R` weight rows at `w`, read straight from their blocks,
/// against `T` repacked tokens at `a`; writes `(t, r0 + r)`. Per 16 blocks and row, one
/// gather fetches the f16 scales (and Q4_1 minimums, kept at `mins` until the pairs
/// are done); with one token the scales are premultiplied by the activation scales
/// there, so a pair costs its unpack plus one permute, `vpdpbusd`, conversion and FMA
/// per token. Q4_0 and Q4_1 leave the high nibbles unshifted (16 times the value, still
/// exact in i32 and f32) and take `d / 16` for those lanes from a second scale table in
/// the same permute; their offset correction sits in lanes 0 and 4, which are
/// low-nibble lanes. Both tricks scale exact values by powers of two, so every FMA
/// adds the same product as in `tile512`.
///
/// # Safety
/// `R` rows of `g.nb` blocks of `TY` at `w`; `T` tokens repacked with geometry `g` at
/// `a`; for Q4_1, `mins` is writable for `R * g.nb16` f32; those outputs are the
/// caller's to write; the CPU has AVX-512 F/BW/VL/VNNI and BMI2 (`pdep` places Q5_0's
/// fifth bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn stream512<const TY: u8, const T: usize, const R: usize>(
    k: &Kind,
    g: &Geo,
    w: *const u8,
    a: *const u8,
    mins: *mut f32,
    out: OutMatrix,
    r0: usize,
) {
    let nib16 = TY == Q40 || TY == Q41;
    let row_bytes = g.nb * k.wb;
    let offs = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(k.wb as i32),
    );
    // Lane i of pair jj (of 16 blocks) belongs to block 2jj + (i / 4) % 2; with `nib16`
    // lanes 8..16 read the second table (index + 16).
    let pattern = if nib16 {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 16, 16, 16, 16, 17, 17, 17, 17)
    } else {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
    };
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b0 in (0..g.nb).step_by(16) {
        let nbc = (g.nb - b0).min(16);
        let mask = ((1u32 << nbc) - 1) as __mmask16;
        let mut dw = [_mm512_setzero_ps(); R];
        let mut dw16 = [_mm512_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: the gathered lanes are the first 4 bytes of blocks b0.. b0 + nbc of
            // row r; masked-off lanes read nothing.
            let ds = unsafe {
                _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    mask,
                    offs,
                    w.add(r * row_bytes + b0 * k.wb).cast(),
                )
            };
            dw[r] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(ds));
            if TY == Q41 {
                let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(ds)));
                // SAFETY: `mins` holds nb16 f32 per row.
                unsafe { _mm512_storeu_ps(mins.add(r * g.nb16 + b0), m) };
            }
            if T == 1 {
                // SAFETY: the per-block `da` area holds nb16 f32.
                dw[r] = _mm512_mul_ps(dw[r], unsafe { _mm512_loadu_ps(a.add(g.a_db + 4 * b0).cast()) });
            }
            if nib16 {
                dw16[r] = _mm512_mul_ps(dw[r], _mm512_set1_ps(1.0 / 16.0));
            }
        }
        let pairs = nbc.div_ceil(2);
        for jj in 0..pairs {
            let j = b0 / 2 + jj;
            let idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(2 * jj as i32));
            let mut av = [_mm512_setzero_si512(); T];
            let mut nz = [_mm512_setzero_si512(); T];
            let mut da = [_mm512_setzero_ps(); T];
            for t in 0..T {
                // SAFETY: pair j of token t is repacked.
                unsafe {
                    let at = a.add(t * g.a_stride);
                    av[t] = _mm512_loadu_si512(at.add(PAIR * j).cast());
                    if TY != Q41 {
                        nz[t] = _mm512_zextsi256_si512(_mm256_loadu_si256(at.add(PAIR * j + A_NZ).cast()));
                    }
                    if T > 1 {
                        da[t] = bcast32(at.add(PAIR * j + A_DA));
                    }
                }
            }
            // The last pair of an odd row has no second block: the zero block stands in.
            let odd = jj + 1 == pairs && nbc % 2 == 1;
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: block 2j is in row r, and so is 2j + 1 unless `odd`.
                let u = unsafe {
                    let p0 = w.add(r * row_bytes + 2 * j * k.wb);
                    if odd {
                        unpack512::<TY>(p0, ZERO_BLOCK.as_ptr())
                    } else {
                        unpack512::<TY>(p0, p0.add(k.wb))
                    }
                };
                let s = if nib16 {
                    _mm512_permutex2var_ps(dw[r], idx, dw16[r])
                } else {
                    _mm512_permutexvar_ps(idx, dw[r])
                };
                for t in 0..T {
                    let sc = if T == 1 { s } else { _mm512_mul_ps(s, da[t]) };
                    let p = _mm512_dpbusd_epi32(nz[t], u, av[t]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[t]);
                }
            }
        }
    }
    if TY == Q41 {
        // The `m · s` terms after the pairs, in the order of `tile512`.
        for b0 in (0..g.nb).step_by(16) {
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: stored above (masked-off blocks as zero, as `tile512` has them).
                let m = unsafe { _mm512_loadu_ps(mins.add(r * g.nb16 + b0)) };
                for (t, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the `s` area holds nb16 f32.
                    let s = unsafe { _mm512_loadu_ps(a.add(t * g.a_stride + g.a_s + 4 * b0).cast()) };
                    *acc = _mm512_fmadd_ps(m, s, *acc);
                }
            }
        }
    }
    // t indexes the inner dimension of every row's accumulators at once.
    #[allow(clippy::needless_range_loop)]
    for t in 0..T {
        let mut v = [0f32; 4];
        // One row takes lane 0 of the same tree (not `_mm512_reduce_add_ps`, which sums
        // in another order): a row's result does not depend on its group.
        let z = _mm512_setzero_ps();
        let row = |r: usize| if r < R { acc[r][t] } else { z };
        // SAFETY: v has room for 4 f32.
        unsafe { _mm_storeu_ps(v.as_mut_ptr(), hsum4(row(0), row(1), row(2), row(3))) };
        for (r, &x) in v.iter().enumerate().take(R) {
            // SAFETY: the caller's contract.
            unsafe { out.write(t, r0 + r, x) };
        }
    }
}
