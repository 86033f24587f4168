//! Step 1: per-tensor uniform min/max quantization, and the statistics of the quantized tensor.
//!
//! The level of a delta is the authors' `round_half_even(f32(f32(x - lo) / f32(hi - lo)) * (L-1))`,
//! every step in f32 as their PyTorch code evaluates it ([`QuantGrid::authors_level`]). The
//! engines do not divide per element: [`LevelRule`] takes `j = floor((x - lo) * k)` with a host
//! multiplier `k` (a subtraction and a product, the same on every device), then
//! `level = j + (x >= B[j])`, where `B[j]` is the smallest f32 whose authors' level exceeds
//! `j`, found once per tensor by bisection. `j` is within 0.5 of the authors' unrounded value,
//! so their level is `j` or `j + 1` and the comparison decides which: exact, ties included.

/// Most levels of a grid: levels are stored as `u8`.
pub const MAX_LEVELS: usize = 256;

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

    /// Whether every delta of the grid is `lo` (`hi <= lo`).
    pub fn is_constant(&self) -> bool {
        self.hi <= self.lo
    }

    /// The authors' level of a delta `x` in `[lo, hi]`:
    /// `round_half_even(f32(f32(f32(x - lo) / f32(hi - lo)) * (L - 1)))`, in f32 (IEEE
    /// division is correctly rounded). Every step is monotone in `x`, so the level is too.
    /// Level 0 for a constant grid; evaluated in f64 should `hi - lo` overflow f32.
    pub fn authors_level(&self, x: f32) -> u32 {
        let max_level = (self.levels() - 1) as u32;
        let span = self.hi - self.lo;
        let level = if self.is_constant() {
            0.0
        } else if span.is_finite() {
            ((x - self.lo) / span * max_level as f32).round_ties_even() as f64
        } else {
            let span = self.hi as f64 - self.lo as f64;
            ((x as f64 - self.lo as f64) / span * max_level as f64).round_ties_even()
        };
        (level as u32).min(max_level)
    }

    /// `B[j]` for `j` in `0..L-1`: the smallest f32 in `[lo, hi]` whose
    /// [`authors_level`](Self::authors_level) is at least `j + 1`, by bisection over the
    /// f32 values in order; `B[L-1] = +inf` (empty for a constant grid: every `B[j]` is
    /// `+inf`).
    pub fn boundaries(&self) -> Vec<f32> {
        let mut bounds = vec![f32::INFINITY; self.levels()];
        if self.is_constant() {
            return bounds;
        }
        let (lo_key, hi_key) = (order_key(self.lo), order_key(self.hi));
        for (j, b) in bounds.iter_mut().enumerate().take(self.levels() - 1) {
            let reaches = |key: u32| self.authors_level(from_order_key(key)) > j as u32;
            // Invariant: `reaches(above)`, and nothing at or below `below` does.
            let (mut below, mut above) = (lo_key, hi_key);
            if reaches(below) {
                above = below;
            }
            while above - below > 1 {
                let mid = below + (above - below) / 2;
                if reaches(mid) {
                    above = mid;
                } else {
                    below = mid;
                }
            }
            *b = from_order_key(above);
        }
        bounds
    }

    /// The per-element rule of this grid, for the engines.
    pub fn level_rule(&self) -> LevelRule {
        let mut bounds = [f32::INFINITY; MAX_LEVELS];
        let b = self.boundaries();
        bounds[..b.len()].copy_from_slice(&b);
        let k = self.multiplier();
        let span = self.hi - self.lo;
        // The multiplier's `j` is within 0.5 of the authors' value while `hi - lo` and `k`
        // are normal f32 (or the grid is constant); a subnormal boundary is excluded too, as
        // a device that flushes denormals could compare it differently.
        let constant = self.is_constant();
        let regular = span.is_finite() && k.is_normal() && k < f32::MAX;
        let tiny_bound = b.iter().any(|x| x.is_subnormal());
        LevelRule {
            lo: self.lo,
            k,
            max_level: (self.levels() - 1) as f32,
            levels: self.levels(),
            bounds,
            by_multiplier: constant || (regular && !tiny_bound),
        }
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

/// The level of each delta as the engines compute it (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct LevelRule {
    /// The grid's `lo`.
    pub lo: f32,
    /// The grid's [`multiplier`](QuantGrid::multiplier).
    pub k: f32,
    /// `L - 1`, as f32.
    pub max_level: f32,
    /// `L`.
    pub levels: usize,
    /// [`QuantGrid::boundaries`], padded with `+inf` to [`MAX_LEVELS`].
    pub bounds: [f32; MAX_LEVELS],
    /// Whether [`level`](Self::level) is exact. When not (spans so small or so large that
    /// `k` is not a normal f32, a subnormal boundary), [`level_by_search`](Self::level_by_search)
    /// is, and the GPU engine leaves the tensor to the CPU.
    pub by_multiplier: bool,
}

impl LevelRule {
    /// `j = min(floor(max((x - lo) * k, 0)), L - 1)`, then `j + (x >= B[j])`.
    #[inline(always)]
    pub fn level(&self, x: f32) -> u8 {
        let j = ((x - self.lo) * self.k).clamp(0.0, self.max_level) as u8;
        j + (x >= self.bounds[j as usize]) as u8
    }

