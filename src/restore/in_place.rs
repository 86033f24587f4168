//! Adding a compressed tensor's kept deltas into the tensor's own bytes, block by block, and
//! putting the overwritten values back: what `decompress` computes for each kept entry
//! (`dtype(f32(base) + delta)`), without materializing the tensor's kept entries.
//!
//! The codec's blocks ([`codec::BLOCK_ELEMENTS`] elements each) are independent: each is
//! decoded into small per-thread buffers and scattered into its own slice of the tensor (which
//! stays in cache meanwhile), in parallel over blocks. Undoing decodes only the position
//! stream. An apply that fails (an undecodable block, a value the dtype cannot hold, a level
//! histogram that differs from the stored one) leaves the bytes as they were when it records
//! the overwritten values.

use crate::checkpoint::dtype::FloatType;
use crate::codec::{self, BlockCodec, BlockSpan, CodecError};
use rayon::prelude::*;

/// A compressed tensor's two streams with their checked block layout.
pub struct KeptStreams<'a> {
    codec: BlockCodec,
    spans: Vec<BlockSpan>,
    positions: &'a [u8],
    /// `None` when only undoing (the level stream is not read).
    levels: Option<&'a [u8]>,
}

/// Why a block-wise apply or undo failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ScatterError {
    /// The streams do not decode (or their histogram differs from the stored one).
    Codec(CodecError),
    /// `f32(base) + delta` at element `position` is beyond the dtype's range.
    Overflow {
        /// The element (flattened index into the tensor).
        position: u32,
        /// Its base value.
        base: f32,
        /// The delta added.
        delta: f32,
    },
    /// The buffers do not fit the tensor.
    Size(String),
}

impl From<CodecError> for ScatterError {
    fn from(e: CodecError) -> Self {
        ScatterError::Codec(e)
    }
}

/// Per-thread decode buffers, reused block after block.
#[derive(Default)]
struct Scratch {
    positions: Vec<u32>,
    levels: Vec<u8>,
    /// The positions of the fine-tune a swap leaves.
    from_positions: Vec<u32>,
}

impl<'a> KeptStreams<'a> {
    /// Checks the block table of a tensor of `numel` elements against its histogram and the
    /// stream lengths (`levels` may be left out to undo only).
    pub fn new(
        numel: u64,
        kept_counts: &[u64],
        blocks: &[codec::BlockInfo],
        positions: &'a [u8],
        levels: Option<&'a [u8]>,
    ) -> Result<Self, CodecError> {
        let codec = BlockCodec::new(numel, kept_counts)?;
        let levels_len = match levels {
            Some(l) => l.len() as u64,
            None => blocks.iter().map(|b| u64::from(b.level_bytes)).sum(),
        };
        let spans = codec.layout(blocks, positions.len() as u64, levels_len)?;
        Ok(KeptStreams {
            codec,
            spans,
            positions,
            levels,
        })
    }

    /// All kept entries of the tensor.
    pub fn kept(&self) -> u64 {
        self.codec.total_kept()
    }

    fn stream(all: &[u8], start: u64, len: u32) -> &[u8] {
        &all[start as usize..][..len as usize]
    }

    /// Decodes block `i`'s positions and levels (of the stream `levels`) into `s`.
    fn decode_entries(&self, i: usize, levels: &[u8], s: &mut Scratch) -> Result<(), CodecError> {
        let span = &self.spans[i];
        let kept = span.info.kept as usize;
        s.positions.resize(kept, 0);
        s.levels.resize(kept, 0);
        self.codec.decode_block(
            i,
            &span.info,
            Self::stream(
                self.positions,
                span.position_start,
                span.info.position_bytes,
            ),
            Self::stream(levels, span.level_start, span.info.level_bytes),
            &mut s.positions,
            &mut s.levels,
        )
    }

