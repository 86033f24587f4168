//! The expected size of one compressed tensor's payload, from its element count and kept-level
//! histogram alone, without coding it: what `compress --target-size` and `compress --dry-run`
//! plan with.
//!
//! The model follows the coder block by block ([`super::BLOCK_ELEMENTS`]):
//! - positions: the kept entries of a level are a uniformly random subset, so the kept (or, past
//!   half, the non-kept) offsets of a block are close to Bernoulli with density `q = c / n`
//!   and their gaps geometric, `P(g) = q (1-q)^g`. Under the block's Golomb parameter `m`
//!   ([`golomb::golomb_parameter`]) a gap costs `floor(g/m) + 1` unary bits and `b - 1` or
//!   `b` remainder bits, whose expectations have closed forms ([`golomb_bits_per_gap`]);
//! - levels: the rANS stream costs the cross-entropy of the kept levels under the table the
//!   coder derives from `kept_counts` ([`FreqTable`]), plus the 4-byte final state of each
//!   block that has a stream.
//!
//! Both streams are padded to whole bytes. On random masks this is within a fraction of a
//! percent of the coded size (`expected_payload_matches_the_coder` below).

use super::golomb::{golomb_parameter, GolombCode};
use super::rans::{FreqTable, PROB_SCALE};
use super::{block_count, BLOCK_ELEMENTS};

/// Bytes of the rANS final state written at the end of every non-empty level stream.
const RANS_STATE_BYTES: f64 = 4.0;

/// Expected bytes of the position and level streams of a tensor of `numel` elements whose kept
/// entries have the level histogram `kept_counts` (kept entries spread evenly over the blocks).
pub fn expected_payload_bytes(numel: u64, kept_counts: &[u64]) -> f64 {
    let kept: u64 = kept_counts.iter().sum();
    if numel == 0 || kept == 0 {
        return 0.0;
    }
    let level_bits = level_bits_per_entry(kept_counts);
    let density = kept as f64 / numel as f64;
    (0..block_count(numel))
        .map(|b| {
            let n = (numel - b as u64 * BLOCK_ELEMENTS).min(BLOCK_ELEMENTS);
            let k = n as f64 * density;
            let levels = match level_bits {
                Some(bits) if k >= 0.5 => (k * bits / 8.0).ceil() + RANS_STATE_BYTES,
                _ => 0.0,
            };
            position_bytes(n as u32, k) + levels
        })
        .sum()
}

/// Expected bytes of one block's position stream: `n` elements, `k` kept (expected).
fn position_bytes(n: u32, k: f64) -> f64 {
    let coded = k.min(n as f64 - k).round();
    if coded < 1.0 {
        return 0.0;
    }
    let m = golomb_parameter(n, coded as u32);
    let theta = 1.0 - coded / n as f64;
    (coded * golomb_bits_per_gap(theta, m) / 8.0).ceil()
}

/// Expected Golomb code length (bits) of a geometric gap `P(g) = (1-theta) theta^g` under
/// divisor `m`: `E[floor(g/m)] + 1` unary bits, then `b - P(r < u)` remainder bits with
/// `b = ceil(log2 m)`, `u = 2^b - m` (none for `m = 1`).
pub fn golomb_bits_per_gap(theta: f64, m: u32) -> f64 {
    let tm = theta.powi(m as i32);
    let unary = tm / (1.0 - tm) + 1.0;
    if m <= 1 {
        return unary;
    }
    let code = GolombCode::new(m);
    let short = (1.0 - theta.powi(code.u as i32)) / (1.0 - tm);
    unary + code.b as f64 - short
}

/// Bits per kept level under the coder's frequency table (the cross-entropy of the kept
/// levels against it); `None` when one level has all the mass (the level streams are empty).
fn level_bits_per_entry(kept_counts: &[u64]) -> Option<f64> {
    let table = FreqTable::from_counts(kept_counts).ok()?;
    if table.single_symbol().is_some() {
        return None;
    }
    let kept: u64 = kept_counts.iter().sum();
    let bits = kept_counts
        .iter()
        .zip(table.freqs())
        .filter(|(&c, _)| c > 0)
        .map(|(&c, &f)| c as f64 * (PROB_SCALE as f64 / f as f64).log2())
        .sum::<f64>();
    Some(bits / kept as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_tensor;
    use crate::splitmix::SplitMix64;

    #[test]
    fn golomb_expectation_by_direct_summation() {
        // Sum the code length over the geometric law directly (independent of the closed form).
        for (theta, m) in [(0.95f64, 14u32), (0.5, 1), (0.99, 69), (0.9, 7), (0.7, 2)] {
            let code = GolombCode::new(m);
            let mut expected = 0.0;
            for g in 0..20_000u32 {
                let (q, r) = (g / m, g % m);
                let rbits = if code.b == 0 {
                    0
                } else if r < code.u {
                    code.b - 1
                } else {
                    code.b
                };
                let len = (q + 1 + rbits) as f64;
                expected += (1.0 - theta) * theta.powi(g as i32) * len;
            }
            let got = golomb_bits_per_gap(theta, m);
            assert!(
                (got - expected).abs() < 1e-6,
                "{theta} {m}: {got} vs {expected}"
            );
        }
    }

    /// Codes a random mask with random levels and compares with the estimate.
    fn coded_and_estimated(numel: u64, density: f64, weights: &[u64], seed: u64) -> (f64, f64) {
        let mut rng = SplitMix64(seed);
        let total: u64 = weights.iter().sum();
        let (mut positions, mut levels) = (Vec::new(), Vec::new());
        let mut counts = vec![0u64; weights.len()];
        for i in 0..numel {
            if rng.unit() >= density {
                continue;
            }
            let mut pick = rng.next_u64() % total;
            let level = weights
                .iter()
                .position(|&w| {
                    let inside = pick < w;
                    pick = pick.saturating_sub(w);
                    inside
                })
                .unwrap();
            positions.push(i as u32);
            levels.push(level as u8);
            counts[level] += 1;
        }
        let enc = encode_tensor(numel, &positions, &levels, &counts).unwrap();
        let coded = (enc.positions.len() + enc.levels.len()) as f64;
        (coded, expected_payload_bytes(numel, &counts))
    }

    #[test]
    fn expected_payload_matches_the_coder() {
        let skewed = [1, 3, 10, 40, 300, 5000, 300, 40, 10, 3, 1, 1, 1, 1, 1, 1];
        let flat = [1; 16];
        for (numel, density, weights, seed) in [
            (3 << 20, 0.05, &skewed[..], 1),
            (3 << 20, 0.01, &flat[..], 2),
            ((1 << 20) + 12345, 0.3, &skewed[..], 3),
            (2 << 20, 0.8, &flat[..], 4),
            (500_000, 0.002, &skewed[..], 5),
        ] {
            let (coded, est) = coded_and_estimated(numel, density, weights, seed);
            let err = (est - coded).abs() / coded;
            assert!(
                err < 0.005,
                "{numel} {density}: coded {coded}, estimated {est}"
            );
        }
    }

    #[test]
    fn nothing_kept_or_one_level_costs_no_level_stream() {
        assert_eq!(expected_payload_bytes(1000, &[0, 0]), 0.0);
        // Everything kept in one level: both streams empty.
        assert_eq!(expected_payload_bytes(1000, &[1000, 0, 0, 0]), 0.0);
        // Half kept in one level: positions only (500 gaps of m = 1: 2 bits each at theta 0.5).
        let est = expected_payload_bytes(1000, &[500, 0]);
        assert!((est - 125.0).abs() < 1.0, "{est}");
    }
}
