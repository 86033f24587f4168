//! CPU implementation of [`MatrixOperator`]: products with `A` run over the sorted positions of
//! the [`SparseDelta`] itself (row-major, so they are its rows), products with `A^T` over a CSC
//! copy (rows of `A^T`). Both products are therefore row-parallel gathers: every output row is
//! accumulated by one thread, in the order of the stored entries, in f32. Results are
//! independent of the thread count, and equal to the GPU operator's, which sums in the same
//! order.
//!
//! Building the CSC copy is a parallel radix sort ([`transpose`]) into buffers that a
//! [`SparseWorkspace`] keeps from one matrix to the next, so a model's matrices do not each
//! fault in tens of megabytes of fresh memory.

use super::estimator::MatrixOperator;
use super::SparseDelta;
use rayon::prelude::*;

/// Compressed rows of a sparse f32 matrix: row `r` holds entries `ptr[r]..ptr[r + 1]` of
/// `idx` (column indices, increasing) and `val`.
#[derive(Debug, Clone, Default)]
pub struct Csr {
    /// Row starts (`rows + 1` entries).
    pub ptr: Vec<u32>,
    /// Column index of each entry.
    pub idx: Vec<u32>,
    /// Value of each entry.
    pub val: Vec<f32>,
}

/// A borrowed row-compressed matrix whose entry `k` of row `r` lies in column
/// `idx[k] - r * stride`: `stride` is 0 for plain column indices (CSR, CSC) and the column
/// count for row-major element positions (a [`SparseDelta`] read as its own CSR).
#[derive(Debug, Clone, Copy)]
struct Rows<'a> {
    ptr: &'a [u32],
    idx: &'a [u32],
    stride: u32,
    val: &'a [f32],
}

impl Rows<'_> {
    fn count(&self) -> usize {
        self.ptr.len() - 1
    }

    /// Entry range and index offset (`r * stride`) of row `r`. The offset wraps only for rows
    /// past the last u32 position, which hold no entries.
    #[inline(always)]
    fn row(&self, r: usize) -> (usize, usize, u32) {
        (
            self.ptr[r] as usize,
            self.ptr[r + 1] as usize,
            (r as u32).wrapping_mul(self.stride),
        )
    }
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
    let increasing = delta
        .positions
        .par_windows(2)
        .with_min_len(1 << 16)
        .all(|w| w[0] < w[1]);
    if !increasing {
        return Err("positions not strictly increasing".into());
    }
    // When they increase, the last position is the largest.
    let total = delta.rows as u64 * delta.cols as u64;
    match delta.positions.last() {
        Some(&last) if last as u64 >= total => Err(format!(
            "position {last} out of range for {} x {}",
            delta.rows, delta.cols
        )),
        _ => Ok(()),
    }
}

/// `||A||_F^2` in f64, summed in fixed chunks (in parallel) and then in chunk order, so the
/// result does not depend on the thread count. Both operators use it.
pub fn frobenius_norm_sq(values: &[f32]) -> f64 {
    let partial: Vec<f64> = values
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
        .collect();
    partial.iter().sum()
}

/// Buffers of [`CpuSparseOperator`] that can outlive it: passing the workspace of one matrix's
/// operator to the next one ([`CpuSparseOperator::with_workspace`],
/// [`CpuSparseOperator::into_workspace`]) reuses memory that is already mapped. Buffers only
/// grow; they hold about 21 bytes per entry of the largest matrix seen.
#[derive(Debug, Default)]
pub struct SparseWorkspace {
    /// Row starts of the delta's positions (`rows + 1`).
    row_ptr: Vec<u32>,
    /// The CSC copy: column starts (`cols + 1`), row indices and values.
    csc_ptr: Vec<u32>,
    csc_idx: Vec<u32>,
    csc_val: Vec<f32>,
    /// Buckets of the radix sort in [`transpose`]: row and value bits, column in the bucket.
    bucket_entry: Vec<u64>,
    bucket_col: Vec<u8>,
    /// Zero-padded copies of the input and output blocks (see [`padded_width`]).
    x_padded: Vec<f32>,
    y_padded: Vec<f32>,
}

/// The first `len` elements of `buffer`, grown if needed. The old contents are left in place
/// (or dropped when it grows, rather than copied): callers overwrite every element they read.
fn reuse<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.clear();
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// Fills `ptr` (`rows + 1` entries) with the row starts of `delta`'s sorted positions, by
/// binary search.
fn row_starts(delta: &SparseDelta, ptr: &mut [u32]) {
    let cols = delta.cols as u64;
    ptr.par_iter_mut()
        .with_min_len(1024)
        .enumerate()
        .for_each(|(r, p)| {
            *p = delta
                .positions
                .partition_point(|&q| (q as u64) < r as u64 * cols) as u32;
        });
}