    /// Decodes block `i`'s positions and levels (of the stream `levels`) into `s`, and in the
    /// same loop the positions of `from`'s block `i` into `s.from_positions`. Returns
    /// `from`'s outcome, then this block's.
    fn decode_entries_beside(
        &self,
        i: usize,
        levels: &[u8],
        from: &KeptStreams<'_>,
        s: &mut Scratch,
    ) -> (Result<(), CodecError>, Result<(), CodecError>) {
        let (span, from_span) = (&self.spans[i], &from.spans[i]);
        s.positions.resize(span.info.kept as usize, 0);
        s.levels.resize(span.info.kept as usize, 0);
        s.from_positions.resize(from_span.info.kept as usize, 0);
        let this = codec::BlockIn {
            info: &span.info,
            positions: Self::stream(
                self.positions,
                span.position_start,
                span.info.position_bytes,
            ),
            levels: Self::stream(levels, span.level_start, span.info.level_bytes),
        };
        let other = codec::OtherPositions {
            codec: &from.codec,
            info: &from_span.info,
            positions: Self::stream(
                from.positions,
                from_span.position_start,
                from_span.info.position_bytes,
            ),
            out: &mut s.from_positions,
        };
        self.codec
            .decode_block_beside(i, this, &mut s.positions, &mut s.levels, other)
    }

    /// Decodes block `i`'s positions only into `s`.
    fn decode_positions(&self, i: usize, s: &mut Scratch) -> Result<(), CodecError> {
        let span = &self.spans[i];
        s.positions.resize(span.info.kept as usize, 0);
        self.codec.decode_block_positions(
            i,
            &span.info,
            Self::stream(
                self.positions,
                span.position_start,
                span.info.position_bytes,
            ),
            &mut s.positions,
        )
    }

    /// The part of a buffer of `size` bytes per kept entry that belongs to block `i`.
    fn entry_range(&self, i: usize, size: usize) -> std::ops::Range<usize> {
        let span = &self.spans[i];
        let start = span.kept_start as usize * size;
        start..start + span.info.kept as usize * size
    }

