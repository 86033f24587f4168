//! Accuracy against an exact reference (nalgebra's symmetric eigenvalues of the smaller Gram
//! matrix, formed in f64), determinism, and sensitivity to f32 rounding of the products.

use super::estimator::estimate_nuclear_norm_with_report;
use super::rng::{normal, uniform, vector_key};
use super::*;
use nalgebra::DMatrix;

/// Value distributions of the generated test matrices.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauss,
    Laplace,
    StudentT(f64),
    /// UltraDelta-like: a Laplace delta quantized to 16 min/max levels, kept entries rescaled.
    Quantized,
    /// Dense rank-8 term with half the energy, plus noise on the kept positions.
    LowRankPlusNoise,
    /// Rank-8 term plus dense noise, then only the kept positions survive (a DARE'd delta).
    MaskedLowRank,
    /// Dense, exactly rank r.
    PureLowRank(usize),
}

struct Generated {
    rows: usize,
    cols: usize,
    positions: Vec<u32>,
    values: Vec<f32>,
}

impl Generated {
    fn delta(&self) -> SparseDelta<'_> {
        SparseDelta {
            rows: self.rows,
            cols: self.cols,
            positions: &self.positions,
            values: DeltaValues::F32(&self.values),
        }
    }
}

fn generate(rows: usize, cols: usize, density: f64, kind: Kind, seed: u64) -> Generated {
    let key = vector_key(seed, 100, 0);
    let vkey = vector_key(seed, 101, 0);
    let kept = |i: usize| density >= 1.0 || uniform(key, i as u64) < density;
    let total = rows * cols;
    let low_rank = |r: usize| {
        let uk = vector_key(seed, 102, 0);
        let u: Vec<f64> = (0..rows * r).map(|i| normal(uk, i as u64)).collect();
        let v: Vec<f64> = (0..r * cols)
            .map(|i| normal(uk, (rows * r + i) as u64))
            .collect();
        move |i: usize| {
            let (a, b) = (i / cols, i % cols);
            (0..r).map(|t| u[a * r + t] * v[t * cols + b]).sum::<f64>()
        }
    };
    let mut positions = Vec::new();
    let mut values = Vec::new();
    match kind {
        Kind::Gauss | Kind::Laplace | Kind::StudentT(_) => {
            for i in 0..total {
                if kept(i) {
                    let x = match kind {
                        Kind::Gauss => normal(vkey, i as u64),
                        Kind::Laplace => {
                            let u = uniform(vkey, i as u64) - 0.5;
                            -u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()
                        }
                        Kind::StudentT(dof) => {
                            let z = normal(vkey, i as u64);
                            let k = dof.round() as u64;
                            let chi2: f64 = (0..k)
                                .map(|t| normal(vector_key(seed, 103, t), i as u64).powi(2))
                                .sum();
                            z / (chi2 / dof).sqrt()
                        }
                        _ => unreachable!(),
                    };
                    positions.push(i as u32);
                    values.push(x as f32);
                }
            }
        }
        Kind::Quantized => {
            // Delta ~ 1e-3 * Laplace + small offset, 16 levels over [min, max], then rescale.
            let d = |i: usize| {
                let u = uniform(vkey, i as u64) - 0.5;
                1e-3 * (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) + 1e-4
            };
            let (mut lo, mut hi) = (f64::MAX, f64::MIN);
            for i in 0..total {
                let x = d(i);
                lo = lo.min(x);
                hi = hi.max(x);
            }
            let scale = 1.0 / density;
            for i in 0..total {
                if kept(i) {
                    let q = ((d(i) - lo) / (hi - lo) * 15.0).round_ties_even();
                    let v = (q / 15.0 * (hi - lo) + lo) * scale;
                    positions.push(i as u32);
                    values.push(v as f32);
                }
            }
        }
        Kind::LowRankPlusNoise | Kind::MaskedLowRank => {
            let l = low_rank(8);
            // Scale so that the low-rank part carries half of the energy.
            let (mut el, mut en) = (0.0, 0.0);
            let masked = matches!(kind, Kind::MaskedLowRank);
            for i in 0..total {
                let k = kept(i);
                if k || !masked {
                    el += l(i).powi(2);
                }
                if k {
                    en += normal(vkey, i as u64).powi(2);
                }
            }
            let s = (en / el).sqrt();
            for i in 0..total {
                let k = kept(i);
                let v = match (masked, k) {
                    (true, false) => continue,
                    (_, true) => s * l(i) + normal(vkey, i as u64),
                    (false, false) => s * l(i),
                };
                positions.push(i as u32);
                values.push(v as f32);
            }
        }
        Kind::PureLowRank(r) => {
            let l = low_rank(r);
            for i in 0..total {
                positions.push(i as u32);
                values.push(l(i) as f32);
            }
        }
    }
    Generated {
        rows,
        cols,
        positions,
        values,
    }
}

