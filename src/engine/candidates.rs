//! Selection candidates: what pass 1 keeps of a compressed tensor for pass 2 when the run's
//! pruning rates have a known floor, so that pass 2 hashes a few percent of the elements
//! instead of all of them.
//!
//! The selection prunes, in each level `v` of `n_v` entries, the `k_v` entries with the
//! smallest keys ([`crate::algorithm::selection`]). `k_v` grows with the tensor's rate, and
//! the rate is known only after the allocation, which needs every tensor's pass 1. But every
//! rate the allocation can give is at least a floor known before pass 1
//! ([`crate::algorithm::allocation::rate_floor`]), so at least `f_v` entries of each level
//! are pruned, `f_v` being the count at the floor. Pass 1, which has every element's level
//! and time to spare while the disk streams, computes every key and keeps as candidates only
//! the entries whose key is at or above a per-level floor key `t_v` placed, like the CPU
//! selection's windows, 8 standard deviations below the expected cut of `f_v`; it counts the
//! others per level (`below_v`), and makes sure `below_v <= f_v <= k_v` (a level where that
//! fails, about once in 10^14 levels, keeps every entry as a candidate). Pass 2 then prunes
//! the `k_v - below_v` candidates with the smallest keys: exactly the rule's set, as every
//! entry below `t_v` is pruned by it anyway.
//!
//! A candidate takes 5 bytes (position and level) against half a byte per element for the
//! packed levels at 4 bits (one byte above): candidates are kept when they are expected to
//! take fewer bytes than the levels, at 4 bits when they are fewer than a tenth of the
//! elements (at the default sparsity 0.95 and step 0.01 they are about 6.5 %).

use super::cpu::{
    for_chunks, level_histogram, prefilter_keys, thresholds_in_windows, window_start, Windows,
    WINDOW_SIGMAS,
};
use super::{check_kept, kernels, EngineError, KeptEntries, PackedLevels};
use crate::algorithm::selection::element_key;
use crate::algorithm::{SelectionPlan, TensorKey, TensorStats};
use rayon::prelude::*;

/// Bytes one candidate takes: its position (u32) and its level (u8).
pub const CANDIDATE_BYTES: usize = 5;

/// The candidates of one tensor (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateSet {
    /// The selection key the candidates were chosen under (pass 2 must select under it).
    pub key: TensorKey,
    /// Per level, the entries that are not candidates (each with a key below its level's
    /// floor key, so pruned at any rate at or above the floor).
    pub below: Vec<u64>,
    /// Element indices of the candidates, ascending.
    pub positions: Vec<u32>,
    /// The candidates' levels.
    pub levels: Vec<u8>,
}

impl CandidateSet {
    /// The candidates of a tensor with `levels` and `stats` (its histogram and grid) under
    /// `key`, for any pruning rate at or above `floor_rate`.
    pub fn extract(
        levels: &PackedLevels,
        stats: &TensorStats,
        key: TensorKey,
        floor_rate: f64,
    ) -> CandidateSet {
        Self::extract_with_margin(levels, stats, key, floor_rate, WINDOW_SIGMAS)
    }

    /// [`extract`](Self::extract) with each floor key `sigmas` standard deviations below
    /// the floor's expected cut.
    fn extract_with_margin(
        levels: &PackedLevels,
        stats: &TensorStats,
        key: TensorKey,
        floor_rate: f64,
        sigmas: f64,
    ) -> CandidateSet {
        let floor = SelectionPlan::new(key, stats, floor_rate);
        let mut floor_keys: Vec<u64> = floor
            .histogram
            .iter()
            .zip(&floor.pruned)
            .map(|(&n, &k)| window_start(n, k, sigmas))
            .collect();
        let set = Self::at_floor_keys(levels, &stats.histogram, key, &floor_keys);
        // A level with more entries below its floor key than the floor prunes keeps all.
        let short: Vec<usize> = (0..floor_keys.len())
            .filter(|&l| set.below[l] > floor.pruned[l])
            .collect();
        if short.is_empty() {
            return set;
        }
        short.iter().for_each(|&l| floor_keys[l] = 0);
        Self::at_floor_keys(levels, &stats.histogram, key, &floor_keys)
    }