/// The CSR copy (rows of `A`) and the CSC copy (rows of `A^T`; rows increasing within a column)
/// of a validated `delta` (see [`validate`]), as owned arrays (the GPU operator uploads them).
pub fn csr_and_csc(delta: &SparseDelta) -> (Csr, Csr) {
    let (rows, cols) = (delta.rows, delta.cols);
    let mut ptr = vec![0u32; rows + 1];
    row_starts(delta, &mut ptr);
    let view = Rows {
        ptr: &ptr,
        idx: delta.positions,
        stride: cols as u32,
        val: delta.values,
    };
    let mut idx = delta.positions.to_vec();
    let row_len = |r: usize| (ptr[r + 1] - ptr[r]) as usize;
    split_runs(&mut idx, (0..rows).map(row_len))
        .into_par_iter()
        .with_min_len(256)
        .enumerate()
        .for_each(|(r, row)| {
            let base = view.row(r).2;
            row.iter_mut().for_each(|c| *c -= base);
        });
    let mut ws = SparseWorkspace::default();
    transpose(view, cols, &mut ws);
    let nnz = delta.positions.len();
    let SparseWorkspace {
        mut csc_ptr,
        mut csc_idx,
        mut csc_val,
        ..
    } = ws;
    csc_ptr.truncate(cols + 1);
    csc_idx.truncate(nnz);
    csc_val.truncate(nnz);
    (
        Csr {
            ptr,
            idx,
            val: delta.values.to_vec(),
        },
        Csr {
            ptr: csc_ptr,
            idx: csc_idx,
            val: csc_val,
        },
    )
}

