//! The nuclear-norm estimator, written against [`MatrixOperator`] so that the products can run
//! anywhere (CPU here, WGSL kernels later). See the module docs of [`super`] for the method.

use super::eigen::{bidiagonal_sqrt_quadrature, jacobi_eigen, symmetric_eigenvalues};
use super::rng;
use rayon::prelude::*;

/// Products with a matrix `A` (`rows x cols`) and its transpose, on blocks of vectors.
///
/// Block layout: a block of `w` vectors of length `d` is a row-major `d x w` array of f32,
/// `x[i * w + l]` being entry `i` of vector `l` (so one matrix entry multiplies `w` contiguous
/// numbers). The width `w` is `x.len() / input_dim` and changes from call to call: with the
/// default options it is 8 (block Krylov), 16 (Rayleigh-Ritz with the first 8 probes), up to
/// 24 (the kept deflation lanes plus those probes) shrinking as lanes converge, then 8 or fewer
/// (extra probe batches), and at most 64 in the exact path; in general it is at most
/// `max(deflation_block * deflation_iters + max(probes, 4), 64)`.
/// `transpose == false` computes `y = A x` with `x.len() == cols * w`, `y.len() == rows * w`;
/// `transpose == true` computes `y = A^T x` with `x.len() == rows * w`, `y.len() == cols * w`.
/// `y` must be overwritten, not accumulated into. The estimator multiplies alternately by `A`
/// and `A^T` (by `A^T` then `A` when `A` is wide).
///
/// Precision: inputs and outputs are f32, and products may be accumulated in f32 in any order
/// (a GPU kernel summing in another order is fine); the estimator keeps its own vectors in f64.
/// Products with unit vectors must be exact (one nonzero term), which any sane kernel gives:
/// the exact path reads the matrix out that way. Measured sensitivity: random relative output
/// perturbations of 1e-6 (about 10 times f32 rounding) move the estimate by 1e-9 to 3e-7
/// relative, 1e-5 by at most 2e-5 (test `insensitive_to_f32_level_product_errors`).
pub trait MatrixOperator {
    /// Number of rows of `A`.
    fn rows(&self) -> usize;
    /// Number of columns of `A`.
    fn cols(&self) -> usize;
    /// `||A||_F^2`, the sum of the squares of the entries, accumulated in f64.
    fn frobenius_norm_sq(&self) -> f64;
    /// `y = A x` (`transpose == false`) or `y = A^T x`, for a row-major block of vectors.
    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool);
}

/// Tuning of [`estimate_nuclear_norm`]. The defaults meet a 1 % relative error (in practice
/// 0.1 - 0.3 %) on the target matrices; see the module docs of [`super`].
#[derive(Debug, Clone, PartialEq)]
pub struct EstimatorOptions {
    /// Hutchinson probes per batch for the deflated remainder (at least 4 are used).
    pub probes: usize,
    /// Upper bound on the total number of probes when the standard error asks for more.
    pub max_probes: usize,
    /// Maximum number of Golub-Kahan-Lanczos steps per quadrature lane.
    pub lanczos_steps: usize,
    /// Seed of the Rademacher vectors.
    pub seed: u64,
    /// Block size of the randomized block Krylov deflation (0 disables deflation).
    pub deflation_block: usize,
    /// Number of multiplications by `A^T A` in the block Krylov deflation.
    pub deflation_iters: usize,
    /// Only Ritz vectors whose Ritz value is at least this multiple of the mean eigenvalue of
    /// `A^T A` (`||A||_F^2 / n`) are deflated. A random-like bulk spectrum ends below 4 times
    /// its mean (the Marchenko-Pastur edge `(1 + sqrt(n / N))^2`), so with the default 4 only
    /// outliers above the bulk get a quadrature lane of their own; the others would cost a
    /// lane each and reduce no variance. 0 keeps them all.
    pub deflation_min_ratio: f64,
    /// A lane stops when its Gauss and Gauss-Radau estimates differ by less than this,
    /// relative to the lane's value.
    pub quadrature_tol: f64,
    /// A lane's value is `gauss_weight * Gauss + (1 - gauss_weight) * Gauss-Radau`. The exact
    /// value lies between the two rules; their plain mean (0.5) under-estimates on every
    /// test spectrum, because the Gauss-Radau rule converges more slowly, and 0.6 gave the
    /// smallest worst error over the test matrices (see the module docs of [`super`]).
    pub gauss_weight: f64,
    /// More probes are added while the estimated standard error of the result exceeds this
    /// fraction of it. LLaMA-size matrices start well below the default 0.4 % (0.04 - 0.17 % on
    /// a 7B block) and never pay for it; small ones (a few hundred on a side, e.g. MiniLM's
    /// 384 x 384) start at up to 0.9 %, where 1 % let about 1 estimate in 20 miss by more than
    /// 1 % over a sweep of seeds (see `tests.rs`).
    pub target_rel_std_error: f64,
    /// Matrices whose smaller dimension is at most this are done exactly (dense Gram matrix
    /// and a symmetric eigen solver).
    pub exact_max_dim: usize,
}

