//! What `--dry-run` reads of the data: at most [`SAMPLE_ELEMENTS`] elements of each tensor (the
//! whole tensor when it is that small, else [`SAMPLE_PIECES`] evenly spaced runs), and what it
//! infers from them: a compressed tensor's level histogram, a stored tensor's coded size, and
//! whether a compared tensor differs from the base.
//!
//! A sample's min/max understates the tensor's: the grid of the whole tensor is set by its few
//! largest deltas, which a sample rarely holds. Each tail is extrapolated to the whole tensor
//! with the Hill estimator of its tail index over the sample's top [`TAIL_FRACTION`]
//! ([`extrapolated_extreme`]), and the sample's deltas are put on that grid.

use crate::algorithm::{QuantGrid, TensorStats};
use crate::checkpoint::dtype::FloatType;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::codec::lossless::{encode_blocks, word_width};
use crate::engine::DeltaInput;
use crate::error::{Error, Result};

/// Most elements read of one tensor.
pub const SAMPLE_ELEMENTS: u64 = 1 << 16;
/// Evenly spaced runs a larger tensor's sample is read in (short runs: a run covers part of
/// one row, so a sample sees many rows, e.g. of an embedding whose rows move very unevenly).
pub const SAMPLE_PIECES: u64 = 64;
/// Share of each tail's sample values the tail index is estimated from.
const TAIL_FRACTION: f64 = 0.01;
/// Largest tail index used: a Student-t with 4 degrees of freedom. A sample that mixes two
/// populations (an embedding's trained and untrained rows) can show a far heavier tail than
/// the tensor's extremes follow.
const MAX_TAIL_INDEX: f64 = 0.25;

/// The element ranges `(start, len)` sampled of a tensor of `numel` elements.
pub fn sample_ranges(numel: u64) -> Vec<(u64, u64)> {
    if numel <= SAMPLE_ELEMENTS {
        return vec![(0, numel)];
    }
    let len = SAMPLE_ELEMENTS / SAMPLE_PIECES;
    let last = u128::from(numel - len);
    (0..SAMPLE_PIECES)
        .map(|i| {
            (
                (u128::from(i) * last / u128::from(SAMPLE_PIECES - 1)) as u64,
                len,
            )
        })
        .collect()
}

/// The bytes of tensor `t` of `ckpt` over the sampled element ranges (of a tensor of `numel`
/// elements, which may be fewer than `t` holds), concatenated.
pub fn read_sample(ckpt: &Checkpoint, t: &TensorEntry, numel: u64) -> Result<Vec<u8>> {
    let elem = t.len / t.numel().max(1);
    let ranges = sample_ranges(numel);
    let mut out = vec![0u8; (ranges.iter().map(|r| r.1).sum::<u64>() * elem) as usize];
    let mut at = 0usize;
    for (start, len) in ranges {
        let n = (len * elem) as usize;
        ckpt.read_range(t, start * elem, &mut out[at..at + n])?;
        at += n;
    }
    Ok(out)
}

/// The level histogram a compressed tensor of `numel` elements is expected to have, from the
/// deltas of its sample (`base`, `ft`: the sampled bytes of both tensors).
#[allow(clippy::too_many_arguments)]
pub fn estimated_stats(
    ft: &Checkpoint,
    t: &TensorEntry,
    (base, base_type): (&[u8], FloatType),
    (fine, ft_type): (&[u8], FloatType),
    numel: u64,
    bits: u32,
) -> Result<TensorStats> {
    let m = base.len() / base_type.size();
    let input = DeltaInput::new(base, base_type, fine, ft_type, m);
    let (mut deltas, mut scratch) = (Vec::new(), Vec::new());
    input.delta_range(0, &mut deltas, &mut scratch, m);
    if let Some(i) = deltas.iter().position(|d| !d.is_finite()) {
        return Err(Error::tensor(
            ft.shard_path(t),
            &t.name,
            format!("the sampled delta {} is not finite", deltas[i]),
        ));
    }
    Ok(stats_of_sample(&mut deltas, numel, bits))
}

/// The histogram of `numel` elements whose deltas are sampled by `deltas` (sorted here), on
/// the grid extrapolated from the sample's tails, scaled from the sample to `numel`.
pub fn stats_of_sample(deltas: &mut [f32], numel: u64, bits: u32) -> TensorStats {
    deltas.sort_unstable_by(f32::total_cmp);
    let grid = if deltas.len() as u64 >= numel || deltas.is_empty() {
        QuantGrid {
            lo: deltas.first().copied().unwrap_or(0.0),
            hi: deltas.last().copied().unwrap_or(0.0),
            bits,
        }
    } else {
        let mid = deltas[deltas.len() / 2];
        let upper: Vec<f64> = deltas.iter().rev().map(|&d| (d - mid) as f64).collect();
        let lower: Vec<f64> = deltas.iter().map(|&d| (mid - d) as f64).collect();
        QuantGrid {
            lo: (mid as f64 - extrapolated_extreme(&lower, numel)) as f32,
            hi: (mid as f64 + extrapolated_extreme(&upper, numel)) as f32,
            bits,
        }
    };
    let mut counts = vec![0f64; grid.levels()];
    for &d in deltas.iter() {
        counts[grid.authors_level(d.clamp(grid.lo, grid.hi)) as usize] += 1.0;
    }
    let scale = numel as f64 / deltas.len().max(1) as f64;
    TensorStats {
        grid,
        histogram: scaled_counts(&counts, scale, numel),
    }
}

