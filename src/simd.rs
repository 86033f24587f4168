//! Run-time dispatch of hot loops to AVX2 where the CPU has it.
//!
//! [`multiversion!`](crate::simd::multiversion) compiles one loop body twice: for the baseline
//! target and with AVX2 enabled (checked at run time). Results are identical: the bodies use
//! only exact integer operations and IEEE single operations that round the same at any vector
//! width (Rust never contracts `a * b + c` into an FMA), so only the speed changes.

/// Defines `fn NAME(args) -> RET` whose body runs compiled for AVX2 when the CPU has it.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `out[i] = f32(finetuned[i]) - f32(base[i])` for little-endian f16 bytes (`2 * out.len()`
/// bytes each): the conversion and the subtraction in one pass, with F16C where the CPU has
/// it. Exact conversions and one IEEE subtraction, so every path gives the same bits.
///
/// # Panics
/// If either byte slice is shorter than `2 * out.len()`.
pub fn f16_delta_into(finetuned: &[u8], base: &[u8], out: &mut [f32]) {
    let n = out.len();
    let (finetuned, base) = (&finetuned[..2 * n], &base[..2 * n]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C (checked above); the slices hold 2n bytes.
        unsafe { f16_delta_f16c(finetuned, base, out) };
        return;
    }
    f16_delta_scalar(finetuned, base, out);
}

multiversion! {
    /// `out[i] = f32(finetuned[i]) - f32(base[i])` for little-endian bf16 bytes (`2 *
    /// out.len()` bytes each): the widening (a shift) and the subtraction in one pass.
    ///
    /// # Panics
    /// If either byte slice is shorter than `2 * out.len()`.
    pub fn bf16_delta_into(finetuned: &[u8], base: &[u8], out: &mut [f32]) {
        let n = out.len();
        let load = |b: &[u8]| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        for ((o, f), b) in out
            .iter_mut()
            .zip(finetuned[..2 * n].chunks_exact(2))
            .zip(base[..2 * n].chunks_exact(2))
        {
            *o = load(f) - load(b);
        }
    }
}

multiversion! {
    /// `out[i] = finetuned[i] - base[i]` for little-endian f32 bytes (`4 * out.len()` bytes
    /// each).
    ///
    /// # Panics
    /// If either byte slice is shorter than `4 * out.len()`.
    pub fn f32_delta_into(finetuned: &[u8], base: &[u8], out: &mut [f32]) {
        let n = out.len();
        let load = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for ((o, f), b) in out
            .iter_mut()
            .zip(finetuned[..4 * n].chunks_exact(4))
            .zip(base[..4 * n].chunks_exact(4))
        {
            *o = load(f) - load(b);
        }
    }
}

/// Portable [`f16_delta_into`] for elements from the start of the slices.
fn f16_delta_scalar(finetuned: &[u8], base: &[u8], out: &mut [f32]) {
    let load = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    for ((o, f), b) in out
        .iter_mut()
        .zip(finetuned.chunks_exact(2))
        .zip(base.chunks_exact(2))
    {
        *o = load(f) - load(b);
    }
}

/// [`f16_delta_into`] eight elements at a time with `vcvtph2ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_delta_f16c(finetuned: &[u8], base: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::_mm_loadu_si128;
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm256_sub_ps};
    let full = out.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= out.len(), and both byte slices hold 2 * out.len() bytes.
        unsafe {
            let f = _mm256_cvtph_ps(_mm_loadu_si128(
                finetuned.as_ptr().add(2 * i) as *const __m128i
            ));
            let b = _mm256_cvtph_ps(_mm_loadu_si128(base.as_ptr().add(2 * i) as *const __m128i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_sub_ps(f, b));
        }
    }
    f16_delta_scalar(&finetuned[2 * full..], &base[2 * full..], &mut out[full..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_delta_matches_the_scalar_conversion_for_every_pair_class() {
        // Zeros of both signs, subnormals, the largest finite values, ordinary values; 37
        // elements so that the vector loop and the remainder both run.
        let specials: [u16; 8] = [
            0x0000, 0x8000, 0x0001, 0x83ff, 0x7bff, 0xfbff, 0x3c00, 0xb555,
        ];
        let ft: Vec<u16> = (0..37).map(|i| specials[i % 8] ^ (i as u16 * 7)).collect();
        let base: Vec<u16> = (0..37).map(|i| specials[(i * 3) % 8]).collect();
        let bytes = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (fb, bb) = (bytes(&ft), bytes(&base));
        let mut got = vec![0.0f32; 37];
        f16_delta_into(&fb, &bb, &mut got);
        for i in 0..37 {
            let want =
                half::f16::from_bits(ft[i]).to_f32() - half::f16::from_bits(base[i]).to_f32();
            assert_eq!(got[i].to_bits(), want.to_bits(), "element {i}");
        }
    }
}