    /// The tensor's `bytes` (elements of `size` bytes) cut into its blocks, with each block's
    /// index.
    fn blocks_of<'b>(&self, bytes: &'b mut [u8], size: usize) -> Vec<(usize, &'b mut [u8])> {
        let shared = self.codec.numel() as usize * size;
        bytes[..shared]
            .chunks_mut(codec::BLOCK_ELEMENTS as usize * size)
            .enumerate()
            .collect()
    }

    /// Checks that `bytes` holds the tensor's elements (of `size` bytes) and that `old_len`,
    /// when given, is one value per kept entry.
    fn check_sizes(
        &self,
        bytes: &[u8],
        old_len: Option<usize>,
        size: usize,
    ) -> Result<(), ScatterError> {
        let numel = (bytes.len() / size) as u64;
        if numel < self.codec.numel() {
            return Err(ScatterError::Size(format!(
                "the tensor given holds {numel} elements, the file's kept entries need {}",
                self.codec.numel()
            )));
        }
        let want = self.kept() * size as u64;
        match old_len {
            Some(len) if len as u64 != want => Err(ScatterError::Size(format!(
                "{len} bytes of old values given, its {} kept entries need {want}",
                self.kept()
            ))),
            _ => Ok(()),
        }
    }

    /// Adds the kept deltas (`deltas[level]`) to the elements of `bytes` (of type `ty`, at
    /// least the tensor's elements), rounding once to `ty`. With `old` (one value of `ty` per
    /// kept entry), the values overwritten are written there in kept order, and a failure
    /// leaves `bytes` as it was; without, a failure leaves `bytes` partly changed (the caller
    /// discards it).
    pub fn apply(
        &self,
        deltas: &[f32],
        bytes: &mut [u8],
        ty: FloatType,
        mut old: Option<&mut [u8]>,
    ) -> Result<(), ScatterError> {
        let size = ty.size();
        let levels = self
            .levels
            .ok_or_else(|| ScatterError::Size("the level stream was not read".into()))?;
        self.check_sizes(bytes, old.as_deref().map(|o| o.len()), size)?;
        let mut old_parts: Vec<Option<&mut [u8]>> = match old.as_deref_mut() {
            Some(o) => self.split_entries(o, size).into_iter().map(Some).collect(),
            None => self.spans.iter().map(|_| None).collect(),
        };
        let outcomes: Vec<Result<[u64; 256], ScatterError>> = self
            .blocks_of(bytes, size)
            .into_par_iter()
            .zip(old_parts.par_drain(..))
            .map_init(Scratch::default, |s, ((i, chunk), old)| {
                self.decode_entries(i, levels, s)?;
                let first = self.spans[i].element_start as u32;
                add_block(chunk, first, &s.positions, &s.levels, deltas, ty, old)?;
                Ok(histogram(&s.levels))
            })
            .collect();
        let Some(failure) =
            first_failure(&outcomes).or_else(|| self.histogram_failure(outcomes.iter().flatten()))
        else {
            return Ok(());
        };
        if let Some(old) = old {
            // Blocks that failed put themselves back; these decoded once already, so decoding
            // their positions again cannot fail.
            let applied: Vec<bool> = outcomes.iter().map(Result::is_ok).collect();
            let _ = self.put_back(bytes, old, ty, |i| applied[i]);
        }
        Err(failure)
    }

    /// `old` cut into the blocks' parts (`size` bytes per kept entry), in block order.
    fn split_entries<'o>(&self, old: &'o mut [u8], size: usize) -> Vec<&'o mut [u8]> {
        let mut rest = old;
        self.spans
            .iter()
            .map(|span| {
                let (mine, tail) =
                    std::mem::take(&mut rest).split_at_mut(span.info.kept as usize * size);
                rest = tail;
                mine
            })
            .collect()
    }

    /// The stored-histogram check over the blocks' level histograms.
    fn histogram_failure<'h>(
        &self,
        histograms: impl Iterator<Item = &'h [u64; 256]>,
    ) -> Option<ScatterError> {
        let mut total = [0u64; 256];
        for h in histograms {
            total.iter_mut().zip(h).for_each(|(t, c)| *t += c);
        }
        self.codec
            .check_histogram(&total)
            .err()
            .map(ScatterError::from)
    }

    /// Writes the values `old` (what [`KeptStreams::apply`] recorded, `ty`) back at the kept
    /// positions, decoding only the position stream.
    pub fn undo(&self, bytes: &mut [u8], old: &[u8], ty: FloatType) -> Result<(), ScatterError> {
        self.check_sizes(bytes, Some(old.len()), ty.size())?;
        self.put_back(bytes, old, ty, |_| true)
    }

    /// Puts back the old values of the blocks `which` selects, in parallel; the first
    /// undecodable block is the error (the blocks before and after it are put back).
    fn put_back(
        &self,
        bytes: &mut [u8],
        old: &[u8],
        ty: FloatType,
        which: impl Fn(usize) -> bool + Sync,
    ) -> Result<(), ScatterError> {
        let size = ty.size();
        let outcomes: Vec<Result<(), ScatterError>> = self
            .blocks_of(bytes, size)
            .into_par_iter()
            .filter(|(i, _)| which(*i))
            .map_init(Scratch::default, |s, (i, chunk)| {
                self.decode_positions(i, s)?;
                let first = self.spans[i].element_start as usize;
                put_back_block(
                    chunk,
                    first,
                    &s.positions,
                    &old[self.entry_range(i, size)],
                    size,
                );
                Ok(())
            })
            .collect();
        outcomes
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }
}

/// Which file of a swap an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The fine-tune the tensor holds.
    From,
    /// The fine-tune it is switched to.
    To,
}

/// A swap's error, with the file it is about.
pub type SwapError = (Side, ScatterError);

/// One block's swap: where it ended, and its level histogram or error.
type BlockSwap = (BlockState, Result<[u64; 256], SwapError>);

/// Where one block stands during a swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    /// Still the old fine-tune's values.
    From,
    /// The base's values.
    Base,
    /// The new fine-tune's values.
    To,
}

/// The old fine-tune's side of a swap: its streams, the deltas it added and the base values
/// it overwrote (what [`KeptStreams::apply`] recorded).
pub struct Applied<'s, 'a> {
    /// Its streams (levels read: a failed swap applies them again).
    pub streams: &'s KeptStreams<'a>,
    /// Its deltas, one per level.
    pub deltas: &'s [f32],
    /// The base values it overwrote.
    pub old: &'s [u8],
}

