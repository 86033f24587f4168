//! The engine factory: which engine `--adapter` names, and [`Fallback`], the GPU engine that
//! hands over to the CPU engine when the device fails. Kept apart from the [`Engine`] trait's
//! module so that the trait does not depend on its implementations.

use super::cpu;
use super::gpu::{self, AdapterChoice, GpuEngine, GpuFault, GpuOptions};
use super::{
    AnalysisTicket, DeltaInput, DeviceCounters, Engine, EngineError, KeptEntries, PackedLevels,
};
use crate::algorithm::{SelectionPlan, TensorStats};
use crate::tracenorm::{EstimatorOptions, SparseDelta};

/// The engine for `--adapter NAME` with a device-memory budget of `gpu_mem` bytes:
/// - `cpu`: the reference engine;
/// - `vulkan`, `metal`, `dx12`, `gl`: the GPU engine on that backend only (an error naming the
///   adapters found when it has none);
/// - `auto`: the best GPU adapter (discrete > integrated > virtual > CPU-type such as lavapipe),
///   announced on stderr; the CPU engine (with a message on stderr) when none works or the best
///   is a software rasterizer, which is slower than the CPU engine. A GPU that fails during the
///   run (out of memory, device lost) hands the rest of the work to the CPU engine, with a
///   line on stderr ([`Fallback`]): the output is the same, since the engines' `analyze` and
///   `select` agree bit for bit. (The `--trace-norm` estimate is the exception: its products
///   agree only to f32 rounding on devices other than lavapipe, see
///   [`gpu::GpuSparseOperator`].)
///
/// `WGPU_ADAPTER_NAME` (a case-insensitive part of the adapter name) narrows the GPU choice.
/// `UDELTA_GPU_FAULT` simulates a device fault ([`gpu::GpuFault`]); with it, `auto` keeps a
/// software adapter so that the fault can happen where no hardware GPU exists.
pub fn create(adapter: &str, gpu_mem: u64) -> crate::Result<Box<dyn Engine>> {
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
                Ok(Box::new(Fallback {
                    gpu: Some(e),
                    counted: DeviceCounters::default(),
                }))
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
    /// The failed GPU engine's counters.
    counted: DeviceCounters,
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
                    self.counted = g.counters();
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

    fn analyze_levels(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        self.run(
            |g| g.analyze_levels(input, bits),
            |c| c.analyze_levels(input, bits),
        )
    }

    fn start_analysis(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<AnalysisTicket, EngineError> {
        self.run(
            |g| g.start_analysis(input, bits),
            |c| c.start_analysis(input, bits),
        )
    }

    /// A ticket the failed GPU engine started is analysed again on the CPU engine.
    fn finish_analysis(
        &mut self,
        ticket: AnalysisTicket,
        input: &DeltaInput,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        if ticket.is_ready() {
            return cpu::CpuEngine.finish_analysis(ticket, input);
        }
        let bits = ticket.bits();
        self.run(
            |g| g.finish_analysis(ticket, input),
            |c| c.analyze_levels(input, bits),
        )
    }

    fn select_levels(
        &mut self,
        levels: &PackedLevels,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        self.run(
            |g| g.select_levels(levels, stats, plan),
            |c| c.select_levels(levels, stats, plan),
        )
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

    /// The GPU's counters until it failed (kept after the fall-back).
    fn counters(&self) -> DeviceCounters {
        self.gpu.as_ref().map_or(self.counted, |g| g.counters())
    }
}
