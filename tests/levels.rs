//! Every entry's level, from both engines, is the authors' level: the division form
//! `round_half_even(f32(f32(x - lo) / f32(hi - lo)) * (L - 1))` in f32, recomputed here. The
//! deltas are grid-valued (differences of f16 and bf16 weights), so many sit exactly on a
//! half-way point; the test also shows that the former multiplier rule
//! `round_half_even((x - lo) * k)` differs on them, so it would catch a return to it.

mod common;
use common::report_missing_gpu;
use udelta_gpu::algorithm::selection::TensorKey;
use udelta_gpu::algorithm::SelectionPlan;
use udelta_gpu::checkpoint::dtype::FloatType;
use udelta_gpu::engine::cpu::CpuEngine;
use udelta_gpu::engine::gpu::{AdapterChoice, GpuEngine, GpuOptions};
use udelta_gpu::engine::{DeltaInput, Engine};
use udelta_gpu::splitmix::mix64;

/// A synthetic fine-tune of `n` weights in `ty`: base ~ normal(0, 0.02), fine-tune = base +
/// normal(0, scale), both rounded to `ty`. Returns (base bytes, fine-tune bytes, deltas).
fn fine_tune(ty: FloatType, n: usize, seed: u64, scale: f64) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let u = |i: u64, s: u64| {
        ((mix64(i ^ s.wrapping_mul(0x9e37)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let normal =
        |i: u64, s: u64| (-2.0 * u(i, s).ln()).sqrt() * (std::f64::consts::TAU * u(i, s + 1)).cos();
    let base: Vec<f32> = (0..n as u64)
        .map(|i| (0.02 * normal(i, seed)) as f32)
        .collect();
    let ft: Vec<f32> = (base.iter().enumerate())
        .map(|(i, &b)| b + (scale * normal(i as u64, seed + 2)) as f32)
        .collect();
    let (mut bb, mut fb, mut bv, mut fv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    ty.encode_into(&base, &mut bb);
    ty.encode_into(&ft, &mut fb);
    ty.decode_into(&bb, &mut bv);
    ty.decode_into(&fb, &mut fv);
    let d = fv.iter().zip(&bv).map(|(f, b)| f - b).collect();
    (bb, fb, d)
}

/// The authors' levels of `d` at `bits`, in f32; and how many the multiplier rule gets wrong.
fn division_form(d: &[f32], bits: u32) -> (Vec<u8>, usize) {
    let lo = d.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let l1 = ((1u32 << bits) - 1) as f32;
    let k = (l1 as f64 / (hi as f64 - lo as f64)) as f32;
    let mut wrong = 0;
    let levels = d
        .iter()
        .map(|&x| {
            let level = ((x - lo) / (hi - lo) * l1).round_ties_even();
            wrong += (((x - lo) * k).round_ties_even().min(l1) != level) as usize;
            level as u8
        })
        .collect();
    (levels, wrong)
}

/// Every entry's level from `engine` (nothing pruned at rate 0).
fn engine_levels(engine: &mut dyn Engine, input: &DeltaInput, bits: u32) -> Vec<u8> {
    let stats = engine.analyze(input, bits).unwrap();
    let plan = SelectionPlan::new(TensorKey::new(7, "m", "levels"), &stats, 0.0);
    let kept = engine.select(input, &stats, &plan).unwrap();
    assert!(kept.positions.iter().copied().eq(0..input.numel() as u32));
    kept.levels
}

fn gpu() -> Option<GpuEngine> {
    let opts = GpuOptions {
        adapter: AdapterChoice::Auto,
        gpu_mem: 1 << 28,
        chunk_elements: None,
        fault: None,
    };
    match GpuEngine::new(opts) {
        Ok(e) => Some(e),
        Err(e) => {
            report_missing_gpu(&format!("no usable GPU adapter: {e}"));
            None
        }
    }
}

#[test]
fn both_engines_give_the_authors_level_of_every_entry() {
    let mut g = gpu();
    let (mut moved_bf16, mut moved_f16) = (0, 0);
    for (ty, scale) in [
        (FloatType::BF16, 1e-3),
        (FloatType::BF16, 2e-4),
        (FloatType::F16, 1e-3),
        (FloatType::F16, 1e-4),
        (FloatType::F32, 1e-3),
    ] {
        let n = 65_536;
        let (b, f, d) = fine_tune(ty, n, 11, scale);
        let input = DeltaInput::new(&b, ty, &f, ty, n);
        for bits in [2, 4, 8] {
            let (want, moved) = division_form(&d, bits);
            match ty {
                FloatType::BF16 => moved_bf16 += moved,
                FloatType::F16 => moved_f16 += moved,
                FloatType::F32 => {}
            }
            let what = format!("{ty:?} scale {scale}, {bits} bits ({moved} ties moved)");
            eprintln!("{what}");
            assert!(
                engine_levels(&mut CpuEngine, &input, bits) == want,
                "cpu: {what}"
            );
            if let Some(g) = g.as_mut() {
                assert!(engine_levels(g, &input, bits) == want, "gpu: {what}");
            }
        }
    }
    if let Some(g) = g {
        assert_eq!(g.cpu_fallbacks(), 0);
    }
    // The grid-valued deltas do hit ties where the multiplier rule differs.
    assert!(moved_bf16 > 0 && moved_f16 > 0, "{moved_bf16} {moved_f16}");
}

/// A span whose `hi - lo` overflows f32 has no normal multiplier: the CPU engine finds each
/// level among the boundaries, the GPU engine leaves the tensor to it, and the levels are
/// monotone in the delta from 0 to `L - 1`.
#[test]
fn an_overflowing_span_goes_to_the_exact_search() {
    let ft: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 6e35).collect();
    let base = vec![0.0f32; ft.len()];
    let (mut b, mut f) = (Vec::new(), Vec::new());
    FloatType::F32.encode_into(&base, &mut b);
    FloatType::F32.encode_into(&ft, &mut f);
    let input = DeltaInput::new(&b, FloatType::F32, &f, FloatType::F32, ft.len());
    let cpu = engine_levels(&mut CpuEngine, &input, 4);
    assert!(cpu.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!((cpu[0], cpu[999], cpu[500]), (0, 15, 8));
    if let Some(mut g) = gpu() {
        assert_eq!(engine_levels(&mut g, &input, 4), cpu);
        assert!(g.cpu_fallbacks() > 0);
    }
}
