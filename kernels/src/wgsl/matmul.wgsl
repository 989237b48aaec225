// out[t * u3 + u4 + r] = W[r] · x[t] for the u0 rows of this weight part (u1 columns,
// u5 words a row) and u2 input rows, whose activations A were prepared by quantize.wgsl
// (u6 words a row) in the format llama.cpp pairs with WTYPE:
//   floats: one f32 word per element (already rounded to f16/bf16 for those weights);
//   Q8_0 / Q8_1 (for Q4_0, Q5_0, Q8_0 / Q4_1): 12 words per 32: [qs ×8, d, s, 0, 0];
//   Q8_K (for Q4_K, Q6_K): 68 words per 256: [qs ×64, d, 0 ×3] (16-byte aligned).
// Quantized blocks are integer dot products scaled in f32, as in kiln_kernels::qdot.
// A workgroup takes 4 rows (16 lanes each, striding over 32-element chunks) for a tile
// of up to 8 input rows; u7 = number of row groups.
// (decode_chunk and chunk_dot come from chunks.wgsl.)
const LANES: u32 = 16u;
const TILE: u32 = 8u;

var<workgroup> red: array<f32, 512>;

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
                        let base = arow + (c / 8u) * 68u;
                        acc[t] += chunk_dot(base + 8u * (c % 8u), bitcast<f32>(A[base + 64u]), 0.0);
                    } else {
                        let base = arow + c * 12u;
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