impl KeptStreams<'_> {
    /// Switches `bytes`, which hold `from`'s fine-tune of the same tensor, to this one's, block
    /// by block: `from`'s old values are put back, then this tensor's deltas are added while
    /// the block is in cache (one pass over memory instead of two), the overwritten base values
    /// going to `old` (one value of `ty` per kept entry). The result equals
    /// [`KeptStreams::undo`] of `from` followed by [`KeptStreams::apply`]. On failure `bytes`
    /// hold `from`'s fine-tune again.
    pub fn swap(
        &self,
        from: &Applied<'_, '_>,
        deltas: &[f32],
        bytes: &mut [u8],
        ty: FloatType,
        old: &mut [u8],
    ) -> Result<(), SwapError> {
        let size = ty.size();
        let (levels, from_levels) = match (self.levels, from.streams.levels) {
            (Some(l), Some(f)) => (l, f),
            _ => {
                return Err((
                    Side::To,
                    ScatterError::Size("the level streams were not read".into()),
                ))
            }
        };
        if from.streams.codec.numel() != self.codec.numel() {
            return Err((
                Side::From,
                ScatterError::Size(format!(
                    "{} elements, the file it is swapped to has {}",
                    from.streams.codec.numel(),
                    self.codec.numel()
                )),
            ));
        }
        from.streams
            .check_sizes(bytes, Some(from.old.len()), size)
            .map_err(|e| (Side::From, e))?;
        self.check_sizes(bytes, Some(old.len()), size)
            .map_err(|e| (Side::To, e))?;
        let outcomes: Vec<BlockSwap> = self
            .blocks_of(bytes, size)
            .into_par_iter()
            .zip(self.split_entries(old, size))
            .map_init(Scratch::default, |s, ((i, chunk), old)| {
                let first = self.spans[i].element_start;
                let (from_ok, to_ok) = self.decode_entries_beside(i, levels, from.streams, s);
                if let Err(e) = from_ok {
                    return (BlockState::From, Err((Side::From, e.into())));
                }
                let from_old = &from.old[from.streams.entry_range(i, size)];
                put_back_block(chunk, first as usize, &s.from_positions, from_old, size);
                if let Err(e) = to_ok {
                    return (BlockState::Base, Err((Side::To, e.into())));
                }
                match add_block(
                    chunk,
                    first as u32,
                    &s.positions,
                    &s.levels,
                    deltas,
                    ty,
                    Some(old),
                ) {
                    Ok(()) => (BlockState::To, Ok(histogram(&s.levels))),
                    Err(e) => (BlockState::Base, Err((Side::To, e))),
                }
            })
            .collect();
        let failure = outcomes
            .iter()
            .find_map(|(_, r)| r.as_ref().err().cloned())
            .or_else(|| {
                let histograms = outcomes.iter().filter_map(|(_, r)| r.as_ref().ok());
                self.histogram_failure(histograms).map(|e| (Side::To, e))
            });
        let Some(failure) = failure else {
            return Ok(());
        };
        let states: Vec<BlockState> = outcomes.iter().map(|(state, _)| *state).collect();
        self.back_to(from, from_levels, &states, bytes, ty, old);
        Err(failure)
    }

    /// After a failed swap, brings every block back to `from`'s fine-tune: blocks at this
    /// tensor's values get the base back, then blocks at the base get `from`'s deltas again
    /// (the same values as before: `from` was applied to this base already).
    fn back_to(
        &self,
        from: &Applied<'_, '_>,
        from_levels: &[u8],
        states: &[BlockState],
        bytes: &mut [u8],
        ty: FloatType,
        old: &[u8],
    ) {
        let size = ty.size();
        // Every block below decoded once already: decoding it again cannot fail.
        let _ = self.put_back(bytes, old, ty, |i| states[i] == BlockState::To);
        self.blocks_of(bytes, size)
            .into_par_iter()
            .filter(|(i, _)| states[*i] != BlockState::From)
            .for_each_init(Scratch::default, |s, (i, chunk)| {
                if from.streams.decode_entries(i, from_levels, s).is_ok() {
                    let first = from.streams.spans[i].element_start as u32;
                    let _ = add_block(chunk, first, &s.positions, &s.levels, from.deltas, ty, None);
                }
            });
    }
}

/// The first failure among the blocks' outcomes, in block order.
fn first_failure<T>(outcomes: &[Result<T, ScatterError>]) -> Option<ScatterError> {
    outcomes.iter().find_map(|o| o.as_ref().err().cloned())
}

