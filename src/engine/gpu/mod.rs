//! The GPU engine: wgpu compute shaders (`shaders/*.wgsl`) that return exactly what
//! [`CpuEngine`] returns.
//!
//! - `analyze` (`analyze.rs`): [`Kernel::MinMax`] (exact min/max, lowest non-finite index), then
//!   [`Kernel::Histogram`] (level histogram, `k` computed on the host).
//! - `select` (`select.rs`): pass A, [`Kernel::Levels`] (packed u8 levels, per-level key-bucket
//!   histogram) and the host's cut buckets (`buckets.rs`); pass B, [`Kernel::Gather`] (keys in
//!   each level's cut bucket) and the host's thresholds; pass C, ordered compaction per chunk
//!   ([`Kernel::TileCount`], [`Kernel::Scan`], [`Kernel::Scatter`]).
//! - `nuclear_norm`: the host estimator over [`GpuSparseOperator`] ([`Kernel::Spmm`]).
//!
//! `compress`, which reads its inputs once, calls `start_analysis` / `finish_analysis` and
//! `select_levels`: this engine computes min/max on the device (`stream.rs`: uploads through
//! the ring of mapped staging buffers of `staging.rs`, at the inputs' element sizes, the next
//! tensor submitted before the host waits for this one), then the levels, their histogram and
//! the selection on the host (rayon), so the device histogram, `select` and `nuclear_norm`
//! serve the library API and the tests. Keeping the levels in device memory and selecting there
//! is the open next step (`docs/BENCHMARKS.md`, performance model).
//!
//! Every value the kernels share with the host is defined once, in [`constants`], and reaches
//! the WGSL as a generated prelude ([`constants::wgsl_prelude`]).
//!
//! Device memory is bounded by [`GpuOptions::gpu_mem`]: every buffer comes from one
//! pool whose sizes are planned from that budget (`pool::Layout::plan`); tensors larger than one chunk (one storage binding, or
//! what the budget allows) are processed chunk by chunk, and their levels stay on the device
//! when they fit, else they go to the host and back.
//!
//! Exactness: inputs are decoded on bits (f16 subnormals included), and only `-` and `*` touch
//! the values. A device may flush subnormal f32 values to zero; the kernels flag any element
//! where that could matter (a subnormal input, or a nonzero difference below 2^-126), and such
//! a tensor is computed by the CPU engine instead ([`GpuEngine::cpu_fallbacks`]).

mod analyze;
mod buckets;
pub mod constants;
mod csr;
mod device;
mod kernels;
mod pool;
mod select;
mod spmm;
mod staging;
mod stream;

pub use device::{list_adapters, AdapterReport};

pub use kernels::{compose as compose_shader, shader_modules, Kernel, SHADER_FILES};
pub use spmm::GpuSparseOperator;

use super::cpu::CpuEngine;
use super::{
    check_kept, AnalysisTicket, DeltaInput, Engine, EngineError, KeptEntries, PackedLevels,
};
use crate::algorithm::quantize::QuantGrid;
use crate::algorithm::{SelectionPlan, TensorStats};
use crate::tracenorm::{estimate_nuclear_norm, EstimatorOptions, SparseDelta};
use constants::{stat, Params, MAX_BITS, TILE_ELEMENTS};
use device::Gpu;
use kernels::Kernels;
use pool::{Layout, Pool, Slot};

/// Default device-memory budget (`--gpu-mem`).
pub const DEFAULT_GPU_MEM: u64 = 1 << 30;

/// Which adapter to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The best adapter on any backend: discrete > integrated > virtual > other > CPU-type.
    Auto,
    /// The best adapter on these backends only.
    Backend(wgpu::Backends),
}

/// How to build a [`GpuEngine`].
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Adapter choice (`WGPU_ADAPTER_NAME` further restricts it by name).
    pub adapter: AdapterChoice,
    /// Most bytes of device buffers alive at once.
    pub gpu_mem: u64,
    /// Test-only: at most this many elements per chunk (rounded up to a multiple of 1024).
    pub chunk_elements: Option<usize>,
    /// Test-only: a device fault to simulate ([`GpuFault::from_env`] reads `UDELTA_GPU_FAULT`).
    pub fault: Option<GpuFault>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            adapter: AdapterChoice::Auto,
            gpu_mem: DEFAULT_GPU_MEM,
            chunk_elements: None,
            fault: None,
        }
    }
}

