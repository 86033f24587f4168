//! [`GpuSparseOperator`]: the [`MatrixOperator`] of the nuclear-norm estimator on the device.
//!
//! The matrix is uploaded once, as CSR (rows of `A`) and CSC (rows of `A^T`), built on the host
//! ([`csr_and_csc`]); each copy is split into row blocks whose entries fit in one storage binding. Every
//! [`apply`](MatrixOperator::apply) uploads `x`, dispatches [`Kernel::Spmm`] once per row block
//! (grid-stride, at most
//! [`MAX_STRIDE_GROUPS`](super::kernels::MAX_STRIDE_GROUPS) workgroups) and reads `y` back.
//!
//! Every output is summed in f32 by one invocation over its row's entries in stored order, the
//! order of [`crate::tracenorm::CpuSparseOperator`], so results are deterministic. Whether they
//! equal the CPU operator's to the bit depends on the device:
//! - on lavapipe they do (every output of `tests/gpu_tracenorm.rs` is bit-identical, and the
//!   test asserts it there);
//! - elsewhere it is not guaranteed: the SPIR-V that naga writes carries no `NoContraction`
//!   decoration, so a Vulkan driver may fuse each multiply and add into one FMA (Metal
//!   compiles with its default fast math), and a device may flush subnormal products to zero.
//!   Each output then stays within `2 γ_n Σ_k |a_k x_k|` of the CPU operator's (`n` entries in
//!   its row, `γ_n = n u / (1 - n u)`, `u = 2^-24`; both sums are within `γ_n Σ |a_k x_k|` of
//!   the exact one), plus `n` times the smallest normal f32 for flushed subnormals, which the
//!   test asserts on such devices.
//!
//! `apply` cannot return an error: the first GPU failure is recorded, every later product is
//! zero, and [`GpuSparseOperator::error`] reports it (check it after the estimate).

use super::constants::Params;
use super::csr::{csr_and_csc, Csr};
use super::device::Gpu;
use super::kernels::{stride_groups, Kernel, Kernels};
use super::{words_to_bytes, GpuEngine};
use crate::engine::EngineError;
use crate::tracenorm::sparse::{frobenius_norm_sq, validate};
use crate::tracenorm::{MatrixOperator, SparseDelta};

/// Widest block of vectors the estimator uses with its default options (buffers are sized for
/// it up front and grow if a wider block comes).
const PLANNED_WIDTH: usize = 64;

/// One row block of a CSR matrix on the device.
struct Block {
    first_row: usize,
    rows: usize,
    row_ptr: wgpu::Buffer,
    idx: wgpu::Buffer,
    val: wgpu::Buffer,
    params: wgpu::Buffer,
}

/// A [`SparseDelta`] on the device, for [`crate::tracenorm::estimate_nuclear_norm`]. Built by
/// [`GpuEngine::sparse_operator`]; borrows the engine's device and pipelines.
pub struct GpuSparseOperator<'a> {
    gpu: &'a Gpu,
    kernels: &'a Kernels,
    rows: usize,
    cols: usize,
    frobenius_sq: f64,
    /// Row blocks of `A` (CSR) and of `A^T` (CSC).
    a: Vec<Block>,
    at: Vec<Block>,
    /// x, y and the map-read staging buffer, `capacity` f32 each.
    io: Option<(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer)>,
    capacity: usize,
    error: Option<EngineError>,
}

/// `(first_row, rows)` of row blocks of at most `max_nnz` entries each (a row longer than that
/// gets a block of its own, and the caller rejects it).
fn row_blocks(ptr: &[u32], max_nnz: usize) -> Vec<(usize, usize)> {
    let rows = ptr.len() - 1;
    let mut blocks = Vec::new();
    let mut first = 0;
    while first < rows {
        let mut end = first + 1;
        while end < rows && (ptr[end + 1] - ptr[first]) as usize <= max_nnz {
            end += 1;
        }
        blocks.push((first, end - first));
        first = end;
    }
    blocks
}

/// Device bytes the operator needs for `delta` (matrix copies, and x, y and staging for blocks
/// of [`PLANNED_WIDTH`] vectors).
pub(super) fn planned_bytes(delta: &SparseDelta) -> u64 {
    let nnz = delta.positions.len() as u64;
    let matrix = 2 * 8 * nnz + 4 * (delta.rows as u64 + delta.cols as u64 + 2);
    matrix + 3 * io_bytes(delta)
}

/// Bytes of one x or y buffer for blocks of [`PLANNED_WIDTH`] vectors.
pub(super) fn io_bytes(delta: &SparseDelta) -> u64 {
    4 * (delta.rows.max(delta.cols) * PLANNED_WIDTH) as u64
}

