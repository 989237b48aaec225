// The u2 highest-ranked values of each of u0 rows of u1 floats of x (by value, then the
// lowest index), NaN and -inf left out: out row r, 1 + 2·u2 words from r·(1 + 2·u2), is
// [count, (index, value bits) × count]. One workgroup per row: a radix select of the
// u2-th largest value's order-preserving key, 8 bits a round; then each lane takes a
// contiguous run of the row and writes, in index order, its values above that key and
// as many equal to it as are still wanted.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> hist: array<atomic<u32>, 256>;
// (key prefix so far, values of that prefix still wanted, 1 once every number is taken).
var<workgroup> sel: array<u32, 3>;
var<workgroup> above_count: array<u32, 256>;
var<workgroup> equal_count: array<u32, 256>;

// Unsigned keys in the order of the floats (total order: -0 below +0).
fn key_of(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// Not NaN, not -inf.
fn is_number(v: f32) -> bool {
    return v >= -3.4028235e38;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if row >= P.u0 {
        return;
    }
    let len = P.u1;
    let k = P.u2;
    let base = row * len;
    if lid == 0u {
        sel[0] = 0u;
        sel[1] = k;
        sel[2] = 0u;
    }
    for (var round = 0u; round < 4u; round++) {
        let shift = 24u - 8u * round;
        // The bits above this round's byte (none in the first round).
        let mask = select(0xffffffffu << (shift + 8u), 0u, round == 0u);
        // Lane 0 may still be reading the last round's counts.
        workgroupBarrier();
        atomicStore(&hist[lid], 0u);
        let state = workgroupUniformLoad(&sel);
        if state[2] == 1u {
            break;
        }
        for (var i = lid; i < len; i += 256u) {
            let v = x[base + i];
            if is_number(v) {
                let key = key_of(v);
                if (key & mask) == state[0] {
                    atomicAdd(&hist[(key >> shift) & 255u], 1u);
                }
            }
        }
        workgroupBarrier();
        if lid == 0u {
            // From the top byte down, the byte where the wanted count is reached.
            var above = 0u;
            var chosen = 256u;
            for (var b = 255i; b >= 0i; b--) {
                let h = atomicLoad(&hist[u32(b)]);
                if above + h >= state[1] {
                    chosen = u32(b);
                    break;
                }
                above += h;
            }
            if chosen == 256u {
                // Fewer numbers than wanted (only in the first round): take them all.
                sel[2] = 1u;
            } else {
                sel[0] = state[0] | (chosen << shift);
                sel[1] = state[1] - above;
            }
        }
    }
    let state = workgroupUniformLoad(&sel);
    let all = state[2] == 1u;
    let threshold = state[0];
    let wanted_equal = state[1];
    // Each lane's contiguous run: counts, then offsets in index order.
    let run = (len + 255u) / 256u;
    let start = min(lid * run, len);
    let end = min(start + run, len);
    var n_above = 0u;
    var n_equal = 0u;
    for (var i = start; i < end; i++) {
        let v = x[base + i];
        if is_number(v) {
            let key = key_of(v);
            if all || key > threshold {
                n_above += 1u;
            } else if key == threshold {
                n_equal += 1u;
            }
        }
    }
    above_count[lid] = n_above;
    equal_count[lid] = n_equal;
    workgroupBarrier();
    if lid == 0u {
        var a = 0u;
        var e = 0u;
        for (var l = 0u; l < 256u; l++) {
            let na = above_count[l];
            let ne = equal_count[l];
            above_count[l] = a;
            equal_count[l] = e;
            a += na;
            e += ne;
        }
        out[row * (1u + 2u * k)] = a + min(e, select(wanted_equal, 0u, all));
        // Equal values go after all those above.
        sel[0] = a;
    }
    let offsets = workgroupUniformLoad(&sel);
    let total_above = offsets[0];
    var at_above = above_count[lid];
    var at_equal = equal_count[lid];
    let dst = row * (1u + 2u * k) + 1u;
    for (var i = start; i < end; i++) {
        let v = x[base + i];
        if is_number(v) {
            let key = key_of(v);
            if all || key > threshold {
                out[dst + 2u * at_above] = i;
                out[dst + 2u * at_above + 1u] = bitcast<u32>(v);
                at_above += 1u;
            } else if key == threshold {
                if at_equal < wanted_equal {
                    let at = total_above + at_equal;
                    out[dst + 2u * at] = i;
                    out[dst + 2u * at + 1u] = bitcast<u32>(v);
                }
                at_equal += 1u;
            }
        }
    }
}
