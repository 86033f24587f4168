//! The GPU engine returns exactly what the CPU reference engine returns: stats (lo/hi bit for
//! bit, histogram) and kept entries, on odd sizes, across chunk boundaries, for every dtype and
//! mixed dtypes, bit widths 1..8, degenerate tensors, non-finite deltas, subnormals, and under a
//! small device-memory cap. Where no adapter exists the tests say loudly that they did not run;
//! with `CI=true` that is a failure (CI runs them on lavapipe).

mod common;
use common::report_missing_gpu;
use std::sync::Mutex;
use udelta_gpu::algorithm::selection::TensorKey;
use udelta_gpu::algorithm::{SelectionPlan, TensorStats};
use udelta_gpu::checkpoint::dtype::FloatType;
use udelta_gpu::engine::cpu::CpuEngine;
use udelta_gpu::engine::gpu::{list_adapters, AdapterChoice, GpuEngine, GpuOptions};
use udelta_gpu::engine::{create, DeltaInput, Engine, EngineError};

use FloatType::{BF16, F16, F32};

/// Serializes engine creation with the test that changes `WGPU_ADAPTER_NAME`.
static ENV: Mutex<()> = Mutex::new(());

/// The GPU engine, or `None` (after a loud message) where there is no adapter; with `CI=true`
/// a missing adapter fails the test.
fn gpu(opts: GpuOptions) -> Option<GpuEngine> {
    let r = {
        let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
        GpuEngine::new(opts)
    };
    match r {
        Ok(e) => Some(e),
        Err(e) => {
            report_missing_gpu(&format!("no usable GPU adapter: {e}"));
            None
        }
    }
}

fn opts(gpu_mem: u64, chunk: Option<usize>) -> GpuOptions {
    GpuOptions {
        adapter: AdapterChoice::Auto,
        gpu_mem,
        chunk_elements: chunk,
        fault: None,
    }
}

/// The crate's SplitMix64 stream, with the distributions these tests need.
struct Rng(udelta_gpu::splitmix::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(udelta_gpu::splitmix::SplitMix64(seed))
    }
    /// Uniform in (0, 1) (never 0, so its logarithm is finite).
    fn unit(&mut self) -> f64 {
        self.0.unit() + 0.5 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
    /// Heavy-tailed: a normal divided by a random scale, occasionally a large outlier.
    fn heavy(&mut self) -> f64 {
        let x = self.normal() / (0.2 + self.unit());
        if self.unit() < 0.002 {
            x * 50.0
        } else {
            x
        }
    }
}

/// A tensor pair as raw bytes.
struct Pair {
    base: Vec<u8>,
    bt: FloatType,
    ft: Vec<u8>,
    ftt: FloatType,
    n: usize,
}

impl Pair {
    fn from_values(base: &[f32], bt: FloatType, ft: &[f32], ftt: FloatType) -> Pair {
        let (mut b, mut f) = (Vec::new(), Vec::new());
        bt.encode_into(base, &mut b);
        ftt.encode_into(ft, &mut f);
        Pair {
            base: b,
            bt,
            ft: f,
            ftt,
            n: base.len(),
        }
    }

    /// Base weights ~ N(0, 0.02), fine-tuned = base + heavy-tailed delta ~ 1e-3.
    fn random(n: usize, bt: FloatType, ftt: FloatType, seed: u64) -> Pair {
        let mut r = Rng::new(seed);
        let base: Vec<f32> = (0..n).map(|_| (r.normal() * 0.02) as f32).collect();
        let ft: Vec<f32> = base
            .iter()
            .map(|&b| b + (r.heavy() * 1e-3) as f32)
            .collect();
        Pair::from_values(&base, bt, &ft, ftt)
    }

    fn input(&self) -> DeltaInput<'_> {
        DeltaInput::new(&self.base, self.bt, &self.ft, self.ftt, self.n)
    }
}

fn assert_same_stats(got: &TensorStats, want: &TensorStats, what: &str) {
    assert_eq!(
        got.grid.lo.to_bits(),
        want.grid.lo.to_bits(),
        "{what}: lo {} vs {}",
        got.grid.lo,
        want.grid.lo
    );
    assert_eq!(
        got.grid.hi.to_bits(),
        want.grid.hi.to_bits(),
        "{what}: hi {} vs {}",
        got.grid.hi,
        want.grid.hi
    );
    assert_eq!(got.grid.bits, want.grid.bits, "{what}");
    assert_eq!(got.histogram, want.histogram, "{what}: histogram");
}

