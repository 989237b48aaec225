// The matvec entry point with subgroup operations (the device feature SUBGROUP):
// each subgroup takes whole rows of the u7 a workgroup covers (u7 = 128 / the adapter's
// smallest subgroup size) and sums its lanes with subgroupAdd.
@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) ss: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    let g = flat_group(wid, nwg);
    for (var r = sid; r < P.u7; r += nsg) {
        let row = g * P.u7 + r;
        if row >= P.u0 {
            break;
        }
        let acc = row_partial(row * P.u5, sl, ss);
        for (var t = 0u; t < NT; t++) {
            let s = subgroupAdd(acc[t]);
            if sl == 0u {
                out[t * P.u3 + P.u4 + row] = s;
            }
        }
    }
}