/// Splits `slice` into consecutive runs of the given lengths (which must add up to at most its
/// length).
fn split_runs<T>(mut slice: &mut [T], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [T]> {
    lens.into_iter()
        .map(|len| {
            let (run, rest) = std::mem::take(&mut slice).split_at_mut(len);
            slice = rest;
            run
        })
        .collect()
}

/// Columns per bucket of [`transpose`] (a power of two, at most 256 so that a column within its
/// bucket fits a byte).
const BUCKET_COLUMNS: usize = 128;

/// Writes the transpose of `a` (a matrix with `cols` columns, columns increasing within rows)
/// into the workspace's CSC buffers: a stable two-pass radix sort by column, in parallel.
///
/// Pass 1 cuts the rows into chunks; each chunk distributes its entries, in order, into its own
/// buckets of [`BUCKET_COLUMNS`] columns (row and value packed in a `u64`, and the column within
/// the bucket in a byte). Pass 2 sorts each bucket by column with a counting sort that fits in
/// cache, reading the bucket's runs chunk after chunk (so rows stay increasing) and writing the
/// bucket's columns of the result. Both passes write to a few hundred sequential runs at a time
/// instead of one per column, and the result is the same for any number of chunks or threads.
fn transpose(a: Rows, cols: usize, ws: &mut SparseWorkspace) {
    let rows = a.count();
    let nnz = a.ptr[rows] as usize;
    let shift = BUCKET_COLUMNS.trailing_zeros();
    let buckets = cols.div_ceil(BUCKET_COLUMNS);
    let chunks = rows.clamp(1, 16);
    let chunk_rows: Vec<(usize, usize)> = (0..chunks)
        .map(|c| (c * rows / chunks, (c + 1) * rows / chunks))
        .collect();
    // Pass 1a: where each bucket's run starts within its chunk's region.
    let run_starts: Vec<Vec<usize>> = chunk_rows
        .par_iter()
        .map(|&(r0, r1)| {
            let mut count = vec![0usize; buckets + 1];
            for r in r0..r1 {
                let (s, e, base) = a.row(r);
                for &c in &a.idx[s..e] {
                    count[((c - base) >> shift) as usize + 1] += 1;
                }
            }
            // count[b + 1] holds bucket b's count: an inclusive scan turns count[b] into
            // bucket b's start.
            let mut start = a.ptr[r0] as usize;
            for n in count.iter_mut() {
                start += *n;
                *n = start;
            }
            count
        })
        .collect();
    // Pass 1b: each chunk fills its region, bucket by bucket.
    let (packed, local_col) = (
        reuse(&mut ws.bucket_entry, nnz),
        reuse(&mut ws.bucket_col, nnz),
    );
    let region = |&(r0, r1): &(usize, usize)| (a.ptr[r1] - a.ptr[r0]) as usize;
    split_runs(&mut *packed, chunk_rows.iter().map(region))
        .into_par_iter()
        .zip(split_runs(&mut *local_col, chunk_rows.iter().map(region)))
        .zip(&chunk_rows)
        .zip(&run_starts)
        .for_each(|(((packed, local_col), &(r0, r1)), starts)| {
            let origin = a.ptr[r0] as usize;
            let mut fill: Vec<usize> = starts[..buckets].iter().map(|&s| s - origin).collect();
            for r in r0..r1 {
                let (s, e, base) = a.row(r);
                for (&c, &v) in a.idx[s..e].iter().zip(&a.val[s..e]) {
                    let c = (c - base) as usize;
                    let slot = &mut fill[c >> shift];
                    packed[*slot] = (r as u64) << 32 | v.to_bits() as u64;
                    local_col[*slot] = (c & (BUCKET_COLUMNS - 1)) as u8;
                    *slot += 1;
                }
            }
        });
    let (packed, local_col) = (&*packed, &*local_col);
    // Pass 2: a stable counting sort by column inside each bucket.
    let bucket_len: Vec<usize> = (0..buckets)
        .map(|b| run_starts.iter().map(|s| s[b + 1] - s[b]).sum())
        .collect();
    let bucket_cols = |b: usize| BUCKET_COLUMNS.min(cols - b * BUCKET_COLUMNS);
    let ptr = reuse(&mut ws.csc_ptr, cols + 1);
    ptr[cols] = nnz as u32;
    let lens = || bucket_len.iter().copied();
    split_runs(&mut ptr[..cols], (0..buckets).map(bucket_cols))
        .into_par_iter()
        .zip(split_runs(reuse(&mut ws.csc_idx, nnz), lens()))
        .zip(split_runs(reuse(&mut ws.csc_val, nnz), lens()))
        .enumerate()
        .for_each(|(b, ((ptr, idx), val))| {
            let runs = || run_starts.iter().map(move |s| s[b]..s[b + 1]);
            let mut fill = [0usize; BUCKET_COLUMNS];
            for run in runs() {
                for &c in &local_col[run] {
                    fill[c as usize] += 1;
                }
            }
            let start: usize = bucket_len[..b].iter().sum();
            let mut sum = 0;
            for (f, p) in fill.iter_mut().zip(ptr.iter_mut()) {
                *p = (start + sum) as u32;
                (*f, sum) = (sum, sum + *f);
            }
            for run in runs() {
                for (&e, &c) in packed[run.clone()].iter().zip(&local_col[run]) {
                    let at = &mut fill[c as usize];
                    idx[*at] = (e >> 32) as u32;
                    val[*at] = f32::from_bits(e as u32);
                    *at += 1;
                }
            }
        });
}

/// A [`SparseDelta`] prepared for block products on the CPU (multi-threaded with rayon,
/// deterministic whatever the thread count). It borrows the delta's positions and values, which
/// serve directly as the rows of `A`, and owns a [`SparseWorkspace`] with the CSC copy.
#[derive(Debug)]
pub struct CpuSparseOperator<'a> {
    delta: SparseDelta<'a>,
    frobenius_sq: f64,
    ws: SparseWorkspace,
}

impl<'a> CpuSparseOperator<'a> {
    /// Builds the operator in a fresh workspace.
    ///
    /// # Panics
    /// If `positions` and `values` differ in length, or the positions are not strictly
    /// increasing and below `rows * cols`.
    pub fn new(delta: &SparseDelta<'a>) -> Self {
        Self::with_workspace(delta, SparseWorkspace::default())
    }

    /// Builds the operator in `ws` (see [`SparseWorkspace`]).
    ///
    /// # Panics
    /// As [`new`](Self::new).
    pub fn with_workspace(delta: &SparseDelta<'a>, mut ws: SparseWorkspace) -> Self {
        if let Err(e) = validate(delta) {
            panic!("sparse delta: {e}");
        }
        // The row starts stay out of the workspace while the transpose fills the rest.
        let mut row_ptr = std::mem::take(&mut ws.row_ptr);
        row_starts(delta, reuse(&mut row_ptr, delta.rows + 1));
        let a = Rows {
            ptr: &row_ptr[..delta.rows + 1],
            idx: delta.positions,
            stride: delta.cols as u32,
            val: delta.values,
        };
        transpose(a, delta.cols, &mut ws);
        ws.row_ptr = row_ptr;
        CpuSparseOperator {
            delta: *delta,
            frobenius_sq: frobenius_norm_sq(delta.values),
            ws,
        }
    }

