//! Pass 1 for tensors too large to hold whole ([`super::memory::BLOCKED_INPUT_BYTES`]): the
//! pair is read in blocks of elements twice, first for the exact min/max (and the base's
//! CRC-32), then for the histogram and the levels under that grid. Neither whole tensor, nor a
//! whole-tensor f32 delta, is ever in memory: only the packed levels and one pair of blocks
//! per thread (the threads read and compute their blocks in parallel; the block size is
//! divided by the thread count, so the blocks in flight take the same memory on any host).
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
use crate::engine::cpu::{min_max, quantize_to};
use crate::engine::{DeltaInput, EngineError, PackedLevels};
use crate::error::Result;
use rayon::prelude::*;
use std::sync::Mutex;

/// [`BLOCKED_INPUT_BYTES`], or the number of bytes in `UDELTA_BLOCKED_INPUT_BYTES`.
pub(super) fn blocked_threshold() -> Result<u64> {
    bytes_from_env(BLOCKED_ENV, BLOCKED_INPUT_BYTES)
}

/// One pair read block by block, blocks in parallel (each thread reads its own with `pread`,
/// so reading and computing overlap on every core): its element types, and the buffers of
/// the blocks in flight.
struct BlockReader<'p, 'a> {
    pair: &'p Pair<'a>,
    types: (FloatType, FloatType),
    numel: usize,
    /// Elements per block (even, so that packed levels of blocks concatenate).
    block: usize,
    /// Buffer pairs of finished blocks, for the next ones.
    spare: &'p BlockBuffers,
}

/// Buffer pairs (base, fine-tuned) of blocks, kept from one blocked pair to the next (at most
/// one pair per thread): fresh memory would be faulted in again for every pair.
#[derive(Default)]
pub(super) struct BlockBuffers(Mutex<Vec<(Vec<u8>, Vec<u8>)>>);

impl<'p, 'a> BlockReader<'p, 'a> {
    /// The blocks of `pair`'s first `numel` elements: all threads' blocks in flight together
    /// take `threshold / BLOCK_FRACTION` bytes per side at most.
    fn new(
        pair: &'p Pair<'a>,
        numel: usize,
        threshold: u64,
        spare: &'p BlockBuffers,
    ) -> Result<Self> {
        let types = (pair.base_type()?, pair.ft_type()?);
        let widest = types.0.size().max(types.1.size()) as u64;
        let threads = rayon::current_num_threads().max(1) as u64;
        let block = ((threshold / BLOCK_FRACTION / widest / threads) as usize & !1).max(2);
        Ok(BlockReader {
            pair,
            types,
            numel,
            block,
            spare,
        })
    }

    /// The first element of every block, in order.
    fn starts(&self) -> Vec<usize> {
        (0..self.numel).step_by(self.block).collect()
    }

    /// Elements in the block from `start`.
    fn len_from(&self, start: usize) -> usize {
        self.block.min(self.numel - start)
    }

    /// Reads the block of elements from `start` and runs `f` on its input and base bytes.
    fn with_block<T>(
        &self,
        start: usize,
        f: impl FnOnce(&DeltaInput, &[u8]) -> std::result::Result<T, EngineError>,
    ) -> Result<T> {
        let n = self.len_from(start);
        let (bt, ft) = self.types;
        let mut bufs = self.spare.0.lock().expect("block buffers").pop();
        let (b, t) = bufs.get_or_insert_with(Default::default);
        // Only growth is zero-filled: the reads overwrite every byte.
        for (buf, ty) in [(&mut *b, bt), (&mut *t, ft)] {
            buf.truncate(n * ty.size());
            buf.resize(n * ty.size(), 0);
        }
        let p = self.pair;
        p.base.read_range(p.b, (start * bt.size()) as u64, b)?;
        p.ft.read_range(p.t, (start * ft.size()) as u64, t)?;
        let input = DeltaInput::new(b, bt, t, ft, n);
        let result = f(&input, b).map_err(|e| p.engine_error(shifted(e, start)));
        self.spare.0.lock().expect("block buffers").extend(bufs);
        result
    }

    /// The exact min/max of the delta (as [`min_max`] on the whole) and the base's CRC-32.
    /// An error is the first block's in order, as a sequential pass would meet it.
    fn min_max_and_crc(&self) -> Result<((f32, f32), u32)> {
        let parts: Vec<Result<_>> = self
            .starts()
            .into_par_iter()
            .map(|start| {
                self.with_block(start, |input, base| {
                    let mut hasher = crc32fast::Hasher::new();
                    hasher.update(base);
                    Ok((min_max(input)?, hasher))
                })
            })
            .collect();
        let mut hasher = crc32fast::Hasher::new();
        let mut range: Option<(f32, f32)> = None;
        for part in parts {
            let ((lo, hi), block_hasher) = part?;
            hasher.combine(&block_hasher);
            range = Some(range.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
        }
        Ok((range.unwrap_or((0.0, 0.0)), hasher.finalize()))
    }

    /// The histogram and the packed levels under `grid` (as
    /// [`quantize`](crate::engine::cpu::quantize) on the whole), each
    /// block's levels packed in place.
    fn levels(&self, grid: QuantGrid) -> Result<(TensorStats, PackedLevels)> {
        let mut packed = PackedLevels::buffer(PackedLevels::packed_len(self.numel, grid.bits));
        let per_block = PackedLevels::packed_len(self.block, grid.bits);
        let parts: Vec<Result<Vec<u64>>> = packed
            .par_chunks_mut(per_block)
            .zip(self.starts())
            .map(|(out, start)| {
                self.with_block(start, |input, _| Ok(quantize_to(input, grid, out)))
            })
            .collect();
        let mut histogram = vec![0u64; grid.levels()];
        for part in parts {
            histogram.iter_mut().zip(part?).for_each(|(a, b)| *a += b);
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
    /// The statistics of one compressed pair of model `model` too large to read whole, with
    /// what pass 2 selects from and its new rows kept, reading it in blocks (twice).
    pub(super) fn analyze_in_blocks(
        &mut self,
        model: &str,
        pair: &Pair,
        bi: usize,
        shared_numel: usize,
        threshold: u64,
    ) -> Result<Analysis> {
        let bits = self.opts.params.bits;
        let reader = BlockReader::new(pair, shared_numel, threshold, &self.block_buffers)?;
        let (stats, levels, base_crc32) = timed(&mut self.times.analyze, || {
            let ((lo, hi), crc) = reader.min_max_and_crc()?;
            let (stats, levels) = reader.levels(QuantGrid { lo, hi, bits })?;
            Ok::<_, crate::error::Error>((stats, levels, crc))
        })?;
        let tail_start = (shared_numel * pair.ft_type()?.size()) as u64;
        let mut tail = vec![0u8; (pair.t.len.max(tail_start) - tail_start) as usize];
        pair.ft.read_range(pair.t, tail_start, &mut tail)?;
        let kept = self.keep_for_selection((model, &pair.t.name), &stats, levels)?;
        Ok(Analysis {
            base: bi,
            shared_numel,
            stats,
            base_crc32,
            allocation: None,
            kept: Some(kept),
            tail,
        })
    }
}
