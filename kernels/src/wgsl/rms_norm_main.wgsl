// rms_norm.wgsl's entry point alone: one workgroup a row.
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if row >= P.u0 {
        return;
    }
    norm_row(row, lid);
}