/// Analyze and select at each rate on both engines; everything must be identical.
fn check(g: &mut GpuEngine, p: &Pair, bits: u32, rates: &[f64], what: &str) {
    let input = p.input();
    let want = CpuEngine.analyze(&input, bits).unwrap();
    let got = g
        .analyze(&input, bits)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_same_stats(&got, &want, what);
    for &rate in rates {
        let key = TensorKey::new(rate.to_bits(), "model", what);
        let plan = SelectionPlan::new(key, &want, rate);
        let cpu = CpuEngine.select(&input, &want, &plan).unwrap();
        let kept = g
            .select(&input, &want, &plan)
            .unwrap_or_else(|e| panic!("{what} rate {rate}: {e}"));
        assert_eq!(
            kept.positions.len(),
            cpu.positions.len(),
            "{what} rate {rate}: kept count"
        );
        assert!(kept == cpu, "{what} rate {rate}: kept entries differ");
    }
    assert!(
        g.peak_allocated_bytes() <= g.gpu_mem(),
        "{what}: peak {} > {}",
        g.peak_allocated_bytes(),
        g.gpu_mem()
    );
}

const RATES: [f64; 3] = [0.5, 0.95, 0.99];
const PAIRS: [(FloatType, FloatType); 6] = [
    (F32, F32),
    (F16, F16),
    (BF16, BF16),
    (F16, F32),
    (BF16, F16),
    (F32, BF16),
];

#[test]
fn odd_sizes_every_dtype() {
    let Some(mut g) = gpu(opts(1 << 30, None)) else {
        return;
    };
    eprintln!("engine: {}", g.name());
    for (i, &n) in [1usize, 7, 1000, 65_537, 300_001].iter().enumerate() {
        for (j, &(bt, ftt)) in PAIRS.iter().enumerate() {
            if n > 100_000 && (i + j) % 2 == 1 {
                continue; // lavapipe is slow: every dtype pair, not every size
            }
            let p = Pair::random(n, bt, ftt, (i * 10 + j) as u64);
            check(&mut g, &p, 4, &RATES, &format!("n={n} {bt:?}/{ftt:?}"));
        }
    }
    assert_eq!(g.cpu_fallbacks(), 0);
}

#[test]
fn tiny_chunks_cross_boundaries() {
    let Some(mut g) = gpu(opts(1 << 30, Some(4096))) else {
        return;
    };
    assert_eq!(g.chunk_elements(4), 4096);
    for (i, &n) in [4095usize, 4096, 4097, 65_537, 300_001].iter().enumerate() {
        let (bt, ftt) = PAIRS[i % PAIRS.len()];
        let p = Pair::random(n, bt, ftt, 100 + i as u64);
        check(
            &mut g,
            &p,
            4,
            &RATES,
            &format!("chunked n={n} {bt:?}/{ftt:?}"),
        );
    }
    // An odd chunk override is rounded up to whole tiles.
    let Some(mut g) = gpu(opts(1 << 30, Some(3000))) else {
        return;
    };
    assert_eq!(g.chunk_elements(4), 3072);
    check(
        &mut g,
        &Pair::random(10_001, F16, BF16, 7),
        4,
        &RATES,
        "chunk 3072",
    );
    assert_eq!(g.cpu_fallbacks(), 0);
}

#[test]
fn bit_widths_1_to_8() {
    let Some(mut g) = gpu(opts(1 << 30, None)) else {
        return;
    };
    let Some(mut gc) = gpu(opts(1 << 30, Some(8192))) else {
        return;
    };
    for bits in [1, 2, 4, 8] {
        let p = Pair::random(100_003, F16, F16, 200 + bits as u64);
        check(&mut g, &p, bits, &RATES, &format!("{bits} bits"));
        check(&mut gc, &p, bits, &[0.95], &format!("{bits} bits, chunked"));
    }
}

