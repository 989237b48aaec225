// Quantized-block helpers shared by matmul.wgsl and the matvec kernels (compiled after
// common.wgsl and weights.wgsl): the activations A (see matmul.wgsl for their formats),
// the output, and one 32-element chunk of a weight row decoded to signed bytes.
@group(0) @binding(2) var<storage, read> A: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// The current chunk's weights as 8 words of 4 signed bytes, and its constants.
var<private> wq: array<u32, 8>;
var<private> wd: f32;
var<private> wm: f32;
var<private> wsc: vec2<i32>;

// Bytes 0..128 of x minus `offset` each, as signed bytes (no carries cross bytes).
fn signed(x: u32, offset: u32) -> u32 {
    return (x + (0x80u - offset) * 0x01010101u) ^ 0x80808080u;
}

fn spread4(b: u32) -> u32 {
    return ((b & 1u) << 4u) | ((b & 2u) << 11u) | ((b & 4u) << 18u) | ((b & 8u) << 25u);
}

// Loads chunk c (elements 32c..32c + 32) of the quantized row at word rb.
fn decode_chunk(rb: u32, c: u32) {
    switch WTYPE {
        case 3u, 4u: {
            let blk = rb + c * 5u;
            let qs = select(blk, blk + 1u, WTYPE == 4u);
            let offset = select(8u, 0u, WTYPE == 4u);
            for (var k = 0u; k < 4u; k++) {
                let w = W[qs + k];
                wq[k] = signed(w & 0x0f0f0f0fu, offset);
                wq[k + 4u] = signed((w >> 4u) & 0x0f0f0f0fu, offset);
            }
            let dw = select(W[blk + 4u], W[blk], WTYPE == 4u);
            wd = wf16(dw, false);
            wm = wf16(dw, true);
        }
        case 5u: {
            let blk = rb + c * 6u;
            let qh = W[blk + 4u];
            for (var k = 0u; k < 4u; k++) {
                let w = W[blk + k];
                wq[k] = signed((w & 0x0f0f0f0fu) | spread4((qh >> (4u * k)) & 0xfu), 16u);
                wq[k + 4u] = signed(((w >> 4u) & 0x0f0f0f0fu) | spread4((qh >> (16u + 4u * k)) & 0xfu), 16u);
            }
            wd = wf16(W[blk + 5u], false);
        }
        case 6u: {
            let blk = rb + (c / 4u) * 36u;
            let i = c % 4u;
            for (var k = 0u; k < 8u; k++) {
                wq[k] = W[blk + 8u * i + k];
            }
            wd = wf16(W[blk + 32u + i / 2u], (i % 2u) == 1u);
        }
        case 7u: {
            let blk = rb + (c / 8u) * 36u;
            let cc = c % 8u;
            let shift = 4u * (cc & 1u);
            let qs = blk + 4u + 8u * (cc / 2u);
            for (var k = 0u; k < 8u; k++) {
                wq[k] = (W[qs + k] >> shift) & 0x0f0f0f0fu;
            }
            wd = wf16(W[blk], false);
            wm = wf16(W[blk], true);
            wsc = scale_min_k4(blk, cc);
        }
        case 8u: {
            let blk = rb + (c / 8u) * 56u;
            let cc = c % 8u;
            let half = cc / 4u;
            let k4 = cc % 4u;
            let ql = blk + 16u * half + 8u * (k4 & 1u);
            let qh = blk + 32u + 8u * half;
            let ns = 4u * (k4 / 2u);
            let hs = 2u * k4;
            for (var k = 0u; k < 8u; k++) {
                let q = ((W[ql + k] >> ns) & 0x0f0f0f0fu) | (((W[qh + k] >> hs) & 0x03030303u) << 4u);
                wq[k] = signed(q, 32u);
            }
            let s = W[blk + 48u + cc / 2u];
            let b0 = 2u * (cc % 2u);
            wsc = vec2<i32>(sbyte(s, b0), sbyte(s, b0 + 1u));
            wd = wf16(W[blk + 52u], false);
        }
        default: {}
    }
}

// The decoded chunk times the activation chunk whose quants start at word ab.
fn chunk_dot(ab: u32, da: f32, sa: f32) -> f32 {
    var s0 = 0;
    var s1 = 0;
    for (var k = 0u; k < 4u; k++) {
        s0 += dot4I8Packed(wq[k], A[ab + k]);
        s1 += dot4I8Packed(wq[k + 4u], A[ab + k + 4u]);
    }
    let s = s0 + s1;
    switch WTYPE {
        case 3u: {
            return (f32(s) * wd) * da;
        }
        case 4u: {
            return fma(wd * da, f32(s), wm * sa);
        }
        case 5u: {
            return (wd * da) * f32(s);
        }
        case 6u: {
            return f32(s) * (wd * da);
        }
        case 7u: {
            // The min term needs the activations' sum (Q8_K's bsums).
            var t = 0;
            for (var k = 0u; k < 8u; k++) {
                t += dot4I8Packed(A[ab + k], 0x01010101u);
            }
            return (wd * da) * f32(wsc.x * s) - (wm * da) * f32(wsc.y * t);
        }
        case 8u: {
            return (wd * da) * f32(wsc.x * s0 + wsc.y * s1);
        }
        default: {
            return 0.0;
        }
    }
}

