//! The GPU sparse operator (`shaders/spmm.wgsl`) returns the CPU operator's products: to the bit
//! on lavapipe, and within the f32 rounding bound stated in `src/engine/gpu/spmm.rs` on other
//! devices (which may fuse multiply and add); `GpuEngine::nuclear_norm` then agrees with the
//! CPU estimate exactly on lavapipe, to 1e-3 elsewhere. Where no adapter exists the tests say
//! loudly that they did not run; with `CI=true` that is a failure (CI runs them on lavapipe).

mod common;
use common::*;
use udelta_gpu::engine::cpu::CpuEngine;
use udelta_gpu::engine::gpu::{AdapterChoice, GpuEngine, GpuOptions};
use udelta_gpu::engine::{Engine, EngineError};
use udelta_gpu::pipeline::compress::{compress, CompressOptions};
use udelta_gpu::tracenorm::{
    CpuSparseOperator, DeltaValues, EstimatorOptions, MatrixOperator, SparseDelta,
};

/// The GPU engine, or `None` (after a loud message) where there is no adapter; with `CI=true`
/// a missing adapter fails the test.
fn gpu() -> Option<GpuEngine> {
    match GpuEngine::new(GpuOptions {
        adapter: AdapterChoice::Auto,
        ..Default::default()
    }) {
        Ok(e) => Some(e),
        Err(e) => {
            report_missing_gpu(&format!("no usable GPU adapter: {e}"));
            None
        }
    }
}

/// Whether `g` runs on lavapipe, where the products equal the CPU operator's to the bit (LLVM
/// there does not fuse the shader's multiply and add).
fn bit_exact(g: &GpuEngine) -> bool {
    g.adapter().name.starts_with("llvmpipe")
}

/// The crate's SplitMix64 stream.
struct Rng(udelta_gpu::splitmix::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(udelta_gpu::splitmix::SplitMix64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0.unit()
    }
}

/// A random `rows x cols` matrix with each entry kept with probability `density`.
/// `levels == 0`: values uniform in (-1, 1); else UltraDelta-like values, one of `levels`
/// nonzero levels of a symmetric grid (step 1e-3).
fn random_delta(
    rows: usize,
    cols: usize,
    density: f64,
    levels: u32,
    seed: u64,
) -> (Vec<u32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let (mut positions, mut values) = (Vec::new(), Vec::new());
    for p in 0..(rows * cols) as u32 {
        if r.unit() < density {
            positions.push(p);
            values.push(if levels == 0 {
                (2.0 * r.unit() - 1.0) as f32
            } else {
                let l = (r.next() % levels as u64) as f32;
                (l - (levels as f32 - 1.0) / 2.0) * 1e-3
            });
        }
    }
    (positions, values)
}

fn delta<'a>(rows: usize, cols: usize, m: &'a (Vec<u32>, Vec<f32>)) -> SparseDelta<'a> {
    SparseDelta {
        rows,
        cols,
        positions: &m.0,
        values: DeltaValues::F32(&m.1),
    }
}

/// Entries in each row (`transpose`: each column) of a matrix with these positions.
fn line_lengths(positions: &[u32], rows: usize, cols: usize, transpose: bool) -> Vec<usize> {
    let mut lens = vec![0; if transpose { cols } else { rows }];
    for &p in positions {
        let (r, c) = (p as usize / cols, p as usize % cols);
        lens[if transpose { c } else { r }] += 1;
    }
    lens
}

/// The most an output summing `n` products may differ from the CPU operator's when the device
/// fuses multiply and add or flushes subnormals: `2 γ_n Σ |a_k x_k|` (`γ_n = n u / (1 - n u)`,
/// `u = 2^-24`; `abs_sum` is that sum as the CPU computes it, within `γ_n` of exact, hence the
/// factor 1.01) plus `n` times the smallest normal f32.
fn rounding_bound(n: usize, abs_sum: f32) -> f64 {
    let u = 2f64.powi(-24);
    let gamma = n as f64 * u / (1.0 - n as f64 * u);
    2.0 * gamma * 1.01 * abs_sum as f64 + n as f64 * f32::MIN_POSITIVE as f64
}