impl Default for EstimatorOptions {
    fn default() -> Self {
        EstimatorOptions {
            probes: 8,
            max_probes: 64,
            lanczos_steps: 100,
            seed: 0x7472_6163_656e_6f72, // "tracenor"
            deflation_block: 8,
            deflation_iters: 2,
            deflation_min_ratio: 4.0,
            quadrature_tol: 2e-2,
            gauss_weight: 0.6,
            target_rel_std_error: 4e-3,
            exact_max_dim: 256,
        }
    }
}

/// Random streams of the counter-based generator.
const STREAM_DEFLATION: u64 = 1;
const STREAM_PROBES: u64 = 2;

/// The operator seen from the small side: `B` is `A` if `A` is tall, else `A^T`; `n` is the
/// small dimension and `big` the other one.
struct Tall<'a> {
    op: &'a mut dyn MatrixOperator,
    transposed: bool,
    n: usize,
    big: usize,
    xbuf: Vec<f32>,
    ybuf: Vec<f32>,
    /// Operator calls, vectors multiplied, and the widest block so far.
    calls: usize,
    vectors: usize,
    max_width: usize,
}

impl Tall<'_> {
    /// `B v` for each vector (length `n` in, `big` out).
    fn forward(&mut self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let (n, big, t) = (self.n, self.big, self.transposed);
        self.product(vs, n, big, t)
    }

    /// `B^T u` for each vector (length `big` in, `n` out).
    fn backward(&mut self, us: &[&[f64]]) -> Vec<Vec<f64>> {
        let (n, big, t) = (self.n, self.big, self.transposed);
        self.product(us, big, n, !t)
    }

    fn product(
        &mut self,
        vs: &[&[f64]],
        din: usize,
        dout: usize,
        transpose: bool,
    ) -> Vec<Vec<f64>> {
        let w = vs.len();
        if w == 0 {
            return Vec::new();
        }
        self.calls += 1;
        self.vectors += w;
        self.max_width = self.max_width.max(w);
        self.xbuf.resize(din * w, 0.0);
        self.ybuf.resize(dout * w, 0.0);
        // Both conversions run over blocks of rows, so that the block of `x` or `y` being
        // transposed stays in the L1 cache.
        const BLOCK: usize = 256;
        self.xbuf
            .par_chunks_mut(BLOCK * w)
            .enumerate()
            .for_each(|(b, block)| {
                for (i, row) in (b * BLOCK..).zip(block.chunks_exact_mut(w)) {
                    for (x, v) in row.iter_mut().zip(vs) {
                        *x = v[i] as f32;
                    }
                }
            });
        self.op.apply(&self.xbuf, &mut self.ybuf, transpose);
        let y = &self.ybuf;
        let mut out: Vec<Vec<f64>> = (0..w).map(|_| Vec::with_capacity(dout)).collect();
        // The lanes' pieces of each block of rows, gathered per block.
        let mut blocks: Vec<Vec<&mut [std::mem::MaybeUninit<f64>]>> = (0..dout.div_ceil(BLOCK))
            .map(|_| Vec::with_capacity(w))
            .collect();
        for lane in out.iter_mut() {
            let spare = &mut lane.spare_capacity_mut()[..dout];
            for (block, piece) in blocks.iter_mut().zip(spare.chunks_mut(BLOCK)) {
                block.push(piece);
            }
        }
        blocks
            .into_par_iter()
            .enumerate()
            .for_each(|(b, mut pieces)| {
                for (l, piece) in pieces.iter_mut().enumerate() {
                    for (i, o) in (b * BLOCK..).zip(piece.iter_mut()) {
                        o.write(y[i * w + l] as f64);
                    }
                }
            });
        for lane in out.iter_mut() {
            // SAFETY: the blocks above wrote all `dout` elements of every lane.
            unsafe { lane.set_len(dout) };
        }
        out
    }
}

