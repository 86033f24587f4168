//! `udelta._udelta`: the Rust side of the Python package. A thin layer over the `udelta-gpu`
//! library: every decode, check and restore runs there (module `restore`), this file only
//! converts arguments and results. Tensors cross the boundary as little-endian bytes; the
//! Python side (`udelta/__init__.py`) turns them into NumPy arrays or torch tensors.
//!
//! Every call runs with the GIL released and under `catch_unwind`: a library error becomes
//! `udelta.UdeltaError` with the CLI's message, and a panic (a bug) becomes one too instead
//! of reaching Python.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use udelta_gpu::algorithm::CompressParams;
use udelta_gpu::checkpoint::dtype::{dtype_from_name, FloatType};
use udelta_gpu::checkpoint::select::Embeddings;
use udelta_gpu::checkpoint::select::TensorSelector;
use udelta_gpu::checkpoint::side_files::SideFileOptions;
use udelta_gpu::error::{Error, Result};
use udelta_gpu::format::{CompressedTensor, TensorKind, TensorRecord, UdeltaReader};
use udelta_gpu::pipeline::compress::{CompressOptions, SizeTarget};
use udelta_gpu::pipeline::decompress::DecompressOptions;
use udelta_gpu::report::InspectReport;
use udelta_gpu::restore;

