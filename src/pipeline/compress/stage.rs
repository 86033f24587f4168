//! Step 2: the outputs, staged under temporary names: one `.udelta` file, or with several
//! fine-tunes a directory of them, renamed into place only by [`Outputs::commit`].

use super::model::Model;
use super::open::Source;
use crate::error::{Error, Result};
use crate::format::UdeltaWriter;
use crate::staging::StagedPath;
use std::path::{Path, PathBuf};

/// The staged output directory (several fine-tunes) or nothing (one fine-tune: its writer
/// stages the file itself).
pub(super) struct Outputs {
    out: PathBuf,
    dir: Option<StagedPath>,
}

/// Stages the outputs of `sources` at `out` and gives each fine-tune its writer.
pub(super) fn stage_outputs(
    sources: Vec<Source>,
    out: &Path,
    force: bool,
) -> Result<(Outputs, Vec<Model>)> {
    let dir = (sources.len() > 1)
        .then(|| StagedPath::new(out, force))
        .transpose()?;
    if let Some(d) = &dir {
        std::fs::create_dir(d.path()).map_err(|e| Error::io(out, e))?;
    }
    let models = sources
        .into_iter()
        .map(|s| {
            let file = match &dir {
                Some(d) => d.path().join(format!("{}.udelta", s.name)),
                None => out.to_path_buf(),
            };
            Ok(Model::new(s, UdeltaWriter::create(&file, force)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = Outputs {
        out: out.to_path_buf(),
        dir,
    };
    Ok((outputs, models))
}

impl Outputs {
    /// Renames a staged directory into place; `files` (written inside it) are renamed with it.
    pub fn commit(self, files: &mut [(PathBuf, u64)]) -> Result<()> {
        if let Some(d) = self.dir {
            d.commit()?;
            for (f, _) in files.iter_mut() {
                *f = self.out.join(f.file_name().expect("a file name"));
            }
        }
        Ok(())
    }
}