/// `a . b` with eight interleaved partial sums (so the additions pipeline and vectorize),
/// combined in a fixed order: deterministic, and within f64 rounding of the plain sum.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Classical Gram-Schmidt against `basis`, twice (CGS2): orthogonal to working precision.
fn orthogonalize(v: &mut [f64], basis: &[Vec<f64>]) {
    orthogonalize_with_coefficients(v, basis);
}

/// [`orthogonalize`], returning the coefficients `c` with `v_out = v_in - sum_j c_j basis_j`.
fn orthogonalize_with_coefficients(v: &mut [f64], basis: &[Vec<f64>]) -> Vec<f64> {
    let mut total = vec![0.0; basis.len()];
    for _ in 0..2 {
        let c: Vec<f64> = basis.iter().map(|q| dot(q, v)).collect();
        for ((q, c), t) in basis.iter().zip(c).zip(&mut total) {
            axpy(-c, q, v);
            *t += c;
        }
    }
    total
}

/// The result of [`estimate_nuclear_norm_with_report`]: the estimate and how it was obtained.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NuclearNormEstimate {
    /// The estimated nuclear norm.
    pub value: f64,
    /// Estimated standard error of `value` from the probe sample (0 for the exact path; it does
    /// not include the quadrature error, which is bounded by `quadrature_tol` per lane).
    pub std_error: f64,
    /// True when the matrix was small enough to be done exactly.
    pub exact: bool,
    /// Number of deflation vectors (the rank of the Hutch++ split).
    pub deflation_rank: usize,
    /// Number of Hutchinson probes used.
    pub probes: usize,
    /// Bound on the quadrature error: `max(w, 1 - w)` (`w` the option `gauss_weight`) times the
    /// Gauss/Gauss-Radau gaps of the deflation lanes plus the mean gap of the probe lanes.
    pub quadrature_bound: f64,
    /// Number of `MatrixOperator::apply` calls.
    pub operator_calls: usize,
    /// Total number of vectors multiplied (sum of block widths over all calls).
    pub operator_vectors: usize,
    /// Widest block passed to `apply`.
    pub max_block_width: usize,
}

/// Estimates the nuclear norm (sum of singular values) of the operator's matrix.
///
/// Deterministic for given options (and a deterministic operator); 0 for an empty matrix.
pub fn estimate_nuclear_norm(op: &mut dyn MatrixOperator, opts: &EstimatorOptions) -> f64 {
    estimate_nuclear_norm_with_report(op, opts).value
}

/// [`estimate_nuclear_norm`], also reporting the standard error and the work done.
pub fn estimate_nuclear_norm_with_report(
    op: &mut dyn MatrixOperator,
    opts: &EstimatorOptions,
) -> NuclearNormEstimate {
    let (rows, cols) = (op.rows(), op.cols());
    let fro2 = op.frobenius_norm_sq();
    if rows == 0 || cols == 0 || fro2 <= 0.0 || !fro2.is_finite() {
        return NuclearNormEstimate {
            exact: true,
            ..Default::default()
        };
    }
    let transposed = rows < cols;
    let (n, big) = if transposed {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let mut tall = Tall {
        op,
        transposed,
        n,
        big,
        xbuf: Vec::new(),
        ybuf: Vec::new(),
        calls: 0,
        vectors: 0,
        max_width: 0,
    };
    let mut report = if n <= opts.exact_max_dim {
        NuclearNormEstimate {
            value: exact_nuclear_norm(&mut tall),
            exact: true,
            ..Default::default()
        }
    } else {
        stochastic(&mut tall, fro2, opts)
    };
    report.operator_calls = tall.calls;
    report.operator_vectors = tall.vectors;
    report.max_block_width = tall.max_width;
    report
}

/// Exact: read `B` out column by column (products with unit vectors are exact), form
/// `B^T B` in f64 and sum the square roots of its eigenvalues.
fn exact_nuclear_norm(tall: &mut Tall) -> f64 {
    let (n, big) = (tall.n, tall.big);
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(n);
    let chunk = 64;
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let units: Vec<Vec<f64>> = (start..end)
            .map(|j| {
                let mut e = vec![0.0; n];
                e[j] = 1.0;
                e
            })
            .collect();
        let refs: Vec<&[f64]> = units.iter().map(|v| v.as_slice()).collect();
        cols.extend(tall.forward(&refs));
    }
    debug_assert!(cols.iter().all(|c| c.len() == big));
    let mut gram = vec![0.0; n * n];
    gram.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, g) in row.iter_mut().enumerate().take(i + 1) {
            *g = dot(&cols[i], &cols[j]);
        }
    });
    for i in 0..n {
        for j in i + 1..n {
            gram[i * n + j] = gram[j * n + i];
        }
    }
    let eig = symmetric_eigenvalues(&mut gram, n);
    eig.iter().map(|&l| l.max(0.0).sqrt()).sum()
}

