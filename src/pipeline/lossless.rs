//! Lossless storage of the tensors UltraDelta does not compress: `compress` codes each one
//! against its base (or alone) with `codec::lossless`, reading both in bounded chunks;
//! `decompress` decodes it in place over the base's bytes and checks the restored CRC-32.
//!
//! Memory: compression holds at most [`CHUNK_BYTES`] of each checkpoint plus their streams;
//! decompression holds the tensor (built over the base's buffer) and at most [`CHUNK_BYTES`]
//! of the record.

use crate::checkpoint::dtype::Dtype;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::codec::lossless::{block_bytes, decode_blocks, encode_blocks, word_width};
use crate::error::{Error, Result};
use crate::format::{CodedBase, CodedTensor, TensorKind, TensorRecord, UdeltaReader, UdeltaWriter};
use crate::progress::Progress;

/// Most bytes of one checkpoint read (compress) or of one record read (decompress) at once;
/// at least one block is always taken.
pub const CHUNK_BYTES: usize = 64 << 20;

/// The base tensor a fine-tuned tensor can be coded against: same name and dtype, and the same
/// shape or the same shape with more rows (grown vocabulary: the base's bytes are a prefix).
pub fn base_for<'a>(base: &'a Checkpoint, t: &TensorEntry) -> Option<&'a TensorEntry> {
    let b = base.get(&t.name)?;
    (b.dtype == t.dtype && t.extends_rows_of(b)).then_some(b)
}

/// Blocks per chunk for words of `width` bytes.
fn chunk_blocks(width: usize) -> usize {
    (CHUNK_BYTES / block_bytes(width)).max(1)
}

/// Codes fine-tuned tensor `t` against its base (see [`base_for`]) or alone, appending the
/// record to `writer`; returns the index entry.
pub fn store_tensor(
    writer: &mut UdeltaWriter,
    base: &Checkpoint,
    ft: &Checkpoint,
    t: &TensorEntry,
    progress: &Progress,
) -> Result<TensorKind> {
    let b = base_for(base, t);
    let width = word_width(t.dtype.bitsize());
    let chunk = (chunk_blocks(width) * block_bytes(width)) as u64;
    let (mut base_hash, mut ft_hash) = (crc32fast::Hasher::new(), crc32fast::Hasher::new());
    let (mut base_buf, mut ft_buf) = (Vec::new(), Vec::new());
    let mut blocks = Vec::new();
    let mut start = 0u64;
    let data = writer.append_chunks(|out| {
        if start >= t.len {
            return Ok(false);
        }
        let n = chunk.min(t.len - start) as usize;
        ft_buf.resize(n, 0);
        ft.read_range(t, start, &mut ft_buf)?;
        ft_hash.update(&ft_buf);
        base_buf.clear();
        if let Some(b) = b.filter(|b| start < b.len) {
            base_buf.resize((b.len - start).min(n as u64) as usize, 0);
            base.read_range(b, start, &mut base_buf)?;
            base_hash.update(&base_buf);
        }
        out.clear();
        for s in encode_blocks(&base_buf, &ft_buf, width) {
            blocks.push(s.len() as u64);
            out.extend_from_slice(&s);
        }
        start += n as u64;
        progress.inc(n as u64);
        Ok(true)
    })?;
    Ok(TensorKind::Coded(Box::new(CodedTensor {
        base: b.map(|b| CodedBase {
            shape: b.shape.clone(),
            crc32: base_hash.finalize(),
        }),
        blocks,
        data,
        restored_crc32: ft_hash.finalize(),
    })))
}

/// Restores coded tensor `c` of record `r` (dtype `dtype`, `byte_len` bytes) over the base's
/// bytes (`None` for a tensor coded alone), checking the record's CRC-32 and, if `verify`
/// (false only for a base forced over a checksum mismatch), the result's.
pub fn restore_coded(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CodedTensor,
    dtype: Dtype,
    byte_len: u64,
    base_bytes: Option<Vec<u8>>,
    verify: bool,
) -> Result<Vec<u8>> {
    let what = format!("tensor '{}'", r.name);
    let fail = |msg: String| Error::format(reader.path(), format!("{what}: {msg}"));
    if base_bytes.is_some() != c.base.is_some() {
        return Err(Error::Param(format!(
            "internal: {what}: base read or not as needed"
        )));
    }
    let mut out = base_bytes.unwrap_or_default();
    let extra = byte_len
        .checked_sub(out.len() as u64)
        .ok_or_else(|| fail("base larger than the tensor".into()))?;
    out.try_reserve_exact(extra as usize)
        .map_err(|_| fail(format!("{byte_len} bytes cannot be allocated")))?;
    out.resize(byte_len as usize, 0);
    let width = word_width(dtype.bitsize());
    let (group, bb) = (chunk_blocks(width), block_bytes(width));
    let parts: Vec<(usize, usize)> = (0..c.blocks.len())
        .step_by(group)
        .map(|i| (i, (i + group).min(c.blocks.len())))
        .collect();
    let lens = parts
        .iter()
        .map(|&(i, j)| c.blocks[i..j].iter().sum::<u64>());
    let mut next = parts.iter();
    let mut undecodable = None;
    reader.read_record_in_parts(&c.data, lens, &what, |buf| {
        let &(i, j) = next.next().expect("one part per group");
        let mut streams = Vec::with_capacity(j - i);
        let mut rest = buf.as_slice();
        for &len in &c.blocks[i..j] {
            let (s, tail) = rest.split_at(len as usize);
            streams.push(s);
            rest = tail;
        }
        let end = (j * bb).min(out.len());
        // Reported after the record's checksum: a corrupted record is named as such.
        if undecodable.is_none() {
            undecodable = decode_blocks(&streams, &mut out[i * bb..end], width, i).err();
        }
        Ok(())
    })?;
    if let Some(e) = undecodable {
        return Err(fail(format!("undecodable: {e}")));
    }
    if verify && crate::format::index::crc32(&out) != c.restored_crc32 {
        return Err(fail(
            "restored bytes fail their checksum (corrupted, or wrong base)".into(),
        ));
    }
    Ok(out)
}
