// rms_norm.wgsl's entry point that also converts each normalized row to the activation
// format AFMT (3 Q8_0, 4 Q8_1, 5 Q8_K) of the product that reads it next, u3 words a row
// in A: the words quantize.wgsl writes, from the same operations on the same stored
// floats, one dispatch fewer per norm. Q8_0 / Q8_1 blocks (32) take eight invocations
// each (four values apiece, the block's maximum and sum shuffled across them), Q8_K
// blocks (256) one subgroup each. (One invocation per Q8_0 block, 28 of the 256 busy
// for a row of 896, made this kernel 37.5 µs in the H200's timestamp profile of a
// Qwen2-0.5B decode step, 30% of its GPU time; eight a block: tg128 377 -> 398 tokens/s.)
// The eight lanes of a block are consecutive invocations, so subgroups of at least 8.
@group(0) @binding(4) var<storage, read_write> A: array<u32>;

override AFMT: u32;

fn normed4(at: u32) -> vec4<f32> {
    return vec4<f32>(y[at], y[at + 1u], y[at + 2u], y[at + 3u]);
}

// Word w (four floats) of the normalized row at y[src] and its block's seven other words,
// held by the lanes w ^ 1, w ^ 2, w ^ 4 of the same subgroup: the block's 8 words of
// quants at A[dst + 12 (w / 8)..], then [d, d * sum of quants] rounded to f16 (as f32
// bits), 0, 0. Every lane calls it (for the shuffles); lanes that hold a word say so.
fn quantize_q80_word(src: u32, dst: u32, w: u32, held: bool) {
    var v = vec4<f32>(0.0);
    if held {
        v = normed4(src + 4u * w);
    }
    var amax = max(max(abs(v.x), abs(v.y)), max(abs(v.z), abs(v.w)));
    amax = max(amax, subgroupShuffleXor(amax, 1u));
    amax = max(amax, subgroupShuffleXor(amax, 2u));
    amax = max(amax, subgroupShuffleXor(amax, 4u));
    let d = div_rn(amax, 127.0);
    let id = select(0.0, div_rn(127.0, amax), amax != 0.0);
    let q = vec4<i32>(round(v * id));
    var sum = q.x + q.y + q.z + q.w;
    sum += subgroupShuffleXor(sum, 1u);
    sum += subgroupShuffleXor(sum, 2u);
    sum += subgroupShuffleXor(sum, 4u);
    if !held {
        return;
    }
    let block = dst + 12u * (w / 8u);
    A[block + w % 8u] = pack4(q);
    if w % 8u == 0u {
        A[block + 8u] = bitcast<u32>(round_f16(d));
        A[block + 9u] = bitcast<u32>(round_f16(d * f32(sum)));
        A[block + 10u] = 0u;
        A[block + 11u] = 0u;
    }
}

// The 256 floats at y[src] by one subgroup, each lane whole words of 4: 64 words of
// quants scaled by -127 over the first value of the largest magnitude, then 1 / scale
// and 3 zero words.
fn quantize_q8k(src: u32, dst: u32, sl: u32, ss: u32) {
    var m = 0.0;
    var first = 256u;
    for (var w = sl; w < 64u; w += ss) {
        let v = abs(normed4(src + 4u * w));
        for (var c = 0u; c < 4u; c++) {
            if v[c] > m {
                m = v[c];
                first = 4u * w + c;
            }
        }
    }
    let amax = subgroupMax(m);
    let at = subgroupMin(select(256u, first, m == amax && first < 256u));
    let zero = amax == 0.0;
    var maxv = 1.0;
    if !zero {
        maxv = y[src + at];
    }
    let iscale = div_rn(-127.0, maxv);
    for (var w = sl; w < 64u; w += ss) {
        let q = min(vec4<i32>(127), vec4<i32>(round(iscale * normed4(src + 4u * w))));
        A[dst + w] = select(pack4(q), 0u, zero);
    }
    if sl == 0u {
        A[dst + 64u] = select(bitcast<u32>(div_rn(1.0, iscale)), 0u, zero);
        A[dst + 65u] = 0u;
        A[dst + 66u] = 0u;
        A[dst + 67u] = 0u;
    }
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) ss: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    let row = flat_group(wid, nwg);
    if row >= P.u0 {
        return;
    }
    norm_row(row, lid);
    // The row's normalized floats, written by this workgroup, are read back below.
    storageBarrier();
    let cols = P.u1;
    if AFMT == 5u {
        for (var b = sid; b < cols / 256u; b += nsg) {
            quantize_q8k(row * cols + 256u * b, row * P.u3 + 68u * b, sl, ss);
        }
    } else {
        // (The bound is the same for the whole workgroup, so every lane shuffles.)
        for (var w0 = 0u; w0 < cols / 4u; w0 += 256u) {
            quantize_q80_word(row * cols, row * P.u3, w0 + lid, w0 + lid < cols / 4u);
        }
    }
}