/// One Golub-Kahan-Lanczos quadrature lane for `v^T sqrt(B^T B) v`.
struct Lane {
    /// `||v||^2` of the starting vector.
    norm2: f64,
    /// Current right Lanczos vector (unit).
    v: Vec<f64>,
    /// Previous left Lanczos vector (unit), empty before the first step.
    u: Vec<f64>,
    /// `B v` for the starting vector when it is already known (taken by the first step, which
    /// then needs no product for this lane).
    first_forward: Option<Vec<f64>>,
    /// All right Lanczos vectors so far, for re-orthogonalization.
    history: Vec<Vec<f64>>,
    alpha: Vec<f64>,
    beta: Vec<f64>,
    /// Current estimate `norm2 * (w Gauss + (1 - w) Radau)` (`w` the option `gauss_weight`) and
    /// the gap `norm2 * |Gauss - Radau|`.
    value: f64,
    gap: f64,
    done: bool,
}

impl Lane {
    fn new(start: Vec<f64>) -> Lane {
        let norm2 = dot(&start, &start);
        let done = norm2 == 0.0;
        let inv = if done { 0.0 } else { 1.0 / norm2.sqrt() };
        let v: Vec<f64> = start.iter().map(|x| x * inv).collect();
        Lane {
            norm2,
            history: vec![v.clone()],
            v,
            u: Vec::new(),
            first_forward: None,
            alpha: Vec::new(),
            beta: Vec::new(),
            value: 0.0,
            gap: 0.0,
            done,
        }
    }

    /// A lane whose starting vector's product `B start` is already known.
    fn with_forward(start: Vec<f64>, b_start: Vec<f64>) -> Lane {
        let mut lane = Lane::new(start);
        if !lane.done {
            let inv = 1.0 / lane.norm2.sqrt();
            lane.first_forward = Some(b_start.into_iter().map(|x| x * inv).collect());
        }
        lane
    }

    /// `||B v_1||^2 * ||v||^2 = v^T G v` for the starting vector (after the first step).
    fn x1(&self) -> f64 {
        self.alpha.first().map_or(0.0, |a| a * a * self.norm2)
    }
}

