//! `compress`: base + fine-tuned checkpoints -> one `.udelta` file per fine-tune.
//!
//! The steps, one module each, in the order the data flows through them:
//! 1. [`open`]: every option is checked, the checkpoints are opened and each fine-tuned tensor
//!    is classified against the base, before any output exists;
//! 2. [`stage`]: the outputs are staged (temporary names, renamed only when complete);
//! 3. [`analyze`] (pass 1) reads every tensor pair once: compressed tensors go through
//!    [`Engine::analyze_levels`], and [`kept`] keeps what pass 2 selects from (their levels,
//!    or only the selection candidates when the run's rate floor leaves few); the others are
//!    compared with the base (unchanged ones cost nothing);
//! 4. [`allocate`] makes each model's allocation plan from all standard deviations;
//! 5. [`encode`] (pass 2) selects the kept entries from what pass 1 kept ([`kept`],
//!    [`Engine::select_candidates`] or [`Engine::select_levels`]: the checkpoints are not read
//!    again), entropy-codes them and
//!    appends the records, while [`trace_norms`] estimates the nuclear norms beside it;
//! 6. [`finish`] picks each model's gamma and writes the indexes; the outputs are complete,
//!    still under temporary names, and [`StagedCompress::commit`] renames them into place
//!    (the command line first prints its report, so a failure there leaves no output).
//!
//! Reads run ahead on their own thread ([`super::prefetch`]), and with a
//! host-side estimator the nuclear norms run on theirs ([`super::norm_worker`]).

mod allocate;
mod analyze;
mod blocked;
pub mod dry_run;
mod encode;
mod finish;
mod kept;
mod memory;
mod model;
mod open;
mod pair;
mod sample;
mod schedule;
mod sizing;
mod stage;
#[cfg(test)]
mod tests;
mod trace_norms;

use crate::algorithm::{rate_floor, CompressParams};
use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::select::TensorSelector;
use crate::checkpoint::side_files::SideFileOptions;
use crate::engine::{DeviceCounters, Engine};
use crate::error::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dry_run::{dry_run, DryRunReport};
pub use open::model_name_of;

/// Bytes per read when comparing or copying tensors that are not compressed.
const COPY_CHUNK: u64 = 64 << 20;

/// What the user asked for besides the two checkpoints. The default: the paper's parameters,
/// the default selection, no progress bars, nothing replaced.
#[derive(Debug, Clone, Default)]
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
    /// Choose the sparsity so that the file has this size (`params.sparsity` is then ignored).
    pub target: Option<SizeTarget>,
}

/// A file size asked for instead of a sparsity (`--target-size` / `--target-ratio`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeTarget {
    /// The file's size in bytes.
    Bytes(u64),
    /// The fine-tune's tensor bytes over the file's size (`ratio_file` of the report).
    Ratio(f64),
}

impl SizeTarget {
    /// The file size asked for, for a fine-tune whose tensors take `tensor_bytes`.
    pub fn bytes(self, tensor_bytes: u64) -> u64 {
        match self {
            SizeTarget::Bytes(b) => b,
            SizeTarget::Ratio(r) => (tensor_bytes as f64 / r).round() as u64,
        }
    }
}

/// What a target size became.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TargetOutcome {
    /// The file size asked for.
    pub target_bytes: u64,
    /// The sparsity chosen.
    pub sparsity: f64,
    /// The size the model expected at that sparsity.
    pub estimated_bytes: u64,
}

/// Wall time spent in each stage, in seconds (stages run one after another on this thread).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTimes {
    /// Waiting for tensors to be read in pass 1 (reads run ahead on their own thread, so this
    /// is only the part the compute did not hide).
    pub read: f64,
    /// Pass 2 reading back the levels kept in the temporary file (no checkpoint is read
    /// again: pass 2 selects from the levels pass 1 kept).
    pub read_pass2: f64,
    /// Comparing uncompressed tensors with the base.
    pub compare: f64,
    /// Engine pass 1 (min/max, histograms; for tensors analysed in blocks, their two reads too).
    pub analyze: f64,
    /// Pass 1 keeping each tensor's selection candidates (hashing every element; on the host,
    /// whatever the engine), where the run's rate floor allows ([`kept`]).
    pub candidates: f64,
    /// Of `analyze`, starting the analyses on the engine: on a GPU, copying the inputs into
    /// the upload ring and submitting (the rest is waiting for the results and the host's
    /// levels); on the CPU engine, all of its pass 1 but the blocked tensors.
    pub analyze_start: f64,
    /// Engine pass 2 (levels, selection, compaction).
    pub select: f64,
    /// Entropy coding.
    pub encode: f64,
    /// Writing records (raw tensors included) and the index.
    pub write: f64,
    /// Recomputing on the CPU engine (`--verify`).
    pub verify: f64,
    /// Nuclear-norm estimates (on the host, from the kept entries, whatever the engine). They
    /// run on their own thread, beside the other stages, and this is that thread's busy time.
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

