//! Reference dequantization of every GGML block format to f32.
//!
//! Plain scalar code, one function per type, each decoding one block. All multi-byte
//! fields are little-endian; `f16` fields are IEEE half floats. The arithmetic follows
//! ggml's reference dequantizers (scale products in f32, then `scale * q - min`).

use crate::quant::{GgmlType, QK_K};
use half::{bf16, f16};

/// Dequantizes one row: `src` holds exactly `dst.len()` elements of type `ty`.
///
/// # Panics
/// If `dst.len()` is not a whole number of blocks of `ty`, or `src` is not exactly the
/// bytes those blocks take.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let Some(bytes) = ty.row_bytes(n) else {
        panic!(
            "dequantize_row: {n} elements is not a whole number of {ty} blocks of {}",
            ty.block_size()
        );
    };
    assert_eq!(
        src.len(),
        bytes,
        "dequantize_row: {n} elements of {ty} take {bytes} bytes, but src has {}",
        src.len()
    );
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => block_f32,
        GgmlType::F16 => block_f16,
        GgmlType::BF16 => block_bf16,
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q2_K => block_q2_k,
        GgmlType::Q3_K => block_q3_k,
        GgmlType::Q4_K => block_q4_k,
        GgmlType::Q5_K => block_q5_k,
        GgmlType::Q6_K => block_q6_k,
    };
    for (block, out) in src
        .chunks_exact(ty.type_size())
        .zip(dst.chunks_exact_mut(ty.block_size()))
    {
        block_fn(block, out);
    }
}

/// Reads the little-endian f16 at `b[at..at + 2]` as f32.
#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// F32: one element, 4 bytes.
fn block_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

/// F16: one element, 2 bytes (IEEE half).
fn block_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

/// BF16: one element, 2 bytes (the top half of an f32).
fn block_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// Q4_0, 32 elements in 18 bytes: `d: f16`, `qs: [u8; 16]`.
/// Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its high nibble;
/// value = `d * (q - 8)`.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1, 32 elements in 20 bytes: `d: f16`, `m: f16`, `qs: [u8; 16]`.
/// Nibbles as in Q4_0, unsigned; value = `d * q + m`.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0, 32 elements in 22 bytes: `d: f16`, `qh: u32`, `qs: [u8; 16]`.
/// Low 4 bits as in Q4_0; bit `i` of `qh` is the fifth bit of element `i`;
/// value = `d * (q - 16)`.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        let q0 = (qs[j] & 0x0F) | (h0 << 4);
        let q1 = (qs[j] >> 4) | (h1 << 4);
        y[j] = (q0 as i32 - 16) as f32 * d;
        y[j + 16] = (q1 as i32 - 16) as f32 * d;
    }
}

/// Q5_1, 32 elements in 24 bytes: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`.
/// Five-bit values as in Q5_0, unsigned; value = `d * q + m`.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        let q0 = (qs[j] & 0x0F) | (h0 << 4);
        let q1 = (qs[j] >> 4) | (h1 << 4);
        y[j] = q0 as f32 * d + m;
        y[j + 16] = q1 as f32 * d + m;
    }
}

/// Q8_0, 32 elements in 34 bytes: `d: f16`, `qs: [i8; 32]`; value = `d * q`.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (out, &q) in y.iter_mut().zip(&b[2..34]) {
        *out = (q as i8) as f32 * d;
    }
}

