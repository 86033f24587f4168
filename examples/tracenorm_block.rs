//! Per-matrix profile of the CPU nuclear-norm estimator on real compressed deltas: reads an f32
//! safetensors file of deltas (`udelta-gpu decompress --delta-only`), and for each 2-D tensor
//! times the operator build and the estimate separately and prints the work done. With a JSON
//! file of exact nuclear norms (`{"name": {"nuc": ...}}`, e.g. from PyTorch's `svdvals`) it
//! also prints each relative error and the error of the sum.
//!
//! `cargo run --release --example tracenorm_block -- DELTAS.safetensors [EXACT.json]`
//!
//! `UD_REPEAT=N` times each matrix N times and keeps the fastest build and estimate (the first
//! run also grows the reused workspace; inside `compress` it is warm after the first matrices).
//! Repeats find the matrix's data in the CPU caches, which `compress` does not: with
//! `UD_FLUSH=1` every run starts after writing 1 GiB of other memory, as in `compress`, where
//! gigabytes of checkpoint data stream through between two matrices.
//! `UD_PROBES`, `UD_DEFLATION_BLOCK`, `UD_DEFLATION_ITERS`, `UD_QUADRATURE_TOL`,
//! `UD_GAUSS_WEIGHT` and `UD_TARGET_SE` override the estimator options.

use std::time::Instant;
use udelta_gpu::tracenorm::{
    estimate_nuclear_norm_with_report, CpuSparseOperator, DeltaValues, EstimatorOptions,
    MatrixOperator, SparseDelta, SparseWorkspace,
};

/// The CPU operator, timing its products.
struct Timed<'a> {
    op: CpuSparseOperator<'a>,
    seconds: f64,
}

impl MatrixOperator for Timed<'_> {
    fn rows(&self) -> usize {
        self.op.rows()
    }
    fn cols(&self) -> usize {
        self.op.cols()
    }
    fn frobenius_norm_sq(&self) -> f64 {
        self.op.frobenius_norm_sq()
    }
    fn apply(&mut self, x: &[f32], y: &mut [f32], transpose: bool) {
        let t = Instant::now();
        self.op.apply(x, y, transpose);
        self.seconds += t.elapsed().as_secs_f64();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(&args[1]).expect("read deltas");
    let exact: Option<serde_json::Value> = args
        .get(2)
        .map(|p| serde_json::from_slice(&std::fs::read(p).expect("read exact")).expect("json"));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let opts = options_from_env();
    let repeats: usize = std::env::var("UD_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    eprintln!("{opts:?}, fastest of {repeats} run(s) per matrix");
    let mut workspace = SparseWorkspace::default();
    let mut flush = std::env::var("UD_FLUSH")
        .is_ok()
        .then(|| vec![0u8; 1 << 30]);
    let (mut total_build, mut total_est, mut sum_est, mut sum_exact) = (0.0, 0.0, 0.0, 0.0);
    for name in names {
        let t = st.tensor(&name).unwrap();
        if t.shape().len() != 2 || t.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        let vals: &[f32] = bytemuck::cast_slice(t.data());
        let (mut positions, mut values) = (Vec::new(), Vec::new());
        for (i, &v) in vals.iter().enumerate() {
            if v != 0.0 {
                positions.push(i as u32);
                values.push(v);
            }
        }
        // As inside `compress`: the values as codes into the table of the levels' values.
        let mut table: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        table.sort_unstable();
        table.dedup();
        let codes: Vec<u8> = values
            .iter()
            .map(|v| table.binary_search(&v.to_bits()).unwrap_or(0) as u8)
            .collect();
        let table: Vec<f32> = table.into_iter().map(f32::from_bits).collect();
        let delta = SparseDelta {
            rows,
            cols,
            positions: &positions,
            values: if table.len() <= 256 {
                DeltaValues::Coded {
                    codes: &codes,
                    table: &table,
                }
            } else {
                DeltaValues::F32(&values)
            },
        };
        // The fastest of `repeats` runs (the first one also grows the workspace).
        let (mut build, mut est, mut products) = (f64::INFINITY, f64::INFINITY, 0.0);
        let mut report = None;
        for _ in 0..repeats {
            if let Some(junk) = flush.as_mut() {
                evict_caches(junk);
            }
            // On a worker of the thread pool, as `tracenorm::nuclear_norm` runs.
            let ws = std::mem::take(&mut workspace);
            let (b, e, p, r, ws) = rayon::scope(|_| {
                let t0 = Instant::now();
                let mut op = Timed {
                    op: CpuSparseOperator::with_workspace(&delta, ws),
                    seconds: 0.0,
                };
                let b = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let r = estimate_nuclear_norm_with_report(&mut op, &opts);
                let e = t1.elapsed().as_secs_f64();
                (b, e, op.seconds, r, op.op.into_workspace())
            });
            build = build.min(b);
            if e < est {
                (est, products) = (e, p);
            }
            report = Some(r);
            workspace = ws;
        }
        let r = report.expect("at least one run");
        total_build += build;
        total_est += est;
        sum_est += r.value;
        let err = exact
            .as_ref()
            .and_then(|e| e[&name]["nuc"].as_f64())
            .map(|x| {
                sum_exact += x;
                format!("  err {:+.3} %", 100.0 * (r.value - x) / x)
            });
        println!(
            "{name} {rows}x{cols} nnz {}: build {:.1} ms, estimate {:.1} ms (products {:.1} ms), {} calls, {} vectors, {} probes, rank {}, se {:.2} %{}",
            positions.len(),
            build * 1e3,
            est * 1e3,
            products * 1e3,
            r.operator_calls,
            r.operator_vectors,
            r.probes,
            r.deflation_rank,
            100.0 * r.std_error / r.value,
            err.unwrap_or_default()
        );
    }
    println!(
        "total: build {:.1} ms, estimate {:.1} ms",
        total_build * 1e3,
        total_est * 1e3
    );
    if sum_exact > 0.0 {
        println!(
            "sum: estimate {sum_est:.2}, exact {sum_exact:.2}, error {:+.3} %",
            100.0 * (sum_est - sum_exact) / sum_exact
        );
    }
}

/// Writes every byte of `junk` (1 GiB), which pushes the matrices' data and the workspace out
/// of the CPU caches, as the checkpoint data streaming through `compress` between two matrices
/// does.
fn evict_caches(junk: &mut [u8]) {
    junk.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = b.wrapping_add(i as u8));
    std::hint::black_box(junk);
}

/// The default options, with any of `UD_PROBES`, `UD_DEFLATION_BLOCK`, `UD_DEFLATION_ITERS`,
/// `UD_QUADRATURE_TOL`, `UD_GAUSS_WEIGHT` and `UD_TARGET_SE` overriding the field of that name.
fn options_from_env() -> EstimatorOptions {
    fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }
    let d = EstimatorOptions::default();
    EstimatorOptions {
        probes: var("UD_PROBES").unwrap_or(d.probes),
        deflation_block: var("UD_DEFLATION_BLOCK").unwrap_or(d.deflation_block),
        deflation_iters: var("UD_DEFLATION_ITERS").unwrap_or(d.deflation_iters),
        quadrature_tol: var("UD_QUADRATURE_TOL").unwrap_or(d.quadrature_tol),
        gauss_weight: var("UD_GAUSS_WEIGHT").unwrap_or(d.gauss_weight),
        target_rel_std_error: var("UD_TARGET_SE").unwrap_or(d.target_rel_std_error),
        ..d
    }
}
