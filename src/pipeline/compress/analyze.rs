//! Step 3, pass 1: reads every tensor pair once. Compressed tensors get their statistics and
//! keep their levels for pass 2
//! ([`Engine::analyze_levels`](crate::engine::Engine::analyze_levels)); the others are compared with the
//! base, so that unchanged ones are stored as a reference to it.

use super::blocked::blocked_threshold;
use super::memory::{bytes_from_env, IN_FLIGHT_BYTES, IN_FLIGHT_ENV, READ_AHEAD_BYTES};
use super::model::{Analysis, Model, Plan};
use super::open::Kind;
use super::pair::Pair;
use super::schedule::{pass1_bytes, pass1_reads};
use super::{timed, Run, COPY_CHUNK};
use crate::checkpoint::direct::TensorBuf;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::engine::{AnalysisTicket, Engine};
use crate::error::Result;
use crate::format::index::crc32;
use crate::progress::Progress;
use std::rc::Rc;

use super::super::prefetch::Prefetch;

/// A compressed pair whose analysis the engine has started and not finished: where it goes,
/// its input bytes (held until then) and the engine's ticket.
struct InFlight {
    model: usize,
    ti: usize,
    bi: usize,
    shared_numel: usize,
    base: Rc<TensorBuf>,
    base_crc32: u32,
    ft: TensorBuf,
    ticket: AnalysisTicket,
}

impl InFlight {
    /// The bytes of its inputs held.
    fn bytes(&self) -> u64 {
        (self.base.len() + self.ft.len()) as u64
    }
}

/// The pair of fine-tuned tensor `ti` of `m` and base tensor `bi`.
fn pair_of<'a>(base: &'a Checkpoint, m: &'a Model, bi: usize, ti: usize) -> Pair<'a> {
    Pair {
        base,
        b: &base.tensors[bi],
        ft: &m.ckpt,
        t: &m.ckpt.tensors[ti],
    }
}

/// Hands `buf` back to the reader when nothing else holds it.
fn recycle_shared(loads: &Prefetch<TensorBuf>, buf: Rc<TensorBuf>) {
    if let Ok(b) = Rc::try_unwrap(buf) {
        loads.recycle([b]);
    }
}

