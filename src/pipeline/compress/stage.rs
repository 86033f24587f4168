//! Step 2: the outputs, staged under temporary names: one `.udelta` file, or with several
//! fine-tunes a directory of them, renamed into place only by [`StagedOutputs::commit`], after
//! everything else (the report included) has succeeded. Each file starts with the fine-tune's
//! side files (config, tokenizer: [`side_files::carry`]).

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

/// The complete outputs under their temporary names, waiting for [`commit`](Self::commit).
pub(super) struct StagedOutputs {
    out: PathBuf,
    staged: StagedPath,
    /// Each file where it is now, with its size.
    pub files: Vec<(PathBuf, u64)>,
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
    /// Takes the complete files (staged by their writers, with their sizes): inside a staged
    /// directory each is renamed to its name there now; a single file stays staged.
    pub fn complete(self, files: Vec<(StagedPath, u64)>) -> Result<StagedOutputs> {
        if let Some(dir) = self.dir {
            let mut placed = Vec::with_capacity(files.len());
            for (f, size) in files {
                let name = f.target().to_path_buf();
                f.commit()?;
                placed.push((name, size));
            }
            return Ok(StagedOutputs {
                out: self.out,
                staged: dir,
                files: placed,
            });
        }
        let [(file, size)]: [(StagedPath, u64); 1] = files
            .try_into()
            .map_err(|_| Error::Param("one output file per run without a directory".into()))?;
        Ok(StagedOutputs {
            out: self.out,
            files: vec![(file.path().to_path_buf(), size)],
            staged: file,
        })
    }
}

impl StagedOutputs {
    /// Renames the output (the file, or the directory with the files in it) into place and
    /// returns the files under their final names.
    pub fn commit(self) -> Result<Vec<(PathBuf, u64)>> {
        let is_dir = self.staged.path().is_dir();
        self.staged.commit()?;
        Ok(self
            .files
            .into_iter()
            .map(|(f, size)| match is_dir {
                true => (self.out.join(f.file_name().expect("a file name")), size),
                false => (self.out.clone(), size),
            })
            .collect())
    }
}
