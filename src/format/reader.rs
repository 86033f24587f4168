//! Reads and validates a `.udelta` file. Every size and offset is checked against the file
//! before anything is allocated; every record's CRC-32 is checked when it is read.

use super::index::{crc32, CodedTensor, CompressedTensor, FileIndex, RecordRef, TensorKind};
use super::{
    END_MAGIC, FOOTER_LEN, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_INDEX_LEN,
    OLDEST_READABLE_VERSION,
};
use crate::bytesource::ByteSource;
use crate::checkpoint::dtype::{checked_byte_len, dtype_from_name, Dtype, FloatType};
use crate::checkpoint::reader::shape_extends_rows;
use crate::codec;
use crate::codec::lossless::{lossless_block_count, word_width};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// An open, validated `.udelta` file.
#[derive(Debug)]
pub struct UdeltaReader {
    path: PathBuf,
    file: Box<dyn ByteSource>,
    /// File size in bytes.
    pub file_len: u64,
    /// Offset of the index (the end of the records).
    pub index_offset: u64,
    /// Stored (deflated) length of the index.
    pub index_len: u64,
    /// Length of the index JSON.
    pub json_len: u64,
    /// The parsed index.
    pub index: FileIndex,
}

impl UdeltaReader {
    /// Opens `path`, checks magic, version, footer, index checksum, and that every record lies
    /// inside the record area.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::special_files::open_regular(path)?;
        Self::from_source(path, Box::new(file))
    }

    /// Opens a `.udelta` file held in memory; `path` only names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_source(path, Box::new(bytes))
    }

    /// Opens the `.udelta` file in `file` (named `path` in errors) with the checks of
    /// [`UdeltaReader::open`].
    pub fn from_source(path: &Path, file: Box<dyn ByteSource>) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let file_len = file.size().map_err(|e| Error::io(path, e))?;
        if file_len < HEADER_LEN + FOOTER_LEN {
            return Err(bad(format!(
                "not a .udelta file: only {file_len} bytes (truncated?)"
            )));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io(path, e))?;
        if header[..8] != MAGIC {
            return Err(bad("not a .udelta file (bad magic)".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(bad(format!(
                "format version {version}, this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION} (upgrade udelta-gpu?)"
            )));
        }
        let flags = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        if flags != 0 {
            return Err(bad(format!(
                "unknown header flags {flags:#x} (corrupted, or written by a newer version)"
            )));
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, file_len - FOOTER_LEN)
            .map_err(|e| Error::io(path, e))?;
        if footer[32..40] != END_MAGIC {
            return Err(bad(
                "footer missing: the file is truncated or corrupted".into()
            ));
        }
        let word = |i: usize| u64::from_le_bytes(footer[i..i + 8].try_into().expect("8 bytes"));
        let (index_offset, index_len, json_len) = (word(0), word(8), word(16));
        let index_crc = u32::from_le_bytes(footer[24..28].try_into().expect("4 bytes"));
        if u32::from_le_bytes(footer[28..32].try_into().expect("4 bytes")) != version {
            return Err(bad(
                "footer version differs from header version (corrupted)".into(),
            ));
        }
        let records_end = file_len - FOOTER_LEN;
        if index_len > MAX_INDEX_LEN
            || json_len > MAX_INDEX_LEN
            || index_offset < HEADER_LEN
            || index_offset.checked_add(index_len) != Some(records_end)
        {
            return Err(bad(format!(
                "index location {index_offset}+{index_len} is inconsistent with the file size {file_len} (corrupted or truncated)"
            )));
        }
        let packed = file
            .read_vec_at(index_offset, index_len)
            .map_err(|e| Error::io(path, e))?;
        if crc32(&packed) != index_crc {
            return Err(bad("index checksum mismatch (corrupted)".into()));
        }
        let json = miniz_oxide::inflate::decompress_to_vec_with_limit(&packed, json_len as usize)
            .ok()
            .filter(|j| j.len() as u64 == json_len)
            .ok_or_else(|| bad("index does not inflate to its stated length (corrupted)".into()))?;
        let index: FileIndex =
            serde_json::from_slice(&json).map_err(|e| bad(format!("index unreadable: {e}")))?;
        if index.format_version != version {
            return Err(bad(format!(
                "index says format version {}, the header {version}",
                index.format_version
            )));
        }
        let reader = UdeltaReader {
            path: path.to_path_buf(),
            file,
            file_len,
            index_offset,
            index_len,
            json_len,
            index,
        };
        reader.check_records(index_offset)?;
        super::validate::check_index(&reader.index).map_err(bad)?;
        Ok(reader)
    }

    /// Checks every record reference lies in `[HEADER_LEN, records_end)`, and each tensor's
    /// metadata is self-consistent enough to decode without unbounded allocation.
    fn check_records(&self, records_end: u64) -> Result<()> {
        let in_range = |r: &RecordRef| {
            r.offset >= HEADER_LEN
                && r.offset
                    .checked_add(r.len)
                    .is_some_and(|e| e <= records_end)
        };
        super::side_files::check(&self.index, in_range)
            .map_err(|why| Error::format(&self.path, why))?;
        super::matrix_views::check(&self.index).map_err(|why| Error::format(&self.path, why))?;
        let mut total_bytes = 0u64;
        for t in &self.index.tensors {
            let fail = |what: &str| {
                Err(Error::format(
                    &self.path,
                    format!("tensor '{}': {what}", t.name),
                ))
            };
            if t.shard >= self.index.source.shards.len() {
                return fail("shard index out of range");
            }
            let Some(dtype) = dtype_from_name(&t.dtype) else {
                return fail("unknown dtype");
            };
            let Some(numel) = numel_of(&t.shape) else {
                return fail("shape overflows");
            };
            let Some((bytes, total)) =
                checked_byte_len(dtype, numel).and_then(|b| Some((b, total_bytes.checked_add(b)?)))
            else {
                return fail("shape too large: its bytes overflow a 64-bit size");
            };
            total_bytes = total;
            match &t.kind {
                TensorKind::Unchanged { .. } => {}
                TensorKind::Raw { data } => {
                    if !in_range(data) {
                        return fail("raw record outside the file");
                    }
                    if data.len != bytes {
                        return fail("raw record length differs from the shape's byte size");
                    }
                }
                TensorKind::Coded(c) => {
                    if self.index.format_version < 2 {
                        return fail("coded tensor in a version 1 file");
                    }
                    if !in_range(&c.data) {
                        return fail("coded record outside the file");
                    }
                    if let Err(what) = check_coded(c, dtype, &t.shape, numel) {
                        return fail(what);
                    }
                }
                TensorKind::Compressed(c) => {
                    let refs = [Some(&c.positions), Some(&c.levels), c.tail.as_ref()];
                    if refs.iter().flatten().any(|r| !in_range(r)) {
                        return fail("record outside the file");
                    }
                    if let Err(what) = check_compressed(c, dtype, &t.shape) {
                        return fail(what);
                    }
                }
            }
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one record and verifies its checksum; `what` names it in errors.
    pub fn read_record(&self, r: &RecordRef, what: &str) -> Result<Vec<u8>> {
        let buf = self
            .file
            .read_vec_at(r.offset, r.len)
            .map_err(|e| Error::io(&self.path, e))?;
        if crc32(&buf) != r.crc32 {
            return Err(Error::format(
                &self.path,
                format!("{what}: checksum mismatch (corrupted)"),
            ));
        }
        Ok(buf)
    }
}

impl UdeltaReader {
    /// Reads record `r` in consecutive pieces of the lengths `parts` yields (which must add up
    /// to the record's length), handing each to `f`; the CRC-32 of the whole record is checked
    /// after the last piece, so the caller must not keep what `f` made unless this succeeds.
    pub fn read_record_in_parts(
        &self,
        r: &RecordRef,
        parts: impl IntoIterator<Item = u64>,
        what: &str,
        mut f: impl FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut hasher = crc32fast::Hasher::new();
        let mut offset = 0u64;
        for len in parts {
            if offset.checked_add(len).is_none_or(|end| end > r.len) {
                return Err(Error::format(
                    &self.path,
                    format!("{what}: parts exceed the record"),
                ));
            }
            let buf = self
                .file
                .read_vec_at(r.offset + offset, len)
                .map_err(|e| Error::io(&self.path, e))?;
            hasher.update(&buf);
            offset += len;
            f(buf)?;
        }
        if offset != r.len || hasher.finalize() != r.crc32 {
            return Err(Error::format(
                &self.path,
                format!("{what}: checksum mismatch (corrupted)"),
            ));
        }
        Ok(())
    }
}

/// Checks a compressed tensor's fields against each other and against the fine-tune's dtype
/// and shape (whose byte size the caller has checked to fit in u64): float dtypes, a base
/// shape that the shape equals or extends by rows, every base element shared, new rows'
/// bytes in the tail, level tables of the bit width, counts that add up, rates in [0, 1].
fn check_compressed(
    c: &CompressedTensor,
    dtype: Dtype,
    shape: &[usize],
) -> std::result::Result<(), &'static str> {
    let Some(base_dtype) = dtype_from_name(&c.base_dtype) else {
        return Err("unknown base dtype");
    };
    let (Some(out), Some(_)) = (
        FloatType::from_dtype(dtype),
        FloatType::from_dtype(base_dtype),
    ) else {
        return Err("compressed tensor of a non-float dtype");
    };
    let numel = numel_of(shape).ok_or("shape overflows")?;
    let base_numel = numel_of(&c.base_shape)
        .filter(|&n| checked_byte_len(base_dtype, n).is_some())
        .ok_or("base shape too large: its bytes overflow a 64-bit size")?;
    if c.shared_numel != base_numel
        || c.shared_numel > codec::MAX_NUMEL
        || sum_of(&c.histogram) != Some(c.shared_numel)
    {
        return Err("element counts inconsistent with the shapes");
    }
    if !(shape == c.base_shape.as_slice() || shape_extends_rows(shape, &c.base_shape)) {
        return Err("base shape neither equal to the shape nor the same with fewer rows");
    }
    // The shape extends the base's: `numel >= base_numel`.
    let new_bytes = (numel - base_numel) * out.size() as u64;
    if c.tail.map(|t| t.len) != (new_bytes > 0).then_some(new_bytes) {
        return Err("new rows' record (tail) inconsistent with the shapes");
    }
    let levels = 1usize << c.bits.min(8);
    if !(1..=8).contains(&c.bits) || c.histogram.len() != levels || c.kept_counts.len() != levels {
        return Err("level tables inconsistent with the bit width");
    }
    if c.kept_counts.iter().zip(&c.histogram).any(|(k, h)| k > h) {
        return Err("more kept entries than elements in a level");
    }
    if c.blocks.len() != codec::block_count(c.shared_numel) {
        return Err("block table length inconsistent with the element count");
    }
    let unit = 0.0..=1.0;
    if !(unit.contains(&c.rate) && unit.contains(&c.adjusted_rate) && c.std >= 0.0) {
        return Err("pruning rates outside [0, 1] or a negative standard deviation");
    }
    Ok(())
}

/// Checks a coded tensor's base shape and block table against its dtype and element count
/// (whose byte size the caller has checked to fit in u64).
fn check_coded(
    c: &CodedTensor,
    dtype: Dtype,
    shape: &[usize],
    numel: u64,
) -> std::result::Result<(), &'static str> {
    let bytes = checked_byte_len(dtype, numel).ok_or("shape too large")?;
    if let Some(b) = &c.base {
        if !(shape == b.shape.as_slice() || shape_extends_rows(shape, &b.shape)) {
            return Err("base shape neither equal to the shape nor the same with fewer rows");
        }
    }
    let width = word_width(dtype.bitsize());
    if c.blocks.len() as u64 != lossless_block_count(bytes, width) {
        return Err("block table length inconsistent with the tensor size");
    }
    if c.blocks.contains(&0) || sum_of(&c.blocks) != Some(c.data.len) {
        return Err("block lengths inconsistent with the coded record");
    }
    Ok(())
}

/// Number of elements of `shape`, `None` if it overflows `u64`.
fn numel_of(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))
}

/// Sum of `counts`, `None` if it overflows `u64`.
fn sum_of(counts: &[u64]) -> Option<u64> {
    counts.iter().try_fold(0u64, |a, &c| a.checked_add(c))
}
