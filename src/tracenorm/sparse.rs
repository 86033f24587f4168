//! CPU implementation of [`MatrixOperator`], on the sorted positions of the [`SparseDelta`]
//! itself (row-major, so they are its rows) and a [`BlockIndex`] of where each row starts and
//! crosses every 256th column:
//! - `A x` is a gather: every output row is accumulated by one thread, in registers, over its
//!   entries in stored order.
//! - `A^T x` is a scatter, in parallel over panels of output columns: each row adds its
//!   entries in the panel (found through the index) to their columns' outputs, which stay in
//!   the L1 and L2 caches. Every output column is thus summed over its rows in order.
//!
//! Both sum in f32, multiply then add, in the order of the entries along the output's row or
//! column, so results are independent of the thread count and of the panel split. The GPU
//! operator (`engine::gpu::GpuSparseOperator`, a gather over CSR and CSC copies) sums in the
//! same order: its products equal these to the bit on lavapipe, and to f32 rounding on other
//! devices (see its module).
//!
//! No transposed copy: the CPU operator used one until the products moved to the scatter.
//! Sorting the entries by column (a counting sort, now only for the GPU operator's CSC copy in
//! `engine::gpu`) cost 45 ms of a LLaMA-2-7B
//! block's 66 ms build when the caches held none of its buffers, as inside `compress`, where
//! gigabytes of checkpoint data stream through between two matrices; the scatter's products
//! cost about 25 ms more than the gather's, and the build fell to 16 ms. Measurements in
//! `docs/BENCHMARKS-HISTORY.md`.
//!
//! The products are limited by memory traffic as much as by arithmetic. Coded values
//! ([`DeltaValues::Coded`], what `compress` passes: a byte per entry into the table of the level
//! values) stream 5 bytes per entry instead of 8, with the same bits. The index pass also
//! stores every entry's column as a u16 (matrices of at most 65536 columns, every LLaMA weight),
//! which the products read instead of the u32 positions: 3 bytes per entry. That saved about
//! 3 % of a LLaMA-2-7B block's estimate (medians of 6 runs, warm and cold; the products are
//! closer to their load-port limit than to the memory's).

use super::estimator::MatrixOperator;
use super::{DeltaValues, SparseDelta};
use crate::disjoint::SharedOut;
use rayon::prelude::*;

/// Where the kernels read entry values: one f32 per entry, or a byte per entry that indexes a
/// table of 256 values ([`Coded`]).
trait EntryValues: Copy + Send + Sync {
    /// The value of entry `k`.
    ///
    /// # Safety
    /// `k` must be below the number of entries.
    unsafe fn value(self, k: usize) -> f32;
}

impl EntryValues for &[f32] {
    #[inline(always)]
    unsafe fn value(self, k: usize) -> f32 {
        // SAFETY: the caller keeps `k` in range.
        unsafe { *self.get_unchecked(k) }
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
    #[inline(always)]
    unsafe fn value(self, k: usize) -> f32 {
        // SAFETY: the caller keeps `k` in range; a byte always indexes the 256-entry table.
        self.table[unsafe { *self.codes.get_unchecked(k) } as usize]
    }
}

/// A borrowed row-compressed matrix whose entry `k` of row `r` lies in column
/// `idx[k] - r * stride`: `stride` is 0 for plain column indices (CSR, CSC) and the column
/// count for row-major element positions (a [`SparseDelta`] read as its own CSR). Row `r`
/// holds the entries `ptr[r * step]..ptr[(r + 1) * step]`; with `step > 1` the `ptr` is a
/// [`BlockIndex`], which also splits each row at the blocks of columns.
///
/// Invariant (relied on by the kernels, which do not bounds-check): `ptr` increases from 0 to
/// at most the length of `idx` and of the values, and every column lies below the input
/// dimension of the products it is used in. The constructors in this module only build views
/// of deltas that [`BlockIndex::build`] (or [`validate`]) accepted.
#[derive(Debug, Clone, Copy)]
struct Rows<'a, I, V> {
    ptr: &'a [u32],
    step: usize,
    idx: &'a [I],
    stride: u32,
    val: V,
}

/// An entry's stored index: a u32 position or column, or a u16 column (two bytes less of
/// memory traffic per entry and product).
trait EntryIndex: Copy + Send + Sync {
    /// The index as a u32.
    fn widen(self) -> u32;
}

