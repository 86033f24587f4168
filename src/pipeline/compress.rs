//! `compress`: base + fine-tuned checkpoints -> one `.udelta` file.
//!
//! Pass 1 reads every tensor pair once: compressed tensors go through [`Engine::analyze`],
//! the others are compared with the base (unchanged ones cost nothing). The allocation plan
//! is then made from all standard deviations, and pass 2 reads the compressed tensors again,
//! selects the kept entries ([`Engine::select`]), entropy-codes them and appends the records.

use crate::algorithm::rescale;
use crate::algorithm::selection::adjusted_rate;
use crate::algorithm::{
    allocate_rates, Allocation, CompressParams, SelectionPlan, TensorKey, TensorStats,
};
use crate::checkpoint::dtype::{dtype_name, FloatType};
use crate::checkpoint::reader::{Checkpoint, Layout, TensorEntry};
use crate::checkpoint::select::TensorSelector;
use crate::checkpoint::side_files::SideFileOptions;
use crate::codec;
use crate::engine::{cpu::CpuEngine, DeltaInput, Engine, EngineError};
use crate::error::{Error, Result};
use crate::format::index::{crc32, BaseInfo, ModelInfo, ShardInfo, SourceLayout};
use crate::format::{
    CompressedTensor, FileIndex, TensorKind, TensorRecord, UdeltaWriter, FORMAT_VERSION,
};
use crate::progress::Progress;
use crate::staging::{check_output, OutputKind, StagedPath};
use crate::tracenorm::{DeltaValues, EstimatorOptions, SparseDelta};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::norm_worker::NormWorker;
use super::prefetch::{Prefetch, ReadJob, TensorRead};

/// Bytes per read when comparing or copying tensors that are not compressed.
const COPY_CHUNK: u64 = 64 << 20;

/// What the user asked for besides the two checkpoints.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// UltraDelta parameters.
    pub params: CompressParams,
    /// Which tensors are compressed.
    pub selector: TensorSelector,
    /// Model name for the selection hash (default: the fine-tuned path's last component).
    pub model_name: Option<String>,
    /// Replace an existing output.
    pub force: bool,
    /// Recompute every tensor on the CPU engine and fail on any difference.
    pub verify: bool,
    /// Show progress bars.
    pub progress: bool,
    /// Estimate each model's trace norm `T_m` (always done when several fine-tunes are
    /// compressed together; with one, needed only to `rescale` files compressed separately).
    pub trace_norm: bool,
    /// Use this gamma for every model instead of the trace-norm rule.
    pub gamma: Option<f64>,
    /// Which of the fine-tuned directory's other files (config, tokenizer) are carried.
    pub side_files: SideFileOptions,
}

/// Wall time spent in each stage, in seconds (stages run one after another on this thread).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTimes {
    /// Waiting for tensors to be read in pass 1 (reads run ahead on their own thread, so this
    /// is only the part the compute did not hide).
    pub read: f64,
    /// The same in pass 2, which reads the compressed tensors again (most of them from the
    /// page cache: it takes them in reverse order).
    pub read_pass2: f64,
    /// Comparing uncompressed tensors with the base.
    pub compare: f64,
    /// Engine pass 1 (min/max, histograms).
    pub analyze: f64,
    /// Engine pass 2 (levels, selection, compaction).
    pub select: f64,
    /// Entropy coding.
    pub encode: f64,
    /// Writing records (raw tensors included) and the index.
    pub write: f64,
    /// Recomputing on the CPU engine (`--verify`).
    pub verify: f64,
    /// Nuclear-norm estimates. With the CPU engine they run on their own thread, beside the
    /// other stages, and this is that thread's busy time.
    pub trace_norm: f64,
    /// Waiting, after the last tensor, for the nuclear norms still running on their thread.
    pub trace_norm_wait: f64,
}

/// Times a closure into one of the stage counters.
fn timed<T>(slot: &mut f64, f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let r = f();
    *slot += t.elapsed().as_secs_f64();
    r
}

/// What a finished compression produced.
#[derive(Debug, Clone)]
pub struct CompressOutcome {
    /// The `.udelta` files written, one per fine-tune, with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// The engine that ran.
    pub engine: String,
    /// Where the time went.
    pub times: StageTimes,
}

