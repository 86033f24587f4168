//! Step 2: the outputs, staged under temporary names: one `.udelta` file, or with several
//! fine-tunes a directory of them, renamed into place only by [`Outputs::commit`]. Each file
//! starts with the fine-tune's side files (config, tokenizer: [`side_files::carry`]).

use super::model::Model;
use super::open::Source;
use super::CompressOptions;
use crate::checkpoint::reader::Checkpoint;
use crate::error::{Error, Result};
use crate::format::{self, UdeltaWriter};
use crate::pipeline::side_files;
use crate::staging::StagedPath;
use std::path::{Path, PathBuf};

/// The staged output directory (several fine-tunes) or nothing (one fine-tune: its writer
/// stages the file itself).
pub(super) struct Outputs {
    out: PathBuf,
    dir: Option<StagedPath>,
}

/// Stages the outputs of `sources` at `out` and gives each fine-tune its writer, which already
/// holds the fine-tune's side files.
pub(super) fn stage_outputs(
    sources: Vec<Source>,
    base: &Checkpoint,
    out: &Path,
    opts: &CompressOptions,
) -> Result<(Outputs, Vec<Model>)> {
    let force = opts.force;
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
            let views = s.ckpt.tensors.iter().any(|t| t.matrix_of.is_some());
            let mut writer = UdeltaWriter::create(&file, force, format::version_for(views))?;
            let carried = side_files::carry(
                &base.path,
                &s.ckpt,
                &mut writer,
                opts.side_files,
                !opts.progress,
            )?;
            Ok(Model::new(s, writer, carried))
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