/// Counts times `scale`, rounded, the largest adjusted so that they sum to `numel`.
fn scaled_counts(counts: &[f64], scale: f64, numel: u64) -> Vec<u64> {
    let mut out: Vec<u64> = counts.iter().map(|c| (c * scale).round() as u64).collect();
    let sum: u64 = out.iter().sum();
    if let Some(top) = (0..out.len()).max_by_key(|&i| out[i]) {
        out[top] = (out[top] + numel).saturating_sub(sum);
    }
    out
}

/// The expected largest of `numel` values whose sample, in decreasing order, is `desc` (values
/// measured from the median, so the tail is positive): with the Hill estimate `xi` of the tail
/// index over the top `k` (at most [`MAX_TAIL_INDEX`]), the quantile of exceedance `1/numel`,
/// `u * (k * numel / m)^xi` with `u` the `k+1`-th largest, or the sample's largest times
/// `(numel / m)^xi` if lower. Never below the sample's largest.
pub fn extrapolated_extreme(desc: &[f64], numel: u64) -> f64 {
    let m = desc.len();
    let k = ((m as f64 * TAIL_FRACTION) as usize)
        .max(8)
        .min(m.saturating_sub(1));
    let top = desc.first().copied().unwrap_or(0.0).max(0.0);
    if k == 0 || desc[k] <= 0.0 || numel <= m as u64 {
        return top;
    }
    let u = desc[k];
    let hill = desc[..k].iter().map(|&x| (x / u).ln()).sum::<f64>() / k as f64;
    let xi = hill.min(MAX_TAIL_INDEX);
    let quantile = u * (k as f64 * numel as f64 / m as f64).powf(xi);
    let from_top = top * (numel as f64 / m as f64).powf(xi);
    quantile.min(from_top).max(top)
}

/// The expected coded size of a tensor stored whole, from its sample (`ft`) and the base's
/// bytes at the same places (`base`, empty when it is coded alone), scaled to its `len` bytes.
pub fn estimated_stored_bytes(base: &[u8], ft: &[u8], t: &TensorEntry) -> f64 {
    if ft.is_empty() {
        return 0.0;
    }
    let width = word_width(t.dtype.bitsize());
    let coded: usize = encode_blocks(base, ft, width).iter().map(Vec::len).sum();
    coded as f64 * t.len as f64 / ft.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    #[test]
    fn sample_ranges_cover_small_tensors_and_spread_over_large_ones() {
        assert_eq!(sample_ranges(1000), vec![(0, 1000)]);
        let r = sample_ranges(1 << 24);
        assert_eq!(r.len(), SAMPLE_PIECES as usize);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), SAMPLE_ELEMENTS);
        assert_eq!(r[0].0, 0);
        let last = r.last().unwrap();
        assert_eq!(last.0 + last.1, 1 << 24);
    }

    /// Pareto(alpha) values `x_min * U^(-1/alpha)`, largest first.
    fn pareto_desc(n: usize, alpha: f64, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64(seed);
        let mut v: Vec<f64> = (0..n)
            .map(|_| (1.0 - rng.unit()).powf(-1.0 / alpha))
            .collect();
        v.sort_by(|a, b| b.total_cmp(a));
        v
    }

    #[test]
    fn extrapolated_extreme_finds_the_pareto_quantile() {
        // Tail index 1/5 (as a Student-t with 5 degrees of freedom): the 1/N quantile of
        // Pareto(5) is N^(1/5); for N = 2^24 that is 27.9, while a 2^16 sample's largest is
        // near (2^16)^(1/5) = 9.2.
        let sample = pareto_desc(1 << 16, 5.0, 7);
        let n = 1u64 << 24;
        let want = (n as f64).powf(0.2);
        let got = extrapolated_extreme(&sample, n);
        assert!(sample[0] < 0.6 * want, "{}", sample[0]);
        assert!((got / want - 1.0).abs() < 0.25, "{got} vs {want}");
        // A tail far heavier than any delta's (Pareto(1)) is extrapolated at index 1/4 at most.
        let heavy = pareto_desc(1 << 16, 1.0, 8);
        let got = extrapolated_extreme(&heavy, n);
        assert!(got <= heavy[0] * 256f64.powf(0.25) * 1.0001, "{got}");
        // The whole population: nothing to extrapolate beyond its largest.
        assert_eq!(extrapolated_extreme(&[3.0, 2.0, 1.0], 3), 3.0);
    }

    #[test]
    fn histogram_of_a_whole_tensor_is_exact() {
        // Deltas -1, 0, 0, 1, 2 on 2 bits: grid [-1, 2], levels 0, 1, 1, 2, 3.
        let mut d = [2.0f32, 0.0, -1.0, 1.0, 0.0];
        let st = stats_of_sample(&mut d, 5, 2);
        assert_eq!((st.grid.lo, st.grid.hi), (-1.0, 2.0));
        assert_eq!(st.histogram, vec![1, 2, 1, 1]);
        // A sample of 5 standing for 10 elements: counts doubled, summing to 10.
        let st = stats_of_sample(&mut d, 10, 2);
        assert_eq!(st.numel(), 10);
    }
}