/// The name a fine-tuned checkpoint path gives its model: the last path component, without
/// a `.safetensors` extension.
pub fn model_name_of(path: &Path) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".safetensors")
        .map(str::to_string)
        .unwrap_or(name)
}

/// How one fine-tuned tensor will be stored, once pass 1 has seen it.
enum Plan {
    Unchanged {
        base_crc32: u32,
    },
    Raw,
    Compress {
        base: usize,
        shared_numel: usize,
        stats: TensorStats,
        base_crc32: u32,
        allocation: Option<Allocation>,
    },
}

/// One fine-tune being compressed.
struct Model {
    name: String,
    ckpt: Arc<Checkpoint>,
    writer: UdeltaWriter,
    kinds: Vec<Kind>,
    plans: Vec<Option<Plan>>,
    records: Vec<Option<TensorRecord>>,
    /// Sum of the nuclear norms of the compressed, rescaled 2-D deltas.
    trace_norm: f64,
    /// The fine-tuned directory's side files, already in the file.
    side_files: Vec<crate::format::side_files::SideFileEntry>,
}

/// Decides how a fine-tuned tensor is handled, before reading any data.
enum Kind {
    Compare(usize),
    Raw,
    Compress(usize, usize),
}

fn classify(
    base: &Checkpoint,
    ft: &Checkpoint,
    t: &TensorEntry,
    selector: &TensorSelector,
) -> Result<Kind> {
    let ft_path = ft.shard_path(t);
    let Some(bi) = base.tensors.iter().position(|b| b.name == t.name) else {
        return Ok(Kind::Raw);
    };
    let b = &base.tensors[bi];
    let grown = t.shape.len() == b.shape.len()
        && !t.shape.is_empty()
        && t.shape[0] > b.shape[0]
        && t.shape[1..] == b.shape[1..];
    if t.shape != b.shape && !grown {
        return Err(Error::tensor(
            ft_path,
            &t.name,
            format!(
                "shape {:?} does not match the base's {:?} ({}): is this the right base?",
                t.shape,
                b.shape,
                base.shard_path(b).display()
            ),
        ));
    }
    // A tensor the base would have compressed must be compressible in the fine-tune too: an
    // integer (e.g. quantized) fine-tune of a float base is not a delta this tool can take.
    if selector.selects(&b.name, &b.shape, b.dtype) && t.float_type().is_none() {
        return Err(Error::tensor(
            ft_path,
            &t.name,
            format!(
                "dtype {} where the base has {}: only f16, bf16 and f32 tensors can be compressed",
                dtype_name(t.dtype),
                dtype_name(b.dtype)
            ),
        ));
    }
    let selected = selector.selects(&t.name, &t.shape, t.dtype) && b.float_type().is_some();
    if selected {
        let shared = b.numel();
        if shared > u32::MAX as u64 {
            return Err(Error::tensor(
                ft_path,
                &t.name,
                "more than 2^32 elements: too large to compress",
            ));
        }
        return Ok(Kind::Compress(bi, shared as usize));
    }
    if grown || b.dtype != t.dtype {
        return Ok(Kind::Raw);
    }
    Ok(Kind::Compare(bi))
}

/// Compares a fine-tuned tensor with the base chunk by chunk; returns the base CRC-32 when equal.
fn compare(
    base: &Checkpoint,
    b: &TensorEntry,
    ft: &Checkpoint,
    t: &TensorEntry,
    progress: &Progress,
) -> Result<Option<u32>> {
    let mut hasher = crc32fast::Hasher::new();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < t.len {
        let n = COPY_CHUNK.min(t.len - start) as usize;
        x.resize(n, 0);
        y.resize(n, 0);
        base.read_range(b, start, &mut x)?;
        ft.read_range(t, start, &mut y)?;
        progress.inc(2 * n as u64);
        if x != y {
            progress.inc(2 * (t.len - start - n as u64));
            return Ok(None);
        }
        hasher.update(&x);
        start += n as u64;
    }
    Ok(Some(hasher.finalize()))
}

