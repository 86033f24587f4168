//! Restoring the tensors of a `.udelta` file against a base, one tensor at a time: what
//! `decompress` writes and what the Python package hands to PyTorch or NumPy, from one code.
//!
//! - [`BaseSource`]: the base checkpoint, checked tensor by tensor (dtype, shape, CRC-32)
//!   against what the file recorded, so a wrong base is refused naming the tensor.
//! - [`kept_deltas`]: the kept positions of a compressed tensor and the f32 value that
//!   restoring adds at each; [`dense_delta`]: the same as a dense f32 tensor.
//! - [`restore`] / [`restore_unchecked`]: the fine-tuned bytes of one tensor from its record
//!   and the base's bytes (f32 add, rounded to the fine-tune's dtype).
//! - [`apply_kept_in_place`] / [`undo_kept_in_place`]: the same add on base values already in
//!   memory (the Python package's `apply_` and `swap_`), keeping the overwritten values; both,
//!   and `decompress`, scatter block by block in parallel ([`in_place`]).
//! - [`Restorer`]: every tensor of a file in order, reading the base one tensor at a time.

use crate::checkpoint::dtype::{dtype_from_name, dtype_name, Dtype, FloatType};
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::checkpoint::views;
use crate::checkpoint::writer::TensorHeader;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::index::crc32;
use crate::format::matrix_views::{self, Whole};
use crate::format::{CompressedTensor, TensorKind, TensorRecord, UdeltaReader};
use crate::pipeline::lossless::restore_coded;
use crate::pipeline::prefetch::{Prefetch, ReadJob, TensorRead};
use crate::progress::Progress;
use in_place::{KeptStreams, ScatterError};
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::Arc;

pub mod in_place;

/// Parses a dtype name as written in the index.
fn parse_dtype(reader: &UdeltaReader, tensor: &str, name: &str) -> Result<Dtype> {
    dtype_from_name(name).ok_or_else(|| {
        Error::format(
            reader.path(),
            format!("tensor '{tensor}': unknown dtype '{name}'"),
        )
    })
}

/// The header of a record's tensor as the fine-tune had it (for a matrix view: the matrix).
pub fn header_of(reader: &UdeltaReader, r: &TensorRecord) -> Result<TensorHeader> {
    Ok(TensorHeader {
        name: r.name.clone(),
        dtype: parse_dtype(reader, &r.name, &r.dtype)?,
        shape: r.shape.clone(),
    })
}

/// The header of a whole tensor as the fine-tune had it (a 3-D tensor for matrix views).
pub fn whole_header(reader: &UdeltaReader, w: &Whole) -> Result<TensorHeader> {
    Ok(TensorHeader {
        name: w.name.to_string(),
        dtype: parse_dtype(reader, w.name, w.dtype)?,
        shape: w.shape.to_vec(),
    })
}

