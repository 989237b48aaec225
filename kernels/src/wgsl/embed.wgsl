// out[t * u1 + c] = row tokens[t] of the table, for the u0 tokens at arena[u3..] whose
// row lies in this part of the table (rows u4..u4 + u5, each u2 words).
@group(0) @binding(2) var<storage, read> arena: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i >= P.u0 * P.u1 {
        return;
    }
    let t = i / P.u1;
    let c = i % P.u1;
    let token = arena[P.u3 + t];
    if token < P.u4 || token >= P.u4 + P.u5 {
        return;
    }
    out[i] = dequant((token - P.u4) * P.u2, c);
}