/// A checkpoint without tensors is refused: nothing could be compressed against or from it.
fn refuse_empty(c: &Checkpoint) -> Result<()> {
    if c.tensors.is_empty() {
        return Err(Error::checkpoint(
            &c.path,
            "holds no tensors (an empty checkpoint)",
        ));
    }
    Ok(())
}

/// An engine failure on one tensor pair, naming the file it comes from: the base's file when
/// the offending value is the base's (a NaN or infinity there), else the fine-tune's.
fn engine_error(base_path: &Path, ft_path: &Path, tensor: &str, e: EngineError) -> Error {
    match e {
        EngineError::NonFinite { base, .. } if !base.is_finite() => Error::tensor(
            base_path,
            tensor,
            format!("the base holds a non-finite value: {e}"),
        ),
        EngineError::Gpu(m) => Error::tensor(ft_path, tensor, format!("GPU engine: {m}")),
        other => Error::tensor(ft_path, tensor, other.to_string()),
    }
}

fn float_type(c: &Checkpoint, t: &TensorEntry) -> Result<FloatType> {
    t.float_type().ok_or_else(|| {
        Error::tensor(
            c.shard_path(t),
            &t.name,
            format!("dtype {} cannot be compressed", dtype_name(t.dtype)),
        )
    })
}

/// Opens a fine-tune and checks it against the base before any data is read.
fn open_model(
    base: &Checkpoint,
    path: &Path,
    name: String,
    out: &Path,
    opts: &CompressOptions,
) -> Result<Model> {
    let ckpt = Checkpoint::open(path)?;
    refuse_empty(&ckpt)?;
    let mut writer = UdeltaWriter::create(out, opts.force)?;
    let side_files = super::side_files::carry(
        base.path.as_path(),
        &ckpt,
        &mut writer,
        opts.side_files,
        !opts.progress,
    )?;
    // A fine-tune may drop buffers (newer exports omit `position_ids`), but a missing tensor
    // that would be compressed means a truncated or wrong checkpoint.
    for missing in base.tensors.iter().filter(|b| ckpt.get(&b.name).is_none()) {
        if opts
            .selector
            .selects(&missing.name, &missing.shape, missing.dtype)
        {
            return Err(Error::tensor(
                path,
                &missing.name,
                format!(
                    "missing from the fine-tuned checkpoint but present in the base {}",
                    base.shard_path(missing).display()
                ),
            ));
        }
        if opts.progress {
            eprintln!("note: base tensor '{}' is not in {}; the restored checkpoint will not have it either", missing.name, path.display());
        }
    }
    let kinds = ckpt
        .tensors
        .iter()
        .map(|t| classify(base, &ckpt, t, &opts.selector))
        .collect::<Result<Vec<_>>>()?;
    let n = ckpt.tensors.len();
    Ok(Model {
        name,
        ckpt: Arc::new(ckpt),
        writer,
        kinds,
        plans: (0..n).map(|_| None).collect(),
        records: vec![None; n],
        trace_norm: 0.0,
        side_files,
    })
}

/// The reads one tensor name needs: the base tensor, then the fine-tuned tensor of each model
/// that compresses it, in model order (nothing when no model compresses it).
fn compress_reads(name: &str, base: &Arc<Checkpoint>, models: &[Model]) -> ReadJob {
    let mut job = Vec::new();
    for m in models {
        let Some(ti) = m.ckpt.tensors.iter().position(|t| t.name == name) else {
            continue;
        };
        if let Kind::Compress(bi, _) = m.kinds[ti] {
            if job.is_empty() {
                job.push(TensorRead {
                    ckpt: base.clone(),
                    tensor: base.tensors[bi].clone(),
                });
            }
            job.push(TensorRead {
                ckpt: m.ckpt.clone(),
                tensor: m.ckpt.tensors[ti].clone(),
            });
        }
    }
    job
}

/// Tensor names in processing order: the first fine-tune's order, then any other names.
fn schedule(models: &[Model]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    for m in models {
        for t in &m.ckpt.tensors {
            if seen.insert(t.name.clone()) {
                order.push(t.name.clone());
            }
        }
    }
    order
}

