// Rotates u1 heads of q and u6 heads of k, of u2 dims each, in each of u0 rows by the
// host's (sin, cos) table at table[u4..] (u3 pairs per row); u5 = 0 pairs (2i, 2i+1),
// 1 pairs (i, i + u3). One invocation per pair.
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let index = flat_group(wid, nwg) * 256u + lid;
    let half = P.u3;
    let heads = P.u1 + P.u6;
    if index >= P.u0 * heads * half {
        return;
    }
    let i = index % half;
    let t = index / half / heads;
    let h = index / half % heads;
    var a = 2u * i;
    var b = a + 1u;
    if P.u5 == 1u {
        a = i;
        b = i + half;
    }
    let sin = table[P.u4 + 2u * (t * half + i)];
    let cos = table[P.u4 + 2u * (t * half + i) + 1u];
    if h < P.u1 {
        let base = (t * P.u1 + h) * P.u2;
        let x0 = q[base + a];
        let x1 = q[base + b];
        q[base + a] = x0 * cos - x1 * sin;
        q[base + b] = x0 * sin + x1 * cos;
    } else {
        let base = (t * P.u6 + h - P.u1) * P.u2;
        let x0 = k[base + a];
        let x1 = k[base + b];
        k[base + a] = x0 * cos - x1 * sin;
        k[base + b] = x0 * sin + x1 * cos;
    }
}
