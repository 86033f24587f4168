//! The CPU engine's per-element loops that the compiler cannot vectorize by itself, each with
//! a portable definition and, for up to 16 levels (4 bits or fewer, the default), an AVX2
//! version that looks the per-level constants up in two registers (`vpermps`) instead of a
//! table in memory:
//! - [`levels_into`]: the level of each delta under a [`LevelRule`];
//! - [`candidates_into`]: the elements whose selection key reaches their level's minimum
//!   (the keys are computed in the lanes too).
//!
//! The AVX2 versions do the same IEEE single and integer operations lane by lane (`x - lo`,
//! `* k`, the clamp, truncation, one comparison), so they give the same bits as the portable
//! ones; the tests compare them on every class of input.

use crate::algorithm::quantize::LevelRule;
use crate::algorithm::selection::{element_key, TensorKey};
use crate::engine::levels::LevelSlice;
use crate::simd::multiversion;

/// Most levels the AVX2 kernels handle: their per-level constants fill two 8-lane registers.
const REGISTER_LEVELS: usize = 16;

/// `out[i] = rule.level(d[i])` (the multiplier rule: `rule.by_multiplier` must hold and every
/// delta be finite).
///
/// # Panics
/// If `out` and `d` differ in length.
pub fn levels_into(d: &[f32], rule: &LevelRule, out: &mut [u8]) {
    assert_eq!(d.len(), out.len(), "one level per delta");
    #[cfg(target_arch = "x86_64")]
    if rule.levels <= REGISTER_LEVELS && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above); the slices have equal lengths.
        unsafe { x86::levels16(d, rule, out) };
        return;
    }
    levels_portable(d, rule, out);
}

multiversion! {
    /// The definition of [`levels_into`], one element at a time.
    fn levels_portable(d: &[f32], rule: &LevelRule, out: &mut [u8]) {
        for (o, &x) in out.iter_mut().zip(d) {
            *o = rule.level(x);
        }
    }
}

/// The elements of a chunk that pass the selection's prefilter: their offsets in the chunk and
/// their selection keys. Both vectors keep spare room, so that a vector step may store eight
/// lanes past the last candidate.
#[derive(Default)]
pub struct Candidates {
    /// Offsets in the chunk, ascending.
    pub offsets: Vec<u32>,
    /// `element_key(key, first + offset)` of each.
    pub keys: Vec<u32>,
}

/// Finds the elements `first + j` of a chunk with `element_key(key, first + j) >=
/// min_key[levels[j]]`, for levels below `n_levels` (packed levels are read as they are).
pub fn candidates_into(
    levels: LevelSlice,
    key: TensorKey,
    first: u32,
    min_key: &[u32; 256],
    n_levels: usize,
    out: &mut Candidates,
) {
    // Room for every element and one vector beyond; only growth is zero-filled.
    for v in [&mut out.offsets, &mut out.keys] {
        v.truncate(levels.len() + 8);
        v.resize(levels.len() + 8, 0);
    }
    let (mut from, mut count) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if n_levels <= REGISTER_LEVELS && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above); both outputs hold
        // `levels.len() + 8` values.
        (from, count) = unsafe {
            match levels {
                LevelSlice::Bytes(b) => {
                    x86::candidates16::<false>(b, b.len(), key, first, min_key, out)
                }
                LevelSlice::Nibbles { bytes, len } => {
                    x86::candidates16::<true>(bytes, len, key, first, min_key, out)
                }
            }
        };
    }
    count = candidates_portable(levels, key, first, min_key, (from, count), out);
    out.offsets.truncate(count);
    out.keys.truncate(count);
}

/// The definition of [`candidates_into`] for the elements from `from` on, `count` candidates
/// being found before them; returns the number of candidates. Branch-free: every element is
/// written at the end, and counted when it passes.
fn candidates_portable(
    levels: LevelSlice,
    key: TensorKey,
    first: u32,
    min_key: &[u32; 256],
    (from, mut count): (usize, usize),
    out: &mut Candidates,
) -> usize {
    for j in from..levels.len() {
        let k = element_key(key, first.wrapping_add(j as u32));
        out.offsets[count] = j as u32;
        out.keys[count] = k;
        count += (k >= min_key[levels.get(j) as usize]) as usize;
    }
    count
}