impl GpuEngine {
    /// A [`MatrixOperator`] for `delta` on this engine's device: CSR and CSC copies uploaded
    /// once. The engine's buffer pool is emptied first when the operator would not fit beside
    /// it within `--gpu-mem`; an operator larger than the whole budget, or whose `x`/`y` block
    /// of 64 vectors exceeds one storage binding, is an error ([`Engine::nuclear_norm`]
    /// then uses the CPU). Invalid positions give [`EngineError::Inconsistent`].
    ///
    /// [`Engine::nuclear_norm`]: crate::engine::Engine::nuclear_norm
    pub fn sparse_operator(
        &mut self,
        delta: &SparseDelta,
    ) -> Result<GpuSparseOperator<'_>, EngineError> {
        let max_nnz = (self.gpu.max_binding / 4) as usize;
        self.sparse_operator_blocked(delta, max_nnz)
    }

    /// [`sparse_operator`](Self::sparse_operator) with row blocks of at most `max_block_nnz`
    /// entries (tests use small blocks to exercise the split).
    pub fn sparse_operator_blocked(
        &mut self,
        delta: &SparseDelta,
        max_block_nnz: usize,
    ) -> Result<GpuSparseOperator<'_>, EngineError> {
        self.gpu.errors.check()?;
        validate(delta).map_err(|m| EngineError::Inconsistent(format!("sparse delta: {m}")))?;
        let max_nnz = max_block_nnz.clamp(1, (self.gpu.max_binding / 4) as usize);
        let needed = planned_bytes(delta);
        if needed > self.options.gpu_mem {
            return Err(EngineError::Gpu(format!(
                "sparse operator for {} x {} with {} entries needs {needed} bytes, over the \
                 device-memory budget of {}",
                delta.rows,
                delta.cols,
                delta.positions.len(),
                self.options.gpu_mem
            )));
        }
        if io_bytes(delta) > self.gpu.max_binding {
            return Err(EngineError::Gpu(format!(
                "sparse operator for {} x {}: a block of {PLANNED_WIDTH} vectors exceeds one \
                 storage binding ({} bytes)",
                delta.rows, delta.cols, self.gpu.max_binding
            )));
        }
        if self.pool.live() + needed > self.options.gpu_mem {
            self.pool.clear();
            self.layout = None;
        }
        let gpu = &self.gpu;
        let mut op = GpuSparseOperator {
            gpu,
            kernels: &self.kernels,
            rows: delta.rows,
            cols: delta.cols,
            frobenius_sq: frobenius_norm_sq(delta.values),
            a: Vec::new(),
            at: Vec::new(),
            io: None,
            capacity: 0,
            error: None,
        };
        if delta.rows == 0 || delta.cols == 0 {
            return Ok(op);
        }
        let (csr, csc) = csr_and_csc(delta);
        op.a = upload_blocks(gpu, &csr, max_nnz)?;
        op.at = upload_blocks(gpu, &csc, max_nnz)?;
        op.ensure_capacity(delta.rows.max(delta.cols) * PLANNED_WIDTH);
        gpu.wait()?;
        Ok(op)
    }
}

fn storage(gpu: &Gpu, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let size = (bytes.len() as u64).max(4);
    let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    if !bytes.is_empty() {
        gpu.write(&buffer, 0, bytes);
    }
    buffer
}

fn upload_blocks(gpu: &Gpu, m: &Csr, max_nnz: usize) -> Result<Vec<Block>, EngineError> {
    let mut blocks = Vec::new();
    for (first_row, rows) in row_blocks(&m.ptr, max_nnz) {
        let (s, e) = (m.ptr[first_row] as usize, m.ptr[first_row + rows] as usize);
        if e - s > (gpu.max_binding / 4) as usize {
            return Err(EngineError::Gpu(format!(
                "sparse operator: row {first_row} has {} entries, more than one storage binding \
                 holds",
                e - s
            )));
        }
        let ptr: Vec<u32> = m.ptr[first_row..=first_row + rows]
            .iter()
            .map(|&p| p - s as u32)
            .collect();
        blocks.push(Block {
            first_row,
            rows,
            row_ptr: storage(gpu, "spmm row_ptr", &words_to_bytes(&ptr)),
            idx: storage(gpu, "spmm idx", &words_to_bytes(&m.idx[s..e])),
            val: storage(gpu, "spmm val", bytemuck::cast_slice(&m.val[s..e])),
            params: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("spmm params"),
                size: std::mem::size_of::<Params>() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        });
    }
    Ok(blocks)
}

