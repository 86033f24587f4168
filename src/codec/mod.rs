//! Entropy codec for one compressed tensor's payload: which elements were kept (positions) and
//! their quantization levels; and ([`lossless`]) the lossless coding of whole tensors against
//! their base.
//!
//! # Input
//! A tensor of `numel <= 2^32` elements keeps `kept` entries: strictly increasing element
//! positions (`u32`, `< numel`) and, for each, a level (`u8`, `< 2^bits`, `bits` in 1..=8). The
//! kept-level histogram `kept_counts` (length `2^bits`, sum `kept`) is stored in the file's
//! metadata and known to both sides.
//!
//! # Blocks
//! Elements are split into fixed ranges of [`BLOCK_ELEMENTS`] `= 2^20` elements: block `i`
//! covers elements `i * 2^20 .. min((i + 1) * 2^20, numel)`; there are
//! [`block_count`]`(numel) = ceil(numel / 2^20)` blocks (0 for an empty tensor). Each block has
//! a [`BlockInfo`] (kept count, byte lengths of its two streams), stored by the container.
//! The tensor's payload is two byte streams: `positions` is the concatenation, in block order,
//! of every block's position stream, `levels` likewise of the level streams. Every block's
//! streams are independent: block `i`'s bytes start at the sum of the earlier blocks' byte
//! lengths, and decoding them needs only `numel`, `kept_counts` and the block's own
//! [`BlockInfo`].
//!
//! - Position stream: the Golomb-coded gaps of the block's kept offsets, or of its non-kept
//!   offsets when more than half are kept; empty when no or all entries are kept. Exact format
//!   in [`golomb`].
//! - Level stream: the block's kept levels in position order, one static rANS stream under a
//!   frequency table normalized from `kept_counts`; empty for a block with no kept entry and
//!   for every block when a single level has all the mass. Exact format in [`rans`].
//!
//! Encoding and decoding run the blocks in parallel (rayon); the output does not depend on the
//! number of threads.

pub mod estimate;
pub mod golomb;
pub mod lossless;
pub mod prefixed;
pub mod rans;

use rayon::prelude::*;
use std::fmt;

pub use rans::FreqTable;

/// Elements per block (the last block of a tensor may be shorter).
pub const BLOCK_ELEMENTS: u64 = 1 << 20;

/// The largest supported element count: positions are `u32`.
pub const MAX_NUMEL: u64 = 1 << 32;

/// What the container stores for each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockInfo {
    /// Kept entries in this block.
    pub kept: u32,
    /// Length of this block's position stream in bytes.
    pub position_bytes: u32,
    /// Length of this block's level stream in bytes.
    pub level_bytes: u32,
}

/// One tensor's encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedTensor {
    /// All blocks' position streams, concatenated in block order.
    pub positions: Vec<u8>,
    /// All blocks' level streams, concatenated in block order.
    pub levels: Vec<u8>,
    /// One entry per block, in order.
    pub blocks: Vec<BlockInfo>,
}

/// One encoded block: its info and its two streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBlock {
    /// Kept count and stream lengths.
    pub info: BlockInfo,
    /// The block's position stream.
    pub positions: Vec<u8>,
    /// The block's level stream.
    pub levels: Vec<u8>,
}

/// One block's two streams and its info, as [`BlockCodec::decode_block_beside`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct BlockIn<'a> {
    /// The block's stored info.
    pub info: &'a BlockInfo,
    /// Its position stream.
    pub positions: &'a [u8],
    /// Its level stream.
    pub levels: &'a [u8],
}

/// Another tensor's block whose positions [`BlockCodec::decode_block_beside`] decodes.
#[derive(Debug)]
pub struct OtherPositions<'a> {
    /// That tensor's codec.
    pub codec: &'a BlockCodec,
    /// The block's stored info.
    pub info: &'a BlockInfo,
    /// Its position stream.
    pub positions: &'a [u8],
    /// Where its `info.kept` positions go.
    pub out: &'a mut [u32],
}

/// Which of a block's two streams an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The position (Golomb) stream.
    Positions,
    /// The level (rANS) stream.
    Levels,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Positions => "position",
            Stream::Levels => "level",
        })
    }
}

