// Converts u0 rows of u1 floats of x to the activation format AFMT, u2 words a row
// (see matmul.wgsl), as kiln_kernels::qdot::quantize_activations does:
//   0 F32, 1 F16, 2 BF16 (one rounded f32 word per element), 3 Q8_0, 4 Q8_1, 5 Q8_K.
// Floats: one invocation per element. Blocks: one invocation per element too, a
// workgroup holding 8 blocks of 32 or one of 256, whose maximum magnitude (and, for Q8_K,
// the first element of that magnitude) is found by workgroup atomics on the bits of the
// magnitudes (ordered as unsigned integers for non-negative floats): one barrier each,
// where tree reductions took one per halving (16 for Q8_K).
// u3 = elements (floats) or blocks. u4 = 0 reads x; u4 = 1 or 2 reads act(x) * up, SiLU
// or GELU (see activation.wgsl: the gated feed-forward's output, never stored as floats).
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> A: array<u32>;
@group(0) @binding(3) var<storage, read> up: array<f32>;
@group(0) @binding(4) var<storage, read> gelu_table: array<f32>;

fn input(i: u32) -> f32 {
    if P.u4 == 0u {
        return x[i];
    }
    return activate(x[i], P.u4 - 1u) * up[i];
}

override AFMT: u32;

var<workgroup> block_max: array<atomic<u32>, 8>;
var<workgroup> block_first: atomic<u32>;
var<workgroup> qs: array<i32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let cols = P.u1;
    if AFMT <= 2u {
        let i = g * 256u + lid;
        if i >= P.u3 {
            return;
        }
        let t = i / cols;
        let e = i % cols;
        var v = input(i);
        if AFMT == 1u {
            v = round_f16(v);
        } else if AFMT == 2u {
            v = round_bf16(v);
        }
        A[t * P.u2 + e] = bitcast<u32>(v);
        return;
    }
    let bs = select(32u, 256u, AFMT == 5u);
    if g * (256u / bs) >= P.u3 {
        // A group past the end of a folded grid.
        return;
    }
    let j = lid % bs;
    let b = g * (256u / bs) + lid / bs;
    let valid = b < P.u3;
    let per_row = cols / bs;
    let t = b / per_row;
    let src = t * cols + (b % per_row) * bs;
    var v = 0.0;
    if valid {
        v = input(src + j);
    }
    let slot = lid / bs;
    if j == 0u {
        atomicStore(&block_max[slot], 0u);
        atomicStore(&block_first, bs);
    }
    workgroupBarrier();
    atomicMax(&block_max[slot], bitcast<u32>(abs(v)));
    workgroupBarrier();
    let amax = bitcast<f32>(atomicLoad(&block_max[slot]));
    if AFMT == 5u {
        // The serial scan keeps the first element of the largest magnitude.
        if abs(v) == amax {
            atomicMin(&block_first, j);
        }
        workgroupBarrier();
        let first = atomicLoad(&block_first);
        let dst = t * P.u2 + (b % per_row) * 68u;
        // An all-zero block is all zero words.
        let zero = amax == 0.0;
        var maxv = 1.0;
        if valid && !zero {
            maxv = input(src + first);
        }
        let iscale = div_rn(-127.0, maxv);
        qs[lid] = select(min(127, i32(round(iscale * v))), 0, zero);
        workgroupBarrier();
        if valid && j < 64u {
            let q0 = lid - j + 4u * j;
            var word = 0u;
            for (var k = 0u; k < 4u; k++) {
                word |= (u32(qs[q0 + k]) & 0xffu) << (8u * k);
            }
            A[dst + j] = word;
        }
        if valid && j == 0u {
            A[dst + 64u] = select(bitcast<u32>(div_rn(1.0, iscale)), 0u, zero);
        }
        if valid && j >= 65u && j < 68u {
            A[dst + j] = 0u;
        }
        return;
    }
    let dst = t * P.u2 + (b % per_row) * 12u;
    let d = div_rn(amax, 127.0);
    let id = select(0.0, div_rn(127.0, amax), amax != 0.0);
    qs[lid] = i32(round(v * id));
    workgroupBarrier();
    if valid && j < 8u {
        let q0 = lid - j + 4u * j;
        var word = 0u;
        for (var k = 0u; k < 4u; k++) {
            word |= (u32(qs[q0 + k]) & 0xffu) << (8u * k);
        }
        A[dst + j] = word;
    }
    if valid && j == 0u {
        var sum = 0;
        for (var k = 0u; k < 32u; k++) {
            sum += qs[lid + k];
        }
        A[dst + 8u] = bitcast<u32>(round_f16(d));
        A[dst + 9u] = bitcast<u32>(round_f16(d * f32(sum)));
        A[dst + 10u] = 0u;
        A[dst + 11u] = 0u;
    }
}
