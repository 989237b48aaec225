// gate[i] = act(gate[i]) * up[i] for i < u0 (see activation.wgsl): u1 = 0 SiLU, 1 GELU.
@group(0) @binding(1) var<storage, read_write> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read> gelu_table: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i >= P.u0 {
        return;
    }
    gate[i] = activate(gate[i], P.u1) * up[i];
}
