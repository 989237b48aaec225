// Rotates u1 heads of u2 dims in each of u0 rows by the host's (sin, cos) table at
// table[u4..] (u3 pairs per row); u5 = 0 pairs (2i, 2i+1), 1 pairs (i, i + u3).
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * 256u + lid;
    let half = P.u3;
    if k >= P.u0 * P.u1 * half {
        return;
    }
    let i = k % half;
    let head = k / half;
    let t = head / P.u1;
    let base = head * P.u2;
    var a = base + 2u * i;
    var b = a + 1u;
    if P.u5 == 1u {
        a = base + i;
        b = a + half;
    }
    let sin = table[P.u4 + 2u * (t * half + i)];
    let cos = table[P.u4 + 2u * (t * half + i) + 1u];
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * cos - x1 * sin;
    x[b] = x0 * sin + x1 * cos;
}
