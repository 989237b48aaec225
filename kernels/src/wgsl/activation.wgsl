// ggml's SiLU and GELU-tanh as llama.cpp's CPU backend computes them, for kernels that
// declare `gelu_table` (ggml's f16 GELU table, indexed by an input's f16 bits).
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

// code 0: SiLU with ggml's polynomial exp; 1: GELU-tanh from the table.
fn activate(g: f32, code: u32) -> f32 {
    if code == 0u {
        return g / (1.0 + exp_ggml(-g));
    } else if g <= -10.0 {
        return 0.0;
    } else if g >= 10.0 {
        return g;
    }
    return gelu_table[f32_to_f16_bits(g)];
}