/// Exact nuclear norm: eigenvalues of the smaller Gram matrix, formed in f64.
fn exact_reference(g: &Generated) -> f64 {
    let (rows, cols) = (g.rows, g.cols);
    let tall = rows >= cols;
    let n = rows.min(cols);
    let density = g.positions.len() as f64 / (rows * cols) as f64;
    let gram = if density > 0.25 {
        let big = rows.max(cols);
        let mut b = DMatrix::<f64>::zeros(big, n);
        for (&p, &v) in g.positions.iter().zip(&g.values) {
            let (r, c) = (p as usize / cols, p as usize % cols);
            let (i, j) = if tall { (r, c) } else { (c, r) };
            b[(i, j)] = v as f64;
        }
        b.tr_mul(&b)
    } else {
        // Sparse: G = sum over the rows of B of b b^T.
        let big = rows.max(cols);
        let mut lines: Vec<Vec<(usize, f64)>> = vec![Vec::new(); big];
        for (&p, &v) in g.positions.iter().zip(&g.values) {
            let (r, c) = (p as usize / cols, p as usize % cols);
            let (i, j) = if tall { (r, c) } else { (c, r) };
            lines[i].push((j, v as f64));
        }
        let mut gm = DMatrix::<f64>::zeros(n, n);
        for line in &lines {
            for &(a, x) in line {
                for &(b, y) in line {
                    gm[(a, b)] += x * y;
                }
            }
        }
        gm
    };
    gram.symmetric_eigenvalues()
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum()
}

fn check(name: &str, g: &Generated, tol: f64) -> f64 {
    let exact = exact_reference(g);
    let t = std::time::Instant::now();
    let est = nuclear_norm(&g.delta(), &EstimatorOptions::default());
    let dt = t.elapsed().as_secs_f64();
    let rel = (est - exact) / exact;
    eprintln!(
        "tracenorm case {name}: {} x {}, nnz {}, exact {exact:.6e}, estimate {est:.6e}, rel err {:+.4}%, {:.3} s",
        g.rows,
        g.cols,
        g.positions.len(),
        rel * 100.0,
        dt
    );
    assert!(
        rel.abs() <= tol,
        "{name}: relative error {rel:e} exceeds {tol:e}"
    );
    rel
}

const TOL: f64 = 0.01;

#[test]
fn dense_gaussian() {
    check(
        "dense gauss",
        &generate(1024, 2752, 1.0, Kind::Gauss, 1),
        TOL,
    );
}

#[test]
fn sparse_laplace_half_percent() {
    check(
        "laplace 0.5%",
        &generate(1024, 2752, 0.005, Kind::Laplace, 2),
        TOL,
    );
}

#[test]
fn sparse_student_t_one_percent_wide_and_tall() {
    check(
        "student-t3 1% tall",
        &generate(2752, 1024, 0.01, Kind::StudentT(3.0), 3),
        TOL,
    );
    check(
        "student-t2 1%",
        &generate(1024, 2752, 0.01, Kind::StudentT(2.0), 4),
        TOL,
    );
}

#[test]
fn sparse_gauss_five_percent_and_laplace_ten_percent() {
    check("gauss 5%", &generate(1024, 2752, 0.05, Kind::Gauss, 5), TOL);
    check(
        "laplace 10% tall",
        &generate(2752, 1024, 0.10, Kind::Laplace, 6),
        TOL,
    );
}

#[test]
fn low_rank_plus_sparse_noise() {
    check(
        "rank-8 (50% energy) + 1% noise",
        &generate(1024, 2752, 0.01, Kind::LowRankPlusNoise, 7),
        TOL,
    );
    check(
        "masked rank-8 + noise 5% tall",
        &generate(2752, 1024, 0.05, Kind::MaskedLowRank, 8),
        TOL,
    );
}

#[test]
fn pure_low_rank() {
    check(
        "pure rank 8",
        &generate(1024, 2752, 1.0, Kind::PureLowRank(8), 9),
        TOL,
    );
    check(
        "pure rank 64 tall",
        &generate(2752, 1024, 1.0, Kind::PureLowRank(64), 10),
        TOL,
    );
}