/// Compresses each fine-tune in `finetuned` against `base` with `engine`. With one fine-tune
/// `out` is the `.udelta` file; with several it is a directory that receives `NAME.udelta` per
/// fine-tune (NAME = the path's last component), and the base is read once per tensor for all.
pub fn compress(
    base_path: &Path,
    finetuned: &[PathBuf],
    out: &Path,
    opts: &CompressOptions,
    engine: &mut dyn Engine,
) -> Result<CompressOutcome> {
    opts.params.validate()?;
    if finetuned.is_empty() {
        return Err(Error::Param(
            "at least one --finetuned checkpoint is needed".into(),
        ));
    }
    if finetuned.len() > 1 && opts.model_name.is_some() {
        return Err(Error::Param(
            "--model-name applies to a single --finetuned checkpoint".into(),
        ));
    }
    let kind = if finetuned.len() > 1 {
        OutputKind::Dir
    } else {
        OutputKind::File
    };
    let inputs: Vec<&Path> = std::iter::once(base_path)
        .chain(finetuned.iter().map(PathBuf::as_path))
        .collect();
    check_output(out, kind, opts.force, &inputs)?;
    let staged_dir = (finetuned.len() > 1)
        .then(|| StagedPath::new(out, opts.force))
        .transpose()?;
    if let Some(d) = &staged_dir {
        std::fs::create_dir(d.path()).map_err(|e| Error::io(out, e))?;
    }
    let base = Arc::new(Checkpoint::open(base_path)?);
    refuse_empty(&base)?;
    let mut models = Vec::with_capacity(finetuned.len());
    for path in finetuned {
        let name = opts
            .model_name
            .clone()
            .unwrap_or_else(|| model_name_of(path));
        if models.iter().any(|m: &Model| m.name == name) {
            return Err(Error::Param(format!(
                "two fine-tunes are named '{name}': their files would collide"
            )));
        }
        let file = match &staged_dir {
            Some(d) => d.path().join(format!("{name}.udelta")),
            None => out.to_path_buf(),
        };
        models.push(open_model(&base, path, name, &file, opts)?);
    }
    if let Some(g) = opts.gamma {
        if !(g.is_finite() && g > 0.0) {
            return Err(Error::Param(format!(
                "--gamma {g} must be a finite number > 0"
            )));
        }
    }
    let with_trace_norm = opts.trace_norm || models.len() > 1;
    let order = schedule(&models);
    let mut times = StageTimes::default();

    // Pass 1: statistics of compressed tensors; comparison of the others.
    let pass1_bytes: u64 = models
        .iter()
        .map(|m| {
            m.ckpt
                .tensors
                .iter()
                .zip(&m.kinds)
                .map(|(t, k)| match k {
                    Kind::Raw => 0,
                    Kind::Compare(bi) | Kind::Compress(bi, _) => t.len + base.tensors[*bi].len,
                })
                .sum::<u64>()
        })
        .sum();
    let progress = Progress::new("analyze", pass1_bytes, opts.progress);
    let mut loads = Prefetch::start(
        order
            .iter()
            .map(|n| compress_reads(n, &base, &models))
            .collect(),
    );
    for name in &order {
        let mut loaded = timed(&mut times.read, || loads.next_job())?.into_iter();
        // Empty when no model compresses this tensor.
        let base_buf = loaded.next().unwrap_or_default();
        for m in models.iter_mut() {
            let Some(ti) = m.ckpt.tensors.iter().position(|t| &t.name == name) else {
                continue;
            };
            let t = &m.ckpt.tensors[ti];
            m.plans[ti] = Some(match m.kinds[ti] {
                Kind::Raw => Plan::Raw,
                Kind::Compare(bi) => match timed(&mut times.compare, || {
                    compare(&base, &base.tensors[bi], &m.ckpt, t, &progress)
                })? {
                    Some(base_crc32) => Plan::Unchanged { base_crc32 },
                    None => Plan::Raw,
                },
                Kind::Compress(bi, shared_numel) => {
                    let b = &base.tensors[bi];
                    let ft_buf = loaded.next().expect("one read per compressing model");
                    let input = DeltaInput::new(
                        &base_buf,
                        float_type(&base, b)?,
                        &ft_buf,
                        float_type(&m.ckpt, t)?,
                        shared_numel,
                    );
                    let fail =
                        |e| engine_error(base.shard_path(b), m.ckpt.shard_path(t), &t.name, e);
                    let stats = timed(&mut times.analyze, || {
                        engine.analyze(&input, opts.params.bits)
                    })
                    .map_err(fail)?;
                    if opts.verify
                        && timed(&mut times.verify, || {
                            CpuEngine.analyze(&input, opts.params.bits)
                        })
                        .map_err(fail)?
                            != stats
                    {
                        return Err(Error::Gpu(format!("--verify: tensor '{}': engine statistics differ from the CPU reference", t.name)));
                    }
                    progress.inc(b.len + t.len);
                    loads.recycle([ft_buf]);
                    Plan::Compress {
                        base: bi,
                        shared_numel,
                        stats,
                        base_crc32: crc32(&base_buf),
                        allocation: None,
                    }
                }
            });
        }
        loads.recycle([base_buf]);
    }
    drop(loads);
    progress.finish();

    // The allocation plan of each model over its compressed tensors.
    for m in models.iter_mut() {
        let stds: Vec<(u64, f64)> = m
            .plans
            .iter()
            .filter_map(|p| match p {
                Some(Plan::Compress {
                    shared_numel,
                    stats,
                    ..
                }) => Some((*shared_numel as u64, stats.std_dev())),
                _ => None,
            })
            .collect();
        let mut allocations = allocate_rates(&stds, &opts.params).into_iter();
        for p in m.plans.iter_mut() {
            if let Some(Plan::Compress { allocation, .. }) = p {
                *allocation = allocations.next();
            }
        }
    }

    // Pass 2: selection, coding, records.
    let pass2_bytes: u64 = models
        .iter()
        .map(|m| {
            m.ckpt
                .tensors
                .iter()
                .zip(&m.plans)
                .map(|(t, p)| match p {
                    Some(Plan::Raw) => t.len,
                    Some(Plan::Compress { base: bi, .. }) => t.len + base.tensors[*bi].len,
                    _ => 0,
                })
                .sum::<u64>()
        })
        .sum();
    let progress = Progress::new("compress", pass2_bytes, opts.progress);
    // Raw tensors first: the disk writes them back while the compressed ones are computed.
    // The compressed ones follow in reverse order: those pass 1 read last are the likeliest
    // to be still in the page cache when the checkpoints are larger than memory.
    let compress_order: Vec<&String> = order.iter().rev().collect();
    let mut loads = Prefetch::start(
        compress_order
            .iter()
            .map(|n| compress_reads(n, &base, &models))
            .collect(),
    );
    // With a host-side estimator the nuclear norms run on their own thread, beside the reads
    // and the selection of the next tensors (inline if the thread cannot start).
    let norm_worker = (with_trace_norm && engine.nuclear_norm_on_host())
        .then(|| NormWorker::start(EstimatorOptions::default()).ok())
        .flatten();
    let rounds = order
        .iter()
        .map(|n| (true, n))
        .chain(compress_order.iter().map(|n| (false, *n)));
    for (raw_round, name) in rounds {
        let mut loaded = if raw_round {
            Vec::new()
        } else {
            timed(&mut times.read_pass2, || loads.next_job())?
        }
        .into_iter();
        let base_buf = loaded.next().unwrap_or_default();
        let mut base_checked = false;
        for (mi, m) in models.iter_mut().enumerate() {
            let Some(ti) = m.ckpt.tensors.iter().position(|t| &t.name == name) else {
                continue;
            };
            match &m.plans[ti] {
                Some(Plan::Raw) if raw_round => {}
                Some(plan) if !raw_round && !matches!(plan, Plan::Raw) => {}
                _ => continue,
            }
            let t = &m.ckpt.tensors[ti];
            let kind = match m.plans[ti].take().expect("pass 1 planned every tensor") {
                Plan::Unchanged { base_crc32 } => TensorKind::Unchanged { base_crc32 },
                Plan::Raw => {
                    let t0 = std::time::Instant::now();
                    let mut start = 0u64;
                    let data = m.writer.append_chunks(|buf| {
                        if start >= t.len {
                            return Ok(false);
                        }
                        let n = COPY_CHUNK.min(t.len - start) as usize;
                        buf.resize(n, 0);
                        m.ckpt.read_range(t, start, buf)?;
                        start += n as u64;
                        progress.inc(n as u64);
                        Ok(true)
                    })?;
                    times.write += t0.elapsed().as_secs_f64();
                    TensorKind::Raw { data }
                }
                Plan::Compress {
                    base: bi,
                    shared_numel,
                    stats,
                    base_crc32,
                    allocation,
                } => {
                    let b = &base.tensors[bi];
                    if !base_checked {
                        if crc32(&base_buf) != base_crc32 {
                            return Err(Error::tensor(
                                base.shard_path(b),
                                &b.name,
                                "the base changed on disk during compression",
                            ));
                        }
                        base_checked = true;
                    }
                    let ft_buf = loaded.next().expect("one read per compressing model");
                    let ft_type = float_type(&m.ckpt, t)?;
                    let input = DeltaInput::new(
                        &base_buf,
                        float_type(&base, b)?,
                        &ft_buf,
                        ft_type,
                        shared_numel,
                    );
                    let allocation = allocation.expect("one allocation per compressed tensor");
                    let selection = SelectionPlan::new(
                        TensorKey::new(opts.params.seed, &m.name, &t.name),
                        &stats,
                        allocation.rate,
                    );
                    let fail =
                        |e| engine_error(base.shard_path(b), m.ckpt.shard_path(t), &t.name, e);
                    let kept = timed(&mut times.select, || {
                        engine.select(&input, &stats, &selection)
                    })
                    .map_err(fail)?;
                    if opts.verify
                        && timed(&mut times.verify, || {
                            CpuEngine.select(&input, &stats, &selection)
                        })
                        .map_err(fail)?
                            != kept
                    {
                        return Err(Error::Gpu(format!("--verify: tensor '{}': engine kept entries differ from the CPU reference", t.name)));
                    }
                    let kept_counts = selection.kept_counts();
                    let enc = timed(&mut times.encode, || {
                        codec::encode_tensor(
                            shared_numel as u64,
                            &kept.positions,
                            &kept.levels,
                            &kept_counts,
                        )
                    })
                    .map_err(|e| {
                        Error::tensor(
                            m.ckpt.shard_path(t),
                            &t.name,
                            format!("encoding failed: {e}"),
                        )
                    })?;
                    // After encoding, so that the worker can take the positions over.
                    if with_trace_norm && b.shape.len() == 2 {
                        let table = stats.grid.scaled_values(opts.params.rescale());
                        let (rows, cols) = (b.shape[0], b.shape[1]);
                        if let Some(worker) = &norm_worker {
                            worker.submit(mi, (rows, cols), kept.positions, kept.levels, table);
                        } else {
                            let delta = SparseDelta {
                                rows,
                                cols,
                                positions: &kept.positions,
                                values: DeltaValues::Coded {
                                    codes: &kept.levels,
                                    table: &table,
                                },
                            };
                            m.trace_norm += timed(&mut times.trace_norm, || {
                                engine.nuclear_norm(&delta, &EstimatorOptions::default())
                            })
                            .map_err(fail)?;
                        }
                    }
                    let tail_start = shared_numel * ft_type.size();
                    let writer = &mut m.writer;
                    let (positions, levels, tail) = timed(&mut times.write, || -> Result<_> {
                        let tail = (ft_buf.len() > tail_start)
                            .then(|| writer.append(&ft_buf[tail_start..]))
                            .transpose()?;
                        Ok((
                            writer.append(&enc.positions)?,
                            writer.append(&enc.levels)?,
                            tail,
                        ))
                    })?;
                    progress.inc(b.len + t.len);
                    loads.recycle([ft_buf]);
                    TensorKind::Compressed(Box::new(CompressedTensor {
                        base_dtype: dtype_name(b.dtype),
                        base_shape: b.shape.clone(),
                        base_crc32,
                        shared_numel: shared_numel as u64,
                        lo_bits: stats.grid.lo.to_bits(),
                        hi_bits: stats.grid.hi.to_bits(),
                        bits: opts.params.bits,
                        group: allocation.group,
                        rate: allocation.rate,
                        adjusted_rate: adjusted_rate(allocation.rate, stats.zero_fraction()),
                        std: stats.std_dev(),
                        histogram: stats.histogram.clone(),
                        kept_counts,
                        blocks: enc.blocks,
                        positions,
                        levels,
                        tail,
                    }))
                }
            };
            m.records[ti] = Some(TensorRecord {
                name: t.name.clone(),
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                shard: t.shard,
                kind,
            });
        }
        loads.recycle([base_buf]);
    }
    drop(loads);
    progress.finish();

    if let Some(worker) = norm_worker {
        let wait = std::time::Instant::now();
        let (estimates, seconds) = worker.finish();
        times.trace_norm_wait += wait.elapsed().as_secs_f64();
        times.trace_norm += seconds;
        // In submission order: the same sums as inline.
        for (mi, estimate) in estimates {
            models[mi].trace_norm += estimate;
        }
    }
    let rescale = opts.params.rescale();
    let norms: Vec<f64> = models.iter().map(|m| m.trace_norm).collect();
    let gammas = match opts.gamma {
        Some(g) => vec![g; models.len()],
        None if with_trace_norm => rescale::gammas(&norms).map_err(Error::Param)?,
        None => vec![1.0; models.len()],
    };
    let mut files = Vec::with_capacity(models.len());
    for (m, gamma) in models.into_iter().zip(gammas) {
        let records: Vec<TensorRecord> = m
            .records
            .into_iter()
            .map(|r| r.expect("pass 2 wrote every tensor"))
            .collect();
        let index = FileIndex {
            format_version: FORMAT_VERSION,
            tool: format!("udelta-gpu {}", env!("CARGO_PKG_VERSION")),
            engine: engine.name(),
            params: opts.params,
            model: ModelInfo {
                name: m.name,
                rescale,
                gamma,
                trace_norm: with_trace_norm.then_some(m.trace_norm),
                scale: gamma * rescale,
            },
            base: base_info(&records),
            source: source_layout(&m.ckpt),
            tensors: records,
            side_files: m.side_files,
        };
        let target = m.writer.target().to_path_buf();
        let bytes = timed(&mut times.write, || m.writer.finish(&index))?;
        files.push((target, bytes));
    }
    if let Some(d) = staged_dir {
        d.commit()?;
        for (f, _) in files.iter_mut() {
            *f = out.join(f.file_name().expect("a file name"));
        }
    }
    Ok(CompressOutcome {
        files,
        engine: engine.name(),
        times,
    })
}

