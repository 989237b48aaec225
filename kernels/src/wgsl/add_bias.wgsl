// x_p[i] += bias_p[i % cols_p] for up to three (x, bias) pairs p at once (a projection's
// q, k and v biases): lens u0, u2, u4 (rows × cols) and cols u1, u3, u5. One invocation
// per element of the three in turn.
@group(0) @binding(1) var<storage, read_write> x0: array<f32>;
@group(0) @binding(2) var<storage, read_write> x1: array<f32>;
@group(0) @binding(3) var<storage, read_write> x2: array<f32>;
@group(0) @binding(4) var<storage, read> b0: array<f32>;
@group(0) @binding(5) var<storage, read> b1: array<f32>;
@group(0) @binding(6) var<storage, read> b2: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var i = flat_group(wid, nwg) * 256u + lid;
    if i < P.u0 {
        x0[i] = x0[i] + b0[i % P.u1];
        return;
    }
    i -= P.u0;
    if i < P.u2 {
        x1[i] = x1[i] + b1[i % P.u3];
        return;
    }
    i -= P.u2;
    if i < P.u4 {
        x2[i] = x2[i] + b2[i % P.u5];
    }
}
