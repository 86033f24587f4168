//! `decompress`: `.udelta` + base -> the fine-tuned checkpoint (same dtypes, same file layout),
//! or with `delta_only` the reconstructed deltas of the compressed tensors as f32.
//!
//! Every base tensor is checked against the CRC-32 recorded at compression, so a wrong base
//! is refused (unless forced), naming the tensor. The fine-tune's side files (config,
//! tokenizer) are written beside the weights. The output directory is staged and appears only
//! when complete.

use crate::checkpoint::dtype::{dtype_from_name, Dtype, FloatType};
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};
use crate::codec;
use crate::error::{Error, Result};
use crate::format::index::crc32;
use crate::format::{CompressedTensor, TensorKind, TensorRecord, UdeltaReader};
use crate::progress::Progress;
use crate::staging::{check_output, OutputKind, StagedPath};
use std::path::Path;
use std::sync::Arc;

use super::lossless::restore_coded;
use super::prefetch::{Prefetch, ReadJob, TensorRead};

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

/// Parses a dtype name as written in the index.
fn parse_dtype(reader: &UdeltaReader, tensor: &str, name: &str) -> Result<Dtype> {
    dtype_from_name(name).ok_or_else(|| {
        Error::format(
            reader.path(),
            format!("tensor '{tensor}': unknown dtype '{name}'"),
        )
    })
}

/// The header of a record's tensor as the fine-tune had it.
fn header_of(reader: &UdeltaReader, r: &TensorRecord) -> Result<TensorHeader> {
    Ok(TensorHeader {
        name: r.name.clone(),
        dtype: parse_dtype(reader, &r.name, &r.dtype)?,
        shape: r.shape.clone(),
    })
}

/// Decodes a compressed tensor's kept positions and levels.
pub fn decode_kept(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
) -> Result<(Vec<u32>, Vec<u8>)> {
    let what = |s: &str| format!("tensor '{}': {s}", r.name);
    let positions = reader.read_record(&c.positions, &what("position stream"))?;
    let levels = reader.read_record(&c.levels, &what("level stream"))?;
    codec::decode_tensor(
        c.shared_numel,
        &c.kept_counts,
        &c.blocks,
        &positions,
        &levels,
    )
    .map_err(|e| Error::format(reader.path(), what(&format!("undecodable: {e}"))))
}

/// The base checkpoint, checked tensor by tensor against what a `.udelta` file expects.
struct BaseSource<'a> {
    base: &'a Arc<Checkpoint>,
    reader: &'a UdeltaReader,
    force: bool,
}

impl BaseSource<'_> {
    /// The base tensor `name`, checked to have the dtype and shape the file expects.
    fn entry(&self, name: &str, dtype: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let (base, file) = (self.base, self.reader.path().display());
        let b = base.get(name).ok_or_else(|| {
            Error::tensor(
                &base.path,
                name,
                format!("missing from the base, but {file} was made against a base that has it"),
            )
        })?;
        let have = crate::checkpoint::dtype::dtype_name(b.dtype);
        if have != dtype || b.shape != shape {
            return Err(Error::tensor(
                base.shard_path(b),
                name,
                format!(
                    "base has {have} {:?}, {file} expects {dtype} {shape:?}: wrong base",
                    b.shape
                ),
            ));
        }
        Ok(b)
    }

    /// Checks the bytes read for base tensor `b` against the CRC-32 the file recorded.
    fn check(&self, b: &TensorEntry, bytes: &[u8], want_crc: u32) -> Result<()> {
        if !self.force && crc32(bytes) != want_crc {
            return Err(Error::tensor(
                self.base.shard_path(b),
                &b.name,
                format!(
                    "differs from the base {} was made against (checksum mismatch): wrong base? (--force to apply anyway)",
                    self.reader.path().display()
                ),
            ));
        }
        Ok(())
    }

    /// What record `r` needs from the base: its tensor entry and expected CRC-32, or `None`
    /// for tensors stored whole in the file. Checks dtype and shape.
    fn needs(&self, r: &TensorRecord) -> Result<Option<(&TensorEntry, u32)>> {
        Ok(match &r.kind {
            TensorKind::Unchanged { base_crc32 } => {
                Some((self.entry(&r.name, &r.dtype, &r.shape)?, *base_crc32))
            }
            TensorKind::Compressed(c) => Some((
                self.entry(&r.name, &c.base_dtype, &c.base_shape)?,
                c.base_crc32,
            )),
            TensorKind::Coded(c) => match &c.base {
                Some(b) => Some((self.entry(&r.name, &r.dtype, &b.shape)?, b.crc32)),
                None => None,
            },
            TensorKind::Raw { .. } => None,
        })
    }

    /// Starts reading, in order, the base tensors `records` need, after checking every one
    /// of them (so a base that lacks a tensor is refused before anything is written).
    fn prefetch<'r>(
        &self,
        records: impl IntoIterator<Item = &'r TensorRecord>,
    ) -> Result<Prefetch> {
        let jobs = records
            .into_iter()
            .map(|r| {
                Ok(match self.needs(r)? {
                    Some((b, _)) => vec![TensorRead {
                        ckpt: self.base.clone(),
                        tensor: b.clone(),
                    }],
                    None => Vec::new(),
                })
            })
            .collect::<Result<Vec<ReadJob>>>()?;
        Ok(Prefetch::start(jobs))
    }
}

