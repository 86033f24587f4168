//! Adapters and devices: listing what wgpu sees, choosing one (`auto` or one backend, honouring
//! `WGPU_ADAPTER_NAME`), requesting a device with the limits the kernels need, turning every
//! asynchronous wgpu failure into an [`EngineError::Gpu`], and reading buffers back.

use super::constants::WORKGROUP;
use crate::engine::{DeviceCounters, EngineError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Largest storage binding the engine asks for (the WebGPU default; lavapipe's maximum).
pub const MAX_BINDING: u64 = 128 << 20;
/// Storage buffers the kernels bind at most in one stage.
const STORAGE_BUFFERS_NEEDED: u32 = 6;

/// One adapter as wgpu reports it (for `udelta-gpu adapters`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterReport {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Backend: `Vulkan`, `Metal`, `Dx12` or `Gl`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` or `Other`.
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version and details.
    pub driver_info: String,
    /// Largest storage buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Most workgroups per dispatch dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Most invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Whether it runs compute shaders at all (GLES 3.0 and WebGL2 do not).
    pub compute_shaders: bool,
}

impl AdapterReport {
    /// The report of `adapter`.
    pub(crate) fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let limits = adapter.limits();
        AdapterReport {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver,
            driver_info: info.driver_info,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            compute_shaders: supports_compute(adapter),
        }
    }

    /// One line: name, backend, type.
    pub fn summary(&self) -> String {
        format!("{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

fn supports_compute(adapter: &wgpu::Adapter) -> bool {
    adapter
        .get_downlevel_capabilities()
        .flags
        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
}

/// A wgpu instance over `backends` (`WGPU_BACKEND` and the other `WGPU_*` instance variables
/// honoured).
fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends & wgpu::Backends::all().with_env();
    desc.flags = wgpu::InstanceFlags::default().with_env();
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu finds, on every backend.
pub fn list_adapters() -> Vec<AdapterReport> {
    let instance = instance(wgpu::Backends::all());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(AdapterReport::of)
        .collect()
}

/// Preference of a device type for `auto`: lower is better.
fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Preference of a backend among adapters of the same type: native APIs before GL.
fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

/// Names of the backends in `b`, e.g. `Vulkan or Metal`.
fn backend_names(b: wgpu::Backends) -> String {
    let names: Vec<&str> = [
        (wgpu::Backends::VULKAN, "Vulkan"),
        (wgpu::Backends::METAL, "Metal"),
        (wgpu::Backends::DX12, "Dx12"),
        (wgpu::Backends::GL, "Gl"),
    ]
    .iter()
    .filter(|(f, _)| b.contains(*f))
    .map(|(_, n)| *n)
    .collect();
    names.join(" or ")
}

/// Picks the adapter for `backends` (the best one by type), restricted to names containing
/// `WGPU_ADAPTER_NAME` (case-insensitive) when that variable is set. GL is only enumerated when
/// no other backend offers a usable adapter (probing it can be slow and noisy on headless
/// machines). The error names every adapter that was found.
pub fn pick_adapter(backends: wgpu::Backends) -> Result<(wgpu::Instance, wgpu::Adapter), String> {
    let filter = std::env::var("WGPU_ADAPTER_NAME")
        .ok()
        .filter(|s| !s.is_empty());
    let usable = |a: &wgpu::Adapter| {
        let info = a.get_info();
        supports_compute(a)
            && filter
                .as_ref()
                .is_none_or(|f| info.name.to_lowercase().contains(&f.to_lowercase()))
    };
    let rank = |a: &wgpu::Adapter| {
        let info = a.get_info();
        (type_rank(info.device_type), backend_rank(info.backend))
    };
    for group in [backends - wgpu::Backends::GL, backends & wgpu::Backends::GL] {
        if group.is_empty() {
            continue;
        }
        let instance = instance(group);
        let adapters = pollster::block_on(instance.enumerate_adapters(group));
        if let Some(best) = adapters.into_iter().filter(usable).min_by_key(rank) {
            return Ok((instance, best));
        }
    }
    let found: Vec<String> = list_adapters().iter().map(AdapterReport::summary).collect();
    let wanted = if backends.contains(wgpu::Backends::PRIMARY | wgpu::Backends::GL) {
        "GPU adapter".to_string()
    } else {
        format!("{} adapter", backend_names(backends))
    };
    let named = filter
        .map(|f| format!(" named like WGPU_ADAPTER_NAME={f:?}"))
        .unwrap_or_default();
    let found = if found.is_empty() {
        "wgpu found no adapters at all".to_string()
    } else {
        format!("found: {}", found.join("; "))
    };
    Err(format!("no {wanted} with compute shaders{named} ({found})"))
}

/// The first asynchronous wgpu failure (validation, out of memory, device lost), kept until
/// the engine is dropped: after one, the device is not trusted again.
#[derive(Clone, Default)]
pub struct ErrorSink(Arc<Mutex<Option<String>>>);

impl ErrorSink {
    fn set(&self, msg: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(msg);
        }
    }

    /// A lost device explains every later error: it replaces what was reported before.
    fn set_lost(&self, msg: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }

    /// `Err` once any failure was reported.
    pub fn check(&self) -> Result<(), EngineError> {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(m) => Err(EngineError::Gpu(m.clone())),
            None => Ok(()),
        }
    }
}

/// A device and queue on one adapter, with the limits the engine requested.
pub struct Gpu {
    _instance: wgpu::Instance,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub report: AdapterReport,
    pub errors: ErrorSink,
    /// Largest storage binding, bytes (at most [`MAX_BINDING`]).
    pub max_binding: u64,
    /// Most workgroups per dispatch dimension (at most 65,535).
    pub max_groups: u32,
    /// Traffic and waits so far.
    counters: Counters,
}

/// [`DeviceCounters`], counted through `&Gpu`.
#[derive(Default)]
struct Counters {
    uploaded: AtomicU64,
    read_back: AtomicU64,
    waits: AtomicU64,
    wait_us: AtomicU64,
    overlapped: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl Gpu {
    /// Opens a device on `adapter`, requesting more than the downlevel defaults only where the
    /// kernels need it and never more than the adapter offers.
    pub fn open(instance: wgpu::Instance, adapter: wgpu::Adapter) -> Result<Gpu, String> {
        let report = AdapterReport::of(&adapter);
        let have = adapter.limits();
        let need = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{}: {what}", report.summary()))
            }
        };
        need(report.compute_shaders, "no compute shaders")?;
        need(
            have.max_storage_buffers_per_shader_stage >= STORAGE_BUFFERS_NEEDED,
            "too few storage buffers per stage",
        )?;
        need(
            have.max_compute_invocations_per_workgroup >= WORKGROUP,
            "workgroups of 256 invocations unsupported",
        )?;
        need(
            have.max_compute_workgroup_size_x >= WORKGROUP,
            "workgroup size 256 unsupported",
        )?;
        need(
            have.max_compute_workgroup_storage_size >= 4096,
            "too little workgroup memory",
        )?;
        need(
            have.max_storage_buffer_binding_size >= 1 << 20,
            "storage bindings under 1 MiB",
        )?;
        let mut limits = wgpu::Limits::downlevel_defaults().or_worse_values_from(&have);
        limits.max_storage_buffers_per_shader_stage = STORAGE_BUFFERS_NEEDED;
        limits.max_storage_buffer_binding_size =
            have.max_storage_buffer_binding_size.min(MAX_BINDING);
        limits.max_compute_workgroups_per_dimension =
            have.max_compute_workgroups_per_dimension.min(65_535);
        limits.max_compute_invocations_per_workgroup =
            WORKGROUP.max(limits.max_compute_invocations_per_workgroup);
        limits.max_compute_workgroup_size_x = WORKGROUP.max(limits.max_compute_workgroup_size_x);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("udelta-gpu"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| format!("{}: requesting a device: {e}", report.summary()))?;
        let errors = ErrorSink::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| sink.set(e.to_string())));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            sink.set_lost(if msg.is_empty() {
                format!("device lost ({reason:?})")
            } else {
                format!("device lost ({reason:?}): {msg}")
            })
        });
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Ok(Gpu {
            _instance: instance,
            device,
            queue,
            report,
            errors,
            max_binding,
            max_groups: limits.max_compute_workgroups_per_dimension,
            counters: Counters::default(),
        })
    }

    /// Traffic and waits so far.
    pub fn counters(&self) -> DeviceCounters {
        let c = &self.counters;
        DeviceCounters {
            bytes_uploaded: c.uploaded.load(Ordering::Relaxed),
            bytes_read_back: c.read_back.load(Ordering::Relaxed),
            blocking_waits: c.waits.load(Ordering::Relaxed),
            blocking_wait_us: c.wait_us.load(Ordering::Relaxed),
            overlapped_tensors: c.overlapped.load(Ordering::Relaxed),
        }
    }

    /// Counts a tensor submitted while an earlier one's results are unread.
    pub fn count_overlap(&self) {
        bump(&self.counters.overlapped, 1);
    }

    /// Writes `bytes` at `offset` of `buffer` (queued; counted as uploaded).
    pub fn write(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        self.count_upload(bytes.len() as u64);
        self.queue.write_buffer(buffer, offset, bytes);
    }

    /// Counts `bytes` written into mapped staging memory for the device (the upload ring).
    pub fn count_upload(&self, bytes: u64) {
        bump(&self.counters.uploaded, bytes);
    }

    /// Waits for all submitted work; `Err` on a poll failure or any reported wgpu error.
    pub fn wait(&self) -> Result<(), EngineError> {
        self.blocking_poll(wgpu::PollType::wait_indefinitely())
    }

    /// Waits for one submission (and everything before it).
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<(), EngineError> {
        self.blocking_poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
    }

    /// One counted, timed blocking poll.
    fn blocking_poll(&self, poll: wgpu::PollType) -> Result<(), EngineError> {
        bump(&self.counters.waits, 1);
        let started = std::time::Instant::now();
        let r = self.device.poll(poll);
        bump(&self.counters.wait_us, started.elapsed().as_micros() as u64);
        r.map_err(|e| EngineError::Gpu(format!("waiting for the device: {e}")))?;
        self.errors.check()
    }

    /// Reads `len` bytes at `offset` of `src` through the map-read buffer `staging`, in pieces
    /// of at most its size. `offset` must be a multiple of 4; `src` must hold `len` rounded up
    /// to 4 bytes.
    pub fn read(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        len: u64,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = 0;
        while pos < len {
            let piece = (len - pos).min(staging.size());
            let padded = piece.next_multiple_of(4);
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(src, offset + pos, staging, 0, padded);
            self.queue.submit([enc.finish()]);
            out.extend_from_slice(&self.map_read(staging, padded, None)?[..piece as usize]);
            pos += piece;
        }
        Ok(out)
    }

    /// Reads several small regions `(buffer, offset, words)` in one map of `staging` (one
    /// blocking wait instead of one per region), as little-endian u32 words; regions that do
    /// not fit in `staging` together are read one by one.
    pub fn read_words_batch(
        &self,
        regions: &[(&wgpu::Buffer, u64, usize)],
        staging: &wgpu::Buffer,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let total: u64 = regions.iter().map(|r| r.2 as u64 * 4).sum();
        if total > staging.size() || total == 0 {
            return (regions.iter())
                .map(|&(b, o, w)| self.read_words(b, o, w, staging))
                .collect();
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut at = 0;
        for &(src, offset, words) in regions {
            enc.copy_buffer_to_buffer(src, offset, staging, at, words as u64 * 4);
            at += words as u64 * 4;
        }
        self.queue.submit([enc.finish()]);
        let bytes = self.map_read(staging, total, None)?;
        let mut words = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        Ok(regions
            .iter()
            .map(|r| words.by_ref().take(r.2).collect())
            .collect())
    }

    /// Maps the first `len` bytes (a multiple of 4) of `staging` once submission `after` is
    /// done (`None`: the whole queue), and copies them out: one blocking wait. Work submitted
    /// after `after` goes on meanwhile.
    pub fn map_read(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let slice = staging.slice(..len);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        match after {
            Some(index) => self.wait_for(index)?,
            None => self.wait()?,
        }
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EngineError::Gpu(format!("mapping a readback buffer: {e}"))),
            Err(_) => return Err(EngineError::Gpu("readback did not complete".into())),
        }
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| EngineError::Gpu(format!("reading a mapped buffer: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        bump(&self.counters.read_back, len);
        Ok(out)
    }

    /// [`read`](Self::read) as little-endian u32 words.
    pub fn read_words(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        words: usize,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u32>, EngineError> {
        Ok(le_words(&self.read(
            src,
            offset,
            words as u64 * 4,
            staging,
        )?))
    }
}

/// Little-endian u32 words of `bytes` (a multiple of 4 long).
pub fn le_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
