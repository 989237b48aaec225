// Causal attention over a paged f32 cache, one workgroup per (query row, head), keys in
// tiles of 64 with an online softmax, f32 throughout.
// u0 query rows described at arena[u6..] as (row, position, first page-table entry);
// u1 heads, u2 KV heads, u3 head_dim (≤ 256), u4 page size, u5 window (0: none);
// page table at arena[u7..]; f0 = score scale.
// A cache row holds u2 × u3 floats; position p is row table[p / u4] * u4 + p % u4.
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> keys: array<f32>;
@group(0) @binding(3) var<storage, read> values: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> arena: array<u32>;

const TILE: u32 = 64u;

var<workgroup> qv: array<f32, 256>;
var<workgroup> p: array<f32, 64>;
var<workgroup> rows: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let item = g / P.u1;
    let h = g % P.u1;
    if item >= P.u0 {
        return;
    }
    let seq = load_item(item, lid);
    let row = seq.x;
    let pos = seq.y;
    let page0 = seq.z;
    let hd = P.u3;
    let ps = P.u4;
    let kv_off = (h / (P.u1 / P.u2)) * hd;
    let kv_stride = P.u2 * hd;
    let qbase = (row * P.u1 + h) * hd;
    for (var d = lid; d < hd; d += TILE) {
        qv[d] = q[qbase + d];
    }
    let first = first_key(pos);
    var m = -3.0e38;
    var l = 0.0;
    var acc: array<f32, 4>;
    for (var k0 = first; k0 <= pos; k0 += TILE) {
        workgroupBarrier();
        let key = k0 + lid;
        var s = -3.0e38;
        if key <= pos {
            let r = arena[P.u7 + page0 + key / ps] * ps + key % ps;
            rows[lid] = r;
            let kb = r * kv_stride + kv_off;
            // Four independent chains: the loop is latency-bound otherwise.
            var d0 = 0.0;
            var d1 = 0.0;
            var d2 = 0.0;
            var d3 = 0.0;
            var d = 0u;
            for (; d + 4u <= hd; d += 4u) {
                let k0 = keys[kb + d];
                let k1 = keys[kb + d + 1u];
                let k2 = keys[kb + d + 2u];
                let k3 = keys[kb + d + 3u];
                d0 = fma(qv[d], k0, d0);
                d1 = fma(qv[d + 1u], k1, d1);
                d2 = fma(qv[d + 2u], k2, d2);
                d3 = fma(qv[d + 3u], k3, d3);
            }
            for (; d < hd; d++) {
                d0 = fma(qv[d], keys[kb + d], d0);
            }
            s = ((d0 + d1) + (d2 + d3)) * P.f0;
        }
        p[lid] = s;
        workgroupBarrier();
        var tmax = m;
        for (var j = 0u; j < TILE; j++) {
            tmax = max(tmax, p[j]);
        }
        let corr = exp(m - tmax);
        var e = 0.0;
        if key <= pos {
            e = exp(s - tmax);
        }
        workgroupBarrier();
        p[lid] = e;
        workgroupBarrier();
        let n = min(TILE, pos + 1u - k0);
        var sum = 0.0;
        for (var j = 0u; j < n; j++) {
            sum += p[j];
        }
        l = l * corr + sum;
        for (var u = 0u; u < 4u; u++) {
            acc[u] *= corr;
        }
        // Four keys a step, each thread's (up to) four dimensions: sixteen loads in flight.
        var j = 0u;
        for (; j + 4u <= n; j += 4u) {
            let r0 = rows[j] * kv_stride + kv_off;
            let r1 = rows[j + 1u] * kv_stride + kv_off;
            let r2 = rows[j + 2u] * kv_stride + kv_off;
            let r3 = rows[j + 3u] * kv_stride + kv_off;
            let p0 = p[j];
            let p1 = p[j + 1u];
            let p2 = p[j + 2u];
            let p3 = p[j + 3u];
            for (var u = 0u; u < 4u; u++) {
                let d = lid + u * TILE;
                if d < hd {
                    let v0 = values[r0 + d];
                    let v1 = values[r1 + d];
                    let v2 = values[r2 + d];
                    let v3 = values[r3 + d];
                    acc[u] = fma(p3, v3, fma(p2, v2, fma(p1, v1, fma(p0, v0, acc[u]))));
                }
            }
        }
        for (; j < n; j++) {
            let r = rows[j] * kv_stride + kv_off;
            for (var u = 0u; u < 4u; u++) {
                let d = lid + u * TILE;
                if d < hd {
                    acc[u] = fma(p[j], values[r + d], acc[u]);
                }
            }
        }
        m = tmax;
    }
    for (var u = 0u; u < 4u; u++) {
        let d = lid + u * TILE;
        if d < hd {
            out[qbase + d] = acc[u] / l;
        }
    }
}