impl EntryIndex for u32 {
    #[inline(always)]
    fn widen(self) -> u32 {
        self
    }
}

impl EntryIndex for u16 {
    #[inline(always)]
    fn widen(self) -> u32 {
        self as u32
    }
}

impl<'a, V> Rows<'a, u32, V> {
    /// The delta's sorted positions read as the rows of `A`, with their index and the values
    /// `val`.
    fn of_delta(delta: &SparseDelta<'a>, index: &'a BlockIndex, val: V) -> Self {
        Rows {
            ptr: &index.starts[..delta.rows * index.blocks + 1],
            step: index.blocks,
            idx: delta.positions,
            stride: delta.cols as u32,
            val,
        }
    }
}

impl<'a, V> Rows<'a, u16, V> {
    /// The rows of `A` as the index's narrow columns (see [`BlockIndex::narrow`]), with the
    /// values `val`; `None` if the index holds none.
    fn narrow(delta: &SparseDelta<'a>, index: &'a BlockIndex, val: V) -> Option<Self> {
        let idx = Some(&index.narrow[..]).filter(|_| index.has_narrow)?;
        Some(Rows {
            ptr: &index.starts[..delta.rows * index.blocks + 1],
            step: index.blocks,
            idx: &idx[..delta.positions.len()],
            stride: 0,
            val,
        })
    }
}

impl<I: EntryIndex, V> Rows<'_, I, V> {
    fn count(&self) -> usize {
        (self.ptr.len() - 1) / self.step
    }

    /// Entry range and index offset (`r * stride`) of row `r`. The offset wraps only for rows
    /// past the last u32 position, which hold no entries.
    #[inline(always)]
    fn row(&self, r: usize) -> (usize, usize, u32) {
        self.row_blocks(r, 0, self.step)
    }

    /// Entry range of the column blocks `j0..j1` of row `r` (see [`BlockIndex`]), and the
    /// row's index offset.
    #[inline(always)]
    fn row_blocks(&self, r: usize, j0: usize, j1: usize) -> (usize, usize, u32) {
        (
            self.ptr[r * self.step + j0] as usize,
            self.ptr[r * self.step + j1] as usize,
            (r as u32).wrapping_mul(self.stride),
        )
    }
}

/// Where the rows of a [`SparseDelta`] start and where they cross every `block_cols`-th
/// column: `starts[r * blocks + j]` is the first entry of row `r` in column `j * block_cols`
/// or later (`j < blocks`, `blocks = ceil(cols / block_cols)`), and `starts[rows * blocks]`
/// the number of entries. With `block_cols >= cols` it holds just the row starts (a CSR's
/// `ptr`). The transposed products use the blocks to scatter into one panel of columns at a
/// time without searching the rows.
#[derive(Debug, Default)]
pub struct BlockIndex {
    starts: Vec<u32>,
    /// Blocks per row, and columns per block.
    blocks: usize,
    block_cols: usize,
    /// The column of every entry, if the last build was asked for them and the matrix has at
    /// most [`NARROW_MAX_COLS`] columns (`has_narrow`).
    narrow: Vec<u16>,
    has_narrow: bool,
}

/// The widest matrix whose columns [`BlockIndex::build`] stores as u16.
const NARROW_MAX_COLS: usize = 1 << 16;

