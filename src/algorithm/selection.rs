//! Step 3: distribution-aware random pruning with exact per-level counts.
//!
//! Every element `i` of a tensor gets a key `element_key(tensor_key, i)`: a keyed bijection of
//! the 32-bit index, so keys within a tensor are distinct and look uniformly random. In a level
//! with `n_v` entries, the `k_v = round_half_even(n_v * r')` entries with the smallest keys are
//! pruned. The rule names one exact set; engines may find it however they like. The GPU engine
//! uses a bucket method (`src/engine/gpu/buckets.rs`): a histogram of the keys' top bits per
//! level finds the bucket holding each level's cut, and only that bucket's entries are sorted.
//! The CPU engine looks for the cut in a narrow key window around its expected place
//! (`k_v / n_v * 2^32`) in one pass, with an exact fallback. `compress` at a fixed sparsity
//! selects from candidates pass 1 kept ([`crate::engine::CandidateSet`]): every rate is at
//! least [`super::allocation::rate_floor`], so the entries below a per-level floor key are
//! pruned at any rate and need not be hashed again.

use super::{round_half_even, TensorStats};
use crate::splitmix::mix64;

/// Per-tensor key of the selection hash, derived from (seed, model, tensor name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorKey {
    /// XORed into the index before the first mixing round.
    pub k0: u32,
    /// Added between the two mixing rounds.
    pub k1: u32,
}

impl TensorKey {
    /// The key for `tensor` of `model` under `seed`: SplitMix64 chained over the seed, then the
    /// UTF-8 bytes of the model name, a 0xFF separator (not valid UTF-8), and the tensor name.
    pub fn new(seed: u64, model: &str, tensor: &str) -> Self {
        let mut h = mix64(seed);
        for b in model.bytes().chain([0xff]).chain(tensor.bytes()) {
            h = mix64(h ^ b as u64);
        }
        TensorKey {
            k0: h as u32,
            k1: (h >> 32) as u32,
        }
    }
}

/// `lowbias32` (C. Wellons): a bijective 32-bit mixer built from xor-shifts and odd multiplies.
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The selection key of element `index`: `mix32(mix32(index ^ k0) + k1)`. A bijection of the
/// index for a fixed tensor key. Mirrored exactly in `shaders/common.wgsl`.
#[inline(always)]
pub fn element_key(key: TensorKey, index: u32) -> u32 {
    mix32(mix32(index ^ key.k0).wrapping_add(key.k1))
}

/// The zero-adjusted rate `r' = max(0, (r - z) / (1 - z))`; a tensor whose entries all
/// dequantize to zero (`z = 1`) gets `r' = 1`: there is nothing to keep.
pub fn adjusted_rate(rate: f64, zero_fraction: f64) -> f64 {
    if zero_fraction >= 1.0 {
        1.0
    } else {
        ((rate - zero_fraction) / (1.0 - zero_fraction)).max(0.0)
    }
}

/// How many entries each level prunes and keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionPlan {
    /// The tensor's selection key.
    pub key: TensorKey,
    /// Entries per level (the level histogram).
    pub histogram: Vec<u64>,
    /// Entries pruned per level, `k_v`.
    pub pruned: Vec<u64>,
}

impl SelectionPlan {
    /// The plan for a tensor with `stats` and pruning rate `rate`.
    pub fn new(key: TensorKey, stats: &TensorStats, rate: f64) -> Self {
        let r = adjusted_rate(rate, stats.zero_fraction());
        let pruned = stats
            .histogram
            .iter()
            .map(|&n| (round_half_even(n as f64 * r) as u64).min(n))
            .collect();
        SelectionPlan {
            key,
            histogram: stats.histogram.clone(),
            pruned,
        }
    }

    /// Entries kept per level, `n_v - k_v`.
    pub fn kept_counts(&self) -> Vec<u64> {
        self.histogram
            .iter()
            .zip(&self.pruned)
            .map(|(n, k)| n - k)
            .collect()
    }

    /// Total entries kept.
    pub fn kept(&self) -> u64 {
        self.kept_counts().iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::QuantGrid;

    #[test]
    fn mixer_matches_reference_values_and_is_bijective_on_a_range() {
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x6889_90c0); // computed independently in Python
        assert_eq!(mix32(0xdead_beef), 0xe628_c683);
        let key = TensorKey::new(7, "m", "t");
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            assert!(seen.insert(element_key(key, i)));
        }
        assert_ne!(TensorKey::new(7, "m", "t"), TensorKey::new(8, "m", "t"));
        assert_ne!(TensorKey::new(7, "m", "t"), TensorKey::new(7, "mt", ""));
    }

    #[test]
    fn adjusted_rate_and_exact_counts() {
        assert_eq!(adjusted_rate(0.9, 0.0), 0.9);
        assert!((adjusted_rate(0.9, 0.5) - 0.8).abs() < 1e-15);
        assert_eq!(adjusted_rate(0.3, 0.5), 0.0);
        assert_eq!(adjusted_rate(0.9, 1.0), 1.0);
        // levels of 10, 5, 3, 1 entries at r' = 0.5: 5, round(2.5) = 2, round(1.5) = 2, round(0.5) = 0
        let grid = QuantGrid {
            lo: 1.0,
            hi: 4.0,
            bits: 2,
        };
        let stats = TensorStats {
            grid,
            histogram: vec![10, 5, 3, 1],
        };
        let plan = SelectionPlan::new(TensorKey { k0: 0, k1: 0 }, &stats, 0.5);
        assert_eq!(plan.pruned, vec![5, 2, 2, 0]);
        assert_eq!(plan.kept_counts(), vec![5, 3, 1, 1]);
        assert_eq!(plan.kept(), 10);
    }
}
