// Causal attention for prefill chunks: one workgroup per (block of up to u8 consecutive
// query rows of one sequence, head), keys in tiles of 64, f32 throughout (as
// attention.wgsl, in another order). A workgroup per query row re-read every key and
// value row once per query from L2, which left the kernel bound by L2 latency (a third
// of a Qwen2-0.5B-shape pp512 on an H200); here each key and value row is read once per
// block. Per tile: lane j scores key j against every row of the block (queries in
// workgroup memory), the rows' maxima and sums are reduced across lanes, and lane
// (dimension group g, row group) accumulates P·V for its rows' four dimensions 4g..4g+4.
// u0 blocks described at arena[u6..] as (first row, its position, first page-table
// entry, rows); u1 heads, u2 KV heads, u3 head_dim (a multiple of 4, at most 256), u4
// page size, u5 window (0: none), page table at arena[u7..], u8 rows per block (at most
// 16, and at most 8 × (64 / (u3 / 4))); f0 = score scale.
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> keys: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> values: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> arena: array<u32>;

const TILE: u32 = 64u;
const MAX_ROWS: u32 = 16u;

// The block's queries, row i's vec4 d at i · u3 / 4 + d.
var<workgroup> qb: array<vec4<f32>, 512>;
// Scores, then weights: row i's key j at i · 64 + j.
var<workgroup> p: array<f32, 1024>;
var<workgroup> rows: array<u32, 64>;
// Per-lane partial maxima or sums, then per row: the running max, the rescale of the
// tile, and the running sum.
var<workgroup> partial: array<f32, 64>;
var<workgroup> row_max: array<f32, 16>;
var<workgroup> row_corr: array<f32, 16>;
var<workgroup> info: vec4<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let block = g / P.u1;
    let h = g % P.u1;
    if block >= P.u0 {
        return;
    }
    if lid == 0u {
        let at = P.u6 + 4u * block;
        info = vec4<u32>(arena[at], arena[at + 1u], arena[at + 2u], arena[at + 3u]);
    }
    let blk = workgroupUniformLoad(&info);
    let row0 = blk.x;
    let pos0 = blk.y;
    let page0 = blk.z;
    let n_rows = blk.w;
    let hd4 = P.u3 / 4u;
    let ps = P.u4;
    let kv_stride4 = P.u2 * hd4;
    let kv_off4 = (h / (P.u1 / P.u2)) * hd4;
    for (var i = lid; i < n_rows * hd4; i += TILE) {
        let r = i / hd4;
        qb[i] = q[((row0 + r) * P.u1 + h) * hd4 + i % hd4];
    }
    if lid < MAX_ROWS {
        row_max[lid] = -3.0e38;
    }
    let last = pos0 + n_rows - 1u;
    // Keys before the first row's window are nobody's.
    let first = first_key(pos0);
    // P·V lanes: dimension group dg (of hd4), rows rg · rpl .. + rpl of the block.
    let dg = lid % hd4;
    let groups = TILE / hd4;
    let rg = lid / hd4;
    let rpl = (P.u8 + groups - 1u) / groups;
    let pv_lane = rg < groups;
    var acc: array<vec4<f32>, 8>;
    var sums: array<f32, 8>;
    // Softmax lanes: row lid % rows_per, keys (lid / rows_per) · span .. + span.
    let parts = TILE / P.u8;
    let span = TILE / parts;
    let sm_row = lid % P.u8;
    let sm_part = lid / P.u8;
    for (var k0 = first; k0 <= last; k0 += TILE) {
        workgroupBarrier();
        let n = min(TILE, last + 1u - k0);
        // Scores of key k0 + lid against every row (masked: -3e38).
        var s: array<f32, 16>;
        if lid < n {
            let key = k0 + lid;
            let r = (arena[P.u7 + page0 + key / ps] * ps + key % ps) * kv_stride4 + kv_off4;
            rows[lid] = r;
            var d = 0u;
            for (; d + 4u <= hd4; d += 4u) {
                let k0v = keys[r + d];
                let k1v = keys[r + d + 1u];
                let k2v = keys[r + d + 2u];
                let k3v = keys[r + d + 3u];
                for (var i = 0u; i < MAX_ROWS; i++) {
                    if i < n_rows {
                        let at = i * hd4 + d;
                        s[i] += (dot(qb[at], k0v) + dot(qb[at + 1u], k1v)) + (dot(qb[at + 2u], k2v) + dot(qb[at + 3u], k3v));
                    }
                }
            }
            for (; d < hd4; d++) {
                let kv = keys[r + d];
                for (var i = 0u; i < MAX_ROWS; i++) {
                    if i < n_rows {
                        s[i] += dot(qb[i * hd4 + d], kv);
                    }
                }
            }
        }
        for (var i = 0u; i < MAX_ROWS; i++) {
            if i < P.u8 {
                let pos = pos0 + i;
                let key = k0 + lid;
                var visible = lid < n && i < n_rows && key <= pos;
                if P.u5 != 0u && key + P.u5 < pos + 1u {
                    visible = false;
                }
                p[i * TILE + lid] = select(-3.0e38, s[i] * P.f0, visible);
            }
        }
        workgroupBarrier();
        // Each row's max over the tile, then its new running max and rescale.
        var part_max = -3.0e38;
        if sm_part < parts {
            for (var j = sm_part * span; j < sm_part * span + span; j++) {
                part_max = max(part_max, p[sm_row * TILE + j]);
            }
        }
        partial[lid] = part_max;
        workgroupBarrier();
        if lid < P.u8 {
            var tmax = row_max[lid];
            for (var k = 0u; k < parts; k++) {
                tmax = max(tmax, partial[k * P.u8 + lid]);
            }
            row_corr[lid] = exp(row_max[lid] - tmax);
            row_max[lid] = tmax;
        }
        workgroupBarrier();
        // Weights: masked scores give exp(-3e38 - max) = 0.
        for (var i = 0u; i < MAX_ROWS; i++) {
            if i < P.u8 {
                p[i * TILE + lid] = exp(p[i * TILE + lid] - row_max[i]);
            }
        }
        workgroupBarrier();
        if pv_lane {
            for (var k = 0u; k < 8u; k++) {
                let i = rg * rpl + k;
                if k < rpl && i < P.u8 {
                    let corr = row_corr[i];
                    acc[k] *= corr;
                    sums[k] *= corr;
                }
            }
            // Four keys' values loaded at a time.
            var j = 0u;
            for (; j + 4u <= n; j += 4u) {
                let v0 = values[rows[j] + dg];
                let v1 = values[rows[j + 1u] + dg];
                let v2 = values[rows[j + 2u] + dg];
                let v3 = values[rows[j + 3u] + dg];
                for (var k = 0u; k < 8u; k++) {
                    let i = rg * rpl + k;
                    if k < rpl && i < P.u8 {
                        let w = i * TILE + j;
                        let p0 = p[w];
                        let p1 = p[w + 1u];
                        let p2 = p[w + 2u];
                        let p3 = p[w + 3u];
                        acc[k] = fma(vec4<f32>(p3), v3, fma(vec4<f32>(p2), v2, fma(vec4<f32>(p1), v1, fma(vec4<f32>(p0), v0, acc[k]))));
                        sums[k] += (p0 + p1) + (p2 + p3);
                    }
                }
            }
            for (; j < n; j++) {
                let v = values[rows[j] + dg];
                for (var k = 0u; k < 8u; k++) {
                    let i = rg * rpl + k;
                    if k < rpl && i < P.u8 {
                        let pw = p[i * TILE + j];
                        acc[k] = fma(vec4<f32>(pw), v, acc[k]);
                        sums[k] += pw;
                    }
                }
            }
        }
    }
    if pv_lane {
        for (var k = 0u; k < 8u; k++) {
            let i = rg * rpl + k;
            if k < rpl && i < n_rows {
                out[((row0 + i) * P.u1 + h) * hd4 + dg] = acc[k] / sums[k];
            }
        }
    }
}