#[test]
fn ultradelta_like_quantized_levels() {
    check(
        "16 levels 1%",
        &generate(1024, 2752, 0.01, Kind::Quantized, 11),
        TOL,
    );
    check(
        "16 levels 5% tall",
        &generate(2752, 1024, 0.05, Kind::Quantized, 12),
        TOL,
    );
}

/// Square matrices: the smallest singular values reach zero (a hard edge), where the
/// quadrature of `sqrt` converges slowest; and a nearly square one.
#[test]
fn square_and_nearly_square() {
    check(
        "square gauss 5%",
        &generate(1024, 1024, 0.05, Kind::Gauss, 21),
        TOL,
    );
    check(
        "square 16 levels 5%",
        &generate(1024, 1024, 0.05, Kind::Quantized, 22),
        TOL,
    );
    check(
        "square laplace 1%",
        &generate(1024, 1024, 0.01, Kind::Laplace, 23),
        TOL,
    );
    check(
        "square rank-8 + noise",
        &generate(1024, 1024, 0.05, Kind::LowRankPlusNoise, 25),
        TOL,
    );
    check(
        "1200 x 1024 gauss 5%",
        &generate(1200, 1024, 0.05, Kind::Gauss, 28),
        TOL,
    );
}

#[test]
fn small_matrices_are_exact() {
    let g = generate(200, 700, 0.05, Kind::Laplace, 13);
    let rel = check("exact path 200 x 700", &g, 1e-9);
    assert!(rel.abs() < 1e-9);
    let g = generate(300, 40, 1.0, Kind::PureLowRank(5), 14);
    check("exact path rank 5", &g, 1e-6);
}

#[test]
fn medium_stochastic_path() {
    check(
        "gauss 2% 600 x 1500",
        &generate(600, 1500, 0.02, Kind::Gauss, 15),
        TOL,
    );
}

#[test]
fn empty_and_degenerate() {
    let opts = EstimatorOptions::default();
    let d = SparseDelta {
        rows: 4096,
        cols: 4096,
        positions: &[],
        values: DeltaValues::F32(&[]),
    };
    assert_eq!(nuclear_norm(&d, &opts), 0.0);
    let d = SparseDelta {
        rows: 0,
        cols: 10,
        positions: &[],
        values: DeltaValues::F32(&[]),
    };
    assert_eq!(nuclear_norm(&d, &opts), 0.0);
    // All kept values zero.
    let d = SparseDelta {
        rows: 1000,
        cols: 1000,
        positions: &[0, 5, 999_999],
        values: DeltaValues::F32(&[0.0; 3]),
    };
    assert_eq!(nuclear_norm(&d, &opts), 0.0);
    // A single entry: one singular value, |v| (exact path and stochastic path).
    let d = SparseDelta {
        rows: 3,
        cols: 5,
        positions: &[7],
        values: DeltaValues::F32(&[-2.5]),
    };
    assert!((nuclear_norm(&d, &opts) - 2.5).abs() < 1e-12);
    let d = SparseDelta {
        rows: 1000,
        cols: 3000,
        positions: &[123_456],
        values: DeltaValues::F32(&[-2.5]),
    };
    let got = nuclear_norm(&d, &opts);
    assert!((got - 2.5).abs() < 1e-5, "{got}");
    // A diagonal matrix: the nuclear norm is the sum of |d_i|. Singular values spread over
    // [0.5, 599] (condition number 1200) are the hard case for the quadrature: the lanes stop
    // at `lanczos_steps` and the reported quadrature bound covers the error (0.78 % here).
    let n = 600usize;
    let pos: Vec<u32> = (0..n).map(|i| (i * n + i) as u32).collect();
    let val: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { 1.0 + i as f32 } else { -0.5 })
        .collect();
    let want: f64 = val.iter().map(|v| v.abs() as f64).sum();
    let d = SparseDelta {
        rows: n,
        cols: n,
        positions: &pos,
        values: DeltaValues::F32(&val),
    };
    let r = estimate_nuclear_norm_with_report(&mut CpuSparseOperator::new(&d), &opts);
    let got = r.value;
    assert!(
        (got - want).abs() <= r.quadrature_bound + 3.0 * r.std_error,
        "{got} vs {want}: {r:?}"
    );
    assert!(((got - want) / want).abs() < TOL, "{got} vs {want}");
}

#[test]
#[should_panic(expected = "strictly increasing")]
fn unsorted_positions_are_rejected() {
    let d = SparseDelta {
        rows: 10,
        cols: 10,
        positions: &[5, 3],
        values: DeltaValues::F32(&[1.0, 2.0]),
    };
    CpuSparseOperator::new(&d);
}

