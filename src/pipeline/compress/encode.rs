//! Step 5, pass 2: writes every tensor's record. Tensors stored whole are coded losslessly
//! against the base first ([`lossless::store_tensor`]; the disk writes them back while the
//! compressed ones are computed); then the compressed tensors, in reverse order, get their
//! kept entries selected from what pass 1 kept ([`Engine::select_candidates`] or
//! [`Engine::select_levels`]; neither checkpoint is read again), entropy-coded and appended,
//! and their nuclear norms estimated.

use super::kept::ForSelection;
use super::model::{Analysis, Model, Plan};
use super::pair::Pair;
use super::schedule::pass2_bytes;
use super::trace_norms::{KeptMatrix, TraceNorms};
use super::{timed, Run};
use crate::algorithm::selection::adjusted_rate;
use crate::algorithm::{SelectionPlan, TensorKey, TensorStats};
use crate::checkpoint::dtype::dtype_name;
use crate::checkpoint::reader::TensorEntry;
use crate::codec::{self, EncodedTensor};
use crate::engine::{Engine, KeptEntries};
use crate::error::{Error, Result};
use crate::format::{CompressedTensor, RecordRef, TensorKind, TensorRecord, UdeltaWriter};
use crate::pipeline::lossless;
use crate::progress::Progress;

/// The records a compressed tensor's data is written to.
struct Streams {
    positions: RecordRef,
    levels: RecordRef,
    /// The rows the fine-tune added beyond the base's, stored whole.
    tail: Option<RecordRef>,
}

impl Run<'_> {
    /// Pass 2 over the tensors named in `order`: fills every model's records from its plans.
    pub(super) fn encode_all(&mut self, models: &mut [Model], order: &[String]) -> Result<()> {
        let progress = Progress::new(
            "compress",
            pass2_bytes(&self.base, models),
            self.opts.progress,
        );
        let norms = TraceNorms::start(self.with_trace_norm);
        for name in order {
            self.store_whole_tensors(models, name, &progress)?;
        }
        self.plan_allocation(models)?;
        // Reverse order: the levels spilled last are read back first.
        for name in order.iter().rev() {
            self.encode_tensors(models, name, &norms, &progress)?;
        }
        progress.finish();
        norms.finish(models, &mut self.times);
        Ok(())
    }

    /// Writes the record of every model's tensor `name` that is stored whole (coded losslessly).
    fn store_whole_tensors(
        &mut self,
        models: &mut [Model],
        name: &str,
        progress: &Progress,
    ) -> Result<()> {
        for m in models.iter_mut() {
            let Some(ti) = m.ckpt.index_of(name) else {
                continue;
            };
            if !matches!(m.plans[ti], Some(Plan::Raw)) {
                continue;
            }
            m.plans[ti] = None;
            let t = &m.ckpt.tensors[ti];
            let kind = timed(&mut self.times.write, || {
                lossless::store_tensor(&mut m.writer, &self.base, &m.ckpt, t, progress)
            })?;
            m.records[ti] = Some(record(t, kind));
        }
        Ok(())
    }

    /// Writes the record of every model's tensor `name` that is unchanged or compressed.
    fn encode_tensors(
        &mut self,
        models: &mut [Model],
        name: &str,
        norms: &TraceNorms,
        progress: &Progress,
    ) -> Result<()> {
        for (mi, m) in models.iter_mut().enumerate() {
            let Some(ti) = m.ckpt.index_of(name) else {
                continue;
            };
            let kind = match m.plans[ti].take() {
                Some(Plan::Unchanged { base_crc32 }) => TensorKind::Unchanged { base_crc32 },
                Some(Plan::Compress(analysis)) => {
                    let bytes = self.base.tensors[analysis.base].len + m.ckpt.tensors[ti].len;
                    let kind = self.encode_tensor(mi, m, ti, analysis, norms)?;
                    progress.inc(bytes);
                    kind
                }
                // Raw tensors were written, and their plans taken, by the first round.
                None | Some(Plan::Raw) => continue,
            };
            m.records[ti] = Some(record(&m.ckpt.tensors[ti], kind));
        }
        Ok(())
    }

    /// Selects, codes and appends one compressed tensor `ti` of model `mi` (`m`), and hands
    /// its matrix to the trace-norm estimate.
    #[allow(clippy::too_many_arguments)]
    fn encode_tensor(
        &mut self,
        mi: usize,
        m: &mut Model,
        ti: usize,
        mut analysis: Analysis,
        norms: &TraceNorms,
    ) -> Result<TensorKind> {
        let (base, ckpt) = (self.base.clone(), m.ckpt.clone());
        let pair = Pair {
            base: &base,
            b: &base.tensors[analysis.base],
            ft: &ckpt,
            t: &ckpt.tensors[ti],
        };
        let kept = analysis
            .kept
            .take()
            .expect("pass 1 kept what pass 2 selects from");
        let source = timed(&mut self.times.read_pass2, || self.kept.take(kept))?;
        let allocation = analysis
            .allocation
            .expect("one allocation per compressed tensor");
        let selection = SelectionPlan::new(
            TensorKey::new(self.opts.params.seed, &m.name, &pair.t.name),
            &analysis.stats,
            allocation.rate,
        );
        let kept = self.select(&pair, &source, &analysis.stats, &selection)?;
        source.recycle();
        let kept_counts = selection.kept_counts();
        let enc = self.entropy_code(&pair, analysis.shared_numel, &kept, &kept_counts)?;
        // After encoding, so that the worker can take the positions over.
        if self.with_trace_norm && pair.b.shape.len() == 2 {
            let matrix = KeptMatrix {
                shape: (pair.b.shape[0], pair.b.shape[1]),
                positions: kept.positions,
                codes: kept.levels,
                table: analysis
                    .stats
                    .grid
                    .scaled_values(self.opts.params.rescale()),
            };
            norms.add(mi, m, matrix, &mut self.times.trace_norm);
        } else {
            kept.recycle();
        }
        let tail = std::mem::take(&mut analysis.tail);
        let streams = timed(&mut self.times.write, || {
            write_streams(&mut m.writer, &enc, &tail)
        })?;
        let bits = self.opts.params.bits;
        Ok(TensorKind::Compressed(Box::new(compressed_tensor(
            pair.b,
            analysis,
            bits,
            kept_counts,
            enc,
            streams,
        ))))
    }

    /// The kept entries of one pair, from its levels or its candidates (checked against the
    /// CPU engine with `--verify`).
    fn select(
        &mut self,
        pair: &Pair,
        source: &ForSelection,
        stats: &TensorStats,
        selection: &SelectionPlan,
    ) -> Result<KeptEntries> {
        let engine: &mut dyn Engine = self.engine;
        let select = |engine: &mut dyn Engine| match source {
            ForSelection::Levels(levels) => engine.select_levels(levels, stats, selection),
            ForSelection::Candidates(set) => engine.select_candidates(set, selection),
        };
        let kept = timed(&mut self.times.select, || select(&mut *engine))
            .map_err(|e| pair.engine_error(e))?;
        if self.opts.verify {
            pair.check_against_cpu(
                &kept,
                &engine.name(),
                "kept entries",
                &mut self.times.verify,
                |cpu| select(cpu),
            )?;
        }
        Ok(kept)
    }

    /// Entropy-codes the kept entries of a tensor of `numel` elements.
    fn entropy_code(
        &mut self,
        pair: &Pair,
        numel: usize,
        kept: &KeptEntries,
        kept_counts: &[u64],
    ) -> Result<EncodedTensor> {
        timed(&mut self.times.encode, || {
            codec::encode_tensor(numel as u64, &kept.positions, &kept.levels, kept_counts)
        })
        .map_err(|e| {
            Error::tensor(
                pair.ft.shard_path(pair.t),
                &pair.t.name,
                format!("encoding failed: {e}"),
            )
        })
    }
}