/// What a run read, moved to and from the device and waited for: what `compress --json`
/// reports under `run`, so that a run's I/O can be checked without a GPU.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunCounters {
    /// Bytes of tensor data read from the checkpoints' files (base and fine-tunes, both
    /// passes, compared and stored-whole tensors included).
    pub bytes_read: u64,
    /// Of `bytes_read`, the bytes read past the page cache (large tensors not cached).
    pub bytes_read_direct: u64,
    /// Tensors compressed (over all fine-tunes).
    pub compressed_tensors: u64,
    /// Bytes of the compressed tensors' inputs, each counted once: each base tensor that some
    /// fine-tune compresses against, and each compressed fine-tuned tensor.
    pub compressed_input_bytes: u64,
    /// Bytes pass 1 kept for pass 2's selection: every element's packed level, or the
    /// selection candidates where the run's rate floor leaves few.
    pub kept_bytes: u64,
    /// Of `kept_bytes`, the bytes that did not fit in [`memory::KEPT_LEVELS_BUDGET`] and went
    /// through the temporary file.
    pub kept_spilled_bytes: u64,
    /// Selection candidates kept (over the tensors kept as candidates).
    pub candidates: u64,
    /// Compressed tensors kept as candidates rather than levels.
    pub candidate_tensors: u64,
    /// Device traffic and blocking waits (zero on the CPU engine).
    #[serde(flatten)]
    pub device: DeviceCounters,
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
    /// What was read, moved and waited for.
    pub counters: RunCounters,
    /// The sparsity a target size chose, when one was asked for.
    pub target: Option<TargetOutcome>,
}

/// What every step after opening needs besides the models: the base, the options, the engine
/// and the clocks.
struct Run<'a> {
    base: Arc<Checkpoint>,
    /// The options (owned: a target size sets the sparsity after pass 1).
    opts: CompressOptions,
    engine: &'a mut dyn Engine,
    /// What the target size chose, once chosen.
    target: Option<TargetOutcome>,
    /// Whether each model's trace norm is estimated.
    with_trace_norm: bool,
    /// The lowest pruning rate the allocation can give (none with a target size: the
    /// sparsity is chosen after pass 1).
    rate_floor: Option<f64>,
    /// The levels pass 1 keeps for pass 2.
    kept: kept::KeptStore,
    /// The buffers of pairs analysed in blocks, from one pair to the next.
    block_buffers: blocked::BlockBuffers,
    times: StageTimes,
}

/// A finished compression whose outputs are complete but still under temporary names: they
/// appear only on [`commit`](Self::commit), and dropping it removes them.
pub struct StagedCompress {
    outputs: stage::StagedOutputs,
    /// The engine that ran.
    pub engine: String,
    /// Where the time went.
    pub times: StageTimes,
    /// What was read, moved and waited for.
    pub counters: RunCounters,
    /// The sparsity a target size chose, when one was asked for.
    pub target: Option<TargetOutcome>,
}

impl StagedCompress {
    /// The complete `.udelta` files where they are now (temporary names), with their sizes.
    pub fn files(&self) -> &[(PathBuf, u64)] {
        &self.outputs.files
    }

    /// Renames the outputs into place (never over an output that appeared meanwhile, unless
    /// `--force`) and returns the files under their final names.
    pub fn commit(self) -> Result<CompressOutcome> {
        Ok(CompressOutcome {
            files: self.outputs.commit()?,
            engine: self.engine,
            times: self.times,
            counters: self.counters,
            target: self.target,
        })
    }
}

/// The directory that receives the temporary file of kept levels: the output's.
fn scratch_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Compresses each fine-tune in `finetuned` against `base` with `engine`. With one fine-tune
/// `out` is the `.udelta` file; with several it is a directory that receives `NAME.udelta` per
/// fine-tune (NAME = the path's last component), and the base is read once per tensor for all.
///
/// Every option and input is checked before any output is staged, so a refused run leaves
/// nothing behind, not even for a moment.
pub fn compress(
    base_path: &Path,
    finetuned: &[PathBuf],
    out: &Path,
    opts: &CompressOptions,
    engine: &mut dyn Engine,
) -> Result<CompressOutcome> {
    compress_staged(base_path, finetuned, out, opts, engine)?.commit()
}

/// [`compress`] up to, not including, the final rename.
pub fn compress_staged(
    base_path: &Path,
    finetuned: &[PathBuf],
    out: &Path,
    opts: &CompressOptions,
    engine: &mut dyn Engine,
) -> Result<StagedCompress> {
    let levels_budget = kept::host_budget()?;
    let inputs = open::open_inputs(base_path, finetuned, out, opts)?;
    let (outputs, mut models) = stage::stage_outputs(inputs.sources, &inputs.base, out, opts)?;
    let mut run = Run {
        base: inputs.base,
        opts: opts.clone(),
        engine,
        target: None,
        with_trace_norm: opts.trace_norm || models.len() > 1,
        rate_floor: opts.target.is_none().then(|| rate_floor(&opts.params)),
        kept: kept::KeptStore::new(levels_budget, &scratch_dir(out)),
        block_buffers: Default::default(),
        times: StageTimes::default(),
    };
    let order = schedule::schedule(&models);
    run.analyze_all(&mut models, &order)?;
    // Pass 2 reads no block: their memory goes back.
    run.block_buffers = Default::default();
    // Pass 2 calls `plan_allocation` once the tensors stored whole are written.
    run.encode_all(&mut models, &order)?;
    let counters = RunCounters {
        bytes_read: run.base.bytes_read() + models.iter().map(|m| m.ckpt.bytes_read()).sum::<u64>(),
        bytes_read_direct: run.base.bytes_read_direct()
            + models
                .iter()
                .map(|m| m.ckpt.bytes_read_direct())
                .sum::<u64>(),
        device: run.engine.counters(),
        kept_bytes: run.kept.total,
        kept_spilled_bytes: run.kept.spilled,
        candidates: run.kept.candidates,
        candidate_tensors: run.kept.candidate_tensors,
        ..schedule::compressed_inputs(&order, &run.base, &models)
    };
    let outputs = run.finish(models, outputs)?;
    Ok(StagedCompress {
        outputs,
        engine: run.engine.name(),
        times: run.times,
        counters,
        target: run.target,
    })
}
