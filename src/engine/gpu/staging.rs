//! The upload ring: a few persistently allocated `MAP_WRITE | COPY_SRC` buffers that the host
//! writes its input bytes into while they are mapped, and that the device copies from.
//!
//! Unlike `Queue::write_buffer` (a fresh staging allocation for every call on native wgpu),
//! the ring's memory is allocated once and accounted in the pool (`--gpu-mem`). An entry is
//! handed out mapped ([`UploadRing::acquire`]); after the submission that copies from it, it is
//! mapped again asynchronously ([`UploadRing::release`]), and it is ready once that submission
//! is done. With two entries, the host fills one while the device copies from the other.

use super::device::Gpu;
use crate::engine::EngineError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Entries of the ring: one being filled while the other's copy runs.
pub const RING_ENTRIES: usize = 2;

/// One ring entry: its buffer, whether it is mapped now, and the submission that last read it.
struct Entry {
    buffer: wgpu::Buffer,
    mapped: Arc<AtomicBool>,
    last_use: Option<wgpu::SubmissionIndex>,
}

/// The ring of staging buffers (entries used in turn).
pub struct UploadRing {
    entries: Vec<Entry>,
    next: usize,
}

/// Bytes one task copies into a staging buffer.
const COPY_PIECE: usize = 64 << 10;

/// Copies `bytes` into `view` at `offset` and zero-fills up to the next multiple of 4 (copies
/// between buffers move whole words); returns the padded length. The copy runs on all cores
/// (rayon), in pieces of [`COPY_PIECE`] bytes.
pub fn write_padded(view: &mut wgpu::BufferViewMut, offset: usize, bytes: &[u8]) -> usize {
    use rayon::prelude::*;
    let padded = bytes.len().next_multiple_of(4);
    let (data, mut pad) = view.slice(offset..offset + padded).split_at(bytes.len());
    let (pieces, mut rest) = data.into_chunks::<COPY_PIECE>();
    let (whole, tail) = bytes.split_at(bytes.len() / COPY_PIECE * COPY_PIECE);
    let pieces: Vec<_> = pieces.into_iter().collect();
    pieces
        .into_par_iter()
        .zip(whole.par_chunks_exact(COPY_PIECE))
        .for_each(|(piece, src)| wgpu::WriteOnly::<[u8]>::from(piece).copy_from_slice(src));
    rest.copy_from_slice(tail);
    pad.fill(0);
    padded
}

impl UploadRing {
    /// A ring over `buffers`, each created mapped (`Slot::Staging` of the pool).
    pub fn new(buffers: Vec<wgpu::Buffer>) -> Self {
        let entries = buffers
            .into_iter()
            .map(|buffer| Entry {
                buffer,
                mapped: Arc::new(AtomicBool::new(true)),
                last_use: None,
            })
            .collect();
        UploadRing { entries, next: 0 }
    }

    /// The next entry's buffer, mapped for writing: waits (one blocking wait) for the
    /// submission that last copied from it when its mapping is not back yet.
    pub fn acquire(&mut self, gpu: &Gpu) -> Result<(usize, wgpu::Buffer), EngineError> {
        let i = self.next;
        self.next = (i + 1) % self.entries.len();
        let e = &mut self.entries[i];
        if !e.mapped.load(Ordering::Acquire) {
            if let Some(index) = e.last_use.take() {
                gpu.wait_for(index)?;
            }
            if !e.mapped.load(Ordering::Acquire) {
                return Err(EngineError::Gpu(
                    "an upload staging buffer could not be mapped again".into(),
                ));
            }
        }
        Ok((i, e.buffer.clone()))
    }

    /// Entry `i` was unmapped and copied from by submission `index`: maps it again once that
    /// submission is done.
    pub fn release(&mut self, i: usize, index: wgpu::SubmissionIndex) {
        let e = &mut self.entries[i];
        e.mapped.store(false, Ordering::Release);
        e.last_use = Some(index);
        let flag = e.mapped.clone();
        e.buffer
            .slice(..)
            .map_async(wgpu::MapMode::Write, move |r| {
                flag.store(r.is_ok(), Ordering::Release)
            });
    }
}