/// Opens the base checkpoint `path` for the file of `reader`, with the 3-D tensors the file
/// stores as matrices split into the same matrix views ([`crate::checkpoint::views`]).
pub fn open_base(path: &Path, reader: &UdeltaReader) -> Result<Checkpoint> {
    let stacks = matrix_views::stacks(&reader.index);
    views::split(Checkpoint::open(path)?, &stacks, |have, want| {
        wrong_kind_message(reader.path(), "a tensor of shape", have, "shape", want)
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
    let mut out = if base_type == out_type {
        let mut out = base_bytes;
        add_kept(reader, r, c, &mut out, out_type)?;
        out
    } else {
        convert_and_add_kept(reader, r, c, &base_bytes, base_type, out_type)?
    };
    if let Some(tail) = &c.tail {
        out.extend_from_slice(
            &reader.read_record(tail, &format!("tensor '{}': new rows", r.name))?,
        );
    }
    Ok(out)
}

/// The fine-tuned bytes (of `out_type`) of a compressed tensor whose base has another float
/// type: each kept entry is the exact base value plus its delta, rounded once.
fn convert_and_add_kept(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    base_bytes: &[u8],
    base_type: FloatType,
    out_type: FloatType,
) -> Result<Vec<u8>> {
    let (positions, values) = kept_deltas(reader, r, c)?;
    let mut base_values = Vec::new();
    base_type.decode_into(base_bytes, &mut base_values);
    let mut out = Vec::new();
    out_type.encode_into(&base_values, &mut out);
    for (&p, &delta) in positions.iter().zip(&values) {
        let base = base_values[p as usize];
        let restored = base + delta;
        if !out_type.holds(restored) {
            return Err(overflow_error(reader, r, p, base, delta));
        }
        out_type.store(&mut out, p as usize, restored);
    }
    Ok(out)
}

/// A compressed tensor's streams read from the file (checksums checked): positions, and
/// levels if `with_levels`.
fn read_streams(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    with_levels: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let what = |s: &str| format!("tensor '{}': {s}", r.name);
    let positions = reader.read_record(&c.positions, &what("position stream"))?;
    let levels = match with_levels {
        true => Some(reader.read_record(&c.levels, &what("level stream"))?),
        false => None,
    };
    Ok((positions, levels))
}

/// A block-wise scatter's error as an error of the file, naming the tensor.
fn scatter_error(reader: &UdeltaReader, r: &TensorRecord, e: ScatterError) -> Error {
    let what = |s: &str| format!("tensor '{}': {s}", r.name);
    match e {
        ScatterError::Codec(e) => Error::format(reader.path(), what(&format!("undecodable: {e}"))),
        ScatterError::Overflow {
            position,
            base,
            delta,
        } => overflow_error(reader, r, position, base, delta),
        ScatterError::Size(msg) => Error::format(reader.path(), what(&msg)),
    }
}

/// The checked block layout of a compressed tensor's streams `(positions, levels)`.
fn kept_streams<'a>(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    (positions, levels): &'a (Vec<u8>, Option<Vec<u8>>),
) -> Result<KeptStreams<'a>> {
    KeptStreams::new(
        c.shared_numel,
        &c.kept_counts,
        &c.blocks,
        positions,
        levels.as_deref(),
    )
    .map_err(|e| scatter_error(reader, r, e.into()))
}

/// Runs `f` on a compressed tensor's streams read from the file (the level stream only
/// `with_levels`), turning its errors into the file's errors naming the tensor.
fn with_streams<T>(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    with_levels: bool,
    f: impl FnOnce(&KeptStreams) -> std::result::Result<T, ScatterError>,
) -> Result<T> {
    let streams = read_streams(reader, r, c, with_levels)?;
    f(&kept_streams(reader, r, c, &streams)?).map_err(|e| scatter_error(reader, r, e))
}

/// Adds a compressed tensor's kept deltas to the base values `bytes` (of type `ty`, at least
/// the elements shared with the base) in place, as restoring does (f32 add, rounded to `ty`),
/// block by block. A value `ty` cannot hold is an error.
fn add_kept(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    bytes: &mut [u8],
    ty: FloatType,
) -> Result<()> {
    let deltas = c.grid().scaled_values(reader.index.model.scale);
    with_streams(reader, r, c, true, |s| s.apply(&deltas, bytes, ty, None))
}

/// The length of the record of base values that [`apply_kept_in_place`] (or
/// [`swap_kept_in_place`] to `c`) overwrites in a tensor of type `ty`: one value per kept
/// entry. Refuses a histogram with more kept entries than elements.
pub fn overwritten_len(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    ty: FloatType,
) -> Result<usize> {
    let kept = c
        .kept_counts
        .iter()
        .try_fold(0u64, |a, &k| a.checked_add(k));
    match kept.filter(|&k| k <= c.shared_numel) {
        Some(k) => Ok(k as usize * ty.size()),
        None => Err(Error::format(
            reader.path(),
            format!("tensor '{}': more kept entries than elements", r.name),
        )),
    }
}

/// Applies a compressed tensor in place to its base values `bytes` (of type `ty`): the kept
/// entries become `ty(f32(base) + delta)`, exactly as restoring computes them. The base values
/// it overwrites go to `old` (of [`overwritten_len`], in kept order), which
/// [`undo_kept_in_place`] puts back. On error `bytes` is as it was.
pub fn apply_kept_in_place(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    bytes: &mut [u8],
    ty: FloatType,
    old: &mut [u8],
) -> Result<()> {
    let deltas = c.grid().scaled_values(reader.index.model.scale);
    with_streams(reader, r, c, true, |s| {
        s.apply(&deltas, bytes, ty, Some(old))
    })
}

