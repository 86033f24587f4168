//! The matrix views of an index (format version 3): the matrices of a 3-D tensor stored as
//! consecutive records ([`TensorRecord::matrix_of`], [`crate::checkpoint::views`]), and the
//! whole tensors restoring writes from them.

use super::index::{FileIndex, TensorRecord};
use super::MATRIX_VIEWS_VERSION;
use crate::checkpoint::views::Stacks;

/// One tensor of the fine-tuned checkpoint as restoring writes it: one record, or the
/// consecutive records of a 3-D tensor's matrices.
#[derive(Debug, Clone)]
pub struct Whole<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its dtype (safetensors spelling).
    pub dtype: &'a str,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its records, in order: one, or one per matrix.
    pub records: Vec<&'a TensorRecord>,
}

/// Groups `records` (in file order, as [`check`] accepted them) into whole tensors.
pub fn wholes<'a>(records: impl IntoIterator<Item = &'a TensorRecord>) -> Vec<Whole<'a>> {
    let mut out: Vec<Whole<'a>> = Vec::new();
    for r in records {
        match &r.matrix_of {
            Some(m) if m.index > 0 => match out.last_mut() {
                Some(w) if w.name == m.name => w.records.push(r),
                // Not after its tensor's first matrix: [`check`] refuses such an index.
                _ => out.push(whole(&m.name, &r.dtype, &m.shape, r)),
            },
            Some(m) => out.push(whole(&m.name, &r.dtype, &m.shape, r)),
            None => out.push(whole(&r.name, &r.dtype, &r.shape, r)),
        }
    }
    out
}

fn whole<'a>(name: &'a str, dtype: &'a str, shape: &'a [usize], r: &'a TensorRecord) -> Whole<'a> {
    Whole {
        name,
        dtype,
        shape,
        records: vec![r],
    }
}

/// The 3-D tensors an index stores as matrices, with their shapes (what the base must be split
/// into to restore them).
pub fn stacks(index: &FileIndex) -> Stacks {
    index
        .tensors
        .iter()
        .filter_map(|r| r.matrix_of.as_ref())
        .map(|m| (m.name.clone(), m.shape.clone()))
        .collect()
}

/// Checks the matrix views of `index`: only in version 3 and later; the matrices of a 3-D
/// tensor `[E, R, C]` are E consecutive records `[R, C]` with indexes `0..E`, one dtype and one
/// shard. (That no two whole tensors share a name is checked with every other name rule, in
/// [`super::validate`].)
pub fn check(index: &FileIndex) -> Result<(), String> {
    for w in wholes(&index.tensors) {
        if w.records.iter().any(|r| r.matrix_of.is_some()) {
            check_stack(index, &w)?;
        }
    }
    Ok(())
}

/// Checks the records of one 3-D tensor stored as matrices.
fn check_stack(index: &FileIndex, w: &Whole) -> Result<(), String> {
    let fail = |what: &str| Err(format!("tensor '{}': {what}", w.name));
    if index.format_version < MATRIX_VIEWS_VERSION {
        return fail(&format!(
            "matrix views in a version {} file",
            index.format_version
        ));
    }
    let [count, rows, cols] = *w.shape else {
        return fail("matrix views of a tensor that is not 3-D");
    };
    if w.records.len() != count {
        return fail(&format!(
            "{} consecutive matrix records where its shape has {count}",
            w.records.len()
        ));
    }
    let first = w.records[0];
    for (i, r) in w.records.iter().enumerate() {
        let Some(m) = &r.matrix_of else {
            return fail("a whole tensor's record among its matrices");
        };
        if m.index != i || m.shape != w.shape {
            return fail("matrix records out of order or of differing shapes");
        }
        if r.shape != [rows, cols] || r.dtype != first.dtype || r.shard != first.shard {
            return fail("a matrix record of another shape, dtype or shard than its tensor's");
        }
    }
    Ok(())
}
