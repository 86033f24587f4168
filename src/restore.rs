//! Restoring the tensors of a `.udelta` file against a base, one tensor at a time: what
//! `decompress` writes and what the Python package hands to PyTorch or NumPy, from one code.
//!
//! - [`BaseSource`]: the base checkpoint, checked tensor by tensor (dtype, shape, CRC-32)
//!   against what the file recorded, so a wrong base is refused naming the tensor.
//! - [`kept_deltas`]: the kept positions of a compressed tensor and the f32 value that
//!   restoring adds at each; [`dense_delta`]: the same as a dense f32 tensor.
//! - [`restore`] / [`restore_unchecked`]: the fine-tuned bytes of one tensor from its record
//!   and the base's bytes (f32 add, rounded to the fine-tune's dtype).
//! - [`Restorer`]: every tensor of a file in order, reading the base one tensor at a time.

use crate::checkpoint::dtype::{dtype_from_name, dtype_name, Dtype, FloatType};
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::checkpoint::writer::TensorHeader;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::index::crc32;
use crate::format::{CompressedTensor, TensorKind, TensorRecord, UdeltaReader};
use crate::pipeline::lossless::restore_coded;
use crate::pipeline::prefetch::{Prefetch, ReadJob, TensorRead};
use crate::progress::Progress;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::Arc;

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
pub fn header_of(reader: &UdeltaReader, r: &TensorRecord) -> Result<TensorHeader> {
    Ok(TensorHeader {
        name: r.name.clone(),
        dtype: parse_dtype(reader, &r.name, &r.dtype)?,
        shape: r.shape.clone(),
    })
}

/// What record `r` needs from the base: the dtype, shape and CRC-32 of the base tensor, or
/// `None` for tensors stored whole in the file.
pub fn base_expectation(r: &TensorRecord) -> Option<(&str, &[usize], u32)> {
    match &r.kind {
        TensorKind::Unchanged { base_crc32 } => Some((&r.dtype, &r.shape, *base_crc32)),
        TensorKind::Compressed(c) => Some((&c.base_dtype, &c.base_shape, c.base_crc32)),
        TensorKind::Coded(c) => c
            .base
            .as_ref()
            .map(|b| (r.dtype.as_str(), b.shape.as_slice(), b.crc32)),
        TensorKind::Raw { .. } => None,
    }
}

/// The message for a base tensor of dtype `have`/`have_shape` where `file` expects another.
pub fn wrong_kind_message(
    file: &Path,
    have: &str,
    have_shape: &[usize],
    want: &str,
    want_shape: &[usize],
) -> String {
    format!(
        "base has {have} {have_shape:?}, {} expects {want} {want_shape:?}: wrong base",
        file.display()
    )
}

/// The message for a base tensor whose bytes are not those `file` was made against.
pub fn wrong_bytes_message(file: &Path) -> String {
    format!(
        "differs from the base {} was made against (checksum mismatch): wrong base? (--force to apply anyway)",
        file.display()
    )
}

/// The base checkpoint, checked tensor by tensor against what a `.udelta` file expects.
pub struct BaseSource<'a> {
    /// The base checkpoint.
    pub base: &'a Arc<Checkpoint>,
    /// The file restored against it.
    pub reader: &'a UdeltaReader,
    /// Accept bytes whose CRC-32 differs.
    pub force: bool,
}

impl BaseSource<'_> {
    /// The base tensor `name`, checked to have the dtype and shape the file expects.
    pub fn entry(&self, name: &str, dtype: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let (base, file) = (self.base, self.reader.path());
        let b = base.get(name).ok_or_else(|| {
            Error::tensor(
                &base.path,
                name,
                format!(
                    "missing from the base, but {} was made against a base that has it",
                    file.display()
                ),
            )
        })?;
        let have = dtype_name(b.dtype);
        if have != dtype || b.shape != shape {
            return Err(Error::tensor(
                base.shard_path(b),
                name,
                wrong_kind_message(file, &have, &b.shape, dtype, shape),
            ));
        }
        Ok(b)
    }

    /// Checks the bytes read for base tensor `b` against the CRC-32 the file recorded.
    /// Returns whether they match (they can differ only with `force`).
    pub fn check(&self, b: &TensorEntry, bytes: &[u8], want_crc: u32) -> Result<bool> {
        let matches = crc32(bytes) == want_crc;
        if !self.force && !matches {
            return Err(Error::tensor(
                self.base.shard_path(b),
                &b.name,
                wrong_bytes_message(self.reader.path()),
            ));
        }
        Ok(matches)
    }

    /// What record `r` needs from the base: its tensor entry and expected CRC-32, or `None`
    /// for tensors stored whole in the file. Checks dtype and shape.
    pub fn needs(&self, r: &TensorRecord) -> Result<Option<(&TensorEntry, u32)>> {
        base_expectation(r)
            .map(|(dtype, shape, crc)| Ok((self.entry(&r.name, dtype, shape)?, crc)))
            .transpose()
    }

    /// Starts reading, in order, the base tensors `records` need, after checking every one
    /// of them (so a base that lacks a tensor is refused before anything is written).
    pub fn prefetch<'r>(
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