#[test]
fn degenerate_tensors() {
    let Some(mut g) = gpu(opts(1 << 30, Some(4096))) else {
        return;
    };
    let mut r = Rng::new(5);
    let base: Vec<f32> = (0..20_000).map(|_| (r.normal() * 0.02) as f32).collect();
    // All-zero delta: one level, every entry dequantizes to zero, nothing kept.
    for ty in [F32, F16, BF16] {
        check(
            &mut g,
            &Pair::from_values(&base, ty, &base, ty),
            4,
            &RATES,
            &format!("zero delta {ty:?}"),
        );
    }
    // Constant delta: lo == hi, k = 0.
    let b: Vec<f32> = (0..9_999).map(|i| (i % 64) as f32 / 8.0).collect();
    let f: Vec<f32> = b.iter().map(|x| x + 0.5).collect();
    check(
        &mut g,
        &Pair::from_values(&b, F32, &f, F32),
        4,
        &RATES,
        "constant delta",
    );
    check(
        &mut g,
        &Pair::from_values(&b, F16, &f, BF16),
        8,
        &RATES,
        "constant delta, mixed",
    );
    // One element, and a one-element negative delta.
    check(
        &mut g,
        &Pair::from_values(&[1.0], F32, &[1.25], F32),
        4,
        &RATES,
        "one element",
    );
    check(
        &mut g,
        &Pair::from_values(&[0.5], F16, &[-0.25], F16),
        1,
        &RATES,
        "one element, negative",
    );
    // Exact ties: deltas on a half-integer grid from 0 to 15, so k = 1 and x.5 rounds to even.
    let b = vec![0.0f32; 5_001];
    let f: Vec<f32> = (0..5_001).map(|i| (i % 31) as f32 * 0.5).collect();
    let p = Pair::from_values(&b, F32, &f, F32);
    let st = CpuEngine.analyze(&p.input(), 4).unwrap();
    assert_eq!(
        (st.grid.lo, st.grid.hi, st.grid.multiplier()),
        (0.0, 15.0, 1.0)
    );
    check(&mut g, &p, 4, &RATES, "round half to even");
    // -0.0 deltas (0 - 0 and -0 - 0): lo and hi are +0.0.
    let b = vec![0.0f32, -0.0, 0.0, 1.0];
    let f = vec![-0.0f32, -0.0, 0.0, 1.0];
    check(
        &mut g,
        &Pair::from_values(&b, F32, &f, F32),
        4,
        &RATES,
        "signed zeros",
    );
    // Empty tensor.
    let p = Pair::from_values(&[], F16, &[], F16);
    let st = g.analyze(&p.input(), 4).unwrap();
    assert_eq!(st, CpuEngine.analyze(&p.input(), 4).unwrap());
    let plan = SelectionPlan::new(TensorKey::new(1, "m", "e"), &st, 0.9);
    assert_eq!(
        g.select(&p.input(), &st, &plan).unwrap(),
        Default::default()
    );
    assert_eq!(g.cpu_fallbacks(), 0);
}

