// Shared by every kernel (prepended by the host, see src/engine/gpu/kernels.rs), after the
// generated prelude of src/engine/gpu/constants.rs: the constants (WG, BUCKETS, STAT_*, FLAG_*,
// TYPE_*, ...) and the `Params` struct of the uniform block.
// Mirrors src/algorithm/selection.rs bit for bit: `mix32`, `element_key`.

@group(0) @binding(0) var<uniform> params: Params;

// lowbias32 (C. Wellons); u32 arithmetic wraps in WGSL.
fn mix32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    return x ^ (x >> 16u);
}

// The selection key of global element `index`: mix32(mix32(index ^ k0) + k1).
fn element_key(index: u32) -> u32 {
    return mix32(mix32(index ^ params.key0) + params.key1);
}

// Exponent field of an f32 bit pattern.
fn exponent_bits(b: u32) -> u32 {
    return b & 0x7f800000u;
}

fn is_nonfinite_bits(b: u32) -> bool {
    return exponent_bits(b) == 0x7f800000u;
}

fn is_subnormal_bits(b: u32) -> bool {
    return exponent_bits(b) == 0u && (b & 0x007fffffu) != 0u;
}

// Exact f16 -> f32 conversion on bits, subnormal halves included (they are normal f32 values),
// so the result does not depend on whether the device flushes denormals.
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        if m == 0u {
            return sign;
        }
        // m * 2^-24 with the leading one of m at bit p: 1.f * 2^(p - 24).
        let p = firstLeadingBit(m);
        return sign | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x007fffffu);
    }
    if e == 31u {
        return sign | 0x7f800000u | (m << 13u);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

// Order-preserving map of f32 bits to u32 (for atomicMin / atomicMax).
fn order_key(b: u32) -> u32 {
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}
