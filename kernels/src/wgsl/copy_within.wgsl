// buf[u2 + i] = buf[u1 + i] for i < u0 (the ranges do not overlap).
@group(0) @binding(1) var<storage, read_write> buf: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i < P.u0 {
        buf[P.u2 + i] = buf[P.u1 + i];
    }
}
