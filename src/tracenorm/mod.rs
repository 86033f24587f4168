//! Fast, deterministic estimate of the nuclear (trace) norm of a sparse delta matrix, for
//! UltraDelta's trace-norm-guided rescaling (step 5 of `docs/ALGORITHM.md`): `T_m` is the sum,
//! over a model's compressed 2-D tensors, of the sum of singular values of each compressed,
//! rescaled sparse delta. The released code runs a full SVD per matrix (about 90 s for one
//! 4096 x 4096 matrix on two cores); this module estimates the same number to well under 1 %
//! from the kept entries alone, without densifying large matrices.
//!
//! # Method
//!
//! Let `A` be `m x n` and write `B` for whichever of `A`, `A^T` is tall (`N x n`, `n = min(m, n)`
//! the small side). Then `||A||_* = tr sqrt(B^T B) = tr f(G)` with `G = B^T B` and
//! `f = sqrt`. The estimator combines four ingredients, each chosen because a cheaper variant
//! failed one of the target spectra in a prototype study (errors in the tables of the report):
//!
//! 1. **Exact when cheap.** If `n <= exact_max_dim` (default 256) the columns of `B` are read out
//!    through the operator (products with unit vectors are exact in f32), the Gram matrix is
//!    formed in f64 and its eigenvalues are computed by Householder tridiagonalization plus the
//!    implicit QL algorithm ([`eigen`]); the result is `sum sqrt(max(lambda, 0))`.
//! 2. **Hutch++-style deflation.** A randomized block Krylov step (`deflation_block` Rademacher
//!    vectors, `deflation_iters` multiplications by `G`, each block orthogonalized in f64) gives an
//!    orthonormal basis `Q` (`K <= deflation_block * deflation_iters` columns) of the dominant
//!    singular subspace, rotated to Ritz vectors; only the Ritz vectors whose Ritz value stands
//!    above the bulk (`deflation_min_ratio`, default 4 times the mean eigenvalue of `G`, where a
//!    Marchenko-Pastur bulk ends) are kept, because each kept vector costs a quadrature lane and
//!    one inside the bulk removes no variance. Then, exactly,
//!    `tr f(G) = sum_j q_j^T f(G) q_j + tr(P f(G) P)`, `P = I - Q Q^T`. The first term is
//!    computed lane by lane with Lanczos quadrature started at each `q_j` (near-eigenvectors, so
//!    these lanes converge in a few steps); the second by Hutchinson's estimator with projected
//!    Rademacher probes `P z`. The identity holds for any `Q`, so deflation only changes the
//!    variance, never the expectation. It removes the outliers of low-rank-plus-noise spectra
//!    (which otherwise dominate the Hutchinson variance), makes a pure low-rank matrix of rank
//!    `<= K` exact, and takes out the large localized singular values of heavy-tailed entries.
//!    One operator call gives the Rayleigh-Ritz step the products of the basis vectors it lacks
//!    (those of the last Krylov block; the others came with the block iteration) together with
//!    those of the first batch of raw probes `z`. The Ritz vectors and the projected probes
//!    `P z = z - Q c` are linear combinations of vectors with known products, so no lane's
//!    first step needs a product of its own: one call less per matrix.
//! 3. **Golub-Kahan-Lanczos quadrature** for each quadratic form `v^T f(G) v`: the bidiagonal
//!    `B_k` of `k` Golub-Kahan steps gives `T_k = B_k^T B_k`, the Lanczos matrix of `G`; Gauss
//!    quadrature uses the eigenpairs of `T_k` (nodes `theta_i`, weights `e_1^T y_i`), and the
//!    Gauss-Radau rule with a node prescribed at 0 is obtained by appending `alpha_{k+1} = 0`.
//!    Because the even derivatives of `sqrt` are negative and the odd ones positive, Gauss
//!    over-estimates and Radau(0) under-estimates, so their gap is a rigorous error bound; a
//!    lane stops when the gap falls below `quadrature_tol` (relative) or after `lanczos_steps`
//!    steps, and its value is the weighted mean `0.6 Gauss + 0.4 Radau` (`gauss_weight`: the
//!    Radau rule converges more slowly, so the plain mean under-estimates on every test
//!    spectrum; 0.6 gave the smallest worst error over the test matrices, see below). Working with `A` and `A^T` separately (instead of products with
//!    `G`) matters in single precision: the f32 rounding of the products perturbs singular values
//!    by about `eps * ||A||`, whereas a Lanczos run on `G` would perturb the *eigenvalues* of `G`
//!    by `eps * ||A||^2`, i.e. singular values near zero by `sqrt(eps) * ||A||` - a bias of
//!    several percent on rank-deficient matrices. The right-hand Lanczos vectors are fully
//!    re-orthogonalized (in f64; one-sided re-orthogonalization).
//! 4. **Control variates.** For a probe `w = P z` two more quantities are known exactly per
//!    probe: `x0 = ||w||^2` (expectation `n - K`) and `x1 = ||B w||^2 = w^T G w` (expectation
//!    `tr(P G P) = ||A||_F^2 - ||B Q||_F^2`). The tail estimate is the intercept of the
//!    least-squares fit of the probe values on `(x0 - E x0, x1 - E x1)` (regression estimator).
//!    On a bulk spectrum `sqrt` is close to linear, so this removes most of the variance: the
//!    per-probe relative standard deviation falls from a few percent to a few tenths of a
//!    percent. `x1` is dropped when the tail carries less than 0.1 % of the energy, because
//!    then the f32 rounding of `||B Q||_F^2` would dominate `E x1`. The standard error of the
//!    intercept is estimated; while it exceeds `target_rel_std_error` of the estimate, another
//!    batch of `probes` probes is added (up to `max_probes`).
//!
//! Rademacher probes make the Hutchinson variance depend only on the off-diagonal part of
//! `f(G)`, which is small for the tall random-like matrices of interest.
//!
//! # Defaults, accuracy and cost
//!
//! With [`EstimatorOptions::default`] (8 + 8 probes per batch up to 64, deflation 8 x 2 keeping
//! the outliers above 4 times the mean, per-lane quadrature tolerance 2e-2 with Gauss weight
//! 0.6, at most 100 steps, target standard error 0.4 %), the worst relative error over the test
//! matrices of `tests.rs` (1024 x 2752, 2752 x 1024, 1024 x 1024 and 1200 x 1024, dense and
//! 0.5 % to 10 % sparse; Gaussian, Laplace, Student-t, 16 quantized levels, rank-8-plus-noise,
//! pure rank 8 and 64) is 0.58 %, and on the seven compressed deltas of one synthetic
//! LLaMA-2-7B block it is 0.31 % of the exact sum (full SVD by PyTorch; see
//! `docs/BENCHMARKS-HISTORY.md`), well inside the 1 % the rescaling needs. The tolerance and weight were
//! chosen on those matrices: tolerance 5e-3 with the plain mean had a worst test error of
//! 0.56 % (0.16 % on the block) for 43 % more operator calls; 3e-2 and above put pure rank 64
//! past 1 %. Per 7B matrix this takes 14 to 28 operator calls (116 to 246 vectors multiplied
//! by `A` or `A^T`; 19 to 49 calls with tolerance 5e-3; 970 to 6900 vectors with the first
//! defaults: 16 + 16 probes, deflation 16 x 3, tolerance 5e-4, standard error 0.1 %, which
//! reached 0.03 % on that block). What costs is the number of calls, each a pass over the
//! matrix, more than their width: a pass with 16 vectors takes about 1.5 times one with 8, which
//! costs about what one with 1 does. The lane histories take up to `lanczos_steps * n * 8`
//! bytes per lane (f64), in practice a few tens of MB.
//!
//! The estimate is a random variable of the seed, and the figures above are for the default seed.
//! Over seeds 0 to 5 the worst error on those test matrices (plus square Student-t, 16-level and
//! rank-64 ones, and a 1024 x 1200 one) was 0.49 to 1.37 %; the misses above 1 % were all exactly
//! rank-64 matrices, where the lanes' quadrature leans on the Gauss rule while the Gauss-Radau rule
//! (a node at zero) is the right one, and the deflation's 16 vectors cannot take the rank out.
//! Pruned deltas are full rank, and `T_m` sums many matrices, whose errors partly cancel. With the
//! earlier standard-error target of 1 %, the misses were larger and more frequent (up to 2.53 % on
//! rank 64 over the same seeds, and 1.53 % for one of twelve seeds on a 400 x 400 16-level matrix),
//! hence 0.4 %, which costs nothing where one batch of probes already meets it (every matrix of the
//! 7B block).
//!
//! The hard cases are spectra with a very wide spread of singular values (condition numbers in
//! the thousands, e.g. Cauchy-distributed entries or a diagonal matrix with entries from 0.5 to
//! 600): lanes then need many Lanczos steps and stop at `lanczos_steps`; the reported
//! [`NuclearNormEstimate::quadrature_bound`] covers that error.
//!
//! # Determinism
//!
//! All random numbers come from a counter-based generator ([`rng`]) keyed by (seed, stream,
//! vector, index). Every product row is summed by one thread in a fixed order, per-lane work is
//! independent, and all reductions run in a fixed order, so the result is bit-identical for any
//! rayon thread count.
//!
//! # Operators and precision
//!
//! The estimator only sees a [`MatrixOperator`]: block products `Y = A X` and `Y = A^T X` in f32,
//! with blocks stored row-major (`x[i * width + l]` is entry `i` of vector `l`). Everything
//! else (orthogonalization, quadrature, regression) runs in f64 on the host.
//! [`CpuSparseOperator`] implements it with rayon on the delta's sorted positions alone: their
//! rows for `A` (a gather per output row), and for `A^T` a scatter into panels of output
//! columns, found through a [`sparse::BlockIndex`] of where each row crosses every 256th
//! column, with no transposed copy; values may come as f32 or as byte codes into a table
//! ([`DeltaValues`]), with the same results.