/// A simulated device fault, so that tests can check how runs fail (or fall back to the CPU
/// engine) without broken hardware. Set with `UDELTA_GPU_FAULT=device|oom|lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuFault {
    /// The adapter fails to create a device.
    Device,
    /// The first device buffer allocation reports out-of-memory (through the same error
    /// scope a real one would).
    Oom,
    /// The device is lost (destroyed) when the second tensor starts: mid-run.
    Lost,
}

/// The environment variable that selects a [`GpuFault`].
pub const FAULT_ENV: &str = "UDELTA_GPU_FAULT";

impl GpuFault {
    /// The fault `UDELTA_GPU_FAULT` asks for (`None` when unset or empty).
    pub fn from_env() -> crate::Result<Option<GpuFault>> {
        match std::env::var(FAULT_ENV).unwrap_or_default().as_str() {
            "" => Ok(None),
            "device" => Ok(Some(GpuFault::Device)),
            "oom" => Ok(Some(GpuFault::Oom)),
            "lost" => Ok(Some(GpuFault::Lost)),
            other => Err(crate::Error::Param(format!(
                "{FAULT_ENV}={other}: expected device, oom or lost"
            ))),
        }
    }

    /// How messages name the injected fault.
    fn note(self) -> &'static str {
        match self {
            GpuFault::Device => "injected by UDELTA_GPU_FAULT=device",
            GpuFault::Oom => "injected by UDELTA_GPU_FAULT=oom",
            GpuFault::Lost => "injected by UDELTA_GPU_FAULT=lost",
        }
    }
}

/// The wgpu engine.
pub struct GpuEngine {
    gpu: Gpu,
    kernels: Kernels,
    pool: Pool,
    /// The layout of the pool's buffers for `analyze` and `select` (the library calls).
    layout: Option<Layout>,
    /// The pool's buffers for `compress`'s pass 1 (`stream.rs`), while it holds those.
    stream: Option<stream::Stream>,
    /// Number of the next streamed analysis (`stream.rs`).
    tickets: u64,
    options: GpuOptions,
    cpu_fallbacks: u64,
    /// Unit tests only: fewer candidate slots than InA holds, to exercise batching.
    candidate_capacity: Option<usize>,
    /// Candidate batches of the last `select` (for tests).
    candidate_batches: usize,
    /// Tensors started (analyze or select calls), for [`GpuFault::Lost`].
    calls: u64,
}