/// Runs all lanes to convergence. `tiny` is the breakdown threshold on alpha and beta, and
/// `abs_floor` a per-unit-norm absolute gap that counts as converged.
fn run_lanes(
    tall: &mut Tall,
    lanes: &mut [Lane],
    opts: &EstimatorOptions,
    tiny: f64,
    abs_floor: f64,
) {
    let steps = opts.lanczos_steps.max(1);
    for step in 0..steps {
        let mut active: Vec<&mut Lane> = lanes.iter_mut().filter(|l| !l.done).collect();
        if active.is_empty() {
            break;
        }
        // Lanes whose `B v` is known skip the product.
        let vs: Vec<&[f64]> = active
            .iter()
            .filter(|l| l.first_forward.is_none())
            .map(|l| l.v.as_slice())
            .collect();
        let mut computed = tall.forward(&vs).into_iter();
        let ys: Vec<Vec<f64>> = active
            .iter_mut()
            .map(|l| l.first_forward.take().or_else(|| computed.next()))
            .collect::<Option<_>>()
            .expect("one product per lane without a known one");
        // u_j = B v_j - beta_{j-1} u_{j-1}; alpha_j = ||u_j||.
        let us: Vec<Option<Vec<f64>>> = active
            .par_iter_mut()
            .zip(ys)
            .map(|(lane, mut u)| {
                if let Some(&b) = lane.beta.last() {
                    axpy(-b, &lane.u, &mut u);
                }
                let a = dot(&u, &u).sqrt();
                lane.alpha.push(a);
                if a <= tiny {
                    // B v_j is in the span of the previous vectors: the Krylov space is
                    // invariant and Gauss quadrature on it is exact.
                    lane.value = lane.norm2 * bidiagonal_sqrt_quadrature(&lane.alpha, &lane.beta);
                    lane.gap = 0.0;
                    lane.done = true;
                    return None;
                }
                u.iter_mut().for_each(|x| *x /= a);
                Some(u)
            })
            .collect();
        let mut cont: Vec<&mut Lane> = Vec::new();
        let mut cont_u: Vec<Vec<f64>> = Vec::new();
        for (lane, u) in active.into_iter().zip(us) {
            if let Some(u) = u {
                cont.push(lane);
                cont_u.push(u);
            }
        }
        if cont.is_empty() {
            continue;
        }
        let refs: Vec<&[f64]> = cont_u.iter().map(|u| u.as_slice()).collect();
        let zs = tall.backward(&refs);
        let last = step + 1 == steps;
        cont.par_iter_mut()
            .zip(zs)
            .zip(cont_u)
            .for_each(|((lane, mut v), u)| {
                let a = *lane.alpha.last().unwrap();
                axpy(-a, &lane.v, &mut v);
                orthogonalize(&mut v, &lane.history);
                let b = dot(&v, &v).sqrt();
                lane.beta.push(b);
                let gauss = bidiagonal_sqrt_quadrature(&lane.alpha, &lane.beta);
                if b <= tiny {
                    lane.value = lane.norm2 * gauss;
                    lane.gap = 0.0;
                    lane.done = true;
                    return;
                }
                let mut ext = lane.alpha.clone();
                ext.push(0.0);
                let radau = bidiagonal_sqrt_quadrature(&ext, &lane.beta);
                let w = opts.gauss_weight;
                lane.value = lane.norm2 * (w * gauss + (1.0 - w) * radau);
                lane.gap = lane.norm2 * (gauss - radau).abs();
                let tol = opts.quadrature_tol * lane.value.abs().max(abs_floor * lane.norm2);
                if lane.gap <= tol || last {
                    lane.done = true;
                    return;
                }
                v.iter_mut().for_each(|x| *x /= b);
                lane.u = u;
                lane.history.push(v.clone());
                lane.v = v;
            });
    }
    // Lanes that never ran (zero start) keep value 0.
}

/// Least-squares regression estimator: the intercept of `y ~ 1 + sum_c (x_c - mean_c)` with
/// known covariate means, and its standard error. Covariates that are (numerically) constant
/// or would leave fewer than 2 residual degrees of freedom are dropped.
fn regression_estimate(y: &[f64], covariates: &[(Vec<f64>, f64)]) -> (f64, f64) {
    let m = y.len();
    let mean_y = y.iter().sum::<f64>() / m as f64;
    // Center and scale the usable covariates.
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for (x, mu) in covariates {
        if m < cols.len() + 4 {
            break;
        }
        let c: Vec<f64> = x.iter().map(|v| v - mu).collect();
        let cm = c.iter().sum::<f64>() / m as f64;
        let var = c.iter().map(|v| (v - cm) * (v - cm)).sum::<f64>() / m as f64;
        let scale = c.iter().map(|v| v * v).sum::<f64>() / m as f64;
        if !var.is_finite() || var <= 1e-12 * scale {
            continue;
        }
        let s = 1.0 / scale.sqrt();
        cols.push(c.into_iter().map(|v| v * s).collect());
    }
    loop {
        let p = cols.len() + 1;
        // Normal equations for [1, cols...].
        let design = |i: usize, r: usize| if i == 0 { 1.0 } else { cols[i - 1][r] };
        let mut ata = vec![0.0; p * p];
        let mut aty = vec![0.0; p];
        for (r, &yr) in y.iter().enumerate() {
            for i in 0..p {
                aty[i] += design(i, r) * yr;
                for j in 0..p {
                    ata[i * p + j] += design(i, r) * design(j, r);
                }
            }
        }
        let Some((coef, inv00)) = solve_spd(&ata, &aty, p) else {
            cols.pop();
            continue;
        };
        let mut rss = 0.0;
        for (r, &yr) in y.iter().enumerate() {
            let fit: f64 = (0..p).map(|i| coef[i] * design(i, r)).sum();
            rss += (yr - fit) * (yr - fit);
        }
        let dof = m.saturating_sub(p).max(1) as f64;
        let se = (rss / dof * inv00).max(0.0).sqrt();
        if p == 1 {
            let var = y.iter().map(|v| (v - mean_y) * (v - mean_y)).sum::<f64>() / dof;
            return (mean_y, (var / m as f64).sqrt());
        }
        return (coef[0], se);
    }
}

