//! Cross-field checks of a decoded `.udelta` index: that it describes a checkpoint the
//! safetensors format accepts, written only inside the output directory, with parameters that
//! agree with each other and restored values that are finite in their dtypes.
//!
//! [`UdeltaReader`](super::UdeltaReader) runs [`check_index`] on every file it opens (after
//! its own checks of sizes and record references), so a crafted file whose checksums are valid
//! is refused before anything is written; [`UdeltaWriter`](super::UdeltaWriter) runs it on
//! every index it writes, so no file is written that would be refused when read (this is how
//! `compress` and `rescale` refuse a scale that would overflow a tensor's dtype).

use super::index::{CompressedTensor, FileIndex, ModelInfo, SourceLayout, TensorKind};
use super::matrix_views::wholes;
use crate::checkpoint::dtype::{dtype_from_name, FloatType};
use crate::checkpoint::reader::INDEX_FILE_NAME;
use crate::checkpoint::side_files::check_relative_path;
use crate::checkpoint::writer::{writable_header, TensorHeader, METADATA_KEY};
use crate::staging::NAME_MAX;
use std::collections::HashSet;

/// What is wrong with a decoded index, in words naming the field (and tensor or shard).
pub type Refusal = std::result::Result<(), String>;

/// Relative difference tolerated between a stored derived value (`rescale`, `scale`) and its
/// recomputation: the writer stores the exact f64, so only another writer's rounding differs.
const DERIVED_TOLERANCE: f64 = 1e-9;

/// Every cross-field check of `index` (whose dtypes and shapes the reader has checked).
pub fn check_index(index: &FileIndex) -> Refusal {
    check_model(index)?;
    check_layout(&index.source)?;
    check_tensor_names(index)?;
    check_restored_ranges(index)
}

/// The parameters, and the model's rescale, gamma and scale against them.
fn check_model(index: &FileIndex) -> Refusal {
    index
        .params
        .validate()
        .map_err(|e| format!("parameters: {e}"))?;
    let ModelInfo {
        rescale,
        gamma,
        scale,
        trace_norm,
        ..
    } = index.model;
    if !close(rescale, index.params.rescale()) {
        return Err(format!(
            "model rescale {rescale} differs from factor / (1 - sparsity) = {}",
            index.params.rescale()
        ));
    }
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(format!("model gamma {gamma} is not a finite number > 0"));
    }
    if !(scale.is_finite() && close(scale, gamma * rescale)) {
        return Err(format!(
            "model scale {scale} differs from gamma x rescale = {}",
            gamma * rescale
        ));
    }
    if trace_norm.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
        return Err("model trace norm is not a finite number >= 0".into());
    }
    Ok(())
}

/// Whether `stored` equals `computed` up to [`DERIVED_TOLERANCE`] (relative).
fn close(stored: f64, computed: f64) -> bool {
    (stored - computed).abs() <= DERIVED_TOLERANCE * computed.abs()
}

/// The layout and its shard file names: known layout, one shard unless sharded, every name a
/// plain file name, no two alike (also by case, for case-insensitive file systems), none the
/// shard index's.
fn check_layout(source: &SourceLayout) -> Refusal {
    let shards = source.shards.len();
    match source.layout.as_str() {
        "single" | "directory" if shards != 1 => {
            return Err(format!(
                "layout '{}' with {shards} shard files (it has one)",
                source.layout
            ))
        }
        "sharded" if shards == 0 => return Err("sharded layout without shard files".into()),
        "single" | "directory" | "sharded" => {}
        other => return Err(format!("unknown layout '{other}'")),
    }
    let mut seen = HashSet::with_capacity(shards + 1);
    seen.insert(INDEX_FILE_NAME.to_ascii_lowercase());
    for shard in &source.shards {
        let name = &shard.file_name;
        check_shard_name(name).map_err(|why| format!("shard file name '{name}': {why}"))?;
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(format!(
                "shard file name '{name}': collides with another shard or with {INDEX_FILE_NAME}"
            ));
        }
    }
    Ok(())
}

/// Whether `name` can be written as one file directly inside the output directory.
fn check_shard_name(name: &str) -> Refusal {
    check_relative_path(name)?;
    if name.contains('/') {
        return Err("a path, not a file name".into());
    }
    if name.starts_with('.') {
        return Err("a hidden name (temporaries start with '.')".into());
    }
    if name.len() > NAME_MAX {
        return Err(format!("longer than {NAME_MAX} bytes"));
    }
    Ok(())
}

/// Tensor names as restoring writes them (a 3-D tensor stored as matrices once, by its own
/// name: [`wholes`]): none twice in the file, none reserved, and each shard's safetensors
/// header writable (see [`writable_header`]).
fn check_tensor_names(index: &FileIndex) -> Refusal {
    let tensors = wholes(&index.tensors);
    let mut names = HashSet::with_capacity(tensors.len());
    for t in &tensors {
        if t.name == METADATA_KEY {
            return Err(format!(
                "tensor '{METADATA_KEY}': the name is reserved for the file's metadata"
            ));
        }
        if !names.insert(t.name) {
            return Err(format!("tensor '{}': listed twice", t.name));
        }
    }
    for (si, shard) in index.source.shards.iter().enumerate() {
        let headers = tensors
            .iter()
            .filter(|t| t.records[0].shard == si)
            .map(|t| {
                let dtype = dtype_from_name(t.dtype)
                    .ok_or_else(|| format!("tensor '{}': unknown dtype", t.name))?;
                Ok(TensorHeader {
                    name: t.name.to_string(),
                    dtype,
                    shape: t.shape.to_vec(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        writable_header(&headers, shard.metadata.as_ref())
            .map_err(|why| format!("shard file '{}': {why}", shard.file_name))?;
    }
    Ok(())
}

/// Every compressed tensor's grid and the model scale: `lo` and `hi` finite, `lo <= hi`, and
/// every scaled level finite in the fine-tune's dtype. (A base value near the dtype's limit
/// plus the delta can still overflow: the restore loop checks that, per element.)
fn check_restored_ranges(index: &FileIndex) -> Refusal {
    let scale = index.model.scale;
    for t in &index.tensors {
        let TensorKind::Compressed(c) = &t.kind else {
            continue;
        };
        let fail = |what: String| Err(format!("tensor '{}': {what}", t.name));
        let (lo, hi) = (c.lo(), c.hi());
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return fail(format!(
                "delta range [{lo}, {hi}] is not finite and ordered"
            ));
        }
        let Some(out) = dtype_from_name(&t.dtype).and_then(FloatType::from_dtype) else {
            return fail("compressed tensor of a non-float dtype".into());
        };
        if let Some(why) = scaled_delta_overflow(c, scale, out) {
            return fail(why);
        }
    }
    Ok(())
}

/// Why the scaled delta of `c` does not fit `out` (its largest level times `scale`), if so.
pub fn scaled_delta_overflow(c: &CompressedTensor, scale: f64, out: FloatType) -> Option<String> {
    let largest = c
        .grid()
        .scaled_values(scale)
        .into_iter()
        .map(f32::abs)
        .fold(0f32, |a, v| if v > a || v.is_nan() { v } else { a });
    if out.holds(largest) {
        return None;
    }
    Some(format!(
        "restored values would overflow {}: the delta range [{}, {}] times the scale {scale} \
         reaches {largest}, beyond its largest value {} (lower --sparsity, --factor or \
         --gamma, or leave the tensor uncompressed with --exclude)",
        crate::checkpoint::dtype::dtype_name(out.dtype()),
        c.lo(),
        c.hi(),
        out.max_finite()
    ))
}
