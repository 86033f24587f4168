//! Step 6: each model's gamma, its file's index, and the outputs renamed into place.

use super::model::Model;
use super::stage::Outputs;
use super::{timed, Run};
use crate::algorithm::rescale;
use crate::checkpoint::reader::{Checkpoint, Layout};
use crate::error::{Error, Result};
use crate::format::index::{BaseInfo, ModelInfo, ShardInfo, SourceLayout};
use crate::format::{FileIndex, TensorRecord};
use std::path::PathBuf;

impl Run<'_> {
    /// Writes every model's index and commits the outputs; returns the files and their sizes.
    pub(super) fn finish(
        &mut self,
        models: Vec<Model>,
        outputs: Outputs,
    ) -> Result<Vec<(PathBuf, u64)>> {
        let norms: Vec<f64> = models.iter().map(|m| m.trace_norm).collect();
        let gammas = gammas(self.opts.gamma, self.with_trace_norm, &norms)?;
        let mut files = Vec::with_capacity(models.len());
        for (mut m, gamma) in models.into_iter().zip(gammas) {
            let index = self.file_index(&mut m, gamma);
            let target = m.writer.target().to_path_buf();
            let bytes = timed(&mut self.times.write, || m.writer.finish(&index))?;
            files.push((target, bytes));
        }
        outputs.commit(&mut files)?;
        Ok(files)
    }

    /// The index of model `m`'s file, with its gamma (takes the records over).
    fn file_index(&self, m: &mut Model, gamma: f64) -> FileIndex {
        let rescale = self.opts.params.rescale();
        let records: Vec<TensorRecord> = std::mem::take(&mut m.records)
            .into_iter()
            .map(|r| r.expect("pass 2 wrote every tensor"))
            .collect();
        FileIndex {
            format_version: m.writer.version(),
            tool: format!("udelta-gpu {}", env!("CARGO_PKG_VERSION")),
            engine: self.engine.name(),
            params: self.opts.params,
            model: ModelInfo {
                name: m.name.clone(),
                rescale,
                gamma,
                trace_norm: self.with_trace_norm.then_some(m.trace_norm),
                scale: gamma * rescale,
            },
            base: base_info(&records),
            source: source_layout(&m.ckpt),
            tensors: records,
            side_files: std::mem::take(&mut m.side_files),
        }
    }
}

/// Each model's gamma: the one `--gamma` gave, else the trace-norm rule over `norms` when
/// they were estimated, else 1.
pub(super) fn gammas(fixed: Option<f64>, with_trace_norm: bool, norms: &[f64]) -> Result<Vec<f64>> {
    Ok(match fixed {
        Some(g) => vec![g; norms.len()],
        None if with_trace_norm => rescale::gammas(norms).map_err(Error::Param)?,
        None => vec![1.0; norms.len()],
    })
}

/// The base fingerprint: CRC-32 over the names and base CRC-32s of every base tensor used.
fn base_info(records: &[TensorRecord]) -> BaseInfo {
    let mut h = crc32fast::Hasher::new();
    let mut used = 0;
    for r in records {
        let Some(crc) = r.kind.base_crc32() else {
            continue;
        };
        h.update(r.name.as_bytes());
        h.update(&crc.to_le_bytes());
        used += 1;
    }
    BaseInfo {
        fingerprint: format!("{:08x}", h.finalize()),
        tensors: used,
    }
}

/// How the fine-tune was laid out, for decompression.
fn source_layout(ckpt: &Checkpoint) -> SourceLayout {
    SourceLayout {
        layout: match ckpt.layout {
            Layout::SingleFile => "single",
            Layout::Directory => "directory",
            Layout::Sharded => "sharded",
        }
        .to_string(),
        shards: ckpt
            .shards
            .iter()
            .map(|s| ShardInfo {
                file_name: s.file_name.clone(),
                metadata: s.metadata.clone(),
            })
            .collect(),
        index_metadata: ckpt.index_metadata.clone(),
    }
}
