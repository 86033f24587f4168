//! `select` on the device, in three passes over the tensor's chunks:
//! - A ([`GpuEngine::levels_pass`]): [`Kernel::Levels`] packs every element's level (kept on
//!   the device, or spilled to the host when the levels of all chunks do not fit) and counts
//!   each level's keys per bucket; the host finds each level's cut bucket ([`bucket_cuts`]).
//! - B ([`GpuEngine::gather_pass`]): [`Kernel::Gather`] returns the keys in each level's cut
//!   bucket, in batches that fit in one buffer; the host picks each level's threshold among
//!   them ([`threshold_from_candidates`]).
//! - C ([`GpuEngine::compaction_pass`]): per chunk, [`Kernel::TileCount`], [`Kernel::Scan`]
//!   and [`Kernel::Scatter`] write the kept positions and levels in order.

use super::buckets::{
    bucket_cuts, decode_candidate, split_threshold, threshold_from_candidates, BucketCut,
};
use super::constants::{stat, Params, BUCKETS, TABLE_THRESHOLDS, TABLE_WORDS, TILE_ELEMENTS};
use super::kernels::Kernel;
use super::pool::{Layout, Slot};
use super::{chunk_ranges, GpuEngine};
use crate::algorithm::{SelectionPlan, TensorStats};
use crate::engine::{check_kept, DeltaInput, EngineError, KeptEntries};

/// Whether `x` is a nonzero subnormal.
pub(super) fn is_subnormal(x: f32) -> bool {
    x != 0.0 && x.abs() < f32::MIN_POSITIVE
}

/// The chunks, parameters and device buffers of one `select` call.
struct SelectRun {
    chunks: Vec<(usize, usize)>,
    /// Parameters shared by every chunk (grid and key).
    params: Params,
    /// Level buffers of every chunk (resident), or one reused by all (spilled).
    resident: bool,
    /// Words of candidates one batch of pass B may gather.
    capacity: usize,
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    bucket_hist: wgpu::Buffer,
    stats: wgpu::Buffer,
    uniform: wgpu::Buffer,
    readback: wgpu::Buffer,
    table: wgpu::Buffer,
    tiles: wgpu::Buffer,
    levels: Vec<wgpu::Buffer>,
    /// The packed levels of every chunk, when they are spilled to the host.
    spilled: Vec<Vec<u8>>,
}

impl SelectRun {
    /// The parameters of chunk `range`.
    fn chunk_params(&self, (start, len): (usize, usize)) -> Params {
        Params {
            n: len as u32,
            start: start as u32,
            num_tiles: len.div_ceil(TILE_ELEMENTS) as u32,
            ..self.params
        }
    }

    /// The level buffer of chunk `c`.
    fn level_buf(&self, c: usize) -> &wgpu::Buffer {
        &self.levels[if self.resident { c } else { 0 }]
    }

    fn num_levels(&self) -> usize {
        self.params.num_levels as usize
    }
}

