// The matvec entry point without subgroup operations: 4 rows a workgroup (u7 = 4), 32
// lanes each, summed through workgroup memory.
var<workgroup> red: array<f32, 512>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    if g * 4u >= P.u0 {
        // A group past the end of a folded grid.
        return;
    }
    let row = g * 4u + lid / 32u;
    let lane = lid % 32u;
    var acc: array<f32, 4>;
    if row < P.u0 {
        acc = row_partial(row * P.u5, lane, 32u);
    }
    for (var t = 0u; t < NT; t++) {
        red[t * 128u + lid] = acc[t];
    }
    workgroupBarrier();
    if lane < NT && row < P.u0 {
        let r0 = lid - lane;
        var s = 0.0;
        for (var l = 0u; l < 32u; l++) {
            s += red[lane * 128u + r0 + l];
        }
        out[lane * P.u3 + P.u4 + row] = s;
    }
}
