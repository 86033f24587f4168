//! CPU implementation of [`MatrixOperator`]: products with `A` run over the sorted positions of
//! the [`SparseDelta`] itself (row-major, so they are its rows), products with `A^T` over a CSC
//! copy (rows of `A^T`). Both products are therefore row-parallel gathers: every output row is
//! accumulated by one thread, in the order of the stored entries, in f32. Results are
//! independent of the thread count, and equal to the GPU operator's, which sums in the same
//! order.
//!
//! The products are limited by memory traffic as much as by arithmetic: a 7B delta and its CSC
//! copy (tens of MB) are streamed once per product. Coded values ([`DeltaValues::Coded`], what
//! `compress` passes: a byte per entry into the table of the level values) stream 5 bytes per
//! entry instead of 8, which made the estimator's products about a quarter faster on a
//! LLaMA-2-7B block, with the same bits (the kernels look the value up and multiply exactly
//! as before).
//!
//! Building the CSC copy is a parallel counting sort ([`transpose`]) into buffers that a
//! [`SparseWorkspace`] keeps from one matrix to the next, so a model's matrices do not each
//! fault in tens of megabytes of fresh memory.

use super::estimator::MatrixOperator;
use super::{DeltaValues, SparseDelta};
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

/// Where the kernels read entry values: one f32 per entry, or a byte per entry that indexes a
/// table of 256 values ([`Coded`]).
trait EntryValues: Copy + Send + Sync {
    /// What the transpose carries per entry (the value or its code).
    type Payload: Copy + Default + Send + Sync;
    /// The value of entry `k`.
    ///
    /// # Safety
    /// `k` must be below the number of entries.
    unsafe fn value(self, k: usize) -> f32;
    /// The payload of entry `k`.
    fn payload(self, k: usize) -> Self::Payload;
}

impl EntryValues for &[f32] {
    type Payload = f32;
    #[inline(always)]
    unsafe fn value(self, k: usize) -> f32 {
        // SAFETY: the caller keeps `k` in range.
        unsafe { *self.get_unchecked(k) }
    }
    fn payload(self, k: usize) -> f32 {
        self[k]
    }
}

/// Byte codes of the entries and the table of their values, padded to 256 so that any code
/// indexes it without a bounds check.
#[derive(Debug, Clone, Copy)]
struct Coded<'a> {
    codes: &'a [u8],
    table: &'a [f32; 256],
}

impl EntryValues for Coded<'_> {
    type Payload = u8;
    #[inline(always)]
    unsafe fn value(self, k: usize) -> f32 {
        // SAFETY: the caller keeps `k` in range; a byte always indexes the 256-entry table.
        self.table[unsafe { *self.codes.get_unchecked(k) } as usize]
    }
    fn payload(self, k: usize) -> u8 {
        self.codes[k]
    }
}

/// A borrowed row-compressed matrix whose entry `k` of row `r` lies in column
/// `idx[k] - r * stride`: `stride` is 0 for plain column indices (CSR, CSC) and the column
/// count for row-major element positions (a [`SparseDelta`] read as its own CSR).
///
/// Invariant (relied on by the kernels, which do not bounds-check): `ptr` increases from 0 to
/// at most the length of `idx` and of the values, and every column lies below the input
/// dimension of the products it is used in. The constructors in this module only build views
/// of validated deltas ([`validate`]) and of their transposes.
#[derive(Debug, Clone, Copy)]
struct Rows<'a, V> {
    ptr: &'a [u32],
    idx: &'a [u32],
    stride: u32,
    val: V,
}

impl<'a, V> Rows<'a, V> {
    /// The delta's sorted positions read as the rows of `A`, with the row starts `ptr` and
    /// the values `val`.
    fn of_delta(delta: &SparseDelta<'a>, ptr: &'a [u32], val: V) -> Self {
        Rows {
            ptr: &ptr[..delta.rows + 1],
            idx: delta.positions,
            stride: delta.cols as u32,
            val,
        }
    }