#[test]
fn deterministic_across_thread_counts_and_seed_dependent() {
    let g = generate(1200, 3000, 0.01, Kind::Quantized, 16);
    let opts = EstimatorOptions::default();
    let run = |threads: usize, opts: &EstimatorOptions| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| nuclear_norm(&g.delta(), opts))
    };
    let a = run(1, &opts);
    let b = run(2, &opts);
    let c = run(3, &opts);
    assert_eq!(a.to_bits(), b.to_bits());
    assert_eq!(a.to_bits(), c.to_bits());
    let other = EstimatorOptions { seed: 99, ..opts };
    let d = run(2, &other);
    assert_ne!(a.to_bits(), d.to_bits());
    assert!(((a - d) / a).abs() < 0.01);
}

/// Wraps an operator and perturbs every output by a deterministic relative error of up to
/// `rel`, standing in for a GPU that sums in a different order (f32 rounding is ~6e-8 per
/// operation, so a relative 1e-6 is a generous model of reordered f32 accumulation).
struct Perturbed<'a> {
    inner: CpuSparseOperator<'a>,
    rel: f32,
    calls: u64,
}

impl MatrixOperator for Perturbed<'_> {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn frobenius_norm_sq(&self) -> f64 {
        self.inner.frobenius_norm_sq()
    }
    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) {
        self.inner.apply(x, y, transpose);
        let key = vector_key(0xBAD, self.calls, 0);
        self.calls += 1;
        for (i, v) in y.iter_mut().enumerate() {
            *v *= 1.0 + self.rel * (2.0 * uniform(key, i as u64) as f32 - 1.0);
        }
    }
}

#[test]
fn insensitive_to_f32_level_product_errors() {
    let opts = EstimatorOptions::default();
    for (name, g) in [
        (
            "quantized 2%",
            generate(1024, 2752, 0.02, Kind::Quantized, 17),
        ),
        (
            "pure rank 8",
            generate(1024, 2752, 1.0, Kind::PureLowRank(8), 18),
        ),
    ] {
        let base = nuclear_norm(&g.delta(), &opts);
        for rel in [1e-7f32, 1e-6, 1e-5] {
            let mut op = Perturbed {
                inner: CpuSparseOperator::new(&g.delta()),
                rel,
                calls: 0,
            };
            let got = estimate_nuclear_norm(&mut op, &opts);
            let d = (got - base) / base;
            eprintln!("tracenorm f32 sensitivity {name}: output perturbation {rel:e} -> estimate change {d:+.3e}");
            if rel <= 1e-6 {
                assert!(d.abs() < 1e-4, "{name}: {rel} moved the estimate by {d}");
            }
        }
    }
}

/// A random sparse matrix of the given shape and density (values from `uniform`).
fn random_sparse(rows: usize, cols: usize, density: f64, key: u64) -> (Vec<u32>, Vec<f32>) {
    let (mut positions, mut values) = (Vec::new(), Vec::new());
    for i in 0..(rows * cols) as u64 {
        if uniform(key, i) < density {
            positions.push(i as u32);
            values.push((uniform(key ^ 1, i) * 2.0 - 1.0) as f32);
        }
    }
    (positions, values)
}

