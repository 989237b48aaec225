// Causal attention for short calls, as the CPU backend's f16-accumulator kernel (and
// llama.cpp's CPU flash attention for a few queries) computes it, operation for
// operation, so that the GPU's decode steps give the CPU's bits: a chaotic model (random
// weights over 32 layers) otherwise amplifies the f16 rounding noise of attention until
// greedy tokens differ. Per (query row, head): the query rounded to f16; for each key in
// order, the score summed in ggml's AVX-512 order (four 16-lane FMA chains per 64
// values, `(a0 + a2) + (a1 + a3)`, then GCC's reduction of 16 lanes), times the scale;
// an online softmax with a correctly rounded `exp` (as glibc's `expf`) and
// `S = fma(S, rescale, weight)`; the weighted values accumulated with every update
// rounded to f16; at the end the accumulator times 1 / S.
// One workgroup per (row, head), keys in tiles of 64. Few workgroups run at once in a
// decode step, so the kernel is bound by memory latency, and each phase issues its loads
// in batches, without arrays in registers (which drivers may place in memory):
// - scores: lane (slot, L) holds, for eight keys at a time, chains L / 4 of CPU lanes
//   4 (L % 4) .. + 4 as a vec4 (a 16-byte load per 64 values); lane r then reduces key r's
//   16 vec4s in the CPU's order;
// - lane j finds key j's running max before it (a max-scan), then its rescale and
//   weight, so no lane waits on another's exp;
// - the sum and the accumulators (lane d holds dimensions 4d .. 4d + 4) take the keys in
//   order, eight keys' values loaded before their updates.
// Fields as attention.wgsl; u3 is 64, 128 or 256.
// AFMT 3 or 4 (Q8_0 or Q8_1, the same words: see quantize.wgsl) also leaves each output
// row in that format in A, u8 words a row, with quantize.wgsl's operations on the same
// floats, for the product that reads the rows next: one dispatch fewer a layer. A
// block's 32 values lie within a head, held by lanes 8j .. 8j + 8 (block j). AFMT 0
// leaves A alone.
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> keys: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> values: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> arena: array<u32>;
@group(0) @binding(6) var<storage, read_write> A: array<u32>;

override AFMT: u32 = 0u;

const TILE: u32 = 64u;

var<workgroup> qv: array<vec4<f32>, 64>;
var<workgroup> scan: array<f32, 64>;
var<workgroup> rescales: array<f32, 64>;
var<workgroup> weights: array<f32, 64>;
var<workgroup> rows: array<u32, 64>;
// Each lane's sum of its four quants (AFMT != 0).
var<workgroup> quant_sums: array<i32, 64>;
// One round's 32 keys × 16 lanes' chain sums (see the header).
var<workgroup> chain_sums: array<vec4<f32>, 512>;
// EXP2_HI and EXP2_LO, read once per workgroup (a constant array indexed at run time
// may be copied into each invocation's memory at every call).
var<workgroup> exp2_table: array<vec2<f32>, 64>;

