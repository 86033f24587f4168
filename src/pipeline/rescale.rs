//! `rescale`: trace-norm rescaling across `.udelta` files compressed separately (each with
//! `--trace-norm`), from the trace norms they store; only their indexes are rewritten.

use crate::algorithm::rescale::gammas;
use crate::error::{Error, Result};
use crate::format::{UdeltaReader, UdeltaWriter};
use std::path::PathBuf;

/// Recomputes gamma for `files` (fine-tunes of one base) and rewrites each file's model scale.
/// Returns each file's new gamma.
pub fn rescale(files: &[PathBuf]) -> Result<Vec<f64>> {
    if files.len() < 2 {
        return Err(Error::Param(
            "rescale needs at least two .udelta files (a model alone has gamma 1)".into(),
        ));
    }
    let readers = files
        .iter()
        .map(|f| UdeltaReader::open(f))
        .collect::<Result<Vec<_>>>()?;
    let base = &readers[0].index.base.fingerprint;
    for r in &readers {
        if &r.index.base.fingerprint != base {
            return Err(Error::format(
                r.path(),
                format!(
                    "made against another base (fingerprint {} vs {base} of {})",
                    r.index.base.fingerprint,
                    files[0].display()
                ),
            ));
        }
    }
    let norms = readers
        .iter()
        .map(|r| {
            r.index.model.trace_norm.ok_or_else(|| {
                Error::format(
                    r.path(),
                    "stores no trace norm: compress it with --trace-norm",
                )
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    let gamma = gammas(&norms).map_err(|e| {
        let i = norms
            .iter()
            .position(|&t| t.is_nan() || t <= 0.0)
            .unwrap_or(0);
        Error::format(&files[i], e)
    })?;
    for (r, &g) in readers.iter().zip(&gamma) {
        let mut index = r.index.clone();
        index.model.gamma = g;
        index.model.scale = g * index.model.rescale;
        UdeltaWriter::rewrite_index(r.path(), r.index_offset, &index)?;
    }
    Ok(gamma)
}
