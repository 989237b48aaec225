// The prefill product of a quantized weight (WTYPE 3..8) and many activation rows: a
// workgroup computes a tile of 64 weight rows × 64 input rows, stepping through the
// columns 128 at a time (four 32-element chunks). Each step the workgroup decodes its
// rows' chunks to signed bytes (decode_chunk) and copies its input rows' chunks into
// workgroup memory, once, and each of the 256 invocations then takes 4 × 4 outputs
// (rows tr + 16i, input rows tc + 16j) with integer dot products of the shared words.
// Workgroup memory holds the four rows (or input rows) an invocation reads together in
// one vec4 (row r in component r / 16 of entry r % 16), so each step's operands are one
// 16-byte load per side rather than four.
// Parameters as matmul.wgsl's, except u7 = tiles of rows.
//
// The 32-element types scale every chunk in f32: `d_w · d_a · s + m · sa`, with s the
// chunk's integer product, m Q4_1's minimum (0 for the others) and sa the activation
// chunk's scaled sum. The K-quants keep integers over a whole 256-element super-block,
// as the CPU's kernels do: Σ sc · s per sub-block scale (Q6_K's two 16-element halves
// have one each) and Q4_K's Σ min · bsum against the chunks' activation sums, then per
// super-block `d_w · d_a · Σ − dmin_w · d_a · Σ_min`. That is an integer multiply-add a
// chunk and output where the chunk's f32 scaling took a conversion and four float
// operations: pp512 of a Llama-8B shape (Q4_K/Q6_K) on an H200 2040 -> 2135 tokens/s.
// (Measured there and dropped: tiles of 128 rows with 8 × 4 outputs an invocation,
// 2040 -> 1705, and fetching the next step's chunks into registers during a step's
// products, no gain.)
// (decode_chunk comes from chunks.wgsl.)
const TILE_ROWS: u32 = 64u;
const TILE_TOKENS: u32 = 64u;
// Chunks per step.
const STEP: u32 = 4u;

// Quant words, entry (chunk · 8 + word) · 16 + row % 16, component row / 16 (rows or
// input rows).
var<workgroup> tw: array<vec4<u32>, 512>;
var<workgroup> ta: array<vec4<u32>, 512>;
// Per chunk · 16 + row % 16 (component row / 16): d, m (Q4_1's minimum, Q4_K's dmin)
// and the two sub-scales (Q4_K: scale and minimum); per chunk · 16 + input row % 16:
// the activation's scale and its scaled sum (Q8_0 / Q8_1) or the chunk's integer sum
// (Q8_K, as bits).
var<workgroup> tw_d: array<vec4<f32>, 64>;
var<workgroup> tw_m: array<vec4<f32>, 64>;
var<workgroup> tw_sc0: array<vec4<i32>, 64>;
var<workgroup> tw_sc1: array<vec4<i32>, 64>;
var<workgroup> ta_d: array<vec4<f32>, 64>;
var<workgroup> ta_s: array<vec4<f32>, 64>;

fn dots(w: u32, a: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(w, a.x), dot4I8Packed(w, a.y), dot4I8Packed(w, a.z), dot4I8Packed(w, a.w));
}

// Decodes chunk c of weight row `row` into the tile (zeros past the rows or columns).
fn load_weight_chunk(row: u32, c: u32, slot: u32, r: u32, nchunks: u32) {
    let i = slot * 16u + r % 16u;
    let j = r / 16u;
    if row >= P.u0 || c >= nchunks {
        for (var k = 0u; k < 8u; k++) {
            tw[(slot * 8u + k) * 16u + r % 16u][j] = 0u;
        }
        tw_d[i][j] = 0.0;
        tw_m[i][j] = 0.0;
        tw_sc0[i][j] = 0;
        tw_sc1[i][j] = 0;
        return;
    }
    decode_chunk(row * P.u5, c);
    for (var k = 0u; k < 8u; k++) {
        tw[(slot * 8u + k) * 16u + r % 16u][j] = wq[k];
    }
    tw_d[i][j] = wd;
    var m = 0.0;
    var sc = vec2<i32>(1, 1);
    switch WTYPE {
        case 4u: {
            m = wm;
        }
        case 7u: {
            // Per super-block: dmin, and the chunk's scale and minimum.
            m = wm;
            sc = wsc;
        }
        case 8u: {
            sc = wsc;
        }
        default: {}
    }
    tw_m[i][j] = m;
    tw_sc0[i][j] = sc.x;
    tw_sc1[i][j] = sc.y;
}

