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

// Signed byte `k` (0..4) of a packed word.
fn sbyte(w: u32, k: u32) -> i32 {
    return extractBits(i32(w), 8u * k, 8u);
}

fn ubyte(w: u32, k: u32) -> u32 {
    return extractBits(w, 8u * k, 8u);
}
