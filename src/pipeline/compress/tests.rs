//! Tests of the steps of `compress` (the whole command is tested end to end in `tests/`).

use super::allocate::allocate_plans;
use super::finish::gammas;
use super::model::{Analysis, Plan};
use super::open::validate_options;
use super::*;
use crate::algorithm::allocation::Group;
use crate::algorithm::{QuantGrid, SelectionPlan, TensorStats};
use crate::checkpoint::dtype::Dtype;
use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};
use crate::engine::{
    cpu::CpuEngine, AnalysisTicket, CandidateSet, DeltaInput, EngineError, KeptEntries,
    PackedLevels,
};
use crate::error::Error;

/// A compressed tensor (by the default selector), an unchanged norm, and a tensor only the
/// fine-tunes have.
const UP: &str = "model.layers.0.mlp.up_proj.weight";
const NORM: &str = "model.norm.weight";

/// Writes f32 tensors `(name, shape, values)` as one safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|(name, shape, _)| TensorHeader {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.clone(),
        })
        .collect();
    let mut w = SafetensorsWriter::create(path, &headers, None).unwrap();
    for (_, _, values) in tensors {
        w.write(bytemuck::cast_slice(values)).unwrap();
    }
    w.finish().unwrap();
}

/// A base and a fine-tune of it in `dir`: `UP` (8 x 16) changed everywhere, `NORM` unchanged.
/// `rows` is the fine-tune's row count of `UP` (8 matches the base).
fn checkpoints(dir: &Path, ft_name: &str, rows: usize) -> (PathBuf, PathBuf) {
    let base_up: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
    let ft_up: Vec<f32> = (0..rows * 16)
        .map(|i| base_up.get(i).copied().unwrap_or(0.0) + (i as f32 * 1.3).cos() * 0.01)
        .collect();
    let norm = vec![1.0f32; 16];
    let (base, ft) = (dir.join("base.safetensors"), dir.join(ft_name));
    write_f32(
        &base,
        &[(UP, vec![8, 16], base_up), (NORM, vec![16], norm.clone())],
    );
    write_f32(&ft, &[(UP, vec![rows, 16], ft_up), (NORM, vec![16], norm)]);
    (base, ft)
}

fn options() -> CompressOptions {
    CompressOptions::default()
}

/// Names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn every_bad_gamma_is_refused_and_a_good_one_accepted() {
    let ft = [PathBuf::from("ft")];
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::MAX] {
        let opts = CompressOptions {
            gamma: Some(bad),
            ..options()
        };
        let err = validate_options(&ft, &opts).unwrap_err().to_string();
        assert!(err.contains("--gamma"), "{err}");
    }
    let opts = CompressOptions {
        gamma: Some(0.5),
        ..options()
    };
    validate_options(&ft, &opts).unwrap();
}

/// The output's parent does not exist, which only staging finds out: an error about anything
/// else proves that the run stopped before it staged anything.
#[test]
fn a_bad_gamma_is_refused_before_any_output_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = checkpoints(dir.path(), "ft.safetensors", 8);
    let before = listing(dir.path());
    let opts = CompressOptions {
        gamma: Some(0.0),
        ..options()
    };
    for (fts, out) in [
        (vec![ft.clone()], dir.path().join("missing/x.udelta")),
        (
            vec![ft.clone(), base.clone()],
            dir.path().join("missing/out"),
        ),
    ] {
        let err = compress(&base, &fts, &out, &opts, &mut CpuEngine)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--gamma 0 must be"), "{err}");
    }
    assert_eq!(listing(dir.path()), before);
}

