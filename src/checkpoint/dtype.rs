//! Element types of checkpoint tensors and their conversion to and from f32.
//!
//! Only f16, bf16 and f32 tensors are compressed; every other safetensors dtype is carried
//! through byte for byte. Conversions to f32 are exact; conversions from f32 round to nearest,
//! ties to even (as PyTorch's `.to()` does).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
pub use safetensors::Dtype;

/// The float element types the engines understand (the compressible dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FloatType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
}

impl FloatType {
    /// The compressible float type of a safetensors dtype, if it is one.
    pub fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            Dtype::F32 => Some(FloatType::F32),
            _ => None,
        }
    }
    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatType::F16 => Dtype::F16,
            FloatType::BF16 => Dtype::BF16,
            FloatType::F32 => Dtype::F32,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F32 => 4,
        }
    }
    /// Code used in GPU uniforms: 0 = f16, 1 = bf16, 2 = f32.
    pub fn code(self) -> u32 {
        match self {
            FloatType::F16 => 0,
            FloatType::BF16 => 1,
            FloatType::F32 => 2,
        }
    }
    /// Largest finite value of this type.
    pub fn max_finite(self) -> f32 {
        match self {
            FloatType::F16 => f16::MAX.to_f32(),
            FloatType::BF16 => bf16::MAX.to_f32(),
            FloatType::F32 => f32::MAX,
        }
    }
    /// Whether `v` rounds (nearest, ties to even, as [`store`](Self::store)) to a finite value
    /// of this type: one comparison, for the restore loop. False for NaN.
    #[inline(always)]
    pub fn holds(self, v: f32) -> bool {
        // Half-way between the largest finite value and the next power of two, which rounds
        // to infinity (its even neighbour).
        let overflow = match self {
            FloatType::F16 => 65520.0,
            FloatType::BF16 => f32::from_bits(0x7F7F_8000),
            FloatType::F32 => f32::INFINITY,
        };
        v.abs() < overflow
    }
    /// Element `i` of little-endian `bytes` as f32 (exact).
    #[inline(always)]
    pub fn load(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            FloatType::F16 => {
                f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            FloatType::BF16 => {
                bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            FloatType::F32 => f32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
        }
    }
    /// Stores `v` rounded to this type (nearest, ties to even) as element `i` of `bytes`.
    #[inline(always)]
    pub fn store(self, bytes: &mut [u8], i: usize, v: f32) {
        match self {
            FloatType::F16 => {
                bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
            }
            FloatType::BF16 => {
                bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
            }
            FloatType::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        }
    }

    /// Decodes all of little-endian `bytes` into `out` (resized to the element count; only
    /// its growth is zero-filled, every element is overwritten). Uses the vectorized slice
    /// conversions (F16C where the CPU has it) when `bytes` is aligned.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        let n = bytes.len() / self.size();
        out.truncate(n);
        out.resize(n, 0.0);
        match self {
            FloatType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
                Ok(src) => src.convert_to_f32_slice(out),
                Err(_) => out
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, o)| *o = self.load(bytes, i)),
            },
            FloatType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(src) => out
                    .iter_mut()
                    .zip(src)
                    .for_each(|(o, &b)| *o = f32::from_bits((b as u32) << 16)),
                Err(_) => out
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, o)| *o = self.load(bytes, i)),
            },
            FloatType::F32 => out
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        }
    }
    /// Appends `values` rounded to this type (nearest, ties to even) as little-endian bytes.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            FloatType::F16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())),
            FloatType::BF16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())),
            FloatType::F32 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
        }
    }
}

/// Bytes taken by `numel` elements of `dtype` (sub-byte types rounded up).
pub fn byte_len(dtype: Dtype, numel: u64) -> u64 {
    (numel * dtype.bitsize() as u64).div_ceil(8)
}

/// [`byte_len`], or `None` where the size overflows `u64` (for sizes read from untrusted files).
pub fn checked_byte_len(dtype: Dtype, numel: u64) -> Option<u64> {
    numel
        .checked_mul(dtype.bitsize() as u64)
        .map(|bits| bits.div_ceil(8))
}

/// The dtype a safetensors header or a `.udelta` index spells `name` (`"F16"`, `"BF16"`, ...),
/// if there is one; the inverse of [`dtype_name`].
pub fn dtype_from_name(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

/// The dtype's name as safetensors headers spell it (`"F16"`, `"BF16"`, ...).
pub fn dtype_name(dtype: Dtype) -> String {
    serde_json::to_value(dtype)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{dtype:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_is_exactly_whether_the_stored_value_is_finite() {
        let mut probes = vec![
            0.0f32, 1.0, 65504.0, 65519.0, 65520.0, 1e5, 3.0e38, 3.3895e38,
        ];
        probes.extend([
            f32::from_bits(0x7F7F_7FFF),
            f32::from_bits(0x7F7F_8000),
            f32::MAX,
        ]);
        probes.extend([f32::INFINITY, f32::NAN]);
        for t in [FloatType::F16, FloatType::BF16, FloatType::F32] {
            assert!(t.max_finite().is_finite() && !t.holds(f32::NAN));
            for v in probes.iter().flat_map(|&v| [v, -v]) {
                let mut b = vec![0u8; 4];
                t.store(&mut b, 0, v);
                assert_eq!(t.holds(v), t.load(&b, 0).is_finite(), "{t:?} {v}");
            }
        }
        assert_eq!(FloatType::F16.max_finite(), 65504.0);
    }

    #[test]
    fn round_trip_and_rounding() {
        let vals = [0.0f32, -1.5, 65504.0, 1.0e-7, 1.2345678];
        for ft in [FloatType::F16, FloatType::BF16, FloatType::F32] {
            let mut bytes = Vec::new();
            ft.encode_into(&vals, &mut bytes);
            assert_eq!(bytes.len(), vals.len() * ft.size());
            let mut back = Vec::new();
            ft.decode_into(&bytes, &mut back);
            for (i, (&v, &b)) in vals.iter().zip(&back).enumerate() {
                assert_eq!(ft.load(&bytes, i), b);
                let tol = match ft {
                    FloatType::F32 => 0.0,
                    FloatType::F16 => v.abs() * 1.0e-3 + 6.0e-8,
                    FloatType::BF16 => v.abs() * 8.0e-3,
                };
                assert!((v - b).abs() <= tol, "{ft:?}: {v} -> {b}");
            }
        }
        // bf16 1.0 + 2^-8 is a tie between 1.0 and 1.0078125: even mantissa wins.
        let mut bytes = Vec::new();
        FloatType::BF16.encode_into(&[1.0 + 1.0 / 256.0], &mut bytes);
        assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), 0x3f80);
        assert_eq!(dtype_name(Dtype::BF16), "BF16");
        assert_eq!(byte_len(Dtype::F4, 3), 2);
    }
}