    /// The entries whose key is at or above their level's floor key, in a tensor whose level
    /// histogram is `histogram`.
    fn at_floor_keys(
        levels: &PackedLevels,
        histogram: &[u64],
        key: TensorKey,
        floor_keys: &[u64],
    ) -> CandidateSet {
        let n_levels = floor_keys.len();
        let min_key = prefilter_keys(floor_keys.iter().copied());
        let pieces = for_chunks(levels.numel(), |start, len, sc| {
            let slice = levels.slice(start, len);
            kernels::candidates_into(
                slice,
                key,
                start as u32,
                &min_key,
                n_levels,
                &mut sc.candidates,
            );
            let c = &sc.candidates;
            let mut piece = KeptEntries::default();
            piece.positions.reserve(c.offsets.len());
            piece.levels.reserve(c.offsets.len());
            for (&j, &k) in c.offsets.iter().zip(&c.keys) {
                let l = slice.get(j as usize);
                if u64::from(k) >= floor_keys[l as usize] {
                    piece.positions.push(start as u32 + j);
                    piece.levels.push(l);
                }
            }
            piece
        });
        let KeptEntries { positions, levels } = KeptEntries::concat(pieces);
        let candidates = level_histogram(&levels, n_levels);
        let below = histogram
            .iter()
            .zip(&candidates)
            .map(|(n, c)| n - c)
            .collect();
        CandidateSet {
            key,
            below,
            positions,
            levels,
        }
    }