    /// The CSC copy in `ws` (of a matrix with `cols` columns and `nnz` entries) read as the
    /// rows of `A^T`, with the values `val`.
    fn of_csc(ws: &'a SparseWorkspace, cols: usize, nnz: usize, val: V) -> Self {
        Rows {
            ptr: &ws.csc_ptr[..cols + 1],
            idx: &ws.csc_idx[..nnz],
            stride: 0,
            val,
        }
    }

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
    if let DeltaValues::Coded { codes, table } = delta.values {
        if table.len() > 256 {
            return Err(format!(
                "{} values in a code table (at most 256)",
                table.len()
            ));
        }
        let top = codes.par_iter().with_min_len(1 << 16).copied().max();
        if let Some(top) = top.filter(|&c| c as usize >= table.len()) {
            return Err(format!("code {top} past a table of {} values", table.len()));
        }
    }
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
/// result does not depend on the thread count (nor on whether the values are coded). Both
/// operators use it.
pub fn frobenius_norm_sq(values: DeltaValues) -> f64 {
    const CHUNK: usize = 1 << 16;
    let square = |v: f32| v as f64 * v as f64;
    let partial: Vec<f64> = match values {
        DeltaValues::F32(v) => v
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&v| square(v)).sum())
            .collect(),
        DeltaValues::Coded { codes, table } => codes
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&k| square(table[k as usize])).sum())
            .collect(),
    };
    partial.iter().sum()
}

