//! `compress --dry-run`: the plan before any heavy work. From the headers and a small sample of
//! each tensor ([`super::sample`]): which tensors are compressed, stored (losslessly, against
//! the base) or compared with the base at run time, their parameter counts, and the expected
//! size of each file with its error bound ([`ESTIMATE_BOUND`]); a warning names the largest
//! stored tensors when a notable share of the parameters would be stored rather than
//! compressed (the usual sign that the selection missed a model family). Writes nothing.

use super::open::{self, Kind, Source};
use super::sample::{estimated_stats, estimated_stored_bytes, read_sample, sample_ranges};
use super::sizing::{self, SizedTensor};
use super::CompressOptions;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};
use crate::format::index::RecordRef;
use crate::pipeline::lossless::base_for;
use crate::pipeline::side_files;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How far the real file may be from the estimate, as a fraction of the estimate. The largest
/// error measured is 4.7 % (the real MiniLM pair with `--embeddings lossless`, where a third
/// of the file is tensors stored whole, estimated from samples); synth 7b --layers 2 and tiny
/// are within 2.4 % with every `--embeddings` and at s = 0.9 to 0.99 (`docs/BENCHMARKS.md`,
/// "Dry run and target size"). Twice the largest error, for deltas unlike these.
pub const ESTIMATE_BOUND: f64 = 0.10;
/// Share of the fine-tune's parameters stored whole above which the plan warns.
pub const STORED_WARNING_FRACTION: f64 = 0.05;
/// How many of the largest stored tensors the warning names.
const WARNING_NAMES: usize = 5;

/// What happens to a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Compressed with UltraDelta.
    Compress,
    /// Stored losslessly (coded against the base, or alone).
    Store,
    /// Compared with the base at run time: unchanged costs nothing, else stored.
    Compare,
}

/// One tensor's line of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    /// Name.
    pub name: String,
    /// Fine-tuned shape.
    pub shape: Vec<usize>,
    /// What happens to it.
    pub action: Action,
    /// Its parameters.
    pub params: u64,
    /// For a compared tensor: whether its sample differs from the base's (then it is
    /// expected to be stored).
    pub sample_differs: Option<bool>,
    /// Pruning rate (compressed tensors).
    pub rate: Option<f64>,
    /// Expected bytes in the file (records and index entry).
    pub estimated_bytes: u64,
}

/// Parameter counts by action.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ParamCounts {
    /// Compressed.
    pub compressed: u64,
    /// Stored whole (including compared tensors whose sample differs).
    pub stored: u64,
    /// Compared tensors whose sample equals the base's (expected unchanged).
    pub unchanged: u64,
    /// All of the fine-tune's.
    pub total: u64,
}

/// The plan of one fine-tune.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPlan {
    /// Model name.
    pub model: String,
    /// The sparsity planned with (chosen for the target when one is given).
    pub sparsity: f64,
    /// Per tensor, in the checkpoint's order.
    pub tensors: Vec<TensorPlan>,
    /// Parameter counts.
    pub params: ParamCounts,
    /// Bytes of the fine-tune's tensors.
    pub tensor_bytes: u64,
    /// Bytes of the coded side files (config, tokenizer, ...).
    pub side_file_bytes: u64,
    /// The expected file size.
    pub estimated_bytes: u64,
    /// `estimated_bytes` times `1 -/+ ESTIMATE_BOUND`.
    pub estimated_range: [u64; 2],
    /// `tensor_bytes / estimated_bytes`.
    pub estimated_ratio_file: f64,
    /// Said when more than `STORED_WARNING_FRACTION` of the parameters would be stored, or
    /// when a target size looks out of reach.
    pub warning: Option<String>,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    /// Per fine-tune.
    pub models: Vec<ModelPlan>,
    /// How far off the estimate may be (fraction).
    pub estimate_bound: f64,
    /// Bytes of tensor data read (the samples).
    pub sampled_bytes: u64,
    /// Whether the output exists (and `--force` was not given): the run would refuse it.
    pub output_exists: bool,
}

/// Plans the compression of each fine-tune in `finetuned` against `base_path` with `opts`,
/// reading the headers and a sample of each tensor; writes nothing.
pub fn dry_run(
    base_path: &Path,
    finetuned: &[PathBuf],
    out: &Path,
    opts: &CompressOptions,
) -> Result<DryRunReport> {
    open::validate_options(finetuned, opts)?;
    let output_exists = out.exists() && !opts.force;
    let inputs = open::open_checkpoints(base_path, finetuned, opts)?;
    let mut sampled_bytes = 0;
    let models = inputs
        .sources
        .iter()
        .map(|s| plan_model(&inputs.base, s, opts, &mut sampled_bytes))
        .collect::<Result<Vec<_>>>()?;
    Ok(DryRunReport {
        models,
        estimate_bound: ESTIMATE_BOUND,
        sampled_bytes,
        output_exists,
    })
}

