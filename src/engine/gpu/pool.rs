//! Bounded device memory: a layout of buffer sizes planned from `--gpu-mem` (this one for the
//! library's `analyze` and `select`; `compress`'s pass 1 plans its own, `stream.rs`), and a
//! pool that creates those buffers lazily, reuses them tensor after tensor, and accounts for
//! every byte of live device buffers, upload staging included (creating one past the budget is
//! refused).

use super::constants::{stat, Params, BUCKETS, TABLE_WORDS, TILE_ELEMENTS};
use crate::engine::EngineError;
use std::collections::HashMap;

/// Size of the uniform buffer (`Params`, rounded up to 256 bytes).
pub const PARAMS_BYTES: u64 = std::mem::size_of::<Params>().next_multiple_of(256) as u64;
/// Size of the stats buffer.
pub const STATS_BYTES: u64 = (stat::WORDS * 4) as u64;
/// Size of the table buffer.
const TABLE_BYTES: u64 = (TABLE_WORDS * 4) as u64;
/// Smallest and largest readback (map-read staging) buffer.
const READBACK_MIN: u64 = 4 << 10;
const READBACK_MAX: u64 = 16 << 20;

/// The pooled buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Base words of a chunk; reused for candidates (pass B) and kept positions (pass C).
    InA,
    /// Fine-tuned words of a chunk; reused for the kept levels (pass C).
    InB,
    /// Packed levels of chunk `i` (resident) or of the current chunk (spilled to the host).
    Levels(usize),
    /// Per-level key-bucket histogram (also the level histogram of analyze).
    BucketHist,
    /// Kept entries per tile, then their exclusive scan.
    Tiles,
    /// Cut buckets and thresholds per level.
    Table,
    /// The uniform `Params`.
    Params,
    /// Min/max, first non-finite index, flags and counters.
    Stats,
    /// Map-read staging for every readback.
    Readback,
    /// Upload ring entry `i` (`staging.rs`): mapped, written by the host, copied to InA/InB.
    Staging(usize),
    /// Map-read buffer `i` of the streamed statistics (`stream.rs`), one per tensor in flight.
    StatsReadback(usize),
}

impl Slot {
    fn usage(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            Slot::Params => U::UNIFORM | U::COPY_DST,
            Slot::Readback | Slot::StatsReadback(_) => U::MAP_READ | U::COPY_DST,
            Slot::Staging(_) => U::MAP_WRITE | U::COPY_SRC,
            Slot::Tiles => U::STORAGE,
            _ => U::STORAGE | U::COPY_DST | U::COPY_SRC,
        }
    }
}

/// Buffer sizes for one bit width under one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bit width the bucket histogram is sized for.
    pub bits: u32,
    /// Elements per chunk (a multiple of [`TILE_ELEMENTS`]).
    pub chunk: usize,
    /// How many chunks' levels can stay on the device at once.
    pub level_slots: usize,
    /// Bytes of the readback buffer.
    pub readback: u64,
}

impl Layout {
    /// Plans the buffers for `bits` within `budget` bytes, with chunks of at most
    /// `max_binding_elements` (one storage binding of u32 words) or `chunk_override` elements.
    ///
    /// Fixed buffers come first (uniform, stats, table, bucket histogram, readback); half of
    /// the rest goes to the two input buffers, the tile counts and one level slot per chunk
    /// element, and whatever remains holds the levels of further chunks.
    pub fn plan(
        budget: u64,
        bits: u32,
        max_binding_elements: usize,
        chunk_override: Option<usize>,
    ) -> Result<Layout, String> {
        let fixed = PARAMS_BYTES + STATS_BYTES + TABLE_BYTES + bucket_hist_bytes(bits);
        let too_small = || {
            format!(
                "--gpu-mem {budget} bytes is too small for {bits}-bit tensors: at least {} bytes are needed",
                fixed + READBACK_MIN + 2 * Self::chunk_bytes(TILE_ELEMENTS)
            )
        };
        let avail = budget.checked_sub(fixed).ok_or_else(too_small)?;
        let readback = (avail / 16).clamp(READBACK_MIN, READBACK_MAX) / 8 * 8;
        let rest = avail.checked_sub(readback).ok_or_else(too_small)?;
        // Bytes per chunk element: two 4-byte input words, one level byte, tile counts.
        let by_budget = (rest / 2) as f64 / (9.0 + 4.0 / TILE_ELEMENTS as f64);
        let mut chunk = (by_budget as usize).min(max_binding_elements);
        if let Some(c) = chunk_override {
            chunk = chunk.min(c.max(1).next_multiple_of(TILE_ELEMENTS));
        }
        chunk = chunk / TILE_ELEMENTS * TILE_ELEMENTS;
        if chunk == 0 {
            return Err(too_small());
        }
        let level_slots =
            ((rest - (Self::chunk_bytes(chunk) - chunk as u64)) / chunk as u64) as usize;
        debug_assert!(level_slots >= 1);
        let layout = Layout {
            bits,
            chunk,
            level_slots,
            readback,
        };
        debug_assert!(layout.total_bytes() <= budget);
        Ok(layout)
    }

    /// Bytes of the chunk-sized buffers with one level slot: inputs, levels, tile counts.
    fn chunk_bytes(chunk: usize) -> u64 {
        (chunk as u64) * 9 + Self::tile_bytes(chunk)
    }

