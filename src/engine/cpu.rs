//! The CPU reference engine: multi-threaded with rayon, chunk by chunk, results independent of
//! the thread count (chunks are combined in order; all results are exact).

use super::levels::LevelSlice;
use super::{check_kept, kernels, DeltaInput, Engine, EngineError, KeptEntries, PackedLevels};
use crate::algorithm::quantize::{LevelRule, QuantGrid};
use crate::algorithm::selection::element_key;
use crate::algorithm::{SelectionPlan, TensorStats};
use crate::simd::multiversion;
use rayon::prelude::*;

/// Elements per work item.
const CHUNK: usize = 1 << 16;

/// The CPU reference engine.
#[derive(Debug, Default)]
pub struct CpuEngine;

/// Per-thread buffers of one chunk.
#[derive(Default)]
pub(super) struct Scratch {
    delta: Vec<f32>,
    base: Vec<f32>,
    levels: Vec<u8>,
    /// The selection's candidates in the chunk.
    pub(super) candidates: kernels::Candidates,
}

impl Scratch {
    /// Fills `levels` with the levels of `delta`.
    fn levels(&mut self, rule: &LevelRule) {
        // Every level is overwritten: only growth is zero-filled.
        self.levels.truncate(self.delta.len());
        self.levels.resize(self.delta.len(), 0);
        if rule.by_multiplier {
            kernels::levels_into(&self.delta, rule, &mut self.levels);
        } else {
            for (o, &x) in self.levels.iter_mut().zip(&self.delta) {
                *o = rule.level_by_search(x);
            }
        }
    }
}

/// Runs `f(first_index, len, scratch)` on every chunk of `n` elements in parallel; results
/// in chunk order.
///
/// Each thread keeps its scratch buffers for the life of the process (about 1.1 MB): rayon
/// calls a `map_init` initializer once per split job, and fresh buffers of that size come
/// from `mmap`, so their pages would be faulted in and zeroed again and again.
pub(super) fn for_chunks<T: Send>(
    n: usize,
    f: impl Fn(usize, usize, &mut Scratch) -> T + Sync,
) -> Vec<T> {
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| SCRATCH.with_borrow_mut(|sc| f(c * CHUNK, CHUNK.min(n - c * CHUNK), sc)))
        .collect()
}