fn non_finite_index(r: Result<TensorStats, EngineError>) -> (u64, u32, u32) {
    match r {
        Err(EngineError::NonFinite {
            index,
            base,
            finetuned,
        }) => (index, base.to_bits(), finetuned.to_bits()),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn non_finite_deltas_name_the_lowest_index() {
    let Some(mut g) = gpu(opts(1 << 30, None)) else {
        return;
    };
    let Some(mut gc) = gpu(opts(1 << 30, Some(4096))) else {
        return;
    };
    let p = Pair::random(100_000, F32, F32, 9);
    let mut cases = Vec::new();
    // NaN then Inf in the fine-tuned tensor.
    let mut ft = p.ft.clone();
    ft[4 * 90_000..4 * 90_001].copy_from_slice(&f32::INFINITY.to_le_bytes());
    ft[4 * 70_000..4 * 70_001].copy_from_slice(&f32::NAN.to_le_bytes());
    cases.push((
        "nan",
        Pair {
            ft,
            ..Pair::random(100_000, F32, F32, 9)
        },
    ));
    // Overflow of finite values: 3e38 - (-3e38).
    let mut base = p.base.clone();
    let mut ft = p.ft.clone();
    base[4 * 12_345..4 * 12_346].copy_from_slice(&(-3e38f32).to_le_bytes());
    ft[4 * 12_345..4 * 12_346].copy_from_slice(&3e38f32.to_le_bytes());
    ft[4 * 50_000..4 * 50_001].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    cases.push((
        "overflow",
        Pair {
            base,
            ft,
            bt: F32,
            ftt: F32,
            n: 100_000,
        },
    ));
    // f16 infinity in the base, bf16 NaN in the fine-tuned tensor, in a later chunk.
    let q = Pair::random(30_000, F16, BF16, 10);
    let (mut base, mut ft) = (q.base.clone(), q.ft.clone());
    base[2 * 29_999..2 * 30_000].copy_from_slice(&0x7c00u16.to_le_bytes());
    ft[2 * 20_001..2 * 20_002].copy_from_slice(&0x7fc1u16.to_le_bytes());
    cases.push(("half", Pair { base, ft, ..q }));
    for (what, p) in &cases {
        let want = non_finite_index(CpuEngine.analyze(&p.input(), 4));
        assert_eq!(non_finite_index(g.analyze(&p.input(), 4)), want, "{what}");
        assert_eq!(
            non_finite_index(gc.analyze(&p.input(), 4)),
            want,
            "{what}, chunked"
        );
    }
    // The engines still work afterwards.
    check(
        &mut gc,
        &Pair::random(10_000, F32, F32, 11),
        4,
        &[0.9],
        "after errors",
    );
}

#[test]
fn subnormals_are_exact() {
    let Some(mut g) = gpu(opts(1 << 30, Some(4096))) else {
        return;
    };
    // f16 subnormals are decoded exactly on the device: no fallback.
    let mut r = Rng::new(12);
    let base: Vec<f32> = (0..20_000).map(|_| (r.normal() * 3e-5) as f32).collect();
    let ft: Vec<f32> = base
        .iter()
        .map(|&b| b + (r.heavy() * 1e-5) as f32)
        .collect();
    let p = Pair::from_values(&base, F16, &ft, F16);
    assert!(
        p.base
            .chunks(2)
            .any(|c| c[1] & 0x7c == 0 && c != [0, 0] && c != [0, 0x80]),
        "no f16 subnormals"
    );
    check(&mut g, &p, 4, &RATES, "f16 subnormals");
    assert_eq!(g.cpu_fallbacks(), 0);
    // bf16 / f32 subnormal inputs, and a subnormal difference of normal values: handed to the
    // CPU engine (a device may flush denormals), still identical.
    let base: Vec<f32> = (0..10_000)
        .map(|i| {
            if i % 7 == 0 {
                1e-39
            } else {
                (r.normal() * 0.02) as f32
            }
        })
        .collect();
    let ft: Vec<f32> = base.iter().map(|&b| b + 1e-3).collect();
    check(
        &mut g,
        &Pair::from_values(&base, BF16, &ft, BF16),
        4,
        &[0.9],
        "bf16 subnormals",
    );
    let mut base: Vec<f32> = (0..10_000).map(|_| (r.normal() * 0.02) as f32).collect();
    let mut ft: Vec<f32> = base.iter().map(|&b| b + 1e-3).collect();
    base[6_000] = 1.5e-38;
    ft[6_000] = 1.2e-38;
    check(
        &mut g,
        &Pair::from_values(&base, F32, &ft, F32),
        4,
        &[0.9],
        "subnormal difference",
    );
    assert!(g.cpu_fallbacks() >= 2, "fallbacks {}", g.cpu_fallbacks());
}

#[test]
fn memory_stays_under_a_small_cap() {
    // 8 MiB cap, a tensor of 12 MB of inputs: chunked, levels resident.
    let cap = 8 << 20;
    let Some(mut g) = gpu(opts(cap, None)) else {
        return;
    };
    let p = Pair::random(1_500_000, F32, F32, 13);
    assert!(g.chunk_elements(4) < p.n, "chunk {}", g.chunk_elements(4));
    check(&mut g, &p, 4, &[0.95], "8 MiB cap, 4 bits");
    let peak4 = g.peak_allocated_bytes();
    // 8 bits needs a 4 MiB bucket histogram: another layout, same cap.
    check(
        &mut g,
        &Pair::random(600_000, BF16, F16, 14),
        8,
        &[0.95],
        "8 MiB cap, 8 bits",
    );
    assert!(g.peak_allocated_bytes() <= cap && peak4 <= cap);
    eprintln!(
        "8 MiB cap: peak {} bytes, chunk {} (4 bits) / {} (8 bits)",
        g.peak_allocated_bytes(),
        g.chunk_elements(4),
        g.chunk_elements(8)
    );
    // 1 MiB cap: the levels of the tensor do not fit either and go through the host.
    let cap = 1 << 20;
    let Some(mut g) = gpu(opts(cap, None)) else {
        return;
    };
    let p = Pair::random(524_288, F16, F32, 15);
    assert!(g.level_capacity(4) < p.n, "levels would stay resident");
    check(&mut g, &p, 4, &RATES, "1 MiB cap, levels spilled");
    assert!(g.peak_allocated_bytes() <= cap);
    // A budget too small for 8-bit tensors is an error, not an overrun.
    let err = g.analyze(&p.input(), 8).unwrap_err();
    assert!(
        matches!(err, EngineError::Gpu(ref m) if m.contains("too small")),
        "{err}"
    );
    assert!(g.peak_allocated_bytes() <= cap);
}

#[test]
fn pool_is_reused_tensor_after_tensor() {
    let Some(mut g) = gpu(opts(32 << 20, Some(65_536))) else {
        return;
    };
    check(
        &mut g,
        &Pair::random(200_000, F16, F16, 16),
        4,
        &[0.95],
        "first",
    );
    let after_first = g.allocated_bytes();
    for (i, n) in [1000usize, 150_000, 3, 77_777].into_iter().enumerate() {
        check(
            &mut g,
            &Pair::random(n, BF16, BF16, 17 + i as u64),
            4,
            &[0.95],
            &format!("tensor {i}"),
        );
        assert!(g.allocated_bytes() <= after_first.max(g.gpu_mem()));
    }
    assert_eq!(g.allocated_bytes(), after_first, "buffers were reallocated");
}

#[test]
fn adapters_and_create() {
    let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let adapters = list_adapters();
    for a in &adapters {
        eprintln!("adapter: {a:?}");
    }
    assert!(create("cpu", 1 << 30).unwrap().name().starts_with("cpu"));
    assert!(create("bogus", 1 << 30).is_err());
    let auto = create("auto", 1 << 30).unwrap();
    eprintln!("auto: {}", auto.name());
    let vulkan = adapters
        .iter()
        .any(|a| a.backend == "Vulkan" && a.compute_shaders);
    match create("vulkan", 1 << 30) {
        Ok(e) => assert!(vulkan && e.name().contains("Vulkan"), "{}", e.name()),
        Err(e) => assert!(!vulkan, "{e}"),
    }
    if !adapters.iter().any(|a| a.backend == "Metal") {
        let e = create("metal", 1 << 30)
            .err()
            .expect("no Metal adapter here")
            .to_string();
        assert!(
            e.contains("Metal") && (e.contains("found") || e.contains("no adapters")),
            "{e}"
        );
    }
    // WGPU_ADAPTER_NAME narrows the choice; matching nothing, auto falls back to the CPU.
    std::env::set_var("WGPU_ADAPTER_NAME", "no-such-adapter-4711");
    let e = GpuEngine::new(GpuOptions::default())
        .err()
        .map(|e| e.to_string());
    let fallback = create("auto", 1 << 30).unwrap().name();
    std::env::remove_var("WGPU_ADAPTER_NAME");
    let e = e.expect("an adapter matched a name that none has");
    assert!(e.contains("no-such-adapter-4711"), "{e}");
    assert!(fallback.starts_with("cpu"), "{fallback}");
    if let Some(a) = adapters.iter().find(|a| a.compute_shaders) {
        let part = a.name.to_uppercase();
        std::env::set_var("WGPU_ADAPTER_NAME", &part[..part.len().min(6)]);
        let r = GpuEngine::new(GpuOptions::default());
        std::env::remove_var("WGPU_ADAPTER_NAME");
        assert!(
            r.is_ok(),
            "case-insensitive name match failed: {:?}",
            r.err()
        );
    }
}

/// `compress`'s pass 1 on the device (`start_analysis` / `finish_analysis`): the statistics and
/// every packed level equal the CPU engine's, with the next tensor started before the previous
/// one is finished, across chunk boundaries, for every dtype pair in turn (a change of element
/// sizes replans the stream's buffers while one tensor is in flight).
#[test]
fn streamed_analyses_in_flight_equal_the_cpu_engine() {
    for chunk in [None, Some(4096)] {
        let Some(mut g) = gpu(opts(64 << 20, chunk)) else {
            return;
        };
        let pairs: Vec<Pair> = PAIRS
            .iter()
            .chain(&PAIRS[..2])
            .enumerate()
            .map(|(i, &(bt, ftt))| Pair::random([10_001, 3, 70_001][i % 3], bt, ftt, 40 + i as u64))
            .collect();
        let mut earlier = None;
        for (i, p) in pairs.iter().enumerate() {
            let ticket = g.start_analysis(&p.input(), 4).unwrap();
            assert!(!ticket.is_ready(), "pair {i} did not go to the device");
            if let Some((j, t)) = earlier.replace((i, ticket)) {
                let q: &Pair = &pairs[j];
                let got = g.finish_analysis(t, &q.input()).unwrap();
                let want = CpuEngine.analyze_levels(&q.input(), 4).unwrap();
                assert_same_stats(&got.0, &want.0, &format!("pair {j}, chunk {chunk:?}"));
                assert!(got.1 == want.1, "pair {j}, chunk {chunk:?}: levels differ");
            }
        }
        let (j, t) = earlier.unwrap();
        let last = g.finish_analysis(t, &pairs[j].input()).unwrap();
        assert!(last == CpuEngine.analyze_levels(&pairs[j].input(), 4).unwrap());
        assert_eq!(g.cpu_fallbacks(), 0);
        assert!(g.peak_allocated_bytes() <= g.gpu_mem());
    }
}

/// Bytes `len` input bytes occupy in a copy between buffers (whole words).
fn padded(len: usize) -> u64 {
    len.next_multiple_of(4) as u64
}

/// Uploads of the stream are each input at its own element size (odd f16 tensors padded to a
/// word), the statistics' initial words and one uniform block per chunk; one map of 32 bytes
/// and one blocking wait per one-chunk tensor, with tensors in flight two at a time.
#[test]
fn streamed_uploads_and_waits_are_counted_exactly() {
    use udelta_gpu::engine::gpu::constants::{stat, Params};
    let Some(mut g) = gpu(opts(64 << 20, None)) else {
        return;
    };
    let params = std::mem::size_of::<Params>() as u64;
    let stats_init = (stat::WORDS * 4) as u64;
    let pairs: Vec<Pair> = [(F16, F16), (BF16, BF16), (F16, F16), (BF16, BF16)]
        .iter()
        .enumerate()
        .map(|(i, &(bt, ftt))| Pair::random(10_001 + 2 * i, bt, ftt, 60 + i as u64))
        .collect();
    let before = g.counters();
    let mut earlier: Option<(usize, udelta_gpu::engine::AnalysisTicket)> = None;
    for (i, p) in pairs.iter().enumerate() {
        let ticket = g.start_analysis(&p.input(), 4).unwrap();
        if let Some((j, t)) = earlier.replace((i, ticket)) {
            g.finish_analysis(t, &pairs[j].input()).unwrap();
        }
    }
    let (j, t) = earlier.unwrap();
    g.finish_analysis(t, &pairs[j].input()).unwrap();
    let after = g.counters();
    // 10,001 two-byte elements: 20,002 bytes, copied as 20,004.
    let inputs: u64 = pairs
        .iter()
        .map(|p| padded(p.base.len()) + padded(p.ft.len()))
        .sum();
    assert_eq!(padded(pairs[0].base.len()), 20_004);
    let n = pairs.len() as u64;
    assert_eq!(
        after.bytes_uploaded - before.bytes_uploaded,
        inputs + n * (stats_init + params)
    );
    assert_eq!(
        after.bytes_read_back - before.bytes_read_back,
        n * stats_init
    );
    assert_eq!(after.blocking_waits - before.blocking_waits, n);
    // Every tensor but the first went to the device before the one before it was read.
    assert_eq!(after.overlapped_tensors - before.overlapped_tensors, n - 1);
}

/// A small `--gpu-mem` streams a large tensor in many chunks through the upload ring; the
/// budget holds, and a non-finite delta in a later chunk is named by its tensor index.
#[test]
fn streamed_analysis_under_a_small_cap() {
    let cap = 1 << 20;
    let Some(mut g) = gpu(opts(cap, None)) else {
        return;
    };
    let p = Pair::random(600_001, BF16, F16, 70);
    let got = g.analyze_levels(&p.input(), 4).unwrap();
    assert!(got == CpuEngine.analyze_levels(&p.input(), 4).unwrap());
    assert!(
        g.peak_allocated_bytes() <= cap,
        "{}",
        g.peak_allocated_bytes()
    );
    // More than one chunk: (2 + 2) bytes per element, three copies, fit 1 MiB below 100,000.
    assert!(g.counters().blocking_waits > 1);
    let mut base: Vec<f32> = (0..400_000).map(|i| (i % 13) as f32 * 0.01).collect();
    let ft: Vec<f32> = base.iter().map(|&b| b + 0.001).collect();
    base[345_678] = f32::INFINITY;
    let bad = Pair::from_values(&base, F16, &ft, F16);
    let e = g.analyze_levels(&bad.input(), 4).unwrap_err();
    let cpu = CpuEngine.analyze_levels(&bad.input(), 4).unwrap_err();
    assert_eq!(e.to_string(), cpu.to_string());
    assert!(e.to_string().contains("element 345678"), "{e}");
}
