// Q5_0, Q8_0, Q4_K and Q6_K weights (WTYPE 5, 6, 7, 8) times Q8_0 / Q8_K activations for
// a few input rows (NT ≤ 4), summed with subgroup operations: matvec.wgsl's paths with
// 16-byte loads. A Q8_0 group of 4 blocks is 9 vec4s [qs ×8 words] ×4, [d0 | d1 << 16, d2
// | d3 << 16, 0, 0]; a Q8_0 activation block 3 [qs ×8 words], [d, s, 0, 0]. Two Q5_0
// blocks (rows of an even number of them) are 3 vec4s: [qs ×4], [qh, d, qs' ×2], [qs' ×2,
// qh', d']. A Q4_K block is 9 vec4s [d | dmin << 16, scales ×3], [qs ×32 words]; a Q6_K
// block 14 [ql ×32 words], [qh ×16], [scales ×4], [d, 0, 0, 0]; a Q8_K block 17 [qs ×64
// words], [d, 0, 0, 0]. Each subgroup takes whole rows (u7 a workgroup), each lane pairs
// of chunks that share their quant words (Q4_K: 2j, 2j + 1, the low and high nibbles of
// the same 32 bytes; Q6_K: k, k + 2 of a half block; Q5_0: pairs of blocks; Q8_0: single
// blocks). Parameters as matmul.wgsl's, plus a stack of up to three weights of one width
// read in one dispatch (a layer's q, k and v, or gate and up): the u0 rows are W4's below
// u8, W4b's from u8 below u9 and W4c's from u9 on, each weight's written to its own
// output (out, out_b, out_c; stacks take one input row). Unstacked, u8 = u9 = u0. WTYPE 0
// is a stack of weights of several types that share an activation format (Q4_K and Q6_K,
// or Q5_0 and Q8_0): byte i of u10 is weight i's type, and u11 holds the second and third
// weights' words a row (16 bits each; u5 the first's).
@group(0) @binding(1) var<storage, read> W4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> A4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> W4b: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> W4c: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read_write> out_b: array<f32>;
@group(0) @binding(7) var<storage, read_write> out_c: array<f32>;
// Bit 24 of u10: add bias[row] (the stack's rows in order; unstacked, row + u4) to
// each output.
@group(0) @binding(8) var<storage, read> bias: array<f32>;

// Which weight of the stack the current row is in (the same for a whole subgroup).
var<private> stacked: u32;

// Word group i of the current row's weight.
fn wv(i: u32) -> vec4<u32> {
    switch stacked {
        case 1u: {
            return W4b[i];
        }
        case 2u: {
            return W4c[i];
        }
        default: {
            return W4[i];
        }
    }
}

override NT: u32;
override WTYPE: u32;

// Byte j (0..12) of the scale words h.y, h.z, h.w.
fn scale_byte(h: vec4<u32>, j: u32) -> u32 {
    let w = select(select(h.w, h.z, j < 8u), h.y, j < 4u);
    return ubyte(w, j % 4u);
}

// (scale, min) of sub-block j, as weights.wgsl's scale_min_k4.
fn scale_min(h: vec4<u32>, j: u32) -> vec2<i32> {
    if j < 4u {
        return vec2<i32>(i32(scale_byte(h, j) & 63u), i32(scale_byte(h, j + 4u) & 63u));
    }
    let sc = (scale_byte(h, j + 4u) & 0x0fu) | ((scale_byte(h, j - 4u) >> 6u) << 4u);
    let mn = (scale_byte(h, j + 4u) >> 4u) | ((scale_byte(h, j) >> 6u) << 4u);
    return vec2<i32>(i32(sc), i32(mn));
}