#[test]
fn a_bad_finetune_is_refused_before_any_output_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    let (base, good) = checkpoints(dir.path(), "good.safetensors", 8);
    // Fewer rows than the base: not a fine-tune of it.
    let (_, bad) = checkpoints(dir.path(), "bad.safetensors", 4);
    let out = dir.path().join("missing/out");
    let err = compress(&base, &[good, bad], &out, &options(), &mut CpuEngine)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains(UP) && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn compressing_writes_one_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = checkpoints(dir.path(), "ft.safetensors", 8);
    let out = dir.path().join("x.udelta");
    let done = compress(&base, &[ft], &out, &options(), &mut CpuEngine).unwrap();
    assert_eq!(done.files.len(), 1);
    assert_eq!(done.files[0].0, out);
    assert_eq!(done.files[0].1, std::fs::metadata(&out).unwrap().len());
    assert_eq!(
        listing(dir.path()),
        ["base.safetensors", "ft.safetensors", "x.udelta"]
    );
    let index = crate::format::UdeltaReader::open(&out).unwrap().index;
    let kinds: Vec<(&str, bool)> = index
        .tensors
        .iter()
        .map(|r| {
            let compressed = matches!(r.kind, crate::format::TensorKind::Compressed(_));
            (r.name.as_str(), compressed)
        })
        .collect();
    assert_eq!(kinds, [(UP, true), (NORM, false)]);
    assert!(matches!(
        index.tensors[1].kind,
        crate::format::TensorKind::Unchanged { .. }
    ));
}

/// A plan of a compressed tensor of `n` elements whose dequantized values are `-k` and `k`
/// in equal numbers (standard deviation `k`).
fn compressed_plan(n: u64, k: f32) -> Option<Plan> {
    let stats = TensorStats {
        grid: QuantGrid {
            lo: -k,
            hi: k,
            bits: 1,
        },
        histogram: vec![n / 2, n / 2],
    };
    Some(Plan::Compress(Analysis {
        base: 0,
        shared_numel: n as usize,
        stats,
        base_crc32: 0,
        allocation: None,
        kept: None,
        tail: Vec::new(),
    }))
}

#[test]
fn allocation_gives_each_compressed_plan_its_own_third() {
    let mut plans = vec![
        compressed_plan(100, 2.0),
        Some(Plan::Raw),
        compressed_plan(100, 3.0),
        Some(Plan::Unchanged { base_crc32: 7 }),
        compressed_plan(100, 1.0),
        None,
    ];
    let params = CompressParams {
        sparsity: 0.9,
        step: 0.02,
        ..Default::default()
    };
    allocate_plans(&mut plans, &[true; 5], &params);
    let got: Vec<Option<(Group, f64)>> = plans
        .iter()
        .map(|p| match p {
            Some(Plan::Compress(a)) => a.allocation.map(|x| (x.group, x.rate)),
            _ => None,
        })
        .collect();
    // Equal sizes: one tensor per third. Low 0.9 + 0.02, mid 0.9, and high the rest:
    // (0.9 * 300 - 0.9 * 100 - 0.92 * 100) / 100 = 0.88.
    let want = [
        Some((Group::Mid, 0.9)),
        None,
        Some((Group::High, 0.88)),
        None,
        Some((Group::Low, 0.92)),
        None,
    ];
    for (g, w) in got.iter().zip(&want) {
        match (g, w) {
            (Some((gg, gr)), Some((wg, wr))) => {
                assert_eq!(gg, wg);
                assert!((gr - wr).abs() < 1e-12, "{gr} vs {wr}");
            }
            _ => assert_eq!(g.is_none(), w.is_none(), "{got:?}"),
        }
    }
    assert!(matches!(plans[3], Some(Plan::Unchanged { base_crc32: 7 })));
}

#[test]
fn gamma_is_the_fixed_one_else_the_rule_else_one() {
    assert_eq!(gammas(Some(0.25), true, &[1.0, 4.0]).unwrap(), [0.25, 0.25]);
    assert_eq!(gammas(None, false, &[1.0, 4.0]).unwrap(), [1.0, 1.0]);
    let rule = crate::algorithm::rescale::gammas(&[1.0, 4.0]).unwrap();
    assert_eq!(gammas(None, true, &[1.0, 4.0]).unwrap(), rule);
}

/// The CPU engine under another name, wrong in pass 1 or in pass 2.
struct Skewed {
    wrong_selection: bool,
}