/// The base fingerprint: CRC-32 over the names and base CRC-32s of every base tensor used.
fn base_info(records: &[TensorRecord]) -> BaseInfo {
    let mut h = crc32fast::Hasher::new();
    let mut used = 0;
    for r in records {
        let crc = match &r.kind {
            TensorKind::Unchanged { base_crc32 } => *base_crc32,
            TensorKind::Compressed(c) => c.base_crc32,
            TensorKind::Raw { .. } => continue,
        };
        h.update(r.name.as_bytes());
        h.update(&crc.to_le_bytes());
        used += 1;
    }
    BaseInfo {
        fingerprint: format!("{:08x}", h.finalize()),
        tensors: used,
    }
}

/// How the fine-tune was laid out, for decompression.
fn source_layout(ckpt: &Checkpoint) -> SourceLayout {
    SourceLayout {
        layout: match ckpt.layout {
            Layout::SingleFile => "single",
            Layout::Directory => "directory",
            Layout::Sharded => "sharded",
        }
        .to_string(),
        shards: ckpt
            .shards
            .iter()
            .map(|s| ShardInfo {
                file_name: s.file_name.clone(),
                metadata: s.metadata.clone(),
            })
            .collect(),
        index_metadata: ckpt.index_metadata.clone(),
    }
}