/// Appends a compressed tensor's new rows (if any), then its two coded streams.
fn write_streams(writer: &mut UdeltaWriter, enc: &EncodedTensor, tail: &[u8]) -> Result<Streams> {
    let tail = (!tail.is_empty())
        .then(|| writer.append(tail))
        .transpose()?;
    Ok(Streams {
        positions: writer.append(&enc.positions)?,
        levels: writer.append(&enc.levels)?,
        tail,
    })
}

/// The index entry of a compressed tensor against base tensor `b`.
fn compressed_tensor(
    b: &TensorEntry,
    analysis: Analysis,
    bits: u32,
    kept_counts: Vec<u64>,
    enc: EncodedTensor,
    streams: Streams,
) -> CompressedTensor {
    let Analysis {
        shared_numel,
        stats,
        base_crc32,
        allocation,
        ..
    } = analysis;
    let allocation = allocation.expect("one allocation per compressed tensor");
    CompressedTensor {
        base_dtype: dtype_name(b.dtype),
        base_shape: b.shape.clone(),
        base_crc32,
        shared_numel: shared_numel as u64,
        lo_bits: stats.grid.lo.to_bits(),
        hi_bits: stats.grid.hi.to_bits(),
        bits,
        group: allocation.group,
        rate: allocation.rate,
        adjusted_rate: adjusted_rate(allocation.rate, stats.zero_fraction()),
        std: stats.std_dev(),
        histogram: stats.histogram,
        kept_counts,
        blocks: enc.blocks,
        positions: streams.positions,
        levels: streams.levels,
        tail: streams.tail,
    }
}

/// The record of fine-tuned tensor `t`, stored as `kind`.
fn record(t: &TensorEntry, kind: TensorKind) -> TensorRecord {
    TensorRecord {
        name: t.name.clone(),
        dtype: dtype_name(t.dtype),
        shape: t.shape.clone(),
        shard: t.shard,
        matrix_of: t.matrix_of.clone(),
        kind,
    }
}