/// One tensor as sampled: its line, and what the size model needs of a compressed one.
struct Sampled {
    plan: TensorPlan,
    sized: Option<SizedTensor>,
    /// Bytes that do not depend on the sparsity (stored data, vocabulary tails, index entry).
    fixed: f64,
}

/// The plan of one fine-tune.
fn plan_model(
    base: &Checkpoint,
    src: &Source,
    opts: &CompressOptions,
    sampled_bytes: &mut u64,
) -> Result<ModelPlan> {
    let side_file_bytes = side_file_bytes(base, src, opts)?;
    let mut fixed = sizing::FRAME_BYTES + side_file_bytes as f64;
    let (mut lines, mut sized, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for (t, kind) in src.ckpt.tensors.iter().zip(&src.kinds) {
        let s = sample_tensor(base, &src.ckpt, t, *kind, opts, sampled_bytes)?;
        fixed += s.fixed;
        if let Some(st) = s.sized {
            at.push(lines.len());
            sized.push(st);
        }
        lines.push(s.plan);
    }
    let tensor_bytes: u64 = src.ckpt.tensors.iter().map(|t| t.len).sum();
    let mut params = opts.params;
    let mut notes = Vec::new();
    if let Some(target) = opts.target {
        let budget = target.bytes(tensor_bytes) as f64 - fixed;
        match sizing::sparsity_for_budget(&sized, &params, budget) {
            Ok((s, _)) => params.sparsity = s,
            // The plan's histograms are sampled: say so, and plan at --sparsity.
            Err(e) => notes.push(format!(
                "{e} (as far as the samples tell); planned at sparsity {} instead",
                params.sparsity
            )),
        }
    }
    let mut compressed = 0.0;
    for (&i, e) in at.iter().zip(sizing::expected_tensors(&sized, &params)) {
        lines[i].rate = Some(e.rate);
        lines[i].estimated_bytes += e.bytes.round() as u64;
        compressed += e.bytes;
    }
    let estimated = (fixed + compressed).round() as u64;
    let counts = param_counts(&lines);
    Ok(ModelPlan {
        model: src.name.clone(),
        sparsity: params.sparsity,
        warning: stored_warning(&lines, &counts)
            .into_iter()
            .chain(notes)
            .reduce(|a, b| format!("{a}; {b}")),
        tensors: lines,
        params: counts,
        tensor_bytes,
        side_file_bytes,
        estimated_bytes: estimated,
        estimated_range: [
            (estimated as f64 * (1.0 - ESTIMATE_BOUND)) as u64,
            (estimated as f64 * (1.0 + ESTIMATE_BOUND)).ceil() as u64,
        ],
        estimated_ratio_file: tensor_bytes as f64 / estimated.max(1) as f64,
    })
}

/// The coded size of the fine-tune's side files (coded as `compress` codes them, in memory).
fn side_file_bytes(base: &Checkpoint, src: &Source, opts: &CompressOptions) -> Result<u64> {
    let mut total = 0u64;
    side_files::code_side_files(&base.path, &src.ckpt, opts.side_files, true, &mut |frame| {
        total += frame.len() as u64;
        Ok(RecordRef {
            offset: 0,
            len: frame.len() as u64,
            crc32: 0,
        })
    })?;
    Ok(total)
}

/// Samples one tensor and says what will happen to it.
fn sample_tensor(
    base: &Checkpoint,
    ft: &Checkpoint,
    t: &TensorEntry,
    kind: Kind,
    opts: &CompressOptions,
    sampled_bytes: &mut u64,
) -> Result<Sampled> {
    let mut plan = TensorPlan {
        name: t.name.clone(),
        shape: t.shape.clone(),
        action: Action::Store,
        params: t.numel(),
        sample_differs: None,
        rate: None,
        estimated_bytes: 0,
    };
    let mut read = |c: &Checkpoint, e: &TensorEntry, numel: u64| {
        let bytes = read_sample(c, e, numel)?;
        *sampled_bytes += bytes.len() as u64;
        Ok::<_, Error>(bytes)
    };
    let (sized, fixed) = match kind {
        Kind::Compress(bi, shared) => {
            plan.action = Action::Compress;
            let b = &base.tensors[bi];
            let (bs, fs) = (read(base, b, shared as u64)?, read(ft, t, shared as u64)?);
            let types = (float_type(base, b)?, float_type(ft, t)?);
            let stats = estimated_stats(
                ft,
                t,
                (&bs, types.0),
                (&fs, types.1),
                shared as u64,
                opts.params.bits,
            )?;
            let tail = t.len - shared as u64 * types.1.size() as u64;
            let pool = opts.selector.pool(&b.name, &b.shape);
            let sized = SizedTensor {
                numel: shared as u64,
                stats,
                pool,
            };
            (Some(sized), tail as f64)
        }
        Kind::Compare(bi) => {
            plan.action = Action::Compare;
            let b = &base.tensors[bi];
            let (bs, fs) = (read(base, b, t.numel())?, read(ft, t, t.numel())?);
            plan.sample_differs = Some(bs != fs);
            let stored = if bs != fs {
                estimated_stored_bytes(&bs, &fs, t)
            } else {
                0.0
            };
            (None, stored + sizing::INDEX_BYTES_OTHER)
        }
        Kind::Raw => {
            let fs = read(ft, t, t.numel())?;
            let bs = match base_for(base, t).filter(|b| b.shape == t.shape) {
                Some(b) => read(base, b, t.numel())?,
                None => Vec::new(),
            };
            (
                None,
                estimated_stored_bytes(&bs, &fs, t) + sizing::INDEX_BYTES_OTHER,
            )
        }
    };
    plan.estimated_bytes = fixed.round() as u64;
    Ok(Sampled { plan, sized, fixed })
}

/// A tensor's float type (compressed tensors have one: `classify` checked).
fn float_type(c: &Checkpoint, t: &TensorEntry) -> Result<crate::checkpoint::dtype::FloatType> {
    t.float_type()
        .ok_or_else(|| Error::tensor(c.shard_path(t), &t.name, "not a float tensor"))
}

/// Whether a tensor's data is expected to be stored whole.
fn is_stored(p: &TensorPlan) -> bool {
    p.action == Action::Store || p.sample_differs == Some(true)
}

fn param_counts(lines: &[TensorPlan]) -> ParamCounts {
    let mut c = ParamCounts::default();
    for p in lines {
        c.total += p.params;
        if p.action == Action::Compress {
            c.compressed += p.params;
        } else if is_stored(p) {
            c.stored += p.params;
        } else {
            c.unchanged += p.params;
        }
    }
    c
}

/// The warning when more than [`STORED_WARNING_FRACTION`] of the parameters would be stored,
/// naming the largest stored tensors.
fn stored_warning(lines: &[TensorPlan], counts: &ParamCounts) -> Option<String> {
    let share = counts.stored as f64 / counts.total.max(1) as f64;
    if share <= STORED_WARNING_FRACTION {
        return None;
    }
    let mut stored: Vec<&TensorPlan> = lines.iter().filter(|p| is_stored(p)).collect();
    stored.sort_by_key(|p| std::cmp::Reverse(p.params));
    let names: Vec<String> = stored
        .iter()
        .take(WARNING_NAMES)
        .map(|p| format!("{} {:?} ({} params)", p.name, p.shape, p.params))
        .collect();
    Some(format!(
        "{:.1} % of the fine-tune's parameters would be stored losslessly rather than \
         compressed (largest: {}); if these are weights of a model family the default \
         selection misses, name them with --include",
        100.0 * share,
        names.join(", ")
    ))
}

impl DryRunReport {
    /// The plan as text: per tensor, then each model's totals and estimate.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for m in &self.models {
            m.write_text(&mut s, self.estimate_bound);
        }
        if self.output_exists {
            let _ = writeln!(
                s,
                "note: the output exists: the run needs --force to replace it"
            );
        }
        let _ = writeln!(
            s,
            "read {} bytes of tensor data (samples of at most {} elements per tensor); nothing was written",
            self.sampled_bytes,
            sample_ranges(u64::MAX).iter().map(|r| r.1).sum::<u64>()
        );
        s
    }
}

