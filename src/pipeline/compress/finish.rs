//! Step 6: each model's gamma and its file's index; the outputs are complete but still staged.

use super::model::Model;
use super::stage::{Outputs, StagedOutputs};
use super::{timed, Run};
use crate::algorithm::rescale;
use crate::checkpoint::dtype::dtype_name;
use crate::checkpoint::reader::{Checkpoint, Layout};
use crate::error::{Error, Result};
use crate::format::index::{BaseInfo, ModelInfo, ShardInfo, SourceLayout, BASE_IDENTITY_HEADER};
use crate::format::{FileIndex, TensorRecord};

impl Run<'_> {
    /// Writes every model's index; returns the outputs, complete and staged.
    pub(super) fn finish(&mut self, models: Vec<Model>, outputs: Outputs) -> Result<StagedOutputs> {
        let norms: Vec<f64> = models.iter().map(|m| m.trace_norm).collect();
        let gammas = gammas(self.opts.gamma, self.with_trace_norm, &norms)?;
        let mut files = Vec::with_capacity(models.len());
        for (mut m, gamma) in models.into_iter().zip(gammas) {
            let index = self.file_index(&mut m, gamma);
            files.push(timed(&mut self.times.write, || m.writer.complete(&index))?);
        }
        outputs.complete(files)
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
            base: base_info(&self.base),
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

/// The base's identity: CRC-32 over every base tensor, in name order, as its name, dtype and
/// shape (read from the headers, so it costs no read of tensor data and does not depend on
/// which tensors the fine-tune stores). Two bases of one architecture share it; `rescale`
/// also compares the CRC-32 of every base tensor two files both recorded (docs/FORMAT.md).
fn base_info(base: &Checkpoint) -> BaseInfo {
    let mut tensors: Vec<_> = base.tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = crc32fast::Hasher::new();
    for t in &tensors {
        let dtype = dtype_name(t.dtype);
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(&(dtype.len() as u64).to_le_bytes());
        h.update(dtype.as_bytes());
        h.update(&(t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            h.update(&(d as u64).to_le_bytes());
        }
    }
    BaseInfo {
        fingerprint: format!("{:08x}", h.finalize()),
        tensors: tensors.len(),
        identity: Some(BASE_IDENTITY_HEADER.to_string()),
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
