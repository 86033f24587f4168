//! `compress`: base + fine-tuned checkpoints -> one `.udelta` file per fine-tune.
//!
//! The steps, one module each, in the order the data flows through them:
//! 1. [`open`]: every option is checked, the checkpoints are opened and each fine-tuned tensor
//!    is classified against the base, before any output exists;
//! 2. [`stage`]: the outputs are staged (temporary names, renamed only when complete);
//! 3. [`analyze`] (pass 1) reads every tensor pair once: compressed tensors go through
//!    [`Engine::analyze`], the others are compared with the base (unchanged ones cost nothing);
//! 4. [`allocate`] makes each model's allocation plan from all standard deviations;
//! 5. [`encode`] (pass 2) reads the compressed tensors again, selects the kept entries
//!    ([`Engine::select`]), entropy-codes them and appends the records, while [`trace_norms`]
//!    estimates the nuclear norms beside it;
//! 6. [`finish`] picks each model's gamma, writes the indexes and commits the outputs.
//!
//! Reads run ahead on their own thread in both passes ([`super::prefetch`]), and with a
//! host-side estimator the nuclear norms run on theirs ([`super::norm_worker`]).

mod allocate;
mod analyze;
pub mod dry_run;
mod encode;
mod finish;
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

use crate::algorithm::CompressParams;
use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::select::TensorSelector;
use crate::checkpoint::side_files::SideFileOptions;
use crate::engine::Engine;
use crate::error::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dry_run::{dry_run, DryRunReport};
pub use open::model_name_of;

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
    times: StageTimes,
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
    let inputs = open::open_inputs(base_path, finetuned, out, opts)?;
    let (outputs, mut models) = stage::stage_outputs(inputs.sources, &inputs.base, out, opts)?;
    let mut run = Run {
        base: inputs.base,
        opts: opts.clone(),
        engine,
        target: None,
        with_trace_norm: opts.trace_norm || models.len() > 1,
        times: StageTimes::default(),
    };
    let order = schedule::schedule(&models);
    run.analyze_all(&mut models, &order)?;
    // Pass 2 calls `plan_allocation` once the tensors stored whole are written.
    run.encode_all(&mut models, &order)?;
    let files = run.finish(models, outputs)?;
    Ok(CompressOutcome {
        files,
        engine: run.engine.name(),
        times: run.times,
        target: run.target,
    })
}