impl GpuEngine {
    /// Pass 2 on the device; `None` when the tensor must go to the CPU engine.
    pub(super) fn select_gpu(
        &mut self,
        input: &DeltaInput,
        st: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<Option<KeptEntries>, EngineError> {
        let grid = st.grid;
        if !grid.lo.is_finite()
            || !grid.hi.is_finite()
            || is_subnormal(grid.lo)
            || is_subnormal(grid.hi)
        {
            return Ok(None);
        }
        let levels = grid.levels();
        if plan.histogram.len() != levels || plan.pruned.len() != levels {
            return Err(EngineError::Inconsistent(format!(
                "plan for {} levels, grid has {levels}",
                plan.histogram.len()
            )));
        }
        let rule = grid.level_rule();
        if !rule.by_multiplier {
            return Ok(None);
        }
        let layout = self.prepare(grid.bits)?;
        let params = Params {
            key0: plan.key.k0,
            key1: plan.key.k1,
            ..Self::base_params(input)
        }
        .with_levels(&rule);
        let mut run = self.select_run(&layout, input.numel(), params)?;
        let Some(hist) = self.levels_pass(input, &mut run)? else {
            return Ok(None);
        };
        let cuts = cuts_of(&hist, plan)?;
        let expected: Vec<u64> = (cuts.iter().enumerate())
            .map(|(l, c)| c.map_or(0, |c| hist[l * BUCKETS + c.bucket as usize]))
            .collect();
        let mut table = cut_bucket_table(&cuts);
        self.write_words(&run.table, &table);
        let mut candidates = self.gather_pass(&run, &cuts, expected.iter().sum())?;
        for (l, cand) in candidates.iter_mut().enumerate() {
            if cand.len() as u64 != expected[l] {
                return Err(EngineError::Inconsistent(format!(
                    "level {l}: {} candidates, expected {}",
                    cand.len(),
                    expected[l]
                )));
            }
            let (t, all) = split_threshold(threshold_from_candidates(cuts[l], cand));
            table[TABLE_THRESHOLDS + 2 * l] = t;
            table[TABLE_THRESHOLDS + 2 * l + 1] = all;
        }
        self.write_words(&run.table, &table);
        let kept = self.compaction_pass(&run)?;
        check_kept(&kept, plan)?;
        Ok(Some(kept))
    }

    /// The buffers of a `select` call over `n` elements, with cleared stats.
    fn select_run(
        &mut self,
        layout: &Layout,
        n: usize,
        params: Params,
    ) -> Result<SelectRun, EngineError> {
        let chunks = chunk_ranges(n, layout.chunk);
        let resident = chunks.len() <= layout.level_slots;
        let mut run = SelectRun {
            params,
            resident,
            capacity: self
                .candidate_capacity
                .map_or(layout.chunk, |c| c.min(layout.chunk)),
            a: self.buf(layout, Slot::InA)?,
            b: self.buf(layout, Slot::InB)?,
            bucket_hist: self.buf(layout, Slot::BucketHist)?,
            stats: self.buf(layout, Slot::Stats)?,
            uniform: self.buf(layout, Slot::Params)?,
            readback: self.buf(layout, Slot::Readback)?,
            table: self.buf(layout, Slot::Table)?,
            tiles: self.buf(layout, Slot::Tiles)?,
            levels: Vec::new(),
            spilled: Vec::new(),
            chunks,
        };
        for i in 0..if resident { run.chunks.len() } else { 1 } {
            run.levels.push(self.buf(layout, Slot::Levels(i))?);
        }
        self.write_words(&run.stats, &[0u32; stat::WORDS]);
        Ok(run)
    }

    /// Pass A: every chunk's levels and the per-level bucket histogram (level-major,
    /// `levels * BUCKETS` counts); `None` when an element needs the CPU engine.
    fn levels_pass(
        &self,
        input: &DeltaInput,
        run: &mut SelectRun,
    ) -> Result<Option<Vec<u64>>, EngineError> {
        let levels = run.num_levels();
        let mut in_flight = None;
        for (c, &range) in run.chunks.iter().enumerate() {
            self.upload_inputs(input, range, &run.a, &run.b);
            self.write_params(&run.uniform, &run.chunk_params(range));
            let mut enc = self.encoder();
            if c == 0 {
                let bytes = levels as u64 * BUCKETS as u64 * 4;
                enc.clear_buffer(&run.bucket_hist, 0, Some(bytes));
            }
            let lv = run.level_buf(c);
            self.pass(
                &mut enc,
                Kernel::Levels,
                &[
                    &run.uniform,
                    &run.a,
                    &run.b,
                    lv,
                    &run.bucket_hist,
                    &run.stats,
                ],
                self.stride_groups(range.1.div_ceil(4)),
            );
            self.submit_chunk(enc, &mut in_flight)?;
            if !run.resident {
                let bytes = self.gpu.read(lv, 0, range.1 as u64, &run.readback)?;
                run.spilled.push(bytes);
            }
        }
        let [hist, s] = self.read_pair(
            (&run.bucket_hist, levels * BUCKETS),
            &run.stats,
            &run.readback,
        )?;
        if s[stat::FLAGS] != 0 {
            return Ok(None);
        }
        Ok(Some(hist.into_iter().map(u64::from).collect()))
    }

    /// Pass B: the `total` keys in the levels' cut buckets (per level, in no order),
    /// gathered in batches of chunks whose candidates fit in buffer A.
    fn gather_pass(
        &mut self,
        run: &SelectRun,
        cuts: &[Option<BucketCut>],
        total: u64,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let mut candidates: Vec<Vec<u32>> = vec![Vec::new(); run.num_levels()];
        self.candidate_batches = 0;
        if total == 0 {
            return Ok(candidates);
        }
        let single = total as usize <= run.capacity;
        let mut c = 0;
        while c < run.chunks.len() {
            let batch = self.gather_batch(run, c, single)?;
            self.candidate_batches += 1;
            let count = self.read_stats(&run.stats, &run.readback)?[stat::CANDIDATES] as usize;
            if count > run.capacity {
                return Err(EngineError::Inconsistent(format!(
                    "{count} candidates overflow {}",
                    run.capacity
                )));
            }
            for w in self.gpu.read_words(&run.a, 0, count, &run.readback)? {
                let Some((l, key)) = decode_candidate(w, cuts) else {
                    return Err(EngineError::Inconsistent(format!(
                        "candidate of level {} without a cut",
                        w >> super::constants::BUCKET_SHIFT
                    )));
                };
                candidates[l].push(key);
            }
            c += batch;
        }
        Ok(candidates)
    }

    /// Dispatches [`Kernel::Gather`] over chunks `first..` until their elements would overflow
    /// the candidate capacity (at least one chunk; all of them when every cut bucket's keys
    /// fit at once, `single`). Returns the number of chunks.
    fn gather_batch(
        &self,
        run: &SelectRun,
        first: usize,
        single: bool,
    ) -> Result<usize, EngineError> {
        let candidates_offset = (stat::CANDIDATES * 4) as u64;
        self.gpu
            .write(&run.stats, candidates_offset, &0u32.to_le_bytes());
        let (mut c, mut elements) = (first, 0);
        let mut in_flight = None;
        while c < run.chunks.len()
            && (c == first || single || elements + run.chunks[c].1 <= run.capacity)
        {
            if !run.resident {
                self.upload(run.level_buf(c), &run.spilled[c]);
            }
            self.write_params(&run.uniform, &run.chunk_params(run.chunks[c]));
            let mut enc = self.encoder();
            self.pass(
                &mut enc,
                Kernel::Gather,
                &[
                    &run.uniform,
                    run.level_buf(c),
                    &run.table,
                    &run.a,
                    &run.stats,
                ],
                self.stride_groups(run.chunks[c].1.div_ceil(4)),
            );
            self.submit_chunk(enc, &mut in_flight)?;
            elements += run.chunks[c].1;
            c += 1;
        }
        Ok(c - first)
    }

    /// Pass C: ordered compaction, chunk by chunk, under the thresholds in the table.
    fn compaction_pass(&self, run: &SelectRun) -> Result<KeptEntries, EngineError> {
        let mut kept = KeptEntries::default();
        for (c, &range) in run.chunks.iter().enumerate() {
            if !run.resident {
                self.upload(run.level_buf(c), &run.spilled[c]);
            }
            let cp = run.chunk_params(range);
            self.write_params(&run.uniform, &cp);
            let lv = run.level_buf(c);
            let tg = self.tile_groups(cp.num_tiles as usize);
            let mut enc = self.encoder();
            enc.clear_buffer(&run.b, 0, Some(range.1.div_ceil(4) as u64 * 4));
            let (params, table, tiles) = (&run.uniform, &run.table, &run.tiles);
            self.pass(&mut enc, Kernel::TileCount, &[params, lv, table, tiles], tg);
            self.pass(&mut enc, Kernel::Scan, &[params, tiles, &run.stats], (1, 1));
            let outputs = [params, lv, table, tiles, &run.a, &run.b];
            self.pass(&mut enc, Kernel::Scatter, &outputs, tg);
            self.submit(enc);
            let count = self.read_stats(&run.stats, &run.readback)?[stat::KEPT] as usize;
            if count > range.1 {
                return Err(EngineError::Inconsistent(format!(
                    "{count} kept of {} elements",
                    range.1
                )));
            }
            if count > 0 {
                let positions = self.gpu.read_words(&run.a, 0, count, &run.readback)?;
                kept.positions.extend(positions);
                let levels = self.gpu.read(&run.b, 0, count as u64, &run.readback)?;
                kept.levels.extend(levels);
            }
        }
        Ok(kept)
    }
}

/// Each level's cut bucket, after checking the device's bucket histogram against the plan.
fn cuts_of(hist: &[u64], plan: &SelectionPlan) -> Result<Vec<Option<BucketCut>>, EngineError> {
    for (l, row) in hist.chunks_exact(BUCKETS).enumerate() {
        let count: u64 = row.iter().sum();
        if count != plan.histogram[l] || plan.pruned[l] > count {
            return Err(EngineError::Inconsistent(format!(
                "level {l}: {count} entries on the device, the plan has {} (prunes {})",
                plan.histogram[l], plan.pruned[l]
            )));
        }
    }
    Ok(bucket_cuts(hist, &plan.pruned))
}

/// The table buffer's words before the thresholds are known: each level's cut bucket
/// (`u32::MAX`, no bucket, for a level that prunes nothing).
fn cut_bucket_table(cuts: &[Option<BucketCut>]) -> Vec<u32> {
    let mut table = vec![u32::MAX; TABLE_WORDS];
    for (l, c) in cuts.iter().enumerate() {
        table[l] = c.map_or(u32::MAX, |c| c.bucket);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_are_recognised() {
        assert!(is_subnormal(1e-40) && is_subnormal(-1e-40));
        assert!(!is_subnormal(0.0) && !is_subnormal(1e-30) && !is_subnormal(f32::MIN_POSITIVE));
    }

    #[test]
    fn the_table_names_each_cut_bucket() {
        let cuts = [None, Some(BucketCut { bucket: 7, rank: 2 })];
        let t = cut_bucket_table(&cuts);
        assert_eq!(t.len(), TABLE_WORDS);
        assert_eq!(&t[..3], &[u32::MAX, 7, u32::MAX]);
        assert!(t[TABLE_THRESHOLDS..].iter().all(|&w| w == u32::MAX));
    }
}
