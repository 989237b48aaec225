// Rotates u1 heads of q and u6 heads of k, of u2 dims each, in each of u0 rows by the
// host's (sin, cos) table at arena[u4..] (u3 pairs per row); u5 = 0 pairs (2i, 2i+1),
// 1 pairs (i, i + u3). With u8 = 1 the rotated keys are also written to their cache
// rows and the values copied to theirs, rounded to f16 as store_kv.wgsl does: cache rows
// at arena[u7..], u6 · u2 values each (with u8 = 0, v and the caches are unused). One
// invocation per rotated pair, then one per value.
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> arena: array<u32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let index = flat_group(wid, nwg) * 256u + lid;
    let half = P.u3;
    let heads = P.u1 + P.u6;
    let pairs = P.u0 * heads * half;
    let row_len = P.u6 * P.u2;
    let store = P.u8 == 1u;
    if index >= pairs {
        if !store {
            return;
        }
        let i = index - pairs;
        if i < P.u0 * row_len {
            let t = i / row_len;
            v_cache[arena[P.u7 + t] * row_len + i % row_len] = round_f16(v[i]);
        }
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
    let sin = bitcast<f32>(arena[P.u4 + 2u * (t * half + i)]);
    let cos = bitcast<f32>(arena[P.u4 + 2u * (t * half + i) + 1u]);
    if h < P.u1 {
        let base = (t * P.u1 + h) * P.u2;
        let x0 = q[base + a];
        let x1 = q[base + b];
        q[base + a] = x0 * cos - x1 * sin;
        q[base + b] = x0 * sin + x1 * cos;
    } else {
        let kh = h - P.u1;
        let base = (t * P.u6 + kh) * P.u2;
        let x0 = k[base + a];
        let x1 = k[base + b];
        let y0 = x0 * cos - x1 * sin;
        let y1 = x0 * sin + x1 * cos;
        k[base + a] = y0;
        k[base + b] = y1;
        if !store {
            return;
        }
        let row = arena[P.u7 + t] * row_len + kh * P.u2;
        k_cache[row + a] = round_f16(y0);
        k_cache[row + b] = round_f16(y1);
    }
}