impl BlockIndex {
    /// Checks the positions of `delta` (strictly increasing, below `rows * cols`) and indexes
    /// them, in one pass in parallel over chunks of entries, reusing this index's memory. With
    /// `narrow`, the pass also stores every entry's column as a u16 if the matrix has at most
    /// [`NARROW_MAX_COLS`] columns (see [`Rows::narrow`]).
    fn build(
        &mut self,
        delta: &SparseDelta,
        block_cols: usize,
        narrow: bool,
    ) -> Result<(), String> {
        let (rows, cols) = (delta.rows as u64, delta.cols as u64);
        let pos = delta.positions;
        let block_cols = (block_cols.max(1) as u64).min(cols.max(1));
        let blocks = cols.div_ceil(block_cols).max(1);
        (self.blocks, self.block_cols) = (blocks as usize, block_cols as usize);
        let bounds = (rows * blocks) as usize + 1;
        let starts = reuse(&mut self.starts, bounds);
        self.has_narrow = narrow && delta.cols <= NARROW_MAX_COLS;
        let columns = if self.has_narrow {
            SharedOut(reuse(&mut self.narrow, pos.len()).as_mut_ptr())
        } else {
            SharedOut(std::ptr::null_mut())
        };
        let total = rows * cols;
        if let Some(&last) = pos.last() {
            if last as u64 >= total {
                return Err(format!("position {last} out of range for {rows} x {cols}"));
            }
        }
        // Boundary `b = r * blocks + j` lies at position `r * cols + j * block_cols`, the one
        // past the last row at `rows * cols`; `after(p)` is the first boundary past `p`.
        let after = |p: u32| {
            let p = (p as u64).min(total.saturating_sub(1));
            (p / cols) * blocks + (p % cols) / block_cols + 1
        };
        // Chunk `c` holds entries `c * nnz / n..` and fills the boundaries from the first past
        // its predecessor's last entry up to the first past its own last entry.
        let nnz = pos.len();
        let chunks = nnz.div_ceil(1 << 16).clamp(1, 64);
        let first_entry = |c: usize| c * nnz / chunks;
        let first_bound: Vec<u64> = (0..=chunks)
            .map(|c| match c {
                0 => 0,
                c if c == chunks => bounds as u64,
                c => after(pos[first_entry(c) - 1]),
            })
            .collect();
        if first_bound.windows(2).any(|b| b[0] > b[1]) {
            return Err("positions not strictly increasing".into());
        }
        let out = SharedOut(starts.as_mut_ptr());
        let has_narrow = self.has_narrow;
        let increasing = (0..chunks).into_par_iter().all(|c| {
            let (k0, k1) = (first_entry(c), first_entry(c + 1));
            let (mut b, end) = (first_bound[c] as usize, first_bound[c + 1] as usize);
            // The boundary `b` as its row and block, and its position (`u64::MAX` past `end`).
            let (mut r, mut j) = (b as u64 / blocks, b as u64 % blocks);
            let position = |b: usize, r: u64, j: u64| {
                if b < end {
                    r * cols + j * block_cols
                } else {
                    u64::MAX
                }
            };
            let mut next = position(b, r, j);
            for k in k0..k1 {
                let p = pos[k] as u64;
                if k + 1 < nnz && pos[k + 1] as u64 <= p {
                    return false;
                }
                while next <= p {
                    // SAFETY: the chunks' boundary ranges are disjoint (checked above) and
                    // below `bounds`.
                    unsafe { out.write(b, k as u32) };
                    b += 1;
                    j += 1;
                    if j == blocks {
                        (r, j) = (r + 1, 0);
                    }
                    next = position(b, r, j);
                }
                if has_narrow {
                    // The entry lies in the row of the boundary before `b` (at least boundary
                    // 0 lies at or before it); its column fits in a u16.
                    let row = if j == 0 { r - 1 } else { r };
                    // SAFETY: `k` is this chunk's own entry, below the length of `narrow`.
                    unsafe { columns.write(k, (p - row * cols) as u16) };
                }
            }
            for b in b..end {
                // SAFETY: as above.
                unsafe { out.write(b, k1 as u32) };
            }
            true
        });
        if increasing {
            Ok(())
        } else {
            Err("positions not strictly increasing".into())
        }
    }
}

/// Checks that `delta` has as many values as positions, strictly increasing and in range,
/// and, for coded values, a table of at most 256 values that every code indexes.
pub fn validate(delta: &SparseDelta) -> Result<(), String> {
    check_values(delta)?;
    BlockIndex::default().build(delta, delta.cols, false)
}

/// Where each row of `delta` starts among its positions (`rows + 1` offsets, a CSR's `ptr`),
/// after the position checks of [`validate`].
pub fn row_starts(delta: &SparseDelta) -> Result<Vec<u32>, String> {
    let mut index = BlockIndex::default();
    index.build(delta, delta.cols, false)?;
    let mut starts = index.starts;
    starts.truncate(delta.rows + 1);
    Ok(starts)
}

/// The checks of [`validate`] on the values, returning `||A||_F^2` ([`frobenius_norm_sq`]).
fn check_values(delta: &SparseDelta) -> Result<f64, String> {
    if delta.positions.len() != delta.values.len() {
        return Err(format!(
            "{} positions, {} values",
            delta.positions.len(),
            delta.values.len()
        ));
    }
    let DeltaValues::Coded { codes, table } = delta.values else {
        return Ok(frobenius_norm_sq(delta.values));
    };
    if table.len() > 256 {
        return Err(format!(
            "{} values in a code table (at most 256)",
            table.len()
        ));
    }
    let (fro2, top) = squares_and_top_code(delta.values);
    if top as usize >= table.len() && !codes.is_empty() {
        return Err(format!("code {top} past a table of {} values", table.len()));
    }
    Ok(fro2)
}

