//! `analyze` (the library call) on the device, in two passes over the tensor's chunks:
//! [`GpuEngine::min_max_pass`] ([`Kernel::MinMax`]: exact min/max as order-preserving u32
//! keys, the lowest non-finite index, flags), then [`GpuEngine::histogram_pass`]
//! ([`Kernel::Histogram`]: the level histogram of the grid the host derives from min/max).

use super::constants::{stat, Params};
use super::kernels::Kernel;
use super::pool::Slot;
use super::{chunk_ranges, GpuEngine};
use crate::algorithm::quantize::{from_order_key, QuantGrid};
use crate::algorithm::TensorStats;
use crate::engine::cpu::canonical_zero;
use crate::engine::{DeltaInput, EngineError};

/// The chunks and device buffers of one `analyze` call.
struct AnalyzeRun {
    chunks: Vec<(usize, usize)>,
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    stats: wgpu::Buffer,
    hist: wgpu::Buffer,
    uniform: wgpu::Buffer,
    readback: wgpu::Buffer,
}

impl GpuEngine {
    /// The buffers and chunks of one tensor's analysis at `bits`.
    fn analyze_run(&mut self, input: &DeltaInput, bits: u32) -> Result<AnalyzeRun, EngineError> {
        let layout = self.prepare(bits)?;
        Ok(AnalyzeRun {
            chunks: chunk_ranges(input.numel(), layout.chunk),
            a: self.buf(&layout, Slot::InA)?,
            b: self.buf(&layout, Slot::InB)?,
            stats: self.buf(&layout, Slot::Stats)?,
            hist: self.buf(&layout, Slot::BucketHist)?,
            uniform: self.buf(&layout, Slot::Params)?,
            readback: self.buf(&layout, Slot::Readback)?,
        })
    }

    /// Pass 1 on the device; `None` when the tensor must go to the CPU engine.
    pub(super) fn analyze_gpu(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<Option<TensorStats>, EngineError> {
        let run = self.analyze_run(input, bits)?;
        let Some((lo, hi)) = self.min_max_pass(input, &run)? else {
            return Ok(None);
        };
        let grid = QuantGrid { lo, hi, bits };
        if !grid.level_rule().by_multiplier {
            return Ok(None);
        }
        Ok(self
            .histogram_pass(input, &run, grid)?
            .map(|histogram| TensorStats { grid, histogram }))
    }

    /// The exact min and max of the delta; `None` when an element needs the CPU engine, an
    /// error at the first non-finite delta.
    fn min_max_pass(
        &self,
        input: &DeltaInput,
        run: &AnalyzeRun,
    ) -> Result<Option<(f32, f32)>, EngineError> {
        let mut init = [0u32; stat::WORDS];
        init[stat::MIN] = u32::MAX;
        init[stat::BAD] = u32::MAX;
        self.write_words(&run.stats, &init);
        let base = Self::base_params(input);
        let mut in_flight = None;
        for &(start, len) in &run.chunks {
            self.upload_inputs(input, (start, len), &run.a, &run.b);
            let p = Params {
                n: len as u32,
                start: start as u32,
                ..base
            };
            self.write_params(&run.uniform, &p);
            let mut enc = self.encoder();
            self.pass(
                &mut enc,
                Kernel::MinMax,
                &[&run.uniform, &run.a, &run.b, &run.stats],
                self.stride_groups(len),
            );
            self.submit_chunk(enc, &mut in_flight)?;
        }
        range_of_stats(&self.read_stats(&run.stats, &run.readback)?, input)
    }

    /// The level histogram under `grid`, going backwards over the chunks (the last one is
    /// still on the device); `None` when an element needs the CPU engine.
    fn histogram_pass(
        &self,
        input: &DeltaInput,
        run: &AnalyzeRun,
        grid: QuantGrid,
    ) -> Result<Option<Vec<u64>>, EngineError> {
        let levels = grid.levels();
        let p = Self::base_params(input).with_levels(&grid.level_rule());
        let last = run.chunks.len() - 1;
        let mut in_flight = None;
        for (i, &(start, len)) in run.chunks.iter().enumerate().rev() {
            if i != last {
                self.upload_inputs(input, (start, len), &run.a, &run.b);
            }
            let cp = Params {
                n: len as u32,
                start: start as u32,
                ..p
            };
            self.write_params(&run.uniform, &cp);
            let mut enc = self.encoder();
            if i == last {
                enc.clear_buffer(&run.hist, 0, Some(levels as u64 * 4));
            }
            self.pass(
                &mut enc,
                Kernel::Histogram,
                &[&run.uniform, &run.a, &run.b, &run.hist, &run.stats],
                self.stride_groups(len),
            );
            self.submit_chunk(enc, &mut in_flight)?;
        }
        let [h, s] = self.read_pair((&run.hist, levels), &run.stats, &run.readback)?;
        if s[stat::FLAGS] != 0 {
            return Ok(None);
        }
        Ok(Some(h.into_iter().map(u64::from).collect()))
    }
}

/// The exact min and max in the statistics words `s` of [`Kernel::MinMax`] over `input`;
/// `None` when an element needs the CPU engine, an error at the first non-finite delta.
pub(super) fn range_of_stats(
    s: &[u32],
    input: &DeltaInput,
) -> Result<Option<(f32, f32)>, EngineError> {
    if s[stat::BAD] != u32::MAX {
        let index = s[stat::BAD] as usize;
        return Err(EngineError::NonFinite {
            index: index as u64,
            base: input.base_type.load(input.base, index),
            finetuned: input.finetuned_type.load(input.finetuned, index),
        });
    }
    if s[stat::FLAGS] & stat::FLAG_TINY != 0 {
        return Ok(None);
    }
    Ok(Some((
        canonical_zero(from_order_key(s[stat::MIN])),
        canonical_zero(from_order_key(s[stat::MAX])),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_invert() {
        // order_key as in shaders/common.wgsl.
        let order = |b: u32| {
            if b & 0x8000_0000 != 0 {
                !b
            } else {
                b | 0x8000_0000
            }
        };
        let xs = [f32::MIN, -1.5, -1e-30, -0.0, 0.0, 1e-40, 2.5, f32::MAX];
        for w in xs.windows(2) {
            assert!(order(w[0].to_bits()) <= order(w[1].to_bits()), "{w:?}");
        }
        for x in xs {
            assert_eq!(crate::algorithm::quantize::order_key(x), order(x.to_bits()));
            assert_eq!(from_order_key(order(x.to_bits())).to_bits(), x.to_bits());
        }
    }
}
