// RMS norm of u0 rows of u1 floats in place, times weight; eps = f0. One workgroup per row.
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if row >= P.u0 {
        return;
    }
    let cols = P.u1;
    let base = row * cols;
    var s = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        let v = x[base + c];
        s += v * v;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var step = 128u; step > 0u; step = step >> 1u) {
        if lid < step {
            partial[lid] += partial[lid + step];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(partial[0] / f32(cols) + P.f0);
    for (var c = lid; c < cols; c += 256u) {
        x[base + c] = (x[base + c] * inv) * weight[c];
    }
}