// 2^(j/64) rounded to f32 (HI), and what that rounding left, rounded to f32 (LO).
const EXP2_HI = array<u32, 64>(
    0x3f800000u, 0x3f8164d2u, 0x3f82cd87u, 0x3f843a29u, 0x3f85aac3u, 0x3f871f62u, 0x3f88980fu, 0x3f8a14d5u,
    0x3f8b95c2u, 0x3f8d1adfu, 0x3f8ea43au, 0x3f9031dcu, 0x3f91c3d3u, 0x3f935a2bu, 0x3f94f4f0u, 0x3f96942du,
    0x3f9837f0u, 0x3f99e046u, 0x3f9b8d3au, 0x3f9d3edau, 0x3f9ef532u, 0x3fa0b051u, 0x3fa27043u, 0x3fa43516u,
    0x3fa5fed7u, 0x3fa7cd94u, 0x3fa9a15bu, 0x3fab7a3au, 0x3fad583fu, 0x3faf3b79u, 0x3fb123f6u, 0x3fb311c4u,
    0x3fb504f3u, 0x3fb6fd92u, 0x3fb8fbafu, 0x3fbaff5bu, 0x3fbd08a4u, 0x3fbf179au, 0x3fc12c4du, 0x3fc346cdu,
    0x3fc5672au, 0x3fc78d75u, 0x3fc9b9beu, 0x3fcbec15u, 0x3fce248cu, 0x3fd06334u, 0x3fd2a81eu, 0x3fd4f35bu,
    0x3fd744fdu, 0x3fd99d16u, 0x3fdbfbb8u, 0x3fde60f5u, 0x3fe0ccdfu, 0x3fe33f89u, 0x3fe5b907u, 0x3fe8396au,
    0x3feac0c7u, 0x3fed4f30u, 0x3fefe4bau, 0x3ff28177u, 0x3ff5257du, 0x3ff7d0dfu, 0x3ffa83b3u, 0x3ffd3e0cu,
);
const EXP2_LO = array<u32, 64>(
    0x00000000u, 0xb1c43fd0u, 0xb34ea7a9u, 0xb2f14c87u, 0x334f9891u, 0xb352c2e6u, 0xb37eda4bu, 0x336a92deu,
    0xb260aba1u, 0x3336fcb7u, 0xb3697465u, 0x330628cdu, 0x33675624u, 0x32bc4f9cu, 0xb32e0212u, 0x32dc8061u,
    0x33231b71u, 0xb359be90u, 0xb30c5563u, 0xb331a601u, 0x33412342u, 0x31fb9715u, 0x30c3125au, 0xb323ec33u,
    0xb32c9d5eu, 0xb3162d36u, 0xb3162b08u, 0xb314ad82u, 0xb22deaf6u, 0xb3252debu, 0xb37c5aa8u, 0x32154889u,
    0x32cfe77au, 0xb266b974u, 0x330ec5f7u, 0xb31bd983u, 0xb3414fe8u, 0xb3130b1au, 0xb2d6663eu, 0xb2976da2u,
    0x320aa837u, 0xb2dd5119u, 0xb37323a2u, 0xb006c6c2u, 0x3228fc24u, 0xb2944353u, 0xb35c1daau, 0xb3286024u,
    0xb2d4a58au, 0xb2f61d41u, 0xb3504a1cu, 0xb37b43e3u, 0xb21eab59u, 0x33657d15u, 0xb2441be6u, 0x33207898u,
    0xb24116deu, 0x3276cca1u, 0xb348464au, 0x32f167ffu, 0x32292436u, 0x336615a2u, 0xb2923758u, 0x31cf486cu,
);

// exp(x) for x <= 0, rounded as glibc's `expf` rounds it in all but ~0.2% of inputs
// (then 1 ulp apart): WGSL's `exp` may be off by several ulp, which on NVIDIA moved f16
// accumulators across rounding ties. x = (64 e + j) ln2/64 + r with |r| <= ln2/128;
// ln2/64 is split into 710/65536 (9 significant bits, so k times it is exact for
// |k| < 2^15 without an fma) and the rest; exp(r) - 1 is a degree-4 polynomial
// (error below 2^-40), and 2^(j/64) (1 + p) keeps the table's low part (about 2^-31
// relative before the last rounding). Below -104 the result is 0, as expf's.
fn exp_rn(x: f32) -> f32 {
    if x < -104.0 {
        return 0.0;
    }
    let k = round(x * 92.33248261689366);
    let r0 = x - k * 0.010833740234375;
    let r = r0 + k * 3.3155381258549027e-06;
    let p = r + (r * r) * (0.5 + r * (0.16666667 + r * 0.041666668));
    let ki = i32(k);
    let t = exp2_table[u32(ki & 63)];
    let y = t.x + (t.x * p + t.y);
    return ldexp(y, ki >> 6u);
}

// x rounded to f16 precision (to nearest, ties to even), kept as f32: where every lane is
// in f16's normal range the rounding of the low 13 significand bits, else `round_f16`.
fn round_f16_4(x: vec4<f32>) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(x);
    let e = (b >> vec4<u32>(23u)) & vec4<u32>(0xffu);
    if all(e >= vec4<u32>(113u)) && all(e <= vec4<u32>(141u)) {
        return bitcast<vec4<f32>>((b + vec4<u32>(0xfffu) + ((b >> vec4<u32>(13u)) & vec4<u32>(1u))) & vec4<u32>(0xffffe000u));
    }
    return vec4<f32>(round_f16(x.x), round_f16(x.y), round_f16(x.z), round_f16(x.w));
}

// An accumulator after one key: rescaled where the key set a new max, then the key's
// weighted values added; each step rounded to f16.
fn update(a: vec4<f32>, value: vec4<f32>, j: u32) -> vec4<f32> {
    let rescale = rescales[j];
    var r = a;
    // A rescale of 1 leaves an f16 accumulator as it is.
    if rescale != 1.0 {
        r = round_f16_4(a * rescale);
    }
    return round_f16_4(fma(value, vec4<f32>(weights[j]), r));
}

