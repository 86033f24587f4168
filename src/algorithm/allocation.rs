//! Step 2: variance-based mixed sparsity allocation, in thirds by parameter count.

use super::CompressParams;

/// Which third of the model (by parameter count, sorted by standard deviation) a tensor is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    /// Lowest-variance third: rate `s + s_step`.
    Low,
    /// Middle third: rate `s`.
    Mid,
    /// Highest-variance third: the rate that keeps the parameter-weighted mean at `s`.
    High,
}

/// The pruning rate given to one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allocation {
    /// Its group.
    pub group: Group,
    /// Its pruning rate `r`.
    pub rate: f64,
}

/// Upper clamp of the high group's rate (as in the released code).
pub const HIGH_RATE_MAX: f64 = 0.99;

/// The lowest pruning rate [`allocate_rates`] can give any tensor under `params`, known
/// before any tensor is seen: the low and middle groups get `s + step` and `s`, and the high
/// group `s - step * N_low / N_high` clamped to `[0, HIGH_RATE_MAX]`, where `N_low <= N / 3 <=
/// N_high` (the high group holds every tensor past two thirds of the count), so at least
/// `min(s - step, HIGH_RATE_MAX)`; less [`RATE_FLOOR_MARGIN`] for the rounding of that
/// formula, and never below 0.
pub fn rate_floor(params: &CompressParams) -> f64 {
    ((params.sparsity - params.step).min(HIGH_RATE_MAX) - RATE_FLOOR_MARGIN).max(0.0)
}

/// How far below its exact value [`rate_floor`] is set: the high group's rate is a sum of
/// three products over up to 2^64 parameters divided by at least a third of them, whose
/// rounding error is below 1e-14.
pub const RATE_FLOOR_MARGIN: f64 = 1e-9;

