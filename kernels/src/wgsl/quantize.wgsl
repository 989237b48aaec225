// Converts u0 rows of u1 floats of x to the activation format AFMT, u2 words a row
// (see matmul.wgsl), as kiln_kernels::qdot::quantize_activations does:
//   0 F32, 1 F16, 2 BF16 (one rounded f32 word per element), 3 Q8_0, 4 Q8_1, 5 Q8_K.
// One invocation per element (floats) or per block; u3 = invocations.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> A: array<u32>;

override AFMT: u32;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i >= P.u3 {
        return;
    }
    let cols = P.u1;
    if AFMT <= 2u {
        let t = i / cols;
        let e = i % cols;
        var v = x[i];
        if AFMT == 1u {
            v = round_f16(v);
        } else if AFMT == 2u {
            v = round_bf16(v);
        }
        A[t * P.u2 + e] = bitcast<u32>(v);
        return;
    }
    let bs = select(32u, 256u, AFMT == 5u);
    let per_row = cols / bs;
    let t = i / per_row;
    let b = i % per_row;
    let src = t * cols + b * bs;
    var amax = 0.0;
    var maxv = 0.0;
    for (var j = 0u; j < bs; j++) {
        let v = x[src + j];
        if abs(v) > amax {
            amax = abs(v);
            maxv = v;
        }
    }
    if AFMT == 5u {
        let dst = t * P.u2 + b * 65u;
        if amax == 0.0 {
            for (var k = 0u; k < 65u; k++) {
                A[dst + k] = 0u;
            }
            return;
        }
        let iscale = -127.0 / maxv;
        for (var k = 0u; k < 64u; k++) {
            var word = 0u;
            for (var j = 0u; j < 4u; j++) {
                let q = min(127, i32(round(iscale * x[src + 4u * k + j])));
                word |= (u32(q) & 0xffu) << (8u * j);
            }
            A[dst + 1u + k] = word;
        }
        A[dst] = bitcast<u32>(1.0 / iscale);
        return;
    }
    let dst = t * P.u2 + b * 10u;
    let d = amax / 127.0;
    let id = select(0.0, 127.0 / amax, amax != 0.0);
    var sum = 0;
    for (var k = 0u; k < 8u; k++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let q = i32(round(x[src + 4u * k + j] * id));
            sum += q;
            word |= (u32(q) & 0xffu) << (8u * j);
        }
        A[dst + k] = word;
    }
    A[dst + 8u] = bitcast<u32>(round_f16(d));
    A[dst + 9u] = bitcast<u32>(round_f16(d * f32(sum)));
}
