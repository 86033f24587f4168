//! The CSR and CSC copies of a [`SparseDelta`] that the GPU sparse operator uploads
//! ([`csr_and_csc`]). The CPU operator needs neither: it reads the delta's sorted positions as
//! its rows and scatters for `A^T x` (see [`crate::tracenorm::sparse`]).

use crate::disjoint::SharedOut;
use crate::tracenorm::sparse::row_starts;
use crate::tracenorm::SparseDelta;
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

/// The CSR copy (rows of `A`) and the CSC copy (rows of `A^T`; rows increasing within a column)
/// of a validated `delta` (see [`crate::tracenorm::sparse::validate`]), as owned arrays.
///
/// # Panics
/// If `delta` fails [`crate::tracenorm::sparse::validate`].
pub fn csr_and_csc(delta: &SparseDelta) -> (Csr, Csr) {
    let cols = delta.cols;
    let ptr = row_starts(delta).unwrap_or_else(|e| panic!("sparse delta: {e}"));
    let mut idx = delta.positions.to_vec();
    let row_lens = ptr.windows(2).map(|w| (w[1] - w[0]) as usize);
    split_runs(&mut idx, row_lens)
        .into_par_iter()
        .with_min_len(256)
        .enumerate()
        .for_each(|(r, row)| {
            // Positions past the last u32 row start hold no entries: the offset may wrap.
            let base = (r as u32).wrapping_mul(cols as u32);
            row.iter_mut().for_each(|c| *c -= base);
        });
    let csr = Csr {
        ptr,
        idx,
        val: delta.values.to_f32(),
    };
    let csc = transpose(&csr, cols);
    (csr, csc)
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

/// Row chunks of [`transpose`]: enough for two threads to balance, few enough that each chunk's
/// per-column counters (4 bytes per column) stay small.
const TRANSPOSE_CHUNKS: usize = 16;

/// The transpose of `a` (a matrix with `cols` columns, columns increasing within rows) as a
/// CSC copy: a counting sort by column, in parallel over chunks of rows.
///
/// Pass 1 counts each chunk's entries per column; a prefix sum over the columns, and within a
/// column over the chunks, gives every (chunk, column) pair its first slot; pass 2 has each
/// chunk write its entries, in order, at its slots. Rows therefore increase within each column,
/// and the result is the same for any number of threads. One scatter pass moves about 14 bytes
/// per entry (coded values): it replaced a two-pass radix sort through buckets of 128 columns,
/// which moved about 32 and took 54 ms instead of 32 ms for the seven matrices of a LLaMA-2-7B
/// block (the products, like the sort, are limited by memory traffic on this machine).
fn transpose(a: &Csr, cols: usize) -> Csr {
    let rows = a.ptr.len() - 1;
    let nnz = a.ptr.last().map_or(0, |&n| n as usize);
    if cols == 0 {
        return Csr {
            ptr: vec![0],
            idx: Vec::new(),
            val: Vec::new(),
        };
    }
    let chunks = rows.clamp(1, TRANSPOSE_CHUNKS);
    let chunk_rows: Vec<(usize, usize)> = (0..chunks)
        .map(|c| (c * rows / chunks, (c + 1) * rows / chunks))
        .collect();
    let mut counts = vec![0u32; chunks * cols];
    counts
        .par_chunks_mut(cols)
        .zip(&chunk_rows)
        .for_each(|(count, &(r0, r1))| {
            count.fill(0);
            for r in r0..r1 {
                let (s, e) = (a.ptr[r] as usize, a.ptr[r + 1] as usize);
                for &c in &a.idx[s..e] {
                    count[c as usize] += 1;
                }
            }
        });
    let mut ptr = vec![0u32; cols + 1];
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
    let (mut idx, mut val) = (vec![0u32; nnz], vec![0f32; nnz]);
    let (idx_out, val_out) = (SharedOut(idx.as_mut_ptr()), SharedOut(val.as_mut_ptr()));
    counts
        .par_chunks_mut(cols)
        .zip(&chunk_rows)
        .for_each(|(next, &(r0, r1))| {
            for r in r0..r1 {
                let (s, e) = (a.ptr[r] as usize, a.ptr[r + 1] as usize);
                for (k, &c) in (s..e).zip(&a.idx[s..e]) {
                    let slot = &mut next[c as usize];
                    // SAFETY: the slots of a column run from its start over the chunks in order,
                    // one per entry, so every slot is below nnz and written once.
                    unsafe {
                        idx_out.write(*slot as usize, r as u32);
                        val_out.write(*slot as usize, a.val[k]);
                    }
                    *slot += 1;
                }
            }
        });
    Csr { ptr, idx, val }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::selection::mix32;
    use crate::tracenorm::DeltaValues;

    /// A `rows x cols` matrix keeping each entry with probability `density`, values in (-1, 1).
    fn random_sparse(rows: usize, cols: usize, density: f64, key: u32) -> (Vec<u32>, Vec<f32>) {
        let unit = |i: u32, salt: u32| mix32(mix32(i ^ key) ^ salt) as f64 / 2f64.powi(32);
        let (mut positions, mut values) = (Vec::new(), Vec::new());
        for i in 0..(rows * cols) as u32 {
            if unit(i, 0) < density {
                positions.push(i);
                values.push((unit(i, 1) * 2.0 - 1.0) as f32);
            }
        }
        (positions, values)
    }

    #[test]
    fn csc_copy_equals_a_naive_counting_sort() {
        // Shapes around the row-chunk count of the transpose (16), empty rows and
        // columns, one dense row.
        for (k, &(rows, cols, density)) in [
            (1, 1, 1.0),
            (3, 5, 0.3),
            (17, 127, 0.2),
            (40, 128, 0.05),
            (33, 129, 0.5),
            (300, 700, 0.02),
            (5, 3000, 0.01),
            (2000, 3, 0.4),
            (4, 0, 0.5),
            (0, 6, 0.5),
        ]
        .iter()
        .enumerate()
        {
            let (positions, values) = random_sparse(rows, cols, density, 100 + k as u32);
            let d = SparseDelta {
                rows,
                cols,
                positions: &positions,
                values: DeltaValues::F32(&values),
            };
            let (csr, csc) = csr_and_csc(&d);
            // Naive: every column's (row, value) pairs in increasing row order.
            let mut by_col: Vec<Vec<(u32, f32)>> = vec![Vec::new(); cols];
            for (&p, &v) in positions.iter().zip(&values) {
                by_col[p as usize % cols].push(((p as usize / cols) as u32, v));
            }
            let mut ptr = vec![0u32];
            for c in &by_col {
                ptr.push(ptr.last().unwrap() + c.len() as u32);
            }
            let flat: Vec<(u32, f32)> = by_col.into_iter().flatten().collect();
            let name = format!("{rows} x {cols} at {density}");
            assert_eq!(csc.ptr, ptr, "{name}: column starts");
            assert_eq!(
                csc.idx,
                flat.iter().map(|e| e.0).collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(
                csc.val,
                flat.iter().map(|e| e.1).collect::<Vec<_>>(),
                "{name}"
            );
            let row_starts: Vec<u32> = (0..=rows)
                .map(|r| {
                    positions
                        .iter()
                        .filter(|&&p| (p as usize) < r * cols)
                        .count() as u32
                })
                .collect();
            assert_eq!(csr.ptr, row_starts, "{name}: row starts");
            let cols_of: Vec<u32> = positions.iter().map(|&p| p % cols as u32).collect();
            assert_eq!(csr.idx, cols_of, "{name}: column indices");
        }
    }
}