// The partial products of pair p (64 elements) of the row at vec4 rb.
fn pair_q4k(rb: u32, p: u32, acc: ptr<function, array<f32, 4>>) {
    let ones = vec4<u32>(0x01010101u);
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let sb = p / 4u;
    let j = p % 4u;
    let blk = rb + sb * 9u;
    let h = wv(blk);
    let q0 = wv(blk + 1u + 2u * j);
    let q1 = wv(blk + 2u + 2u * j);
    let d = f16_bits_to_f32(h.x & 0xffffu);
    let m = f16_bits_to_f32(h.x >> 16u);
    let sm0 = scale_min(h, 2u * j);
    let sm1 = scale_min(h, 2u * j + 1u);
    let lo0 = q0 & m4;
    let lo1 = q1 & m4;
    let hi0 = (q0 >> vec4<u32>(4u)) & m4;
    let hi1 = (q1 >> vec4<u32>(4u)) & m4;
    for (var t = 0u; t < NT; t++) {
        let base = t * (P.u6 / 4u) + sb * 17u;
        let x0 = A4[base + 4u * j];
        let x1 = A4[base + 4u * j + 1u];
        let x2 = A4[base + 4u * j + 2u];
        let x3 = A4[base + 4u * j + 3u];
        let da = bitcast<f32>(A4[base + 16u].x);
        let s0 = dot16(lo0, x0) + dot16(lo1, x1);
        let s1 = dot16(hi0, x2) + dot16(hi1, x3);
        let t0 = dot16(x0, ones) + dot16(x1, ones);
        let t1 = dot16(x2, ones) + dot16(x3, ones);
        (*acc)[t] += (d * da) * f32(sm0.x * s0) - (m * da) * f32(sm0.y * t0);
        (*acc)[t] += (d * da) * f32(sm1.x * s1) - (m * da) * f32(sm1.y * t1);
    }
}

// Block c (32 elements) of a Q8_0 row at vec4 rb.
fn block_q80(rb: u32, c: u32, acc: ptr<function, array<f32, 4>>) {
    let blk = rb + (c / 4u) * 9u;
    let i = c % 4u;
    let q0 = wv(blk + 2u * i);
    let q1 = wv(blk + 2u * i + 1u);
    let dw = wv(blk + 8u)[i / 2u];
    let d = f16_bits_to_f32(select(dw & 0xffffu, dw >> 16u, (i % 2u) == 1u));
    for (var t = 0u; t < NT; t++) {
        let base = t * (P.u6 / 4u) + c * 3u;
        let s = dot16(q0, A4[base]) + dot16(q1, A4[base + 1u]);
        let da = bitcast<f32>(A4[base + 2u].x);
        (*acc)[t] += f32(s) * (d * da);
    }
}

// Bits 4k..4k + 3 of qh as bit 4 of each byte of a word (Q5_0's fifth bits).
fn fifth_bits(qh: u32, k: u32) -> u32 {
    let b = qh >> (4u * k);
    return ((b & 1u) << 4u) | ((b & 2u) << 11u) | ((b & 4u) << 18u) | ((b & 8u) << 25u);
}

// Q5_0 block c of a pair (quants qs, fifth bits qh, scale d) against activation block c.
fn block_q50(qs: vec4<u32>, qh: u32, d: f32, c: u32, acc: ptr<function, array<f32, 4>>) {
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let h0 = vec4<u32>(fifth_bits(qh, 0u), fifth_bits(qh, 1u), fifth_bits(qh, 2u), fifth_bits(qh, 3u));
    let h1 = vec4<u32>(fifth_bits(qh, 4u), fifth_bits(qh, 5u), fifth_bits(qh, 6u), fifth_bits(qh, 7u));
    // 5-bit quants q as signed bytes q - 16: (q + 0x70) ^ 0x80 never carries.
    let q0 = (((qs & m4) | h0) + vec4<u32>(0x70707070u)) ^ vec4<u32>(0x80808080u);
    let q1 = ((((qs >> vec4<u32>(4u)) & m4) | h1) + vec4<u32>(0x70707070u)) ^ vec4<u32>(0x80808080u);
    for (var t = 0u; t < NT; t++) {
        let base = t * (P.u6 / 4u) + c * 3u;
        let s = dot16(q0, A4[base]) + dot16(q1, A4[base + 1u]);
        let da = bitcast<f32>(A4[base + 2u].x);
        (*acc)[t] += f32(s) * (d * da);
    }
}

// Blocks 2p and 2p + 1 of a Q5_0 row at vec4 rb.
fn pair_q50(rb: u32, p: u32, acc: ptr<function, array<f32, 4>>) {
    let v0 = wv(rb + 3u * p);
    let v1 = wv(rb + 3u * p + 1u);
    let v2 = wv(rb + 3u * p + 2u);
    block_q50(v0, v1.x, f16_bits_to_f32(v1.y & 0xffffu), 2u * p, acc);
    block_q50(vec4<u32>(v1.z, v1.w, v2.x, v2.y), v2.z, f16_bits_to_f32(v2.w & 0xffffu), 2u * p + 1u, acc);
}

// 6-bit quants of 16 bytes as signed bytes: low 4 bits from l, high 2 from h >> hs.
fn q6(l: vec4<u32>, h: vec4<u32>, hs: u32) -> vec4<u32> {
    let q = (l & vec4<u32>(0x0f0f0f0fu)) | (((h >> vec4<u32>(hs)) & vec4<u32>(0x03030303u)) << vec4<u32>(4u));
    return (q + vec4<u32>(0x60606060u)) ^ vec4<u32>(0x80808080u);
}