/// Compares one product of `g` with the CPU operator `c`: asserts bit equality (`exact`) or
/// [`rounding_bound`] for every output (`lens`: entries summed into each output row). Returns
/// the largest `|gpu - cpu| / bound` and how many outputs are bit-identical, of how many.
#[allow(clippy::too_many_arguments)]
fn compare(
    g: &mut dyn MatrixOperator,
    c: &mut dyn MatrixOperator,
    abs: &mut dyn MatrixOperator,
    lens: &[usize],
    exact: bool,
    width: usize,
    transpose: bool,
    seed: u64,
) -> (f64, usize, usize) {
    let (din, dout) = if transpose {
        (c.rows(), c.cols())
    } else {
        (c.cols(), c.rows())
    };
    let mut r = Rng::new(seed);
    let x: Vec<f32> = (0..din * width)
        .map(|_| (2.0 * r.unit() - 1.0) as f32)
        .collect();
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (mut yg, mut yc, mut ya) = (
        vec![f32::NAN; dout * width],
        vec![0f32; dout * width],
        vec![0f32; dout * width],
    );
    g.apply(&x, &mut yg, transpose);
    c.apply(&x, &mut yc, transpose);
    abs.apply(&xa, &mut ya, transpose);
    let mut worst = 0f64;
    let mut same = 0;
    for i in 0..yc.len() {
        assert!(yg[i].is_finite(), "output {i} not written");
        if yg[i].to_bits() == yc[i].to_bits() {
            same += 1;
        } else {
            assert!(!exact, "output {i}: GPU {} != CPU {}", yg[i], yc[i]);
        }
        let err = (yg[i] as f64 - yc[i] as f64).abs();
        let bound = rounding_bound(lens[i / width], ya[i]);
        assert!(
            err <= bound,
            "output {i}: |{} - {}| > {bound:e}",
            yg[i],
            yc[i]
        );
        if err > 0.0 {
            worst = worst.max(err / bound);
        }
    }
    (worst, same, yc.len())
}

fn check_products(g: &mut GpuEngine, rows: usize, cols: usize, max_block_nnz: Option<usize>) {
    let exact = bit_exact(g);
    let m = random_delta(rows, cols, 0.05, 0, rows as u64 * 7 + cols as u64);
    let d = delta(rows, cols, &m);
    let abs_values: Vec<f32> = m.1.iter().map(|v| v.abs()).collect();
    let mut cpu = CpuSparseOperator::new(&d);
    let mut abs = CpuSparseOperator::new(&SparseDelta {
        values: DeltaValues::F32(&abs_values),
        ..d
    });
    let mut op = match max_block_nnz {
        Some(b) => g.sparse_operator_blocked(&d, b).unwrap(),
        None => g.sparse_operator(&d).unwrap(),
    };
    if max_block_nnz.is_some() {
        let (a, at) = op.blocks();
        assert!(a > 1 && at > 1, "{a} and {at} row blocks");
    }
    assert_eq!(op.frobenius_norm_sq(), cpu.frobenius_norm_sq());
    assert_eq!((op.rows(), op.cols()), (rows, cols));
    for width in [1, 8] {
        for transpose in [false, true] {
            let lens = line_lengths(&m.0, rows, cols, transpose);
            let (worst, same, n) = compare(
                &mut op, &mut cpu, &mut abs, &lens, exact, width, transpose, 99,
            );
            eprintln!(
                "{rows} x {cols} ({} entries, blocks {max_block_nnz:?}), width {width}, \
                 transpose {transpose}: max error {worst:.2e} of the rounding bound, {same}/{n} \
                 outputs bit-identical (asserted: {exact})",
                m.0.len()
            );
        }
    }
    assert!(op.error().is_none(), "{:?}", op.error());
}

#[test]
fn gpu_products_match_the_cpu_operator() {
    let Some(mut g) = gpu() else { return };
    check_products(&mut g, 257, 1031, None);
    check_products(&mut g, 1031, 257, None);
    // Row blocks of at most 500 entries: several dispatches per product.
    check_products(&mut g, 257, 1031, Some(500));
}