// Copies chunk c of input row t into the tile (zeros past the input rows or columns).
fn load_act_chunk(t: u32, c: u32, slot: u32, r: u32, nchunks: u32) {
    let i = slot * 16u + r % 16u;
    let j = r / 16u;
    if t >= P.u2 || c >= nchunks {
        for (var k = 0u; k < 8u; k++) {
            ta[(slot * 8u + k) * 16u + r % 16u][j] = 0u;
        }
        ta_d[i][j] = 0.0;
        ta_s[i][j] = 0.0;
        return;
    }
    let arow = t * P.u6;
    if WTYPE >= 7u {
        // Q8_K: [qs ×64, d, 0 ×3] per 256; the chunk's sum is counted here.
        let base = arow + (c / 8u) * 68u;
        let qs = base + 8u * (c % 8u);
        var sum = 0;
        for (var k = 0u; k < 8u; k++) {
            let q = A[qs + k];
            ta[(slot * 8u + k) * 16u + r % 16u][j] = q;
            sum += dot4I8Packed(q, 0x01010101u);
        }
        ta_d[i][j] = bitcast<f32>(A[base + 64u]);
        ta_s[i][j] = bitcast<f32>(sum);
    } else {
        // Q8_0 / Q8_1: [qs ×8, d, s, 0, 0] per 32.
        let base = arow + c * 12u;
        for (var k = 0u; k < 8u; k++) {
            ta[(slot * 8u + k) * 16u + r % 16u][j] = A[base + k];
        }
        ta_d[i][j] = bitcast<f32>(A[base + 8u]);
        ta_s[i][j] = bitcast<f32>(A[base + 9u]);
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let row0 = (g % P.u7) * TILE_ROWS;
    let t0 = (g / P.u7) * TILE_TOKENS;
    if t0 >= P.u2 {
        // A group past the end of a folded grid.
        return;
    }
    let nchunks = P.u1 / 32u;
    let tr = lid % 16u;
    let tc = lid / 16u;
    // Loading: four neighbouring invocations take the step's four chunks of one row.
    let ls = lid % STEP;
    let lr = lid / STEP;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // The K-quants' integer sums over the current super-block: Σ sc · s (Q6_K's two
    // scales a chunk) and Q4_K's Σ min · bsum.
    var sum0 = vec4<i32>(0);
    var sum1 = vec4<i32>(0);
    var sum2 = vec4<i32>(0);
    var sum3 = vec4<i32>(0);
    var min0 = vec4<i32>(0);
    var min1 = vec4<i32>(0);
    var min2 = vec4<i32>(0);
    var min3 = vec4<i32>(0);
    for (var c0 = 0u; c0 < nchunks; c0 += STEP) {
        load_weight_chunk(row0 + lr, c0 + ls, ls, lr, nchunks);
        load_act_chunk(t0 + lr, c0 + ls, ls, lr, nchunks);
        workgroupBarrier();
        for (var s = 0u; s < STEP; s++) {
            var lo0 = vec4<i32>(0);
            var lo1 = vec4<i32>(0);
            var lo2 = vec4<i32>(0);
            var lo3 = vec4<i32>(0);
            var hi0 = vec4<i32>(0);
            var hi1 = vec4<i32>(0);
            var hi2 = vec4<i32>(0);
            var hi3 = vec4<i32>(0);
            for (var k = 0u; k < 4u; k++) {
                let w = tw[(s * 8u + k) * 16u + tr];
                let a = ta[(s * 8u + k) * 16u + tc];
                lo0 += dots(w.x, a);
                lo1 += dots(w.y, a);
                lo2 += dots(w.z, a);
                lo3 += dots(w.w, a);
                let w2 = tw[(s * 8u + k + 4u) * 16u + tr];
                let a2 = ta[(s * 8u + k + 4u) * 16u + tc];
                // Only Q6_K scales its halves apart; the others sum them as one.
                if WTYPE == 8u {
                    hi0 += dots(w2.x, a2);
                    hi1 += dots(w2.y, a2);
                    hi2 += dots(w2.z, a2);
                    hi3 += dots(w2.w, a2);
                } else {
                    lo0 += dots(w2.x, a2);
                    lo1 += dots(w2.y, a2);
                    lo2 += dots(w2.z, a2);
                    lo3 += dots(w2.w, a2);
                }
            }
            let da = ta_d[s * 16u + tc];
            let sa = ta_s[s * 16u + tc];
            let pw = s * 16u + tr;
            let wd4 = tw_d[pw];
            let wm4 = tw_m[pw];
            let sc0 = tw_sc0[pw];
            let sc1 = tw_sc1[pw];
            if WTYPE == 8u {
                sum0 += sc0.x * lo0 + sc1.x * hi0;
                sum1 += sc0.y * lo1 + sc1.y * hi1;
                sum2 += sc0.z * lo2 + sc1.z * hi2;
                sum3 += sc0.w * lo3 + sc1.w * hi3;
            } else if WTYPE == 7u {
                let bsum = bitcast<vec4<i32>>(sa);
                sum0 += sc0.x * lo0;
                sum1 += sc0.y * lo1;
                sum2 += sc0.z * lo2;
                sum3 += sc0.w * lo3;
                min0 += sc1.x * bsum;
                min1 += sc1.y * bsum;
                min2 += sc1.z * bsum;
                min3 += sc1.w * bsum;
            } else if WTYPE == 4u {
                // Q4_1: its minimum times the activation chunk's scaled sum.
                acc0 += (wd4.x * da) * vec4<f32>(lo0) + wm4.x * sa;
                acc1 += (wd4.y * da) * vec4<f32>(lo1) + wm4.y * sa;
                acc2 += (wd4.z * da) * vec4<f32>(lo2) + wm4.z * sa;
                acc3 += (wd4.w * da) * vec4<f32>(lo3) + wm4.w * sa;
            } else {
                acc0 += (wd4.x * da) * vec4<f32>(lo0);
                acc1 += (wd4.y * da) * vec4<f32>(lo1);
                acc2 += (wd4.z * da) * vec4<f32>(lo2);
                acc3 += (wd4.w * da) * vec4<f32>(lo3);
            }
        }
        if WTYPE >= 7u && (c0 + STEP) % 8u == 0u {
            // The end of a super-block (the step's chunks all belong to it): its scales
            // once, `d_w · d_a · Σ − dmin_w · d_a · Σ_min`.
            let da = ta_d[tc];
            let wd4 = tw_d[tr];
            let wm4 = tw_m[tr];
            acc0 += (wd4.x * da) * vec4<f32>(sum0) - (wm4.x * da) * vec4<f32>(min0);
            acc1 += (wd4.y * da) * vec4<f32>(sum1) - (wm4.y * da) * vec4<f32>(min1);
            acc2 += (wd4.z * da) * vec4<f32>(sum2) - (wm4.z * da) * vec4<f32>(min2);
            acc3 += (wd4.w * da) * vec4<f32>(sum3) - (wm4.w * da) * vec4<f32>(min3);
            sum0 = vec4<i32>(0);
            sum1 = vec4<i32>(0);
            sum2 = vec4<i32>(0);
            sum3 = vec4<i32>(0);
            min0 = vec4<i32>(0);
            min1 = vec4<i32>(0);
            min2 = vec4<i32>(0);
            min3 = vec4<i32>(0);
        }
        workgroupBarrier();
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + tr + 16u * i;
        if row >= P.u0 {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let t = t0 + tc + 16u * j;
            if t < P.u2 {
                out[t * P.u3 + P.u4 + row] = accs[i][j];
            }
        }
    }
}
