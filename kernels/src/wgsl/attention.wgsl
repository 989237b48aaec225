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
var<workgroup> info: vec3<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let item = g / P.u1;
    let h = g % P.u1;
    if item >= P.u0 {
        return;
    }
    if lid == 0u {
        let at = P.u6 + 3u * item;
        info = vec3<u32>(arena[at], arena[at + 1u], arena[at + 2u]);
    }
    let seq = workgroupUniformLoad(&info);
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
    var first = 0u;
    if P.u5 != 0u && pos + 1u > P.u5 {
        first = pos + 1u - P.u5;
    }
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
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot = fma(qv[d], keys[kb + d], dot);
            }
            s = dot * P.f0;
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
            let d = lid + u * TILE;
            if d < hd {
                var a = acc[u] * corr;
                for (var j = 0u; j < n; j++) {
                    a = fma(p[j], values[rows[j] * kv_stride + kv_off + d], a);
                }
                acc[u] = a;
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