/// The histogram of a block's levels.
fn histogram(levels: &[u8]) -> [u64; 256] {
    let mut h = [0u64; 256];
    for &l in levels {
        h[usize::from(l)] += 1;
    }
    h
}

/// Adds the deltas of one block's kept entries (`positions` absolute, `first` the block's
/// first element) to its elements `chunk`, recording the overwritten values in `old` if given.
/// On overflow the block is put back as it was (when recorded) and the error names the entry.
fn add_block(
    chunk: &mut [u8],
    first: u32,
    positions: &[u32],
    levels: &[u8],
    deltas: &[f32],
    ty: FloatType,
    mut old: Option<&mut [u8]>,
) -> Result<(), ScatterError> {
    let size = ty.size();
    let mut table = [0f32; 256];
    table[..deltas.len()].copy_from_slice(deltas);
    for (k, (&p, &level)) in positions.iter().zip(levels).enumerate() {
        if let Some(&ahead) = positions.get(k + PREFETCH_AHEAD) {
            prefetch(chunk, (ahead - first) as usize * size);
        }
        let at = (p - first) as usize;
        let (base, delta) = (ty.load(chunk, at), table[usize::from(level)]);
        let restored = base + delta;
        if !ty.holds(restored) {
            if let Some(old) = old {
                put_back_block(
                    chunk,
                    first as usize,
                    &positions[..k],
                    &old[..k * size],
                    size,
                );
            }
            return Err(ScatterError::Overflow {
                position: p,
                base,
                delta,
            });
        }
        if let Some(old) = old.as_deref_mut() {
            copy_value(&mut old[k * size..], &chunk[at * size..], size);
        }
        ty.store(chunk, at, restored);
    }
    Ok(())
}

/// How many kept entries ahead of the one being added its element is prefetched: the kept
/// entries are a few dozen bytes apart, too sparse for the hardware prefetcher, and each
/// element load would otherwise wait for memory.
const PREFETCH_AHEAD: usize = 32;

