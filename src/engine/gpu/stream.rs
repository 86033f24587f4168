//! Pass 1 of `compress` on the device as a stream of tensors: what
//! [`Engine::start_analysis`](crate::engine::Engine::start_analysis) submits (the exact
//! min/max, [`Kernel::MinMax`]) and what `finish_analysis` reads back.
//!
//! - Uploads go through the upload ring (`staging.rs`) at the inputs' own element sizes
//!   (2-byte words for f16 and bf16, unpacked by the kernel), into device buffers of those
//!   sizes: no 4-byte widening, and no staging allocation per upload.
//! - Each tensor's last submission copies its statistics into its own small readback buffer,
//!   so the next tensor can be uploaded and submitted before the host maps this one's: one
//!   map, one blocking wait per tensor ([`TENSORS_IN_FLIGHT`] tensors at most in flight).
//! - Every buffer comes from the pool, planned from `--gpu-mem` by [`StreamLayout::plan`].

use super::constants::{stat, Params, TILE_ELEMENTS};
use super::device::le_words;
use super::kernels::Kernel;
use super::pool::{Slot, PARAMS_BYTES, STATS_BYTES};
use super::staging::{write_padded, UploadRing, RING_ENTRIES};
use super::{chunk_ranges, GpuEngine};
use crate::engine::{DeltaInput, EngineError};

/// Tensors whose statistics can be in flight at once (one readback buffer each): the one the
/// host waits for and the next one.
pub const TENSORS_IN_FLIGHT: usize = 2;

/// Buffer sizes of the stream for one pair of input element sizes under one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    /// Bytes per element of the base and of the fine-tuned input.
    pub sizes: (usize, usize),
    /// Elements per chunk (a multiple of [`TILE_ELEMENTS`], so chunks start on a word).
    pub chunk: usize,
}

impl StreamLayout {
    /// The largest chunk whose buffers fit in `budget` bytes: per element, the two device
    /// inputs and [`RING_ENTRIES`] staging copies of them, at their element sizes; at most one
    /// storage binding (`max_binding` bytes) per input, and at most `chunk_override` elements.
    pub fn plan(
        budget: u64,
        sizes: (usize, usize),
        max_binding: u64,
        chunk_override: Option<usize>,
    ) -> Result<StreamLayout, String> {
        let fixed = PARAMS_BYTES + STATS_BYTES * (1 + TENSORS_IN_FLIGHT as u64);
        let per_element = ((sizes.0 + sizes.1) * (1 + RING_ENTRIES)) as u64;
        let by_budget = budget.saturating_sub(fixed) / per_element;
        let by_binding = max_binding / sizes.0.max(sizes.1) as u64;
        let mut chunk = by_budget.min(by_binding) as usize;
        if let Some(c) = chunk_override {
            chunk = chunk.min(c.max(1).next_multiple_of(TILE_ELEMENTS));
        }
        chunk = chunk / TILE_ELEMENTS * TILE_ELEMENTS;
        if chunk == 0 {
            return Err(format!(
                "--gpu-mem {budget} bytes is too small to stream {}- and {}-byte inputs: at least {} bytes are needed",
                sizes.0,
                sizes.1,
                fixed + per_element * TILE_ELEMENTS as u64
            ));
        }
        let layout = StreamLayout { sizes, chunk };
        debug_assert!(layout.total_bytes() <= budget);
        Ok(layout)
    }

    /// Offset of the fine-tuned bytes in a staging buffer (the base's come first).
    fn ft_offset(&self) -> usize {
        self.chunk * self.sizes.0
    }

    /// Size of the buffer in `slot`.
    fn size(&self, slot: Slot) -> u64 {
        let chunk = self.chunk as u64;
        match slot {
            Slot::InA => chunk * self.sizes.0 as u64,
            Slot::InB => chunk * self.sizes.1 as u64,
            Slot::Staging(_) => chunk * (self.sizes.0 + self.sizes.1) as u64,
            Slot::Params => PARAMS_BYTES,
            _ => STATS_BYTES,
        }
    }

    /// Every slot of the stream.
    fn slots() -> Vec<Slot> {
        let mut slots = vec![Slot::InA, Slot::InB, Slot::Params, Slot::Stats];
        slots.extend((0..RING_ENTRIES).map(Slot::Staging));
        slots.extend((0..TENSORS_IN_FLIGHT).map(Slot::StatsReadback));
        slots
    }