create_exception!(
    _udelta,
    UdeltaError,
    PyException,
    "Any failure of udelta: a bad, corrupted or truncated file, a wrong base, a bad parameter. The message is the CLI's."
);

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f` with the GIL released; its error, or a panic, becomes `UdeltaError`.
fn guarded<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(UdeltaError::new_err(e.to_string())),
        Err(payload) => Err(UdeltaError::new_err(format!(
            "internal error (a bug in udelta, please report it): {}",
            panic_message(payload.as_ref())
        ))),
    }
}

fn json_error(e: serde_json::Error) -> Error {
    Error::Param(e.to_string())
}

/// The index of a `.udelta` file and the CLI's `inspect --json` report, as JSON.
fn describe(reader: &UdeltaReader) -> Result<String> {
    let json = serde_json::json!({
        "index": serde_json::to_value(&reader.index).map_err(json_error)?,
        "report": serde_json::to_value(InspectReport::of(reader)).map_err(json_error)?,
    });
    serde_json::to_string(&json).map_err(json_error)
}

/// `inspect(path) -> str`: JSON of `{"index": ..., "report": ...}`.
#[pyfunction]
fn inspect_json(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    guarded(py, || describe(&UdeltaReader::open(&path)?))
}

/// Mirrors `udelta-gpu compress`; returns the files written.
#[pyfunction]
#[pyo3(signature = (base, finetuned, output, sparsity, bits, step, factor, seed, adapter,
    gpu_mem, include, exclude, embeddings, side_files, with_remote_code, model_name, verify,
    trace_norm, gamma, force, progress, target_size=None, target_ratio=None, dry_run=false))]
#[allow(clippy::too_many_arguments)]
fn compress(
    py: Python<'_>,
    base: PathBuf,
    finetuned: Vec<PathBuf>,
    output: PathBuf,
    sparsity: f64,
    bits: u32,
    step: f64,
    factor: f64,
    seed: u64,
    adapter: String,
    gpu_mem: String,
    include: Option<String>,
    exclude: Option<String>,
    embeddings: String,
    side_files: bool,
    with_remote_code: bool,
    model_name: Option<String>,
    verify: bool,
    trace_norm: bool,
    gamma: Option<f64>,
    force: bool,
    progress: bool,
    target_size: Option<String>,
    target_ratio: Option<f64>,
    dry_run: bool,
) -> PyResult<(Vec<PathBuf>, Option<String>)> {
    let params = CompressParams {
        sparsity,
        bits,
        step,
        factor,
        seed,
    };
    let run = || -> Result<(Vec<PathBuf>, Option<String>)> {
        let size = |what: &str, text: &str| {
            udelta_gpu::cli::parse_size(text)
                .map_err(|e| Error::Param(format!("{what} {text}: {e}")))
        };
        let gpu_mem = size("gpu_mem", &gpu_mem)?;
        let target = match (target_size.as_deref(), target_ratio) {
            (Some(_), Some(_)) => {
                return Err(Error::Param(
                    "give target_size or target_ratio, not both".into(),
                ))
            }
            (Some(text), None) => Some(SizeTarget::Bytes(size("target_size", text)?)),
            (None, Some(r)) => Some(SizeTarget::Ratio(r)),
            (None, None) => None,
        };
        params.validate()?;
        let opts = CompressOptions {
            params,
            selector: TensorSelector::new(include.as_deref(), exclude.as_deref())?
                .with_embeddings(embeddings.parse::<Embeddings>()?),
            model_name,
            force,
            verify,
            progress,
            trace_norm,
            gamma,
            side_files: SideFileOptions {
                omit: !side_files,
                remote_code: with_remote_code,
            },
            target,
        };
        if dry_run {
            let plan = udelta_gpu::pipeline::compress::dry_run(&base, &finetuned, &output, &opts)?;
            return Ok((
                Vec::new(),
                Some(serde_json::to_string(&plan).map_err(json_error)?),
            ));
        }
        let mut engine = udelta_gpu::engine::create(&adapter, gpu_mem)?;
        let out = udelta_gpu::pipeline::compress::compress(
            &base,
            &finetuned,
            &output,
            &opts,
            engine.as_mut(),
        )?;
        Ok((out.files.into_iter().map(|(f, _)| f).collect(), None))
    };
    guarded(py, || run().map_err(|e| e.for_output(&output)))
}

/// Mirrors `udelta-gpu decompress`.
#[pyfunction]
fn decompress(
    py: Python<'_>,
    input: PathBuf,
    base: PathBuf,
    output: PathBuf,
    delta_only: bool,
    force: bool,
    progress: bool,
) -> PyResult<()> {
    let opts = DecompressOptions {
        delta_only,
        force,
        progress,
    };
    guarded(py, || {
        udelta_gpu::pipeline::decompress::decompress(&input, &base, &output, &opts)
            .map_err(|e| e.for_output(&output))
    })
}

/// Mirrors `udelta-gpu rescale`; returns each file's new gamma.
#[pyfunction]
fn rescale(py: Python<'_>, files: Vec<PathBuf>) -> PyResult<Vec<f64>> {
    guarded(py, || udelta_gpu::pipeline::rescale::rescale(&files))
}

/// A host buffer handed over by address (`a.ctypes.data` / `t.data_ptr()`), because the
/// buffer protocol is not in the stable ABI before Python 3.11. The caller keeps the buffer
/// alive and contiguous, and nothing else touches it, for the duration of the call.
struct HostBytes {
    addr: usize,
    len: usize,
}

/// The buffer of `len` bytes at `addr` (a null address only for an empty buffer).
fn host_bytes(addr: usize, len: usize) -> PyResult<HostBytes> {
    if addr == 0 && len != 0 {
        return Err(UdeltaError::new_err("null buffer address"));
    }
    Ok(HostBytes { addr, len })
}

impl HostBytes {
    /// # Safety
    /// The caller's promise above; the slice must not outlive the call.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len)
    }
}

/// The float type of a safetensors dtype name, for tensor `name`.
fn float_type_of(name: &str, dtype: &str) -> PyResult<FloatType> {
    dtype_from_name(dtype)
        .and_then(FloatType::from_dtype)
        .ok_or_else(|| {
            UdeltaError::new_err(format!(
                "tensor '{name}': dtype {dtype} is not f16, bf16 or f32"
            ))
        })
}

/// CRC-32 (the format's checksum) of the `len` bytes at address `addr`: the buffer of a
/// contiguous NumPy array (`a.ctypes.data`, `a.nbytes`), see [`HostBytes`].
#[pyfunction]
fn crc32_at(py: Python<'_>, addr: usize, len: usize) -> PyResult<u32> {
    let bytes = host_bytes(addr, len)?;
    // SAFETY: see `HostBytes`; the slice is only read.
    guarded(py, || {
        Ok(udelta_gpu::format::index::crc32(unsafe { bytes.get() }))
    })
}

/// An opened `.udelta` file.
#[pyclass(module = "udelta._udelta", frozen)]
struct File {
    reader: Arc<UdeltaReader>,
}

impl File {
    fn record(&self, name: &str) -> Result<&TensorRecord> {
        self.reader
            .index
            .tensors
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                Error::format(
                    self.reader.path(),
                    format!("no tensor named '{name}' in this file"),
                )
            })
    }

    /// Runs `f` on the compressed tensor `name` with the GIL released; `not` says why
    /// another kind of record is refused.
    fn with_compressed<T: Send>(
        &self,
        py: Python<'_>,
        name: &str,
        not: &str,
        f: impl FnOnce(&UdeltaReader, &TensorRecord, &CompressedTensor) -> Result<T> + Send,
    ) -> PyResult<T> {
        self.with_record(py, name, |reader, r| match &r.kind {
            TensorKind::Compressed(c) => f(reader, r, c),
            _ => Err(self.not_kind(name, not)),
        })
    }

    fn not_kind(&self, name: &str, what: &str) -> Error {
        Error::format(self.reader.path(), format!("tensor '{name}': {what}"))
    }

    /// Runs `f` on the record `name` with the GIL released.
    fn with_record<T: Send>(
        &self,
        py: Python<'_>,
        name: &str,
        f: impl FnOnce(&UdeltaReader, &TensorRecord) -> Result<T> + Send,
    ) -> PyResult<T> {
        guarded(py, || f(&self.reader, self.record(name)?))
    }
}

fn bytes_of<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyByteArray> {
    PyByteArray::new(py, data)
}

#[pymethods]
impl File {
    #[new]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<File> {
        let reader = guarded(py, || UdeltaReader::open(&path))?;
        Ok(File {
            reader: Arc::new(reader),
        })
    }

    /// JSON of `{"index": ..., "report": ...}`.
    fn describe_json(&self, py: Python<'_>) -> PyResult<String> {
        guarded(py, || describe(&self.reader))
    }

    /// Kept positions (u32, little-endian) and the f32 values restoring adds there.
    fn kept<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<(Bound<'py, PyByteArray>, Bound<'py, PyByteArray>)> {
        let (positions, values) = self.with_record(py, name, |reader, r| match &r.kind {
            TensorKind::Compressed(c) => restore::kept_deltas(reader, r, c),
            _ => Err(self.not_kind(name, "not a compressed tensor: nothing is kept")),
        })?;
        let positions: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
        let values: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((bytes_of(py, &positions), bytes_of(py, &values)))
    }

    /// The dense f32 delta of a compressed tensor (little-endian bytes).
    fn delta<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyByteArray>> {
        let dense = self.with_record(py, name, |reader, r| match &r.kind {
            TensorKind::Compressed(c) => restore::dense_delta(reader, r, c),
            _ => Err(self.not_kind(name, "not a compressed tensor: it has no delta")),
        })?;
        let bytes: Vec<u8> = dense.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(bytes_of(py, &bytes))
    }

    /// The fine-tune's bytes of a tensor stored whole in the file: raw, or coded losslessly
    /// (against the base's tensor of checkpoint `base` when it was coded against one).
    #[pyo3(signature = (name, base=None))]
    fn stored<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        base: Option<PathBuf>,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let data = self.with_record(py, name, |reader, r| match &r.kind {
            TensorKind::Raw { data } => reader.read_record(data, &format!("tensor '{name}'")),
            TensorKind::Coded(c) => {
                let h = restore::header_of(reader, r)?;
                match (&c.base, &base) {
                    (None, _) => restore::restore_unchecked(reader, r, &h, None, None),
                    (Some(_), None) => Err(self.not_kind(
                        name,
                        "coded against the base's tensor: pass the base checkpoint (base=...)",
                    )),
                    (Some(_), Some(path)) => {
                        let ckpt = Arc::new(restore::open_base(path, reader)?);
                        let source = restore::BaseSource {
                            base: &ckpt,
                            reader,
                            force: false,
                        };
                        let (entry, _) = source.needs(r)?.expect("a coded tensor with a base");
                        let mut bytes = Vec::new();
                        ckpt.read_tensor(entry, &mut bytes)?;
                        restore::restore(reader, &source, r, &h, Some(bytes))
                    }
                }
            }
            _ => Err(self.not_kind(name, "not stored whole in the file")),
        })?;
        Ok(bytes_of(py, &data))
    }

    /// Checks a base tensor held elsewhere (`origin`, e.g. "model") against what the file
    /// recorded for `name`: dtype, shape and, when given, the CRC-32 of its bytes.
    #[pyo3(signature = (name, origin, dtype, shape, crc32=None))]
    fn check_base(
        &self,
        py: Python<'_>,
        name: &str,
        origin: &str,
        dtype: &str,
        shape: Vec<usize>,
        crc32: Option<u32>,
    ) -> PyResult<()> {
        self.with_record(py, name, |reader, r| {
            let Some((want, want_shape, want_crc)) = restore::base_expectation(r) else {
                return Ok(());
            };
            if dtype != want || shape != want_shape {
                let msg =
                    restore::wrong_kind_message(reader.path(), dtype, &shape, want, want_shape);
                return Err(Error::tensor(origin, name, msg));
            }
            if crc32.is_some_and(|crc| crc != want_crc) {
                let msg = restore::wrong_bytes_message(reader.path());
                return Err(Error::tensor(origin, name, msg));
            }
            Ok(())
        })
    }

    /// Applies compressed tensor `name` in place to the `nbytes` bytes at address `addr` (a
    /// contiguous host buffer of the base tensor, of safetensors dtype `dtype`, that the caller
    /// keeps alive and does not touch during the call): the kept entries become
    /// `dtype(f32(base) + delta)`, as restoring computes them. Returns the base values it
    /// overwrote (`dtype`, kept order), for `undo_at`.
    fn apply_at<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        addr: usize,
        nbytes: usize,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let ty = float_type_of(name, dtype)?;
        let bytes = host_bytes(addr, nbytes)?;
        const NOT: &str = "not a compressed tensor: nothing to apply in place";
        let len = self.with_compressed(py, name, NOT, |reader, r, c| {
            restore::overwritten_len(reader, r, c, ty)
        })?;
        // The record is written straight into the new bytearray (no copy), which nothing else
        // references until it is returned.
        PyByteArray::new_with(py, len, |old| {
            self.with_compressed(py, name, NOT, |reader, r, c| {
                // SAFETY: see `host_bytes`; this call is the buffer's only user meanwhile.
                restore::apply_kept_in_place(reader, r, c, unsafe { bytes.get() }, ty, old)
            })
        })
    }

    /// Puts back in the buffer at `addr` (as for `apply_at`) the base values `apply_at`
    /// returned for `name`, given as the `old_len` bytes at `old_addr`.
    #[allow(clippy::too_many_arguments)]
    fn undo_at(
        &self,
        py: Python<'_>,
        name: &str,
        addr: usize,
        nbytes: usize,
        dtype: &str,
        old_addr: usize,
        old_len: usize,
    ) -> PyResult<()> {
        let ty = float_type_of(name, dtype)?;
        let bytes = host_bytes(addr, nbytes)?;
        let old = host_bytes(old_addr, old_len)?;
        const NOT: &str = "not a compressed tensor: nothing to undo in place";
        self.with_compressed(py, name, NOT, |reader, r, c| {
            // SAFETY: see `host_bytes`; the two buffers are distinct and used only here.
            unsafe { restore::undo_kept_in_place(reader, r, c, bytes.get(), ty, old.get()) }
        })
    }

    /// Switches compressed tensor `name` in the buffer at `addr` (as for `apply_at`), which
    /// holds the fine-tune of `from_file` (applied with `apply_at`, which returned the
    /// `old_len` bytes at `old_addr`), to this file's fine-tune in one pass over the tensor:
    /// the same bytes as `from_file.undo_at` then `apply_at`. Returns the base values this
    /// file overwrote. On error the buffer holds `from_file`'s fine-tune again.
    #[allow(clippy::too_many_arguments)]
    fn swap_at<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        addr: usize,
        nbytes: usize,
        dtype: &str,
        from_file: PyRef<'_, File>,
        old_addr: usize,
        old_len: usize,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let ty = float_type_of(name, dtype)?;
        let bytes = host_bytes(addr, nbytes)?;
        let from_old = host_bytes(old_addr, old_len)?;
        let from = &*from_file;
        let both = || {
            let (from_r, to_r) = (from.record(name)?, self.record(name)?);
            match (&from_r.kind, &to_r.kind) {
                (TensorKind::Compressed(f), TensorKind::Compressed(t)) => Ok((from_r, f, to_r, t)),
                _ => Err(self.not_kind(name, "not compressed in both files: no swap in place")),
            }
        };
        let len = guarded(py, || {
            let (_, _, to_r, to_c) = both()?;
            restore::overwritten_len(&self.reader, to_r, to_c, ty)
        })?;
        // As in `apply_at`: the record is written straight into the new bytearray.
        PyByteArray::new_with(py, len, |old| {
            guarded(py, || {
                let (from_r, from_c, to_r, to_c) = both()?;
                // SAFETY: see `host_bytes`; the three buffers are distinct and used only here.
                unsafe {
                    restore::swap_kept_in_place(
                        (&from.reader, from_r, from_c),
                        from_old.get(),
                        (&self.reader, to_r, to_c),
                        bytes.get(),
                        ty,
                        old,
                    )
                }
            })
        })
    }

    /// The fine-tuned bytes of `name` from the base's bytes (dtype `base_dtype`), already
    /// checked with `check_base`.
    #[pyo3(signature = (name, base_bytes=None, base_dtype=None))]
    fn restore<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        base_bytes: Option<&[u8]>,
        base_dtype: Option<String>,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let out = self.with_record(py, name, |reader, r| {
            let h = restore::header_of(reader, r)?;
            let base_type = base_dtype
                .as_deref()
                .and_then(dtype_from_name)
                .and_then(FloatType::from_dtype);
            restore::restore_unchecked(reader, r, &h, base_type, base_bytes.map(<[u8]>::to_vec))
        })?;
        Ok(bytes_of(py, &out))
    }
}

/// Every tensor of a `.udelta` file restored against a base checkpoint, in file order.
#[pyclass(module = "udelta._udelta")]
struct Restorer {
    inner: restore::Restorer,
}

#[pymethods]
impl Restorer {
    #[new]
    #[pyo3(signature = (path, base, force=false, progress=false))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        base: PathBuf,
        force: bool,
        progress: bool,
    ) -> PyResult<Restorer> {
        let inner = guarded(py, || {
            restore::Restorer::open(&path, &base, force, progress)
        })?;
        Ok(Restorer { inner })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// `(name, dtype, shape, bytes)` of the next tensor.
    #[allow(clippy::type_complexity)]
    fn __next__<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<Option<(String, String, Vec<usize>, Bound<'py, PyByteArray>)>> {
        let inner = &mut self.inner;
        let Some((h, bytes)) = guarded(py, || inner.next_tensor().transpose())? else {
            return Ok(None);
        };
        let dtype = udelta_gpu::checkpoint::dtype::dtype_name(h.dtype);
        Ok(Some((h.name, dtype, h.shape, bytes_of(py, &bytes))))
    }
}

#[pymodule]
fn _udelta(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("UdeltaError", m.py().get_type::<UdeltaError>())?;
    m.add_function(wrap_pyfunction!(inspect_json, m)?)?;
    m.add_function(wrap_pyfunction!(compress, m)?)?;
    m.add_function(wrap_pyfunction!(decompress, m)?)?;
    m.add_function(wrap_pyfunction!(rescale, m)?)?;
    m.add_function(wrap_pyfunction!(crc32_at, m)?)?;
    m.add_class::<File>()?;
    m.add_class::<Restorer>()?;
    Ok(())
}
