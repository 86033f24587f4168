//! Engines compute what the algorithm needs from a (base, fine-tuned) tensor pair: pass 1
//! ([`Engine::analyze`]) finds min/max and the level histogram, pass 2 ([`Engine::select`])
//! quantizes again and returns the kept entries chosen by the exact per-level rule of
//! [`crate::algorithm::selection`]. Every result is exact (min/max, integer counts, integer
//! hashing), so all engines return identical values; [`cpu::CpuEngine`] is the reference.

pub mod cpu;
pub mod gpu;

use crate::algorithm::{SelectionPlan, TensorStats};
use crate::checkpoint::dtype::FloatType;
use crate::tracenorm::{EstimatorOptions, SparseDelta};

/// One tensor pair as raw little-endian bytes: the delta is `finetuned - base`, in f32.
#[derive(Debug, Clone, Copy)]
pub struct DeltaInput<'a> {
    /// Base tensor bytes (`numel` elements).
    pub base: &'a [u8],
    /// Element type of `base`.
    pub base_type: FloatType,
    /// Fine-tuned tensor bytes (`numel` elements: the rows shared with the base).
    pub finetuned: &'a [u8],
    /// Element type of `finetuned`.
    pub finetuned_type: FloatType,
}

impl<'a> DeltaInput<'a> {
    /// A pair over the first `numel` elements of both byte slices (which must hold them).
    pub fn new(
        base: &'a [u8],
        base_type: FloatType,
        finetuned: &'a [u8],
        finetuned_type: FloatType,
        numel: usize,
    ) -> Self {
        DeltaInput {
            base: &base[..numel * base_type.size()],
            base_type,
            finetuned: &finetuned[..numel * finetuned_type.size()],
            finetuned_type,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.base.len() / self.base_type.size()
    }

    /// Writes the deltas of elements `start .. start + out.len()` (f32 subtraction) into `out`,
    /// using `scratch` for the base values.
    pub fn delta_range(
        &self,
        start: usize,
        out: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
        len: usize,
    ) {
        let range = |t: FloatType| start * t.size()..(start + len) * t.size();
        if (self.finetuned_type, self.base_type) == (FloatType::F16, FloatType::F16) {
            // No memset: every element is overwritten.
            out.resize(len, 0.0);
            crate::simd::f16_delta_into(
                &self.finetuned[range(FloatType::F16)],
                &self.base[range(FloatType::F16)],
                out,
            );
            return;
        }
        self.finetuned_type
            .decode_into(&self.finetuned[range(self.finetuned_type)], out);
        self.base_type
            .decode_into(&self.base[range(self.base_type)], scratch);
        out.iter_mut()
            .zip(scratch.iter())
            .for_each(|(f, b)| *f -= b);
    }
}

/// The surviving entries of one tensor: positions ascending, with their levels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeptEntries {
    /// Element indices, strictly increasing.
    pub positions: Vec<u32>,
    /// Quantization level of each kept element.
    pub levels: Vec<u8>,
}

/// Why an engine could not process a tensor (the caller adds file and tensor names).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A delta that is NaN or infinite.
    #[error("delta at element {index} is not finite (base {base}, fine-tuned {finetuned})")]
    NonFinite {
        /// Lowest offending element index.
        index: u64,
        /// Base value there.
        base: f32,
        /// Fine-tuned value there.
        finetuned: f32,
    },
    /// A GPU failure.
    #[error("GPU: {0}")]
    Gpu(String),
    /// The engine's result disagrees with the plan (an engine or driver bug).
    #[error("engine result inconsistent with the plan: {0}")]
    Inconsistent(String),
}

/// A compute engine (CPU reference or GPU).
pub trait Engine: Send {
    /// Name recorded in the file, e.g. `cpu` or the adapter's name and backend (nothing that
    /// varies between runs on one machine, such as a thread count).
    fn name(&self) -> String;

    /// Pass 1: exact min/max of the delta, then its level histogram at `bits`.
    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError>;

    /// Pass 2: the kept entries under `plan` (exactly `plan.kept_counts()` per level).
    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError>;

    /// Estimated nuclear norm (sum of singular values) of a sparse delta, for trace-norm
    /// rescaling. The default runs [`crate::tracenorm::nuclear_norm`] on the CPU; the GPU engine
    /// does the matrix products on the device.
    fn nuclear_norm(
        &mut self,
        delta: &SparseDelta,
        opts: &EstimatorOptions,
    ) -> Result<f64, EngineError> {
        Ok(crate::tracenorm::nuclear_norm(delta, opts))
    }

    /// True when [`nuclear_norm`](Self::nuclear_norm) is the default, host-only
    /// [`crate::tracenorm::nuclear_norm`], so that the caller may run that function on another
    /// thread instead (same result). Engines that override `nuclear_norm` return false.
    fn nuclear_norm_on_host(&self) -> bool {
        true
    }
}