/// For each 8-bit mask, the positions of its set bits in ascending order (then zeros): the
/// lane permutation that moves the passing lanes of a vector to its front.
const LEFT_PACK: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut bit, mut n) = (0, 0);
        while bit < 8 {
            if mask & (1 << bit) != 0 {
                table[mask][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        mask += 1;
    }
    table
};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{levels_portable, Candidates, LevelRule, TensorKey, LEFT_PACK};
    use std::arch::x86_64::*;

    /// The levels of eight deltas under the constants of [`levels16`], as eight `i32`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn level8(x: __m256, c: &LevelConstants) -> __m256i {
        let t = _mm256_mul_ps(_mm256_sub_ps(x, c.lo), c.k);
        // `clamp(0, L - 1)`; no delta is NaN, so operand order does not matter.
        let t = _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), c.top);
        let j = _mm256_cvttps_epi32(t);
        let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, _mm256_set1_epi32(7)));
        let bound = _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(c.bounds_low, j),
            _mm256_permutevar8x32_ps(c.bounds_high, j),
            high,
        );
        // `j + (x >= B[j])`: the comparison's mask is -1 where true.
        let reached = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, bound));
        _mm256_sub_epi32(j, reached)
    }

    /// A [`LevelRule`] of at most 16 levels, in registers.
    struct LevelConstants {
        lo: __m256,
        k: __m256,
        top: __m256,
        bounds_low: __m256,
        bounds_high: __m256,
    }

    /// [`super::levels_into`] for at most 16 levels, 32 deltas per step.
    ///
    /// # Safety
    /// The CPU must have AVX2; `out.len() == d.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn levels16(d: &[f32], rule: &LevelRule, out: &mut [u8]) {
        let c = LevelConstants {
            lo: _mm256_set1_ps(rule.lo),
            k: _mm256_set1_ps(rule.k),
            top: _mm256_set1_ps(rule.max_level),
            // SAFETY: `bounds` holds 256 values.
            bounds_low: unsafe { _mm256_loadu_ps(rule.bounds.as_ptr()) },
            bounds_high: unsafe { _mm256_loadu_ps(rule.bounds.as_ptr().add(8)) },
        };
        // `packs`/`packus` interleave the 128-bit halves; this puts the dwords back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let full = d.len() / 32 * 32;
        for i in (0..full).step_by(32) {
            // SAFETY: i + 32 <= d.len() == out.len().
            unsafe {
                let p = d.as_ptr().add(i);
                let l0 = level8(_mm256_loadu_ps(p), &c);
                let l1 = level8(_mm256_loadu_ps(p.add(8)), &c);
                let l2 = level8(_mm256_loadu_ps(p.add(16)), &c);
                let l3 = level8(_mm256_loadu_ps(p.add(24)), &c);
                let bytes =
                    _mm256_packus_epi16(_mm256_packs_epi32(l0, l1), _mm256_packs_epi32(l2, l3));
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, bytes);
            }
        }
        levels_portable(&d[full..], rule, &mut out[full..]);
    }

    /// `mix32` of eight lanes ([`crate::algorithm::selection::mix32`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mix32x8(x: __m256i) -> __m256i {
        let x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
        let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
        let x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
        let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68b_u32 as i32));
        _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
    }

    /// Eight levels from element `j` on as `i32` lanes: one per byte, or (`NIBBLES`) two per
    /// byte, element `2i` in the low nibble of byte `i`.
    ///
    /// # Safety
    /// The CPU must have AVX2; `bytes` holds the eight levels (4 bytes from `j / 2`, `j`
    /// even, or 8 bytes from `j`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_levels8<const NIBBLES: bool>(bytes: &[u8], j: usize) -> __m256i {
        // SAFETY: the caller's bounds.
        unsafe {
            if NIBBLES {
                let packed = _mm_cvtsi32_si128(i32::from_le_bytes(
                    bytes[j / 2..j / 2 + 4].try_into().expect("4 bytes"),
                ));
                let low = _mm_and_si128(packed, _mm_set1_epi8(15));
                let high = _mm_and_si128(_mm_srli_epi16::<4>(packed), _mm_set1_epi8(15));
                _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(low, high))
            } else {
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().add(j) as *const __m128i))
            }
        }
    }

    /// [`super::candidates_into`] for `len` levels below 16 in `levels` (one per byte, or two
    /// with `NIBBLES`; a level of 16 or more would read the minimum of its value modulo 8),
    /// eight elements per step: the keys are computed in the lanes, and the passing lanes are
    /// packed to the front (`vpermd` by [`LEFT_PACK`]) and stored whole, the count advancing
    /// by their number. Returns the elements done (a multiple of 8) and the candidates found
    /// among them.
    ///
    /// # Safety
    /// The CPU must have AVX2; `levels` holds `len` levels (`len.div_ceil(2)` bytes with
    /// `NIBBLES`, else `len`); both outputs hold `len + 8` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn candidates16<const NIBBLES: bool>(
        levels: &[u8],
        len: usize,
        key: TensorKey,
        first: u32,
        min_key: &[u32; 256],
        out: &mut Candidates,
    ) -> (usize, usize) {
        debug_assert!(out.offsets.len() >= len + 8 && out.keys.len() >= len + 8);
        debug_assert_eq!(levels.len(), if NIBBLES { len.div_ceil(2) } else { len });
        // SAFETY: `min_key` holds 256 values.
        let (min_low, min_high) = unsafe {
            (
                _mm256_loadu_si256(min_key.as_ptr() as *const __m256i),
                _mm256_loadu_si256(min_key.as_ptr().add(8) as *const __m256i),
            )
        };
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let (k0, k1) = (
            _mm256_set1_epi32(key.k0 as i32),
            _mm256_set1_epi32(key.k1 as i32),
        );
        let (offsets, keys) = (out.offsets.as_mut_ptr(), out.keys.as_mut_ptr());
        let full = len / 8 * 8;
        let mut count = 0;
        for j in (0..full).step_by(8) {
            let offset = _mm256_add_epi32(_mm256_set1_epi32(j as i32), lanes);
            let index = _mm256_add_epi32(offset, _mm256_set1_epi32(first as i32));
            // `element_key`: mix32(mix32(index ^ k0) + k1).
            let k = mix32x8(_mm256_add_epi32(mix32x8(_mm256_xor_si256(index, k0)), k1));
            // SAFETY: j + 8 <= len, j even.
            let l = unsafe { load_levels8::<NIBBLES>(levels, j) };
            let high = _mm256_cmpgt_epi32(l, _mm256_set1_epi32(7));
            let m = _mm256_blendv_epi8(
                _mm256_permutevar8x32_epi32(min_low, l),
                _mm256_permutevar8x32_epi32(min_high, l),
                high,
            );
            // Unsigned `k >= m` as `max(k, m) == k`.
            let reached = _mm256_cmpeq_epi32(_mm256_max_epu32(k, m), k);
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(reached)) as usize;
            // SAFETY: `mask < 256`; count <= j, so 8 values from `count` lie within the
            // outputs' `len + 8`.
            unsafe {
                let order = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    LEFT_PACK[mask].as_ptr() as *const __m128i
                ));
                _mm256_storeu_si256(
                    offsets.add(count) as *mut __m256i,
                    _mm256_permutevar8x32_epi32(offset, order),
                );
                _mm256_storeu_si256(
                    keys.add(count) as *mut __m256i,
                    _mm256_permutevar8x32_epi32(k, order),
                );
            }
            count += mask.count_ones() as usize;
        }
        (full, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::quantize::QuantGrid;
    use crate::algorithm::selection::mix32;

    /// Deltas over `[lo, hi]` that hit every boundary exactly, its neighbours on both sides,
    /// both ends, signed zeros and scattered values; 1003 of them so that the vector loop and
    /// the remainder both run.
    fn deltas(grid: &QuantGrid) -> Vec<f32> {
        let mut d = vec![grid.lo, grid.hi];
        if grid.lo <= 0.0 && grid.hi >= 0.0 {
            d.extend([0.0, -0.0]);
        }
        for b in grid.boundaries().into_iter().filter(|b| b.is_finite()) {
            d.extend([
                b,
                f32::from_bits(b.to_bits() - 1),
                f32::from_bits(b.to_bits() + 1),
            ]);
        }
        let span = grid.hi - grid.lo;
        for i in 0u32.. {
            if d.len() == 1003 {
                break;
            }
            let u = mix32(i) as f32 / u32::MAX as f32;
            d.push((grid.lo + u * span).clamp(grid.lo, grid.hi));
        }
        d
    }

    #[test]
    fn levels_equal_the_rule_at_every_width_and_boundary() {
        for bits in 1..=8 {
            for (lo, hi) in [
                (-0.01f32, 0.013f32),
                (0.0, 1.0),
                (-3.5, -0.25),
                (-1e-3, 0.0),
            ] {
                let grid = QuantGrid { lo, hi, bits };
                let rule = grid.level_rule();
                assert!(rule.by_multiplier);
                let d = deltas(&grid);
                // The dispatching function (AVX2 up to 16 levels where the CPU has it) and
                // the portable loop.
                let (mut got, mut portable) = (vec![0u8; d.len()], vec![0u8; d.len()]);
                levels_into(&d, &rule, &mut got);
                levels_portable(&d, &rule, &mut portable);
                for (i, &x) in d.iter().enumerate() {
                    // The authors' level, by definition.
                    let want = grid.authors_level(x);
                    let case = format!("{bits} bits, [{lo}, {hi}], {i}: {x}");
                    assert_eq!(got[i] as u32, want, "{case}");
                    assert_eq!(portable[i] as u32, want, "{case}");
                }
            }
        }
    }

    #[test]
    fn candidates_are_the_elements_whose_key_reaches_their_level_minimum() {
        let n = 1003;
        let key = TensorKey::new(7, "model", "t");
        for n_levels in [2usize, 16, 256] {
            let levels: Vec<u8> = (0..n as u32)
                .map(|i| (mix32(i) % n_levels as u32) as u8)
                .collect();
            let packed =
                crate::engine::PackedLevels::pack(&levels, if n_levels <= 16 { 4 } else { 8 });
            // Indices near the top of the u32 range wrap around within the chunk.
            for first in [0u32, 12_345, u32::MAX - 500] {
                let keys: Vec<u32> = (0..n as u32)
                    .map(|j| element_key(key, first.wrapping_add(j)))
                    .collect();
                let mut min_key = [u32::MAX; 256];
                for (l, m) in min_key.iter_mut().enumerate().take(n_levels) {
                    *m = match l % 4 {
                        0 => 0,
                        1 => u32::MAX,
                        // One level's minimum is an actual key: `>=` lets it through.
                        2 => keys[l],
                        _ => mix32(l as u32 + 7),
                    };
                }
                let want: Vec<u32> = (0..n)
                    .filter(|&j| keys[j] >= min_key[levels[j] as usize])
                    .map(|j| j as u32)
                    .collect();
                assert!(!want.is_empty() && want.len() < n);
                let want_keys: Vec<u32> = want.iter().map(|&j| keys[j as usize]).collect();
                // One level per byte, packed as stored, and the portable loop.
                for slice in [LevelSlice::Bytes(&levels), packed.slice(0, n)] {
                    let mut got = Candidates::default();
                    candidates_into(slice, key, first, &min_key, n_levels, &mut got);
                    let case = format!("{n_levels} levels from {first}, {slice:?}");
                    assert_eq!(got.offsets, want, "{case}");
                    assert_eq!(got.keys, want_keys, "{case}");
                    let mut portable = Candidates {
                        offsets: vec![0; n + 8],
                        keys: vec![0; n + 8],
                    };
                    let count =
                        candidates_portable(slice, key, first, &min_key, (0, 0), &mut portable);
                    assert_eq!(portable.offsets[..count], want[..], "{case}");
                    assert_eq!(portable.keys[..count], want_keys[..], "{case}");
                }
            }
        }
    }

    #[test]
    fn the_left_pack_table_lists_each_masks_bits() {
        assert_eq!(LEFT_PACK[0b1010_0110], [1, 2, 5, 7, 0, 0, 0, 0]);
        assert_eq!(LEFT_PACK[255], [0, 1, 2, 3, 4, 5, 6, 7]);
    }
}