impl Engine for Skewed {
    fn name(&self) -> String {
        "skewed-test-engine".into()
    }
    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        let mut stats = CpuEngine.analyze(input, bits)?;
        if !self.wrong_selection {
            stats.histogram[0] += 1;
        }
        Ok(stats)
    }
    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        let mut kept = CpuEngine.select(input, stats, plan)?;
        if self.wrong_selection {
            kept.levels[0] ^= 1;
        }
        Ok(kept)
    }
    fn select_levels(
        &mut self,
        levels: &PackedLevels,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        let mut kept = CpuEngine.select_levels(levels, stats, plan)?;
        if self.wrong_selection {
            kept.levels[0] ^= 1;
        }
        Ok(kept)
    }
    fn select_candidates(
        &mut self,
        candidates: &CandidateSet,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        let mut kept = CpuEngine.select_candidates(candidates, plan)?;
        if self.wrong_selection {
            kept.levels[0] ^= 1;
        }
        Ok(kept)
    }
}

#[test]
fn a_verify_mismatch_names_the_engine_that_ran_not_the_gpu() {
    // At the default sparsity pass 2 selects from candidates, at 0.5 from every level.
    let cases = [(false, "statistics"), (true, "kept entries")];
    for ((wrong_selection, what), sparsity) in cases.into_iter().flat_map(|c| [(c, 0.95), (c, 0.5)])
    {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = checkpoints(dir.path(), "ft.safetensors", 8);
        let mut opts = CompressOptions {
            verify: true,
            ..options()
        };
        opts.params.sparsity = sparsity;
        let out = dir.path().join("x.udelta");
        let mut engine = Skewed { wrong_selection };
        let err = compress(&base, &[ft], &out, &opts, &mut engine).unwrap_err();
        assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
        let msg = err.to_string();
        for needle in ["ft.safetensors", UP, "--verify", what, "skewed-test-engine"] {
            assert!(msg.contains(needle), "'{needle}' missing from: {msg}");
        }
        assert!(!msg.contains("GPU"), "{msg}");
        assert!(!out.exists());
    }
}

#[test]
fn verify_passes_on_the_cpu_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = checkpoints(dir.path(), "ft.safetensors", 8);
    let opts = CompressOptions {
        verify: true,
        ..options()
    };
    compress(
        &base,
        &[ft],
        &dir.path().join("x.udelta"),
        &opts,
        &mut CpuEngine,
    )
    .unwrap();
}

/// The CPU engine with device-like nuclear norms: each estimate off by one part in 10^6, as a
/// GPU whose products fuse multiply and add could be.
struct FusedNorms;

impl Engine for FusedNorms {
    fn name(&self) -> String {
        "fused-norms-test-engine".into()
    }
    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        CpuEngine.analyze(input, bits)
    }
    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        CpuEngine.select(input, stats, plan)
    }
    fn nuclear_norm(
        &mut self,
        delta: &crate::tracenorm::SparseDelta,
        opts: &crate::tracenorm::EstimatorOptions,
    ) -> Result<f64, EngineError> {
        Ok(crate::tracenorm::nuclear_norm(delta, opts) * (1.0 + 1e-6))
    }
    fn nuclear_norm_on_host(&self) -> bool {
        false
    }
}

#[test]
fn the_stored_trace_norm_does_not_depend_on_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = checkpoints(dir.path(), "ft.safetensors", 8);
    let opts = CompressOptions {
        trace_norm: true,
        ..options()
    };
    let norm_with = |engine: &mut dyn Engine, name: &str| {
        let out = dir.path().join(name);
        compress(&base, std::slice::from_ref(&ft), &out, &opts, engine).unwrap();
        let index = crate::format::UdeltaReader::open(&out).unwrap().index;
        index.model.trace_norm.expect("--trace-norm stores T_m")
    };
    let cpu = norm_with(&mut CpuEngine, "cpu.udelta");
    let fused = norm_with(&mut FusedNorms, "fused.udelta");
    assert!(cpu > 0.0);
    assert_eq!(fused.to_bits(), cpu.to_bits(), "{fused} vs {cpu}");
}