    /// The workspace, for the next matrix.
    pub fn into_workspace(self) -> SparseWorkspace {
        self.ws
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.delta.positions.len()
    }
}

/// `acc += val[k] * x[col(k) * w + off ..][..T]`, lane by lane, for entry `k` of a row whose
/// index offset is `base` (a function, not a closure: closures do not inherit the caller's
/// `target_feature`s, so they would not be inlined).
#[inline(always)]
fn add_entry<const T: usize>(
    m: Rows,
    x: &[f32],
    w: usize,
    off: usize,
    acc: &mut [f32; T],
    k: usize,
    base: u32,
) {
    let start = (m.idx[k] - base) as usize * w + off;
    let xr: &[f32; T] = x[start..start + T]
        .try_into()
        .expect("tile inside the block");
    let v = m.val[k];
    for l in 0..T {
        acc[l] += v * xr[l];
    }
}

/// `y[j * w + off ..][..T] = sum_k val[k] * x[col(k) * w + off ..][..T]` over the entries of
/// row `first_row + j`, for the `R` rows `j < R` of the chunk `y`: `R` rows times a tile of `T`
/// vectors, accumulated in registers. The `R` rows advance together, so the additions of
/// different rows overlap instead of waiting on one accumulator. Each of the sums still runs
/// over its row's entries in stored order, with a separate multiply and add (no FMA), exactly
/// as a plain scalar loop would.
#[inline(always)]
fn rows_tile<const R: usize, const T: usize>(
    m: Rows,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
    off: usize,
) {
    let rows: [(usize, usize, u32); R] = std::array::from_fn(|j| m.row(first_row + j));
    let common = rows.iter().map(|&(s, e, _)| e - s).min().unwrap_or(0);
    let mut acc = [[0f32; T]; R];
    for k in 0..common {
        for (acc, &(s, _, base)) in acc.iter_mut().zip(&rows) {
            add_entry(m, x, w, off, acc, s + k, base);
        }
    }
    for (acc, &(s, e, base)) in acc.iter_mut().zip(&rows) {
        for k in s + common..e {
            add_entry(m, x, w, off, acc, k, base);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        y[j * w + off..j * w + off + T].copy_from_slice(acc);
    }
}

/// The block width the kernels run at: `w` rounded up to 4 or to a multiple of 8, so that every
/// column tile is at least 4 vectors wide (a 1-wide tile costs as much as a 4-wide one). One
/// vector stays one.
fn padded_width(w: usize) -> usize {
    match w {
        0 | 1 => w,
        2..=4 => 4,
        _ => w.next_multiple_of(8),
    }
}

/// Rows `first_row + j` (`j < R`) times all `w` vectors, in column tiles of 32, 16, 8, 4 and 1
/// (widest first; after the 32s at most one tile of each narrower width but 1 is needed).
#[inline(always)]
fn row_group<const R: usize>(m: Rows, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    let mut off = 0;
    macro_rules! tiles {
        ($($t:literal),*) => {$(
            while w - off >= $t {
                rows_tile::<R, $t>(m, first_row, x, y, w, off);
                off += $t;
            }
        )*};
    }
    tiles!(32, 16, 8, 4, 1);
}

/// `y[r * w .. (r + 1) * w] = sum_k val[k] * x[col(k) * w ..]` for the rows of one chunk, four
/// rows at a time.
#[inline(always)]
fn rows_kernel(m: Rows, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    let rows = y.len() / w;
    let mut r = 0;
    while rows - r >= 4 {
        row_group::<4>(m, first_row + r, x, &mut y[r * w..], w);
        r += 4;
    }
    while r < rows {
        row_group::<1>(m, first_row + r, x, &mut y[r * w..], w);
        r += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// The same kernel compiled for AVX-512 (no FMA, so the rounding is identical to the generic
/// one).
///
/// # Safety
/// The CPU must support AVX-512F.
unsafe fn rows_kernel_avx512(m: Rows, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    rows_kernel(m, first_row, x, y, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
/// The same kernel compiled for AVX2 (no FMA, so the rounding is identical to the generic one).
///
/// # Safety
/// The CPU must support AVX2.
unsafe fn rows_kernel_avx2(m: Rows, first_row: usize, x: &[f32], y: &mut [f32], w: usize) {
    rows_kernel(m, first_row, x, y, w)
}

/// `y = M x` for a block of `w` vectors, in parallel over chunks of output rows.
fn spmm(m: Rows, x: &[f32], y: &mut [f32], w: usize) {
    let out_rows = m.count();
    if w == 0 || out_rows == 0 {
        return;
    }
    // About 32k multiply-adds per task keeps scheduling overhead low.
    let nnz = (m.ptr[out_rows] as usize).max(1);
    let per_row = (nnz * w).div_ceil(out_rows).max(1);
    let rows_per_task = (32_768 / per_row).clamp(4, 4096);
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (
        std::arch::is_x86_feature_detected!("avx512f"),
        std::arch::is_x86_feature_detected!("avx2"),
    );
    y.par_chunks_mut(rows_per_task * w)
        .enumerate()
        .for_each(|(t, ych)| {
            let first = t * rows_per_task;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F support was checked at run time just above.
                unsafe { rows_kernel_avx512(m, first, x, ych, w) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 support was checked at run time just above.
                unsafe { rows_kernel_avx2(m, first, x, ych, w) };
                return;
            }
            rows_kernel(m, first, x, ych, w);
        });
}

impl MatrixOperator for CpuSparseOperator<'_> {
    fn rows(&self) -> usize {
        self.delta.rows
    }

    fn cols(&self) -> usize {
        self.delta.cols
    }

    fn frobenius_norm_sq(&self) -> f64 {
        self.frobenius_sq
    }

    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) {
        let (rows, cols, nnz) = (self.delta.rows, self.delta.cols, self.nnz());
        let (in_dim, out_dim) = if transpose {
            (rows, cols)
        } else {
            (cols, rows)
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
        let SparseWorkspace {
            row_ptr,
            csc_ptr,
            csc_idx,
            csc_val,
            x_padded,
            y_padded,
            ..
        } = &mut self.ws;
        let m = if transpose {
            Rows {
                ptr: &csc_ptr[..cols + 1],
                idx: &csc_idx[..nnz],
                stride: 0,
                val: &csc_val[..nnz],
            }
        } else {
            Rows {
                ptr: &row_ptr[..rows + 1],
                idx: self.delta.positions,
                stride: cols as u32,
                val: self.delta.values,
            }
        };
        let wp = padded_width(w);
        if wp == w {
            spmm(m, x, y, w);
            return;
        }
        // Zero columns do not change the others: each output column only sums its own input
        // column.
        let xp = reuse(x_padded, in_dim * wp);
        let yp = reuse(y_padded, out_dim * wp);
        for (dst, src) in xp.chunks_exact_mut(wp).zip(x.chunks_exact(w)) {
            dst[..w].copy_from_slice(src);
            dst[w..].fill(0.0);
        }
        spmm(m, xp, yp, wp);
        for (dst, src) in y.chunks_exact_mut(w).zip(yp.chunks_exact(wp)) {
            dst.copy_from_slice(&src[..w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled variant of the kernel gives the same bits as the generic one (the
    /// dispatcher picks only one of them on a given machine).
    #[test]
    fn kernel_variants_agree_to_the_bit() {
        let (rows, cols) = (45usize, 77usize);
        let positions: Vec<u32> = (0..(rows * cols) as u32)
            .filter(|p| (p.wrapping_mul(2_654_435_761) >> 27) < 5)
            .collect();
        let values: Vec<f32> = positions
            .iter()
            .map(|&p| ((p * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut ptr = vec![0u32; rows + 1];
        let delta = SparseDelta {
            rows,
            cols,
            positions: &positions,
            values: &values,
        };
        row_starts(&delta, &mut ptr);
        let m = Rows {
            ptr: &ptr,
            idx: &positions,
            stride: cols as u32,
            val: &values,
        };
        for w in [1usize, 4, 8, 12, 24, 40, 64] {
            let x: Vec<f32> = (0..cols * w)
                .map(|i| ((i * 7919) % 211) as f32 / 100.0 - 1.0)
                .collect();
            let mut want = vec![0f32; rows * w];
            rows_kernel(m, 0, &x, &mut want, w);
            #[cfg(target_arch = "x86_64")]
            for (name, available) in [
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ] {
                if !available {
                    eprintln!("kernel variant {name} not available on this CPU");
                    continue;
                }
                let mut got = vec![f32::NAN; rows * w];
                // SAFETY: the feature was detected just above.
                unsafe {
                    match name {
                        "avx2" => rows_kernel_avx2(m, 0, &x, &mut got, w),
                        _ => rows_kernel_avx512(m, 0, &x, &mut got, w),
                    }
                }
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} differs from the generic kernel at width {w}");
            }
        }
    }
}
