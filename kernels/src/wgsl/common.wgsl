// Shared by every kiln kernel: the per-dispatch parameters (a uniform slot selected by
// a dynamic offset), the flat workgroup index of a 2-D grid, and exact f16/bf16
// conversions done with integer operations (so every driver rounds the same way: to
// nearest, ties to even).

struct Params {
    u0: u32, u1: u32, u2: u32, u3: u32,
    u4: u32, u5: u32, u6: u32, u7: u32,
    u8: u32, u9: u32, u10: u32, u11: u32,
    f0: f32, f1: f32, f2: f32, f3: f32,
}

@group(0) @binding(0) var<uniform> P: Params;

// Grids wider than 65535 workgroups are folded into y rows of `nwg.x` groups.
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn f16_bits_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        // Zero or subnormal: m * 2^-24 is a normal f32.
        let v = f32(m) * 5.9604645e-8;
        return select(v, -v, s != 0u);
    }
    if e == 31u {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let s = (b >> 16u) & 0x8000u;
    let e = i32((b >> 23u) & 0xffu);
    let m = b & 0x7fffffu;
    if e == 255 {
        return s | 0x7c00u | select(0u, 0x200u, m != 0u);
    }
    let he = e - 112;
    if he >= 31 {
        return s | 0x7c00u;
    }
    if he <= 0 {
        if he < -10 {
            return s;
        }
        let full = m | 0x800000u;
        let shift = u32(14 - he);
        var q = full >> shift;
        let rem = full & ((1u << shift) - 1u);
        let half = 1u << (shift - 1u);
        if rem > half || (rem == half && (q & 1u) == 1u) {
            q = q + 1u;
        }
        return s | q;
    }
    var r = (u32(he) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if rem > 0x1000u || (rem == 0x1000u && (r & 1u) == 1u) {
        r = r + 1u;
    }
    return s | r;
}

fn round_f16(x: f32) -> f32 {
    return f16_bits_to_f32(f32_to_f16_bits(x));
}

fn round_bf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return bitcast<f32>((b | 0x400000u) & 0xffff0000u);
    }
    return bitcast<f32>((b + 0x7fffu + ((b >> 16u) & 1u)) & 0xffff0000u);
}

// Four quants (-128..127) as the bytes of one word, the first lowest (the 8-bit
// activation blocks' layout).
fn pack4(q: vec4<i32>) -> u32 {
    return (u32(q.x) & 0xffu) | ((u32(q.y) & 0xffu) << 8u) | ((u32(q.z) & 0xffu) << 16u) | ((u32(q.w) & 0xffu) << 24u);
}

// Signed byte `k` (0..4) of a packed word.
fn sbyte(w: u32, k: u32) -> i32 {
    return extractBits(i32(w), 8u * k, 8u);
}

fn ubyte(w: u32, k: u32) -> u32 {
    return extractBits(w, 8u * k, 8u);
}

// a / b rounded to nearest even, as IEEE division (and so the CPU's kernels) rounds it:
// WGSL lets `/` be off by 2.5 ulp, and NVIDIA's Vulkan driver is, which moved quantized
// activations across rounding ties (products off by ~5e-4 of their largest). The
// driver's quotient of the significands is only the first guess at the 25 bits of the
// exact one (24 and a guard bit); the integer remainder, exact in 32 bits while the
// guess is a few units off, corrects it and gives the sticky bit. (Long division, bit by
// bit, cost a decode step 5-9% on the H200 for the small models: norms and quantization
// divide in a chain.) Zeros, subnormals, infinities and results out of the normal range
// take the driver's `/`. (A correction step with `fma` would need a fused fma, which
// WGSL does not promise: lavapipe's is not.)
fn div_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let ea = (ua >> 23u) & 0xffu;
    let eb = (ub >> 23u) & 0xffu;
    if ea == 0u || eb == 0u || ea == 255u || eb == 255u {
        return a / b;
    }
    let mb = (ub & 0x7fffffu) | 0x800000u;
    var n = (ua & 0x7fffffu) | 0x800000u;
    var e = i32(ea) - i32(eb) + 127;
    if n < mb {
        n = n << 1u;
        e -= 1;
    }
    // q = floor(n · 2^24 / mb), in [2^24, 2^25): both significands are exact floats (n
    // even from 2^24 on), and n · 2^24 - q · mb is the remainder, wrapped to 32 bits.
    var q = u32((f32(n) / f32(mb)) * 16777216.0);
    var r = i32((n << 24u) - q * mb);
    for (var i = 0u; i < 8u && (r < 0 || r >= i32(mb)); i++) {
        if r < 0 {
            q -= 1u;
            r += i32(mb);
        } else {
            q += 1u;
            r -= i32(mb);
        }
    }
    return pack_rounded(q, r != 0, e, (ua ^ ub) & 0x80000000u, a / b);
}

// sqrt(x) rounded to nearest even (WGSL's `sqrt` need not be), for x > 0: the driver's
// root as a first guess at the integer square root of the significand, corrected by the
// exact remainder (as `div_rn`); otherwise the driver's `sqrt`.
fn sqrt_rn(x: f32) -> f32 {
    let ux = bitcast<u32>(x);
    let ex = (ux >> 23u) & 0xffu;
    if ex == 0u || ex >= 255u || (ux >> 31u) == 1u {
        return sqrt(x);
    }
    // x = m · 2^(k - 23) with k even and m in [2^23, 2^25); sqrt(x) = sqrt(m · 2^25) ·
    // 2^(k / 2 - 24), whose 25 leading bits (24 and a guard bit) are the integer root of
    // the 50-bit m · 2^25, in [2^24, 2^25).
    var m = (ux & 0x7fffffu) | 0x800000u;
    var k = i32(ex) - 127;
    if (k & 1) != 0 {
        m = m << 1u;
        k -= 1;
    }
    // root = floor(sqrt(m · 2^25)) where 0 <= m · 2^25 - root² <= 2 root, the remainder
    // wrapped to 32 bits (m is an exact float, m · 2^25 too).
    var root = u32(sqrt(f32(m) * 33554432.0));
    var r = i32((m << 25u) - root * root);
    for (var i = 0u; i < 8u && (r < 0 || r > i32(2u * root)); i++) {
        if r < 0 {
            root -= 1u;
            r += i32(2u * root + 1u);
        } else {
            r -= i32(2u * root + 1u);
            root += 1u;
        }
    }
    return pack_rounded(root, r != 0, k / 2 + 127, 0u, sqrt(x));
}

// The float of sign `sign`, biased exponent `e` and the 25-bit significand-and-guard `q`
// (leading bit at bit 24; `sticky`: a nonzero remainder below the guard), rounded to
// nearest even; `fallback` when the result leaves the normal range.
fn pack_rounded(q: u32, sticky: bool, e: i32, sign: u32, fallback: f32) -> f32 {
    var m = q >> 1u;
    var exp = e;
    if (q & 1u) == 1u && (sticky || (m & 1u) == 1u) {
        m += 1u;
    }
    if m == 0x1000000u {
        m = 0x800000u;
        exp += 1;
    }
    if exp <= 0 || exp >= 255 {
        return fallback;
    }
    return bitcast<f32>(sign | (u32(exp) << 23u) | (m & 0x7fffffu));
}
