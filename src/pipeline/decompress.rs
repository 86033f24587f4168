//! `decompress`: `.udelta` + base -> the fine-tuned checkpoint (same dtypes, same file layout),
//! or with `delta_only` the reconstructed deltas of the compressed tensors as f32.
//!
//! Every base tensor is checked against the CRC-32 recorded at compression, so a wrong base
//! is refused (unless forced), naming the tensor. The fine-tune's side files (config,
//! tokenizer) are written beside the weights. The output directory is staged and appears only
//! when complete.

use crate::checkpoint::dtype::Dtype;
use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};
use crate::error::{Error, Result};
use crate::format::matrix_views::{wholes, Whole};
use crate::format::{CompressedTensor, TensorKind, TensorRecord, UdeltaReader};
use crate::progress::Progress;
use crate::restore::{dense_delta, header_of, open_base, restore, whole_header, BaseSource};
use crate::staging::{check_output, OutputKind, StagedPath};
use std::path::Path;
use std::sync::Arc;

pub use crate::restore::{decode_kept, reconstruct};

/// Options of `decompress`.
#[derive(Debug, Clone, Default)]
pub struct DecompressOptions {
    /// Write only the deltas of the compressed tensors (f32).
    pub delta_only: bool,
    /// Replace an existing output, and accept a base whose checksums differ.
    pub force: bool,
    /// Show progress bars.
    pub progress: bool,
}

/// Decompresses `input` against `base` into the directory `out_dir`.
pub fn decompress(
    input: &Path,
    base_path: &Path,
    out_dir: &Path,
    opts: &DecompressOptions,
) -> Result<()> {
    decompress_staged(input, base_path, out_dir, opts)?.commit()
}

/// [`decompress`] up to, not including, the final rename: the complete directory, staged.
pub fn decompress_staged(
    input: &Path,
    base_path: &Path,
    out_dir: &Path,
    opts: &DecompressOptions,
) -> Result<StagedPath> {
    check_output(out_dir, OutputKind::Dir, opts.force, &[input, base_path])?;
    let staged = StagedPath::new(out_dir, opts.force)?;
    let reader = UdeltaReader::open(input)?;
    let base = Arc::new(open_base(base_path, &reader)?);
    let base = BaseSource {
        base: &base,
        reader: &reader,
        force: opts.force,
    };
    std::fs::create_dir(staged.path()).map_err(|e| Error::io(out_dir, e))?;
    if opts.delta_only {
        write_deltas(&reader, &base, staged.path(), opts)?;
    } else {
        // First: they are small, and a base without the files they need is refused early.
        super::side_files::restore(&reader, base_path, staged.path())?;
        write_checkpoint(&reader, &base, staged.path(), opts)?;
    }
    Ok(staged)
}

fn write_deltas(
    reader: &UdeltaReader,
    base: &BaseSource,
    dir: &Path,
    opts: &DecompressOptions,
) -> Result<()> {
    let compressed: Vec<(&TensorRecord, &CompressedTensor)> = reader
        .index
        .tensors
        .iter()
        .filter_map(|r| match &r.kind {
            TensorKind::Compressed(c) => Some((r, c.as_ref())),
            _ => None,
        })
        .collect();
    let headers: Vec<TensorHeader> = compressed
        .iter()
        .map(|(r, c)| TensorHeader {
            name: r.name.clone(),
            dtype: Dtype::F32,
            shape: c.base_shape.clone(),
        })
        .collect();
    // Check the base even though only deltas are written: deltas of a wrong base are wrong.
    let mut loads = base.prefetch(compressed.iter().map(|(r, _)| *r))?;
    let mut w = SafetensorsWriter::create(&dir.join("model.safetensors"), &headers, None)?;
    let progress = Progress::new(
        "deltas",
        compressed.iter().map(|(_, c)| c.shared_numel * 4).sum(),
        opts.progress,
    );
    for (r, c) in compressed {
        let base_buf = loads
            .next_job()?
            .pop()
            .expect("one read per compressed tensor");
        base.check(
            base.entry(&r.name, &c.base_dtype, &c.base_shape)?,
            &base_buf,
            c.base_crc32,
        )?;
        loads.recycle([base_buf]);
        let dense = dense_delta(reader, r, c)?;
        w.write(bytemuck::cast_slice(&dense))?;
        progress.inc(c.shared_numel * 4);
    }
    progress.finish();
    w.finish()
}

fn write_checkpoint(
    reader: &UdeltaReader,
    base: &BaseSource,
    dir: &Path,
    opts: &DecompressOptions,
) -> Result<()> {
    let index = &reader.index;
    let mut shards = Vec::with_capacity(index.source.shards.len());
    for (si, shard) in index.source.shards.iter().enumerate() {
        let name = Path::new(&shard.file_name);
        if name.components().count() != 1 || shard.file_name.starts_with('.') {
            return Err(Error::format(
                reader.path(),
                format!("unsafe shard file name '{}'", shard.file_name),
            ));
        }
        let tensors: Vec<Whole> = wholes(index.tensors.iter().filter(|r| r.shard == si));
        let headers = tensors
            .iter()
            .map(|w| whole_header(reader, w))
            .collect::<Result<Vec<_>>>()?;
        shards.push((shard, tensors, headers));
    }
    let total: u64 = shards
        .iter()
        .flat_map(|(_, _, hs)| hs.iter().map(|h| h.byte_len()))
        .sum();
    let records = shards
        .iter()
        .flat_map(|(_, ws, _)| ws.iter().flat_map(|w| w.records.iter().copied()));
    let mut loads = base.prefetch(records)?;
    let progress = Progress::new("decompress", total, opts.progress);
    let mut weight_map = serde_json::Map::new();
    for (shard, tensors, headers) in &shards {
        let path = dir.join(&shard.file_name);
        let mut w = SafetensorsWriter::create(&path, headers, shard.metadata.as_ref())?;
        for (tensor, h) in tensors.iter().zip(headers) {
            weight_map.insert(
                tensor.name.to_string(),
                serde_json::Value::String(shard.file_name.clone()),
            );
            // One record, or the matrices of a 3-D tensor one after another: its bytes in order.
            for r in &tensor.records {
                let out = restore(
                    reader,
                    base,
                    r,
                    &header_of(reader, r)?,
                    loads.next_job()?.pop(),
                )?;
                w.write(&out)?;
                loads.recycle([out]);
            }
            progress.inc(h.byte_len());
        }
        w.finish()?;
    }
    progress.finish();
    if index.source.layout == "sharded" {
        let json = serde_json::json!({
            "metadata": index.source.index_metadata.clone().unwrap_or_else(|| serde_json::json!({})),
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::format(reader.path(), e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
