//! Step 3, pass 1: reads every tensor pair once. Compressed tensors get their statistics and
//! keep their levels for pass 2
//! ([`Engine::analyze_levels`](crate::engine::Engine::analyze_levels)); the others are compared with the
//! base, so that unchanged ones are stored as a reference to it.

use super::blocked::blocked_threshold;
use super::memory::READ_AHEAD_BYTES;
use super::model::{Analysis, Model, Plan};
use super::open::Kind;
use super::pair::Pair;
use super::schedule::{pass1_bytes, pass1_reads};
use super::{timed, Run, COPY_CHUNK};
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::engine::Engine;
use crate::error::Result;
use crate::format::index::crc32;
use crate::progress::Progress;

use super::super::prefetch::Prefetch;

impl Run<'_> {
    /// Pass 1 over the tensors named in `order`: fills every model's plans. Tensor names whose
    /// inputs exceed the blocked threshold are not read ahead: they are analysed in blocks.
    pub(super) fn analyze_all(&mut self, models: &mut [Model], order: &[String]) -> Result<()> {
        let progress = Progress::new(
            "analyze",
            pass1_bytes(&self.base, models),
            self.opts.progress,
        );
        let threshold = blocked_threshold()?;
        let (jobs, blocked) = pass1_reads(order, &self.base, models, threshold);
        let mut loads = Prefetch::start_bounded(jobs, READ_AHEAD_BYTES);
        let base = self.base.clone();
        for (name, &blocked) in order.iter().zip(&blocked) {
            let mut loaded = timed(&mut self.times.read, || loads.next_job())?.into_iter();
            // Empty when no model compresses this tensor, or when it is analysed in blocks.
            let base_buf = loaded.next().unwrap_or_default();
            // Once for every fine-tune compressed against it.
            let base_crc32 = crc32(&base_buf);
            for m in models.iter_mut() {
                let Some(ti) = m.ckpt.index_of(name) else {
                    continue;
                };
                let plan = match m.kinds[ti] {
                    Kind::Raw => Plan::Raw,
                    Kind::Compare(bi) => self.compare_tensor(m, ti, bi, &progress)?,
                    Kind::Compress(bi, shared_numel) => {
                        let pair = Pair {
                            base: &base,
                            b: &base.tensors[bi],
                            ft: &m.ckpt,
                            t: &m.ckpt.tensors[ti],
                        };
                        let analysis = if blocked {
                            self.analyze_in_blocks(&pair, bi, shared_numel, threshold)?
                        } else {
                            let ft_buf = loaded.next().expect("one read per compressing model");
                            let bufs = (base_buf.as_slice(), base_crc32, ft_buf.as_slice());
                            let analysis = self.analyze_tensor(&pair, bi, shared_numel, bufs)?;
                            loads.recycle([ft_buf]);
                            analysis
                        };
                        progress.inc(pair.b.len + pair.t.len);
                        Plan::Compress(analysis)
                    }
                };
                m.plans[ti] = Some(plan);
            }
            loads.recycle([base_buf]);
        }
        drop(loads);
        progress.finish();
        Ok(())
    }

    /// The plan of an uncompressed tensor `ti` of `m`: unchanged when equal to base tensor `bi`.
    fn compare_tensor(
        &mut self,
        m: &Model,
        ti: usize,
        bi: usize,
        progress: &Progress,
    ) -> Result<Plan> {
        let (b, t) = (&self.base.tensors[bi], &m.ckpt.tensors[ti]);
        let equal = timed(&mut self.times.compare, || {
            compare(&self.base, b, &m.ckpt, t, progress)
        })?;
        Ok(match equal {
            Some(base_crc32) => Plan::Unchanged { base_crc32 },
            None => Plan::Raw,
        })
    }

    /// The statistics of one compressed pair, with its levels and new rows kept for pass 2
    /// (checked against the CPU engine with `--verify`).
    fn analyze_tensor(
        &mut self,
        pair: &Pair,
        bi: usize,
        shared_numel: usize,
        (base_buf, base_crc32, ft_buf): (&[u8], u32, &[u8]),
    ) -> Result<Analysis> {
        let input = pair.input(base_buf, ft_buf, shared_numel)?;
        let bits = self.opts.params.bits;
        let engine: &mut dyn Engine = self.engine;
        let result = timed(&mut self.times.analyze, || {
            engine.analyze_levels(&input, bits)
        })
        .map_err(|e| pair.engine_error(e))?;
        if self.opts.verify {
            pair.check_against_cpu(
                &result,
                &engine.name(),
                "statistics",
                &mut self.times.verify,
                |cpu| cpu.analyze_levels(&input, bits),
            )?;
        }
        let (stats, levels) = result;
        let tail_start = (shared_numel * pair.ft_type()?.size()).min(ft_buf.len());
        Ok(Analysis {
            base: bi,
            shared_numel,
            stats,
            base_crc32,
            allocation: None,
            kept: Some(self.kept.keep(levels, bits)?),
            tail: ft_buf[tail_start..].to_vec(),
        })
    }
}

/// Compares a fine-tuned tensor with the base chunk by chunk; returns the base CRC-32 when equal.
fn compare(
    base: &Checkpoint,
    b: &TensorEntry,
    ft: &Checkpoint,
    t: &TensorEntry,
    progress: &Progress,
) -> Result<Option<u32>> {
    let mut hasher = crc32fast::Hasher::new();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < t.len {
        let n = COPY_CHUNK.min(t.len - start) as usize;
        x.resize(n, 0);
        y.resize(n, 0);
        base.read_range(b, start, &mut x)?;
        ft.read_range(t, start, &mut y)?;
        progress.inc(2 * n as u64);
        if x != y {
            progress.inc(2 * (t.len - start - n as u64));
            return Ok(None);
        }
        hasher.update(&x);
        start += n as u64;
    }
    Ok(Some(hasher.finalize()))
}