// Chain sum `a` after key j's (of n in the tile) vec4 o of the query q4.
fn chain_step(a: vec4<f32>, j: u32, n: u32, o: u32, q4: vec4<f32>) -> vec4<f32> {
    if j < n {
        return fma(keys[rows[j] + o], q4, a);
    }
    return a;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let item = g / P.u1;
    let h = g % P.u1;
    if item >= P.u0 {
        return;
    }
    let seq = load_item(item, lid);
    let row = seq.x;
    let pos = seq.y;
    let page0 = seq.z;
    let hd = P.u3;
    let hd4 = hd / 4u;
    let ps = P.u4;
    // In vec4s: a cache row's stride and this head's offset in it.
    let kv_stride4 = P.u2 * hd4;
    let kv_off4 = (h / (P.u1 / P.u2)) * hd4;
    let qbase = (row * P.u1 + h) * hd;
    if lid < hd4 {
        let at = qbase + 4u * lid;
        qv[lid] = vec4<f32>(round_f16(q[at]), round_f16(q[at + 1u]), round_f16(q[at + 2u]), round_f16(q[at + 3u]));
    }
    exp2_table[lid] = vec2<f32>(bitcast<f32>(EXP2_HI[lid]), bitcast<f32>(EXP2_LO[lid]));
    let first = first_key(pos);
    workgroupBarrier();
    // Scores: this lane's vec4 column within each 64-value chunk, and its key slot.
    let column = lid % 16u;
    let slot = lid / 16u;
    let chunks = hd / 64u;
    // The running max (the CPU starts from -inf; no score reaches -3e38, and
    // exp_rn(-3e38 - s) is 0 as exp(-inf) is).
    var m = -3.0e38;
    var sum = 0.0;
    var acc = vec4<f32>(0.0);
    for (var k0 = first; k0 <= pos; k0 += TILE) {
        workgroupBarrier();
        let n = min(TILE, pos + 1u - k0);
        if lid < n {
            let key = k0 + lid;
            rows[lid] = (arena[P.u7 + page0 + key / ps] * ps + key % ps) * kv_stride4 + kv_off4;
        }
        workgroupBarrier();
        var s = -3.0e38;
        for (var kr = 0u; kr < n; kr += 32u) {
            // Keys kr + slot + 4e for e < 8, all their loads before their sums.
            let j0 = kr + slot;
            var a0 = vec4<f32>(0.0);
            var a1 = vec4<f32>(0.0);
            var a2 = vec4<f32>(0.0);
            var a3 = vec4<f32>(0.0);
            var a4 = vec4<f32>(0.0);
            var a5 = vec4<f32>(0.0);
            var a6 = vec4<f32>(0.0);
            var a7 = vec4<f32>(0.0);
            for (var c = 0u; c < chunks; c++) {
                let o = 16u * c + column;
                let q4 = qv[o];
                a0 = chain_step(a0, j0, n, o, q4);
                a1 = chain_step(a1, j0 + 4u, n, o, q4);
                a2 = chain_step(a2, j0 + 8u, n, o, q4);
                a3 = chain_step(a3, j0 + 12u, n, o, q4);
                a4 = chain_step(a4, j0 + 16u, n, o, q4);
                a5 = chain_step(a5, j0 + 20u, n, o, q4);
                a6 = chain_step(a6, j0 + 24u, n, o, q4);
                a7 = chain_step(a7, j0 + 28u, n, o, q4);
            }
            chain_sums[16u * slot + column] = a0;
            chain_sums[16u * (slot + 4u) + column] = a1;
            chain_sums[16u * (slot + 8u) + column] = a2;
            chain_sums[16u * (slot + 12u) + column] = a3;
            chain_sums[16u * (slot + 16u) + column] = a4;
            chain_sums[16u * (slot + 20u) + column] = a5;
            chain_sums[16u * (slot + 24u) + column] = a6;
            chain_sums[16u * (slot + 28u) + column] = a7;
            workgroupBarrier();
            // Key kr + r's chains: vec4 4e + g holds chain e of CPU lanes 4g .. 4g + 4.
            let r = lid - kr;
            if lid >= kr && r < 32u && lid < n {
                let c = 16u * r;
                let x0 = (chain_sums[c] + chain_sums[c + 8u]) + (chain_sums[c + 4u] + chain_sums[c + 12u]);
                let x1 = (chain_sums[c + 1u] + chain_sums[c + 9u]) + (chain_sums[c + 5u] + chain_sums[c + 13u]);
                let x2 = (chain_sums[c + 2u] + chain_sums[c + 10u]) + (chain_sums[c + 6u] + chain_sums[c + 14u]);
                let x3 = (chain_sums[c + 3u] + chain_sums[c + 11u]) + (chain_sums[c + 7u] + chain_sums[c + 15u]);
                // GCC's reduction: halves (lanes i + 8 and i), quarters, then pairs.
                let quarters = (x3 + x1) + (x2 + x0);
                s = ((quarters.x + quarters.z) + (quarters.y + quarters.w)) * P.f0;
            }
            workgroupBarrier();
        }
        // The running max after each key: an inclusive max-scan of the tile's scores.
        var running = max(m, s);
        for (var step = 1u; step < TILE; step *= 2u) {
            scan[lid] = running;
            workgroupBarrier();
            if lid >= step {
                running = max(running, scan[lid - step]);
            }
            workgroupBarrier();
        }
        scan[lid] = running;
        workgroupBarrier();
        if lid < n {
            var before = m;
            if lid > 0u {
                before = scan[lid - 1u];
            }
            if s > before {
                rescales[lid] = exp_rn(before - s);
                weights[lid] = 1.0;
            } else {
                rescales[lid] = 1.0;
                weights[lid] = exp_rn(s - before);
            }
        }
        m = scan[n - 1u];
        workgroupBarrier();
        // Keys in order, eight keys' values loaded before their updates.
        if lid < hd4 {
            var j = 0u;
            for (; j + 8u <= n; j += 8u) {
                let v0 = values[rows[j] + lid];
                let v1 = values[rows[j + 1u] + lid];
                let v2 = values[rows[j + 2u] + lid];
                let v3 = values[rows[j + 3u] + lid];
                let v4 = values[rows[j + 4u] + lid];
                let v5 = values[rows[j + 5u] + lid];
                let v6 = values[rows[j + 6u] + lid];
                let v7 = values[rows[j + 7u] + lid];
                acc = update(acc, v0, j);
                acc = update(acc, v1, j + 1u);
                acc = update(acc, v2, j + 2u);
                acc = update(acc, v3, j + 3u);
                acc = update(acc, v4, j + 4u);
                acc = update(acc, v5, j + 5u);
                acc = update(acc, v6, j + 6u);
                acc = update(acc, v7, j + 7u);
            }
            for (; j < n; j++) {
                acc = update(acc, values[rows[j] + lid], j);
            }
        }
        for (var t = 0u; t < n; t++) {
            sum = fma(sum, rescales[t], weights[t]);
        }
    }
    var inv = 0.0;
    if sum != 0.0 {
        inv = div_rn(1.0, sum);
    }
    // (Lanes past the head hold zeros.)
    let o = acc * inv;
    if lid < hd4 {
        let at = (row * P.u1 + h) * hd + 4u * lid;
        out[at] = o.x;
        out[at + 1u] = o.y;
        out[at + 2u] = o.z;
        out[at + 3u] = o.w;
    }
    if AFMT != 0u {
        quantize_output(o, row, h, hd, lid);
    }
}