    /// Hands the buffers over to the next tensor's.
    pub fn recycle(self) {
        let (positions, levels) = (self.positions, self.levels);
        KeptEntries { positions, levels }.recycle();
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// True when there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Bytes the candidates take in memory (or in a file).
    pub fn byte_len(&self) -> usize {
        self.len() * CANDIDATE_BYTES
    }

    /// Whether a tensor of `numel` elements whose levels take `packed_bytes` is better kept as
    /// candidates for rates from `floor_rate` on, judged before extracting them: the expected
    /// candidates (a fraction `1 - floor_rate`, plus a margin) must take fewer bytes.
    pub fn worth_it(numel: usize, packed_bytes: usize, floor_rate: f64) -> bool {
        let expected = (1.0 - floor_rate + 0.01).min(1.0) * numel as f64;
        expected * (CANDIDATE_BYTES as f64) < packed_bytes as f64
    }

    /// The kept entries under `plan`: in each level, the candidates beyond the
    /// `k_v - below_v` with the smallest keys. The same entries as the CPU engine's selection
    /// from every level ([`super::cpu::CpuEngine`]'s `select_levels`), found the same way:
    /// the cut among the keys in a narrow window, or, should it fall outside, among all the
    /// level's candidates.
    pub fn select(&self, plan: &SelectionPlan) -> Result<KeptEntries, EngineError> {
        self.select_with_margin(plan, WINDOW_SIGMAS)
    }

    /// [`select`](Self::select) with windows `sigmas` wide (with 0, most cuts fall outside).
    fn select_with_margin(
        &self,
        plan: &SelectionPlan,
        sigmas: f64,
    ) -> Result<KeptEntries, EngineError> {
        self.check_plan(plan)?;
        let windows = Windows::new(plan, sigmas);
        let mut tally = self.tally(&windows);
        let thresholds = match tally.thresholds(plan, &windows) {
            Some(t) => t,
            None => {
                let whole = Windows::whole(self.below.len());
                tally = self.tally(&whole);
                tally.thresholds(plan, &whole).ok_or_else(|| {
                    EngineError::Inconsistent("no cut among the candidates".into())
                })?
            }
        };
        let kept = self.kept_at(&thresholds, &tally.kept_per_piece(&thresholds));
        check_kept(&kept, plan)?;
        Ok(kept)
    }

    /// Checks that `plan` is for these candidates: same key, same histogram, and no level
    /// pruning fewer entries than were set aside (a rate below the floor).
    fn check_plan(&self, plan: &SelectionPlan) -> Result<(), EngineError> {
        let inconsistent = |what: String| Err(EngineError::Inconsistent(what));
        if plan.key != self.key {
            return inconsistent("candidates kept under another selection key".into());
        }
        let candidates = level_histogram(&self.levels, self.below.len());
        let histogram: Vec<u64> = self
            .below
            .iter()
            .zip(&candidates)
            .map(|(b, c)| b + c)
            .collect();
        if histogram != plan.histogram {
            return inconsistent(format!(
                "candidates of levels {histogram:?}, plan {:?}",
                plan.histogram
            ));
        }
        for (l, (&b, &k)) in self.below.iter().zip(&plan.pruned).enumerate() {
            if b > k {
                return inconsistent(format!(
                    "level {l} prunes {k} entries, but {b} were set aside as below the rate floor"
                ));
            }
        }
        Ok(())
    }

    /// Where the candidates' keys fall against `windows`, piece by piece (keys computed a
    /// run of [`RUN`] at a time).
    fn tally(&self, windows: &Windows) -> Tally {
        let n_levels = self.below.len();
        let pieces = self
            .positions
            .par_chunks(PIECE)
            .zip(self.levels.par_chunks(PIECE))
            .map(|(positions, levels)| {
                let mut under = [0u64; 256];
                let mut piece = PieceTally::default();
                let mut keys = [0u32; RUN];
                for (pos, lev) in positions.chunks(RUN).zip(levels.chunks(RUN)) {
                    let keys = &mut keys[..pos.len()];
                    keys_of(self.key, pos, keys);
                    for (&l, &k) in lev.iter().zip(keys.iter()) {
                        let (lo, hi) = windows.of(l);
                        let k = u64::from(k);
                        under[l as usize] += u64::from(k < lo);
                        piece.above += usize::from(k >= hi);
                        if k >= lo && k < hi {
                            piece.window.push((l, k as u32));
                        }
                    }
                }
                piece.under = under[..n_levels].to_vec();
                piece
            })
            .collect();
        Tally {
            set_aside: self.below.clone(),
            pieces,
        }
    }

    /// The candidates whose key reaches their level's threshold, each piece writing its
    /// `kept[i]` entries straight into its place in the result (compacted a run at a time
    /// without a branch per candidate).
    fn kept_at(&self, thresholds: &[u64], kept: &[usize]) -> KeptEntries {
        let mut out = KeptEntries::filled(kept.iter().sum());
        let mut slices = Vec::with_capacity(kept.len());
        let (mut positions, mut levels) = (&mut out.positions[..], &mut out.levels[..]);
        for &n in kept {
            let (p, rest_p) = positions.split_at_mut(n);
            let (l, rest_l) = levels.split_at_mut(n);
            slices.push((p, l));
            (positions, levels) = (rest_p, rest_l);
        }
        let mut threshold = [0u64; 256];
        threshold[..thresholds.len()].copy_from_slice(thresholds);
        slices
            .into_par_iter()
            .zip(self.positions.par_chunks(PIECE))
            .zip(self.levels.par_chunks(PIECE))
            .for_each(|(((out_p, out_l), positions), levels)| {
                let mut keys = [0u32; RUN];
                let (mut run_p, mut run_l) = ([0u32; RUN], [0u8; RUN]);
                let mut written = 0;
                for (pos, lev) in positions.chunks(RUN).zip(levels.chunks(RUN)) {
                    let keys = &mut keys[..pos.len()];
                    keys_of(self.key, pos, keys);
                    let mut at = 0;
                    for ((&p, &l), &k) in pos.iter().zip(lev).zip(keys.iter()) {
                        run_p[at] = p;
                        run_l[at] = l;
                        at += usize::from(u64::from(k) >= threshold[l as usize]);
                    }
                    out_p[written..written + at].copy_from_slice(&run_p[..at]);
                    out_l[written..written + at].copy_from_slice(&run_l[..at]);
                    written += at;
                }
                debug_assert_eq!(written, out_p.len());
            });
        out
    }
}

/// Where one piece's candidates fall against the levels' windows.
#[derive(Default)]
struct PieceTally {
    /// Per level, the candidates below the window (pruned).
    under: Vec<u64>,
    /// The candidates in a window: level and key.
    window: Vec<(u8, u32)>,
    /// The candidates above their window (kept).
    above: usize,
}

/// Where every candidate falls against the levels' windows.
struct Tally {
    /// Per level, the entries set aside in pass 1 (below the floor key, pruned).
    set_aside: Vec<u64>,
    pieces: Vec<PieceTally>,
}

impl Tally {
    /// Per level, the smallest key kept (`None` when a cut falls outside its window).
    fn thresholds(&self, plan: &SelectionPlan, windows: &Windows) -> Option<Vec<u64>> {
        let mut below = self.set_aside.clone();
        let mut window_keys = vec![Vec::new(); below.len()];
        for p in &self.pieces {
            below.iter_mut().zip(&p.under).for_each(|(b, &n)| *b += n);
            p.window
                .iter()
                .for_each(|&(l, k)| window_keys[l as usize].push(k));
        }
        thresholds_in_windows(&below, &mut window_keys, plan, windows)
    }