/// Errors of the codec. The caller adds the file path and tensor name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The data handed to the encoder is inconsistent (a bug upstream, not a file problem).
    #[error("codec input: {0}")]
    Input(String),
    /// The kept-level histogram is unusable.
    #[error("level histogram: {0}")]
    Histogram(String),
    /// The block table does not fit the tensor or the streams.
    #[error("block table: {0}")]
    BlockTable(String),
    /// A block's stream does not decode.
    #[error("block {block}: {stream} stream: {msg}")]
    Corrupt {
        /// Index of the block.
        block: usize,
        /// Which stream.
        stream: Stream,
        /// What is wrong.
        msg: String,
    },
    /// A losslessly coded block does not decode.
    #[error("lossless block {block}: {msg}")]
    Lossless {
        /// Index of the block in its tensor.
        block: usize,
        /// What is wrong.
        msg: String,
    },
    /// Every block decoded, but the levels do not have the stored histogram.
    #[error("decoded levels do not match the stored histogram: level {level}: stored {stored}, decoded {decoded}")]
    HistogramMismatch {
        /// The first level whose count differs.
        level: usize,
        /// Its count in the stored histogram.
        stored: u64,
        /// Its count among the decoded levels.
        decoded: u64,
    },
}

/// Number of blocks of a tensor with `numel` elements: `ceil(numel / BLOCK_ELEMENTS)`.
pub fn block_count(numel: u64) -> usize {
    numel.div_ceil(BLOCK_ELEMENTS) as usize
}

/// Where one block lies: in the tensor's elements, in the kept entries and in both streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    /// First element of the block.
    pub element_start: u64,
    /// Elements in the block (`BLOCK_ELEMENTS`, or less for the last block).
    pub element_len: u32,
    /// Index of the block's first kept entry among all the tensor's kept entries.
    pub kept_start: u64,
    /// Offset of the block's position stream in the tensor's position bytes.
    pub position_start: u64,
    /// Offset of the block's level stream in the tensor's level bytes.
    pub level_start: u64,
    /// The block's stored info.
    pub info: BlockInfo,
}

/// The per-tensor state shared by all blocks: element count and level model. Build it once per
/// tensor, then encode or decode blocks independently (e.g. while streaming a file).
#[derive(Debug, Clone)]
pub struct BlockCodec {
    numel: u64,
    kept_counts: Vec<u64>,
    total_kept: u64,
    table: FreqTable,
}

impl BlockCodec {
    /// Checks `numel <= 2^32` and the histogram (length a power of two in 2..=256, sum at most
    /// `numel`), and derives the frequency table.
    pub fn new(numel: u64, kept_counts: &[u64]) -> Result<Self, CodecError> {
        if numel > MAX_NUMEL {
            return Err(CodecError::Input(format!(
                "{numel} elements: at most 2^32 are supported"
            )));
        }
        let len = kept_counts.len();
        if !(2..=256).contains(&len) || !len.is_power_of_two() {
            return Err(CodecError::Histogram(format!(
                "{len} levels: must be 2^bits with bits in 1..=8"
            )));
        }
        let total_kept = kept_counts
            .iter()
            .try_fold(0u64, |acc, &c| acc.checked_add(c))
            .filter(|&t| t <= numel)
            .ok_or_else(|| {
                CodecError::Histogram(format!(
                    "counts sum to more than the {numel} elements of the tensor"
                ))
            })?;
        Ok(BlockCodec {
            numel,
            kept_counts: kept_counts.to_vec(),
            total_kept,
            table: FreqTable::from_counts(kept_counts)?,
        })
    }

    /// Element count of the tensor.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Sum of the histogram: the tensor's kept entries.
    pub fn total_kept(&self) -> u64 {
        self.total_kept
    }

    /// The level model.
    pub fn table(&self) -> &FreqTable {
        &self.table
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        block_count(self.numel)
    }

    /// First element and length of block `block` (which must be `< block_count()`).
    pub fn block_range(&self, block: usize) -> (u64, u32) {
        let start = block as u64 * BLOCK_ELEMENTS;
        let len = self.numel.saturating_sub(start).min(BLOCK_ELEMENTS);
        (start, len as u32)
    }