fn pair_q6k(rb: u32, p: u32, acc: ptr<function, array<f32, 4>>) {
    let sb = p / 4u;
    let half = (p % 4u) / 2u;
    let kl = p % 2u;
    let blk = rb + sb * 14u;
    let l0 = wv(blk + 4u * half + 2u * kl);
    let l1 = wv(blk + 4u * half + 2u * kl + 1u);
    let h0 = wv(blk + 8u + 2u * half);
    let h1 = wv(blk + 9u + 2u * half);
    let sc = wv(blk + 12u);
    let d = f16_bits_to_f32(wv(blk + 13u).x & 0xffffu);
    let hs = 2u * kl;
    let qa0 = q6(l0, h0, hs);
    let qa1 = q6(l1, h1, hs);
    let qb0 = q6(l0 >> vec4<u32>(4u), h0, hs + 4u);
    let qb1 = q6(l1 >> vec4<u32>(4u), h1, hs + 4u);
    let ca = 4u * half + kl;
    let cb = ca + 2u;
    let sa = sc[ca / 2u];
    let sbw = sc[cb / 2u];
    let ba = 2u * (ca % 2u);
    let bb = 2u * (cb % 2u);
    let sca = vec2<i32>(sbyte(sa, ba), sbyte(sa, ba + 1u));
    let scb = vec2<i32>(sbyte(sbw, bb), sbyte(sbw, bb + 1u));
    for (var t = 0u; t < NT; t++) {
        let base = t * (P.u6 / 4u) + sb * 17u;
        let da = bitcast<f32>(A4[base + 16u].x);
        let a0 = dot16(qa0, A4[base + 2u * ca]);
        let a1 = dot16(qa1, A4[base + 2u * ca + 1u]);
        let b0 = dot16(qb0, A4[base + 2u * cb]);
        let b1 = dot16(qb1, A4[base + 2u * cb + 1u]);
        (*acc)[t] += (d * da) * f32(sca.x * a0 + sca.y * a1);
        (*acc)[t] += (d * da) * f32(scb.x * b0 + scb.y * b1);
    }
}

fn dot16(w: vec4<u32>, x: vec4<u32>) -> i32 {
    return dot4I8Packed(w.x, x.x) + dot4I8Packed(w.y, x.y) + dot4I8Packed(w.z, x.z) + dot4I8Packed(w.w, x.w);
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) ss: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    let g = flat_group(wid, nwg);
    for (var r = sid; r < P.u7; r += nsg) {
        let row = g * P.u7 + r;
        if row >= P.u0 {
            break;
        }
        stacked = select(select(0u, 1u, row >= P.u8), 2u, row >= P.u9);
        let first_row = select(select(0u, P.u8, row >= P.u8), P.u9, row >= P.u9);
        // A mixed stack (WTYPE 0): each weight's type and row words from u10 and u11.
        var ty = WTYPE;
        var row_words = P.u5;
        if WTYPE == 0u {
            ty = extractBits(P.u10, 8u * stacked, 8u);
            row_words = select(P.u5, extractBits(P.u11, 16u * (stacked - 1u), 16u), stacked > 0u);
        }
        let rb = (row - first_row) * (row_words / 4u);
        // Units a lane takes: Q8_0 blocks of 32; Q5_0 pairs of blocks, Q4_K / Q6_K pairs
        // of chunks (64 elements).
        let units = select(P.u1 / 64u, P.u1 / 32u, ty == 6u);
        var acc: array<f32, 4>;
        for (var p = sl; p < units; p += ss) {
            if ty == 6u {
                block_q80(rb, p, &acc);
            } else if ty == 5u {
                pair_q50(rb, p, &acc);
            } else if ty == 7u {
                pair_q4k(rb, p, &acc);
            } else {
                pair_q6k(rb, p, &acc);
            }
        }
        let biased = extractBits(P.u10, 24u, 1u) == 1u;
        for (var t = 0u; t < NT; t++) {
            var s = subgroupAdd(acc[t]);
            if biased {
                s += bias[P.u4 + row];
            }
            if sl == 0u {
                switch stacked {
                    case 1u: {
                        out_b[row - P.u8] = s;
                    }
                    case 2u: {
                        out_c[row - P.u9] = s;
                    }
                    default: {
                        out[t * P.u3 + P.u4 + row] = s;
                    }
                }
            }
        }
    }
}