pub mod eigen;
pub mod estimator;
pub mod rng;
pub mod sparse;

#[cfg(test)]
mod tests;

pub use estimator::{
    estimate_nuclear_norm, estimate_nuclear_norm_with_report, EstimatorOptions, MatrixOperator,
    NuclearNormEstimate,
};
pub use sparse::{CpuSparseOperator, SparseWorkspace};

/// A sparse matrix given by row-major element indices (strictly increasing, each
/// `< rows * cols`) and the values at those indices.
#[derive(Debug, Clone, Copy)]
pub struct SparseDelta<'a> {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row-major element indices (`row * cols + col`) of the kept entries, strictly increasing.
    pub positions: &'a [u32],
    /// Values of the kept entries, one per position.
    pub values: DeltaValues<'a>,
}

/// The values of a [`SparseDelta`]'s entries.
#[derive(Debug, Clone, Copy)]
pub enum DeltaValues<'a> {
    /// One f32 per entry.
    F32(&'a [f32]),
    /// One code per entry into a table of at most 256 values: a compressed delta's quantization
    /// levels and their (rescaled) values. Products stream one byte per entry instead of four.
    Coded {
        /// The code (table index) of each entry.
        codes: &'a [u8],
        /// The value of each code.
        table: &'a [f32],
    },
}

