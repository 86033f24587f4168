//! `rescale`: trace-norm rescaling across `.udelta` files compressed separately (each with
//! `--trace-norm`), from the trace norms they store; only their indexes are rewritten.
//!
//! All or nothing: every file is checked ([`targets`]: regular, writable, each named once;
//! [`same_base`]: one base), there must be room for a rewritten copy of all of them, and each
//! copy is written and synced beside its file under a temporary name before any is renamed
//! over its file ([`StagedRescale::commit`]). A failure before the renames changes nothing. The
//! renames themselves (one per file, each atomic) are not interrupted by SIGINT/SIGTERM (the
//! command line marks them [`crate::staging::committing`]); a crash or SIGKILL between two
//! leaves every file whole, some with the new gamma and some with the old, and running the
//! same `rescale` again finishes it: the gammas depend only on the stored trace norms, which
//! rescale never changes.

mod same_base;
mod targets;

use crate::algorithm::rescale::gammas;
use crate::error::{Error, Result};
use crate::format::{UdeltaReader, UdeltaWriter};
use crate::staging::StagedPath;
use std::path::PathBuf;

/// The rewritten files, complete beside the originals, waiting for [`commit`](Self::commit).
pub struct StagedRescale {
    staged: Vec<StagedPath>,
    /// Each file's new gamma, in argument order.
    pub gammas: Vec<f64>,
}

impl StagedRescale {
    /// Renames every rewritten file over its original.
    pub fn commit(self) -> Result<()> {
        self.staged.into_iter().try_for_each(StagedPath::commit)
    }
}

/// Recomputes gamma for `files` (fine-tunes of one base) and rewrites each file's model scale,
/// all or none. Returns each file's new gamma.
pub fn rescale(files: &[PathBuf]) -> Result<Vec<f64>> {
    let staged = stage_rescale(files)?;
    let gammas = staged.gammas.clone();
    staged.commit()?;
    Ok(gammas)
}

/// [`rescale`] up to, not including, the renames.
pub fn stage_rescale(files: &[PathBuf]) -> Result<StagedRescale> {
    if files.len() < 2 {
        return Err(Error::Param(
            "rescale needs at least two .udelta files (a model alone has gamma 1)".into(),
        ));
    }
    let targets = targets::resolve(files)?;
    let readers = files
        .iter()
        .map(|f| UdeltaReader::open(f))
        .collect::<Result<Vec<_>>>()?;
    same_base::check(&readers)?;
    let gamma = gammas_of(&readers)?;
    targets::check_room(&targets)?;
    let staged = readers
        .iter()
        .zip(&targets)
        .zip(&gamma)
        .map(|((r, t), &g)| {
            let mut index = r.index.clone();
            index.model.gamma = g;
            index.model.scale = g * index.model.rescale;
            UdeltaWriter::stage_rewritten_index(&t.real, r.index_offset, &index)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StagedRescale {
        staged,
        gammas: gamma,
    })
}

/// Each file's gamma from the trace norms they store.
fn gammas_of(readers: &[UdeltaReader]) -> Result<Vec<f64>> {
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
    gammas(&norms).map_err(|e| {
        let i = norms
            .iter()
            .position(|&t| t.is_nan() || t <= 0.0)
            .unwrap_or(0);
        Error::format(readers[i].path(), e)
    })
}