    /// Checks a block table against the tensor and the stream lengths: one entry per block,
    /// `kept <= ` block length, kept entries summing to the histogram's total, byte lengths
    /// summing to the stream lengths. Returns where every block lies.
    pub fn layout(
        &self,
        blocks: &[BlockInfo],
        positions_len: u64,
        levels_len: u64,
    ) -> Result<Vec<BlockSpan>, CodecError> {
        let expected = self.block_count();
        if blocks.len() != expected {
            return Err(CodecError::BlockTable(format!(
                "{} blocks, expected {expected} for {} elements",
                blocks.len(),
                self.numel
            )));
        }
        let mut spans = Vec::with_capacity(blocks.len());
        let (mut kept, mut pos, mut lev) = (0u64, 0u64, 0u64);
        for (i, info) in blocks.iter().enumerate() {
            let (element_start, element_len) = self.block_range(i);
            if info.kept > element_len {
                return Err(CodecError::BlockTable(format!(
                    "block {i}: {} kept entries in a block of {element_len} elements",
                    info.kept
                )));
            }
            spans.push(BlockSpan {
                element_start,
                element_len,
                kept_start: kept,
                position_start: pos,
                level_start: lev,
                info: *info,
            });
            kept += u64::from(info.kept);
            pos += u64::from(info.position_bytes);
            lev += u64::from(info.level_bytes);
        }
        if kept != self.total_kept {
            return Err(CodecError::BlockTable(format!(
                "blocks hold {kept} kept entries, the level histogram {}",
                self.total_kept
            )));
        }
        if pos != positions_len {
            return Err(CodecError::BlockTable(format!(
                "position streams of the blocks total {pos} bytes, the payload has {positions_len}"
            )));
        }
        if lev != levels_len {
            return Err(CodecError::BlockTable(format!(
                "level streams of the blocks total {lev} bytes, the payload has {levels_len}"
            )));
        }
        Ok(spans)
    }

    /// Encodes block `block` from its kept entries (`positions` absolute, strictly increasing,
    /// inside the block; `levels` of the same length, each with a nonzero histogram count).
    /// Returns the block info and its position and level streams.
    pub fn encode_block(
        &self,
        block: usize,
        positions: &[u32],
        levels: &[u8],
    ) -> Result<EncodedBlock, CodecError> {
        if block >= self.block_count() {
            return Err(CodecError::Input(format!(
                "block {block} does not exist ({} blocks)",
                self.block_count()
            )));
        }
        if positions.len() != levels.len() {
            return Err(CodecError::Input(format!(
                "block {block}: {} positions but {} levels",
                positions.len(),
                levels.len()
            )));
        }
        let (start, len) = self.block_range(block);
        // The common case in one loop; any invalid entry (or another mode) takes the path
        // that codes the streams one after the other and names the problem.
        let fused = match (
            golomb::DirectWriter::new(len, positions.len() as u32),
            self.table.single_symbol(),
        ) {
            (Some(p), None) => encode_fused(start as u32, len, positions, levels, p, &self.table),
            _ => None,
        };
        let (pos_bytes, lev_bytes) = match fused {
            Some(streams) => streams,
            None => self.encode_streams_apart(block, positions, levels)?,
        };
        let info = BlockInfo {
            kept: positions.len() as u32,
            position_bytes: to_u32(pos_bytes.len(), block)?,
            level_bytes: to_u32(lev_bytes.len(), block)?,
        };
        Ok(EncodedBlock {
            info,
            positions: pos_bytes,
            levels: lev_bytes,
        })
    }

    /// [`BlockCodec::encode_block`]'s two streams, coded one after the other from checked
    /// offsets (any mode), or the first problem with the entries.
    fn encode_streams_apart(
        &self,
        block: usize,
        positions: &[u32],
        levels: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), CodecError> {
        let (start, len) = self.block_range(block);
        let end = start + u64::from(len);
        let mut offsets = Vec::with_capacity(positions.len());
        let mut next = start;
        for (i, &p) in positions.iter().enumerate() {
            let p = u64::from(p);
            if p < next || p >= end {
                return Err(CodecError::Input(format!(
                    "block {block}: position {p} (entry {i} of the block) is {}",
                    if p >= end {
                        "beyond the block (or the tensor)"
                    } else {
                        "not strictly increasing"
                    }
                )));
            }
            offsets.push((p - start) as u32);
            next = p + 1;
        }
        let pos_bytes = golomb::encode_block_positions(len, &offsets);
        let lev_bytes = rans::encode(&self.table, levels)
            .map_err(|e| CodecError::Input(format!("block {block}: {e}")))?;
        Ok((pos_bytes, lev_bytes))
    }

