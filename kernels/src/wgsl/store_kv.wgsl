// cache[rows[t] * u1 + j] = f16(src[t * u1 + j]) for u0 rows; rows at arena[u2..].
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;
@group(0) @binding(3) var<storage, read> arena: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i >= P.u0 * P.u1 {
        return;
    }
    let t = i / P.u1;
    let j = i % P.u1;
    cache[arena[P.u2 + t] * P.u1 + j] = round_f16(src[i]);
}
