//! The CPU reference engine: multi-threaded with rayon, chunk by chunk, results independent of
//! the thread count (chunks are combined in order; all results are exact).

use super::{check_kept, DeltaInput, Engine, EngineError, KeptEntries};
use crate::algorithm::quantize::QuantGrid;
use crate::algorithm::selection::{
    bucket_cuts, bucket_of, element_key, threshold_from_candidates, BUCKETS,
};
use crate::algorithm::{SelectionPlan, TensorStats};
use rayon::prelude::*;

/// Elements per work item.
const CHUNK: usize = 1 << 16;

/// The CPU reference engine.
#[derive(Debug, Default)]
pub struct CpuEngine;

/// Runs `f(first_index, deltas)` on every chunk of the input in parallel; results in order.
fn map_chunks<T: Send>(input: &DeltaInput, f: impl Fn(usize, &[f32]) -> T + Sync) -> Vec<T> {
    let n = input.numel();
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK)),
            |(delta, scratch), c| {
                let start = c * CHUNK;
                input.delta_range(start, delta, scratch, CHUNK.min(n - start));
                f(start, delta)
            },
        )
        .collect()
}

/// `-0.0` becomes `+0.0`: min/max may return either zero, and `lo`/`hi` are stored bit-exact.
pub fn canonical_zero(x: f32) -> f32 {
    if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Min, max and the first non-finite index of one chunk.
fn chunk_min_max(start: usize, d: &[f32]) -> (f32, f32, Option<usize>) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in d {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let bad = if lo.is_finite() && hi.is_finite() && d.iter().all(|x| !x.is_nan()) {
        None
    } else {
        d.iter().position(|x| !x.is_finite()).map(|i| start + i)
    };
    (lo, hi, bad)
}

impl Engine for CpuEngine {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        let parts = map_chunks(input, chunk_min_max);
        if let Some(index) = parts.iter().find_map(|p| p.2) {
            return Err(EngineError::NonFinite {
                index: index as u64,
                base: input.base_type.load(input.base, index),
                finetuned: input.finetuned_type.load(input.finetuned, index),
            });
        }
        // An empty tensor gets the grid [0, 0].
        let (lo, hi) = if parts.is_empty() {
            (0.0, 0.0)
        } else {
            let lo = parts.iter().map(|p| p.0).fold(f32::INFINITY, f32::min);
            let hi = parts.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
            (canonical_zero(lo), canonical_zero(hi))
        };
        let grid = QuantGrid { lo, hi, bits };
        let (k, max_level) = (grid.multiplier(), (grid.levels() - 1) as f32);
        let hists = map_chunks(input, |_, d| {
            let mut h = vec![0u64; grid.levels()];
            for &x in d {
                h[QuantGrid::level_of(x, lo, k, max_level) as usize] += 1;
            }
            h
        });
        let mut histogram = vec![0u64; grid.levels()];
        for h in hists {
            histogram.iter_mut().zip(h).for_each(|(a, b)| *a += b);
        }
        Ok(TensorStats { grid, histogram })
    }

    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        let grid = stats.grid;
        let (lo, k, max_level) = (grid.lo, grid.multiplier(), (grid.levels() - 1) as f32);
        let key = plan.key;
        let levels_n = grid.levels();
        let n = input.numel();
        // Pass A: levels of every element, and per level the histogram of key buckets.
        let mut levels = vec![0u8; n];
        let hist = levels
            .par_chunks_mut(CHUNK)
            .enumerate()
            .fold(
                || (vec![0u32; levels_n * BUCKETS], Vec::new(), Vec::new()),
                |(mut h, mut delta, mut scratch), (c, out)| {
                    let start = c * CHUNK;
                    input.delta_range(start, &mut delta, &mut scratch, out.len());
                    for (j, (&x, l)) in delta.iter().zip(out.iter_mut()).enumerate() {
                        *l = QuantGrid::level_of(x, lo, k, max_level);
                        let b = bucket_of(element_key(key, (start + j) as u32));
                        h[*l as usize * BUCKETS + b] += 1;
                    }
                    (h, delta, scratch)
                },
            )
            .map(|(h, _, _)| h.into_iter().map(u64::from).collect::<Vec<u64>>())
            .reduce(
                || vec![0u64; levels_n * BUCKETS],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let cuts = bucket_cuts(&hist, &plan.pruned);
        // Pass B: the keys in each level's cut bucket.
        let cut_bucket: Vec<u32> = cuts
            .iter()
            .map(|c| c.map_or(u32::MAX, |c| c.bucket))
            .collect();
        let found: Vec<Vec<(u8, u32)>> = levels
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(c, ls)| {
                let start = c * CHUNK;
                ls.iter()
                    .enumerate()
                    .filter_map(|(j, &l)| {
                        let kk = element_key(key, (start + j) as u32);
                        (bucket_of(kk) as u32 == cut_bucket[l as usize]).then_some((l, kk))
                    })
                    .collect()
            })
            .collect();
        let mut candidates = vec![Vec::new(); levels_n];
        for (l, kk) in found.into_iter().flatten() {
            candidates[l as usize].push(kk);
        }
        let thresholds: Vec<u64> = cuts
            .iter()
            .zip(candidates.iter_mut())
            .map(|(&cut, cand)| threshold_from_candidates(cut, cand))
            .collect();
        // Pass C: compaction of the kept entries.
        let parts: Vec<KeptEntries> = levels
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(c, ls)| {
                let start = c * CHUNK;
                let mut part = KeptEntries::default();
                for (j, &l) in ls.iter().enumerate() {
                    let i = (start + j) as u32;
                    if element_key(key, i) as u64 >= thresholds[l as usize] {
                        part.positions.push(i);
                        part.levels.push(l);
                    }
                }
                part
            })
            .collect();
        let mut kept = KeptEntries::default();
        for p in parts {
            kept.positions.extend_from_slice(&p.positions);
            kept.levels.extend_from_slice(&p.levels);
        }
        check_kept(&kept, plan)?;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::selection::TensorKey;
    use crate::checkpoint::dtype::FloatType;

    /// Straightforward restatement of steps 1 and 3, one element at a time, sorting every
    /// level's keys: the oracle for the chunked, bucketed engine.
    fn naive(
        base: &[f32],
        ft: &[f32],
        bits: u32,
        rate: f64,
        key: TensorKey,
    ) -> (TensorStats, KeptEntries) {
        let d: Vec<f32> = ft.iter().zip(base).map(|(f, b)| f - b).collect();
        let lo = d.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let grid = QuantGrid { lo, hi, bits };
        let l1 = ((1u32 << bits) - 1) as f64;
        let levels: Vec<usize> = d
            .iter()
            .map(|&x| {
                let k = if hi > lo {
                    (l1 / (hi as f64 - lo as f64)) as f32
                } else {
                    0.0
                };
                ((x - lo) * k).round_ties_even().clamp(0.0, l1 as f32) as usize
            })
            .collect();
        let mut histogram = vec![0u64; 1 << bits];
        levels.iter().for_each(|&l| histogram[l] += 1);
        let stats = TensorStats { grid, histogram };
        let plan = SelectionPlan::new(key, &stats, rate);
        let mut pruned = vec![false; d.len()];
        for (v, &k) in plan.pruned.iter().enumerate() {
            let mut members: Vec<(u32, usize)> = (0..d.len())
                .filter(|&i| levels[i] == v)
                .map(|i| (element_key(key, i as u32), i))
                .collect();
            members.sort_unstable();
            members
                .iter()
                .take(k as usize)
                .for_each(|&(_, i)| pruned[i] = true);
        }
        let mut kept = KeptEntries::default();
        for i in 0..d.len() {
            if !pruned[i] {
                kept.positions.push(i as u32);
                kept.levels.push(levels[i] as u8);
            }
        }
        (stats, kept)
    }

    fn noise(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let u = crate::algorithm::selection::mix32(i.wrapping_mul(2654435761) ^ seed)
                    as f32
                    / u32::MAX as f32;
                (u - 0.5) * scale * (1.0 + 8.0 * (u - 0.5).powi(4))
            })
            .collect()
    }

    fn run(base: &[f32], ft: &[f32], ty: FloatType, bits: u32, rate: f64) {
        let (mut b, mut f) = (Vec::new(), Vec::new());
        ty.encode_into(base, &mut b);
        ty.encode_into(ft, &mut f);
        // The oracle sees the values the engine sees: rounded to the dtype.
        let (mut bv, mut fv) = (Vec::new(), Vec::new());
        ty.decode_into(&b, &mut bv);
        ty.decode_into(&f, &mut fv);
        let key = TensorKey::new(3, "model", "t");
        let (want_stats, want_kept) = naive(&bv, &fv, bits, rate, key);
        let input = DeltaInput::new(&b, ty, &f, ty, base.len());
        let stats = CpuEngine.analyze(&input, bits).unwrap();
        assert_eq!(stats, want_stats);
        let plan = SelectionPlan::new(key, &stats, rate);
        let kept = CpuEngine.select(&input, &stats, &plan).unwrap();
        assert_eq!(kept, want_kept);
    }

    #[test]
    fn matches_the_naive_oracle() {
        for (n, ty, bits, rate) in [
            (1, FloatType::F32, 4, 0.95),
            (1000, FloatType::F16, 4, 0.9),
            (200_003, FloatType::BF16, 4, 0.95),
            (140_000, FloatType::F32, 2, 0.5),
            (70_001, FloatType::F16, 8, 0.99),
            (5000, FloatType::F32, 1, 0.3),
        ] {
            let base = noise(n, 1, 0.1);
            let ft: Vec<f32> = base
                .iter()
                .zip(noise(n, 2, 0.01))
                .map(|(b, d)| b + d)
                .collect();
            run(&base, &ft, ty, bits, rate);
        }
    }

    #[test]
    fn constant_and_zero_tensors() {
        let base = noise(3000, 5, 1.0);
        run(&base, &base, FloatType::F32, 4, 0.95); // all-zero delta: nothing kept
        let ft: Vec<f32> = base.iter().map(|b| b + 0.5).collect();
        run(&base, &ft, FloatType::F32, 4, 0.95);
        let input = DeltaInput::new(&[], FloatType::F16, &[], FloatType::F16, 0);
        let stats = CpuEngine.analyze(&input, 4).unwrap();
        assert_eq!(stats.numel(), 0);
    }

    #[test]
    fn non_finite_delta_names_the_element() {
        let mut ft = vec![0.0f32; 100_000];
        ft[70_000] = f32::NAN;
        ft[90_000] = f32::INFINITY;
        let mut f = Vec::new();
        FloatType::F32.encode_into(&ft, &mut f);
        let b = vec![0u8; f.len()];
        let input = DeltaInput::new(&b, FloatType::F32, &f, FloatType::F32, ft.len());
        let err = CpuEngine.analyze(&input, 4).unwrap_err();
        assert!(
            matches!(err, EngineError::NonFinite { index: 70_000, .. }),
            "{err}"
        );
    }
}