/// The kept positions of a compressed tensor (into the base tensor, flattened, increasing)
/// and the f32 value that restoring adds to the base at each.
pub fn kept_deltas(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (positions, levels) = decode_kept(reader, r, c)?;
    let deltas = c.grid().scaled_values(reader.index.model.scale);
    let values = levels.iter().map(|&l| deltas[l as usize]).collect();
    Ok((positions, values))
}

/// The delta of a compressed tensor as restoring adds it, dense over the elements shared
/// with the base (zero where nothing was kept).
pub fn dense_delta(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
) -> Result<Vec<f32>> {
    let (positions, values) = kept_deltas(reader, r, c)?;
    let mut dense = vec![0f32; c.shared_numel as usize];
    for (&p, &v) in positions.iter().zip(&values) {
        dense[p as usize] = v;
    }
    Ok(dense)
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
    let (positions, values) = kept_deltas(reader, r, c)?;
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
    for (&p, &delta) in positions.iter().zip(&values) {
        let base = match &base_values {
            None => out_type.load(&out, p as usize),
            Some(vals) => vals[p as usize],
        };
        out_type.store(&mut out, p as usize, base + delta);
    }
    if let Some(tail) = &c.tail {
        out.extend_from_slice(
            &reader.read_record(tail, &format!("tensor '{}': new rows", r.name))?,
        );
    }
    Ok(out)
}

/// The fine-tuned bytes of record `r` (header `h`) from the base bytes it needs (if any, of
/// float type `base_type` for compressed tensors), without checking them against the file.
/// A losslessly coded tensor is still checked against the CRC-32 of its restored bytes.
pub fn restore_unchecked(
    reader: &UdeltaReader,
    r: &TensorRecord,
    h: &TensorHeader,
    base_type: Option<FloatType>,
    base_bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    restore_with(reader, r, h, base_type, base_bytes, true)
}