    /// Bytes of all the stream's buffers.
    pub fn total_bytes(&self) -> u64 {
        Self::slots().into_iter().map(|s| self.size(s)).sum()
    }
}

/// The stream's buffers and the tensors in flight.
pub(super) struct Stream {
    layout: StreamLayout,
    ring: UploadRing,
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    uniform: wgpu::Buffer,
    stats: wgpu::Buffer,
    readbacks: Vec<wgpu::Buffer>,
    /// Per readback buffer: the ticket whose statistics it receives, and its last submission.
    in_flight: Vec<Option<(u64, wgpu::SubmissionIndex)>>,
}

impl GpuEngine {
    /// The stream for `input`'s element sizes, its buffers taken from the pool (any other
    /// buffers are released first).
    fn stream_for(&mut self, input: &DeltaInput) -> Result<Stream, EngineError> {
        let sizes = (input.base_type.size(), input.finetuned_type.size());
        let layout = StreamLayout::plan(
            self.options.gpu_mem,
            sizes,
            self.gpu.max_binding,
            self.options.chunk_elements,
        )
        .map_err(EngineError::Gpu)?;
        if let Some(s) = self.stream.take() {
            if s.layout == layout {
                return Ok(s);
            }
        }
        self.release_buffers();
        let mut get = |slot| self.pool.get(slot, layout.size(slot));
        let ring = (0..RING_ENTRIES).map(|i| get(Slot::Staging(i)));
        let ring = UploadRing::new(ring.collect::<Result<_, _>>()?);
        let readbacks = (0..TENSORS_IN_FLIGHT).map(|i| get(Slot::StatsReadback(i)));
        let readbacks = readbacks.collect::<Result<_, _>>()?;
        Ok(Stream {
            layout,
            ring,
            a: get(Slot::InA)?,
            b: get(Slot::InB)?,
            uniform: get(Slot::Params)?,
            stats: get(Slot::Stats)?,
            readbacks,
            in_flight: vec![None; TENSORS_IN_FLIGHT],
        })
    }

    /// Uploads `input` chunk by chunk and submits its min/max; returns the ticket number whose
    /// statistics [`streamed_stats`](Self::streamed_stats) reads.
    pub(super) fn submit_min_max(&mut self, input: &DeltaInput) -> Result<u64, EngineError> {
        let mut stream = self.stream_for(input)?;
        // Numbers are never reused, even across streams: a ticket whose stream was replaced
        // is not mistaken for a later one.
        let ticket = self.tickets;
        self.tickets += 1;
        let r = self.submit_with(&mut stream, input, ticket);
        match r {
            Ok(()) => self.stream = Some(stream),
            Err(_) => self.release_buffers(),
        }
        r.map(|()| ticket)
    }

    fn submit_with(
        &self,
        s: &mut Stream,
        input: &DeltaInput,
        ticket: u64,
    ) -> Result<(), EngineError> {
        let r = (ticket % TENSORS_IN_FLIGHT as u64) as usize;
        if s.in_flight[r].is_some() {
            return Err(EngineError::Inconsistent(format!(
                "more than {TENSORS_IN_FLIGHT} analyses in flight"
            )));
        }
        let mut init = [0u32; stat::WORDS];
        init[stat::MIN] = u32::MAX;
        init[stat::BAD] = u32::MAX;
        self.write_words(&s.stats, &init);
        let chunks = chunk_ranges(input.numel(), s.layout.chunk);
        for (k, &range) in chunks.iter().enumerate() {
            let (entry, staging) = s.ring.acquire(&self.gpu)?;
            let lens = self.fill_staging(&staging, &s.layout, input, range)?;
            staging.unmap();
            self.write_params(
                &s.uniform,
                &Params {
                    n: range.1 as u32,
                    start: range.0 as u32,
                    ..Self::base_params(input)
                },
            );
            let mut enc = self.encoder();
            enc.copy_buffer_to_buffer(&staging, 0, &s.a, 0, lens.0);
            enc.copy_buffer_to_buffer(&staging, s.layout.ft_offset() as u64, &s.b, 0, lens.1);
            let buffers = [&s.uniform, &s.a, &s.b, &s.stats];
            self.pass(
                &mut enc,
                Kernel::MinMax,
                &buffers,
                self.stride_groups(range.1),
            );
            let last = k + 1 == chunks.len();
            if last {
                enc.copy_buffer_to_buffer(&s.stats, 0, &s.readbacks[r], 0, STATS_BYTES);
            }
            let index = self.submit(enc);
            s.ring.release(entry, index.clone());
            if last {
                if s.in_flight.iter().any(Option::is_some) {
                    self.gpu.count_overlap();
                }
                s.in_flight[r] = Some((ticket, index));
            }
        }
        Ok(())
    }