impl GpuSparseOperator<'_> {
    /// The first GPU failure seen by [`apply`](MatrixOperator::apply) (every product after it
    /// was zero), or `None`. Also reports failures the device signalled asynchronously.
    pub fn error(&self) -> Option<EngineError> {
        match &self.error {
            Some(EngineError::Gpu(m)) => Some(EngineError::Gpu(m.clone())),
            Some(EngineError::Inconsistent(m)) => Some(EngineError::Inconsistent(m.clone())),
            Some(EngineError::NonFinite {
                index,
                base,
                finetuned,
            }) => Some(EngineError::NonFinite {
                index: *index,
                base: *base,
                finetuned: *finetuned,
            }),
            None => self.gpu.errors.check().err(),
        }
    }

    /// Row blocks of `A` and of `A^T` (for tests of the split).
    pub fn blocks(&self) -> (usize, usize) {
        (self.a.len(), self.at.len())
    }

    /// Makes x, y and staging hold at least `floats` f32 each.
    fn ensure_capacity(&mut self, floats: usize) {
        if floats <= self.capacity && self.io.is_some() {
            return;
        }
        let size = (floats.max(1) * 4) as u64;
        let make = |label, usage| {
            self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        let x = make("spmm x", U::STORAGE | U::COPY_DST);
        let y = make("spmm y", U::STORAGE | U::COPY_SRC);
        let staging = make("spmm staging", U::MAP_READ | U::COPY_DST);
        if let Some((a, b, c)) = self.io.replace((x, y, staging)) {
            a.destroy();
            b.destroy();
            c.destroy();
        }
        self.capacity = floats.max(1);
    }

    fn try_apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) -> Result<(), EngineError> {
        self.gpu.errors.check()?;
        let (in_dim, out_dim) = if transpose {
            (self.rows, self.cols)
        } else {
            (self.cols, self.rows)
        };
        if in_dim == 0 || out_dim == 0 || x.is_empty() {
            y.fill(0.0);
            return Ok(());
        }
        let w = x.len() / in_dim;
        if x.len() != in_dim * w || y.len() != out_dim * w {
            return Err(EngineError::Inconsistent(format!(
                "sparse operator: x has {} entries, y {}, for {in_dim} -> {out_dim} vectors",
                x.len(),
                y.len()
            )));
        }
        let floats = in_dim.max(out_dim) * w;
        if floats as u64 * 4 > self.gpu.max_binding {
            return Err(EngineError::Gpu(format!(
                "sparse operator: a block of {w} vectors of length {} exceeds one storage binding",
                in_dim.max(out_dim)
            )));
        }
        self.ensure_capacity(floats);
        let (xb, yb, staging) = self.io.as_ref().expect("allocated just above");
        self.gpu.write(xb, 0, bytemuck::cast_slice(x));
        let blocks = if transpose { &self.at } else { &self.a };
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        for b in blocks {
            let p = Params {
                n: b.rows as u32,
                start: b.first_row as u32,
                num_levels: w as u32,
                ..Default::default()
            };
            self.gpu.write(&b.params, 0, bytemuck::bytes_of(&p));
            self.kernels.dispatch(
                &self.gpu.device,
                &mut enc,
                Kernel::Spmm,
                &[&b.params, &b.row_ptr, &b.idx, &b.val, xb, yb],
                stride_groups(b.rows * w, self.gpu.max_groups),
            );
        }
        self.gpu.queue.submit([enc.finish()]);
        let bytes = self.gpu.read(yb, 0, (y.len() * 4) as u64, staging)?;
        for (o, c) in y.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

impl MatrixOperator for GpuSparseOperator<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn frobenius_norm_sq(&self) -> f64 {
        self.frobenius_sq
    }

    /// `y = A x` or `A^T x` on the device; zeros once a GPU failure was recorded (see
    /// [`GpuSparseOperator::error`]).
    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) {
        if self.error.is_none() {
            if let Err(e) = self.try_apply(x, y, transpose) {
                self.error = Some(e);
            }
        }
        if self.error.is_some() {
            y.fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_respect_the_entry_cap() {
        // Rows with 3, 0, 2, 5, 1 entries.
        let ptr = [0u32, 3, 3, 5, 10, 11];
        assert_eq!(row_blocks(&ptr, 100), vec![(0, 5)]);
        assert_eq!(row_blocks(&ptr, 5), vec![(0, 3), (3, 1), (4, 1)]);
        assert_eq!(
            row_blocks(&ptr, 1),
            vec![(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
        );
        assert_eq!(row_blocks(&[0u32], 4), vec![]);
    }
}
