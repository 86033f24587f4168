//! Pass 1 for tensors too large to hold whole ([`super::memory::BLOCKED_INPUT_BYTES`]): the
//! pair is read in blocks of elements twice, first for the exact min/max (and the base's
//! CRC-32), then for the histogram and the levels under that grid. Neither whole tensor, nor a
//! whole-tensor f32 delta, is ever in memory: only two blocks and the packed levels.
//!
//! Both reads go to the checkpoints (`bytes_read` in `compress --json` counts both). The
//! statistics are exact and computed on the host with the CPU reference engine's functions,
//! so every engine's file is byte-identical to the whole-tensor path's (the GPU engine computes
//! its levels on the host too); `--verify` has nothing to compare on such a tensor.

use super::memory::{bytes_from_env, BLOCKED_ENV, BLOCKED_INPUT_BYTES, BLOCK_FRACTION};
use super::model::Analysis;
use super::pair::Pair;
use super::{timed, Run};
use crate::algorithm::quantize::QuantGrid;
use crate::algorithm::TensorStats;
use crate::checkpoint::dtype::FloatType;
use crate::engine::cpu::{min_max, quantize};
use crate::engine::{DeltaInput, EngineError, PackedLevels};
use crate::error::Result;

/// [`BLOCKED_INPUT_BYTES`], or the number of bytes in `UDELTA_BLOCKED_INPUT_BYTES`.
pub(super) fn blocked_threshold() -> Result<u64> {
    bytes_from_env(BLOCKED_ENV, BLOCKED_INPUT_BYTES)
}

/// One pair read block by block: its element types, and the buffers of the current block.
struct BlockReader<'p, 'a> {
    pair: &'p Pair<'a>,
    types: (FloatType, FloatType),
    numel: usize,
    /// Elements per block (even, so that packed levels of blocks concatenate).
    block: usize,
    bufs: (Vec<u8>, Vec<u8>),
}

impl<'p, 'a> BlockReader<'p, 'a> {
    fn new(pair: &'p Pair<'a>, numel: usize, threshold: u64) -> Result<Self> {
        let types = (pair.base_type()?, pair.ft_type()?);
        let widest = types.0.size().max(types.1.size()) as u64;
        let block = ((threshold / BLOCK_FRACTION / widest) as usize & !1).max(2);
        Ok(BlockReader {
            pair,
            types,
            numel,
            block,
            bufs: (Vec::new(), Vec::new()),
        })
    }

    /// Reads the block of elements from `start` and runs `f` on its input.
    fn with_block<T>(
        &mut self,
        start: usize,
        f: impl FnOnce(&DeltaInput, &[u8]) -> std::result::Result<T, EngineError>,
    ) -> Result<T> {
        let n = self.block.min(self.numel - start);
        let (bt, ft) = self.types;
        let (b, t) = (&mut self.bufs.0, &mut self.bufs.1);
        b.resize(n * bt.size(), 0);
        t.resize(n * ft.size(), 0);
        let p = self.pair;
        p.base.read_range(p.b, (start * bt.size()) as u64, b)?;
        p.ft.read_range(p.t, (start * ft.size()) as u64, t)?;
        let input = DeltaInput::new(b, bt, t, ft, n);
        f(&input, b).map_err(|e| p.engine_error(shifted(e, start)))
    }

    /// The exact min/max of the delta (as [`min_max`] on the whole) and the base's CRC-32.
    fn min_max_and_crc(&mut self) -> Result<((f32, f32), u32)> {
        let mut hasher = crc32fast::Hasher::new();
        let mut range: Option<(f32, f32)> = None;
        for start in (0..self.numel).step_by(self.block) {
            let (lo, hi) = self.with_block(start, |input, base| {
                hasher.update(base);
                min_max(input)
            })?;
            range = Some(range.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
        }
        Ok((range.unwrap_or((0.0, 0.0)), hasher.finalize()))
    }

    /// The histogram and the packed levels under `grid` (as [`quantize`] on the whole).
    fn levels(&mut self, grid: QuantGrid) -> Result<(TensorStats, PackedLevels)> {
        let mut histogram = vec![0u64; grid.levels()];
        let mut packed = Vec::with_capacity(PackedLevels::packed_len(self.numel, grid.bits));
        for start in (0..self.numel).step_by(self.block) {
            let (stats, levels) =
                self.with_block(start, |input, _| Ok(quantize(input, grid, true)))?;
            histogram
                .iter_mut()
                .zip(&stats.histogram)
                .for_each(|(a, b)| *a += b);
            packed.extend_from_slice(levels.expect("levels kept").bytes());
        }
        let levels = PackedLevels::from_bytes(self.numel, grid.bits, packed)
            .expect("one packed level per element");
        Ok((TensorStats { grid, histogram }, levels))
    }
}

/// An engine error of a block starting at element `start`, with the tensor's element index.
fn shifted(e: EngineError, start: usize) -> EngineError {
    match e {
        EngineError::NonFinite {
            index,
            base,
            finetuned,
        } => EngineError::NonFinite {
            index: index + start as u64,
            base,
            finetuned,
        },
        other => other,
    }
}

impl Run<'_> {
    /// The statistics of one compressed pair too large to read whole, with its levels and new
    /// rows kept for pass 2, reading it in blocks (twice).
    pub(super) fn analyze_in_blocks(
        &mut self,
        pair: &Pair,
        bi: usize,
        shared_numel: usize,
        threshold: u64,
    ) -> Result<Analysis> {
        let bits = self.opts.params.bits;
        let mut reader = BlockReader::new(pair, shared_numel, threshold)?;
        let (stats, levels, base_crc32) = timed(&mut self.times.analyze, || {
            let ((lo, hi), crc) = reader.min_max_and_crc()?;
            let (stats, levels) = reader.levels(QuantGrid { lo, hi, bits })?;
            Ok::<_, crate::error::Error>((stats, levels, crc))
        })?;
        drop(reader);
        let tail_start = (shared_numel * pair.ft_type()?.size()) as u64;
        let mut tail = vec![0u8; (pair.t.len.max(tail_start) - tail_start) as usize];
        pair.ft.read_range(pair.t, tail_start, &mut tail)?;
        Ok(Analysis {
            base: bi,
            shared_numel,
            stats,
            base_crc32,
            allocation: None,
            kept: Some(self.kept.keep(levels, bits)?),
            tail,
        })
    }
}