    /// Writes elements `start .. start + len` of both inputs into the mapped `staging` buffer
    /// (base at 0, fine-tuned at the layout's offset); returns the bytes to copy of each.
    fn fill_staging(
        &self,
        staging: &wgpu::Buffer,
        layout: &StreamLayout,
        input: &DeltaInput,
        (start, len): (usize, usize),
    ) -> Result<(u64, u64), EngineError> {
        let (bs, fs) = layout.sizes;
        let mut view = staging
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| EngineError::Gpu(format!("writing an upload buffer: {e}")))?;
        let a = write_padded(&mut view, 0, &input.base[start * bs..(start + len) * bs]);
        let b = write_padded(
            &mut view,
            layout.ft_offset(),
            &input.finetuned[start * fs..(start + len) * fs],
        );
        self.gpu.count_upload((a + b) as u64);
        Ok((a as u64, b as u64))
    }

    /// The statistics words of ticket `ticket` (one map, one blocking wait for its last
    /// submission only); `None` when the stream no longer holds them (its buffers were
    /// released in between).
    pub(super) fn streamed_stats(&mut self, ticket: u64) -> Result<Option<Vec<u32>>, EngineError> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(None);
        };
        let r = (ticket % TENSORS_IN_FLIGHT as u64) as usize;
        let index = match s.in_flight[r].take() {
            Some((t, index)) if t == ticket => index,
            other => {
                s.in_flight[r] = other;
                return Ok(None);
            }
        };
        let bytes = self
            .gpu
            .map_read(&s.readbacks[r], STATS_BYTES, Some(index))?;
        Ok(Some(le_words(&bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_layouts_fit_the_budget_and_follow_the_element_sizes() {
        let binding = 128 << 20;
        for budget in [64u64 << 10, 1 << 20, 64 << 20, 1 << 30, 24 << 30] {
            for sizes in [(2, 2), (2, 4), (4, 4)] {
                match StreamLayout::plan(budget, sizes, binding, None) {
                    Ok(l) => {
                        assert!(l.total_bytes() <= budget, "{budget} {l:?}");
                        assert!(l.chunk % TILE_ELEMENTS == 0 && l.chunk > 0);
                        let widest = sizes.0.max(sizes.1);
                        assert!((l.chunk * widest) as u64 <= binding);
                    }
                    Err(e) => assert!(budget < 1 << 20, "{budget}: {e}"),
                }
            }
        }
        // 1 GiB: 2-byte inputs take half the bytes of 4-byte ones, so twice the elements fit
        // in one binding (a 7B MLP matrix, 45M elements, in one chunk).
        let f16 = StreamLayout::plan(1 << 30, (2, 2), binding, None).unwrap();
        let f32 = StreamLayout::plan(1 << 30, (4, 4), binding, None).unwrap();
        assert_eq!(f16.chunk, 64 << 20);
        assert_eq!(f32.chunk, 32 << 20);
        assert_eq!(f16.size(Slot::InA), 128 << 20);
        assert_eq!(f16.size(Slot::Staging(1)), 256 << 20);
        assert_eq!(f16.ft_offset(), 128 << 20);
        // A small budget: (2 + 2) * 3 bytes per element.
        let small = StreamLayout::plan(12 << 20, (2, 2), binding, None).unwrap();
        assert_eq!(small.chunk, 1023 * TILE_ELEMENTS);
        assert_eq!(
            StreamLayout::plan(1 << 30, (2, 2), binding, Some(5000))
                .unwrap()
                .chunk,
            5 * TILE_ELEMENTS
        );
    }
}