thread_local! {
    /// The calling thread's chunk buffers ([`for_chunks`]).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// [`for_chunks`] where chunk `c` also writes `out[c * per_chunk ..][.. per_chunk]` (the last
/// piece may be shorter): `f(first_index, len, out_piece, scratch)`.
fn for_chunks_into<T: Send>(
    n: usize,
    out: &mut [u8],
    per_chunk: usize,
    f: impl Fn(usize, usize, &mut [u8], &mut Scratch) -> T + Sync,
) -> Vec<T> {
    debug_assert_eq!(out.len().div_ceil(per_chunk), n.div_ceil(CHUNK));
    out.par_chunks_mut(per_chunk)
        .enumerate()
        .map(|(c, piece)| {
            SCRATCH.with_borrow_mut(|sc| f(c * CHUNK, CHUNK.min(n - c * CHUNK), piece, sc))
        })
        .collect()
}

/// Runs `f(first_index, scratch)` on every chunk of the input, with the chunk's deltas in
/// `scratch.delta`; results in chunk order.
fn map_chunks<T: Send>(input: &DeltaInput, f: impl Fn(usize, &mut Scratch) -> T + Sync) -> Vec<T> {
    for_chunks(input.numel(), |start, len, sc| {
        input.delta_range(start, &mut sc.delta, &mut sc.base, len);
        f(start, sc)
    })
}

/// Where `select` takes each element's level from.
#[derive(Clone, Copy)]
enum LevelSource<'a> {
    /// Quantized from the input under the rule.
    Input(&'a DeltaInput<'a>, &'a LevelRule),
    /// Unpacked from the levels pass 1 kept.
    Packed(&'a PackedLevels),
}

/// Runs `f(first_index, scratch)` on every chunk with the chunk's levels in `scratch.levels`.
fn map_level_chunks<T: Send>(
    src: LevelSource,
    f: impl Fn(usize, &mut Scratch) -> T + Sync,
) -> Vec<T> {
    match src {
        LevelSource::Input(input, rule) => map_chunks(input, |start, sc| {
            sc.levels(rule);
            f(start, sc)
        }),
        LevelSource::Packed(p) => for_chunks(p.numel(), |start, len, sc| {
            p.unpack_into(start, len, &mut sc.levels);
            f(start, sc)
        }),
    }
}

/// Runs `f(first_index, levels, candidates)` on every chunk with the chunk's levels where
/// they lie (kept levels are read packed, as stored; levels of an input are computed into the
/// scratch buffer).
fn map_selection_chunks<T: Send>(
    src: LevelSource,
    f: impl Fn(usize, LevelSlice, &mut kernels::Candidates) -> T + Sync,
) -> Vec<T> {
    match src {
        LevelSource::Input(input, rule) => map_chunks(input, |start, sc| {
            sc.levels(rule);
            f(start, LevelSlice::Bytes(&sc.levels), &mut sc.candidates)
        }),
        LevelSource::Packed(p) => for_chunks(p.numel(), |start, len, sc| {
            f(start, p.slice(start, len), &mut sc.candidates)
        }),
    }
}

/// `-0.0` becomes `+0.0`: min/max may return either zero, and `lo`/`hi` are stored bit-exact.
pub fn canonical_zero(x: f32) -> f32 {
    if x == 0.0 {
        0.0
    } else {
        x
    }
}

multiversion! {
    /// Lane-wise min and max, and whether any value is NaN or infinite (integer test of the
    /// exponent); eight independent lanes let the compiler vectorize.
    fn min_max_lanes(d: &[f32]) -> ([f32; 8], [f32; 8], bool) {
        let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
        let mut special = [0u32; 8];
        let mut lanes = d.chunks_exact(8);
        for c in &mut lanes {
            for k in 0..8 {
                lo[k] = if c[k] < lo[k] { c[k] } else { lo[k] };
                hi[k] = if c[k] > hi[k] { c[k] } else { hi[k] };
                special[k] |= ((c[k].to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
            }
        }
        for &x in lanes.remainder() {
            lo[0] = lo[0].min(x);
            hi[0] = hi[0].max(x);
            special[0] |= !x.is_finite() as u32;
        }
        (lo, hi, special.iter().any(|&s| s != 0))
    }
}

/// Min, max and the first non-finite index of one chunk.
fn chunk_min_max(start: usize, d: &[f32]) -> (f32, f32, Option<usize>) {
    let (lo, hi, special) = min_max_lanes(d);
    let bad = if special {
        d.iter().position(|x| !x.is_finite()).map(|i| start + i)
    } else {
        None
    };
    (
        lo.into_iter().fold(f32::INFINITY, f32::min),
        hi.into_iter().fold(f32::NEG_INFINITY, f32::max),
        bad,
    )
}

/// Histogram of levels. Up to 16 levels (4 bits or fewer) they are counted by comparison,
/// 16 byte counters per lane ([`count_levels_16`]); beyond, by [`byte_histogram`].
pub(super) fn level_histogram(levels: &[u8], n_levels: usize) -> Vec<u64> {
    if n_levels <= 16 {
        let mut counts = [0u64; 16];
        count_levels_16(levels, &mut counts);
        return counts[..n_levels].to_vec();
    }
    byte_histogram(levels)[..n_levels].to_vec()
}

/// The count of every byte value in `bytes` (fewer than 2^32 of them), into four interleaved
/// tables so that runs of equal values (most entries share a few levels) do not serialize on
/// one counter.
pub(crate) fn byte_histogram(bytes: &[u8]) -> [u64; 256] {
    let mut tables = [[0u32; 256]; 4];
    let mut quads = bytes.chunks_exact(4);
    for c in &mut quads {
        for (t, &l) in tables.iter_mut().zip(c) {
            t[l as usize] += 1;
        }
    }
    for &l in quads.remainder() {
        tables[0][l as usize] += 1;
    }
    std::array::from_fn(|l| tables.iter().map(|t| t[l] as u64).sum())
}

multiversion! {
    /// Adds to `counts[v]` the number of entries equal to `v < 16`: per 32 entries, one
    /// comparison per level into byte counters, flushed before they can overflow.
    fn count_levels_16(levels: &[u8], counts: &mut [u64; 16]) {
        const LANES: usize = 32;
        for block in levels.chunks(255 * LANES) {
            let mut acc = [[0u8; LANES]; 16];
            let mut vectors = block.chunks_exact(LANES);
            for c in &mut vectors {
                for (v, a) in acc.iter_mut().enumerate() {
                    for (a, &l) in a.iter_mut().zip(c) {
                        *a += (l == v as u8) as u8;
                    }
                }
            }
            for (count, a) in counts.iter_mut().zip(&acc) {
                *count += a.iter().map(|&x| x as u64).sum::<u64>();
            }
            for &l in vectors.remainder() {
                counts[l as usize & 15] += 1;
            }
        }
    }
}

/// The exact min and max of the delta (`-0.0` as `+0.0`; `[0, 0]` for an empty tensor), or
/// the first non-finite delta.
pub fn min_max(input: &DeltaInput) -> Result<(f32, f32), EngineError> {
    let parts = map_chunks(input, |start, sc| chunk_min_max(start, &sc.delta));
    if let Some(index) = parts.iter().find_map(|p| p.2) {
        return Err(EngineError::NonFinite {
            index: index as u64,
            base: input.base_type.load(input.base, index),
            finetuned: input.finetuned_type.load(input.finetuned, index),
        });
    }
    if parts.is_empty() {
        return Ok((0.0, 0.0));
    }
    let lo = parts.iter().map(|p| p.0).fold(f32::INFINITY, f32::min);
    let hi = parts.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
    Ok((canonical_zero(lo), canonical_zero(hi)))
}

/// Pass 1: the statistics, and with `keep` every element's level, packed.
fn stats_and_levels(
    input: &DeltaInput,
    bits: u32,
    keep: bool,
) -> Result<(TensorStats, Option<PackedLevels>), EngineError> {
    let (lo, hi) = min_max(input)?;
    Ok(quantize(input, QuantGrid { lo, hi, bits }, keep))
}

/// The level histogram under `grid` (the input's exact min and max), and with `keep` every
/// element's level, packed.
pub fn quantize(
    input: &DeltaInput,
    grid: QuantGrid,
    keep: bool,
) -> (TensorStats, Option<PackedLevels>) {
    let rule = grid.level_rule();
    let n_levels = grid.levels();
    if keep {
        let (histograms, levels) = packed_levels(input, &rule, grid.bits);
        let histogram = sum_histograms(histograms, n_levels);
        return (TensorStats { grid, histogram }, Some(levels));
    }
    let histograms = map_chunks(input, |_, sc| {
        sc.levels(&rule);
        level_histogram(&sc.levels, n_levels)
    });
    let histogram = sum_histograms(histograms, n_levels);
    (TensorStats { grid, histogram }, None)
}

/// The per-chunk histograms and every element's level under `rule`, packed in place.
fn packed_levels(input: &DeltaInput, rule: &LevelRule, bits: u32) -> (Vec<Vec<u64>>, PackedLevels) {
    let n = input.numel();
    let mut packed = PackedLevels::buffer(PackedLevels::packed_len(n, bits));
    let histograms = pack_levels_to(input, rule, bits, &mut packed);
    let levels = PackedLevels::from_bytes(n, bits, packed).expect("one packed level per element");
    (histograms, levels)
}

/// Writes every element's level under `rule`, packed, to `out`
/// ([`PackedLevels::packed_len`] bytes); returns the per-chunk histograms.
fn pack_levels_to(
    input: &DeltaInput,
    rule: &LevelRule,
    bits: u32,
    out: &mut [u8],
) -> Vec<Vec<u64>> {
    let per_chunk = PackedLevels::packed_len(CHUNK, bits);
    for_chunks_into(input.numel(), out, per_chunk, |start, len, out, sc| {
        input.delta_range(start, &mut sc.delta, &mut sc.base, len);
        sc.levels(rule);
        PackedLevels::pack_to(&sc.levels, bits, out);
        level_histogram(&sc.levels, rule.levels)
    })
}

/// The level histogram of `input` under `grid` (the whole tensor's exact min and max), its
/// levels packed into `out` ([`PackedLevels::packed_len`] bytes): [`quantize`] for a piece
/// of a tensor (an even number of elements but for the last piece), written in place.
pub fn quantize_to(input: &DeltaInput, grid: QuantGrid, out: &mut [u8]) -> Vec<u64> {
    let histograms = pack_levels_to(input, &grid.level_rule(), grid.bits, out);
    sum_histograms(histograms, grid.levels())
}

/// The sum of per-chunk histograms of `n_levels` levels.
fn sum_histograms(parts: Vec<Vec<u64>>, n_levels: usize) -> Vec<u64> {
    let mut histogram = vec![0u64; n_levels];
    for h in parts {
        histogram.iter_mut().zip(h).for_each(|(a, b)| *a += b);
    }
    histogram
}

/// Every element's level under `stats`' grid, packed (for engines whose pass 1 keeps no
/// levels of its own).
pub fn levels_of(input: &DeltaInput, stats: &TensorStats) -> PackedLevels {
    packed_levels(input, &stats.grid.level_rule(), stats.grid.bits).1
}

impl Engine for CpuEngine {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError> {
        Ok(stats_and_levels(input, bits, false)?.0)
    }

    fn analyze_levels(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        let (stats, levels) = stats_and_levels(input, bits, true)?;
        Ok((stats, levels.expect("levels kept")))
    }

    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        let rule = stats.grid.level_rule();
        select_with_margin(LevelSource::Input(input, &rule), plan, WINDOW_SIGMAS)
    }

    fn select_levels(
        &mut self,
        levels: &PackedLevels,
        _stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        select_with_margin(LevelSource::Packed(levels), plan, WINDOW_SIGMAS)
    }
}

/// Half-width of the key window around each level's expected cut, in standard deviations of
/// the cut's position (`sqrt(p(1-p)/n)` in quantile units).
pub(super) const WINDOW_SIGMAS: f64 = 8.0;

/// Per level, the key window `[lo, hi)` expected to hold the largest pruned key: keys are a
/// pseudo-random permutation, so the cut of a level pruning `k` of `n` lies near `k/n * 2^32`.
fn key_windows(plan: &SelectionPlan, sigmas: f64) -> Vec<(u64, u64)> {
    plan.histogram
        .iter()
        .zip(&plan.pruned)
        .map(|(&n, &k)| key_window(n, k, sigmas))
        .collect()
}

/// The key window `[lo, hi)` of a level pruning `k` of its `n` entries: `sigmas` standard
/// deviations of the cut's position (`sqrt(p(1-p)/n)` in quantile units, `p = k/n`) plus
/// `sigmas / n` on either side of `p * 2^32`; `(0, 0)` when nothing is pruned, `(2^32, 2^32)`
/// when everything is.
fn key_window(n: u64, k: u64, sigmas: f64) -> (u64, u64) {
    const SPAN: f64 = 4_294_967_296.0;
    if k == 0 {
        return (0, 0);
    }
    if k == n {
        return (1 << 32, 1 << 32);
    }
    let p = k as f64 / n as f64;
    let margin = sigmas * (p * (1.0 - p) / n as f64).sqrt() + sigmas / n as f64;
    let at = |q: f64| (q.clamp(0.0, 1.0) * SPAN) as u64;
    (at(p - margin), at(p + margin))
}

/// The start of [`key_window`]: at 8 sigma, the level's cut (its `k`-th smallest key) lies
/// below it about once in 10^14 levels.
pub(super) fn window_start(n: u64, k: u64, sigmas: f64) -> u64 {
    key_window(n, k, sigmas).0
}

/// Every level's key window ([`key_window`]), also indexable by a u8 level (no bounds
/// check, and a copy a loop can keep in registers).
pub(super) struct Windows {
    list: Vec<(u64, u64)>,
    of: [(u64, u64); 256],
}

impl Windows {
    /// The windows of `plan`'s levels, `sigmas` wide.
    pub(super) fn new(plan: &SelectionPlan, sigmas: f64) -> Windows {
        Self::from_list(key_windows(plan, sigmas))
    }

    /// Windows that hold every key, for `n_levels` levels (the cut is then found among all
    /// the entries passed on).
    pub(super) fn whole(n_levels: usize) -> Windows {
        Self::from_list(vec![(0, 1 << 32); n_levels])
    }

    /// Level `level`'s window.
    #[inline(always)]
    pub(super) fn of(&self, level: u8) -> (u64, u64) {
        self.of[level as usize]
    }

    fn from_list(list: Vec<(u64, u64)>) -> Windows {
        let mut of = [(0u64, 0u64); 256];
        of[..list.len()].copy_from_slice(&list);
        Windows { list, of }
    }

    /// The vector prefilter's minimum key per level: each window's start, where that fits a
    /// u32 (a start of 2^32 lets the largest key through, and [`ChunkSelection::add`] drops
    /// it).
    fn min_keys(&self) -> [u32; 256] {
        prefilter_keys(self.list.iter().map(|&(w_lo, _)| w_lo))
    }
}

/// The vector prefilter's minimum key per level from each level's lowest key of interest
/// (`starts`, one per level): the start where that fits a u32; a start of 2^32 lets the
/// largest key through, and the caller's exact test drops it. Levels beyond get `u32::MAX`.
pub(super) fn prefilter_keys(starts: impl IntoIterator<Item = u64>) -> [u32; 256] {
    let mut min_key = [u32::MAX; 256];
    for (m, start) in min_key.iter_mut().zip(starts) {
        *m = start.min(u32::MAX as u64) as u32;
    }
    min_key
}

/// What one piece of a selection pass contributes: the keys inside each level's window, and
/// the entries at or above the window's start (kept unless their key is below the cut), with
/// their keys and their count per level.
#[derive(Default)]
struct ChunkSelection {
    window: Vec<(u8, u32)>,
    maybe_kept: KeptEntries,
    /// The key of each entry of `maybe_kept`.
    keys: Vec<u32>,
    /// Entries of `maybe_kept` per level.
    per_level: Vec<u64>,
}

impl ChunkSelection {
    /// An empty piece over `n_levels` levels, with room for `capacity` entries.
    fn new(n_levels: usize, capacity: usize) -> ChunkSelection {
        let mut part = ChunkSelection {
            per_level: vec![0; n_levels],
            ..Default::default()
        };
        part.maybe_kept.positions.reserve(capacity);
        part.maybe_kept.levels.reserve(capacity);
        part.keys.reserve(capacity);
        part
    }

    /// Passes on the entry at `position` of `level` with `key`, unless it lies below its
    /// level's window (and is pruned).
    #[inline(always)]
    fn add(&mut self, windows: &Windows, position: u32, level: u8, key: u32) {
        let (w_lo, w_hi) = windows.of[level as usize];
        if (key as u64) < w_lo {
            return;
        }
        if (key as u64) < w_hi {
            self.window.push((level, key));
        }
        self.maybe_kept.positions.push(position);
        self.maybe_kept.levels.push(level);
        self.keys.push(key);
        self.per_level[level as usize] += 1;
    }
}

/// Selection in one pass over the elements: entries below their level's key window are
/// pruned, entries in it are candidates, and the exact cut is found among the candidates.
/// Should a cut fall outside its window (about one level in 10^14 at 8 sigma, and whenever
/// `sigmas` is 0), the cuts are found exactly from all keys instead. The result is the same
/// either way: in each level, the entries with the `k_v` smallest keys are pruned.
fn select_with_margin(
    src: LevelSource,
    plan: &SelectionPlan,
    sigmas: f64,
) -> Result<KeptEntries, EngineError> {
    let key = plan.key;
    let windows = Windows::new(plan, sigmas);
    let n_levels = windows.list.len();
    let min_key = windows.min_keys();
    let parts = map_selection_chunks(src, |start, levels, c| {
        kernels::candidates_into(levels, key, start as u32, &min_key, n_levels, c);
        let mut part = ChunkSelection::new(n_levels, c.offsets.len());
        for (&j, &kk) in c.offsets.iter().zip(&c.keys) {
            part.add(&windows, start as u32 + j, levels.get(j as usize), kk);
        }
        part
    });
    match cut_thresholds(&parts, plan, &windows) {
        Some(thresholds) => kept_from_parts(parts, &thresholds, plan),
        None => select_exact(src, plan),
    }
}

/// Per level, the smallest key kept, from the pieces of a selection pass under `windows`:
/// the level's entries not passed on are below its window, and the cut is found among the
/// keys in it. `None` when a cut falls outside its window.
fn cut_thresholds(
    parts: &[ChunkSelection],
    plan: &SelectionPlan,
    windows: &Windows,
) -> Option<Vec<u64>> {
    let n_levels = windows.list.len();
    let mut below = plan.histogram.clone();
    let mut window_keys = vec![Vec::new(); n_levels];
    for p in parts {
        below
            .iter_mut()
            .zip(&p.per_level)
            .for_each(|(b, &n)| *b -= n);
        p.window
            .iter()
            .for_each(|&(l, kk)| window_keys[l as usize].push(kk));
    }
    thresholds_in_windows(&below, &mut window_keys, plan, windows)
}

/// Per level, the smallest key kept, given the level's entries `below` its window and the
/// keys in it: the cut is the `(k_v - below_v)`-th smallest key in the window (the window's
/// start when that is 0). `None` when a cut falls outside its window.
pub(super) fn thresholds_in_windows(
    below: &[u64],
    window_keys: &mut [Vec<u32>],
    plan: &SelectionPlan,
    windows: &Windows,
) -> Option<Vec<u64>> {
    let mut thresholds = Vec::with_capacity(below.len());
    for (l, (&k_v, keys)) in plan.pruned.iter().zip(window_keys.iter_mut()).enumerate() {
        let (b, (w_lo, _)) = (below[l], windows.list[l]);
        if b > k_v || b + (keys.len() as u64) < k_v {
            return None;
        }
        thresholds.push(if k_v == b {
            w_lo
        } else {
            *keys.select_nth_unstable((k_v - b - 1) as usize).1 as u64 + 1
        });
    }
    Some(thresholds)
}

/// The entries of `parts` whose key reaches their level's threshold, in order, checked
/// against the plan.
fn kept_from_parts(
    parts: Vec<ChunkSelection>,
    thresholds: &[u64],
    plan: &SelectionPlan,
) -> Result<KeptEntries, EngineError> {
    let pieces: Vec<KeptEntries> = parts
        .par_iter()
        .map(|p| {
            let m = &p.maybe_kept;
            let mut piece = KeptEntries::default();
            for ((&i, &l), &kk) in m.positions.iter().zip(&m.levels).zip(&p.keys) {
                if kk as u64 >= thresholds[l as usize] {
                    piece.positions.push(i);
                    piece.levels.push(l);
                }
            }
            piece
        })
        .collect();
    drop(parts);
    let kept = KeptEntries::concat(pieces);
    check_kept(&kept, plan)?;
    Ok(kept)
}

/// The selection by definition, from every key of every level (the fallback of
/// [`select_with_margin`]; memory 4 bytes per element).
fn select_exact(src: LevelSource, plan: &SelectionPlan) -> Result<KeptEntries, EngineError> {
    let levels: Vec<Vec<u8>> = map_level_chunks(src, |_, sc| sc.levels.clone());
    let levels: Vec<u8> = levels.concat();
    let mut keys = vec![Vec::new(); plan.histogram.len()];
    for (i, &l) in levels.iter().enumerate() {
        keys[l as usize].push(element_key(plan.key, i as u32));
    }
    let thresholds: Vec<u64> = keys
        .iter_mut()
        .zip(&plan.pruned)
        .map(|(ks, &k_v)| {
            if k_v == 0 {
                0
            } else {
                *ks.select_nth_unstable(k_v as usize - 1).1 as u64 + 1
            }
        })
        .collect();
    let mut kept = KeptEntries::default();
    for (i, &l) in levels.iter().enumerate() {
        if element_key(plan.key, i as u32) as u64 >= thresholds[l as usize] {
            kept.positions.push(i as u32);
            kept.levels.push(l);
        }
    }
    check_kept(&kept, plan)?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::selection::TensorKey;
    use crate::checkpoint::dtype::FloatType;

    /// Straightforward restatement of steps 1 and 3, one element at a time, sorting every
    /// level's keys: the oracle for the chunked, bucketed engine.
    fn naive(
        base: &[f32],
        ft: &[f32],
        bits: u32,
        rate: f64,
        key: TensorKey,
    ) -> (TensorStats, KeptEntries) {
        let d: Vec<f32> = ft.iter().zip(base).map(|(f, b)| f - b).collect();
        let lo = d.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let grid = QuantGrid { lo, hi, bits };
        // The authors' division form, in f32.
        let l1 = ((1u32 << bits) - 1) as f32;
        let levels: Vec<usize> = d
            .iter()
            .map(|&x| {
                if hi > lo {
                    ((x - lo) / (hi - lo) * l1).round_ties_even() as usize
                } else {
                    0
                }
            })
            .collect();
        let mut histogram = vec![0u64; 1 << bits];
        levels.iter().for_each(|&l| histogram[l] += 1);
        let stats = TensorStats { grid, histogram };
        let plan = SelectionPlan::new(key, &stats, rate);
        let mut pruned = vec![false; d.len()];
        for (v, &k) in plan.pruned.iter().enumerate() {
            let mut members: Vec<(u32, usize)> = (0..d.len())
                .filter(|&i| levels[i] == v)
                .map(|i| (element_key(key, i as u32), i))
                .collect();
            members.sort_unstable();
            members
                .iter()
                .take(k as usize)
                .for_each(|&(_, i)| pruned[i] = true);
        }
        let mut kept = KeptEntries::default();
        for i in 0..d.len() {
            if !pruned[i] {
                kept.positions.push(i as u32);
                kept.levels.push(levels[i] as u8);
            }
        }
        (stats, kept)
    }

    fn noise(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let u = crate::algorithm::selection::mix32(i.wrapping_mul(2654435761) ^ seed)
                    as f32
                    / u32::MAX as f32;
                (u - 0.5) * scale * (1.0 + 8.0 * (u - 0.5).powi(4))
            })
            .collect()
    }

    fn run(base: &[f32], ft: &[f32], ty: FloatType, bits: u32, rate: f64) {
        let (mut b, mut f) = (Vec::new(), Vec::new());
        ty.encode_into(base, &mut b);
        ty.encode_into(ft, &mut f);
        // The oracle sees the values the engine sees: rounded to the dtype.
        let (mut bv, mut fv) = (Vec::new(), Vec::new());
        ty.decode_into(&b, &mut bv);
        ty.decode_into(&f, &mut fv);
        let key = TensorKey::new(3, "model", "t");
        let (want_stats, want_kept) = naive(&bv, &fv, bits, rate, key);
        let input = DeltaInput::new(&b, ty, &f, ty, base.len());
        let stats = CpuEngine.analyze(&input, bits).unwrap();
        assert_eq!(stats, want_stats);
        let plan = SelectionPlan::new(key, &stats, rate);
        let kept = CpuEngine.select(&input, &stats, &plan).unwrap();
        assert_eq!(kept, want_kept);
        // A zero-width window forces the exact fallback; a wide one many candidates.
        let rule = stats.grid.level_rule();
        let (stats_kept, levels) = CpuEngine.analyze_levels(&input, bits).unwrap();
        assert_eq!(stats_kept, want_stats);
        for sigmas in [0.0, 1000.0] {
            for src in [
                LevelSource::Input(&input, &rule),
                LevelSource::Packed(&levels),
            ] {
                assert_eq!(select_with_margin(src, &plan, sigmas).unwrap(), want_kept);
            }
        }
        assert_eq!(
            CpuEngine.select_levels(&levels, &stats, &plan).unwrap(),
            want_kept
        );
    }

    #[test]
    fn matches_the_naive_oracle() {
        for (n, ty, bits, rate) in [
            (1, FloatType::F32, 4, 0.95),
            (1000, FloatType::F16, 4, 0.9),
            (200_003, FloatType::BF16, 4, 0.95),
            (140_000, FloatType::F32, 2, 0.5),
            (70_001, FloatType::F16, 8, 0.99),
            (5000, FloatType::F32, 1, 0.3),
        ] {
            let base = noise(n, 1, 0.1);
            let ft: Vec<f32> = base
                .iter()
                .zip(noise(n, 2, 0.01))
                .map(|(b, d)| b + d)
                .collect();
            run(&base, &ft, ty, bits, rate);
        }
    }

    #[test]
    fn constant_and_zero_tensors() {
        let base = noise(3000, 5, 1.0);
        run(&base, &base, FloatType::F32, 4, 0.95); // all-zero delta: nothing kept
        let ft: Vec<f32> = base.iter().map(|b| b + 0.5).collect();
        run(&base, &ft, FloatType::F32, 4, 0.95);
        let input = DeltaInput::new(&[], FloatType::F16, &[], FloatType::F16, 0);
        let stats = CpuEngine.analyze(&input, 4).unwrap();
        assert_eq!(stats.numel(), 0);
    }

    #[test]
    fn non_finite_delta_names_the_element() {
        let mut ft = vec![0.0f32; 100_000];
        ft[70_000] = f32::NAN;
        ft[90_000] = f32::INFINITY;
        let mut f = Vec::new();
        FloatType::F32.encode_into(&ft, &mut f);
        let b = vec![0u8; f.len()];
        let input = DeltaInput::new(&b, FloatType::F32, &f, FloatType::F32, ft.len());
        let err = CpuEngine.analyze(&input, 4).unwrap_err();
        assert!(
            matches!(err, EngineError::NonFinite { index: 70_000, .. }),
            "{err}"
        );
    }
}