/// Buffers of [`CpuSparseOperator`] that can outlive it: passing the workspace of one matrix's
/// operator to the next one ([`CpuSparseOperator::with_workspace`],
/// [`CpuSparseOperator::into_workspace`]) reuses memory that is already mapped. Buffers only
/// grow; they hold about 5 bytes per entry of the largest matrix seen (8 when its values are
/// f32), plus 68 bytes per column.
#[derive(Debug, Default)]
pub struct SparseWorkspace {
    /// Row starts of the delta's positions (`rows + 1`).
    row_ptr: Vec<u32>,
    /// The CSC copy: column starts (`cols + 1`), row indices, and values or their codes.
    csc_ptr: Vec<u32>,
    csc_idx: Vec<u32>,
    csc_val: Vec<f32>,
    csc_code: Vec<u8>,
    /// Per-chunk column counters of [`transpose`], then each chunk's next slot per column.
    chunk_counts: Vec<u32>,
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
    let values = delta.values.to_f32();
    let view = Rows::of_delta(delta, &ptr, &values[..]);
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
    let mut csc_val = Vec::new();
    transpose(view, cols, &mut ws, &mut csc_val);
    let nnz = delta.positions.len();
    let SparseWorkspace {
        mut csc_ptr,
        mut csc_idx,
        ..
    } = ws;
    csc_ptr.truncate(cols + 1);
    csc_idx.truncate(nnz);
    csc_val.truncate(nnz);
    (
        Csr {
            ptr,
            idx,
            val: values,
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

/// A pointer that row chunks share to write disjoint slots of one array.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: only used by `transpose`, whose chunks write disjoint slots.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Writes `v` at `slot`.
    ///
    /// # Safety
    /// `slot` is in bounds and no other thread accesses it.
    #[inline(always)]
    unsafe fn write(self, slot: usize, v: T) {
        unsafe { self.0.add(slot).write(v) }
    }
}

/// Row chunks of the transposes: enough for two threads to balance, few enough that each
/// chunk's per-column counters (4 bytes per column) stay small.
const TRANSPOSE_CHUNKS: usize = 16;

/// Writes the transpose of `a` (a matrix with `cols` columns, columns increasing within rows)
/// into the workspace's CSC pointers and indices and into `out_val` (the values or codes): a
/// counting sort by column, in parallel over chunks of rows.
///
/// Pass 1 counts each chunk's entries per column; a prefix sum over the columns, and within a
/// column over the chunks, gives every (chunk, column) pair its first slot; pass 2 has each
/// chunk write its entries, in order, at its slots. Rows therefore increase within each column,
/// and the result is the same for any number of threads. One scatter pass moves about 14 bytes
/// per entry (coded values): it replaced a two-pass radix sort through buckets of 128 columns,
/// which moved about 32 and took 54 ms instead of 32 ms for the seven matrices of a LLaMA-2-7B
/// block (the products, like the sort, are limited by memory traffic on this machine).
fn transpose<V: EntryValues>(
    a: Rows<V>,
    cols: usize,
    ws: &mut SparseWorkspace,
    out_val: &mut Vec<V::Payload>,
) {
    let rows = a.count();
    let nnz = a.ptr[rows] as usize;
    if cols == 0 {
        reuse(&mut ws.csc_ptr, 1)[0] = 0;
        return;
    }
    let chunks = rows.clamp(1, TRANSPOSE_CHUNKS);
    let chunk_rows: Vec<(usize, usize)> = (0..chunks)
        .map(|c| (c * rows / chunks, (c + 1) * rows / chunks))
        .collect();
    let counts = reuse(&mut ws.chunk_counts, chunks * cols);
    counts
        .par_chunks_mut(cols)
        .zip(&chunk_rows)
        .for_each(|(count, &(r0, r1))| {
            count.fill(0);
            for r in r0..r1 {
                let (s, e, base) = a.row(r);
                for &c in &a.idx[s..e] {
                    count[(c - base) as usize] += 1;
                }
            }
        });
    let ptr = reuse(&mut ws.csc_ptr, cols + 1);
    let mut start = 0u32;
    for (col, p) in ptr[..cols].iter_mut().enumerate() {
        *p = start;
        for c in 0..chunks {
            let n = counts[c * cols + col];
            counts[c * cols + col] = start;
            start += n;
        }
    }
    ptr[cols] = start;
    debug_assert_eq!(start as usize, nnz);
    let idx_out = SharedOut(reuse(&mut ws.csc_idx, nnz).as_mut_ptr());
    let val_out = SharedOut(reuse(out_val, nnz).as_mut_ptr());
    counts
        .par_chunks_mut(cols)
        .zip(&chunk_rows)
        .for_each(|(next, &(r0, r1))| {
            for r in r0..r1 {
                let (s, e, base) = a.row(r);
                for (k, &c) in (s..e).zip(&a.idx[s..e]) {
                    let slot = &mut next[(c - base) as usize];
                    // SAFETY: the slots of a column run from its start over the chunks in order,
                    // one per entry, so every slot is below nnz and written once.
                    unsafe {
                        idx_out.write(*slot as usize, r as u32);
                        val_out.write(*slot as usize, a.val.payload(k));
                    }
                    *slot += 1;
                }
            }
        });
}

/// A [`SparseDelta`] prepared for block products on the CPU (multi-threaded with rayon,
/// deterministic whatever the thread count). It borrows the delta's positions and values (or
/// codes), which serve directly as the rows of `A`, and owns a [`SparseWorkspace`] with the CSC
/// copy.
#[derive(Debug)]
pub struct CpuSparseOperator<'a> {
    delta: SparseDelta<'a>,
    frobenius_sq: f64,
    /// The code table of coded values, padded with zeros to 256 entries.
    table: Box<[f32; 256]>,
    ws: SparseWorkspace,
}

impl<'a> CpuSparseOperator<'a> {
    /// Builds the operator in a fresh workspace.
    ///
    /// # Panics
    /// If the delta fails [`validate`]: values and positions differ in number, the positions
    /// are not strictly increasing and below `rows * cols`, or a code lies past its table.
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
        let mut table = Box::new([0f32; 256]);
        // The row starts and the values stay out of the workspace while the transpose fills
        // the rest.
        let mut row_ptr = std::mem::take(&mut ws.row_ptr);
        row_starts(delta, reuse(&mut row_ptr, delta.rows + 1));
        match delta.values {
            DeltaValues::F32(v) => {
                let mut out = std::mem::take(&mut ws.csc_val);
                transpose(
                    Rows::of_delta(delta, &row_ptr, v),
                    delta.cols,
                    &mut ws,
                    &mut out,
                );
                ws.csc_val = out;
            }
            DeltaValues::Coded { codes, table: t } => {
                table[..t.len()].copy_from_slice(t);
                let coded = Coded {
                    codes,
                    table: &table,
                };
                let mut out = std::mem::take(&mut ws.csc_code);
                transpose(
                    Rows::of_delta(delta, &row_ptr, coded),
                    delta.cols,
                    &mut ws,
                    &mut out,
                );
                ws.csc_code = out;
            }
        }
        ws.row_ptr = row_ptr;
        CpuSparseOperator {
            delta: *delta,
            frobenius_sq: frobenius_norm_sq(delta.values),
            table,
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
///
/// # Safety
/// `k` must be an entry of the row, and `x` hold the input rows of all columns of `m` at width
/// `w`, with `off + T <= w` (see [`Rows`]).
#[inline(always)]
unsafe fn add_entry<V: EntryValues, const T: usize>(
    m: Rows<V>,
    x: &[f32],
    w: usize,
    off: usize,
    acc: &mut [f32; T],
    k: usize,
    base: u32,
) {
    // SAFETY: by the contract above and the invariant of `Rows`, `k` indexes the entries and
    // the tile lies inside `x`.
    let (xr, v) = unsafe {
        let start = (*m.idx.get_unchecked(k) - base) as usize * w + off;
        debug_assert!(start + T <= x.len());
        (&*(x.as_ptr().add(start) as *const [f32; T]), m.val.value(k))
    };
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
///
/// # Safety
/// As [`add_entry`], for every entry of the `R` rows.
#[inline(always)]
unsafe fn rows_tile<V: EntryValues, const R: usize, const T: usize>(
    m: Rows<V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
    off: usize,
) {
    let rows: [(usize, usize, u32); R] = std::array::from_fn(|j| m.row(first_row + j));
    let common = rows.iter().map(|&(s, e, _)| e - s).min().unwrap_or(0);
    let mut acc = [[0f32; T]; R];
    // SAFETY (both loops): the entries are those of the `R` rows.
    for k in 0..common {
        for (acc, &(s, _, base)) in acc.iter_mut().zip(&rows) {
            unsafe { add_entry(m, x, w, off, acc, s + k, base) };
        }
    }
    for (acc, &(s, e, base)) in acc.iter_mut().zip(&rows) {
        for k in s + common..e {
            unsafe { add_entry(m, x, w, off, acc, k, base) };
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
///
/// # Safety
/// `x` holds the input rows of all columns of `m` at width `w` (see [`Rows`]).
#[inline(always)]
unsafe fn row_group<V: EntryValues, const R: usize>(
    m: Rows<V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    let mut off = 0;
    macro_rules! tiles {
        ($($t:literal),*) => {$(
            while w - off >= $t {
                // SAFETY: `off + T <= w`, and the caller's contract.
                unsafe { rows_tile::<V, R, $t>(m, first_row, x, y, w, off) };
                off += $t;
            }
        )*};
    }
    tiles!(32, 16, 8, 4, 1);
}

/// `y[r * w .. (r + 1) * w] = sum_k val[k] * x[col(k) * w ..]` for the rows of one chunk, four
/// rows at a time.
///
/// # Safety
/// `x` holds the input rows of all columns of `m` at width `w` (see [`Rows`]).
#[inline(always)]
unsafe fn rows_kernel<V: EntryValues>(
    m: Rows<V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    let rows = y.len() / w;
    let mut r = 0;
    // SAFETY (both loops): the caller's contract.
    while rows - r >= 4 {
        unsafe { row_group::<V, 4>(m, first_row + r, x, &mut y[r * w..], w) };
        r += 4;
    }
    while r < rows {
        unsafe { row_group::<V, 1>(m, first_row + r, x, &mut y[r * w..], w) };
        r += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// The same kernel compiled for AVX-512 (no FMA, so the rounding is identical to the generic
/// one).
///
/// # Safety
/// The CPU must support AVX-512F, and the contract of [`rows_kernel`] holds.
unsafe fn rows_kernel_avx512<V: EntryValues>(
    m: Rows<V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    unsafe { rows_kernel(m, first_row, x, y, w) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
/// The same kernel compiled for AVX2 (no FMA, so the rounding is identical to the generic one).
///
/// # Safety
/// The CPU must support AVX2, and the contract of [`rows_kernel`] holds.
unsafe fn rows_kernel_avx2<V: EntryValues>(
    m: Rows<V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    unsafe { rows_kernel(m, first_row, x, y, w) }
}

/// `y = M x` for a block of `w` vectors, in parallel over chunks of output rows.
///
/// # Panics
/// If `x` is not `in_dim * w` long or `y` not one block of `w`-vectors per row of `m`.
fn spmm<V: EntryValues>(m: Rows<V>, in_dim: usize, x: &[f32], y: &mut [f32], w: usize) {
    let out_rows = m.count();
    if w == 0 || out_rows == 0 {
        return;
    }
    assert_eq!(x.len(), in_dim * w, "x is not a block of {in_dim}-vectors");
    assert_eq!(
        y.len(),
        out_rows * w,
        "y is not a block of {out_rows}-vectors"
    );
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
            // SAFETY (all three calls): `m` is a view built in this module (see `Rows`) whose
            // columns lie below `in_dim`, and `x` was checked to hold `in_dim` rows of `w`.
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // AVX-512F support was checked at run time just above.
                unsafe { rows_kernel_avx512(m, first, x, ych, w) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // AVX2 support was checked at run time just above.
                unsafe { rows_kernel_avx2(m, first, x, ych, w) };
                return;
            }
            unsafe { rows_kernel(m, first, x, ych, w) };
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
        let (rows, cols) = (self.delta.rows, self.delta.cols);
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
        let wp = padded_width(w);
        if wp == w {
            self.product(x, y, w, transpose);
            return;
        }
        // Zero columns do not change the others: each output column only sums its own input
        // column.
        let (mut xp, mut yp) = (
            std::mem::take(&mut self.ws.x_padded),
            std::mem::take(&mut self.ws.y_padded),
        );
        for (dst, src) in reuse(&mut xp, in_dim * wp)
            .chunks_exact_mut(wp)
            .zip(x.chunks_exact(w))
        {
            dst[..w].copy_from_slice(src);
            dst[w..].fill(0.0);
        }
        let yp_block = reuse(&mut yp, out_dim * wp);
        self.product(&xp[..in_dim * wp], yp_block, wp, transpose);
        for (dst, src) in y.chunks_exact_mut(w).zip(yp_block.chunks_exact(wp)) {
            dst.copy_from_slice(&src[..w]);
        }
        (self.ws.x_padded, self.ws.y_padded) = (xp, yp);
    }
}

impl CpuSparseOperator<'_> {
    /// `y = A x` or `y = A^T x` at a width the kernels take (see [`padded_width`]).
    fn product(&self, x: &[f32], y: &mut [f32], w: usize, transpose: bool) {
        let (rows, cols, nnz) = (self.delta.rows, self.delta.cols, self.nnz());
        let (ws, delta, table) = (&self.ws, &self.delta, &*self.table);
        let ptr = &ws.row_ptr;
        match (self.delta.values, transpose) {
            (DeltaValues::F32(v), false) => spmm(Rows::of_delta(delta, ptr, v), cols, x, y, w),
            (DeltaValues::F32(_), true) => {
                let v = &ws.csc_val[..nnz];
                spmm(Rows::of_csc(ws, cols, nnz, v), rows, x, y, w)
            }
            (DeltaValues::Coded { codes, .. }, false) => {
                let coded = Coded { codes, table };
                spmm(Rows::of_delta(delta, ptr, coded), cols, x, y, w)
            }
            (DeltaValues::Coded { .. }, true) => {
                let codes = &ws.csc_code[..nnz];
                let coded = Coded { codes, table };
                spmm(Rows::of_csc(ws, cols, nnz, coded), rows, x, y, w)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled variant of the kernel gives the same bits as the generic one (the
    /// dispatcher picks only one of them on a given machine), with f32 and with coded values.
    #[test]
    fn kernel_variants_agree_to_the_bit() {
        let (rows, cols) = (45usize, 77usize);
        let positions: Vec<u32> = (0..(rows * cols) as u32)
            .filter(|p| (p.wrapping_mul(2_654_435_761) >> 27) < 5)
            .collect();
        let codes: Vec<u8> = positions.iter().map(|&p| ((p * 37) % 23) as u8).collect();
        let mut table = [0f32; 256];
        for (c, t) in table.iter_mut().take(23).enumerate() {
            *t = c as f32 / 11.0 - 1.0;
        }
        let values: Vec<f32> = codes.iter().map(|&c| table[c as usize]).collect();
        let mut ptr = vec![0u32; rows + 1];
        let delta = SparseDelta {
            rows,
            cols,
            positions: &positions,
            values: DeltaValues::F32(&values),
        };
        row_starts(&delta, &mut ptr);
        let plain = Rows::of_delta(&delta, &ptr, &values[..]);
        let coded = Rows::of_delta(
            &delta,
            &ptr,
            Coded {
                codes: &codes,
                table: &table,
            },
        );
        for w in [1usize, 4, 8, 12, 24, 40, 64] {
            let x: Vec<f32> = (0..cols * w)
                .map(|i| ((i * 7919) % 211) as f32 / 100.0 - 1.0)
                .collect();
            let mut want = vec![0f32; rows * w];
            // SAFETY (all kernel calls): views of a validated delta, `x` holds `cols` rows.
            unsafe { rows_kernel(plain, 0, &x, &mut want, w) };
            let same = |got: &[f32]| {
                want.iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            };
            let mut got = vec![f32::NAN; rows * w];
            unsafe { rows_kernel(coded, 0, &x, &mut got, w) };
            assert!(same(&got), "coded values differ at width {w}");
            #[cfg(target_arch = "x86_64")]
            for (name, available) in [
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ] {
                if !available {
                    eprintln!("kernel variant {name} not available on this CPU");
                    continue;
                }
                for coded_values in [false, true] {
                    let mut got = vec![f32::NAN; rows * w];
                    // The feature was detected just above.
                    unsafe {
                        match (name, coded_values) {
                            ("avx2", false) => rows_kernel_avx2(plain, 0, &x, &mut got, w),
                            ("avx2", true) => rows_kernel_avx2(coded, 0, &x, &mut got, w),
                            (_, false) => rows_kernel_avx512(plain, 0, &x, &mut got, w),
                            (_, true) => rows_kernel_avx512(coded, 0, &x, &mut got, w),
                        }
                    }
                    assert!(
                        same(&got),
                        "{name} (coded: {coded_values}) differs from the generic kernel at \
                         width {w}"
                    );
                }
            }
        }
    }
}