    fn tile_bytes(chunk: usize) -> u64 {
        (chunk.div_ceil(TILE_ELEMENTS) as u64 * 4).max(4)
    }

    /// Size of the buffer in `slot`.
    pub fn size(&self, slot: Slot) -> u64 {
        match slot {
            Slot::InA | Slot::InB => self.chunk as u64 * 4,
            Slot::Levels(_) => self.chunk as u64,
            Slot::BucketHist => bucket_hist_bytes(self.bits),
            Slot::Tiles => Self::tile_bytes(self.chunk),
            Slot::Table => TABLE_BYTES,
            Slot::Params => PARAMS_BYTES,
            Slot::Stats => STATS_BYTES,
            Slot::Readback => self.readback,
            // The stream's own slots (`stream.rs` sizes them): not part of this layout.
            Slot::Staging(_) | Slot::StatsReadback(_) => 0,
        }
    }

    /// Bytes of every buffer of the layout, all level slots included.
    pub fn total_bytes(&self) -> u64 {
        let fixed = [
            Slot::InA,
            Slot::InB,
            Slot::BucketHist,
            Slot::Tiles,
            Slot::Table,
            Slot::Params,
            Slot::Stats,
            Slot::Readback,
        ];
        fixed.iter().map(|&s| self.size(s)).sum::<u64>()
            + self.level_slots as u64 * self.chunk as u64
    }
}

/// Bytes of the per-level key-bucket histogram for `bits`.
fn bucket_hist_bytes(bits: u32) -> u64 {
    (1u64 << bits) * BUCKETS as u64 * 4
}

/// The device buffers, created on first use and reused; live bytes are tracked.
pub struct Pool {
    device: wgpu::Device,
    budget: u64,
    buffers: HashMap<Slot, wgpu::Buffer>,
    live: u64,
    peak: u64,
    /// A simulated out-of-memory for the next allocation (fault injection), with its note.
    oom: Option<&'static str>,
}

impl Pool {
    /// An empty pool that never holds more than `budget` bytes.
    pub fn new(device: wgpu::Device, budget: u64) -> Self {
        Pool {
            device,
            budget,
            buffers: HashMap::new(),
            live: 0,
            peak: 0,
            oom: None,
        }
    }

    /// Makes the next allocation fail as out of memory (fault injection; `note` ends the message).
    pub fn inject_oom(&mut self, note: &'static str) {
        self.oom = Some(note);
    }

    /// Bytes of live buffers.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Largest [`live`](Self::live) seen.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Destroys every buffer (before switching to another layout).
    pub fn clear(&mut self) {
        for (_, b) in self.buffers.drain() {
            b.destroy();
        }
        self.live = 0;
    }

    /// The buffer of `slot` with `size` bytes, created if missing (a staging buffer is created
    /// mapped).
    pub fn get(&mut self, slot: Slot, size: u64) -> Result<wgpu::Buffer, EngineError> {
        if let Some(b) = self.buffers.get(&slot) {
            if b.size() == size {
                return Ok(b.clone());
            }
        }
        if let Some(old) = self.buffers.remove(&slot) {
            self.live -= old.size();
            old.destroy();
        }
        if self.live + size > self.budget {
            return Err(EngineError::Gpu(format!(
                "internal error: device buffers would exceed --gpu-mem ({} + {size} > {} bytes)",
                self.live, self.budget
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("udelta pool"),
            size,
            usage: slot.usage(),
            mapped_at_creation: matches!(slot, Slot::Staging(_)),
        });
        let error = pollster::block_on(scope.pop())
            .map(|e| e.to_string())
            .or_else(|| {
                self.oom
                    .take()
                    .map(|note| format!("Out of Memory ({note})"))
            });
        if let Some(e) = error {
            buffer.destroy();
            return Err(EngineError::Gpu(format!(
                "creating a {size}-byte buffer: {e} (a smaller --gpu-mem may fit)"
            )));
        }
        self.live += size;
        self.peak = self.peak.max(self.live);
        self.buffers.insert(slot, buffer.clone());
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fit_the_budget() {
        for budget in [1u64 << 20, 3 << 20, 8 << 20, 64 << 20, 1 << 30, 24 << 30] {
            for bits in [1, 4, 8] {
                for ov in [None, Some(1), Some(4096), Some(100_000)] {
                    match Layout::plan(budget, bits, 32 << 20, ov) {
                        Ok(l) => {
                            assert!(l.total_bytes() <= budget, "{budget} {bits} {l:?}");
                            assert!(l.chunk % TILE_ELEMENTS == 0 && l.chunk > 0);
                            assert!(l.chunk <= 32 << 20);
                            assert!(l.level_slots >= 1);
                            if let Some(c) = ov {
                                assert!(l.chunk <= c.next_multiple_of(TILE_ELEMENTS));
                            }
                        }
                        Err(e) => assert!(budget < 8 << 20 && bits == 8, "{budget} {bits}: {e}"),
                    }
                }
            }
        }
        // 1 GiB, 4 bits: chunks of at most one binding, room for the levels of a big tensor.
        let l = Layout::plan(1 << 30, 4, 32 << 20, None).unwrap();
        assert!(l.chunk >= 16 << 20);
        assert!(l.level_slots as u64 * l.chunk as u64 >= 400 << 20);
        assert!(Layout::plan(1000, 4, 32 << 20, None).is_err());
    }
}