#[test]
fn products_equal_a_dense_reference_at_every_block_width() {
    // Odd shapes (one with several blocks of columns, so that `A^T` scatters into several
    // panels), widths 1 to 40 (every tile width and padding case), and a workspace reused
    // from a larger matrix (stale contents must not leak into the products). Every output is
    // also the plain f32 sum over its entries in row-major order, multiply then add, to the
    // bit: the order a gather over a CSC copy (and the GPU operator) sums in. The widest
    // matrix has too many columns for the index's u16 columns: its products read positions.
    let (big_pos, big_val) = random_sparse(90, 300, 0.3, 7);
    let big = SparseDelta {
        rows: 90,
        cols: 300,
        positions: &big_pos,
        values: DeltaValues::F32(&big_val),
    };
    let mut workspace = CpuSparseOperator::new(&big).into_workspace();
    for (rows, cols, widths) in [(37, 131, 1..=40), (23, 1100, 1..=17), (3, 65_600, 7..=9)] {
        let (positions, values) = random_sparse(rows, cols, 0.1, 8);
        let d = SparseDelta {
            rows,
            cols,
            positions: &positions,
            values: DeltaValues::F32(&values),
        };
        let mut dense = vec![0f64; rows * cols];
        for (&p, &v) in positions.iter().zip(&values) {
            dense[p as usize] = v as f64;
        }
        let mut op = CpuSparseOperator::with_workspace(&d, std::mem::take(&mut workspace));
        for w in widths {
            for transpose in [false, true] {
                let (din, dout) = if transpose {
                    (rows, cols)
                } else {
                    (cols, rows)
                };
                let x: Vec<f32> = (0..din * w)
                    .map(|i| (uniform(9 + w as u64, i as u64) * 2.0 - 1.0) as f32)
                    .collect();
                let mut y = vec![f32::NAN; dout * w];
                op.apply(&x, &mut y, transpose);
                // The f32 sums in stored order.
                let mut ordered = vec![0f32; dout * w];
                for (&p, &v) in positions.iter().zip(&values) {
                    let (r, c) = (p as usize / cols, p as usize % cols);
                    let (i, o) = if transpose { (r, c) } else { (c, r) };
                    for l in 0..w {
                        ordered[o * w + l] += v * x[i * w + l];
                    }
                }
                for o in 0..dout {
                    for l in 0..w {
                        // The exact sum, and the bound of an f32 sum of its terms:
                        // (terms + 1) * eps * sum |term|.
                        let (mut want, mut abs_sum, mut terms) = (0f64, 0f64, 1f64);
                        for i in 0..din {
                            let a = if transpose {
                                dense[i * cols + o]
                            } else {
                                dense[o * cols + i]
                            };
                            let t = a * x[i * w + l] as f64;
                            (want, abs_sum) = (want + t, abs_sum + t.abs());
                            terms += (a != 0.0) as u8 as f64;
                        }
                        let got = y[o * w + l];
                        let at = format!(
                            "{rows} x {cols}, width {w}, transpose {transpose}, output {o}, \
                             vector {l}"
                        );
                        assert!(
                            (got as f64 - want).abs() <= terms * f32::EPSILON as f64 * abs_sum,
                            "{at}: {got} vs {want}"
                        );
                        let plain = ordered[o * w + l];
                        assert_eq!(got.to_bits(), plain.to_bits(), "{at}: {got} vs {plain}");
                    }
                }
            }
        }
        workspace = op.into_workspace();
    }
}

/// Coded values (a byte per entry into a table, as `compress` passes them) give the same
/// estimate, to the bit, as the same values in f32; codes past their table are refused.
#[test]
fn coded_values_equal_f32_values_and_bad_codes_are_rejected() {
    let g = generate(600, 1500, 0.02, Kind::Quantized, 31);
    let mut table: Vec<u32> = g.values.iter().map(|v| v.to_bits()).collect();
    table.sort_unstable();
    table.dedup();
    assert!(table.len() <= 256, "{} levels", table.len());
    let codes: Vec<u8> = g
        .values
        .iter()
        .map(|v| table.binary_search(&v.to_bits()).unwrap() as u8)
        .collect();
    let table: Vec<f32> = table.into_iter().map(f32::from_bits).collect();
    let coded = SparseDelta {
        values: DeltaValues::Coded {
            codes: &codes,
            table: &table,
        },
        ..g.delta()
    };
    let opts = EstimatorOptions::default();
    let (want, got) = (nuclear_norm(&g.delta(), &opts), nuclear_norm(&coded, &opts));
    assert_eq!(want.to_bits(), got.to_bits(), "{want} vs {got}");
    let short = SparseDelta {
        values: DeltaValues::Coded {
            codes: &codes,
            table: &table[..1],
        },
        ..g.delta()
    };
    let err = sparse::validate(&short).unwrap_err();
    assert!(err.contains("past a table of 1 values"), "{err}");
}

/// The estimate is a random variable of the seed: its standard error, not one lucky seed, has
/// to keep it within 1 %. A small square matrix (the shape of MiniLM's attention weights) starts
/// at a standard error of about 0.5 % with one batch of probes; with the earlier target of 1 %
/// seed 5 missed by 1.53 %, with the default 0.4 % all twelve seeds stay within 0.7 %.
#[test]
fn small_square_matrices_meet_the_tolerance_for_every_seed() {
    let g = generate(400, 400, 0.05, Kind::Quantized, 41);
    let exact = exact_reference(&g);
    for seed in 0..12 {
        let opts = EstimatorOptions {
            seed,
            ..Default::default()
        };
        let got = nuclear_norm(&g.delta(), &opts);
        let rel = (got - exact) / exact;
        assert!(rel.abs() <= TOL, "seed {seed}: relative error {rel:e}");
    }
}
