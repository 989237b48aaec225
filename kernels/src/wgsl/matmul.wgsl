// out[t * u3 + u4 + r] = W[r] · x[t] for the u0 rows of this weight part (u1 columns,
// u5 words a row) and u2 input rows, whose activations A were prepared by quantize.wgsl
// (u6 words a row) in the format llama.cpp pairs with WTYPE:
//   floats: one f32 word per element (already rounded to f16/bf16 for those weights);
//   Q8_0 / Q8_1 (for Q4_0, Q5_0, Q8_0 / Q4_1): 10 words per 32: [qs ×8, d, s];
//   Q8_K (for Q4_K, Q6_K): 65 words per 256: [d, qs ×64].
// Quantized blocks are integer dot products scaled in f32, as in kiln_kernels::qdot.
// A workgroup takes 4 rows (16 lanes each, striding over 32-element chunks) for a tile
// of up to 8 input rows; u7 = number of row groups.
@group(0) @binding(2) var<storage, read> A: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const LANES: u32 = 16u;
const TILE: u32 = 8u;

var<workgroup> red: array<f32, 512>;
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
            let blk = rb + c * 9u;
            for (var k = 0u; k < 8u; k++) {
                wq[k] = W[blk + k];
            }
            wd = wf16(W[blk + 8u], false);
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
            let blk = rb + (c / 8u) * 53u;
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

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let row = (g % P.u7) * 4u + lid / LANES;
    let lane = lid % LANES;
    let t0 = (g / P.u7) * TILE;
    if t0 >= P.u2 {
        // A group past the end of a folded grid.
        return;
    }
    let nt = min(TILE, P.u2 - t0);
    let cols = P.u1;
    var acc: array<f32, 8>;
    if row < P.u0 {
        let rb = row * P.u5;
        let nchunks = (cols + 31u) / 32u;
        for (var c = lane; c < nchunks; c += LANES) {
            if WTYPE <= 2u {
                let end = min(cols, 32u * c + 32u);
                for (var e = 32u * c; e < end; e++) {
                    let w = dequant(rb, e);
                    for (var t = 0u; t < nt; t++) {
                        acc[t] = fma(w, bitcast<f32>(A[(t0 + t) * P.u6 + e]), acc[t]);
                    }
                }
            } else {
                decode_chunk(rb, c);
                for (var t = 0u; t < nt; t++) {
                    let arow = (t0 + t) * P.u6;
                    if WTYPE >= 7u {
                        let base = arow + (c / 8u) * 65u;
                        acc[t] += chunk_dot(base + 1u + 8u * (c % 8u), bitcast<f32>(A[base]), 0.0);
                    } else {
                        let base = arow + c * 10u;
                        acc[t] += chunk_dot(base, bitcast<f32>(A[base + 8u]), bitcast<f32>(A[base + 9u]));
                    }
                }
            }
        }
    }
    for (var t = 0u; t < TILE; t++) {
        red[lid * TILE + t] = acc[t];
    }
    workgroupBarrier();
    if lane < nt && row < P.u0 {
        let r0 = (lid / LANES) * LANES;
        var s = 0.0;
        for (var l = 0u; l < LANES; l++) {
            s += red[(r0 + l) * TILE + lane];
        }
        out[(t0 + lane) * P.u3 + P.u4 + row] = s;
    }
}