    /// Decodes block `block` (whose [`BlockInfo`] is `info`) from exactly its own position and
    /// level bytes into `out_positions` and `out_levels`, both of length `info.kept`.
    ///
    /// Checks: the byte lengths match `info`, every decoded position is inside the block and
    /// strictly increasing, exactly `info.kept` entries decode, both streams are consumed
    /// exactly (no truncation, no trailing bytes, zero padding, final rANS state). The
    /// histogram of the levels is not checked here: a streaming caller compares the sum of the
    /// blocks' histograms (see [`level_histogram`]) with the stored one at the end.
    pub fn decode_block(
        &self,
        block: usize,
        info: &BlockInfo,
        positions: &[u8],
        levels: &[u8],
        out_positions: &mut [u32],
        out_levels: &mut [u8],
    ) -> Result<(), CodecError> {
        let this = BlockIn {
            info,
            positions,
            levels,
        };
        self.decode_block_with(block, this, out_positions, out_levels, None)
    }

    /// [`BlockCodec::decode_block`] of this tensor's block `block`, and in the same loop
    /// [`BlockCodec::decode_block_positions`] of block `block` of `other` (another tensor of
    /// as many elements: the fine-tune a swap leaves), so that the CPU overlaps the three
    /// streams. Returns `other`'s outcome, then this block's.
    pub fn decode_block_beside(
        &self,
        block: usize,
        this: BlockIn<'_>,
        out_positions: &mut [u32],
        out_levels: &mut [u8],
        other: OtherPositions<'_>,
    ) -> (Result<(), CodecError>, Result<(), CodecError>) {
        let decoder =
            match other
                .codec
                .check_block(block, other.info, other.out.len(), other.positions)
            {
                Err(e) => {
                    return (
                        Err(e),
                        self.decode_block_with(block, this, out_positions, out_levels, None),
                    )
                }
                Ok((start, len)) => {
                    golomb::DirectPositions::new(len, other.info.kept, start, other.positions)
                }
            };
        let Some(decoder) = decoder else {
            let (start, len) = other.codec.block_range(block);
            let other_ok =
                golomb::decode_block_positions(len, start as u32, other.positions, other.out)
                    .map_err(|m| corrupt(block, Stream::Positions, m));
            return (
                other_ok,
                self.decode_block_with(block, this, out_positions, out_levels, None),
            );
        };
        let mut beside = Beside {
            decoder,
            out: other.out,
            done: 0,
            error: None,
        };
        let this_ok =
            self.decode_block_with(block, this, out_positions, out_levels, Some(&mut beside));
        let other_ok = beside
            .finish()
            .map_err(|m| corrupt(block, Stream::Positions, m));
        (other_ok, this_ok)
    }

    /// [`BlockCodec::decode_block`], stepping `beside` in the same loop when both streams of
    /// the block take the interleaved path.
    fn decode_block_with(
        &self,
        block: usize,
        BlockIn {
            info,
            positions,
            levels,
        }: BlockIn<'_>,
        out_positions: &mut [u32],
        out_levels: &mut [u8],
        beside: Option<&mut Beside<'_, '_>>,
    ) -> Result<(), CodecError> {
        let corrupt = |stream, msg: &str| corrupt(block, stream, msg);
        let (start, len) = self.check_block(block, info, out_positions.len(), positions)?;
        if out_levels.len() != out_positions.len() {
            return Err(CodecError::Input(format!(
                "block {block}: output buffers hold {} positions and {} levels",
                out_positions.len(),
                out_levels.len()
            )));
        }
        if levels.len() as u64 != u64::from(info.level_bytes) {
            return Err(corrupt(
                Stream::Levels,
                "length differs from the block table",
            ));
        }
        let levels_coded = self.table.single_symbol().is_none();
        let (positions_ok, levels_ok) = match (
            golomb::DirectPositions::new(len, info.kept, start, positions),
            levels_coded.then(|| rans::Decoder::new(&self.table, levels).ok()),
        ) {
            (Some(p), Some(Some(l))) => decode_interleaved(p, l, out_positions, out_levels, beside),
            _ => (
                golomb::decode_block_positions(len, start, positions, out_positions),
                rans::decode(&self.table, levels, out_levels),
            ),
        };
        positions_ok.map_err(|m| corrupt(Stream::Positions, m))?;
        levels_ok.map_err(|m| corrupt(Stream::Levels, m))
    }