/// [`restore_unchecked`], checking a coded tensor's restored CRC-32 only if `verify_coded`
/// (a base forced over a checksum mismatch restores other bytes than the fine-tune's).
fn restore_with(
    reader: &UdeltaReader,
    r: &TensorRecord,
    h: &TensorHeader,
    base_type: Option<FloatType>,
    base_bytes: Option<Vec<u8>>,
    verify_coded: bool,
) -> Result<Vec<u8>> {
    let not_read = || Error::Param("internal: base not read".into());
    let out = match &r.kind {
        TensorKind::Unchanged { .. } => base_bytes.ok_or_else(not_read)?,
        TensorKind::Raw { data } => reader.read_record(data, &format!("tensor '{}'", r.name))?,
        TensorKind::Coded(c) => restore_coded(
            reader,
            r,
            c,
            h.dtype,
            h.byte_len(),
            base_bytes,
            verify_coded,
        )?,
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
            let base_type = base_type.ok_or_else(bad_type)?;
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

/// The fine-tuned bytes of record `r` (header `h`), given the base bytes it needs (if any),
/// checked against the CRC-32 the file recorded.
pub fn restore(
    reader: &UdeltaReader,
    base: &BaseSource,
    r: &TensorRecord,
    h: &TensorHeader,
    base_bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    let needs = base.needs(r)?;
    let mut base_matches = true;
    if let (Some((b, crc)), Some(bytes)) = (needs, &base_bytes) {
        base_matches = base.check(b, bytes, crc)?;
    }
    let base_type = needs.and_then(|(b, _)| b.float_type());
    restore_with(reader, r, h, base_type, base_bytes, base_matches)
}

/// Every tensor of a `.udelta` file restored against a base checkpoint, in the file's
/// order, reading one base tensor at a time (memory: about one tensor).
pub struct Restorer {
    reader: UdeltaReader,
    base: Arc<Checkpoint>,
    force: bool,
    next: usize,
    progress: Progress,
}

impl Restorer {
    /// Opens `input` and `base_path` and checks that the base has every tensor the file
    /// needs, with the dtype and shape it expects (the bytes are checked as they are read).
    /// With `progress`, a progress bar counts the restored bytes.
    pub fn open(input: &Path, base_path: &Path, force: bool, progress: bool) -> Result<Restorer> {
        let reader = UdeltaReader::open(input)?;
        let base = Arc::new(Checkpoint::open(base_path)?);
        let headers = reader
            .index
            .tensors
            .iter()
            .map(|t| header_of(&reader, t))
            .collect::<Result<Vec<_>>>()?;
        let total = headers.iter().map(TensorHeader::byte_len).sum();
        let r = Restorer {
            reader,
            base,
            force,
            next: 0,
            progress: Progress::new("restore", total, progress),
        };
        for t in &r.reader.index.tensors {
            r.source().needs(t)?;
        }
        Ok(r)
    }

    /// The file being restored.
    pub fn reader(&self) -> &UdeltaReader {
        &self.reader
    }

    fn source(&self) -> BaseSource<'_> {
        BaseSource {
            base: &self.base,
            reader: &self.reader,
            force: self.force,
        }
    }

    /// The next tensor's header and fine-tuned bytes, or `None` after the last.
    pub fn next_tensor(&mut self) -> Option<Result<(TensorHeader, Vec<u8>)>> {
        let Some(r) = self.reader.index.tensors.get(self.next) else {
            self.progress.finish();
            return None;
        };
        self.next += 1;
        let out = self.restore_record(r);
        if let Ok((_, bytes)) = &out {
            self.progress.inc(bytes.len() as u64);
        }
        Some(out)
    }

    fn restore_record(&self, r: &TensorRecord) -> Result<(TensorHeader, Vec<u8>)> {
        let source = self.source();
        let h = header_of(&self.reader, r)?;
        let base_bytes = match source.needs(r)? {
            Some((b, _)) => {
                let mut buf = Vec::new();
                self.base.read_tensor(b, &mut buf)?;
                Some(buf)
            }
            None => None,
        };
        let out = restore(&self.reader, &source, r, &h, base_bytes)?;
        Ok((h, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::FloatType;
    use crate::checkpoint::select::TensorSelector;
    use crate::pipeline::compress::{compress, CompressOptions};
    use crate::pipeline::decompress::{decompress, DecompressOptions};
    use crate::synth::{write_synthetic, Preset, SynthOptions};

    /// A tiny bf16 base with a fine-tune that grew its vocabulary, compressed.
    fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
        let mut synth = SynthOptions::new(Preset::Tiny);
        synth.dtype = FloatType::BF16;
        synth.vocab_growth = 3;
        let made = write_synthetic(dir, &synth, &|_, _| {}).unwrap();
        let file = dir.join("ft.udelta");
        let opts = CompressOptions {
            params: crate::algorithm::CompressParams::default(),
            selector: TensorSelector::default(),
            model_name: None,
            force: false,
            verify: false,
            progress: false,
            trace_norm: false,
            gamma: None,
            side_files: Default::default(),
            target: None,
        };
        let engine = &mut crate::engine::cpu::CpuEngine;
        compress(&made.base, &made.finetuned, &file, &opts, engine).unwrap();
        (made.base, file)
    }

    #[test]
    fn the_restorer_yields_what_decompress_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (base, file) = fixture(dir.path());
        let out = dir.path().join("restored");
        decompress(&file, &base, &out, &DecompressOptions::default()).unwrap();
        let written = Checkpoint::open(&out).unwrap();
        let mut restorer = Restorer::open(&file, &base, false, false).unwrap();
        let mut seen = 0;
        while let Some(next) = restorer.next_tensor() {
            let (h, bytes) = next.unwrap();
            let t = written.get(&h.name).unwrap();
            let mut want = Vec::new();
            written.read_tensor(t, &mut want).unwrap();
            assert_eq!((t.dtype, &t.shape), (h.dtype, &h.shape), "{}", h.name);
            assert!(bytes == want, "{}: bytes differ", h.name);
            seen += 1;
        }
        assert_eq!(seen, written.tensors.len());
    }

    #[test]
    fn kept_deltas_rebuild_the_dense_delta() {
        let dir = tempfile::tempdir().unwrap();
        let (_, file) = fixture(dir.path());
        let reader = UdeltaReader::open(&file).unwrap();
        let mut compressed = 0;
        for r in &reader.index.tensors {
            let TensorKind::Compressed(c) = &r.kind else {
                continue;
            };
            let (positions, values) = kept_deltas(&reader, r, c).unwrap();
            assert_eq!(positions.len() as u64, c.kept());
            assert!(positions.windows(2).all(|w| w[0] < w[1]));
            let dense = dense_delta(&reader, r, c).unwrap();
            let mut rebuilt = vec![0f32; c.shared_numel as usize];
            for (&p, &v) in positions.iter().zip(&values) {
                rebuilt[p as usize] = v;
            }
            assert!(rebuilt == dense, "{}", r.name);
            compressed += 1;
        }
        assert!(compressed > 0);
    }

    #[test]
    fn a_changed_base_tensor_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, file) = fixture(dir.path());
        // The fine-tune as base: every compressed tensor differs from the recorded base.
        let wrong = dir.path().join("ft-1");
        let err = match Restorer::open(&file, &wrong, false, false) {
            Err(e) => e,
            Ok(mut restorer) => std::iter::from_fn(|| restorer.next_tensor())
                .find_map(|r| r.err())
                .expect("a wrong base must be refused"),
        };
        assert!(err.to_string().contains("wrong base"), "{err}");
    }
}