#[test]
fn widths_and_degenerate_matrices() {
    let Some(mut g) = gpu() else { return };
    // An empty row and column, a single entry, and widths the estimator does not use.
    let m = (vec![0u32, 5 * 7 + 6], vec![2.0f32, -3.0]);
    let d = delta(6, 7, &m);
    let mut op = g.sparse_operator(&d).unwrap();
    let mut cpu = CpuSparseOperator::new(&d);
    for width in [1, 3, 65, 200] {
        for transpose in [false, true] {
            let (din, dout) = if transpose { (6, 7) } else { (7, 6) };
            let x: Vec<f32> = (0..din * width).map(|i| i as f32 - 5.0).collect();
            let (mut yg, mut yc) = (vec![f32::NAN; dout * width], vec![0f32; dout * width]);
            op.apply(&x, &mut yg, transpose);
            cpu.apply(&x, &mut yc, transpose);
            assert_eq!(yg, yc, "width {width}, transpose {transpose}");
        }
    }
    assert!(op.error().is_none());
    // A mismatched block is recorded, not a panic, and later products are zero.
    let mut y = vec![1f32; 6];
    op.apply(&[1.0; 8], &mut y, false);
    assert!(matches!(op.error(), Some(EngineError::Inconsistent(_))));
    let mut y = vec![1f32; 6];
    op.apply(&[1.0; 7], &mut y, false);
    assert_eq!(y, vec![0.0; 6]);
    drop(op);
    // Invalid positions are an error, an empty matrix has norm 0.
    let bad = (vec![3u32, 3], vec![1.0f32, 1.0]);
    assert!(g.sparse_operator(&delta(6, 7, &bad)).is_err());
    assert!(g
        .nuclear_norm(&delta(6, 7, &bad), &Default::default())
        .is_err());
    let empty = (vec![], vec![]);
    assert_eq!(
        g.nuclear_norm(&delta(6, 7, &empty), &Default::default())
            .unwrap(),
        0.0
    );
}

fn check_estimate(g: &mut GpuEngine, rows: usize, cols: usize, density: f64, seed: u64) {
    let m = random_delta(rows, cols, density, 16, seed);
    let d = delta(rows, cols, &m);
    let opts = EstimatorOptions::default();
    let t = std::time::Instant::now();
    let cpu = CpuEngine.nuclear_norm(&d, &opts).unwrap();
    let t_cpu = t.elapsed();
    let t = std::time::Instant::now();
    let gpu = g.nuclear_norm(&d, &opts).unwrap();
    let t_gpu = t.elapsed();
    let rel = (gpu - cpu).abs() / cpu;
    if bit_exact(g) {
        assert_eq!(gpu.to_bits(), cpu.to_bits(), "GPU {gpu} vs CPU {cpu}");
    }
    eprintln!(
        "{rows} x {cols} at {density} ({} entries): CPU {cpu:.6} in {t_cpu:.2?}, GPU {gpu:.6} \
         in {t_gpu:.2?}, relative difference {rel:.2e}",
        m.0.len()
    );
    assert!(rel < 1e-3, "GPU {gpu} vs CPU {cpu}: {rel}");
}

#[test]
fn gpu_nuclear_norm_matches_the_cpu_estimate() {
    let Some(mut g) = gpu() else { return };
    check_estimate(&mut g, 512, 1024, 0.05, 1);
    check_estimate(&mut g, 1024, 2752, 0.01, 2);
    assert!(g.allocated_bytes() <= g.gpu_mem());
}

/// `compress --trace-norm` through the library: the stored `T_m` is the host estimator's on the
/// kept entries whatever the engine, so the GPU engine's file holds the CPU engine's `T_m` to
/// the bit on any device (fused multiply-adds or not).
#[test]
fn compress_records_the_gpu_trace_norm() {
    let Some(mut g) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = llama_pair(safetensors::Dtype::F32, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &base, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &ft, 1);
    let opts = CompressOptions {
        force: true,
        trace_norm: true,
        ..Default::default()
    };
    let norm = |engine: &mut dyn Engine, name: &str| {
        let out = dir.path().join(name);
        compress(&base, std::slice::from_ref(&ft), &out, &opts, engine).unwrap();
        read_index(&out)["model"]["trace_norm"].as_f64().unwrap()
    };
    let cpu = norm(&mut CpuEngine, "cpu.udelta");
    let gpu = norm(&mut g, "gpu.udelta");
    eprintln!("compress --trace-norm: CPU T_m {cpu}, GPU T_m {gpu}");
    assert!(cpu > 0.0);
    assert_eq!(gpu.to_bits(), cpu.to_bits(), "{gpu} vs {cpu}");
}
