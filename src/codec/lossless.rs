//! Lossless coding of a whole tensor against its base tensor (or alone).
//!
//! # Words and blocks
//! A tensor's bytes are read as little-endian words of `width` bytes (1, 2, 4 or 8: the
//! dtype's size; [`word_width`]). Word `i` of the fine-tune is coded against word `i` of the
//! base; words beyond the base's end (new vocabulary rows) and every word of a tensor coded
//! alone are coded against zero. Words are split into blocks of [`LOSSLESS_BLOCK_WORDS`]
//! `= 2^20` words (the last may be shorter); a tensor's stream is the concatenation of its
//! blocks' streams, whose byte lengths the container stores, so blocks decode independently
//! (in parallel).
//!
//! # Transform
//! Per word: `d = (ft - base) mod 2^(8 width)` read as a signed integer, zig-zag mapped to
//! `z = (d << 1) ^ (d >> (8 width - 1))` (small differences of either sign become small
//! numbers). Fine-tuning moves most weights by a few units in the last place, so the high
//! bytes of `z` are mostly zero and its low bytes are concentrated; byte plane `p` is byte `p`
//! of every word's `z` (little-endian: plane 0 is the least significant).
//!
//! # Block stream
//! The first byte is the block's mode:
//! - `0` ([`MODE_SAME`]): every word equals the base's; nothing follows.
//! - `1` ([`MODE_STORED`]): the fine-tune's bytes of the block follow verbatim.
//! - `2` ([`MODE_PLANES`]): for each plane, in order 0..width: a table byte, then
//!   - table byte `0`: one byte, the plane's only value; no stream;
//!   - table byte `1`: 256 frequencies (u16 LE, at least two nonzero, summing to
//!     `2^15`; see [`super::rans`]), a u32 LE stream length, and the plane's rANS stream
//!     under that table.
//!
//! The encoder writes `SAME` when every word equals the base's, otherwise `PLANES` unless it
//! would not be shorter than `STORED`. The decoder checks every length, table and stream and
//! rejects trailing bytes: a corrupted stream is an error, never a panic.

use super::rans::{self, FreqTable, PROB_SCALE};
use super::CodecError;
use rayon::prelude::*;

/// Words per block (the last block of a tensor may be shorter).
pub const LOSSLESS_BLOCK_WORDS: usize = 1 << 20;
/// Block mode: identical to the base.
pub const MODE_SAME: u8 = 0;
/// Block mode: the fine-tune's bytes, verbatim.
pub const MODE_STORED: u8 = 1;
/// Block mode: entropy-coded byte planes of the zig-zagged differences.
pub const MODE_PLANES: u8 = 2;
/// Plane table: a single value, no stream.
const TABLE_CONSTANT: u8 = 0;
/// Plane table: 256 frequencies and a rANS stream.
const TABLE_FREQS: u8 = 1;
/// Bytes of a stored frequency table.
const FREQS_BYTES: usize = 256 * 2;

/// The word width for a dtype of `bits` bits per element: its byte size when that is 1, 2,
/// 4 or 8, else 1 (sub-byte and odd-sized dtypes are coded byte by byte).
pub fn word_width(bits: usize) -> usize {
    match bits {
        8 | 16 | 32 | 64 => bits / 8,
        _ => 1,
    }
}

/// Number of blocks of a tensor of `bytes` bytes in words of `width` bytes.
pub fn lossless_block_count(bytes: u64, width: usize) -> u64 {
    (bytes / width as u64).div_ceil(LOSSLESS_BLOCK_WORDS as u64)
}

/// Bytes of one full block.
pub fn block_bytes(width: usize) -> usize {
    LOSSLESS_BLOCK_WORDS * width
}

fn corrupt(block: usize, msg: impl Into<String>) -> CodecError {
    CodecError::Lossless {
        block,
        msg: msg.into(),
    }
}