    /// Decodes only the positions of block `block` (whose [`BlockInfo`] is `info`) from
    /// exactly its own position bytes into `out_positions` (of length `info.kept`), with the
    /// checks of [`BlockCodec::decode_block`] on that stream.
    pub fn decode_block_positions(
        &self,
        block: usize,
        info: &BlockInfo,
        positions: &[u8],
        out_positions: &mut [u32],
    ) -> Result<(), CodecError> {
        let (start, len) = self.check_block(block, info, out_positions.len(), positions)?;
        golomb::decode_block_positions(len, start, positions, out_positions)
            .map_err(|m| corrupt(block, Stream::Positions, m))
    }

    /// Checks a block's index and info against the tensor, the output length and the
    /// position stream's length. Returns the block's first element and length (`start + len
    /// <= numel <= 2^32`, so every absolute position fits in `u32`).
    fn check_block(
        &self,
        block: usize,
        info: &BlockInfo,
        out_len: usize,
        positions: &[u8],
    ) -> Result<(u32, u32), CodecError> {
        if block >= self.block_count() {
            return Err(CodecError::BlockTable(format!(
                "block {block} does not exist ({} blocks)",
                self.block_count()
            )));
        }
        let (start, len) = self.block_range(block);
        if info.kept > len {
            return Err(CodecError::BlockTable(format!(
                "block {block}: {} kept entries in a block of {len} elements",
                info.kept
            )));
        }
        if out_len != info.kept as usize {
            return Err(CodecError::Input(format!(
                "block {block}: output buffers hold {out_len} entries, the block {}",
                info.kept
            )));
        }
        if positions.len() as u64 != u64::from(info.position_bytes) {
            return Err(corrupt(
                block,
                Stream::Positions,
                "length differs from the block table",
            ));
        }
        Ok((start as u32, len))
    }

    /// Compares a histogram of decoded levels with the stored one.
    pub fn check_histogram(&self, decoded: &[u64]) -> Result<(), CodecError> {
        for (level, &stored) in self.kept_counts.iter().enumerate() {
            let d = decoded.get(level).copied().unwrap_or(0);
            if d != stored {
                return Err(CodecError::HistogramMismatch {
                    level,
                    stored,
                    decoded: d,
                });
            }
        }
        if let Some((level, &d)) = decoded
            .iter()
            .enumerate()
            .skip(self.kept_counts.len())
            .find(|(_, &d)| d != 0)
        {
            return Err(CodecError::HistogramMismatch {
                level,
                stored: 0,
                decoded: d,
            });
        }
        Ok(())
    }
}

/// Another tensor's block positions decoded in the same loop as a block's entries (see
/// [`BlockCodec::decode_block_beside`]): its decoder, output and outcome.
struct Beside<'d, 'o> {
    decoder: golomb::DirectPositions<'d>,
    out: &'o mut [u32],
    done: usize,
    error: Option<&'static str>,
}

impl Beside<'_, '_> {
    /// Decodes the next position if the fast path allows; false when it stops (done, no
    /// fast path, or an error, kept).
    #[inline(always)]
    fn step(&mut self) -> bool {
        if self.done == self.out.len() {
            return false;
        }
        match self.decoder.next_loaded() {
            None => false,
            Some(Err(e)) => {
                self.error = Some(e);
                false
            }
            Some(Ok(position)) => {
                self.out[self.done] = position;
                self.done += 1;
                true
            }
        }
    }

    /// Decodes the rest and checks the stream's end.
    fn finish(mut self) -> Result<(), &'static str> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.decoder.decode_into(&mut self.out[self.done..])?;
        self.decoder.finish()
    }
}