/// The engine for `--adapter NAME` with a device-memory budget of `gpu_mem` bytes:
/// - `cpu`: the reference engine;
/// - `vulkan`, `metal`, `dx12`, `gl`: the GPU engine on that backend only (an error naming the
///   adapters found when it has none);
/// - `auto`: the best GPU adapter (discrete > integrated > virtual > CPU-type such as lavapipe),
///   announced on stderr; the CPU engine (with a message on stderr) when none works or the best
///   is a software rasterizer, which is slower than the CPU engine. A GPU that fails during the
///   run (out of memory, device lost) hands the rest of the work to the CPU engine, with a
///   line on stderr ([`Fallback`]): the output is the same, since the engines agree bit for bit.
///
/// `WGPU_ADAPTER_NAME` (a case-insensitive part of the adapter name) narrows the GPU choice.
/// `UDELTA_GPU_FAULT` simulates a device fault ([`gpu::GpuFault`]); with it, `auto` keeps a
/// software adapter so that the fault can happen where no hardware GPU exists.
pub fn create(adapter: &str, gpu_mem: u64) -> crate::Result<Box<dyn Engine>> {
    use gpu::{AdapterChoice, GpuEngine, GpuFault, GpuOptions};
    let backend = match adapter.to_ascii_lowercase().as_str() {
        "cpu" => return Ok(Box::new(cpu::CpuEngine)),
        "auto" => None,
        "vulkan" => Some(wgpu::Backends::VULKAN),
        "metal" => Some(wgpu::Backends::METAL),
        "dx12" => Some(wgpu::Backends::DX12),
        "gl" => Some(wgpu::Backends::GL),
        other => {
            return Err(crate::Error::Param(format!(
                "--adapter {other}: expected auto, vulkan, metal, dx12, gl or cpu"
            )))
        }
    };
    let fault = GpuFault::from_env()?;
    let options = |adapter| GpuOptions {
        adapter,
        gpu_mem,
        chunk_elements: None,
        fault,
    };
    match backend {
        Some(b) => Ok(Box::new(GpuEngine::new(options(AdapterChoice::Backend(
            b,
        )))?)),
        None => match GpuEngine::new(options(AdapterChoice::Auto)) {
            // A software rasterizer (lavapipe, llvmpipe, WARP) is slower than the CPU engine.
            Ok(e) if e.adapter().device_type == "Cpu" && e.fault().is_none() => {
                eprintln!(
                    "udelta-gpu: only a software adapter was found ({}); using the faster CPU engine (--adapter {} forces it)",
                    e.adapter().summary(),
                    e.adapter().backend.to_ascii_lowercase()
                );
                Ok(Box::new(cpu::CpuEngine))
            }
            Ok(e) => {
                eprintln!("udelta-gpu: using GPU adapter {}", e.adapter().summary());
                Ok(Box::new(Fallback { gpu: Some(e) }))
            }
            Err(e) => {
                eprintln!("udelta-gpu: no usable GPU ({e}); falling back to the CPU engine");
                Ok(Box::new(cpu::CpuEngine))
            }
        },
    }
}

/// The engine of `--adapter auto` on a GPU: the GPU engine until it fails, then the CPU engine
/// for the failed call and everything after it (announced once on stderr). Only device
/// failures ([`EngineError::Gpu`], [`EngineError::Inconsistent`]) fall back; a property of the
/// data (a non-finite delta) is an error on any engine.
pub struct Fallback {
    gpu: Option<gpu::GpuEngine>,
}

impl Fallback {
    /// Runs `on_gpu` while the GPU works, else (or after it failed) `on_cpu`.
    fn run<T>(
        &mut self,
        on_gpu: impl FnOnce(&mut gpu::GpuEngine) -> Result<T, EngineError>,
        on_cpu: impl FnOnce(&mut cpu::CpuEngine) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if let Some(g) = self.gpu.as_mut() {
            match on_gpu(g) {
                Err(e @ (EngineError::Gpu(_) | EngineError::Inconsistent(_))) => {
                    eprintln!(
                        "udelta-gpu: the GPU engine failed ({e}); continuing on the CPU engine (same output)"
                    );
                    self.gpu = None;
                }
                other => return other,
            }
        }
        on_cpu(&mut cpu::CpuEngine)
    }
}

impl Engine for Fallback {
    fn name(&self) -> String {
        match &self.gpu {
            Some(g) => g.name(),
            None => cpu::CpuEngine.name(),
        }
    }

    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        self.run(|g| g.analyze(input, bits), |c| c.analyze(input, bits))
    }

    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        self.run(
            |g| g.select(input, stats, plan),
            |c| c.select(input, stats, plan),
        )
    }

    fn nuclear_norm(
        &mut self,
        delta: &SparseDelta,
        opts: &EstimatorOptions,
    ) -> Result<f64, EngineError> {
        self.run(
            |g| g.nuclear_norm(delta, opts),
            |c| c.nuclear_norm(delta, opts),
        )
    }

    /// False: the GPU runs the products until it fails (then the CPU, inline).
    fn nuclear_norm_on_host(&self) -> bool {
        false
    }
}

/// Checks an engine's kept entries against the plan's per-level counts.
pub fn check_kept(kept: &KeptEntries, plan: &SelectionPlan) -> Result<(), EngineError> {
    let mut counts = vec![0u64; plan.histogram.len()];
    for &l in &kept.levels {
        match counts.get_mut(l as usize) {
            Some(c) => *c += 1,
            None => return Err(EngineError::Inconsistent(format!("level {l} out of range"))),
        }
    }
    if counts != plan.kept_counts() || kept.positions.len() != kept.levels.len() {
        return Err(EngineError::Inconsistent(format!(
            "kept per level {counts:?}, plan {:?}",
            plan.kept_counts()
        )));
    }
    if kept.positions.windows(2).any(|w| w[0] >= w[1]) {
        return Err(EngineError::Inconsistent(
            "kept positions not strictly increasing".into(),
        ));
    }
    Ok(())
}
