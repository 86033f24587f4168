//! Step 1: checks every option, opens the checkpoints and decides how each fine-tuned tensor
//! will be handled, all before any output is staged.

use super::{CompressOptions, SizeTarget};
use crate::checkpoint::dtype::dtype_name;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::checkpoint::select::TensorSelector;
use crate::checkpoint::views;
use crate::error::{Error, Result};
use crate::staging::{check_output, OutputKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a fine-tuned tensor is handled, decided from the headers before any data is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Compared with base tensor `.0`: stored as unchanged when equal, else raw.
    Compare(usize),
    /// Stored whole (no base tensor, another dtype, or grown rows of an uncompressed tensor).
    Raw,
    /// Compressed against base tensor `.0`, over its `.1` elements.
    Compress(usize, usize),
}

/// A fine-tune opened and checked against the base.
pub(super) struct Source {
    /// The model name (selection hash, output file name).
    pub name: String,
    pub ckpt: Arc<Checkpoint>,
    /// How each of its tensors is handled, in `ckpt.tensors` order.
    pub kinds: Vec<Kind>,
}

/// Everything `compress` reads, opened and checked.
pub(super) struct Inputs {
    pub base: Arc<Checkpoint>,
    pub sources: Vec<Source>,
}

/// The name a fine-tuned checkpoint path gives its model: the last path component, without
/// a `.safetensors` extension. The index stores it as UTF-8 (and it names the output of a
/// run with several fine-tunes), so a name that is not UTF-8 is an error suggesting
/// `--model-name`.
pub fn model_name_of(path: &Path) -> Result<String> {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Some(name) = p.file_name() else {
        return Ok("model".into());
    };
    let name = name.to_str().ok_or_else(|| {
        Error::checkpoint(
            path,
            format!(
                "the model's name {name:?} is not valid UTF-8 (a .udelta file stores it as \
                 UTF-8): rename it, or name the model with --model-name"
            ),
        )
    })?;
    Ok(name
        .strip_suffix(".safetensors")
        .unwrap_or(name)
        .to_string())
}

/// Checks every option that does not need the checkpoints.
pub(super) fn validate_options(finetuned: &[PathBuf], opts: &CompressOptions) -> Result<()> {
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
    if let Some(target) = opts.target {
        check_target(target, finetuned.len())?;
    }
    if let Some(g) = opts.gamma {
        if !(g.is_finite() && g > 0.0) {
            return Err(Error::Param(format!(
                "--gamma {g} must be a finite number > 0"
            )));
        }
        if !(g * opts.params.rescale()).is_finite() {
            return Err(Error::Param(format!(
                "--gamma {g} times the rescale {} overflows: the scale would be infinite",
                opts.params.rescale()
            )));
        }
    }
    Ok(())
}

/// A target size applies to one fine-tune and must be a positive size or ratio.
fn check_target(target: SizeTarget, models: usize) -> Result<()> {
    if models > 1 {
        return Err(Error::Param(
            "--target-size / --target-ratio apply to a single --finetuned checkpoint".into(),
        ));
    }
    match target {
        SizeTarget::Ratio(r) if !(r.is_finite() && r > 1.0) => Err(Error::Param(format!(
            "--target-ratio {r} must be a finite number > 1"
        ))),
        SizeTarget::Bytes(0) => Err(Error::Param("--target-size must be > 0".into())),
        _ => Ok(()),
    }
}

/// Validates the options and the output path, opens the base and every fine-tune and
/// classifies their tensors. Stages nothing.
pub(super) fn open_inputs(
    base_path: &Path,
    finetuned: &[PathBuf],
    out: &Path,
    opts: &CompressOptions,
) -> Result<Inputs> {
    validate_options(finetuned, opts)?;
    let kind = if finetuned.len() > 1 {
        OutputKind::Dir
    } else {
        OutputKind::File
    };
    let inputs: Vec<&Path> = std::iter::once(base_path)
        .chain(finetuned.iter().map(PathBuf::as_path))
        .collect();
    check_output(out, kind, opts.force, &inputs)?;
    open_checkpoints(base_path, finetuned, opts)
}

