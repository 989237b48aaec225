// out[r] = the index of the largest of row r's u1 floats of x, for u0 rows: the first
// on ties, NaN never (a row without a number gives 0). One workgroup per row.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_value: array<f32, 256>;
var<workgroup> best_index: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if row >= P.u0 {
        return;
    }
    let base = row * P.u1;
    // Each lane visits its indices in increasing order and keeps only strictly larger
    // values, so it holds its first largest.
    var v_best = -3.4028235e38;
    var i_best = 0xffffffffu;
    for (var i = lid; i < P.u1; i += 256u) {
        let v = x[base + i];
        if v > v_best || (i_best == 0xffffffffu && v == v_best) {
            v_best = v;
            i_best = i;
        }
    }
    best_value[lid] = v_best;
    best_index[lid] = i_best;
    workgroupBarrier();
    for (var step = 128u; step > 0u; step = step >> 1u) {
        if lid < step {
            let v = best_value[lid + step];
            let i = best_index[lid + step];
            let mine = best_value[lid];
            if v > mine || (v == mine && i < best_index[lid]) {
                best_value[lid] = v;
                best_index[lid] = i;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[row] = select(best_index[0], 0u, best_index[0] == 0xffffffffu);
    }
}
