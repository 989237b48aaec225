// cache[rows[t] * u1 + j] = f16(src[t * u1 + j]) for u0 rows, rows at arena[u2..], for
// keys (u3 >= 1) and values (u3 = 2). One invocation per value.
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read> arena: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let index = flat_group(wid, nwg) * 256u + lid;
    let per = P.u0 * P.u1;
    if index >= per * P.u3 {
        return;
    }
    let i = index % per;
    let t = i / P.u1;
    let j = i % P.u1;
    let at = arena[P.u2 + t] * P.u1 + j;
    if index < per {
        k_cache[at] = round_f16(k[i]);
    } else {
        v_cache[at] = round_f16(v[i]);
    }
}