/// Reads word `i` (little-endian, `W` bytes) of `bytes` as a `u64`.
#[inline(always)]
fn load<const W: usize>(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w[..W].copy_from_slice(&bytes[i * W..i * W + W]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn mask<const W: usize>() -> u64 {
    u64::MAX >> (64 - 8 * W)
}

/// Zig-zag of the `W`-byte wrapping difference `ft - base`.
#[inline(always)]
fn zigzag<const W: usize>(base: u64, ft: u64) -> u64 {
    let shift = 64 - 8 * W as u32;
    let d = (ft.wrapping_sub(base) << shift) as i64 >> shift;
    ((d << 1) ^ (d >> 63)) as u64 & mask::<W>()
}

/// Inverse of [`zigzag`]: the `W`-byte word `base + d`.
#[inline(always)]
fn unzigzag<const W: usize>(base: u64, z: u64) -> u64 {
    let d = (z >> 1) ^ (z & 1).wrapping_neg();
    base.wrapping_add(d) & mask::<W>()
}

/// The byte planes of the zig-zagged differences of one block; `None` if every word equals
/// the base's. `base` may be shorter than `ft` (missing words are zero).
fn planes_of<const W: usize>(base: &[u8], ft: &[u8]) -> Option<Vec<Vec<u8>>> {
    let n = ft.len() / W;
    let nb = (base.len() / W).min(n);
    let mut planes = vec![vec![0u8; n]; W];
    let mut any = false;
    for i in 0..n {
        let b = if i < nb { load::<W>(base, i) } else { 0 };
        let z = zigzag::<W>(b, load::<W>(ft, i));
        any |= z != 0;
        for (p, plane) in planes.iter_mut().enumerate() {
            plane[i] = (z >> (8 * p)) as u8;
        }
    }
    any.then_some(planes)
}

/// Appends one plane (table and stream) to `out`.
fn encode_plane(plane: &[u8], out: &mut Vec<u8>) {
    let mut counts = [0u64; 256];
    for &v in plane {
        counts[usize::from(v)] += 1;
    }
    if counts.iter().filter(|&&c| c > 0).count() == 1 {
        out.extend_from_slice(&[TABLE_CONSTANT, plane[0]]);
        return;
    }
    let table = FreqTable::from_counts(&counts).expect("256 levels, nonzero total");
    let stream = rans::encode(&table, plane).expect("every value has a nonzero frequency");
    out.push(TABLE_FREQS);
    for &f in table.freqs() {
        out.extend_from_slice(&(f as u16).to_le_bytes());
    }
    out.extend_from_slice(&(stream.len() as u32).to_le_bytes());
    out.extend_from_slice(&stream);
}

fn encode_block_w<const W: usize>(base: &[u8], ft: &[u8]) -> Vec<u8> {
    let Some(planes) = planes_of::<W>(base, ft) else {
        return vec![MODE_SAME];
    };
    let mut out = vec![MODE_PLANES];
    for plane in &planes {
        encode_plane(plane, &mut out);
        if out.len() > ft.len() {
            break;
        }
    }
    if out.len() > ft.len() {
        out.clear();
        out.push(MODE_STORED);
        out.extend_from_slice(ft);
    }
    out
}

/// Encodes one block: `ft` holds at most [`LOSSLESS_BLOCK_WORDS`] words of `width` bytes,
/// `base` the base's bytes of the same words (shorter, possibly empty, where the base ends).
pub fn encode_block(base: &[u8], ft: &[u8], width: usize) -> Vec<u8> {
    debug_assert!(ft.len() % width == 0 && ft.len() <= block_bytes(width));
    let base = &base[..base.len().min(ft.len())];
    match width {
        1 => encode_block_w::<1>(base, ft),
        2 => encode_block_w::<2>(base, ft),
        4 => encode_block_w::<4>(base, ft),
        8 => encode_block_w::<8>(base, ft),
        _ => panic!("word width {width} is not 1, 2, 4 or 8"),
    }
}

/// Encodes whole consecutive blocks in parallel: `ft` and `base` start at a block boundary,
/// `ft` is a whole number of words, `base` may be shorter. Returns one stream per block.
pub fn encode_blocks(base: &[u8], ft: &[u8], width: usize) -> Vec<Vec<u8>> {
    let bb = block_bytes(width);
    ft.par_chunks(bb)
        .enumerate()
        .map(|(i, chunk)| {
            let start = (i * bb).min(base.len());
            let end = (start + bb).min(base.len());
            encode_block(&base[start..end], chunk, width)
        })
        .collect()
}

/// Splits `n` bytes off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize, block: usize) -> Result<&'a [u8], CodecError> {
    if data.len() < n {
        return Err(corrupt(block, "stream truncated"));
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

/// Decodes one plane (table and stream) from the front of `data` into `plane`.
fn decode_plane(data: &mut &[u8], plane: &mut [u8], block: usize) -> Result<(), CodecError> {
    match take(data, 1, block)?[0] {
        TABLE_CONSTANT => {
            plane.fill(take(data, 1, block)?[0]);
            Ok(())
        }
        TABLE_FREQS => {
            let raw = take(data, FREQS_BYTES, block)?;
            let freqs: Vec<u64> = raw
                .chunks_exact(2)
                .map(|c| u64::from(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            if freqs.iter().sum::<u64>() != u64::from(PROB_SCALE)
                || freqs.iter().filter(|&&f| f > 0).count() < 2
            {
                return Err(corrupt(block, "invalid frequency table"));
            }
            let table = FreqTable::from_counts(&freqs)?;
            let len = take(data, 4, block)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let stream = take(data, len, block)?;
            rans::decode(&table, stream, plane).map_err(|e| corrupt(block, e))
        }
        t => Err(corrupt(block, format!("unknown plane table type {t}"))),
    }
}

fn decode_planes_w<const W: usize>(
    mut data: &[u8],
    out: &mut [u8],
    block: usize,
) -> Result<(), CodecError> {
    let n = out.len() / W;
    let mut planes = vec![0u8; n * W];
    for plane in planes.chunks_exact_mut(n.max(1)).take(W) {
        decode_plane(&mut data, &mut plane[..n], block)?;
    }
    if !data.is_empty() {
        return Err(corrupt(block, "trailing bytes after the last plane"));
    }
    for i in 0..n {
        let z = (0..W).fold(0u64, |z, p| z | u64::from(planes[p * n + i]) << (8 * p));
        let v = unzigzag::<W>(load::<W>(out, i), z);
        out[i * W..i * W + W].copy_from_slice(&v.to_le_bytes()[..W]);
    }
    Ok(())
}

/// Decodes one block in place: `out` holds the base's bytes of the block's words (zeros
/// where the base ends) and receives the fine-tune's.
pub fn decode_block(
    data: &[u8],
    out: &mut [u8],
    width: usize,
    block: usize,
) -> Result<(), CodecError> {
    if out.len() % width != 0 || out.len() > block_bytes(width) {
        return Err(CodecError::Input(format!(
            "block of {} bytes in words of {width}",
            out.len()
        )));
    }
    let Some((&mode, rest)) = data.split_first() else {
        return Err(corrupt(block, "empty block stream"));
    };
    match mode {
        MODE_SAME if rest.is_empty() => Ok(()),
        MODE_STORED if rest.len() == out.len() => {
            out.copy_from_slice(rest);
            Ok(())
        }
        MODE_PLANES => match width {
            1 => decode_planes_w::<1>(rest, out, block),
            2 => decode_planes_w::<2>(rest, out, block),
            4 => decode_planes_w::<4>(rest, out, block),
            8 => decode_planes_w::<8>(rest, out, block),
            _ => Err(CodecError::Input(format!("word width {width}"))),
        },
        MODE_SAME | MODE_STORED => Err(corrupt(block, "block stream has the wrong length")),
        m => Err(corrupt(block, format!("unknown block mode {m}"))),
    }
}

/// Decodes consecutive blocks in parallel, in place: `out` starts at block `first` and holds
/// the base's bytes (zeros where the base ends); `streams` are the blocks' streams in order,
/// one per block of `out`.
pub fn decode_blocks(
    streams: &[&[u8]],
    out: &mut [u8],
    width: usize,
    first: usize,
) -> Result<(), CodecError> {
    let bb = block_bytes(width);
    if out.len().div_ceil(bb) != streams.len() {
        return Err(CodecError::BlockTable(format!(
            "{} block streams for {} bytes",
            streams.len(),
            out.len()
        )));
    }
    out.par_chunks_mut(bb)
        .zip(streams.par_iter())
        .enumerate()
        .try_for_each(|(i, (chunk, data))| decode_block(data, chunk, width, first + i))
}

#[cfg(test)]
#[path = "lossless_tests.rs"]
mod tests;
