// Flash-decoding half of causal attention over the paged f32 cache, for few query rows:
// the keys each (query row, head) sees are split into u8 ranges of u9 keys (whole tiles
// of 64), one workgroup per (row, head, range), so that short batches still fill the
// device. Each workgroup runs attention.wgsl's online softmax over its range and writes
// its unnormalized weighted sum of values, running max and sum of exponentials to
// `part` at ((item * u1 + h) * u8 + range) * (u3 + 2): u3 sums, then max, then sum (an
// empty range writes max -3e38, sums 0). attention_combine.wgsl merges the ranges.
// Fields as attention.wgsl, plus u8 and u9; u3 is a multiple of 4 (keys and queries are
// read as vec4).
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> keys: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> values: array<f32>;
@group(0) @binding(4) var<storage, read_write> part: array<f32>;
@group(0) @binding(5) var<storage, read> arena: array<u32>;

const TILE: u32 = 64u;

var<workgroup> qv: array<vec4<f32>, 64>;
var<workgroup> p: array<f32, 64>;
var<workgroup> rows: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let split = g % P.u8;
    let ih = g / P.u8;
    let item = ih / P.u1;
    let h = ih % P.u1;
    if item >= P.u0 {
        return;
    }
    let seq = load_item(item, lid);
    let row = seq.x;
    let pos = seq.y;
    let page0 = seq.z;
    let hd = P.u3;
    let hd4 = hd / 4u;
    let ps = P.u4;
    let kv_off = (h / (P.u1 / P.u2)) * hd;
    let kv_stride = P.u2 * hd;
    let qbase = (row * P.u1 + h) * hd;
    for (var d = lid; d < hd4; d += TILE) {
        qv[d] = q[qbase / 4u + d];
    }
    let first = first_key(pos);
    let kbeg = first + split * P.u9;
    let kend = min(kbeg + P.u9, pos + 1u);
    var m = -3.0e38;
    var l = 0.0;
    var acc: array<f32, 4>;
    for (var k0 = kbeg; k0 < kend; k0 += TILE) {
        workgroupBarrier();
        let key = k0 + lid;
        var s = -3.0e38;
        if key < kend {
            let r = arena[P.u7 + page0 + key / ps] * ps + key % ps;
            rows[lid] = r;
            let kb = (r * kv_stride + kv_off) / 4u;
            // Eight loads in flight per step: the loop is latency-bound otherwise.
            var d0 = 0.0;
            var d1 = 0.0;
            var d = 0u;
            for (; d + 8u <= hd4; d += 8u) {
                let k0 = keys[kb + d];
                let k1 = keys[kb + d + 1u];
                let k2 = keys[kb + d + 2u];
                let k3 = keys[kb + d + 3u];
                let k4 = keys[kb + d + 4u];
                let k5 = keys[kb + d + 5u];
                let k6 = keys[kb + d + 6u];
                let k7 = keys[kb + d + 7u];
                d0 += dot(qv[d], k0) + dot(qv[d + 2u], k2) + dot(qv[d + 4u], k4) + dot(qv[d + 6u], k6);
                d1 += dot(qv[d + 1u], k1) + dot(qv[d + 3u], k3) + dot(qv[d + 5u], k5) + dot(qv[d + 7u], k7);
            }
            for (; d < hd4; d++) {
                d0 += dot(qv[d], keys[kb + d]);
            }
            s = (d0 + d1) * P.f0;
        }
        p[lid] = s;
        workgroupBarrier();
        var tmax = m;
        for (var j = 0u; j < TILE; j++) {
            tmax = max(tmax, p[j]);
        }
        let corr = exp(m - tmax);
        var e = 0.0;
        if key < kend {
            e = exp(s - tmax);
        }
        workgroupBarrier();
        p[lid] = e;
        workgroupBarrier();
        let n = min(TILE, kend - k0);
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
    let pbase = g * (hd + 2u);
    for (var u = 0u; u < 4u; u++) {
        let d = lid + u * TILE;
        if d < hd {
            part[pbase + d] = acc[u];
        }
    }
    if lid == 0u {
        part[pbase + hd] = m;
        part[pbase + hd + 1u] = l;
    }
}
