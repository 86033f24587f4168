//! `compress`: base + fine-tuned checkpoints -> one `.udelta` file.
//!
//! Pass 1 reads every tensor pair once: compressed tensors go through [`Engine::analyze`],
//! the others are compared with the base (unchanged ones cost nothing). The allocation plan
//! is then made from all standard deviations, and pass 2 reads the compressed tensors again,
//! selects the kept entries ([`Engine::select`]), entropy-codes them and appends the records.

use crate::algorithm::selection::adjusted_rate;
use crate::algorithm::{allocate_rates, Allocation, CompressParams, SelectionPlan, TensorKey, TensorStats};
use crate::checkpoint::dtype::{dtype_name, FloatType};
use crate::checkpoint::reader::{Checkpoint, Layout, TensorEntry};
use crate::checkpoint::select::TensorSelector;
use crate::codec;
use crate::engine::{cpu::CpuEngine, DeltaInput, Engine, EngineError};
use crate::error::{Error, Result};
use crate::format::index::{crc32, BaseInfo, ModelInfo, ShardInfo, SourceLayout};
use crate::format::{CompressedTensor, FileIndex, TensorKind, TensorRecord, UdeltaWriter, FORMAT_VERSION};
use crate::progress::Progress;
use std::path::{Path, PathBuf};

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
}

/// Wall time spent in each stage, in seconds (stages run one after another on this thread).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTimes {
    /// Reading tensors from the checkpoints (both passes).
    pub read: f64,
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
    /// The `.udelta` file written.
    pub path: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// The engine that ran.
    pub engine: String,
    /// Where the time went.
    pub times: StageTimes,
}

/// The name a fine-tuned checkpoint path gives its model: the last path component, without
/// a `.safetensors` extension.
pub fn model_name_of(path: &Path) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    name.strip_suffix(".safetensors").map(str::to_string).unwrap_or(name)
}

/// How one fine-tuned tensor will be stored.
enum Plan {
    Unchanged { base_crc32: u32 },
    Raw,
    Compress { base: usize, shared_numel: usize, stats: TensorStats, base_crc32: u32, allocation: Option<Allocation> },
}

/// Decides how a fine-tuned tensor is handled, before reading any data.
enum Kind {
    Compare(usize),
    Raw,
    Compress(usize, usize),
}

fn classify(base: &Checkpoint, ft: &Checkpoint, t: &TensorEntry, selector: &TensorSelector) -> Result<Kind> {
    let ft_path = ft.shard_path(t);
    let Some(bi) = base.tensors.iter().position(|b| b.name == t.name) else {
        return Ok(Kind::Raw);
    };
    let b = &base.tensors[bi];
    let grown = t.shape.len() == b.shape.len() && !t.shape.is_empty() && t.shape[0] > b.shape[0] && t.shape[1..] == b.shape[1..];
    if t.shape != b.shape && !grown {
        return Err(Error::tensor(
            ft_path,
            &t.name,
            format!("shape {:?} does not match the base's {:?} ({}): is this the right base?", t.shape, b.shape, base.shard_path(b).display()),
        ));
    }
    let selected = selector.selects(&t.name, &t.shape, t.dtype) && b.float_type().is_some();
    if selected {
        let shared = b.numel();
        if shared > u32::MAX as u64 {
            return Err(Error::tensor(ft_path, &t.name, "more than 2^32 elements: too large to compress"));
        }
        return Ok(Kind::Compress(bi, shared as usize));
    }
    if grown || b.dtype != t.dtype {
        return Ok(Kind::Raw);
    }
    Ok(Kind::Compare(bi))
}