/// Q2_K, 256 elements in 84 bytes: `scales: [u8; 16]`, `qs: [u8; 64]`, `d: f16`,
/// `dmin: f16`. Sixteen sub-blocks of 16; byte `scales[i]` holds sub-block `i`'s 4-bit
/// scale (low nibble) and 4-bit min (high nibble). Two halves of 128 elements use 32
/// bytes of `qs` each: element `l + 32 * k` (`l < 32`, `k < 4`) of a half is bits
/// `2k..2k+2` of `qs[l]`, so sub-block `2k + l / 16` of the half;
/// value = `d * scale * q - dmin * min`.
fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs_all = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for half in 0..2 {
        let qs = &qs_all[half * 32..half * 32 + 32];
        for k in 0..4 {
            let shift = 2 * k;
            for part in 0..2 {
                // Sub-block `8 * half + 2 * k + part`: 16 elements from qs[16 * part..].
                let sub = 8 * half + 2 * k + part;
                let dl = d * (scales[sub] & 0x0F) as f32;
                let ml = dmin * (scales[sub] >> 4) as f32;
                let out = &mut y[16 * sub..16 * sub + 16];
                for (o, &q) in out.iter_mut().zip(&qs[16 * part..16 * part + 16]) {
                    *o = dl * ((q >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// The signed 6-bit scale of sub-block `k` (0..16) of a Q3_K super-block, packed into
/// 12 bytes: the low 4 bits are the low nibble of byte `k` (`k < 8`) or the high nibble
/// of byte `k - 8`; the high 2 bits are bits `2 * (k / 4)..` of byte `8 + k % 4`.
/// Stored with a bias of 32.
#[inline]
fn scale_k3(k: usize, s: &[u8]) -> i32 {
    let low = if k < 8 { s[k] & 0x0F } else { s[k - 8] >> 4 };
    let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Q3_K, 256 elements in 110 bytes: `hmask: [u8; 32]`, `qs: [u8; 64]`,
/// `scales: [u8; 12]`, `d: f16`. Sixteen sub-blocks of 16 with signed 6-bit scales
/// (see [`scale_k3`]). The low 2 bits of each value are laid out as in Q2_K; the third
/// bit of element `i` is bit `i / 32` of `hmask[i % 32]`, and a *clear* bit means
/// subtract 4: value = `d * scale * (q_low - (hbit ? 0 : 4))`, so q is in -4..=3.
fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs_all = &b[32..96];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    for half in 0..2 {
        let qs = &qs_all[half * 32..half * 32 + 32];
        for k in 0..4 {
            let shift = 2 * k;
            // Bit of hmask for elements 128 * half + 32 * k + (0..32).
            let hbit = 4 * half + k;
            for part in 0..2 {
                let sub = 8 * half + 2 * k + part;
                let dl = d * scale_k3(sub, scales) as f32;
                let out = &mut y[16 * sub..16 * sub + 16];
                let range = 16 * part..16 * part + 16;
                for (o, (&ql, &hm)) in out.iter_mut().zip(qs[range.clone()].iter().zip(&hmask[range])) {
                    let low = ((ql >> shift) & 3) as i32;
                    let high_set = (hm >> hbit) & 1 == 1;
                    let q = if high_set { low } else { low - 4 };
                    *o = dl * q as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed
/// into 12 bytes: for `j < 4` the low 6 bits of bytes `j` (scale) and `j + 4` (min);
/// for `j >= 4` the low/high nibble of byte `j + 4` gives the low 4 bits of
/// scale/min, and the top 2 bits of bytes `j - 4` (scale) and `j` (min) the high 2.
#[inline]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K, 256 elements in 144 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]`,
/// `qs: [u8; 128]`. Eight sub-blocks of 32, each with a 6-bit scale `sc` and min `m`
/// (see [`scale_min_k4`]); value = `d * sc * q - dmin * m`. Each 32 bytes of `qs`
/// hold two sub-blocks: low nibbles the first, high nibbles the second.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..QK_K / 64 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K, 256 elements in 176 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]`,
/// `qh: [u8; 32]`, `qs: [u8; 128]`. Like Q4_K (same scale packing, same nibble
/// layout), plus a fifth bit: element `i` of sub-block `s` takes bit `s` of
/// `qh[i % 32]`; value = `d * sc * q - dmin * m`.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..QK_K / 64 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        let (s1, s2) = (2 * chunk, 2 * chunk + 1);
        let (sc1, m1) = scale_min_k4(s1, scales);
        let (sc2, m2) = scale_min_k4(s2, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let h1 = ((qh[l] >> s1) & 1) << 4;
            let h2 = ((qh[l] >> s2) & 1) << 4;
            out[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K, 256 elements in 210 bytes: `ql: [u8; 128]`, `qh: [u8; 64]`,
/// `scales: [i8; 16]`, `d: f16`. Two halves of 128 elements, each using 64 bytes of
/// `ql`, 32 of `qh` and 8 scales. In a half, element `l + 32 * k` (`l < 32`, `k < 4`)
/// takes its low 4 bits from nibble `k / 2` of `ql[l + 32 * (k % 2)]`, its high 2 bits
/// from bits `2k..2k+2` of `qh[l]`, and scale `scales[l / 16 + 2 * k]`;
/// value = `d * scale * (q - 32)`.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let scale = sc[is + 2 * k] as i8 as f32;
                out[l + 32 * k] = d * scale * (qk as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn dequant(ty: GgmlType, src: &[u8]) -> Vec<f32> {
        let n = src.len() / ty.type_size() * ty.block_size();
        let mut out = vec![f32::NAN; n];
        dequantize_row(ty, src, &mut out);
        out
    }

    #[test]
    fn float_types() {
        let mut src = Vec::new();
        src.extend_from_slice(&1.5f32.to_le_bytes());
        src.extend_from_slice(&(-0.25f32).to_le_bytes());
        assert_eq!(dequant(GgmlType::F32, &src), [1.5, -0.25]);
        assert_eq!(dequant(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0]), [1.0, -2.0]);
        assert_eq!(dequant(GgmlType::BF16, &[0x80, 0x3F, 0x00, 0xC0]), [1.0, -2.0]);
    }

    #[test]
    fn q8_0_scale_half() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16_bytes(0.5));
        let qs: [i8; 4] = [-128, -1, 1, 127];
        for (i, q) in qs.iter().enumerate() {
            block[2 + i] = *q as u8;
        }
        let y = dequant(GgmlType::Q8_0, &block);
        assert_eq!(&y[..5], &[-64.0, -0.5, 0.5, 63.5, 0.0]);
        assert!(y[4..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q4_0_nibble_order() {
        // Low nibble of qs[0] is element 0, its high nibble element 16; q is offset by 8.
        let mut block = vec![0x88u8; 18];
        block[..2].copy_from_slice(&f16_bytes(2.0));
        block[2] = 0x0F;
        let y = dequant(GgmlType::Q4_0, &block);
        assert_eq!(y[0], 14.0);
        assert_eq!(y[16], -16.0);
        assert!(y.iter().enumerate().all(|(i, &v)| i == 0 || i == 16 || v == 0.0));
    }

    #[test]
    fn q4_1_and_q5_1_add_min() {
        let mut block = vec![0u8; 20];
        block[..2].copy_from_slice(&f16_bytes(0.5));
        block[2..4].copy_from_slice(&f16_bytes(-1.0));
        block[4] = 0xF3;
        let y = dequant(GgmlType::Q4_1, &block);
        assert_eq!((y[0], y[16], y[1]), (0.5, 6.5, -1.0));

        let mut block = vec![0u8; 24];
        block[..2].copy_from_slice(&f16_bytes(1.0));
        block[2..4].copy_from_slice(&f16_bytes(0.25));
        block[4..8].copy_from_slice(&(1u32 << 17).to_le_bytes()); // fifth bit of element 17
        block[9] = 0x20;
        let y = dequant(GgmlType::Q5_1, &block);
        assert_eq!((y[1], y[17]), (0.25, 18.25));
    }

    #[test]
    fn q5_0_high_bits() {
        // qh bit i is the fifth bit of element i; q is offset by 16.
        let mut block = vec![0u8; 22];
        block[..2].copy_from_slice(&f16_bytes(1.0));
        block[2..6].copy_from_slice(&((1u32 << 16) | (1 << 3)).to_le_bytes());
        block[6] = 0x5A;
        let y = dequant(GgmlType::Q5_0, &block);
        assert_eq!(y[0], 10.0 - 16.0);
        assert_eq!(y[16], (5.0 + 16.0) - 16.0);
        assert_eq!(y[3], 0.0);
        assert_eq!(y[1], -16.0);
    }

    #[test]
    fn q2_k_scale_and_min() {
        let mut block = vec![0u8; 84];
        block[0] = 0x21; // sub-block 0: scale 1, min 2
        block[16] = 0b11_10_01_00; // qs[0]: elements 0, 32, 64, 96
        block[80..82].copy_from_slice(&f16_bytes(1.0));
        block[82..84].copy_from_slice(&f16_bytes(0.25));
        block[2] = 0x03; // sub-block 2 (elements 32..48): scale 3, min 0
        let y = dequant(GgmlType::Q2_K, &block);
        assert_eq!(y[0], -0.5);
        assert_eq!(y[15], -0.5);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[32], 3.0);
    }

    #[test]
    fn q3_k_clear_high_bit_subtracts_four() {
        // All-zero quants and scales: each scale is 0 - 32, each hmask bit clear so
        // q = 0 - 4, and every value is d * (-32) * (-4).
        let mut block = vec![0u8; 110];
        block[108..110].copy_from_slice(&f16_bytes(1.0));
        let y = dequant(GgmlType::Q3_K, &block);
        assert!(y.iter().all(|&v| v == 128.0));
        // Sub-block 13's scale: low nibble from byte 5's high half, high 2 bits from
        // bits 6..8 of byte 9. Set it to 33 (signed 1) and element 208's hmask bit.
        block[96 + 5] = 0x10;
        block[96 + 9] = 0x80;
        block[208 % 32] |= 1 << (208 / 32);
        let y = dequant(GgmlType::Q3_K, &block);
        assert_eq!(y[208], 0.0);
        assert_eq!(y[209], -4.0);
        assert_eq!(y[207], 128.0);
    }

    #[test]
    fn q4_k_packed_scales() {
        let mut block = vec![0u8; 144];
        block[..2].copy_from_slice(&f16_bytes(1.0));
        block[2..4].copy_from_slice(&f16_bytes(0.5));
        // Sub-block 5: scale 53 = 0b11_0101, min 42 = 0b10_1010. Low 4 bits in byte 9,
        // high 2 bits in the top of bytes 1 (scale) and 5 (min).
        block[4 + 9] = 0xA5;
        block[4 + 1] = 0xC0;
        block[4 + 5] = 0x80;
        // Sub-block 0: scale 3, min 1 (low 6 bits of bytes 0 and 4).
        block[4] = 3;
        block[4 + 4] = 1;
        block[16..].fill(0x21);
        let y = dequant(GgmlType::Q4_K, &block);
        assert_eq!(y[0], 3.0 * 1.0 - 0.5);
        assert_eq!(y[32], 0.0); // sub-block 1: scale and min are the low bits of bytes 1, 5
        assert_eq!(y[128], 0.0);
        assert_eq!(y[160], 53.0 * 2.0 - 0.5 * 42.0);
    }

    #[test]
    fn q5_k_fifth_bit() {
        let mut block = vec![0u8; 176];
        block[..2].copy_from_slice(&f16_bytes(1.0));
        block[4 + 3] = 1; // sub-block 3: scale 1, min 0
        block[16 + 4] = 1 << 3; // fifth bit of sub-block 3, element 4 of it
        block[48 + 32 + 4] = 0x70; // chunk 1, high nibble: sub-block 3
        let y = dequant(GgmlType::Q5_K, &block);
        assert_eq!(y[96 + 4], 7.0 + 16.0);
        assert_eq!(y[96 + 5], 0.0);
    }

    #[test]
    fn q6_k_signed_scale() {
        let mut block = vec![0u8; 210];
        block[208..210].copy_from_slice(&f16_bytes(1.0));
        block[192] = (-2i8) as u8; // scale of elements 0..16
        block[0] = 0x0F; // low 4 bits of element 0
        block[128] = 0b11; // high 2 bits of element 0
        let y = dequant(GgmlType::Q6_K, &block);
        assert_eq!(y[0], -2.0 * 31.0);
        assert_eq!(y[1], -2.0 * -32.0);
        assert_eq!(y[16], 0.0); // scale 0
    }

    #[test]
    #[should_panic(expected = "take 34 bytes, but src has 33")]
    fn wrong_src_length_panics() {
        dequantize_row(GgmlType::Q8_0, &[0u8; 33], &mut [0.0; 32]);
    }

    #[test]
    #[should_panic(expected = "not a whole number of Q4_K blocks")]
    fn partial_block_panics() {
        dequantize_row(GgmlType::Q4_K, &[0u8; 144], &mut [0.0; 100]);
    }
}
