//! Per-stage throughput of the compression pipeline on one LLaMA-7B MLP-shaped tensor
//! (11008 x 4096 = 45 M elements, f16, heavy-tailed delta): CPU engine pass 1 (`analyze`),
//! pass 2 (`select`) on the CPU engine and on the GPU engine (adapter from
//! `UDELTA_BENCH_ADAPTER`, default vulkan, `none` to skip), and the entropy coder (encode, decode) of its kept
//! entries at s = 0.95.
//! Run: `cargo bench --bench stages`. Figures are elements (or kept entries) per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use udelta_gpu::algorithm::{SelectionPlan, TensorKey};
use udelta_gpu::checkpoint::dtype::FloatType;
use udelta_gpu::codec;
use udelta_gpu::engine::{cpu::CpuEngine, DeltaInput, Engine};

use udelta_gpu::splitmix::mix64;

/// Base ~ uniform(-0.05, 0.05), fine-tune = base + Laplace(1e-3), both rounded to f16.
fn pair(n: usize) -> (Vec<u8>, Vec<u8>) {
    let u = |i: u64, s: u64| (mix64(i ^ s) >> 11) as f64 / (1u64 << 53) as f64;
    let base: Vec<f32> = (0..n as u64)
        .map(|i| ((u(i, 1) - 0.5) * 0.1) as f32)
        .collect();
    let ft: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let v = u(i as u64, 2) - 0.5;
            b + (-v.signum() * (1.0 - 2.0 * v.abs()).max(1e-300).ln() * 1e-3) as f32
        })
        .collect();
    let (mut bb, mut fb) = (Vec::new(), Vec::new());
    FloatType::F16.encode_into(&base, &mut bb);
    FloatType::F16.encode_into(&ft, &mut fb);
    (bb, fb)
}

/// Times pass 1 and pass 2 of `engine` on `input` in the group `name`.
fn engine_stages(
    c: &mut Criterion,
    name: &str,
    engine: &mut dyn Engine,
    input: &DeltaInput,
    plan: &SelectionPlan,
) {
    let stats = engine.analyze(input, 4).unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .throughput(Throughput::Elements(input.numel() as u64));
    g.bench_function("analyze", |b| {
        b.iter(|| black_box(engine.analyze(input, 4).unwrap()))
    });
    g.bench_function("select", |b| {
        b.iter(|| black_box(engine.select(input, &stats, plan).unwrap()))
    });
    g.finish();
}

fn stages(c: &mut Criterion) {
    let n = 11008 * 4096;
    let (base, ft) = pair(n);
    let input = DeltaInput::new(&base, FloatType::F16, &ft, FloatType::F16, n);
    let stats = CpuEngine.analyze(&input, 4).unwrap();
    let plan = SelectionPlan::new(TensorKey::new(0, "bench", "w"), &stats, 0.95);
    let kept = CpuEngine.select(&input, &stats, &plan).unwrap();
    let counts = plan.kept_counts();
    let enc = codec::encode_tensor(n as u64, &kept.positions, &kept.levels, &counts).unwrap();

    engine_stages(
        c,
        "cpu_engine_11008x4096_f16",
        &mut CpuEngine,
        &input,
        &plan,
    );
    // The GPU engine on the adapter named by UDELTA_BENCH_ADAPTER (default vulkan; on a
    // machine with only lavapipe this measures the software rasterizer, not a GPU; `none`
    // skips it).
    let adapter = std::env::var("UDELTA_BENCH_ADAPTER").unwrap_or_else(|_| "vulkan".into());
    match (adapter != "none").then(|| udelta_gpu::engine::create(&adapter, 1 << 30)) {
        None => eprintln!("GPU stages skipped (UDELTA_BENCH_ADAPTER=none)"),
        Some(Ok(mut gpu)) => {
            eprintln!("GPU stages on {}", gpu.name());
            engine_stages(c, "gpu_engine_11008x4096_f16", gpu.as_mut(), &input, &plan);
        }
        Some(Err(e)) => eprintln!("GPU stages not run: --adapter {adapter}: {e}"),
    }

    let mut g = c.benchmark_group("codec_s0.95");
    g.sample_size(10)
        .throughput(Throughput::Elements(kept.positions.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            black_box(
                codec::encode_tensor(n as u64, &kept.positions, &kept.levels, &counts).unwrap(),
            )
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            black_box(
                codec::decode_tensor(n as u64, &counts, &enc.blocks, &enc.positions, &enc.levels)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