/// `||A||_F^2` in f64, summed in fixed chunks (in parallel) and then in chunk order, so the
/// result does not depend on the thread count (nor on whether the values are coded). Both
/// operators use it.
pub fn frobenius_norm_sq(values: DeltaValues) -> f64 {
    squares_and_top_code(values).0
}

/// [`frobenius_norm_sq`], and the largest code of coded values (0 for f32 values), in one pass.
/// Codes past the table count as 0 in the sum.
fn squares_and_top_code(values: DeltaValues) -> (f64, u8) {
    const CHUNK: usize = 1 << 16;
    let square = |v: f32| v as f64 * v as f64;
    let partial: Vec<(f64, u8)> = match values {
        DeltaValues::F32(v) => v
            .par_chunks(CHUNK)
            .map(|c| (c.iter().map(|&v| square(v)).sum(), 0))
            .collect(),
        DeltaValues::Coded { codes, table } => {
            let mut padded = [0f32; 256];
            padded[..table.len().min(256)].copy_from_slice(&table[..table.len().min(256)]);
            codes
                .par_chunks(CHUNK)
                .map(|c| {
                    let sum = c.iter().map(|&k| square(padded[k as usize])).sum();
                    (sum, c.iter().copied().max().unwrap_or(0))
                })
                .collect()
        }
    };
    partial
        .iter()
        .fold((0.0, 0), |(s, t), &(ps, pt)| (s + ps, t.max(pt)))
}

