// Merges attention_split.wgsl's ranges: one workgroup per (query row, head) rescales each
// range's sums by exp(range max - overall max) and divides by the rescaled sum of
// exponentials. Fields as attention_split.wgsl (u0 rows, u1 heads, u3 head_dim, u6 items,
// u8 ranges).
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> arena: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let item = g / P.u1;
    let h = g % P.u1;
    if item >= P.u0 {
        return;
    }
    let row = arena[P.u6 + 3u * item];
    let hd = P.u3;
    let st = hd + 2u;
    let base = g * P.u8 * st;
    var mx = -3.0e38;
    for (var s = 0u; s < P.u8; s++) {
        mx = max(mx, part[base + s * st + hd]);
    }
    var l = 0.0;
    for (var s = 0u; s < P.u8; s++) {
        l = fma(exp(part[base + s * st + hd] - mx), part[base + s * st + hd + 1u], l);
    }
    let obase = (row * P.u1 + h) * hd;
    for (var d = lid; d < hd; d += 64u) {
        var a = 0.0;
        for (var s = 0u; s < P.u8; s++) {
            a = fma(exp(part[base + s * st + hd] - mx), part[base + s * st + d], a);
        }
        out[obase + d] = a / l;
    }
}
