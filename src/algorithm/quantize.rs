//! Step 1: per-tensor uniform min/max quantization, and the statistics of the quantized tensor.
//!
//! `level(x) = round_half_even((x - lo) * k)` clamped to `0..L-1`, with `k = (L-1)/(hi-lo)`
//! computed once (f64, rounded to f32). Using only subtraction and multiplication per element
//! makes the GPU and CPU agree bit for bit. The released code computes
//! `(x - lo) / (hi - lo) * (L - 1)`; the two can differ only for values within an f32 rounding
//! error of a half-way point between levels.

/// The quantization grid of one tensor: `2^bits` equally spaced levels from `lo` to `hi`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantGrid {
    /// Smallest delta of the tensor.
    pub lo: f32,
    /// Largest delta of the tensor.
    pub hi: f32,
    /// Bit width.
    pub bits: u32,
}

impl QuantGrid {
    /// Number of levels.
    pub fn levels(&self) -> usize {
        1 << self.bits
    }

    /// The per-element multiplier `k = (L-1)/(hi-lo)` (0 for a constant tensor, capped at
    /// `f32::MAX` when `hi - lo` is subnormal).
    pub fn multiplier(&self) -> f32 {
        let span = self.hi as f64 - self.lo as f64;
        if span > 0.0 {
            let k = ((self.levels() - 1) as f64 / span) as f32;
            k.min(f32::MAX)
        } else {
            0.0
        }
    }

    /// Level of a delta value, given `lo`, the [`multiplier`](Self::multiplier) and `L - 1`:
    /// `clamp(round_half_even((x - lo) * k), 0, L - 1)`. Since `x >= lo`, the product is
    /// never negative; clamping first, then adding `1.5 * 2^23` (exact half-to-even rounding
    /// for values below `2^22`) and reading the low mantissa bits gives the same result
    /// without a call to `rintf` on CPUs lacking SSE4.1's `roundss`, and vectorizes.
    #[inline(always)]
    pub fn level_of(x: f32, lo: f32, k: f32, max_level: f32) -> u8 {
        const ROUNDER: f32 = 12_582_912.0;
        let t = ((x - lo) * k).clamp(0.0, max_level);
        // `t + ROUNDER` is exactly `1.5 * 2^23 + round(t)`: its low mantissa bits are the
        // level (an integer operation, so the loop vectorizes without a saturating cast).
        ((t + ROUNDER).to_bits() & 0xff) as u8
    }

    /// Dequantized value of level `q`: `lo + q * (hi - lo) / (L - 1)`, evaluated in f64 and
    /// rounded to f32 (level 0 is exactly `lo`, level `L-1` exactly `hi`).
    pub fn value(&self, q: usize) -> f32 {
        let l1 = (self.levels() - 1) as f64;
        (self.lo as f64 + q as f64 * (self.hi as f64 - self.lo as f64) / l1) as f32
    }

    /// All level values.
    pub fn values(&self) -> Vec<f32> {
        (0..self.levels()).map(|q| self.value(q)).collect()
    }

    /// The delta each level stands for after rescaling: `f32(scale * value(q))`.
    pub fn scaled_values(&self, scale: f64) -> Vec<f32> {
        self.values()
            .iter()
            .map(|&v| (scale * v as f64) as f32)
            .collect()
    }
}

/// What pass 1 learns about a tensor: its grid and level histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    /// The quantization grid.
    pub grid: QuantGrid,
    /// Entries per level (length `2^bits`).
    pub histogram: Vec<u64>,
}

impl TensorStats {
    /// Number of entries.
    pub fn numel(&self) -> u64 {
        self.histogram.iter().sum()
    }

    /// Population standard deviation of the dequantized values, exactly from the histogram (f64).
    pub fn std_dev(&self) -> f64 {
        let n = self.numel();
        if n == 0 {
            return 0.0;
        }
        let values = self.grid.values();
        let weighted = || self.histogram.iter().zip(&values).filter(|(&h, _)| h > 0);
        let mean = weighted().map(|(&h, &v)| h as f64 * v as f64).sum::<f64>() / n as f64;
        let var = weighted()
            .map(|(&h, &v)| h as f64 * (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        var.sqrt()
    }

    /// Fraction of entries whose dequantized value is exactly 0.0.
    pub fn zero_fraction(&self) -> f64 {
        let n = self.numel();
        if n == 0 {
            return 0.0;
        }
        let zeros: u64 = (0..self.grid.levels())
            .filter(|&q| self.grid.value(q) == 0.0)
            .map(|q| self.histogram[q])
            .sum();
        zeros as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_half_to_even() {
        // lo = 0, hi = 15, 4 bits: k = 1, so the level is the value rounded half to even.
        let g = QuantGrid {
            lo: 0.0,
            hi: 15.0,
            bits: 4,
        };
        let k = g.multiplier();
        assert_eq!(k, 1.0);
        let lv = |x| QuantGrid::level_of(x, g.lo, k, 15.0);
        assert_eq!(
            [lv(0.5), lv(1.5), lv(2.5), lv(2.4999), lv(14.5), lv(15.0)],
            [0, 2, 2, 2, 14, 15]
        );
        assert_eq!(g.value(0), 0.0);
        assert_eq!(g.value(15), 15.0);
        // Asymmetric grid: lo = -1, hi = 2, 2 bits: values -1, 0, 1, 2.
        let g = QuantGrid {
            lo: -1.0,
            hi: 2.0,
            bits: 2,
        };
        assert_eq!(g.values(), vec![-1.0, 0.0, 1.0, 2.0]);
        assert_eq!(QuantGrid::level_of(0.5, -1.0, g.multiplier(), 3.0), 2); // 1.5 -> 2
        assert_eq!(QuantGrid::level_of(-0.5, -1.0, g.multiplier(), 3.0), 0); // 0.5 -> 0
    }

    #[test]
    fn constant_tensor_has_one_level_and_no_nan() {
        let g = QuantGrid {
            lo: 0.25,
            hi: 0.25,
            bits: 4,
        };
        assert_eq!(g.multiplier(), 0.0);
        assert_eq!(QuantGrid::level_of(0.25, 0.25, 0.0, 15.0), 0);
        let mut histogram = vec![0; 16];
        histogram[0] = 10;
        let st = TensorStats { grid: g, histogram };
        assert_eq!(st.std_dev(), 0.0);
        assert_eq!(st.zero_fraction(), 0.0);
        let zero = TensorStats {
            grid: QuantGrid {
                lo: 0.0,
                hi: 0.0,
                bits: 4,
            },
            ..st
        };
        assert_eq!(zero.zero_fraction(), 1.0);
    }

    #[test]
    fn std_and_zero_fraction_from_histogram() {
        // values -1, 0, 1, 2 with counts 1, 2, 0, 1: mean 0.25, var = (1.5625 + 2*0.0625 + 3.0625)/4
        let st = TensorStats {
            grid: QuantGrid {
                lo: -1.0,
                hi: 2.0,
                bits: 2,
            },
            histogram: vec![1, 2, 0, 1],
        };
        assert!((st.std_dev() - (4.75f64 / 4.0).sqrt()).abs() < 1e-15);
        assert_eq!(st.zero_fraction(), 0.5);
    }
}
