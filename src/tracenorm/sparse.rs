//! CPU implementation of [`MatrixOperator`]: the matrix is held twice, as CSR (rows of `A`) and
//! as CSC (rows of `A^T`), so both products are row-parallel gathers: every output row is
//! accumulated by one thread, in the order of the stored entries, in f32. Results are therefore
//! independent of the thread count.

use super::estimator::MatrixOperator;
use super::SparseDelta;
use rayon::prelude::*;

/// Compressed rows of a sparse f32 matrix: row `r` holds entries `ptr[r]..ptr[r + 1]` of
/// `idx` (column indices, increasing) and `val`.
#[derive(Debug, Clone)]
pub struct Csr {
    /// Row starts (`rows + 1` entries).
    pub ptr: Vec<u32>,
    /// Column index of each entry.
    pub idx: Vec<u32>,
    /// Value of each entry.
    pub val: Vec<f32>,
}

/// Checks that `delta` has as many values as positions, strictly increasing and in range.
pub fn validate(delta: &SparseDelta) -> Result<(), String> {
    if delta.positions.len() != delta.values.len() {
        return Err(format!(
            "{} positions, {} values",
            delta.positions.len(),
            delta.values.len()
        ));
    }
    let total = delta.rows as u64 * delta.cols as u64;
    let mut prev: Option<u32> = None;
    for &p in delta.positions {
        if p as u64 >= total {
            return Err(format!(
                "position {p} out of range for {} x {}",
                delta.rows, delta.cols
            ));
        }
        if prev.is_some_and(|q| q >= p) {
            return Err("positions not strictly increasing".into());
        }
        prev = Some(p);
    }
    Ok(())
}

/// The CSR copy (rows of `A`) and the CSC copy (rows of `A^T`, built by a stable counting sort,
/// so rows stay increasing within a column) of a validated `delta` (see [`validate`]).
pub fn csr_and_csc(delta: &SparseDelta) -> (Csr, Csr) {
    let (rows, cols) = (delta.rows, delta.cols);
    let nnz = delta.positions.len();
    let mut ptr = vec![0u32; rows + 1];
    let mut cptr = vec![0u32; cols + 1];
    for &p in delta.positions {
        ptr[p as usize / cols + 1] += 1;
        cptr[p as usize % cols + 1] += 1;
    }
    for i in 0..rows {
        ptr[i + 1] += ptr[i];
    }
    for j in 0..cols {
        cptr[j + 1] += cptr[j];
    }
    let idx = delta
        .positions
        .iter()
        .map(|&p| (p as usize % cols) as u32)
        .collect();
    let mut fill = cptr.clone();
    let mut tidx = vec![0u32; nnz];
    let mut tval = vec![0f32; nnz];
    for (&p, &v) in delta.positions.iter().zip(delta.values) {
        let (r, c) = (p as usize / cols, p as usize % cols);
        let at = fill[c] as usize;
        tidx[at] = r as u32;
        tval[at] = v;
        fill[c] += 1;
    }
    let a = Csr {
        ptr,
        idx,
        val: delta.values.to_vec(),
    };
    (
        a,
        Csr {
            ptr: cptr,
            idx: tidx,
            val: tval,
        },
    )
}

/// A [`SparseDelta`] prepared for block products on the CPU (multi-threaded with rayon,
/// deterministic whatever the thread count).
#[derive(Debug, Clone)]
pub struct CpuSparseOperator {
    rows: usize,
    cols: usize,
    a: Csr,
    at: Csr,
    frobenius_sq: f64,
}

impl CpuSparseOperator {
    /// Builds the CSR and CSC copies of `delta`.
    ///
    /// # Panics
    /// If `positions` and `values` differ in length, or the positions are not strictly
    /// increasing and below `rows * cols`.
    pub fn new(delta: &SparseDelta) -> Self {
        if let Err(e) = validate(delta) {
            panic!("sparse delta: {e}");
        }
        let (a, at) = csr_and_csc(delta);
        let frobenius_sq = delta.values.iter().map(|&v| v as f64 * v as f64).sum();
        CpuSparseOperator {
            rows: delta.rows,
            cols: delta.cols,
            a,
            at,
            frobenius_sq,
        }
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.a.val.len()
    }
}

/// `y[r * w .. (r + 1) * w] = sum_k val[k] * x[idx[k] * w ..]` for the rows of one chunk.
#[inline(always)]
fn rows_kernel(m: &Csr, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    for (r, yr) in y.chunks_exact_mut(w).enumerate() {
        let row = first_row + r;
        yr.fill(0.0);
        let (s, e) = (m.ptr[row] as usize, m.ptr[row + 1] as usize);
        for (&c, &v) in m.idx[s..e].iter().zip(&m.val[s..e]) {
            let xr = &x[c as usize * w..c as usize * w + w];
            for (a, &b) in yr.iter_mut().zip(xr) {
                *a += v * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
/// The same kernel compiled for AVX2 (no FMA, so the rounding is identical to the generic one).
///
/// # Safety
/// The CPU must support AVX2.
unsafe fn rows_kernel_avx2(m: &Csr, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    rows_kernel(m, first_row, x, y, w)
}

fn spmm(m: &Csr, out_rows: usize, x: &[f32], y: &mut [f32], w: usize) {
    if w == 0 || out_rows == 0 {
        return;
    }
    // About 32k multiply-adds per task keeps scheduling overhead low.
    let nnz = m.val.len().max(1);
    let per_row = (nnz * w).div_ceil(out_rows).max(1);
    let rows_per_task = (32_768 / per_row).clamp(1, 4096);
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    y.par_chunks_mut(rows_per_task * w)
        .enumerate()
        .for_each(|(t, ych)| {
            let first = t * rows_per_task;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 support was checked at run time just above.
                unsafe { rows_kernel_avx2(m, first, x, ych, w) };
                return;
            }
            rows_kernel(m, first, x, ych, w);
        });
}

impl MatrixOperator for CpuSparseOperator {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn frobenius_norm_sq(&self) -> f64 {
        self.frobenius_sq
    }

    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) {
        let (m, in_dim, out_dim) = if transpose {
            (&self.at, self.rows, self.cols)
        } else {
            (&self.a, self.cols, self.rows)
        };
        if in_dim == 0 || out_dim == 0 {
            y.fill(0.0);
            return;
        }
        let w = x.len() / in_dim;
        assert_eq!(
            x.len(),
            in_dim * w,
            "x is not a whole block of {in_dim}-vectors"
        );
        assert_eq!(y.len(), out_dim * w, "y does not match x's block width");
        spmm(m, out_dim, x, y, w);
    }
}
