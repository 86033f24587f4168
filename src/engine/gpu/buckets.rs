//! The bucket method by which the GPU engine finds each level's pruning threshold (the rule
//! itself is in [`crate::algorithm::selection`]): the levels kernel counts every level's keys
//! per bucket (their top
//! [`BUCKET_BITS`](super::constants::BUCKET_BITS) bits); [`bucket_cuts`] finds the bucket holding each
//! level's cut; the gather kernel returns the keys of those buckets only, as candidates
//! ([`decode_candidate`]); and [`threshold_from_candidates`] picks the cut among them.

use super::constants::{BUCKETS, BUCKET_SHIFT, KEY_LOW_MASK};

/// Where a level's cut lies: in `bucket`, after `rank` of that bucket's entries (1-based:
/// the `rank`-th smallest key of the bucket is the last one pruned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCut {
    /// The bucket holding the largest pruned key.
    pub bucket: u32,
    /// How many of the bucket's entries (smallest keys first) are pruned, >= 1.
    pub rank: u64,
}

/// For each level, the bucket holding its cut (`None` when nothing is pruned), from the
/// per-level bucket histogram laid out level-major (`hist[level * BUCKETS + bucket]`).
pub fn bucket_cuts(hist: &[u64], pruned: &[u64]) -> Vec<Option<BucketCut>> {
    pruned
        .iter()
        .enumerate()
        .map(|(level, &k)| {
            if k == 0 {
                return None;
            }
            let row = &hist[level * BUCKETS..(level + 1) * BUCKETS];
            let mut below = 0u64;
            for (b, &c) in row.iter().enumerate() {
                if below + c >= k {
                    return Some(BucketCut {
                        bucket: b as u32,
                        rank: k - below,
                    });
                }
                below += c;
            }
            unreachable!("bucket histogram holds fewer entries than the plan prunes")
        })
        .collect()
}

/// Threshold of one level from the keys found in its cut bucket: entries with
/// `key < threshold` are pruned. `None` cut gives 0 (prune nothing). The candidates are
/// reordered in place.
pub fn threshold_from_candidates(cut: Option<BucketCut>, candidates: &mut [u32]) -> u64 {
    match cut {
        None => 0,
        Some(c) => {
            let r = c.rank as usize - 1;
            let (_, nth, _) = candidates.select_nth_unstable(r);
            *nth as u64 + 1
        }
    }
}

/// Thresholds as the GPU kernels take them: `(threshold as u32, prune_all flag)`, since a
/// threshold of `2^32` (prune every key) does not fit in a u32.
pub fn split_threshold(t: u64) -> (u32, u32) {
    if t > u32::MAX as u64 {
        (0, 1)
    } else {
        (t as u32, 0)
    }
}

/// The level and key of a candidate word of the gather kernel, `(level << BUCKET_SHIFT) |
/// (key & KEY_LOW_MASK)`: the key's top bits are its level's cut bucket. `None` for a level
/// without a cut (a device error).
pub fn decode_candidate(word: u32, cuts: &[Option<BucketCut>]) -> Option<(usize, u32)> {
    let level = (word >> BUCKET_SHIFT) as usize;
    let cut = cuts.get(level).copied().flatten()?;
    Some((level, (cut.bucket << BUCKET_SHIFT) | (word & KEY_LOW_MASK)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gpu::constants::BUCKET_BITS;

    /// Bucket of a key, as the levels kernel computes it (`key >> BUCKET_SHIFT`).
    fn bucket_of(key: u32) -> usize {
        (key >> BUCKET_SHIFT) as usize
    }
    use crate::algorithm::selection::{element_key, mix32, TensorKey};

    #[test]
    fn bucket_method_finds_the_k_smallest_keys() {
        let key = TensorKey::new(1, "model", "w");
        let levels: Vec<usize> = (0..50_000u32)
            .map(|i| (mix32(i * 7 + 1) % 3) as usize)
            .collect();
        let pruned = [0u64, 1, 9_000];
        let mut hist = vec![0u64; 3 * BUCKETS];
        for (i, &l) in levels.iter().enumerate() {
            hist[l * BUCKETS + bucket_of(element_key(key, i as u32))] += 1;
        }
        let cuts = bucket_cuts(&hist, &pruned);
        for level in 0..3 {
            let mut keys: Vec<u32> = (0..levels.len())
                .filter(|&i| levels[i] == level)
                .map(|i| element_key(key, i as u32))
                .collect();
            let mut cand: Vec<u32> = keys
                .iter()
                .copied()
                .filter(|&k| cuts[level].is_some_and(|c| bucket_of(k) as u32 == c.bucket))
                .collect();
            let t = threshold_from_candidates(cuts[level], &mut cand);
            keys.sort_unstable();
            let pruned_here = keys.iter().filter(|&&k| (k as u64) < t).count() as u64;
            assert_eq!(pruned_here, pruned[level]);
            if pruned[level] > 0 {
                assert_eq!(t, keys[pruned[level] as usize - 1] as u64 + 1);
            }
        }
        assert_eq!(split_threshold(1 << 32), (0, 1));
        assert_eq!(split_threshold(5), (5, 0));
    }

    #[test]
    fn candidates_carry_their_level_and_key() {
        let cut = |bucket| Some(BucketCut { bucket, rank: 1 });
        let cuts = [None, cut(0xabc), cut(0)];
        let key = 0xabc1_2345u32;
        assert_eq!(BUCKET_BITS, 12);
        assert_eq!(bucket_of(key), 0xabc);
        assert_eq!(
            decode_candidate((1 << 20) | 0x1_2345, &cuts),
            Some((1, key))
        );
        assert_eq!(
            decode_candidate((2 << 20) | 0xf_ffff, &cuts),
            Some((2, 0xf_ffff))
        );
        assert_eq!(decode_candidate(0x1_2345, &cuts), None);
        assert_eq!(decode_candidate(3 << 20, &cuts), None);
    }
}