/// Solves the small SPD system `a x = b` by Gaussian elimination with a pivot check; returns the
/// solution and `(a^{-1})_{00}`, or None if `a` is numerically singular.
fn solve_spd(a: &[f64], b: &[f64], p: usize) -> Option<(Vec<f64>, f64)> {
    // Augment with e_0 to get the first column of the inverse.
    let w = p + 2;
    let mut m = vec![0.0; p * w];
    for i in 0..p {
        m[i * w..i * w + p].copy_from_slice(&a[i * p..i * p + p]);
        m[i * w + p] = b[i];
        m[i * w + p + 1] = if i == 0 { 1.0 } else { 0.0 };
    }
    let maxdiag = (0..p).map(|i| a[i * p + i].abs()).fold(0.0, f64::max);
    for k in 0..p {
        let piv = m[k * w + k];
        if piv.is_nan() || piv.abs() <= 1e-10 * maxdiag {
            return None;
        }
        for i in k + 1..p {
            let f = m[i * w + k] / piv;
            for j in k..w {
                m[i * w + j] -= f * m[k * w + j];
            }
        }
    }
    let mut x = vec![0.0; p];
    let mut z = vec![0.0; p];
    for k in (0..p).rev() {
        let mut sx = m[k * w + p];
        let mut sz = m[k * w + p + 1];
        for j in k + 1..p {
            sx -= m[k * w + j] * x[j];
            sz -= m[k * w + j] * z[j];
        }
        x[k] = sx / m[k * w + k];
        z[k] = sz / m[k * w + k];
    }
    Some((x, z[0]))
}

/// What the stochastic estimate works with besides the operator: the options, the small
/// dimension `n`, `||A||_F^2`, the probe batch size, and the lanes' breakdown threshold and
/// absolute convergence floor (relative to `||A||_F`).
struct Sweep<'o> {
    opts: &'o EstimatorOptions,
    n: usize,
    fro2: f64,
    batch: usize,
    tiny: f64,
    abs_floor: f64,
}

/// The deflated head of the spectrum: the kept Ritz vectors `q` of `B^T B`, their products
/// `B q`, the sum of their Ritz values, and the first batch of probes with their products `B z`
/// (given by the same operator call as the missing `B q`).
#[derive(Default)]
struct Deflation {
    q: Vec<Vec<f64>>,
    bq: Vec<Vec<f64>>,
    energy: f64,
    first_probes: Vec<(Vec<f64>, Vec<f64>)>,
}

fn stochastic(tall: &mut Tall, fro2: f64, opts: &EstimatorOptions) -> NuclearNormEstimate {
    let n = tall.n;
    let fro = fro2.sqrt();
    let sweep = Sweep {
        opts,
        n,
        fro2,
        batch: opts.probes.max(4),
        tiny: 1e-6 * fro,
        abs_floor: fro / n as f64,
    };
    // 1. Randomized block Krylov deflation, then Rayleigh-Ritz.
    let (basis, basis_forward) = sweep.krylov_basis(tall);
    let deflation = if basis.is_empty() {
        Deflation::default()
    } else {
        sweep.rayleigh_ritz(tall, basis, basis_forward)
    };
    let k = deflation.q.len();
    let head_energy = deflation.energy;

    // 2. Head lanes (one per deflation vector) and the first batch of probes, run together.
    let (q, mut lanes) = sweep.first_lanes(deflation);
    sweep.run(tall, &mut lanes);
    let head: f64 = lanes[..k].iter().map(|l| l.value).sum();
    let head_gap: f64 = lanes[..k].iter().map(|l| l.gap).sum();
    let probes: Vec<Lane> = lanes.split_off(k);

    // 3. Tail: regression estimator with control variates ||Pz||^2 and ||B P z||^2.
    let (probes, tail, se) = sweep.tail(tall, probes, &q, head, fro2 - head_energy);
    NuclearNormEstimate {
        value: (head + tail).max(0.0),
        std_error: se,
        exact: false,
        deflation_rank: k,
        probes: probes.len(),
        quadrature_bound: opts.gauss_weight.max(1.0 - opts.gauss_weight)
            * (head_gap + probes.iter().map(|l| l.gap).sum::<f64>() / probes.len() as f64),
        ..Default::default()
    }
}