    /// The number of boundaries at or below `x`: the authors' level of any `x` in `[lo, hi]`.
    pub fn level_by_search(&self, x: f32) -> u8 {
        self.bounds[..self.levels - 1].partition_point(|&b| b <= x) as u8
    }
}

/// Order-preserving u32 key of a non-NaN f32 (`order_key` in `shaders/common.wgsl`):
/// `x < y` implies `order_key(x) < order_key(y)`, and the keys between two finite values are
/// finite values.
pub fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The f32 of an [`order_key`].
pub fn from_order_key(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    })
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
        // lo = 0, hi = 15, 4 bits: the level is the value rounded half to even.
        let g = QuantGrid {
            lo: 0.0,
            hi: 15.0,
            bits: 4,
        };
        assert_eq!(g.multiplier(), 1.0);
        let rule = g.level_rule();
        assert!(rule.by_multiplier);
        let lv = |x| rule.level(x);
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
        assert_eq!(g.level_rule().level(0.5), 2); // 1.5 -> 2
        assert_eq!(g.level_rule().level(-0.5), 0); // 0.5 -> 0
    }

    #[test]
    fn constant_tensor_has_one_level_and_no_nan() {
        let g = QuantGrid {
            lo: 0.25,
            hi: 0.25,
            bits: 4,
        };
        assert_eq!(g.multiplier(), 0.0);
        let rule = g.level_rule();
        assert!(rule.by_multiplier);
        assert_eq!(rule.level(0.25), 0);
        assert_eq!(g.authors_level(0.25), 0);
        assert!(g.boundaries().iter().all(|b| *b == f32::INFINITY));
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

    /// The authors' level, restated here independently: f32 steps, division form.
    fn division_form(x: f32, lo: f32, hi: f32, bits: u32) -> u32 {
        let l1 = ((1u32 << bits) - 1) as f32;
        ((x - lo) / (hi - lo) * l1).round_ties_even() as u32
    }

    /// Every f32 from `lo` to `hi`, in order.
    fn every_f32(lo: f32, hi: f32) -> impl Iterator<Item = f32> {
        (order_key(lo)..=order_key(hi)).map(from_order_key)
    }

    #[test]
    fn boundaries_are_the_first_value_of_each_level_by_brute_force() {
        let near_one = |ulps: i32| from_order_key(order_key(1.0).wrapping_add_signed(ulps));
        let spans = [
            (1.0, near_one(3000)),
            (near_one(-1500), near_one(1500)),
            (-1.0001f32, -0.9999f32),
            (-near_one(2000), -1.0),
            (-1e-42f32, 2e-42f32),
            (0.0, 4e-42f32),
        ];
        for (lo, hi) in spans {
            for bits in [1, 2, 4, 8] {
                let g = QuantGrid { lo, hi, bits };
                let (bounds, rule) = (g.boundaries(), g.level_rule());
                let mut first = vec![f32::INFINITY; g.levels()];
                for x in every_f32(lo, hi) {
                    let want = division_form(x, lo, hi, bits);
                    assert_eq!(g.authors_level(x), want, "{x:e} in [{lo:e}, {hi:e}]");
                    for (j, f) in first.iter_mut().enumerate().take(g.levels() - 1) {
                        if want > j as u32 && *f == f32::INFINITY {
                            *f = x;
                        }
                    }
                    assert_eq!(rule.level_by_search(x) as u32, want, "{x:e}");
                    if rule.by_multiplier {
                        assert_eq!(rule.level(x) as u32, want, "{x:e} in [{lo:e}, {hi:e}]");
                    }
                }
                let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits_of(&bounds), bits_of(&first), "[{lo:e}, {hi:e}] {bits}");
            }
        }
        // Subnormal spans cannot use the multiplier; normal ones do.
        let rule = |lo, hi| QuantGrid { lo, hi, bits: 4 }.level_rule().by_multiplier;
        assert!(!rule(-1e-42, 2e-42));
        assert!(rule(1.0, near_one(3000)));
        assert!(!rule(-3e38, 3e38));
    }

    #[test]
    fn the_multiplier_rule_gives_the_division_form_at_ties() {
        // Deltas on a grid of 2^-16 (as f16/bf16 differences are): at a few of them the f32
        // rounding puts `round_half_even((x - lo) * k)` and the division form on different
        // sides of a half-way point (spans found by search).
        let mut differs = 0;
        for (lo_units, hi_units) in [(-4104, 3384), (-3292, 1926)] {
            let (lo, hi) = (lo_units as f32 / 65536.0, hi_units as f32 / 65536.0);
            for bits in [2, 4, 8] {
                let g = QuantGrid { lo, hi, bits };
                let (rule, k, l1) = (g.level_rule(), g.multiplier(), (g.levels() - 1) as f32);
                assert!(rule.by_multiplier);
                for i in lo_units..=hi_units {
                    let x = i as f32 / 65536.0;
                    let want = division_form(x, lo, hi, bits);
                    assert_eq!(rule.level(x) as u32, want, "{x:e}, {bits} bits");
                    let old = ((x - lo) * k).round_ties_even().clamp(0.0, l1) as u32;
                    differs += (old != want) as usize;
                }
            }
        }
        assert!(differs > 0, "no tie where the multiplier form differs");
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
