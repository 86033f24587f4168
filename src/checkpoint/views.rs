//! Matrix views: a 3-D tensor `[E, R, C]` (fused MoE experts: `mlp.experts.gate_up_proj`
//! `[E, 2F, H]`, `mlp.experts.down_proj` `[E, H, F]`) compressed as E matrices `[R, C]`.
//!
//! A checkpoint's 3-D tensor is replaced, in its place in the tensor list, by E entries named
//! `NAME[e]` ([`view_name`]), each the byte range of one matrix (row-major, so matrix `e` is
//! bytes `[e * R * C, (e + 1) * R * C)` times the element size). Every step after that (reads,
//! engines, variance allocation, selection keys, trace norms, records) sees ordinary 2-D
//! tensors; the entries remember the tensor they come from ([`MatrixOf`]), which the file
//! records so that restoring writes the one 3-D tensor back (docs/FORMAT.md, "Matrix views").

use super::reader::{Checkpoint, TensorEntry};
use super::select::TensorSelector;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The 3-D tensors to split, by name, with their shapes `[E, R, C]`.
pub type Stacks = BTreeMap<String, Vec<usize>>;

/// The 3-D tensor a matrix view is one matrix of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixOf {
    /// The 3-D tensor's name.
    pub name: String,
    /// Its shape `[E, R, C]`.
    pub shape: Vec<usize>,
    /// Which of its E matrices this is.
    pub index: usize,
}

/// The name of matrix `index` of tensor `name`: `name[index]`.
pub fn view_name(name: &str, index: usize) -> String {
    format!("{name}[{index}]")
}

/// Whether a tensor of this shape is split into matrix views when it is compressed.
pub fn is_matrix_stack(shape: &[usize]) -> bool {
    shape.len() == 3
}

/// The 3-D tensors of `base` that `selector` selects: those compress splits into matrices.
pub fn stacks_to_split(base: &Checkpoint, selector: &TensorSelector) -> Stacks {
    base.tensors
        .iter()
        .filter(|t| is_matrix_stack(&t.shape) && selector.selects_entry(t))
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect()
}

/// `ckpt` with each tensor named in `stacks` replaced by its matrix views. A named tensor the
/// checkpoint lacks is left to the caller's checks; one of another shape is an error naming
/// it, with the message `mismatch(its shape, the expected shape)`.
pub fn split(
    ckpt: Checkpoint,
    stacks: &Stacks,
    mismatch: impl Fn(&[usize], &[usize]) -> String,
) -> Result<Checkpoint> {
    if stacks.is_empty() {
        return Ok(ckpt);
    }
    let mut tensors = Vec::with_capacity(ckpt.tensors.len());
    for t in &ckpt.tensors {
        let Some(shape) = stacks.get(&t.name) else {
            tensors.push(t.clone());
            continue;
        };
        if t.shape != *shape || !is_matrix_stack(shape) {
            let msg = mismatch(&t.shape, shape);
            return Err(Error::tensor(ckpt.shard_path(t), &t.name, msg));
        }
        tensors.extend(matrices(t));
    }
    ckpt.with_tensors(tensors)
}

/// The E matrix views of 3-D tensor `t`, in order.
fn matrices(t: &TensorEntry) -> impl Iterator<Item = TensorEntry> + '_ {
    let count = t.shape[0];
    // An empty stack has no views; otherwise every matrix has the same byte length.
    let len = if count == 0 { 0 } else { t.len / count as u64 };
    (0..count).map(move |index| TensorEntry {
        name: view_name(&t.name, index),
        dtype: t.dtype,
        shape: t.shape[1..].to_vec(),
        shard: t.shard,
        offset: t.offset + index as u64 * len,
        len,
        matrix_of: Some(MatrixOf {
            name: t.name.clone(),
            shape: t.shape.clone(),
            index,
        }),
    })
}

/// The name and shape that decide whether `t` is selected: its 3-D tensor's for a view.
pub fn selection_identity(t: &TensorEntry) -> (&str, &[usize]) {
    match &t.matrix_of {
        Some(m) => (&m.name, &m.shape),
        None => (&t.name, &t.shape),
    }
}