    /// The entries each piece keeps under `thresholds`: those above their window, and those
    /// in it at or above the threshold.
    fn kept_per_piece(&self, thresholds: &[u64]) -> Vec<usize> {
        self.pieces
            .iter()
            .map(|p| {
                let in_window = p.window.iter();
                p.above
                    + in_window
                        .filter(|&&(l, k)| u64::from(k) >= thresholds[l as usize])
                        .count()
            })
            .collect()
    }
}

/// Candidates per parallel piece of [`CandidateSet::select`].
const PIECE: usize = 1 << 16;

/// Candidates whose keys are computed together (on the stack).
const RUN: usize = 1024;

crate::simd::multiversion! {
    /// `out[i] = element_key(key, positions[i])`.
    fn keys_of(key: TensorKey, positions: &[u32], out: &mut [u32]) {
        for (o, &p) in out.iter_mut().zip(positions) {
            *o = element_key(key, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::selection::adjusted_rate;
    use crate::algorithm::QuantGrid;
    use crate::engine::cpu::CpuEngine;
    use crate::engine::Engine;
    use crate::splitmix::SplitMix64;

    /// Levels drawn from a bell over `n_levels` levels, some levels rare.
    fn random_levels(n: usize, n_levels: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| {
                let a = (rng.next_u64() % n_levels as u64) as usize;
                let b = (rng.next_u64() % n_levels as u64) as usize;
                ((a + b) / 2) as u8
            })
            .collect()
    }

    fn stats_of(levels: &[u8], bits: u32, lo: f32, hi: f32) -> TensorStats {
        let mut histogram = vec![0u64; 1 << bits];
        levels.iter().for_each(|&l| histogram[l as usize] += 1);
        TensorStats {
            grid: QuantGrid { lo, hi, bits },
            histogram,
        }
    }

    /// The rule itself: in each level, the `k_v` smallest keys are pruned.
    fn by_definition(levels: &[u8], plan: &SelectionPlan) -> KeptEntries {
        let mut keys: Vec<Vec<u32>> = vec![Vec::new(); plan.histogram.len()];
        for (i, &l) in levels.iter().enumerate() {
            keys[l as usize].push(element_key(plan.key, i as u32));
        }
        let cut: Vec<u64> = keys
            .iter_mut()
            .zip(&plan.pruned)
            .map(|(ks, &k)| {
                ks.sort_unstable();
                if k == 0 {
                    0
                } else {
                    u64::from(ks[k as usize - 1]) + 1
                }
            })
            .collect();
        let mut kept = KeptEntries::default();
        for (i, &l) in levels.iter().enumerate() {
            if u64::from(element_key(plan.key, i as u32)) >= cut[l as usize] {
                kept.positions.push(i as u32);
                kept.levels.push(l);
            }
        }
        kept
    }

    #[test]
    fn selection_from_candidates_is_the_rule_for_every_rate_above_the_floor() {
        let key = TensorKey::new(3, "model", "layer.weight");
        // Over several parallel pieces and chunks; 4 bits with rare extreme levels, and
        // 2 bits; a grid with a zero level (lo < 0 < hi) so that the rate is adjusted.
        for (n, bits, seed) in [(300_000usize, 4u32, 1u64), (70_001, 2, 2), (5, 4, 3)] {
            let lv = random_levels(n, 1 << bits, seed);
            let stats = stats_of(&lv, bits, -1.5, 1.5);
            let packed = PackedLevels::pack(&lv, bits);
            for floor in [0.0, 0.5, 0.94] {
                let set = CandidateSet::extract(&packed, &stats, key, floor);
                if floor == 0.94 && n > 1000 {
                    let share = set.len() as f64 / n as f64;
                    assert!(share > 0.06 && share < 0.09, "{share}");
                }
                for rate in [floor, floor + 1e-9, 0.95, 0.97, 0.99, 1.0] {
                    let plan = SelectionPlan::new(key, &stats, rate);
                    let want = by_definition(&lv, &plan);
                    assert_eq!(
                        set.select(&plan).unwrap(),
                        want,
                        "n {n} floor {floor} rate {rate}"
                    );
                    let cpu = CpuEngine.select_levels(&packed, &stats, &plan).unwrap();
                    assert_eq!(cpu, want);
                }
            }
        }
    }

    #[test]
    fn a_level_with_too_many_keys_below_its_floor_keeps_every_entry() {
        // With no margin the floor keys sit on the floor's expected cuts, and about half the
        // levels have more keys below than the floor prunes: they keep every entry, and the
        // selection is still the rule's.
        let key = TensorKey::new(9, "m", "t");
        let lv = random_levels(200_000, 16, 7);
        let stats = stats_of(&lv, 4, -1.0, 1.0);
        let packed = PackedLevels::pack(&lv, 4);
        let floor = 0.9;
        let set = CandidateSet::extract_with_margin(&packed, &stats, key, floor, 0.0);
        let at_floor = SelectionPlan::new(key, &stats, floor);
        assert!(set.below.iter().zip(&at_floor.pruned).all(|(b, k)| b <= k));
        let fell_back = (0..16).filter(|&l| at_floor.pruned[l] > 0 && set.below[l] == 0);
        assert!(fell_back.count() >= 2, "{:?}", set.below);
        for rate in [0.9, 0.95, 0.999] {
            let plan = SelectionPlan::new(key, &stats, rate);
            assert_eq!(set.select(&plan).unwrap(), by_definition(&lv, &plan));
        }
        // Floor keys of 2^32 set every entry aside (the prefilter's u32 keys let the largest
        // through; the exact test drops it).
        let none = CandidateSet::at_floor_keys(&packed, &stats.histogram, key, &[1 << 32; 16]);
        assert_eq!(none.len(), 0);
        assert_eq!(none.below, stats.histogram);
    }

    #[test]
    fn a_plan_below_the_floor_or_under_another_key_is_refused() {
        let key = TensorKey::new(1, "m", "t");
        let lv = random_levels(50_000, 16, 5);
        let stats = stats_of(&lv, 4, -1.0, 1.0);
        let set = CandidateSet::extract(&PackedLevels::pack(&lv, 4), &stats, key, 0.9);
        let low = SelectionPlan::new(key, &stats, 0.5);
        let e = set.select(&low).unwrap_err().to_string();
        assert!(e.contains("below the rate floor"), "{e}");
        let other = SelectionPlan::new(TensorKey::new(2, "m", "t"), &stats, 0.95);
        let e = set.select(&other).unwrap_err().to_string();
        assert!(e.contains("another selection key"), "{e}");
        let mut wrong = stats.clone();
        wrong.histogram[0] += 1;
        let e = set
            .select(&SelectionPlan::new(key, &wrong, 0.95))
            .unwrap_err()
            .to_string();
        assert!(e.contains("candidates of levels"), "{e}");
    }

    #[test]
    fn the_zero_adjusted_rate_keeps_the_floor_below_every_level_cut() {
        // Half the entries on the zero level: r' = (r - z) / (1 - z) is far below r.
        let key = TensorKey::new(4, "m", "t");
        let lv: Vec<u8> = (0..100_000)
            .map(|i| if i % 2 == 0 { 2 } else { (i % 4) as u8 })
            .collect();
        let stats = stats_of(&lv, 2, -2.0, 1.0);
        assert_eq!(stats.grid.value(2), 0.0);
        assert!(adjusted_rate(0.9, stats.zero_fraction()) < 0.85);
        let set = CandidateSet::extract(&PackedLevels::pack(&lv, 2), &stats, key, 0.9);
        for rate in [0.9, 0.93, 0.96] {
            let plan = SelectionPlan::new(key, &stats, rate);
            assert_eq!(set.select(&plan).unwrap(), by_definition(&lv, &plan));
        }
    }

    #[test]
    fn candidates_are_worth_it_only_when_few() {
        assert!(CandidateSet::worth_it(1000, 500, 0.94));
        assert!(!CandidateSet::worth_it(1000, 500, 0.85));
        assert!(CandidateSet::worth_it(1000, 1000, 0.85));
    }
}