/// `(start, len)` of each chunk of `n` elements.
fn chunk_ranges(n: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..n.div_ceil(chunk))
        .map(|c| (c * chunk, chunk.min(n - c * chunk)))
        .collect()
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl GpuEngine {
    /// Opens the adapter `options` asks for and compiles the kernels. Device buffers are
    /// created on first use.
    pub fn new(options: GpuOptions) -> crate::Result<Self> {
        let backends = match options.adapter {
            AdapterChoice::Auto => wgpu::Backends::all(),
            AdapterChoice::Backend(b) => b,
        };
        let (instance, adapter) = device::pick_adapter(backends).map_err(crate::Error::Gpu)?;
        if options.fault == Some(GpuFault::Device) {
            return Err(crate::Error::Gpu(format!(
                "{}: requesting a device: the adapter could not create one ({})",
                AdapterReport::of(&adapter).summary(),
                GpuFault::Device.note()
            )));
        }
        let gpu = Gpu::open(instance, adapter).map_err(crate::Error::Gpu)?;
        let binding = Self::binding_elements(&gpu);
        Layout::plan(options.gpu_mem, 1, binding, options.chunk_elements)
            .map_err(crate::Error::Gpu)?;
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(&gpu.device);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(crate::Error::Gpu(format!(
                "{}: compiling the kernels: {e}",
                gpu.report.summary()
            )));
        }
        gpu.wait().map_err(|e| crate::Error::Gpu(e.to_string()))?;
        let mut pool = Pool::new(gpu.device.clone(), options.gpu_mem);
        if options.fault == Some(GpuFault::Oom) {
            pool.inject_oom(GpuFault::Oom.note());
        }
        Ok(GpuEngine {
            gpu,
            kernels,
            pool,
            layout: None,
            stream: None,
            tickets: 0,
            options,
            cpu_fallbacks: 0,
            candidate_capacity: None,
            candidate_batches: 0,
            calls: 0,
        })
    }

    /// The simulated fault this engine was built with, if any.
    pub fn fault(&self) -> Option<GpuFault> {
        self.options.fault
    }

    /// Counts one tensor started; loses the device on the second under [`GpuFault::Lost`].
    fn start_tensor(&mut self) {
        self.calls += 1;
        if self.calls == 2 && self.options.fault == Some(GpuFault::Lost) {
            eprintln!(
                "udelta-gpu: destroying the device ({})",
                GpuFault::Lost.note()
            );
            self.gpu.device.destroy();
        }
    }

    fn binding_elements(gpu: &Gpu) -> usize {
        (gpu.max_binding / 4) as usize / TILE_ELEMENTS * TILE_ELEMENTS
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterReport {
        &self.gpu.report
    }

    /// The device-memory budget.
    pub fn gpu_mem(&self) -> u64 {
        self.options.gpu_mem
    }

    /// Bytes of device buffers alive now.
    pub fn allocated_bytes(&self) -> u64 {
        self.pool.live()
    }

    /// Most bytes of device buffers alive at once so far (never above [`gpu_mem`](Self::gpu_mem)).
    pub fn peak_allocated_bytes(&self) -> u64 {
        self.pool.peak()
    }

    /// Tensors (analyze or select calls) handed to the CPU engine because of subnormal values.
    pub fn cpu_fallbacks(&self) -> u64 {
        self.cpu_fallbacks
    }

    /// Elements per chunk for `bits`-bit tensors under this engine's budget.
    pub fn chunk_elements(&self, bits: u32) -> usize {
        Layout::plan(
            self.options.gpu_mem,
            bits,
            Self::binding_elements(&self.gpu),
            self.options.chunk_elements,
        )
        .map_or(0, |l| l.chunk)
    }

    /// Elements whose levels can stay on the device between the passes of `select` (larger
    /// tensors send their levels through the host).
    pub fn level_capacity(&self, bits: u32) -> usize {
        Layout::plan(
            self.options.gpu_mem,
            bits,
            Self::binding_elements(&self.gpu),
            self.options.chunk_elements,
        )
        .map_or(0, |l| l.level_slots * l.chunk)
    }

    /// The layout for `bits`; switching layouts releases every buffer first.
    fn prepare(&mut self, bits: u32) -> Result<Layout, EngineError> {
        let layout = Layout::plan(
            self.options.gpu_mem,
            bits,
            Self::binding_elements(&self.gpu),
            self.options.chunk_elements,
        )
        .map_err(EngineError::Gpu)?;
        if self.layout != Some(layout) {
            self.release_buffers();
            self.layout = Some(layout);
        }
        Ok(layout)
    }

    /// Destroys every pool buffer (before other buffers are planned); analyses still in flight
    /// are then computed again when they are finished.
    fn release_buffers(&mut self) {
        self.pool.clear();
        self.layout = None;
        self.stream = None;
    }

    fn buf(&mut self, layout: &Layout, slot: Slot) -> Result<wgpu::Buffer, EngineError> {
        self.pool.get(slot, layout.size(slot))
    }

    /// Writes `bytes` at offset 0 of `buffer`, zero-padding the last word.
    fn upload(&self, buffer: &wgpu::Buffer, bytes: &[u8]) {
        let aligned = bytes.len() / 4 * 4;
        if aligned > 0 {
            self.gpu.write(buffer, 0, &bytes[..aligned]);
        }
        if aligned < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - aligned].copy_from_slice(&bytes[aligned..]);
            self.gpu.write(buffer, aligned as u64, &tail);
        }
    }

    /// Uploads elements `start .. start + len` of both inputs.
    fn upload_inputs(
        &self,
        input: &DeltaInput,
        (start, len): (usize, usize),
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
    ) {
        let (bs, fs) = (input.base_type.size(), input.finetuned_type.size());
        self.upload(a, &input.base[start * bs..(start + len) * bs]);
        self.upload(b, &input.finetuned[start * fs..(start + len) * fs]);
    }

    fn write_params(&self, buffer: &wgpu::Buffer, p: &Params) {
        self.gpu.write(buffer, 0, bytemuck::bytes_of(p));
    }

    /// Writes `words` at offset 0 of `buffer`.
    fn write_words(&self, buffer: &wgpu::Buffer, words: &[u32]) {
        self.gpu.write(buffer, 0, &words_to_bytes(words));
    }

    /// Reads the stats buffer back.
    fn read_stats(
        &self,
        stats: &wgpu::Buffer,
        readback: &wgpu::Buffer,
    ) -> Result<Vec<u32>, EngineError> {
        self.gpu.read_words(stats, 0, stat::WORDS, readback)
    }

    /// The first `words` of `counts` and the stats buffer, in one map where they fit together.
    fn read_pair(
        &self,
        (counts, words): (&wgpu::Buffer, usize),
        stats: &wgpu::Buffer,
        readback: &wgpu::Buffer,
    ) -> Result<[Vec<u32>; 2], EngineError> {
        let regions = [(counts, 0, words), (stats, 0, stat::WORDS)];
        let mut got = self.gpu.read_words_batch(&regions, readback)?.into_iter();
        let counts = got.next().expect("one per region");
        Ok([counts, got.next().expect("one per region")])
    }

    /// Records one dispatch of `kernel` with `buffers` bound to bindings 0, 1, ...
    fn pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32),
    ) {
        (self.kernels).dispatch(&self.gpu.device, enc, kernel, buffers, groups);
    }

    /// Workgroups for a grid-stride loop over `items` (one per invocation at most).
    fn stride_groups(&self, items: usize) -> (u32, u32) {
        kernels::stride_groups(items, self.gpu.max_groups)
    }

    /// Workgroups for one workgroup per tile, 2-D past the per-dimension limit.
    fn tile_groups(&self, tiles: usize) -> (u32, u32) {
        let x = tiles.clamp(1, self.gpu.max_groups as usize);
        (x as u32, tiles.div_ceil(x).max(1) as u32)
    }

    fn submit(&self, enc: wgpu::CommandEncoder) -> wgpu::SubmissionIndex {
        self.gpu.queue.submit([enc.finish()])
    }

    /// Submits the work of one chunk, then waits for the chunk before it: at most two chunks
    /// are in flight, so the upload of the next chunk overlaps the compute of this one while
    /// wgpu's upload staging stays bounded (two chunks, however large the tensor).
    fn submit_chunk(
        &self,
        enc: wgpu::CommandEncoder,
        in_flight: &mut Option<wgpu::SubmissionIndex>,
    ) -> Result<(), EngineError> {
        let index = self.submit(enc);
        match in_flight.replace(index) {
            Some(previous) => self.gpu.wait_for(previous),
            None => Ok(()),
        }
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.gpu.device.create_command_encoder(&Default::default())
    }

    fn base_params(input: &DeltaInput) -> Params {
        Params {
            base_type: input.base_type.code(),
            ft_type: input.finetuned_type.code(),
            ..Default::default()
        }
    }

    /// Whether a tensor of `n` elements at `bits` goes to the GPU at all.
    fn gpu_can(n: usize, bits: u32) -> bool {
        bits <= MAX_BITS && n < u32::MAX as usize
    }
}