impl DeltaValues<'_> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            DeltaValues::F32(v) => v.len(),
            DeltaValues::Coded { codes, .. } => codes.len(),
        }
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32, one per entry (decoded when coded).
    pub fn to_f32(&self) -> Vec<f32> {
        match *self {
            DeltaValues::F32(v) => v.to_vec(),
            DeltaValues::Coded { codes, table } => {
                codes.iter().map(|&c| table[c as usize]).collect()
            }
        }
    }
}

/// Nuclear norm (sum of singular values) of a sparse delta, estimated on the CPU with
/// [`CpuSparseOperator`] and [`estimate_nuclear_norm`]. An empty matrix gives 0.
///
/// Each calling thread keeps one [`SparseWorkspace`] between calls (its index and padded
/// blocks, well under a byte per entry of the largest matrix it has seen), so a model's
/// matrices reuse memory that is already mapped instead of each faulting in fresh pages.
///
/// # Panics
/// If the positions are not strictly increasing, out of range, or not as many as the values.
pub fn nuclear_norm(delta: &SparseDelta, opts: &EstimatorOptions) -> f64 {
    if delta.positions.is_empty() || delta.rows == 0 || delta.cols == 0 {
        return 0.0;
    }
    thread_local! {
        static WORKSPACE: std::cell::Cell<SparseWorkspace> = Default::default();
    }
    let workspace = WORKSPACE.take();
    // On a worker of the thread pool (the caller waits), the estimator's many short parallel
    // sections (three per product) start directly instead of each being sent to the pool from
    // outside: about a tenth faster on a LLaMA-2-7B block.
    let (estimate, workspace) = rayon::scope(|_| {
        let mut op = CpuSparseOperator::with_workspace(delta, workspace);
        let estimate = estimate_nuclear_norm(&mut op, opts);
        (estimate, op.into_workspace())
    });
    WORKSPACE.set(workspace);
    estimate
}