/// Puts back at a compressed tensor's kept positions the base values `old` that
/// [`apply_kept_in_place`] returned for the same tensor and type (decoding the positions
/// only).
pub fn undo_kept_in_place(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    bytes: &mut [u8],
    ty: FloatType,
    old: &[u8],
) -> Result<()> {
    with_streams(reader, r, c, false, |s| s.undo(bytes, old, ty))
}

/// One fine-tune's compressed tensor: its file, record and payload.
pub type Compressed<'a> = (&'a UdeltaReader, &'a TensorRecord, &'a CompressedTensor);

/// Switches the base tensor `bytes` (of type `ty`) in place from the fine-tune `from` (applied
/// with [`apply_kept_in_place`], which returned `from_old`) to `to`, made against the same
/// base: the result equals [`undo_kept_in_place`] of `from` then [`apply_kept_in_place`] of
/// `to`, in one pass over the tensor. The base values `to` overwrites go to `old` (of
/// [`overwritten_len`] for `to`). On error the tensor holds `from`'s fine-tune again.
pub fn swap_kept_in_place(
    from: Compressed<'_>,
    from_old: &[u8],
    to: Compressed<'_>,
    bytes: &mut [u8],
    ty: FloatType,
    old: &mut [u8],
) -> Result<()> {
    let (from_reader, from_r, from_c) = from;
    let (to_reader, to_r, to_c) = to;
    let from_streams = read_streams(from_reader, from_r, from_c, true)?;
    let from_streams = kept_streams(from_reader, from_r, from_c, &from_streams)?;
    let to_streams = read_streams(to_reader, to_r, to_c, true)?;
    let to_streams = kept_streams(to_reader, to_r, to_c, &to_streams)?;
    let from_deltas = from_c.grid().scaled_values(from_reader.index.model.scale);
    let applied = in_place::Applied {
        streams: &from_streams,
        deltas: &from_deltas,
        old: from_old,
    };
    let deltas = to_c.grid().scaled_values(to_reader.index.model.scale);
    to_streams
        .swap(&applied, &deltas, bytes, ty, old)
        .map_err(|(side, e)| match side {
            in_place::Side::From => scatter_error(from_reader, from_r, e),
            in_place::Side::To => scatter_error(to_reader, to_r, e),
        })
}

/// The refusal of a restored value (`base + delta` at element `p`) that its dtype cannot hold.
fn overflow_error(reader: &UdeltaReader, r: &TensorRecord, p: u32, base: f32, delta: f32) -> Error {
    Error::format(
        reader.path(),
        format!(
            "tensor '{}': element {p} restores to {base} + {delta}, beyond the range of {}: \
             the file cannot be restored against this base without overflow",
            r.name, r.dtype
        ),
    )
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
    /// The number of records of each whole tensor, in order.
    wholes: Vec<usize>,
    next_whole: usize,
    next_record: usize,
    progress: Progress,
}