/// Turns the base bytes of one compressed tensor into its fine-tuned bytes (in place when
/// the dtypes agree, else into a new buffer).
pub fn reconstruct(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    base_bytes: Vec<u8>,
    base_type: FloatType,
    out_type: FloatType,
) -> Result<Vec<u8>> {
    let (positions, levels) = decode_kept(reader, r, c)?;
    let deltas = c.grid().scaled_values(reader.index.model.scale);
    let base_values = (base_type != out_type).then(|| {
        let mut vals = Vec::new();
        base_type.decode_into(&base_bytes, &mut vals);
        vals
    });
    let mut out = match &base_values {
        None => base_bytes,
        Some(vals) => {
            let mut out = Vec::new();
            out_type.encode_into(vals, &mut out);
            out
        }
    };
    for (&p, &l) in positions.iter().zip(&levels) {
        let base = match &base_values {
            None => out_type.load(&out, p as usize),
            Some(vals) => vals[p as usize],
        };
        out_type.store(&mut out, p as usize, base + deltas[l as usize]);
    }
    if let Some(tail) = &c.tail {
        out.extend_from_slice(
            &reader.read_record(tail, &format!("tensor '{}': new rows", r.name))?,
        );
    }
    Ok(out)
}

/// Decompresses `input` against `base` into the directory `out_dir`.
pub fn decompress(
    input: &Path,
    base_path: &Path,
    out_dir: &Path,
    opts: &DecompressOptions,
) -> Result<()> {
    check_output(out_dir, OutputKind::Dir, opts.force, &[input, base_path])?;
    let staged = StagedPath::new(out_dir, opts.force)?;
    let reader = UdeltaReader::open(input)?;
    let base = Arc::new(Checkpoint::open(base_path)?);
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
    staged.commit()
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
        let (positions, levels) = decode_kept(reader, r, c)?;
        let deltas = c.grid().scaled_values(reader.index.model.scale);
        let mut dense = vec![0f32; c.shared_numel as usize];
        for (&p, &l) in positions.iter().zip(&levels) {
            dense[p as usize] = deltas[l as usize];
        }
        w.write(bytemuck::cast_slice(&dense))?;
        progress.inc(c.shared_numel * 4);
    }
    progress.finish();
    w.finish()
}

/// The fine-tuned bytes of record `r` (header `h`), given the base bytes it needs (if any).
fn restore(
    reader: &UdeltaReader,
    base: &BaseSource,
    r: &TensorRecord,
    h: &TensorHeader,
    base_bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    let needs = base.needs(r)?;
    if let (Some((b, crc)), Some(bytes)) = (needs, &base_bytes) {
        base.check(b, bytes, crc)?;
    }
    let not_read = || Error::Param("internal: base not read".into());
    let out = match &r.kind {
        TensorKind::Unchanged { .. } => base_bytes.ok_or_else(not_read)?,
        TensorKind::Raw { data } => reader.read_record(data, &format!("tensor '{}'", r.name))?,
        TensorKind::Coded(c) => {
            // A base forced over a checksum mismatch restores other bytes than the fine-tune's.
            let verify = match (needs, &base_bytes) {
                (Some((_, crc)), Some(bytes)) => !base.force || crc32(bytes) == crc,
                _ => true,
            };
            restore_coded(reader, r, c, h.dtype, h.byte_len(), base_bytes, verify)?
        }
        TensorKind::Compressed(c) => {
            let bad_type = || {
                Error::format(
                    reader.path(),
                    format!(
                        "tensor '{}': compressed tensor of a non-float dtype",
                        r.name
                    ),
                )
            };
            let base_type = needs
                .and_then(|(b, _)| b.float_type())
                .ok_or_else(bad_type)?;
            let out_type = FloatType::from_dtype(h.dtype).ok_or_else(bad_type)?;
            let base_bytes = base_bytes.ok_or_else(not_read)?;
            reconstruct(reader, r, c, base_bytes, base_type, out_type)?
        }
    };
    if out.len() as u64 != h.byte_len() {
        return Err(Error::format(
            reader.path(),
            format!("tensor '{}': restored size differs from its shape", r.name),
        ));
    }
    Ok(out)
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
        let records: Vec<&TensorRecord> = index.tensors.iter().filter(|r| r.shard == si).collect();
        let headers = records
            .iter()
            .map(|r| header_of(reader, r))
            .collect::<Result<Vec<_>>>()?;
        shards.push((shard, records, headers));
    }
    let total: u64 = shards
        .iter()
        .flat_map(|(_, _, hs)| hs.iter().map(|h| h.byte_len()))
        .sum();
    let mut loads = base.prefetch(shards.iter().flat_map(|(_, rs, _)| rs.iter().copied()))?;
    let progress = Progress::new("decompress", total, opts.progress);
    let mut weight_map = serde_json::Map::new();
    for (shard, records, headers) in &shards {
        let path = dir.join(&shard.file_name);
        let mut w = SafetensorsWriter::create(&path, headers, shard.metadata.as_ref())?;
        for (r, h) in records.iter().zip(headers) {
            weight_map.insert(
                r.name.clone(),
                serde_json::Value::String(shard.file_name.clone()),
            );
            let out = restore(reader, base, r, h, loads.next_job()?.pop())?;
            w.write(&out)?;
            loads.recycle([out]);
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