/// Compares a fine-tuned tensor with the base chunk by chunk; returns the base CRC-32 when equal.
fn compare(base: &Checkpoint, b: &TensorEntry, ft: &Checkpoint, t: &TensorEntry, progress: &Progress) -> Result<Option<u32>> {
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

fn engine_error(path: &Path, tensor: &str, e: EngineError) -> Error {
    match e {
        EngineError::Gpu(m) => Error::Gpu(format!("tensor '{tensor}': {m}")),
        other => Error::tensor(path, tensor, other.to_string()),
    }
}

/// Reads a compressed tensor pair and makes the engine input over the shared elements.
fn read_pair(base: &Checkpoint, b: &TensorEntry, ft: &Checkpoint, t: &TensorEntry, bufs: &mut (Vec<u8>, Vec<u8>)) -> Result<()> {
    base.read_tensor(b, &mut bufs.0)?;
    ft.read_tensor(t, &mut bufs.1)?;
    Ok(())
}

fn float_type(c: &Checkpoint, t: &TensorEntry) -> Result<FloatType> {
    t.float_type()
        .ok_or_else(|| Error::tensor(c.shard_path(t), &t.name, format!("dtype {} cannot be compressed", dtype_name(t.dtype))))
}

/// Compresses `finetuned` against `base` into `out` with `engine`.
pub fn compress(base_path: &Path, ft_path: &Path, out: &Path, opts: &CompressOptions, engine: &mut dyn Engine) -> Result<CompressOutcome> {
    opts.params.validate()?;
    let mut writer = UdeltaWriter::create(out, opts.force)?;
    let base = Checkpoint::open(base_path)?;
    let ft = Checkpoint::open(ft_path)?;
    // A fine-tune may drop buffers (newer exports omit `position_ids`), but a missing tensor
    // that would be compressed means a truncated or wrong checkpoint.
    for missing in base.tensors.iter().filter(|b| ft.get(&b.name).is_none()) {
        if opts.selector.selects(&missing.name, &missing.shape, missing.dtype) {
            return Err(Error::tensor(
                ft_path,
                &missing.name,
                format!("missing from the fine-tuned checkpoint but present in the base {}", base.shard_path(missing).display()),
            ));
        }
        if opts.progress {
            eprintln!("note: base tensor '{}' is not in the fine-tune; the restored checkpoint will not have it either", missing.name);
        }
    }
    let model = opts.model_name.clone().unwrap_or_else(|| model_name_of(ft_path));
    let kinds = ft.tensors.iter().map(|t| classify(&base, &ft, t, &opts.selector)).collect::<Result<Vec<_>>>()?;

    // Pass 1.
    let pass1_bytes: u64 = ft.tensors.iter().zip(&kinds).map(|(t, k)| match k {
        Kind::Raw => 0,
        Kind::Compare(bi) | Kind::Compress(bi, _) => t.len + base.tensors[*bi].len,
    }).sum();
    let mut times = StageTimes::default();
    let progress = Progress::new("analyze", pass1_bytes, opts.progress);
    let mut bufs = (Vec::new(), Vec::new());
    let mut plans = Vec::with_capacity(kinds.len());
    for (t, kind) in ft.tensors.iter().zip(&kinds) {
        plans.push(match *kind {
            Kind::Raw => Plan::Raw,
            Kind::Compare(bi) => match timed(&mut times.compare, || compare(&base, &base.tensors[bi], &ft, t, &progress))? {
                Some(base_crc32) => Plan::Unchanged { base_crc32 },
                None => Plan::Raw,
            },
            Kind::Compress(bi, shared_numel) => {
                let b = &base.tensors[bi];
                timed(&mut times.read, || read_pair(&base, b, &ft, t, &mut bufs))?;
                let input = DeltaInput::new(&bufs.0, float_type(&base, b)?, &bufs.1, float_type(&ft, t)?, shared_numel);
                let stats = timed(&mut times.analyze, || engine.analyze(&input, opts.params.bits)).map_err(|e| engine_error(ft.shard_path(t), &t.name, e))?;
                if opts.verify {
                    let want = timed(&mut times.verify, || CpuEngine.analyze(&input, opts.params.bits)).map_err(|e| engine_error(ft.shard_path(t), &t.name, e))?;
                    if want != stats {
                        return Err(Error::Gpu(format!("--verify: tensor '{}': engine statistics differ from the CPU reference", t.name)));
                    }
                }
                progress.inc(b.len + t.len);
                Plan::Compress { base: bi, shared_numel, stats, base_crc32: crc32(&bufs.0), allocation: None }
            }
        });
    }
    progress.finish();

    // The allocation plan over every compressed tensor of the model.
    let stds: Vec<(u64, f64)> = plans.iter().filter_map(|p| match p {
        Plan::Compress { shared_numel, stats, .. } => Some((*shared_numel as u64, stats.std_dev())),
        _ => None,
    }).collect();
    let mut allocations = allocate_rates(&stds, &opts.params).into_iter();
    for p in plans.iter_mut() {
        if let Plan::Compress { allocation, .. } = p {
            *allocation = allocations.next();
        }
    }

    // Pass 2.
    let pass2_bytes: u64 = ft.tensors.iter().zip(&plans).map(|(t, p)| match p {
        Plan::Unchanged { .. } => 0,
        Plan::Raw => t.len,
        Plan::Compress { base: bi, .. } => t.len + base.tensors[*bi].len,
    }).sum();
    let progress = Progress::new("compress", pass2_bytes, opts.progress);
    let mut records = Vec::with_capacity(plans.len());
    let mut fingerprint = crc32fast::Hasher::new();
    let mut base_used = 0;
    for (t, plan) in ft.tensors.iter().zip(plans) {
        let kind = match plan {
            Plan::Unchanged { base_crc32 } => {
                fingerprint.update(t.name.as_bytes());
                fingerprint.update(&base_crc32.to_le_bytes());
                base_used += 1;
                TensorKind::Unchanged { base_crc32 }
            }
            Plan::Raw => {
                let mut start = 0u64;
                let t0 = std::time::Instant::now();
                let data = writer.append_chunks(|buf| {
                    if start >= t.len {
                        return Ok(false);
                    }
                    let n = COPY_CHUNK.min(t.len - start) as usize;
                    buf.resize(n, 0);
                    ft.read_range(t, start, buf)?;
                    start += n as u64;
                    progress.inc(n as u64);
                    Ok(true)
                })?;
                times.write += t0.elapsed().as_secs_f64();
                TensorKind::Raw { data }
            }
            Plan::Compress { base: bi, shared_numel, stats, base_crc32, allocation } => {
                let b = &base.tensors[bi];
                let allocation = allocation.expect("one allocation per compressed tensor");
                timed(&mut times.read, || read_pair(&base, b, &ft, t, &mut bufs))?;
                if crc32(&bufs.0) != base_crc32 {
                    return Err(Error::tensor(base.shard_path(b), &b.name, "the base changed on disk during compression"));
                }
                let ft_type = float_type(&ft, t)?;
                let input = DeltaInput::new(&bufs.0, float_type(&base, b)?, &bufs.1, ft_type, shared_numel);
                let key = TensorKey::new(opts.params.seed, &model, &t.name);
                let selection = SelectionPlan::new(key, &stats, allocation.rate);
                let kept = timed(&mut times.select, || engine.select(&input, &stats, &selection)).map_err(|e| engine_error(ft.shard_path(t), &t.name, e))?;
                if opts.verify {
                    let want = timed(&mut times.verify, || CpuEngine.select(&input, &stats, &selection)).map_err(|e| engine_error(ft.shard_path(t), &t.name, e))?;
                    if want != kept {
                        return Err(Error::Gpu(format!("--verify: tensor '{}': engine kept entries differ from the CPU reference", t.name)));
                    }
                }
                let kept_counts = selection.kept_counts();
                let enc = timed(&mut times.encode, || codec::encode_tensor(shared_numel as u64, &kept.positions, &kept.levels, &kept_counts))
                    .map_err(|e| Error::tensor(ft.shard_path(t), &t.name, format!("encoding failed: {e}")))?;
                let tail_start = shared_numel * ft_type.size();
                let (positions, levels, tail) = timed(&mut times.write, || -> Result<_> {
                    let tail = (bufs.1.len() > tail_start).then(|| writer.append(&bufs.1[tail_start..])).transpose()?;
                    Ok((writer.append(&enc.positions)?, writer.append(&enc.levels)?, tail))
                })?;
                progress.inc(b.len + t.len);
                fingerprint.update(t.name.as_bytes());
                fingerprint.update(&base_crc32.to_le_bytes());
                base_used += 1;
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
        records.push(TensorRecord { name: t.name.clone(), dtype: dtype_name(t.dtype), shape: t.shape.clone(), shard: t.shard, kind });
    }
    progress.finish();

    let rescale = opts.params.rescale();
    let index = FileIndex {
        format_version: FORMAT_VERSION,
        tool: format!("udelta-gpu {}", env!("CARGO_PKG_VERSION")),
        engine: engine.name(),
        params: opts.params,
        model: ModelInfo { name: model, rescale, gamma: 1.0, trace_norm: None, scale: rescale },
        base: BaseInfo { fingerprint: format!("{:08x}", fingerprint.finalize()), tensors: base_used },
        source: SourceLayout {
            layout: match ft.layout {
                Layout::SingleFile => "single",
                Layout::Directory => "directory",
                Layout::Sharded => "sharded",
            }
            .to_string(),
            shards: ft.shards.iter().map(|s| ShardInfo { file_name: s.file_name.clone(), metadata: s.metadata.clone() }).collect(),
            index_metadata: ft.index_metadata.clone(),
        },
        tensors: records,
    };
    let file_bytes = timed(&mut times.write, || writer.finish(&index))?;
    Ok(CompressOutcome { path: out.to_path_buf(), file_bytes, engine: engine.name(), times })
}