impl Sweep<'_> {
    /// Rademacher probe `j`.
    fn probe(&self, j: usize) -> Vec<f64> {
        let mut z = vec![0.0; self.n];
        rng::rademacher(self.opts.seed, STREAM_PROBES, j as u64, &mut z);
        z
    }

    /// A lane for probe `j`, projected off the deflation vectors `q`.
    fn probe_lane(&self, q: &[Vec<f64>], j: usize) -> Lane {
        let mut z = self.probe(j);
        orthogonalize(&mut z, q);
        Lane::new(z)
    }

    /// Runs `lanes` to convergence.
    fn run(&self, tall: &mut Tall, lanes: &mut [Lane]) {
        run_lanes(tall, lanes, self.opts, self.tiny, self.abs_floor);
    }

    /// The randomized block Krylov basis of `B^T B` (orthonormal), and `B q` for each basis
    /// vector `q` where a product already gave it.
    fn krylov_basis(&self, tall: &mut Tall) -> (Vec<Vec<f64>>, Vec<Option<Vec<f64>>>) {
        let (n, opts) = (self.n, self.opts);
        let block = opts.deflation_block.min(n / 2);
        let mut basis: Vec<Vec<f64>> = Vec::new();
        let mut basis_forward: Vec<Option<Vec<f64>>> = Vec::new();
        if block == 0 || opts.deflation_iters == 0 {
            return (basis, basis_forward);
        }
        // Where the vectors of `cur` sit in the basis (none for the random start block).
        let mut cur_start: Option<usize> = None;
        let mut cur: Vec<Vec<f64>> = (0..block)
            .map(|j| {
                let mut z = vec![0.0; n];
                rng::rademacher(opts.seed, STREAM_DEFLATION, j as u64, &mut z);
                z
            })
            .collect();
        for _ in 0..opts.deflation_iters {
            if basis.len() + cur.len() > n / 2 {
                break;
            }
            let refs: Vec<&[f64]> = cur.iter().map(|v| v.as_slice()).collect();
            let bv = tall.forward(&refs);
            let refs: Vec<&[f64]> = bv.iter().map(|v| v.as_slice()).collect();
            let gv = tall.backward(&refs);
            if let Some(start) = cur_start {
                for (known, b) in basis_forward[start..].iter_mut().zip(bv) {
                    *known = Some(b);
                }
            }
            let fresh = extend_orthonormal(gv, &basis);
            if fresh.is_empty() {
                break;
            }
            cur_start = Some(basis.len());
            basis.extend(fresh.iter().cloned());
            basis_forward.extend(fresh.iter().map(|_| None));
            cur = fresh;
        }
        (basis, basis_forward)
    }

    /// Rayleigh-Ritz: rotates the basis to Ritz vectors of `B^T B`, keeping those above the
    /// bulk, and gets `||B Q||_F^2`. One product gives the basis vectors' missing `B q` and
    /// `B z` for the first batch of probes, so that the first step of every lane needs no
    /// product of its own: the Ritz vectors and the projected probes are combinations of
    /// vectors whose products are known.
    fn rayleigh_ritz(
        &self,
        tall: &mut Tall,
        basis: Vec<Vec<f64>>,
        mut basis_forward: Vec<Option<Vec<f64>>>,
    ) -> Deflation {
        let k = basis.len();
        let missing: Vec<usize> = (0..k).filter(|&i| basis_forward[i].is_none()).collect();
        let zs: Vec<Vec<f64>> = (0..self.batch)
            .into_par_iter()
            .map(|j| self.probe(j))
            .collect();
        let refs: Vec<&[f64]> = missing
            .iter()
            .map(|&i| basis[i].as_slice())
            .chain(zs.iter().map(|z| z.as_slice()))
            .collect();
        let mut products = tall.forward(&refs).into_iter();
        for &i in &missing {
            basis_forward[i] = products.next();
        }
        let first_probes: Vec<(Vec<f64>, Vec<f64>)> = zs.into_iter().zip(products).collect();
        let w: Vec<Vec<f64>> = basis_forward
            .into_iter()
            .map(|b| b.expect("every basis product is known"))
            .collect();
        let mut h = vec![0.0; k * k];
        h.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            for (j, x) in row.iter_mut().enumerate() {
                *x = dot(&w[i], &w[j]);
            }
        });
        let (vals, vecs) = jacobi_eigen(&mut h, k);
        // Ritz values inside the bulk buy no variance reduction but would each cost a lane.
        let floor = self.opts.deflation_min_ratio * self.fro2 / self.n as f64;
        let keep: Vec<usize> = (0..k).filter(|&c| vals[c] >= floor).collect();
        let energy = keep.iter().map(|&c| vals[c]).sum();
        // Each kept Ritz vector and its product, as the same combination of the basis.
        let combine = |vectors: &[Vec<f64>], c: usize| {
            let mut out = vec![0.0; vectors[0].len()];
            for (r, b) in vectors.iter().enumerate() {
                axpy(vecs[r * k + c], b, &mut out);
            }
            out
        };
        let (q, bq): (Vec<Vec<f64>>, Vec<Vec<f64>>) = keep
            .into_par_iter()
            .map(|c| (combine(&basis, c), combine(&w, c)))
            .unzip();
        Deflation {
            q,
            bq,
            energy,
            first_probes,
        }
    }

    /// The head lanes (`lanes[..q.len()]`, one per deflation vector), then the first batch of
    /// probes; returns the deflation vectors too.
    fn first_lanes(&self, deflation: Deflation) -> (Vec<Vec<f64>>, Vec<Lane>) {
        let Deflation {
            q,
            bq,
            first_probes,
            ..
        } = deflation;
        let first_batch: Vec<Lane> = if first_probes.is_empty() {
            (0..self.batch)
                .into_par_iter()
                .map(|j| self.probe_lane(&q, j))
                .collect()
        } else {
            // `P z = z - Q c`, so `B P z = B z - (B Q) c`.
            first_probes
                .into_par_iter()
                .map(|(mut z, mut bz)| {
                    let c = orthogonalize_with_coefficients(&mut z, &q);
                    for (c, b) in c.iter().zip(&bq) {
                        axpy(-c, b, &mut bz);
                    }
                    Lane::with_forward(z, bz)
                })
                .collect()
        };
        let lanes = q
            .iter()
            .zip(bq)
            .map(|(v, bv)| Lane::with_forward(v.clone(), bv))
            .chain(first_batch)
            .collect();
        (q, lanes)
    }

    /// The tail `tr sqrt(P G P)` by regression on the probes' lanes, adding batches of probes
    /// while the standard error exceeds the target relative to `head + tail`. Returns all the
    /// probes' lanes, the tail and its standard error.
    fn tail(
        &self,
        tall: &mut Tall,
        mut probes: Vec<Lane>,
        q: &[Vec<f64>],
        head: f64,
        tail_energy: f64,
    ) -> (Vec<Lane>, f64, f64) {
        let opts = self.opts;
        let (mut tail, mut se) = self.regress_tail(&probes, q.len(), tail_energy);
        while se > opts.target_rel_std_error * (head + tail).abs() && probes.len() < opts.max_probes
        {
            let start = probes.len();
            let extra = self.batch.min(opts.max_probes - start);
            let mut more: Vec<Lane> = (start..start + extra)
                .into_par_iter()
                .map(|j| self.probe_lane(q, j))
                .collect();
            self.run(tall, &mut more);
            probes.extend(more);
            (tail, se) = self.regress_tail(&probes, q.len(), tail_energy);
        }
        (probes, tail, se)
    }

    /// The regression estimate of the tail from `probes` (projected off `k` deflation
    /// vectors), with `||Pz||^2` and, when the tail holds energy, `||B P z||^2` as controls.
    fn regress_tail(&self, probes: &[Lane], k: usize, tail_energy: f64) -> (f64, f64) {
        let y: Vec<f64> = probes.iter().map(|l| l.value).collect();
        let mut cov = vec![(
            probes.iter().map(|l| l.norm2).collect::<Vec<_>>(),
            (self.n - k) as f64,
        )];
        if tail_energy > 1e-3 * self.fro2 {
            cov.push((probes.iter().map(Lane::x1).collect(), tail_energy));
        }
        regression_estimate(&y, &cov)
    }
}

/// Orthonormalizes the vectors of `candidates` against `basis` and each other, dropping those
/// that vanish (or were zero); returns the new vectors.
fn extend_orthonormal(candidates: Vec<Vec<f64>>, basis: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut fresh: Vec<Vec<f64>> = Vec::new();
    for mut y in candidates {
        let before = dot(&y, &y).sqrt();
        if before == 0.0 {
            continue;
        }
        orthogonalize(&mut y, basis);
        orthogonalize(&mut y, &fresh);
        let after = dot(&y, &y).sqrt();
        if after <= 1e-10 * before || !after.is_finite() {
            continue;
        }
        y.iter_mut().for_each(|x| *x /= after);
        fresh.push(y);
    }
    fresh
}
