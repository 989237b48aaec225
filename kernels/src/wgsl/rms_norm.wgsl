// RMS norm of u0 rows of u1 floats times weight, eps = f0, one workgroup per row:
// u2 = 0 normalizes y in place (x unused); u2 = 1 adds y into x first and writes the
// normalized sum to y (the residual step between two blocks). An entry point follows.
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;

var<workgroup> partial: array<f32, 256>;

// The row value at i: y's, or (adding) x + y, stored back to x.
fn summed(i: u32) -> f32 {
    if P.u2 == 1u {
        let s = x[i] + y[i];
        x[i] = s;
        return s;
    }
    return y[i];
}

// The row value at i once `summed` has run there.
fn source(i: u32) -> f32 {
    if P.u2 == 1u {
        return x[i];
    }
    return y[i];
}

// Row `row` of a workgroup of 256 invocations (rms_norm_main.wgsl or
// norm_quantize.wgsl calls it).
fn norm_row(row: u32, lid: u32) {
    let cols = P.u1;
    let base = row * cols;
    // Four loads in flight per step (one row is one workgroup: latency, not bandwidth,
    // bounds a decode step's norm).
    var s0 = 0.0;
    var s1 = 0.0;
    var c = lid;
    for (; c + 768u < cols; c += 1024u) {
        let a = summed(base + c);
        let b = summed(base + c + 256u);
        let e = summed(base + c + 512u);
        let f = summed(base + c + 768u);
        s0 = fma(a, a, fma(e, e, s0));
        s1 = fma(b, b, fma(f, f, s1));
    }
    for (; c < cols; c += 256u) {
        let v = summed(base + c);
        s0 = fma(v, v, s0);
    }
    partial[lid] = s0 + s1;
    workgroupBarrier();
    for (var step = 128u; step > 0u; step = step >> 1u) {
        if lid < step {
            partial[lid] += partial[lid + step];
        }
        workgroupBarrier();
    }
    let inv = div_rn(1.0, sqrt_rn(div_rn(partial[0], f32(cols)) + P.f0));
    c = lid;
    for (; c + 768u < cols; c += 1024u) {
        let a = source(base + c);
        let b = source(base + c + 256u);
        let e = source(base + c + 512u);
        let f = source(base + c + 768u);
        y[base + c] = (a * inv) * weight[c];
        y[base + c + 256u] = (b * inv) * weight[c + 256u];
        y[base + c + 512u] = (e * inv) * weight[c + 512u];
        y[base + c + 768u] = (f * inv) * weight[c + 768u];
    }
    for (; c < cols; c += 256u) {
        y[base + c] = (source(base + c) * inv) * weight[c];
    }
}