/// Opens the base and every fine-tune and classifies their tensors (options already checked).
pub(super) fn open_checkpoints(
    base_path: &Path,
    finetuned: &[PathBuf],
    opts: &CompressOptions,
) -> Result<Inputs> {
    let base = Checkpoint::open(base_path)?;
    refuse_empty(&base)?;
    let stacks = views::stacks_to_split(&base, &opts.selector);
    let base = views::split(base, &stacks, |s, want| shape_mismatch(s, want, base_path))?;
    let base = Arc::new(base);
    let mut sources: Vec<Source> = Vec::with_capacity(finetuned.len());
    for path in finetuned {
        let name = match &opts.model_name {
            Some(name) => name.clone(),
            None => model_name_of(path)?,
        };
        if sources.iter().any(|s| s.name == name) {
            return Err(Error::Param(format!(
                "two fine-tunes are named '{name}': their files would collide"
            )));
        }
        sources.push(open_source(&base, &stacks, path, name, opts)?);
    }
    Ok(Inputs { base, sources })
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

/// Opens a fine-tune and checks it against the base before any data is read; the 3-D tensors
/// split in the base (`stacks`) are split in the fine-tune too.
fn open_source(
    base: &Checkpoint,
    stacks: &views::Stacks,
    path: &Path,
    name: String,
    opts: &CompressOptions,
) -> Result<Source> {
    let ckpt = views::split(Checkpoint::open(path)?, stacks, |shape, want| {
        shape_mismatch(shape, want, &base.path)
    })?;
    refuse_empty(&ckpt)?;
    check_missing(base, &ckpt, path, opts)?;
    let kinds = ckpt
        .tensors
        .iter()
        .map(|t| classify(base, &ckpt, t, &opts.selector))
        .collect::<Result<Vec<_>>>()?;
    Ok(Source {
        name,
        ckpt: Arc::new(ckpt),
        kinds,
    })
}

/// A fine-tune may drop buffers (newer exports omit `position_ids`), but a missing tensor
/// that would be compressed means a truncated or wrong checkpoint.
fn check_missing(
    base: &Checkpoint,
    ft: &Checkpoint,
    path: &Path,
    opts: &CompressOptions,
) -> Result<()> {
    for missing in base.tensors.iter().filter(|b| ft.get(&b.name).is_none()) {
        if opts.selector.selects_entry(missing) {
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
    Ok(())
}

/// The message for a fine-tuned tensor whose shape the base's (in `base_file`) cannot take.
fn shape_mismatch(shape: &[usize], base_shape: &[usize], base_file: &Path) -> String {
    format!(
        "shape {shape:?} does not match the base's {base_shape:?} ({}): is this the right base?",
        base_file.display()
    )
}

/// Decides how fine-tuned tensor `t` of `ft` is handled, from the headers alone.
pub(super) fn classify(
    base: &Checkpoint,
    ft: &Checkpoint,
    t: &TensorEntry,
    selector: &TensorSelector,
) -> Result<Kind> {
    let ft_path = ft.shard_path(t);
    let Some(bi) = base.index_of(&t.name) else {
        return Ok(Kind::Raw);
    };
    let b = &base.tensors[bi];
    let grown = t.shape != b.shape && t.extends_rows_of(b);
    if t.shape != b.shape && !grown {
        return Err(Error::tensor(
            ft_path,
            &t.name,
            shape_mismatch(&t.shape, &b.shape, base.shard_path(b)),
        ));
    }
    // A tensor the base would have compressed must be compressible in the fine-tune too: an
    // integer (e.g. quantized) fine-tune of a float base is not a delta this tool can take.
    if selector.selects_entry(b) && t.float_type().is_none() {
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
    let selected = selector.selects_entry(t) && b.float_type().is_some();
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