/// Decodes a block's positions and levels in one loop (and, `beside`, another tensor's block
/// positions): the decoders' dependency chains are independent, so the CPU overlaps them.
/// Returns each stream's outcome (the caller reports a position error first, as when the
/// streams are decoded one after the other).
fn decode_interleaved(
    mut p: golomb::DirectPositions<'_>,
    mut l: rans::Decoder<'_>,
    out_positions: &mut [u32],
    out_levels: &mut [u8],
    mut beside: Option<&mut Beside<'_, '_>>,
) -> (Result<(), &'static str>, Result<(), &'static str>) {
    let mut level_error = None;
    let mut i = 0;
    while i < out_positions.len() {
        if let Some(other) = beside.as_deref_mut() {
            if !other.step() {
                beside = None;
            }
        }
        match p.next_loaded() {
            None => break,
            Some(Err(e)) => return (Err(e), Ok(())),
            Some(Ok(position)) => out_positions[i] = position,
        }
        i += 1;
        match l.next_symbol() {
            Ok(level) => out_levels[i - 1] = level,
            Err(e) => {
                level_error = Some(e);
                break;
            }
        }
    }
    let positions = p
        .decode_into(&mut out_positions[i..])
        .and_then(|()| p.finish());
    let levels = match level_error {
        Some(e) => Err(e),
        None => out_levels[i..]
            .iter_mut()
            .try_for_each(|o| l.next_symbol().map(|s| *o = s))
            .and_then(|()| l.finish()),
    };
    (positions, levels)
}

/// Codes a direct-mode block's positions (absolute, from block element `start`, `len`
/// elements) and its levels (multi-symbol table) in one loop: the two coders' dependency
/// chains are independent, so the CPU overlaps them, and the offsets are checked and taken on
/// the fly. The rANS stream takes the levels in reverse order, as [`rans::encode`] does.
/// `None` for a position out of the block or out of order, or a level of frequency 0.
fn encode_fused(
    start: u32,
    len: u32,
    positions: &[u32],
    levels: &[u8],
    mut p: golomb::DirectWriter,
    table: &FreqTable,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut l = rans::Encoder::new(levels.len());
    // One past the previous kept offset.
    let mut next = 0u32;
    for (&position, &level) in positions.iter().zip(levels.iter().rev()) {
        // A position below `start` wraps to an offset >= 2^32 - start >= len (the block
        // ends at start + len <= 2^32).
        let offset = position.wrapping_sub(start);
        if offset >= len || offset < next {
            return None;
        }
        p.put_gap(offset - next);
        next = offset + 1;
        l.put(table, level).ok()?;
    }
    Some((p.finish(), l.finish()))
}

/// A block's stream that does not decode.
fn corrupt(block: usize, stream: Stream, msg: &str) -> CodecError {
    CodecError::Corrupt {
        block,
        stream,
        msg: msg.to_string(),
    }
}

fn to_u32(n: usize, block: usize) -> Result<u32, CodecError> {
    u32::try_from(n).map_err(|_| CodecError::Input(format!("block {block}: stream over 4 GiB")))
}

