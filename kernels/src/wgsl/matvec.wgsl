// Products for a few input rows (NT ≤ 4, a pipeline constant; u2 = NT), the decode
// path: each weight row is read once by a group of lanes striding over its 32-element
// chunks (Q4_K, Q6_K: pairs of chunks that share their quant words), with the same integer
// dot products and f32 scale math as matmul.wgsl. Parameters as matmul.wgsl's, except
// u7 = rows a workgroup covers. The entry points (matvec_wg.wgsl, matvec_sg.wgsl) sum the
// lanes' partial products.
override NT: u32;

// This lane's partial products of the row at word rb with the NT activation rows.
fn row_partial(rb: u32, lane: u32, stride: u32) -> array<f32, 4> {
    var acc: array<f32, 4>;
    let cols = P.u1;
    let nchunks = (cols + 31u) / 32u;
    if WTYPE <= 2u {
        for (var e = lane; e < cols; e += stride) {
            let w = dequant(rb, e);
            for (var t = 0u; t < NT; t++) {
                acc[t] = fma(w, bitcast<f32>(A[t * P.u6 + e]), acc[t]);
            }
        }
    } else if WTYPE == 7u {
        // Chunks 2j and 2j + 1 of a super-block are the low and high nibbles of the
        // same 32 bytes.
        let npairs = nchunks / 2u;
        for (var p = lane; p < npairs; p += stride) {
            let sb = p / 4u;
            let j = p % 4u;
            let blk = rb + sb * 36u;
            let dw = W[blk];
            let d = wf16(dw, false);
            let m = wf16(dw, true);
            let sm0 = scale_min_k4(blk, 2u * j);
            let sm1 = scale_min_k4(blk, 2u * j + 1u);
            var lo: array<u32, 8>;
            var hi: array<u32, 8>;
            let qs = blk + 4u + 8u * j;
            for (var k = 0u; k < 8u; k++) {
                let w = W[qs + k];
                lo[k] = w & 0x0f0f0f0fu;
                hi[k] = (w >> 4u) & 0x0f0f0f0fu;
            }
            for (var t = 0u; t < NT; t++) {
                let base = t * P.u6 + sb * 68u;
                let da = bitcast<f32>(A[base + 64u]);
                let a0 = base + 16u * j;
                var s0 = 0;
                var s1 = 0;
                var t0 = 0;
                var t1 = 0;
                for (var k = 0u; k < 8u; k++) {
                    let x0 = A[a0 + k];
                    let x1 = A[a0 + 8u + k];
                    s0 += dot4I8Packed(lo[k], x0);
                    s1 += dot4I8Packed(hi[k], x1);
                    t0 += dot4I8Packed(x0, 0x01010101u);
                    t1 += dot4I8Packed(x1, 0x01010101u);
                }
                acc[t] += (d * da) * f32(sm0.x * s0) - (m * da) * f32(sm0.y * t0);
                acc[t] += (d * da) * f32(sm1.x * s1) - (m * da) * f32(sm1.y * t1);
            }
        }
    } else if WTYPE == 8u {
        // Chunks k and k + 2 of a half super-block share their low and high bits' words.
        let npairs = nchunks / 2u;
        for (var p = lane; p < npairs; p += stride) {
            let sb = p / 4u;
            let half = (p % 4u) / 2u;
            let kl = p % 2u;
            let blk = rb + sb * 56u;
            let ql = blk + 16u * half + 8u * kl;
            let qh = blk + 32u + 8u * half;
            let hs = 2u * kl;
            var qa: array<u32, 8>;
            var qb: array<u32, 8>;
            for (var k = 0u; k < 8u; k++) {
                let l = W[ql + k];
                let h = W[qh + k];
                qa[k] = signed((l & 0x0f0f0f0fu) | (((h >> hs) & 0x03030303u) << 4u), 32u);
                qb[k] = signed(((l >> 4u) & 0x0f0f0f0fu) | (((h >> (hs + 4u)) & 0x03030303u) << 4u), 32u);
            }
            let ca = 4u * half + kl;
            let cb = ca + 2u;
            let sa = W[blk + 48u + ca / 2u];
            let sbw = W[blk + 48u + cb / 2u];
            let ba = 2u * (ca % 2u);
            let bb = 2u * (cb % 2u);
            let sca = vec2<i32>(sbyte(sa, ba), sbyte(sa, ba + 1u));
            let scb = vec2<i32>(sbyte(sbw, bb), sbyte(sbw, bb + 1u));
            let d = wf16(W[blk + 52u], false);
            for (var t = 0u; t < NT; t++) {
                let base = t * P.u6 + sb * 68u;
                let da = bitcast<f32>(A[base + 64u]);
                let xa = base + 8u * ca;
                let xb = base + 8u * cb;
                var a0 = 0;
                var a1 = 0;
                var b0 = 0;
                var b1 = 0;
                for (var k = 0u; k < 4u; k++) {
                    a0 += dot4I8Packed(qa[k], A[xa + k]);
                    a1 += dot4I8Packed(qa[k + 4u], A[xa + k + 4u]);
                    b0 += dot4I8Packed(qb[k], A[xb + k]);
                    b1 += dot4I8Packed(qb[k + 4u], A[xb + k + 4u]);
                }
                acc[t] += (d * da) * f32(sca.x * a0 + sca.y * a1);
                acc[t] += (d * da) * f32(scb.x * b0 + scb.y * b1);
            }
        }
    } else {
        for (var c = lane; c < nchunks; c += stride) {
            decode_chunk(rb, c);
            for (var t = 0u; t < NT; t++) {
                let arow = t * P.u6;
                if WTYPE >= 7u {
                    let base = arow + (c / 8u) * 68u;
                    acc[t] += chunk_dot(base + 8u * (c % 8u), bitcast<f32>(A[base + 64u]), 0.0);
                } else {
                    let base = arow + c * 12u;
                    acc[t] += chunk_dot(base, bitcast<f32>(A[base + 8u]), bitcast<f32>(A[base + 9u]));
                }
            }
        }
    }
    return acc;
}