/// Buffers of [`CpuSparseOperator`] that can outlive it: passing the workspace of one matrix's
/// operator to the next one ([`CpuSparseOperator::with_workspace`],
/// [`CpuSparseOperator::into_workspace`]) reuses memory that is already mapped. Buffers only
/// grow; they hold the [`BlockIndex`] (4 bytes per row and block of 256 columns, 2 per entry)
/// and the zero-padded blocks of vectors of odd widths.
#[derive(Debug, Default)]
pub struct SparseWorkspace {
    /// Row starts and column-block splits of the delta's positions.
    index: BlockIndex,
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

/// A [`SparseDelta`] prepared for block products on the CPU (multi-threaded with rayon,
/// deterministic whatever the thread count). It borrows the delta's values (or codes) and
/// positions, which serve directly as the rows of `A` (through the u16 columns of their
/// [`BlockIndex`] where the matrix is narrow enough), and owns a [`SparseWorkspace`] with the
/// index.
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
        let frobenius_sq = check_values(delta)
            .and_then(|fro2| {
                ws.index
                    .build(delta, SCATTER_BLOCK_COLS, true)
                    .map(|()| fro2)
            })
            .unwrap_or_else(|e| panic!("sparse delta: {e}"));
        let mut table = Box::new([0f32; 256]);
        if let DeltaValues::Coded { table: t, .. } = delta.values {
            table[..t.len()].copy_from_slice(t);
        }
        CpuSparseOperator {
            delta: *delta,
            frobenius_sq,
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
unsafe fn add_entry<I: EntryIndex, V: EntryValues, const T: usize>(
    m: Rows<I, V>,
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
        let start = (m.idx.get_unchecked(k).widen() - base) as usize * w + off;
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
unsafe fn rows_tile<I: EntryIndex, V: EntryValues, const R: usize, const T: usize>(
    m: Rows<I, V>,
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
unsafe fn row_group<I: EntryIndex, V: EntryValues, const R: usize>(
    m: Rows<I, V>,
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
                unsafe { rows_tile::<I, V, R, $t>(m, first_row, x, y, w, off) };
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
unsafe fn rows_kernel<I: EntryIndex, V: EntryValues>(
    m: Rows<I, V>,
    first_row: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    let rows = y.len() / w;
    let mut r = 0;
    // SAFETY (both loops): the caller's contract.
    while rows - r >= 4 {
        unsafe { row_group::<I, V, 4>(m, first_row + r, x, &mut y[r * w..], w) };
        r += 4;
    }
    while r < rows {
        unsafe { row_group::<I, V, 1>(m, first_row + r, x, &mut y[r * w..], w) };
        r += 1;
    }
}

/// A product kernel over some rows, compiled once per instruction set by [`run_kernel`].
trait Kernel {
    /// Runs the kernel.
    ///
    /// # Safety
    /// The implementation's own contract.
    unsafe fn run(self);
}

/// [`rows_kernel`] on the rows of one output chunk.
struct Gather<'a, I, V> {
    m: Rows<'a, I, V>,
    first_row: usize,
    x: &'a [f32],
    y: &'a mut [f32],
    w: usize,
}

impl<I: EntryIndex, V: EntryValues> Kernel for Gather<'_, I, V> {
    /// # Safety
    /// As [`rows_kernel`].
    #[inline(always)]
    unsafe fn run(self) {
        unsafe { rows_kernel(self.m, self.first_row, self.x, self.y, self.w) }
    }
}

/// [`scatter_kernel`] on a panel of blocks of columns.
struct Scatter<'a, I, V> {
    m: Rows<'a, I, V>,
    blocks: std::ops::Range<usize>,
    first_col: u32,
    x: &'a [f32],
    y: &'a mut [f32],
    w: usize,
}

impl<I: EntryIndex, V: EntryValues> Kernel for Scatter<'_, I, V> {
    /// # Safety
    /// As [`scatter_kernel`].
    #[inline(always)]
    unsafe fn run(self) {
        unsafe { scatter_kernel(self.m, self.blocks, self.first_col, self.x, self.y, self.w) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// `k` compiled for AVX-512 (no FMA, so the rounding is identical to the generic code).
///
/// # Safety
/// The CPU must support AVX-512F, and `k`'s contract holds.
unsafe fn run_avx512<K: Kernel>(k: K) {
    unsafe { k.run() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
/// `k` compiled for AVX2 (no FMA, so the rounding is identical to the generic code).
///
/// # Safety
/// The CPU must support AVX2, and `k`'s contract holds.
unsafe fn run_avx2<K: Kernel>(k: K) {
    unsafe { k.run() }
}

/// Runs `k` compiled for the widest instruction set this CPU has (AVX-512F, AVX2 or the
/// baseline); all give the same bits.
///
/// # Safety
/// `k`'s contract holds.
unsafe fn run_kernel<K: Kernel>(k: K) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F support was just checked.
            return unsafe { run_avx512(k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { run_avx2(k) };
        }
    }
    unsafe { k.run() }
}

/// `y = M x` for a block of `w` vectors, in parallel over chunks of output rows.
///
/// # Panics
/// If `x` is not `in_dim * w` long or `y` not one block of `w`-vectors per row of `m`.
fn spmm<I: EntryIndex, V: EntryValues>(
    m: Rows<I, V>,
    in_dim: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
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
    let nnz = (m.ptr[m.ptr.len() - 1] as usize).max(1);
    let per_row = (nnz * w).div_ceil(out_rows).max(1);
    let rows_per_task = (32_768 / per_row).clamp(4, 4096);
    y.par_chunks_mut(rows_per_task * w)
        .enumerate()
        .for_each(|(t, y)| {
            let first_row = t * rows_per_task;
            // SAFETY: `m` is a view built in this module (see `Rows`) whose columns lie below
            // `in_dim`, and `x` was checked to hold `in_dim` rows of `w`.
            unsafe {
                run_kernel(Gather {
                    m,
                    first_row,
                    x,
                    y,
                    w,
                })
            };
        });
}

/// `y[col(k) * w + off ..][..T] += val[k] * x[r * w + off ..][..T]` for the entries `k` in
/// `entries` of row `r`, whose columns, less `base`, index `y`.
///
/// # Safety
/// `x` holds the rows of `m` at width `w`, `off + T <= w`, the entries are some of row `r`,
/// and `y` holds their columns less `base` at width `w` (see [`Rows`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scatter_tile<I: EntryIndex, V: EntryValues, const T: usize>(
    m: Rows<I, V>,
    r: usize,
    entries: std::ops::Range<usize>,
    base: u32,
    x: &[f32],
    y: &mut [f32],
    w: usize,
    off: usize,
) {
    debug_assert!(r * w + off + T <= x.len());
    // SAFETY: by the contract above and the invariant of `Rows`, the tile of `x` is in
    // bounds, and so is each entry and its tile of `y`.
    let xr = unsafe { *(x.as_ptr().add(r * w + off) as *const [f32; T]) };
    for k in entries {
        unsafe {
            let col = (m.idx.get_unchecked(k).widen().wrapping_sub(base)) as usize;
            debug_assert!(col * w + off + T <= y.len());
            let v = m.val.value(k);
            let yr = &mut *(y.as_mut_ptr().add(col * w + off) as *mut [f32; T]);
            for l in 0..T {
                yr[l] += v * xr[l];
            }
        }
    }
}

/// `y = (M^T x)` restricted to the columns of `M` in its blocks `blocks` (see [`BlockIndex`]),
/// which start at column `first_col`: every row scatters its entries in those columns, in
/// column tiles of 32, 16, 8, 4 and 1 as [`row_group`]. Each output sum runs over its entries
/// in row order, with a separate multiply and add: the same bits as a gather over a CSC copy.
///
/// # Safety
/// `m` is indexed by blocks (see [`Rows::of_delta`]), `x` holds the rows of `m` at width `w`,
/// and `y` the columns of the blocks at width `w`.
#[inline(always)]
unsafe fn scatter_kernel<I: EntryIndex, V: EntryValues>(
    m: Rows<I, V>,
    blocks: std::ops::Range<usize>,
    first_col: u32,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    y.fill(0.0);
    for r in 0..m.count() {
        let (s, e, base) = m.row_blocks(r, blocks.start, blocks.end);
        if s == e {
            continue;
        }
        let base = base.wrapping_add(first_col);
        let mut off = 0;
        macro_rules! tiles {
            ($($t:literal),*) => {$(
                while w - off >= $t {
                    // SAFETY: `off + T <= w`, and the caller's contract.
                    unsafe { scatter_tile::<I, V, $t>(m, r, s..e, base, x, y, w, off) };
                    off += $t;
                }
            )*};
        }
        tiles!(32, 16, 8, 4, 1);
    }
}

/// Columns per block of the [`BlockIndex`] of the CPU operator.
const SCATTER_BLOCK_COLS: usize = 256;

/// Output bytes that one task of the transposed product covers: a panel of whole blocks
/// whose outputs stay in the L1 and L2 caches while every row scatters into them.
const SCATTER_PANEL_BYTES: usize = 256 << 10;

/// `y = M^T x` for a block of `w` vectors (`x` has a block per row of `m`, `y` one per
/// column), without a transposed copy of `M`: in parallel over panels of output columns, each
/// of which every row scatters into (its entries there found through the [`BlockIndex`] of
/// `m`, whose blocks are `block_cols` wide).
///
/// # Panics
/// If `x` is not one block of `w`-vectors per row of `m`, or `y` not `out_dim * w` long.
fn spmm_transposed<I: EntryIndex, V: EntryValues>(
    m: Rows<I, V>,
    block_cols: usize,
    out_dim: usize,
    x: &[f32],
    y: &mut [f32],
    w: usize,
) {
    let rows = m.count();
    if w == 0 || out_dim == 0 {
        return;
    }
    assert_eq!(x.len(), rows * w, "x is not a block of {rows}-vectors");
    assert_eq!(
        y.len(),
        out_dim * w,
        "y is not a block of {out_dim}-vectors"
    );
    debug_assert_eq!(out_dim.div_ceil(block_cols), m.step);
    // Panels of at most SCATTER_PANEL_BYTES, at least two per thread. The result does not
    // depend on the split: every output sum runs over its rows in order.
    let panels =
        (2 * rayon::current_num_threads()).max((out_dim * w * 4).div_ceil(SCATTER_PANEL_BYTES));
    let per_panel = m.step.div_ceil(panels);
    y.par_chunks_mut(per_panel * block_cols * w)
        .enumerate()
        .for_each(|(p, y)| {
            let first = p * per_panel;
            let blocks = first..(first + per_panel).min(m.step);
            // SAFETY: `m` is a view built in this module (see `Rows`) whose columns lie below
            // `out_dim`, and `x` and `y` were checked to hold `rows` and `out_dim` rows of `w`;
            // the panel `y` holds the columns of its blocks.
            unsafe {
                run_kernel(Scatter {
                    m,
                    blocks,
                    first_col: (first * block_cols) as u32,
                    x,
                    y,
                    w,
                })
            };
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
        match self.delta.values {
            DeltaValues::F32(v) => self.product_with(v, x, y, w, transpose),
            DeltaValues::Coded { codes, .. } => {
                let table = &self.table;
                self.product_with(Coded { codes, table }, x, y, w, transpose)
            }
        }
    }

    /// [`product`](Self::product) with the values `val`, on the narrow columns of the index
    /// where it has them, else on the delta's positions.
    fn product_with<V: EntryValues>(
        &self,
        val: V,
        x: &[f32],
        y: &mut [f32],
        w: usize,
        transpose: bool,
    ) {
        fn run<I: EntryIndex, V: EntryValues>(
            m: Rows<I, V>,
            block_cols: usize,
            cols: usize,
            x: &[f32],
            y: &mut [f32],
            w: usize,
            transpose: bool,
        ) {
            if transpose {
                spmm_transposed(m, block_cols, cols, x, y, w)
            } else {
                spmm(m, cols, x, y, w)
            }
        }
        let (delta, index) = (&self.delta, &self.ws.index);
        let (cols, block_cols) = (delta.cols, index.block_cols);
        match Rows::narrow(delta, index, val) {
            Some(m) => run(m, block_cols, cols, x, y, w, transpose),
            None => run(
                Rows::of_delta(delta, index, val),
                block_cols,
                cols,
                x,
                y,
                w,
                transpose,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block index equals a naive count for odd shapes and block widths; bad positions are
    /// refused wherever they lie, also at the border of the pass's chunks, without a panic.
    #[test]
    fn block_index_equals_a_naive_count_and_refuses_bad_positions() {
        let sparse = |rows: usize, cols: usize, per_mille: u64| -> Vec<u32> {
            (0..(rows * cols) as u64)
                .filter(|&i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) % 1000 < per_mille)
                .map(|i| i as u32)
                .collect()
        };
        let check = |rows: usize, cols: usize, positions: &[u32], block_cols: usize| {
            let d = SparseDelta {
                rows,
                cols,
                positions,
                values: DeltaValues::F32(&vec![1.0; positions.len()]),
            };
            let mut index = BlockIndex::default();
            index.build(&d, block_cols, true).map(|()| index)
        };
        for (rows, cols, per_mille, block_cols) in [
            (1, 1, 1000, 1),
            (3, 5, 300, 2),
            (17, 127, 200, 16),
            (40, 600, 50, 256),
            (300, 700, 400, 256),
            (5, 3000, 10, 7),
            (2000, 3, 400, 256),
            (4, 0, 500, 256),
            (0, 6, 500, 256),
        ] {
            let positions = sparse(rows, cols, per_mille);
            let index = check(rows, cols, &positions, block_cols).unwrap();
            let bc = block_cols.min(cols.max(1));
            let blocks = cols.div_ceil(bc).max(1);
            let mut want: Vec<u32> = (0..rows * blocks)
                .map(|b| {
                    let at = (b / blocks) * cols + (b % blocks) * bc;
                    positions.partition_point(|&p| (p as usize) < at) as u32
                })
                .collect();
            want.push(positions.len() as u32);
            let name = format!("{rows} x {cols}, blocks of {block_cols}");
            assert_eq!((index.blocks, index.block_cols), (blocks, bc), "{name}");
            assert_eq!(&index.starts[..want.len()], &want[..], "{name}");
            let columns: Vec<u16> = positions
                .iter()
                .map(|&p| (p as usize % cols) as u16)
                .collect();
            assert!(index.has_narrow, "{name}");
            assert_eq!(&index.narrow[..columns.len()], &columns[..], "{name}");
        }
        // Too wide for u16 columns: the index holds none, and the operator reads positions.
        let wide = sparse(2, NARROW_MAX_COLS + 1, 5);
        assert!(
            !check(2, NARROW_MAX_COLS + 1, &wide, 256)
                .unwrap()
                .has_narrow
        );
        // 84 000 entries: two chunks in the pass, the second from entry 42 000.
        let good = sparse(300, 700, 400);
        assert!(good.len() > 1 << 16, "{}", good.len());
        let border = good.len() / 2;
        type Spoil = Box<dyn Fn(&mut Vec<u32>)>;
        let bad: [(&str, Spoil); 6] = [
            ("swap", Box::new(|p| p.swap(10, 11))),
            (
                "swap at the chunk border",
                Box::new(move |p| p.swap(border - 1, border)),
            ),
            ("duplicate", Box::new(|p| p[500] = p[499])),
            (
                "last out of range",
                Box::new(|p| *p.last_mut().unwrap() = 300 * 700),
            ),
            ("one out of range", Box::new(|p| p[1000] = u32::MAX)),
            ("reversed", Box::new(|p| p.reverse())),
        ];
        for (what, spoil) in bad {
            let mut positions = good.clone();
            spoil(&mut positions);
            assert!(check(300, 700, &positions, 256).is_err(), "{what} accepted");
        }
    }

    /// Every compiled variant of both kernels gives the same bits as the generic one (the
    /// dispatcher picks only one of them on a given machine), with f32 and with coded values,
    /// on positions and on narrow columns.
    #[test]
    fn kernel_variants_agree_to_the_bit() {
        const COLS: usize = 77;
        let (rows, cols) = (45usize, COLS);
        let positions: Vec<u32> = (0..(rows * cols) as u32)
            .filter(|p| (p.wrapping_mul(2_654_435_761) >> 27) < 5)
            .collect();
        let codes: Vec<u8> = positions.iter().map(|&p| ((p * 37) % 23) as u8).collect();
        let mut table = [0f32; 256];
        for (c, t) in table.iter_mut().take(23).enumerate() {
            *t = c as f32 / 11.0 - 1.0;
        }
        let values: Vec<f32> = codes.iter().map(|&c| table[c as usize]).collect();
        let mut index = BlockIndex::default();
        let delta = SparseDelta {
            rows,
            cols,
            positions: &positions,
            values: DeltaValues::F32(&values),
        };
        index.build(&delta, 16, true).unwrap();
        let plain = Rows::of_delta(&delta, &index, &values[..]);
        let coded = Coded {
            codes: &codes,
            table: &table,
        };
        let coded_narrow = Rows::narrow(&delta, &index, coded).unwrap();
        let coded = Rows::of_delta(&delta, &index, coded);
        /// `k` compiled for `isa` (detected by the caller).
        unsafe fn run_on<K: Kernel>(isa: &str, k: K) {
            #[cfg(target_arch = "x86_64")]
            match isa {
                "avx2" => return unsafe { run_avx2(k) },
                "avx512f" => return unsafe { run_avx512(k) },
                _ => {}
            }
            unsafe { k.run() }
        }
        /// One kernel on the whole matrix: `A x` (gather) or `A^T x` (scatter).
        fn product<I: EntryIndex, V: EntryValues>(
            m: Rows<I, V>,
            x: &[f32],
            w: usize,
            transposed: bool,
            isa: &str,
        ) -> Vec<f32> {
            let out = if transposed { COLS } else { m.count() };
            let mut y = vec![f32::NAN; out * w];
            let y_ref = &mut y[..];
            // SAFETY (both calls): views of a validated delta; `x` and `y` hold the input and
            // output rows at width `w`.
            unsafe {
                if transposed {
                    let blocks = 0..m.step;
                    run_on(
                        isa,
                        Scatter {
                            m,
                            blocks,
                            first_col: 0,
                            x,
                            y: y_ref,
                            w,
                        },
                    );
                } else {
                    run_on(
                        isa,
                        Gather {
                            m,
                            first_row: 0,
                            x,
                            y: y_ref,
                            w,
                        },
                    );
                }
            }
            y
        }
        for w in [1usize, 4, 8, 12, 24, 40, 64] {
            for transposed in [false, true] {
                let din = if transposed { rows } else { cols };
                let x: Vec<f32> = (0..din * w)
                    .map(|i| ((i * 7919) % 211) as f32 / 100.0 - 1.0)
                    .collect();
                let want = product(plain, &x, w, transposed, "generic");
                let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                for isa in ["generic", "avx2", "avx512f"] {
                    #[cfg(target_arch = "x86_64")]
                    let available = match isa {
                        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                        _ => true,
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let available = isa == "generic";
                    if !available {
                        eprintln!("kernel variant {isa} not available on this CPU");
                        continue;
                    }
                    for (name, got) in [
                        ("f32", product(plain, &x, w, transposed, isa)),
                        ("coded", product(coded, &x, w, transposed, isa)),
                        (
                            "coded, narrow",
                            product(coded_narrow, &x, w, transposed, isa),
                        ),
                    ] {
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{isa} ({name}, transposed: {transposed}) differs from the generic \
                             kernel at width {w}"
                        );
                    }
                }
            }
        }
    }
}