/// Asks the CPU to bring the cache line of `bytes[at]` in (a hint: no effect on results).
#[inline(always)]
fn prefetch(bytes: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(b) = bytes.get(at) {
        // SAFETY: a prefetch reads nothing architecturally visible and cannot fault; the
        // address is in bounds anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (b as *const u8).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at);
}

/// Writes the values `old` (`size` bytes each) back at `positions` (absolute; `first` is the
/// block's first element) in the block's elements `chunk`.
fn put_back_block(chunk: &mut [u8], first: usize, positions: &[u32], old: &[u8], size: usize) {
    for (k, (&p, value)) in positions.iter().zip(old.chunks_exact(size)).enumerate() {
        if let Some(&ahead) = positions.get(k + PREFETCH_AHEAD) {
            prefetch(chunk, (ahead as usize - first) * size);
        }
        let at = p as usize - first;
        copy_value(&mut chunk[at * size..], value, size);
    }
}

/// Copies the first value (`size` bytes: 2 or 4) of `src` to the front of `dst`: with the
/// size a constant in each arm, a single move instead of a call to `memmove`.
#[inline(always)]
fn copy_value(dst: &mut [u8], src: &[u8], size: usize) {
    match size {
        2 => dst[..2].copy_from_slice(&src[..2]),
        4 => dst[..4].copy_from_slice(&src[..4]),
        _ => dst[..size].copy_from_slice(&src[..size]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::mix64;

    /// A tensor of 3.5 blocks with ~5 % kept entries and 16 levels: its base bytes (`ty`),
    /// kept positions, levels, histogram and encoded streams.
    struct Case {
        numel: u64,
        base: Vec<u8>,
        positions: Vec<u32>,
        levels: Vec<u8>,
        counts: Vec<u64>,
        enc: codec::EncodedTensor,
        deltas: Vec<f32>,
    }

    fn case(ty: FloatType) -> Case {
        fine_tune(ty, 0xABCD)
    }

    /// A fine-tune of the same base as [`case`]'s, its kept entries drawn with `seed`.
    fn fine_tune(ty: FloatType, seed: u64) -> Case {
        let numel = 7 * codec::BLOCK_ELEMENTS / 2;
        let values: Vec<f32> = (0..numel)
            .map(|i| ((mix64(i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
            .collect();
        let mut base = Vec::new();
        ty.encode_into(&values, &mut base);
        let positions: Vec<u32> = (0..numel as u32)
            .filter(|&i| mix64(u64::from(i) ^ seed) % 20 == 0)
            .collect();
        let levels: Vec<u8> = positions
            .iter()
            .map(|&p| (mix64(u64::from(p) ^ seed ^ 7) % 16) as u8)
            .collect();
        let mut counts = vec![0u64; 16];
        levels.iter().for_each(|&l| counts[usize::from(l)] += 1);
        let enc = codec::encode_tensor(numel, &positions, &levels, &counts).unwrap();
        let deltas = (0..16).map(|l| (l as f32 - 7.5) * 1e-3).collect();
        Case {
            numel,
            base,
            positions,
            levels,
            counts,
            enc,
            deltas,
        }
    }

    impl Case {
        fn streams(&self) -> KeptStreams<'_> {
            let e = &self.enc;
            KeptStreams::new(
                self.numel,
                &self.counts,
                &e.blocks,
                &e.positions,
                Some(&e.levels),
            )
            .unwrap()
        }

        /// The applied bytes computed entry by entry, and the values overwritten.
        fn by_hand(&self, ty: FloatType) -> (Vec<u8>, Vec<u8>) {
            let (mut want, mut old) = (self.base.clone(), Vec::new());
            let size = ty.size();
            for (&p, &l) in self.positions.iter().zip(&self.levels) {
                let p = p as usize;
                old.extend_from_slice(&self.base[p * size..(p + 1) * size]);
                let v = ty.load(&self.base, p) + self.deltas[usize::from(l)];
                ty.store(&mut want, p, v);
            }
            (want, old)
        }
    }

    #[test]
    fn a_multi_block_apply_equals_the_entry_by_entry_add_and_undo_restores_the_base() {
        for ty in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let c = case(ty);
            let (want, want_old) = c.by_hand(ty);
            let s = c.streams();
            let mut bytes = c.base.clone();
            let mut old = vec![0u8; c.positions.len() * ty.size()];
            s.apply(&c.deltas, &mut bytes, ty, Some(&mut old)).unwrap();
            assert!(bytes == want, "{ty:?}: applied bytes differ");
            assert!(old == want_old, "{ty:?}: recorded old values differ");
            s.undo(&mut bytes, &old, ty).unwrap();
            assert!(bytes == c.base, "{ty:?}: undo differs from the base");
            let mut unrecorded = c.base.clone();
            s.apply(&c.deltas, &mut unrecorded, ty, None).unwrap();
            assert!(unrecorded == want, "{ty:?}: apply without a record differs");
        }
    }

    /// Applies `c` recording the old values; the apply must fail and leave the base as it
    /// was. Returns the error.
    fn failed_apply(c: &Case, ty: FloatType) -> ScatterError {
        let mut bytes = c.base.clone();
        let mut old = vec![0u8; c.positions.len() * ty.size()];
        let err = c
            .streams()
            .apply(&c.deltas, &mut bytes, ty, Some(&mut old))
            .unwrap_err();
        assert!(bytes == c.base, "a failed apply changed the tensor");
        err
    }

    #[test]
    fn an_overflow_in_the_last_block_leaves_every_block_as_it_was() {
        let ty = FloatType::BF16;
        let mut c = case(ty);
        let (&last, &level) = c.positions.iter().zip(&c.levels).next_back().unwrap();
        let delta = c.deltas[usize::from(level)];
        ty.store(&mut c.base, last as usize, ty.max_finite().copysign(delta));
        // Deltas of 5e36..7.5e37: every other entry fits bf16, the last overflows.
        c.deltas
            .iter_mut()
            .for_each(|d| *d = (f64::from(*d) * 1e40) as f32);
        let err = failed_apply(&c, ty);
        assert!(
            matches!(err, ScatterError::Overflow { position, .. } if position == last),
            "{err:?}"
        );
    }

    #[test]
    fn a_corrupt_level_stream_in_the_last_block_leaves_every_block_as_it_was() {
        let ty = FloatType::BF16;
        let mut c = case(ty);
        // Flip bits in the last block's level stream (the histogram check or the stream's own
        // checks refuse it, after the first blocks were applied).
        let last_start = c.enc.levels.len() - c.enc.blocks.last().unwrap().level_bytes as usize;
        for at in [last_start + 9, last_start + 40] {
            c.enc.levels[at] ^= 0x10;
        }
        let err = failed_apply(&c, ty);
        assert!(matches!(err, ScatterError::Codec(_)), "{err:?}");
    }

    #[test]
    fn wrong_sizes_are_refused_before_anything_changes() {
        let ty = FloatType::BF16;
        let c = case(ty);
        let s = c.streams();
        let mut short = c.base[..c.base.len() - 2].to_vec();
        let err = s.apply(&c.deltas, &mut short, ty, None).unwrap_err();
        assert!(
            matches!(&err, ScatterError::Size(m) if m.contains("elements")),
            "{err:?}"
        );
        let mut bytes = c.base.clone();
        let err = s.undo(&mut bytes, &[0u8; 6], ty).unwrap_err();
        assert!(
            matches!(&err, ScatterError::Size(m) if m.contains("old values")),
            "{err:?}"
        );
        assert!(bytes == c.base);
    }

    /// `a` applied to the base, then swapped to `b`: the bytes and the record of the swap (or
    /// its error), and `a`'s applied bytes.
    fn swap_case(a: &Case, b: &Case) -> (Vec<u8>, Result<Vec<u8>, SwapError>, Vec<u8>) {
        let ty = FloatType::BF16;
        let (sa, sb) = (a.streams(), b.streams());
        let mut bytes = a.base.clone();
        let mut a_old = vec![0u8; a.positions.len() * 2];
        sa.apply(&a.deltas, &mut bytes, ty, Some(&mut a_old))
            .unwrap();
        let a_applied = bytes.clone();
        let from = Applied {
            streams: &sa,
            deltas: &a.deltas,
            old: &a_old,
        };
        let mut b_old = vec![0u8; b.positions.len() * 2];
        let r = sb.swap(&from, &b.deltas, &mut bytes, ty, &mut b_old);
        (bytes, r.map(|()| b_old), a_applied)
    }

    #[test]
    fn a_swap_gives_the_second_fine_tune_and_its_record() {
        let ty = FloatType::BF16;
        let (a, b) = (fine_tune(ty, 1), fine_tune(ty, 2));
        let (bytes, record, _) = swap_case(&a, &b);
        let (want, want_old) = b.by_hand(ty);
        assert!(
            bytes == want,
            "swapped bytes differ from b applied to the base"
        );
        assert!(
            record.unwrap() == want_old,
            "the record differs from b's base values"
        );
    }

    #[test]
    fn a_swap_that_fails_in_the_last_block_leaves_the_first_fine_tune() {
        let ty = FloatType::BF16;
        let a = fine_tune(ty, 1);
        // b overflows at its last entry (a's base there is made the largest finite value).
        let mut b = fine_tune(ty, 2);
        let (&last, &level) = b.positions.iter().zip(&b.levels).next_back().unwrap();
        let sign = b.deltas[usize::from(level)];
        b.deltas
            .iter_mut()
            .for_each(|d| *d = (f64::from(*d) * 1e40) as f32);
        let mut a = a;
        // (a does not keep that element, so a applies fine.)
        assert!(a.positions.binary_search(&last).is_err());
        ty.store(&mut a.base, last as usize, ty.max_finite().copysign(sign));
        b.base = a.base.clone();
        let (bytes, record, a_applied) = swap_case(&a, &b);
        assert!(
            matches!(record, Err((Side::To, ScatterError::Overflow { position, .. })) if position == last)
        );
        assert!(
            bytes == a_applied,
            "a failed swap did not leave a's fine-tune"
        );
        // b's level stream corrupt in its last block.
        let mut b = fine_tune(ty, 2);
        let last_start = b.enc.levels.len() - b.enc.blocks.last().unwrap().level_bytes as usize;
        for at in [last_start + 9, last_start + 40] {
            b.enc.levels[at] ^= 0x10;
        }
        let (bytes, record, a_applied) = swap_case(&fine_tune(ty, 1), &b);
        assert!(
            matches!(record, Err((Side::To, ScatterError::Codec(_)))),
            "{record:?}"
        );
        assert!(
            bytes == a_applied,
            "a failed swap did not leave a's fine-tune"
        );
    }
}
