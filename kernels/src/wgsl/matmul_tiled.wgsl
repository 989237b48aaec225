// The prefill product of a quantized weight (WTYPE 3..8) and many activation rows: a
// workgroup computes a tile of 64 weight rows × 64 input rows, stepping through the
// columns 128 at a time (four 32-element chunks). Each step the workgroup decodes its
// rows' chunks to signed bytes (decode_chunk) and copies its input rows' chunks into
// workgroup memory, once, and each of the 256 invocations then takes 4 × 4 outputs
// (rows tr + 16i, input rows tc + 16j) with integer dot products of the shared words.
// Parameters as matmul.wgsl's, except u7 = tiles of rows.
//
// Every weight chunk is reduced to the same form: `d · (sc0 · s0 + sc1 · s1) + m · sa`,
// with s0, s1 the integer products of its two 16-element halves, sc0/sc1 integer
// sub-scales (Q6_K's per-16 scales, Q4_K's scale, 1 elsewhere), d its f32 scale times
// the activation's, and m its f32 minimum term (Q4_1's m, Q4_K's −dmin·min, 0 elsewhere)
// times the activation chunk's scaled sum sa.
// (decode_chunk comes from chunks.wgsl.)
const TILE_ROWS: u32 = 64u;
const TILE_TOKENS: u32 = 64u;
// Chunks per step.
const STEP: u32 = 4u;

// Quant words, index (chunk · 8 + word) · 64 + row (or input row): the 16 invocations
// that share an input row read 16 consecutive words.
var<workgroup> tw: array<u32, 2048>;
var<workgroup> ta: array<u32, 2048>;
// Per (chunk · 64 + row): d, m and the two sub-scales; per (chunk · 64 + input row):
// the activation's scale and scaled sum.
var<workgroup> tw_d: array<f32, 256>;
var<workgroup> tw_m: array<f32, 256>;
var<workgroup> tw_sc: array<vec2<i32>, 256>;
var<workgroup> ta_d: array<f32, 256>;
var<workgroup> ta_s: array<f32, 256>;

fn dots(w: u32, a: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(w, a.x), dot4I8Packed(w, a.y), dot4I8Packed(w, a.z), dot4I8Packed(w, a.w));
}

// Decodes chunk c of weight row `row` into the tile (zeros past the rows or columns).
fn load_weight_chunk(row: u32, c: u32, slot: u32, r: u32, nchunks: u32) {
    let i = slot * TILE_ROWS + r;
    if row >= P.u0 || c >= nchunks {
        for (var k = 0u; k < 8u; k++) {
            tw[(slot * 8u + k) * TILE_ROWS + r] = 0u;
        }
        tw_d[i] = 0.0;
        tw_m[i] = 0.0;
        tw_sc[i] = vec2<i32>(0, 0);
        return;
    }
    decode_chunk(row * P.u5, c);
    for (var k = 0u; k < 8u; k++) {
        tw[(slot * 8u + k) * TILE_ROWS + r] = wq[k];
    }
    tw_d[i] = wd;
    switch WTYPE {
        case 4u: {
            tw_m[i] = wm;
            tw_sc[i] = vec2<i32>(1, 1);
        }
        case 7u: {
            tw_m[i] = -wm * f32(wsc.y);
            tw_sc[i] = vec2<i32>(wsc.x, wsc.x);
        }
        case 8u: {
            tw_m[i] = 0.0;
            tw_sc[i] = wsc;
        }
        default: {
            tw_m[i] = 0.0;
            tw_sc[i] = vec2<i32>(1, 1);
        }
    }
}

// Copies chunk c of input row t into the tile (zeros past the input rows or columns).
fn load_act_chunk(t: u32, c: u32, slot: u32, r: u32, nchunks: u32) {
    let i = slot * TILE_TOKENS + r;
    if t >= P.u2 || c >= nchunks {
        for (var k = 0u; k < 8u; k++) {
            ta[(slot * 8u + k) * TILE_TOKENS + r] = 0u;
        }
        ta_d[i] = 0.0;
        ta_s[i] = 0.0;
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
            ta[(slot * 8u + k) * TILE_TOKENS + r] = q;
            sum += dot4I8Packed(q, 0x01010101u);
        }
        let d = bitcast<f32>(A[base + 64u]);
        ta_d[i] = d;
        ta_s[i] = d * f32(sum);
    } else {
        // Q8_0 / Q8_1: [qs ×8, d, s, 0, 0] per 32.
        let base = arow + c * 12u;
        for (var k = 0u; k < 8u; k++) {
            ta[(slot * 8u + k) * TILE_TOKENS + r] = A[base + k];
        }
        ta_d[i] = bitcast<f32>(A[base + 8u]);
        ta_s[i] = bitcast<f32>(A[base + 9u]);
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
                let wb = (s * 8u + k) * TILE_ROWS + tr;
                let ab = (s * 8u + k) * TILE_TOKENS + tc;
                let a = vec4<u32>(ta[ab], ta[ab + 16u], ta[ab + 32u], ta[ab + 48u]);
                lo0 += dots(tw[wb], a);
                lo1 += dots(tw[wb + 16u], a);
                lo2 += dots(tw[wb + 32u], a);
                lo3 += dots(tw[wb + 48u], a);
                let wb2 = wb + 4u * TILE_ROWS;
                let ab2 = ab + 4u * TILE_TOKENS;
                let a2 = vec4<u32>(ta[ab2], ta[ab2 + 16u], ta[ab2 + 32u], ta[ab2 + 48u]);
                hi0 += dots(tw[wb2], a2);
                hi1 += dots(tw[wb2 + 16u], a2);
                hi2 += dots(tw[wb2 + 32u], a2);
                hi3 += dots(tw[wb2 + 48u], a2);
            }
            let pa = s * TILE_TOKENS + tc;
            let da = vec4<f32>(ta_d[pa], ta_d[pa + 16u], ta_d[pa + 32u], ta_d[pa + 48u]);
            let sa = vec4<f32>(ta_s[pa], ta_s[pa + 16u], ta_s[pa + 32u], ta_s[pa + 48u]);
            let pw = s * TILE_ROWS + tr;
            var sc = tw_sc[pw];
            acc0 += (tw_d[pw] * da) * vec4<f32>(sc.x * lo0 + sc.y * hi0) + tw_m[pw] * sa;
            sc = tw_sc[pw + 16u];
            acc1 += (tw_d[pw + 16u] * da) * vec4<f32>(sc.x * lo1 + sc.y * hi1) + tw_m[pw + 16u] * sa;
            sc = tw_sc[pw + 32u];
            acc2 += (tw_d[pw + 32u] * da) * vec4<f32>(sc.x * lo2 + sc.y * hi2) + tw_m[pw + 32u] * sa;
            sc = tw_sc[pw + 48u];
            acc3 += (tw_d[pw + 48u] * da) * vec4<f32>(sc.x * lo3 + sc.y * hi3) + tw_m[pw + 48u] * sa;
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
