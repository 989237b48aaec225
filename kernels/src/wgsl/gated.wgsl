// gate[i] = act(gate[i]) * up[i] for i < u0, as llama.cpp's CPU backend computes it:
// u1 = 0: SiLU with ggml's polynomial exp; u1 = 1: GELU-tanh from ggml's f16 table.
@group(0) @binding(1) var<storage, read_write> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read> gelu_table: array<f32>;

fn from_bits(b: u32) -> f32 {
    return bitcast<f32>(b);
}

fn exp_ggml(x: f32) -> f32 {
    let log2e = from_bits(0x3fb8aa3bu);
    let ln2_hi = from_bits(0x3f317200u);
    let ln2_lo = from_bits(0x35bfbe8eu);
    let c0 = from_bits(0x3c072010u);
    let c1 = from_bits(0x3d2b9f17u);
    let c2 = from_bits(0x3e2aaf33u);
    let c3 = from_bits(0x3efffedbu);
    let c4 = from_bits(0x3f7ffff6u);
    // ggml's fma(x, log2e, 0x1.8p23) - 0x1.8p23, which shader compilers may fold away.
    let n = round(x * log2e);
    let b = fma(-n, ln2_lo, fma(-n, ln2_hi, x));
    let u = b * b;
    let j = fma(fma(fma(c0, b, c1), u, fma(c2, b, c3)), u, fma(c4, b, 1.0));
    if abs(n) > 126.0 {
        if abs(n) > 192.0 {
            return select(from_bits(0x7f800000u), 0.0, n <= 0.0);
        }
        return ldexp(j, i32(n));
    }
    return j * from_bits(u32(i32(n) + 127) << 23u);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if i >= P.u0 {
        return;
    }
    let g = gate[i];
    var a: f32;
    if P.u1 == 0u {
        a = g / (1.0 + exp_ggml(-g));
    } else if g <= -10.0 {
        a = 0.0;
    } else if g >= 10.0 {
        a = g;
    } else {
        a = gelu_table[f32_to_f16_bits(g)];
    }
    gate[i] = a * up[i];
}