impl Restorer {
    /// Opens `input` and `base_path` and checks that the base has every tensor the file
    /// needs, with the dtype and shape it expects (the bytes are checked as they are read).
    /// With `progress`, a progress bar counts the restored bytes.
    pub fn open(input: &Path, base_path: &Path, force: bool, progress: bool) -> Result<Restorer> {
        let reader = UdeltaReader::open(input)?;
        let base = Arc::new(open_base(base_path, &reader)?);
        let wholes = matrix_views::wholes(&reader.index.tensors);
        let mut total = 0;
        for w in &wholes {
            total += whole_header(&reader, w)?.byte_len();
        }
        let wholes = wholes.iter().map(|w| w.records.len()).collect();
        let r = Restorer {
            reader,
            base,
            force,
            wholes,
            next_whole: 0,
            next_record: 0,
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

    /// The next tensor's header and fine-tuned bytes, or `None` after the last. The matrices
    /// of a 3-D tensor stored as matrix views come back as that one tensor.
    pub fn next_tensor(&mut self) -> Option<Result<(TensorHeader, Vec<u8>)>> {
        let Some(&count) = self.wholes.get(self.next_whole) else {
            self.progress.finish();
            return None;
        };
        let first = self.next_record;
        self.next_whole += 1;
        self.next_record += count;
        let records = &self.reader.index.tensors[first..first + count];
        let out = self.restore_whole(records);
        if let Ok((_, bytes)) = &out {
            self.progress.inc(bytes.len() as u64);
        }
        Some(out)
    }

    /// The header and bytes of the whole tensor stored as `records`.
    fn restore_whole(&self, records: &[TensorRecord]) -> Result<(TensorHeader, Vec<u8>)> {
        let whole = matrix_views::wholes(records).remove(0);
        let header = whole_header(&self.reader, &whole)?;
        if let [r] = records {
            return Ok((header, self.restore_record(r)?.1));
        }
        let mut bytes = Vec::with_capacity(header.byte_len() as usize);
        for r in records {
            bytes.extend_from_slice(&self.restore_record(r)?.1);
        }
        Ok((header, bytes))
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
        let opts = CompressOptions::default();
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

    #[test]
    fn in_place_apply_adds_the_kept_deltas_and_undo_puts_the_base_back() {
        let dir = tempfile::tempdir().unwrap();
        let (base_path, file) = fixture(dir.path());
        let reader = UdeltaReader::open(&file).unwrap();
        let base = Checkpoint::open(&base_path).unwrap();
        let mut applied = 0;
        for r in &reader.index.tensors {
            let TensorKind::Compressed(c) = &r.kind else {
                continue;
            };
            let entry = base.get(&r.name).unwrap();
            let ty = entry.float_type().unwrap();
            let mut original = Vec::new();
            base.read_tensor(entry, &mut original).unwrap();
            // Expected: each kept entry rounded from f32(base) + its delta, by hand.
            let (positions, values) = kept_deltas(&reader, r, c).unwrap();
            let mut want = original.clone();
            for (&p, &v) in positions.iter().zip(&values) {
                let p = p as usize;
                ty.store(&mut want, p, ty.load(&original, p) + v);
            }
            let mut bytes = original.clone();
            let mut old = vec![0u8; overwritten_len(&reader, r, c, ty).unwrap()];
            apply_kept_in_place(&reader, r, c, &mut bytes, ty, &mut old).unwrap();
            assert!(bytes == want, "{}: applied bytes differ", r.name);
            assert_eq!(old.len(), positions.len() * ty.size());
            undo_kept_in_place(&reader, r, c, &mut bytes, ty, &old).unwrap();
            assert!(bytes == original, "{}: undo differs from the base", r.name);
            let short = &mut original[..ty.size()];
            let err = apply_kept_in_place(&reader, r, c, short, ty, &mut old).unwrap_err();
            assert!(err.to_string().contains(&r.name), "{err}");
            let err = undo_kept_in_place(&reader, r, c, &mut bytes, ty, &old[1..]).unwrap_err();
            assert!(err.to_string().contains("old values"), "{err}");
            applied += 1;
        }
        assert!(applied > 0);
    }

    #[test]
    fn an_in_place_apply_that_overflows_leaves_the_tensor_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (base_path, file) = fixture(dir.path());
        let mut reader = UdeltaReader::open(&file).unwrap();
        // Deltas of 1e36..1e38: every kept entry fits bf16 (up to about 3.4e38) but the last,
        // whose base value is made the largest finite one of the delta's sign.
        reader.index.model.scale = 1e40;
        let base = Checkpoint::open(&base_path).unwrap();
        let (r, c) = reader
            .index
            .tensors
            .iter()
            .find_map(|r| match &r.kind {
                TensorKind::Compressed(c) if c.kept() > 100 => Some((r, c)),
                _ => None,
            })
            .unwrap();
        let entry = base.get(&r.name).unwrap();
        let ty = entry.float_type().unwrap();
        let mut original = Vec::new();
        base.read_tensor(entry, &mut original).unwrap();
        let (positions, values) = kept_deltas(&reader, r, c).unwrap();
        let (&last, &delta) = positions.iter().zip(&values).next_back().unwrap();
        ty.store(
            &mut original,
            last as usize,
            ty.max_finite().copysign(delta),
        );
        let mut bytes = original.clone();
        let mut old = vec![0u8; overwritten_len(&reader, r, c, ty).unwrap()];
        let Err(err) = apply_kept_in_place(&reader, r, c, &mut bytes, ty, &mut old) else {
            panic!("{}: an overflowing apply succeeded", r.name);
        };
        assert!(
            err.to_string().contains(&format!("element {last} ")),
            "{err}"
        );
        assert!(
            bytes == original,
            "{}: a failed apply changed the tensor",
            r.name
        );
    }
}