/// Histogram (256 bins) of `levels`, counted in parallel.
pub fn level_histogram(levels: &[u8]) -> Vec<u64> {
    levels
        .par_chunks(1 << 16)
        .map(|chunk| {
            // Four interleaved sub-histograms (u32: a chunk has 2^16 entries): a run of equal
            // levels increments four counters in turn instead of waiting on one.
            let mut sub = [[0u32; 256]; 4];
            let mut quads = chunk.chunks_exact(4);
            for q in &mut quads {
                for (h, &l) in sub.iter_mut().zip(q) {
                    h[usize::from(l)] += 1;
                }
            }
            for &l in quads.remainder() {
                sub[0][usize::from(l)] += 1;
            }
            (0..256)
                .map(|i| sub.iter().map(|h| u64::from(h[i])).sum())
                .collect::<Vec<u64>>()
        })
        .reduce(
            || vec![0u64; 256],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Encodes one tensor's kept entries. `positions` are strictly increasing and `< numel`,
/// `levels[i]` is the level of `positions[i]`, `kept_counts` is the histogram of `levels`
/// (length `2^bits`). Blocks are encoded in parallel; the bytes do not depend on the thread
/// count.
pub fn encode_tensor(
    numel: u64,
    positions: &[u32],
    levels: &[u8],
    kept_counts: &[u64],
) -> Result<EncodedTensor, CodecError> {
    let codec = BlockCodec::new(numel, kept_counts)?;
    if positions.len() != levels.len() {
        return Err(CodecError::Input(format!(
            "{} positions but {} levels",
            positions.len(),
            levels.len()
        )));
    }
    let hist = level_histogram(levels);
    if let Some(level) = (kept_counts.len()..256).find(|&l| hist[l] != 0) {
        return Err(CodecError::Input(format!(
            "level {level} out of range: {} levels",
            kept_counts.len()
        )));
    }
    if let Some(level) = (0..kept_counts.len()).find(|&l| hist[l] != kept_counts[l]) {
        return Err(CodecError::Input(format!(
            "level {level} occurs {} times, the histogram says {}",
            hist[level], kept_counts[level]
        )));
    }
    // Split the kept entries by block. If positions are not sorted, the per-block checks in
    // encode_block fail for some block; if they all pass, the whole array is strictly
    // increasing (blocks are disjoint increasing ranges) and every position is < numel.
    let nblocks = codec.block_count();
    let mut bounds = Vec::with_capacity(nblocks + 1);
    bounds.push(0usize);
    for b in 1..nblocks {
        let end = b as u64 * BLOCK_ELEMENTS;
        let from = bounds[b - 1];
        bounds.push(from + positions[from..].partition_point(|&p| u64::from(p) < end));
    }
    bounds.push(positions.len());
    if nblocks == 0 && !positions.is_empty() {
        return Err(CodecError::Input(format!(
            "{} positions in an empty tensor",
            positions.len()
        )));
    }
    let results: Vec<Result<EncodedBlock, CodecError>> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let (lo, hi) = (bounds[b], bounds[b + 1]);
            codec.encode_block(b, &positions[lo..hi], &levels[lo..hi])
        })
        .collect();
    let mut out = EncodedTensor {
        positions: Vec::new(),
        levels: Vec::new(),
        blocks: Vec::with_capacity(nblocks),
    };
    let mut encoded = Vec::with_capacity(nblocks);
    for r in results {
        encoded.push(r?);
    }
    out.positions
        .reserve_exact(encoded.iter().map(|e| e.positions.len()).sum());
    out.levels
        .reserve_exact(encoded.iter().map(|e| e.levels.len()).sum());
    for e in encoded {
        out.blocks.push(e.info);
        out.positions.extend_from_slice(&e.positions);
        out.levels.extend_from_slice(&e.levels);
    }
    Ok(out)
}

/// Validates the block table (count = `block_count(numel)`, each `kept <=` block length, kept
/// summing to the histogram's total, byte lengths summing to the stream lengths), decodes all
/// blocks in parallel and checks the decoded level histogram against `kept_counts`. Returns the
/// kept positions (strictly increasing) and their levels.
pub fn decode_tensor(
    numel: u64,
    kept_counts: &[u64],
    blocks: &[BlockInfo],
    positions: &[u8],
    levels: &[u8],
) -> Result<(Vec<u32>, Vec<u8>), CodecError> {
    let codec = BlockCodec::new(numel, kept_counts)?;
    let spans = codec.layout(blocks, positions.len() as u64, levels.len() as u64)?;
    // total_kept <= numel <= 2^32 was checked by BlockCodec::new.
    let total = codec.total_kept() as usize;
    let mut out_pos = vec![0u32; total];
    let mut out_lev = vec![0u8; total];
    let mut jobs = Vec::with_capacity(spans.len());
    {
        let (mut rest_p, mut rest_l) = (out_pos.as_mut_slice(), out_lev.as_mut_slice());
        for (i, span) in spans.iter().enumerate() {
            let k = span.info.kept as usize;
            let (p, tail_p) = std::mem::take(&mut rest_p).split_at_mut(k);
            let (l, tail_l) = std::mem::take(&mut rest_l).split_at_mut(k);
            rest_p = tail_p;
            rest_l = tail_l;
            jobs.push((i, span, p, l));
        }
    }
    let results: Vec<Result<(), CodecError>> = jobs
        .into_par_iter()
        .map(|(i, span, p, l)| {
            let ps = span.position_start as usize;
            let ls = span.level_start as usize;
            codec.decode_block(
                i,
                &span.info,
                &positions[ps..ps + span.info.position_bytes as usize],
                &levels[ls..ls + span.info.level_bytes as usize],
                p,
                l,
            )
        })
        .collect();
    for r in results {
        r?;
    }
    codec.check_histogram(&level_histogram(&out_lev))?;
    Ok((out_pos, out_lev))
}

#[cfg(test)]
mod tests;