impl ModelPlan {
    fn write_text(&self, s: &mut String, bound: f64) {
        let _ = writeln!(
            s,
            "plan for {} at sparsity {:.4}",
            self.model, self.sparsity
        );
        let _ = writeln!(
            s,
            "{:<56} {:>16} {:<8} {:>12} {:>6} {:>12}",
            "tensor", "shape", "action", "params", "rate", "est. bytes"
        );
        for t in &self.tensors {
            let action = match (t.action, t.sample_differs) {
                (Action::Compare, Some(true)) => "compare*",
                (Action::Compare, _) => "compare",
                (Action::Compress, _) => "compress",
                (Action::Store, _) => "store",
            };
            let rate = t.rate.map(|r| format!("{r:.4}")).unwrap_or_default();
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                s,
                "{:<56} {:>16} {:<8} {:>12} {:>6} {:>12}",
                t.name, shape, action, t.params, rate, t.estimated_bytes
            );
        }
        let p = &self.params;
        let pct = |n: u64| 100.0 * n as f64 / p.total.max(1) as f64;
        let _ = writeln!(
            s,
            "params: {} compressed ({:.1} %), {} stored ({:.1} %), {} expected unchanged ({:.1} %); compare* = sample differs from the base",
            p.compressed, pct(p.compressed), p.stored, pct(p.stored), p.unchanged, pct(p.unchanged)
        );
        let _ = writeln!(
            s,
            "estimated file: {} bytes (ratio_file {:.1}x; side files {} bytes), within +-{:.0} %: {} to {} bytes",
            self.estimated_bytes,
            self.estimated_ratio_file,
            self.side_file_bytes,
            100.0 * bound,
            self.estimated_range[0],
            self.estimated_range[1]
        );
        if let Some(w) = &self.warning {
            let _ = writeln!(s, "warning: {w}");
        }
    }
}