impl Engine for GpuEngine {
    fn name(&self) -> String {
        format!("gpu: {}", self.gpu.report.summary())
    }

    /// False: the products run on the device.
    fn nuclear_norm_on_host(&self) -> bool {
        false
    }

    fn counters(&self) -> super::DeviceCounters {
        self.gpu.counters()
    }

    /// The estimator on the host with its products on the device ([`GpuSparseOperator`]);
    /// matrices whose operator would exceed `--gpu-mem` or one storage binding go to the CPU.
    /// The pool's buffers are released first when they and the operator would exceed it.
    fn nuclear_norm(
        &mut self,
        delta: &SparseDelta,
        opts: &EstimatorOptions,
    ) -> Result<f64, EngineError> {
        self.gpu.errors.check()?;
        if delta.positions.is_empty() || delta.rows == 0 || delta.cols == 0 {
            return Ok(0.0);
        }
        // The operator's buffers are not pooled: the pool's give way when both would not fit.
        if spmm::planned_bytes(delta) + self.pool.live() > self.options.gpu_mem {
            self.release_buffers();
        }
        let too_big = spmm::planned_bytes(delta) > self.options.gpu_mem
            || spmm::io_bytes(delta) > self.gpu.max_binding;
        if too_big {
            return Ok(crate::tracenorm::nuclear_norm(delta, opts));
        }
        let mut op = self.sparse_operator(delta)?;
        let estimate = estimate_nuclear_norm(&mut op, opts);
        match op.error() {
            Some(e) => Err(e),
            None => Ok(estimate),
        }
    }

    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        self.start_tensor();
        self.gpu.errors.check()?;
        let n = input.numel();
        if n == 0 {
            let grid = QuantGrid {
                lo: 0.0,
                hi: 0.0,
                bits,
            };
            return Ok(TensorStats {
                grid,
                histogram: vec![0; grid.levels()],
            });
        }
        let r = if Self::gpu_can(n, bits) {
            self.analyze_gpu(input, bits)?
        } else {
            None
        };
        match r {
            Some(st) => Ok(st),
            None => {
                self.cpu_fallbacks += 1;
                CpuEngine.analyze(input, bits)
            }
        }
    }

    /// [`start_analysis`](Engine::start_analysis), then
    /// [`finish_analysis`](Engine::finish_analysis).
    fn analyze_levels(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        let ticket = self.start_analysis(input, bits)?;
        self.finish_analysis(ticket, input)
    }

    /// Uploads the tensor and submits its min/max (`stream.rs`) without waiting for it; the
    /// CPU engine takes tensors the kernels cannot (then the ticket is ready).
    fn start_analysis(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<AnalysisTicket, EngineError> {
        self.start_tensor();
        self.gpu.errors.check()?;
        let n = input.numel();
        if n == 0 || !Self::gpu_can(n, bits) {
            self.cpu_fallbacks += u64::from(n > 0);
            return CpuEngine.start_analysis(input, bits);
        }
        Ok(AnalysisTicket::in_flight(self.submit_min_max(input)?, bits))
    }

    /// Reads the min/max back (one map); the levels (kept for `select_levels`) and their
    /// histogram are computed on the host, in one pass: the host computes the levels anyway.
    fn finish_analysis(
        &mut self,
        ticket: AnalysisTicket,
        input: &DeltaInput,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        let bits = ticket.bits();
        let Some(id) = ticket.in_flight_id() else {
            // Ready: the CPU engine took it at the start.
            return CpuEngine.finish_analysis(ticket, input);
        };
        self.gpu.errors.check()?;
        let words = match self.streamed_stats(id)? {
            Some(words) => words,
            // Its buffers were released in between: submit it again.
            None => {
                let id = self.submit_min_max(input)?;
                self.streamed_stats(id)?.ok_or_else(|| {
                    EngineError::Inconsistent("a resubmitted analysis was lost".into())
                })?
            }
        };
        let Some((lo, hi)) = analyze::range_of_stats(&words, input)? else {
            self.cpu_fallbacks += 1;
            return CpuEngine.analyze_levels(input, bits);
        };
        let (stats, levels) = super::cpu::quantize(input, QuantGrid { lo, hi, bits }, true);
        Ok((stats, levels.expect("levels kept")))
    }

    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        self.start_tensor();
        self.gpu.errors.check()?;
        let n = input.numel();
        if n == 0 {
            let kept = KeptEntries::default();
            check_kept(&kept, plan)?;
            return Ok(kept);
        }
        let r = if Self::gpu_can(n, stats.grid.bits) {
            self.select_gpu(input, stats, plan)?
        } else {
            None
        };
        match r {
            Some(k) => Ok(k),
            None => {
                self.cpu_fallbacks += 1;
                CpuEngine.select(input, stats, plan)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine, or `None` after a loud message where there is no adapter (`CI=true`: panic).
    fn engine(chunk: Option<usize>) -> Option<GpuEngine> {
        match GpuEngine::new(GpuOptions {
            chunk_elements: chunk,
            ..Default::default()
        }) {
            Ok(e) => Some(e),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI requires a GPU adapter (lavapipe): {e}")
            }
            Err(e) => {
                eprintln!("\n!!!!!!!! GPU TEST DID NOT RUN: no usable GPU adapter: {e}\n");
                None
            }
        }
    }

    #[test]
    fn wgpu_failures_become_engine_errors() {
        use crate::checkpoint::dtype::FloatType;
        let values: Vec<f32> = (0..10_000).map(|i| (i % 17) as f32 * 0.125).collect();
        let mut bytes = Vec::new();
        FloatType::F32.encode_into(&values, &mut bytes);
        let zeros = vec![0u8; bytes.len()];
        let input = DeltaInput::new(&zeros, FloatType::F32, &bytes, FloatType::F32, values.len());
        let Some(mut g) = engine(Some(4096)) else {
            return;
        };
        assert_eq!(
            g.analyze(&input, 4).unwrap(),
            CpuEngine.analyze(&input, 4).unwrap()
        );
        // A validation error anywhere on the device (a buffer both mappable and storage).
        let _bad = g.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let e = g.analyze(&input, 4).unwrap_err();
        assert!(matches!(e, EngineError::Gpu(_)), "{e}");
        // A lost device.
        let Some(mut g) = engine(None) else { return };
        g.gpu.device.destroy();
        let e = g.analyze(&input, 4).unwrap_err();
        assert!(matches!(e, EngineError::Gpu(_)), "{e}");
        eprintln!("lost device: {e}");
        let stats = CpuEngine.analyze(&input, 4).unwrap();
        let plan = SelectionPlan::new(crate::algorithm::TensorKey::new(1, "m", "t"), &stats, 0.9);
        assert!(matches!(
            g.select(&input, &stats, &plan),
            Err(EngineError::Gpu(_))
        ));
    }

    #[test]
    fn candidates_in_several_batches() {
        use crate::checkpoint::dtype::FloatType;
        let Some(mut g) = engine(Some(4096)) else {
            return;
        };
        g.candidate_capacity = Some(64);
        let values: Vec<f32> = (0..300_001u32)
            .map(|i| (crate::algorithm::selection::mix32(i) >> 8) as f32 * 1e-9 - 0.008)
            .collect();
        let mut bytes = Vec::new();
        FloatType::BF16.encode_into(&values, &mut bytes);
        let zeros = vec![0u8; values.len() * 2];
        let input = DeltaInput::new(
            &zeros,
            FloatType::F16,
            &bytes,
            FloatType::BF16,
            values.len(),
        );
        let stats = CpuEngine.analyze(&input, 4).unwrap();
        assert_eq!(g.analyze(&input, 4).unwrap(), stats);
        for rate in [0.5, 0.95] {
            let plan =
                SelectionPlan::new(crate::algorithm::TensorKey::new(2, "m", "t"), &stats, rate);
            assert!(
                g.select(&input, &stats, &plan).unwrap()
                    == CpuEngine.select(&input, &stats, &plan).unwrap()
            );
            assert!(g.candidate_batches > 1, "{} batches", g.candidate_batches);
        }
    }

    #[test]
    fn chunks_cover_the_tensor() {
        assert_eq!(chunk_ranges(0, 1024), vec![]);
        assert_eq!(chunk_ranges(1025, 1024), vec![(0, 1024), (1024, 1)]);
        assert_eq!(chunk_ranges(2048, 1024), vec![(0, 1024), (1024, 1024)]);
    }
}