// This head's output `o` (four values a lane) as Q8_0 blocks of row `row` in A. The
// scores' `scan` holds each lane's largest magnitude (no lane reads it any more).
fn quantize_output(o: vec4<f32>, row: u32, h: u32, hd: u32, lid: u32) {
    scan[lid] = max(max(abs(o.x), abs(o.y)), max(abs(o.z), abs(o.w)));
    workgroupBarrier();
    let lead = lid - lid % 8u;
    var amax = scan[lead];
    for (var k = 1u; k < 8u; k++) {
        amax = max(amax, scan[lead + k]);
    }
    let d = div_rn(amax, 127.0);
    let id = select(0.0, div_rn(127.0, amax), amax != 0.0);
    let quants = vec4<i32>(round(o * id));
    quant_sums[lid] = quants.x + quants.y + quants.z + quants.w;
    workgroupBarrier();
    if lid < hd / 4u {
        let dst = row * P.u8 + 12u * ((h * hd) / 32u + lid / 8u);
        A[dst + lid % 8u] = pack4(quants);
        if lid == lead {
            var sum = 0;
            for (var k = 0u; k < 8u; k++) {
                sum += quant_sums[lid + k];
            }
            A[dst + 8u] = bitcast<u32>(round_f16(d));
            A[dst + 9u] = bitcast<u32>(round_f16(d * f32(sum)));
            A[dst + 10u] = 0u;
            A[dst + 11u] = 0u;
        }
    }
}
