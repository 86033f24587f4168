//! Nuclear-norm estimator timings on UltraDelta-like sparse deltas (16 quantized levels times a
//! scale, uniformly random positions): 1024 x 2752, 4096 x 4096 and 4096 x 11008 at 5 %
//! density (the last is the LLaMA-7B MLP shape, 2.25 M kept entries; target <= 2 s on 2 cores).
//! Each measurement is the whole `nuclear_norm` call, including building the CSC copy; the
//! values come as codes into the table of the 16 level values, as `compress` passes them.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use udelta_gpu::tracenorm::{nuclear_norm, DeltaValues, EstimatorOptions, SparseDelta};

use udelta_gpu::splitmix::mix64;

/// Uniformly random positions at `density`, and their levels from a rounded Laplace variable (so
/// their histogram is peaked, as in real deltas); level `q` has the value
/// `scale * (q / 15 * (hi - lo) + lo)` (the returned table).
fn quantized_delta(
    rows: usize,
    cols: usize,
    density: f64,
    seed: u64,
) -> (Vec<u32>, Vec<u8>, Vec<f32>) {
    let threshold = (density * u64::MAX as f64) as u64;
    let (lo, hi) = (-0.01f64, 0.012f64);
    let scale = 1.0 / density;
    let mut pos = Vec::new();
    let mut codes = Vec::new();
    for i in 0..(rows * cols) as u64 {
        let h = mix64(seed ^ i);
        if h < threshold {
            let u = (mix64(h) >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let lap = -u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln() * 1e-3;
            let q = ((lap - lo) / (hi - lo) * 15.0).round().clamp(0.0, 15.0);
            pos.push(i as u32);
            codes.push(q as u8);
        }
    }
    let table = (0..16)
        .map(|q| ((q as f64 / 15.0 * (hi - lo) + lo) * scale) as f32)
        .collect();
    (pos, codes, table)
}

fn bench(c: &mut Criterion) {
    let opts = EstimatorOptions::default();
    let mut group = c.benchmark_group("tracenorm");
    group.sample_size(10);
    for &(rows, cols) in &[(1024usize, 2752usize), (4096, 4096), (4096, 11008)] {
        let (pos, codes, table) = quantized_delta(rows, cols, 0.05, 42);
        let d = SparseDelta {
            rows,
            cols,
            positions: &pos,
            values: DeltaValues::Coded {
                codes: &codes,
                table: &table,
            },
        };
        let name = format!("nuclear_norm {rows}x{cols} 5% ({} nnz)", pos.len());
        eprintln!("{name}: estimate {:.6e}", nuclear_norm(&d, &opts));
        group.bench_function(&name, |b| b.iter(|| nuclear_norm(black_box(&d), &opts)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