impl Run<'_> {
    /// Pass 1 over the tensors named in `order`: fills every model's plans. Tensor names whose
    /// inputs exceed the blocked threshold are not read ahead: they are analysed in blocks.
    ///
    /// One compressed pair stays in flight: the engine starts the next pair (a GPU uploads it
    /// and submits its kernels) before the host waits for the previous one's result, so that
    /// the device works while the host reads back, quantizes and reads. Its buffers are held
    /// meanwhile, beyond the read-ahead budget, as long as the two pairs together take at most
    /// [`IN_FLIGHT_BYTES`]. Results are finished in the order started.
    pub(super) fn analyze_all(&mut self, models: &mut [Model], order: &[String]) -> Result<()> {
        let progress = Progress::new(
            "analyze",
            pass1_bytes(&self.base, models),
            self.opts.progress,
        );
        let threshold = blocked_threshold()?;
        let in_flight_bound = bytes_from_env(IN_FLIGHT_ENV, IN_FLIGHT_BYTES)?;
        let (jobs, blocked) = pass1_reads(order, &self.base, models, threshold);
        let mut loads = Prefetch::<TensorBuf>::start_bounded(jobs, READ_AHEAD_BYTES);
        let mut in_flight: Option<InFlight> = None;
        for (name, &blocked) in order.iter().zip(&blocked) {
            let mut loaded = timed(&mut self.times.read, || loads.next_job())?.into_iter();
            // Empty when no model compresses this tensor, or when it is analysed in blocks.
            let base_buf = Rc::new(loaded.next().unwrap_or_default());
            // Once for every fine-tune compressed against it.
            let base_crc32 = crc32(&base_buf);
            for mi in 0..models.len() {
                let m = &models[mi];
                let Some(ti) = m.ckpt.index_of(name) else {
                    continue;
                };
                let (bi, shared_numel) = match m.kinds[ti] {
                    Kind::Compress(bi, shared_numel) if !blocked => (bi, shared_numel),
                    _ => {
                        let plan = self.plan_on_host(m, ti, threshold, &progress)?;
                        models[mi].plans[ti] = Some(plan);
                        continue;
                    }
                };
                let ft = loaded.next().expect("one read per compressing model");
                let in_hand = (base_buf.len() + ft.len()) as u64;
                if let Some(earlier) = in_flight.take_if(|f| f.bytes() + in_hand > in_flight_bound)
                {
                    // Too large to hold beside this pair: finished before it is started.
                    self.finish_analysis(models, earlier, &loads, &progress)?;
                }
                let m = &models[mi];
                let ticket = self.start_analysis(m, (bi, ti), shared_numel, (&base_buf, &ft))?;
                let job = InFlight {
                    model: mi,
                    ti,
                    bi,
                    shared_numel,
                    base: base_buf.clone(),
                    base_crc32,
                    ft,
                    ticket,
                };
                if let Some(earlier) = in_flight.take() {
                    self.finish_analysis(models, earlier, &loads, &progress)?;
                }
                if job.ticket.is_ready() {
                    self.finish_analysis(models, job, &loads, &progress)?;
                } else {
                    in_flight = Some(job);
                }
            }
            recycle_shared(&loads, base_buf);
        }
        if let Some(last) = in_flight.take() {
            self.finish_analysis(models, last, &loads, &progress)?;
        }
        drop(loads);
        progress.finish();
        Ok(())
    }

    /// The plan of tensor `ti` of `m` made on the host alone: raw, compared with the base, or
    /// analysed in blocks (a compressed pair above the blocked threshold).
    fn plan_on_host(
        &mut self,
        m: &Model,
        ti: usize,
        threshold: u64,
        progress: &Progress,
    ) -> Result<Plan> {
        Ok(match m.kinds[ti] {
            Kind::Raw => Plan::Raw,
            Kind::Compare(bi) => self.compare_tensor(m, ti, bi, progress)?,
            Kind::Compress(bi, shared_numel) => {
                let base = self.base.clone();
                let pair = pair_of(&base, m, bi, ti);
                let analysis =
                    self.analyze_in_blocks(&m.name, &pair, bi, shared_numel, threshold)?;
                progress.inc(pair.b.len + pair.t.len);
                Plan::Compress(analysis)
            }
        })
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

    /// Starts the analysis of the pair (`bi`, `ti`) of `m` on the engine.
    fn start_analysis(
        &mut self,
        m: &Model,
        (bi, ti): (usize, usize),
        shared_numel: usize,
        (base_buf, ft_buf): (&[u8], &[u8]),
    ) -> Result<AnalysisTicket> {
        let pair = pair_of(&self.base, m, bi, ti);
        let input = pair.input(base_buf, ft_buf, shared_numel)?;
        let bits = self.opts.params.bits;
        let engine: &mut dyn Engine = self.engine;
        let started = std::time::Instant::now();
        let ticket = engine.start_analysis(&input, bits);
        let seconds = started.elapsed().as_secs_f64();
        self.times.analyze += seconds;
        self.times.analyze_start += seconds;
        ticket.map_err(|e| pair.engine_error(e))
    }

    /// Finishes `job`: the statistics of its pair, with its levels and new rows kept for pass
    /// 2 (checked against the CPU engine with `--verify`), into its model's plans; its buffers
    /// go back to the reader.
    fn finish_analysis(
        &mut self,
        models: &mut [Model],
        job: InFlight,
        loads: &Prefetch<TensorBuf>,
        progress: &Progress,
    ) -> Result<()> {
        let InFlight {
            model,
            ti,
            bi,
            shared_numel,
            base: base_buf,
            base_crc32,
            ft: ft_buf,
            ticket,
        } = job;
        let base = self.base.clone();
        let pair = pair_of(&base, &models[model], bi, ti);
        let input = pair.input(&base_buf, &ft_buf, shared_numel)?;
        let bits = self.opts.params.bits;
        let engine: &mut dyn Engine = self.engine;
        let result = timed(&mut self.times.analyze, || {
            engine.finish_analysis(ticket, &input)
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
        progress.inc(pair.b.len + pair.t.len);
        let names = (models[model].name.as_str(), pair.t.name.as_str());
        let kept = self.keep_for_selection(names, &stats, levels)?;
        let analysis = Analysis {
            base: bi,
            shared_numel,
            stats,
            base_crc32,
            allocation: None,
            kept: Some(kept),
            tail: ft_buf[tail_start..].to_vec(),
        };
        models[model].plans[ti] = Some(Plan::Compress(analysis));
        loads.recycle([ft_buf]);
        recycle_shared(loads, base_buf);
        Ok(())
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