/// Allocates rates to tensors given as `(parameter count, std of dequantized values)`, in input
/// order. Tensors are sorted by std ascending (ties keep input order); walking them with the
/// running parameter count `c` (this tensor included), `3c <= N` is low, `3c <= 2N` is middle,
/// the rest high, whose rate is `(sN - sN_mid - (s+step)N_low) / N_high` clamped to `[0, 0.99]`.
pub fn allocate_rates(tensors: &[(u64, f64)], params: &CompressParams) -> Vec<Allocation> {
    let s = params.sparsity;
    let total: u64 = tensors.iter().map(|t| t.0).sum();
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].1.total_cmp(&tensors[b].1));
    let mut groups = vec![Group::High; tensors.len()];
    let mut running = 0u128;
    let (mut n_low, mut n_mid, mut n_high) = (0u64, 0u64, 0u64);
    for &i in &order {
        running += tensors[i].0 as u128;
        groups[i] = if 3 * running <= total as u128 {
            n_low += tensors[i].0;
            Group::Low
        } else if 3 * running <= 2 * total as u128 {
            n_mid += tensors[i].0;
            Group::Mid
        } else {
            n_high += tensors[i].0;
            Group::High
        };
    }
    let high_rate = if n_high > 0 {
        let n = |c: u64| c as f64;
        ((s * n(total) - s * n(n_mid) - (s + params.step) * n(n_low)) / n(n_high))
            .clamp(0.0, HIGH_RATE_MAX)
    } else {
        s
    };
    groups
        .into_iter()
        .map(|group| Allocation {
            group,
            rate: match group {
                Group::Low => s + params.step,
                Group::Mid => s,
                Group::High => high_rate,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(s: f64, step: f64) -> CompressParams {
        CompressParams {
            sparsity: s,
            step,
            ..Default::default()
        }
    }

    #[test]
    fn thirds_by_parameter_count_not_tensor_count() {
        // sizes 10, 10, 10, 60 (N = 90, N/3 = 30, 2N/3 = 60), stds in reverse input order.
        let t = [(60, 4.0), (10, 3.0), (10, 2.0), (10, 1.0)];
        let a = allocate_rates(&t, &params(0.9, 0.01));
        let groups: Vec<_> = a.iter().map(|x| x.group).collect();
        // sorted: 10 (c=10 low), 10 (20 low), 10 (30 low: 3*30 = 90 <= 90), 60 (90: high)
        assert_eq!(
            groups,
            vec![Group::High, Group::Low, Group::Low, Group::Low]
        );
        // high rate = (0.9*90 - 0 - 0.91*30) / 60 = (81 - 27.3)/60 = 0.895
        assert!((a[0].rate - 0.895).abs() < 1e-12);
        assert!((a[1].rate - 0.91).abs() < 1e-15);
    }

    #[test]
    fn mean_rate_is_target_and_ties_keep_order() {
        let t: Vec<(u64, f64)> = (0..9).map(|i| (100, (i / 3) as f64)).collect();
        let a = allocate_rates(&t, &params(0.95, 0.01));
        let g: Vec<_> = a.iter().map(|x| x.group).collect();
        assert_eq!(&g[..3], &[Group::Low; 3]);
        assert_eq!(&g[3..6], &[Group::Mid; 3]);
        assert_eq!(&g[6..], &[Group::High; 3]);
        let mean: f64 = a.iter().map(|x| x.rate).sum::<f64>() / 9.0;
        assert!((mean - 0.95).abs() < 1e-12);
        assert!((a[8].rate - 0.94).abs() < 1e-12);
    }

    #[test]
    fn no_allocation_falls_below_the_rate_floor() {
        let mut rng = crate::splitmix::SplitMix64(11);
        let mut closest = f64::INFINITY;
        for case in 0..2000 {
            let n = 1 + (rng.next_u64() % 40) as usize;
            let t: Vec<(u64, f64)> = (0..n)
                .map(|_| (1 + rng.next_u64() % 1_000_000_000, rng.unit()))
                .collect();
            let s = [0.5, 0.9, 0.95, 0.99, 0.995, 0.999][case % 6];
            let step: f64 = [0.0, 0.001, 0.01, 0.05][case % 4];
            let step = step.min(1.0 - s);
            let p = params(s, step);
            let floor = rate_floor(&p);
            for a in allocate_rates(&t, &p) {
                assert!(a.rate >= floor, "{a:?} below {floor} (s {s}, step {step})");
                closest = closest.min(a.rate - floor);
            }
        }
        // The floor is reached (equal thirds give the high group exactly s - step).
        assert!(closest < 1e-8, "{closest}");
        assert_eq!(
            rate_floor(&params(0.999, 0.001)),
            HIGH_RATE_MAX - RATE_FLOOR_MARGIN
        );
        assert_eq!(rate_floor(&params(0.1, 0.5)), 0.0);
    }

    #[test]
    fn high_rate_is_clamped() {
        // N = 16: c=5 low (15 <= 16), c=10 mid (30 <= 32), then high (N_high = 6).
        let t = [(5, 0.0), (5, 1.0), (5, 2.0), (1, 3.0)];
        let g = |a: &[Allocation]| a.iter().map(|x| x.group).collect::<Vec<_>>();
        let a = allocate_rates(&t, &params(0.1, 0.9));
        assert_eq!(
            g(&a),
            vec![Group::Low, Group::Mid, Group::High, Group::High]
        );
        // 0.1 - 0.9 * 5/6 < 0 -> clamped to 0
        assert_eq!(a[2].rate, 0.0);
        // N = 400, N_low = 100, N_high = 200: 0.995 - 0.005 * 100/200 = 0.9925 -> 0.99
        let t = [(100, 0.0), (100, 1.0), (200, 2.0)];
        let a = allocate_rates(&t, &params(0.995, 0.005));
        assert_eq!(g(&a), vec![Group::Low, Group::Mid, Group::High]);
        assert_eq!(a[2].rate, HIGH_RATE_MAX);
        // Everything in the high group when the first tensor already passes 2N/3.
        let a = allocate_rates(&[(9, 0.0), (1, 1.0)], &params(0.9, 0.01));
        assert_eq!(g(&a), vec![Group::High, Group::High]);
        assert!((a[0].rate - 0.9).abs() < 1e-15);
    }
}
