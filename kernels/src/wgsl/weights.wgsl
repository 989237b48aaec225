// Weight rows as the GPU backend stores them (u32 words, rows padded to whole words),
// selected by the pipeline constant WTYPE:
//   0 F32 (1 word/element), 1 F16, 2 BF16 (2 elements/word),
//   3 Q4_0: blocks of 5 words [qs ×4, d],        4 Q4_1: 5 words [d | m << 16, qs ×4],
//   5 Q5_0: 6 words [qs ×4, qh, d],
//   6 Q8_0: groups of 4 blocks in 36 words [qs ×8 ×4, d0 | d1 << 16, d2 | d3 << 16, 0, 0]
//     (a row's last group padded with zero blocks),
//   7 Q4_K: GGUF's 144-byte blocks (36 words),   8 Q6_K: GGUF's 210 bytes + 14 padding (56 words).
// f16 fields sit in the low half of their word unless noted.
@group(0) @binding(1) var<storage, read> W: array<u32>;

override WTYPE: u32;

fn wf16(word: u32, high: bool) -> f32 {
    return f16_bits_to_f32(select(word & 0xffffu, word >> 16u, high));
}

// Byte j of a block starting at word `blk`.
fn wbyte(blk: u32, j: u32) -> u32 {
    return ubyte(W[blk + j / 4u], j % 4u);
}

// (scale, min) of sub-block j of a Q4_K block (scales start at word blk + 1).
fn scale_min_k4(blk: u32, j: u32) -> vec2<i32> {
    let s = blk + 1u;
    if j < 4u {
        return vec2<i32>(i32(wbyte(s, j) & 63u), i32(wbyte(s, j + 4u) & 63u));
    }
    let sc = (wbyte(s, j + 4u) & 0x0fu) | ((wbyte(s, j - 4u) >> 6u) << 4u);
    let mn = (wbyte(s, j + 4u) >> 4u) | ((wbyte(s, j) >> 6u) << 4u);
    return vec2<i32>(i32(sc), i32(mn));
}

// Element e of the row starting at word rb, dequantized as kiln_kernels::dequant does.
fn dequant(rb: u32, e: u32) -> f32 {
    switch WTYPE {
        case 0u: {
            return bitcast<f32>(W[rb + e]);
        }
        case 1u: {
            return wf16(W[rb + e / 2u], (e & 1u) == 1u);
        }
        case 2u: {
            let w = W[rb + e / 2u];
            return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (e & 1u) == 1u));
        }
        case 3u: {
            let blk = rb + (e / 32u) * 5u;
            let j = e % 32u;
            let byte = wbyte(blk, j % 16u);
            let q = select(byte & 0x0fu, byte >> 4u, j >= 16u);
            return f32(i32(q) - 8) * wf16(W[blk + 4u], false);
        }
        case 4u: {
            let blk = rb + (e / 32u) * 5u;
            let j = e % 32u;
            let byte = wbyte(blk + 1u, j % 16u);
            let q = select(byte & 0x0fu, byte >> 4u, j >= 16u);
            return f32(q) * wf16(W[blk], false) + wf16(W[blk], true);
        }
        case 5u: {
            let blk = rb + (e / 32u) * 6u;
            let j = e % 32u;
            let byte = wbyte(blk, j % 16u);
            let low = select(byte & 0x0fu, byte >> 4u, j >= 16u);
            let q = low | (((W[blk + 4u] >> j) & 1u) << 4u);
            return f32(i32(q) - 16) * wf16(W[blk + 5u], false);
        }
        case 6u: {
            let blk = rb + (e / 128u) * 36u;
            let i = (e / 32u) % 4u;
            let j = e % 32u;
            return f32(sbyte(W[blk + 8u * i + j / 4u], j % 4u)) * wf16(W[blk + 32u + i / 2u], (i % 2u) == 1u);
        }
        case 7u: {
            let blk = rb + (e / 256u) * 36u;
            let j = e % 256u;
            let sub = j / 32u;
            let sm = scale_min_k4(blk, sub);
            let byte = wbyte(blk + 4u, 32u * (sub / 2u) + j % 32u);
            let q = select(byte & 0x0fu, byte >> 4u, (sub & 1u) == 1u);
            let d1 = wf16(W[blk], false) * f32(sm.x);
            let m1 = wf16(W[blk], true) * f32(sm.y);
            return d1 * f32(q) - m1;
        }
        case 8u: {
            let blk = rb + (e / 256u) * 56u;
            let j = e % 256u;
            let half = j / 128u;
            let k = (j % 128u) / 32u;
            let l = j % 32u;
            let ql = wbyte(blk, 64u * half + 32u * (k & 1u) + l);
            let qh = wbyte(blk, 128u + 32u * half + l);
            let q = ((ql >> (4u * (k / 2u))) & 0x0fu) | (((qh >> (2u * k)) & 3u) << 4u);
            let sc = f32(extractBits(i32(wbyte(blk, 192u + j / 16u)), 0u, 8u));
            return wf16(W[blk + 52u], false) * sc * f32(i32(q) - 32);
        }
        default: {
            return 0.0;
        }
    }
}
