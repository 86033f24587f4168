// The delta of one element, read from the raw little-endian input words of this chunk.
// Requires common.wgsl.

@group(0) @binding(1) var<storage, read> base_words: array<u32>;
@group(0) @binding(2) var<storage, read> ft_words: array<u32>;

// Element `i` of a word array of type `ty`, as f32 bits (exact).
fn unpack_bits(word: u32, ty: u32, i: u32) -> u32 {
    if ty == TYPE_F32 {
        return word;
    }
    let h = (word >> ((i & 1u) * 16u)) & 0xffffu;
    if ty == TYPE_BF16 {
        return h << 16u;
    }
    return f16_to_f32_bits(h);
}

fn base_bits(i: u32) -> u32 {
    let ty = params.base_type;
    var w: u32;
    if ty == TYPE_F32 {
        w = base_words[i];
    } else {
        w = base_words[i >> 1u];
    }
    return unpack_bits(w, ty, i);
}

fn ft_bits(i: u32) -> u32 {
    let ty = params.ft_type;
    var w: u32;
    if ty == TYPE_F32 {
        w = ft_words[i];
    } else {
        w = ft_words[i >> 1u];
    }
    return unpack_bits(w, ty, i);
}

struct Delta {
    d: f32,
    // FLAG_NONFINITE: the delta is NaN or infinite. FLAG_TINY: a subnormal input or result,
    // where a device that flushes denormals could differ from IEEE arithmetic.
    flags: u32,
}

// delta = f32(finetuned) - f32(base) of chunk element `i`.
fn delta_at(i: u32) -> Delta {
    let bb = base_bits(i);
    let fb = ft_bits(i);
    let b = bitcast<f32>(bb);
    let f = bitcast<f32>(fb);
    let d = f - b;
    let db = bitcast<u32>(d);
    var flags = 0u;
    if is_nonfinite_bits(bb) || is_nonfinite_bits(fb) || is_nonfinite_bits(db) {
        flags |= FLAG_NONFINITE;
    }
    // A nonzero exact difference below 2^-126 is subnormal (or flushed to zero).
    if is_subnormal_bits(bb) || is_subnormal_bits(fb) || (exponent_bits(db) == 0u && f != b) {
        flags |= FLAG_TINY;
    }
    return Delta(d, flags);
}

// Level of a delta (LevelRule on the host): j = floor((d - lo) * k) clamped to 0..L-1, then
// j + 1 when d reaches the smallest delta of the next level, bounds[j] (+inf for j = L - 1).
// Only a subtraction, a product and comparisons: the same on every device. FLAG_TINY when
// d - lo is a nonzero subnormal.
fn level_of(d: f32) -> vec2<u32> {
    let t = d - params.lo;
    var flags = 0u;
    if exponent_bits(bitcast<u32>(t)) == 0u && d != params.lo {
        flags = FLAG_TINY;
    }
    let j = u32(clamp(t * params.k, 0.0, params.max_level));
    let up = select(0u, 1u, d >= params.bounds[j / 4u][j % 4u]);
    return vec2<u32>(j + up, flags);
}