/// The CPU engine with its pass 1 deferred as a device's is: `start_analysis` only records the
/// input's checksum and returns a ticket in flight; `finish_analysis` fails unless tickets are
/// finished in the order started, on the input they were started on.
#[derive(Default)]
struct Deferred {
    /// Tickets started and not finished: number and input checksum.
    started: std::collections::VecDeque<(u64, u32)>,
    next: u64,
    most_in_flight: usize,
    finished: u64,
}

fn checksum(input: &DeltaInput) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(input.base);
    h.update(input.finetuned);
    h.finalize()
}

impl Engine for Deferred {
    /// The CPU engine's name, so that the files can be compared whole.
    fn name(&self) -> String {
        CpuEngine.name()
    }
    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        CpuEngine.analyze(input, bits)
    }
    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        CpuEngine.select(input, stats, plan)
    }
    fn start_analysis(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<AnalysisTicket, EngineError> {
        self.started.push_back((self.next, checksum(input)));
        self.most_in_flight = self.most_in_flight.max(self.started.len());
        self.next += 1;
        Ok(AnalysisTicket::in_flight(self.next - 1, bits))
    }
    fn finish_analysis(
        &mut self,
        ticket: AnalysisTicket,
        input: &DeltaInput,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        let expected = self.started.pop_front();
        if expected != ticket.in_flight_id().map(|id| (id, checksum(input))) {
            return Err(EngineError::Inconsistent(format!(
                "finished {:?} on another input or out of order (expected {expected:?})",
                ticket.in_flight_id()
            )));
        }
        self.finished += 1;
        CpuEngine.analyze_levels(input, ticket.bits())
    }
}

#[test]
fn pass_1_keeps_one_analysis_in_flight_and_finishes_each_on_its_input() {
    let dir = tempfile::tempdir().unwrap();
    // Two layers of four compressed matrices each, and an unchanged norm between them.
    let names = ["q_proj", "k_proj", "up_proj", "down_proj"];
    let tensors = |shift: f32| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut t = Vec::new();
        for layer in 0..2 {
            for (i, name) in names.iter().enumerate() {
                let key = (layer * 4 + i) as f32;
                let values = (0..96)
                    .map(|j| (j as f32 * 0.37 + key).sin() + shift * (j as f32 * (1.3 + key)).cos())
                    .collect();
                let mlp = if name.ends_with("_proj") && i >= 2 {
                    "mlp"
                } else {
                    "self_attn"
                };
                t.push((
                    format!("model.layers.{layer}.{mlp}.{name}.weight"),
                    vec![8, 12],
                    values,
                ));
            }
            t.push((
                format!("model.layers.{layer}.input_layernorm.weight"),
                vec![12],
                vec![1.0; 12],
            ));
        }
        t
    };
    let write = |name: &str, shift: f32| {
        let path = dir.path().join(name);
        let t = tensors(shift);
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        write_f32(&path, &refs);
        path
    };
    let base = write("base.safetensors", 0.0);
    let fts = [
        write("ft-1.safetensors", 0.01),
        write("ft-2.safetensors", 0.02),
    ];
    let run = |engine: &mut dyn Engine, out: &str| {
        let out = dir.path().join(out);
        compress(&base, &fts, &out, &options(), engine).unwrap();
        let files: Vec<Vec<u8>> = ["ft-1.udelta", "ft-2.udelta"]
            .iter()
            .map(|f| std::fs::read(out.join(f)).unwrap())
            .collect();
        files
    };
    let mut deferred = Deferred::default();
    let got = run(&mut deferred, "deferred");
    assert!(got == run(&mut CpuEngine, "cpu"), "the files differ");
    // 8 compressed pairs per fine-tune, each started before the previous was finished.
    assert_eq!(deferred.finished, 16);
    assert_eq!(deferred.most_in_flight, 2);
    assert!(deferred.started.is_empty());
}
