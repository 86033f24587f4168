//! Engines compute what the algorithm needs from a (base, fine-tuned) tensor pair: pass 1
//! ([`Engine::analyze`]) finds min/max and the level histogram, pass 2 ([`Engine::select`])
//! quantizes again and returns the kept entries chosen by the exact per-level rule of
//! [`crate::algorithm::selection`]. Every result is exact (min/max, integer counts, integer
//! hashing), so all engines return identical values; [`cpu::CpuEngine`] is the reference.
//! [`Engine::nuclear_norm`] is not exact: the GPU engine's sparse products equal the CPU's to
//! the bit on lavapipe only, and to f32 rounding elsewhere ([`gpu::GpuSparseOperator`]); so
//! `compress` stores the host estimator's `T_m` whatever the engine, and files do not depend
//! on the device.
//!
//! `compress` reads its inputs once: pass 1 is [`Engine::analyze_levels`], which keeps every
//! element's level ([`PackedLevels`]), and pass 2 is [`Engine::select_levels`] on them.
//! [`Engine::analyze`] and [`Engine::select`] on the inputs remain (tests, benchmarks).

pub mod candidates;
pub mod cpu;
pub mod factory;
pub mod gpu;
mod kernels;
pub mod levels;
pub mod spare;

pub use candidates::CandidateSet;
pub use factory::{create, Fallback};
pub use levels::PackedLevels;

use crate::algorithm::{SelectionPlan, TensorStats};
use crate::checkpoint::dtype::FloatType;
use crate::tracenorm::{EstimatorOptions, SparseDelta};

/// One tensor pair as raw little-endian bytes: the delta is `finetuned - base`, in f32.
#[derive(Debug, Clone, Copy)]
pub struct DeltaInput<'a> {
    /// Base tensor bytes (`numel` elements).
    pub base: &'a [u8],
    /// Element type of `base`.
    pub base_type: FloatType,
    /// Fine-tuned tensor bytes (`numel` elements: the rows shared with the base).
    pub finetuned: &'a [u8],
    /// Element type of `finetuned`.
    pub finetuned_type: FloatType,
}

impl<'a> DeltaInput<'a> {
    /// A pair over the first `numel` elements of both byte slices (which must hold them).
    pub fn new(
        base: &'a [u8],
        base_type: FloatType,
        finetuned: &'a [u8],
        finetuned_type: FloatType,
        numel: usize,
    ) -> Self {
        DeltaInput {
            base: &base[..numel * base_type.size()],
            base_type,
            finetuned: &finetuned[..numel * finetuned_type.size()],
            finetuned_type,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.base.len() / self.base_type.size()
    }

    /// Writes the deltas of elements `start .. start + len` (f32 subtraction) into `out`
    /// (resized to `len`), using `scratch` for the base values when the two element types
    /// differ. Pairs of one type are widened and subtracted in one vectorized pass, and only
    /// the growth of `out` is zero-filled, so that a reused buffer costs no memset.
    pub fn delta_range(
        &self,
        start: usize,
        out: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
        len: usize,
    ) {
        let range = |t: FloatType| start * t.size()..(start + len) * t.size();
        let (ft, base) = (
            &self.finetuned[range(self.finetuned_type)],
            &self.base[range(self.base_type)],
        );
        let same_type_delta = match (self.finetuned_type, self.base_type) {
            (FloatType::F16, FloatType::F16) => Some(crate::simd::f16_delta_into as DeltaFn),
            (FloatType::BF16, FloatType::BF16) => Some(crate::simd::bf16_delta_into as DeltaFn),
            (FloatType::F32, FloatType::F32) => Some(crate::simd::f32_delta_into as DeltaFn),
            _ => None,
        };
        if let Some(delta) = same_type_delta {
            out.truncate(len);
            out.resize(len, 0.0);
            delta(ft, base, out);
            return;
        }
        self.finetuned_type.decode_into(ft, out);
        self.base_type.decode_into(base, scratch);
        out.iter_mut()
            .zip(scratch.iter())
            .for_each(|(f, b)| *f -= b);
    }
}

/// A same-type delta kernel: `out[i] = finetuned[i] - base[i]` from little-endian bytes.
type DeltaFn = fn(&[u8], &[u8], &mut [f32]);

/// The surviving entries of one tensor: positions ascending, with their levels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeptEntries {
    /// Element indices, strictly increasing.
    pub positions: Vec<u32>,
    /// Quantization level of each kept element.
    pub levels: Vec<u8>,
}

/// Spare position and level buffers of entry lists ([`KeptEntries`], selection candidates).
pub(crate) static SPARE_U32: spare::Spare<u32> = spare::Spare::new(96 << 20);
pub(crate) static SPARE_U8: spare::Spare<u8> = spare::Spare::new(32 << 20);

impl KeptEntries {
    /// `len` entries with unspecified values (the caller overwrites them), in reused memory
    /// where there is some.
    pub fn filled(len: usize) -> KeptEntries {
        KeptEntries {
            positions: SPARE_U32.filled(len),
            levels: SPARE_U8.filled(len),
        }
    }

    /// Hands the buffers over to the next entry list.
    pub fn recycle(self) {
        SPARE_U32.give(self.positions);
        SPARE_U8.give(self.levels);
    }

    /// The entries of `pieces` one after another, in reused memory where there is some.
    pub fn concat(pieces: Vec<KeptEntries>) -> KeptEntries {
        let total = pieces.iter().map(|p| p.positions.len()).sum();
        let mut all = KeptEntries {
            positions: SPARE_U32.with_capacity(total),
            levels: SPARE_U8.with_capacity(total),
        };
        for p in pieces {
            all.positions.extend_from_slice(&p.positions);
            all.levels.extend_from_slice(&p.levels);
        }
        all
    }
}

/// Why an engine could not process a tensor (the caller adds file and tensor names).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A delta that is NaN or infinite.
    #[error("delta at element {index} is not finite (base {base}, fine-tuned {finetuned})")]
    NonFinite {
        /// Lowest offending element index.
        index: u64,
        /// Base value there.
        base: f32,
        /// Fine-tuned value there.
        finetuned: f32,
    },
    /// A GPU failure.
    #[error("GPU: {0}")]
    Gpu(String),
    /// The engine's result disagrees with the plan (an engine or driver bug).
    #[error("engine result inconsistent with the plan: {0}")]
    Inconsistent(String),
}

/// What an engine moved between the host and its device, and how often the host blocked on
/// the device (each `poll` that waits, map round trips included). All zero on the CPU engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    /// Bytes written to device buffers (inputs, levels, parameters, operator blocks).
    pub bytes_uploaded: u64,
    /// Bytes copied back to the host.
    pub bytes_read_back: u64,
    /// Times the host waited for the device.
    pub blocking_waits: u64,
    /// Microseconds the host spent in those waits (the device's work it did not hide).
    pub blocking_wait_us: u64,
    /// Tensors submitted while an earlier tensor's results were still on the device, unread
    /// (pass 1 of `compress`: the next tensor goes to the device before the host waits).
    pub overlapped_tensors: u64,
}

/// A pass-1 analysis begun by [`Engine::start_analysis`].
#[derive(Debug)]
pub struct AnalysisTicket {
    bits: u32,
    state: TicketState,
}

#[derive(Debug)]
enum TicketState {
    /// Computed already.
    Ready(TensorStats, PackedLevels),
    /// Submitted to a device: the engine's number for it.
    InFlight(u64),
}

impl AnalysisTicket {
    /// A ticket whose result is known.
    fn ready(stats: TensorStats, levels: PackedLevels, bits: u32) -> Self {
        AnalysisTicket {
            bits,
            state: TicketState::Ready(stats, levels),
        }
    }

    /// A ticket for work an engine has submitted and numbered `id`.
    pub(crate) fn in_flight(id: u64, bits: u32) -> Self {
        AnalysisTicket {
            bits,
            state: TicketState::InFlight(id),
        }
    }

    /// The number of a ticket in flight (`None` when ready).
    pub(crate) fn in_flight_id(&self) -> Option<u64> {
        match self.state {
            TicketState::InFlight(id) => Some(id),
            TicketState::Ready(..) => None,
        }
    }

    /// True when the result is known (finishing the ticket does not wait for a device).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, TicketState::Ready(..))
    }

    /// The bit width the analysis was started at.
    pub fn bits(&self) -> u32 {
        self.bits
    }
}

/// A compute engine (CPU reference or GPU).
pub trait Engine: Send {
    /// Name recorded in the file, e.g. `cpu` or the adapter's name and backend (nothing that
    /// varies between runs on one machine, such as a thread count).
    fn name(&self) -> String;

    /// Pass 1: exact min/max of the delta, then its level histogram at `bits`.
    fn analyze(&mut self, input: &DeltaInput, bits: u32) -> Result<TensorStats, EngineError>;

    /// Pass 1 keeping what pass 2 needs, so that the inputs are read once: the statistics and
    /// every element's level (those [`select`](Self::select) would compute again). The default
    /// quantizes on the host after [`analyze`](Self::analyze).
    fn analyze_levels(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        let stats = self.analyze(input, bits)?;
        Ok((stats.clone(), cpu::levels_of(input, &stats)))
    }

    /// [`analyze_levels`](Self::analyze_levels) in two steps, so that a device can work on
    /// the next tensor while the host waits for this one: start the next tensor before
    /// finishing this one. The default computes everything here and returns a ready ticket.
    fn start_analysis(
        &mut self,
        input: &DeltaInput,
        bits: u32,
    ) -> Result<AnalysisTicket, EngineError> {
        let (stats, levels) = self.analyze_levels(input, bits)?;
        Ok(AnalysisTicket::ready(stats, levels, bits))
    }

    /// The result of a [`start_analysis`](Self::start_analysis) ticket; `input` must be the
    /// input the ticket was started on. The default returns a ready ticket's result and
    /// analyses `input` again for a ticket it did not start (the same result).
    fn finish_analysis(
        &mut self,
        ticket: AnalysisTicket,
        input: &DeltaInput,
    ) -> Result<(TensorStats, PackedLevels), EngineError> {
        match ticket.state {
            TicketState::Ready(stats, levels) => Ok((stats, levels)),
            TicketState::InFlight(_) => self.analyze_levels(input, ticket.bits),
        }
    }

    /// Pass 2: the kept entries under `plan` (exactly `plan.kept_counts()` per level).
    fn select(
        &mut self,
        input: &DeltaInput,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError>;

    /// Pass 2 from the levels [`analyze_levels`](Self::analyze_levels) kept: the same kept
    /// entries as [`select`](Self::select) on the input. The default selects on the host.
    fn select_levels(
        &mut self,
        levels: &PackedLevels,
        stats: &TensorStats,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        cpu::CpuEngine.select_levels(levels, stats, plan)
    }

    /// Pass 2 from the candidates pass 1 kept ([`CandidateSet::extract`]): the same kept
    /// entries as [`select_levels`](Self::select_levels) on the tensor's levels, for any plan
    /// whose rate is at or above the floor the candidates were kept for. The default selects
    /// on the host.
    fn select_candidates(
        &mut self,
        candidates: &CandidateSet,
        plan: &SelectionPlan,
    ) -> Result<KeptEntries, EngineError> {
        candidates.select(plan)
    }

    /// Estimated nuclear norm (sum of singular values) of a sparse delta, for trace-norm
    /// rescaling. The default runs [`crate::tracenorm::nuclear_norm`] on the CPU; the GPU engine
    /// does the matrix products on the device.
    fn nuclear_norm(
        &mut self,
        delta: &SparseDelta,
        opts: &EstimatorOptions,
    ) -> Result<f64, EngineError> {
        Ok(crate::tracenorm::nuclear_norm(delta, opts))
    }

    /// True when [`nuclear_norm`](Self::nuclear_norm) is the default, host-only
    /// [`crate::tracenorm::nuclear_norm`], so that the caller may run that function on another
    /// thread instead (same result). Engines that override `nuclear_norm` return false.
    fn nuclear_norm_on_host(&self) -> bool {
        true
    }

    /// Device traffic and waits since the engine was made (zero for host-only engines).
    fn counters(&self) -> DeviceCounters {
        DeviceCounters::default()
    }
}

/// Checks an engine's kept entries against the plan's per-level counts (in parallel, in
/// pieces of [`CHECK_PIECE`] entries).
pub fn check_kept(kept: &KeptEntries, plan: &SelectionPlan) -> Result<(), EngineError> {
    use rayon::prelude::*;
    if kept.positions.len() != kept.levels.len() {
        return Err(EngineError::Inconsistent(format!(
            "{} kept positions, {} levels",
            kept.positions.len(),
            kept.levels.len()
        )));
    }
    let counts = kept
        .levels
        .par_chunks(CHECK_PIECE)
        .map(cpu::byte_histogram)
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let n_levels = plan.histogram.len();
    if let Some(l) = (n_levels..256).find(|&l| counts[l] != 0) {
        return Err(EngineError::Inconsistent(format!("level {l} out of range")));
    }
    if counts[..n_levels] != plan.kept_counts()[..] {
        return Err(EngineError::Inconsistent(format!(
            "kept per level {:?}, plan {:?}",
            &counts[..n_levels],
            plan.kept_counts()
        )));
    }
    // Each piece overlaps the next by one entry, so every adjacent pair is compared.
    let increasing = |w: &[u32]| w.windows(2).all(|p| p[0] < p[1]);
    let pieces = kept.positions.len().div_ceil(CHECK_PIECE);
    let sorted = (0..pieces).into_par_iter().all(|i| {
        let end = ((i + 1) * CHECK_PIECE + 1).min(kept.positions.len());
        increasing(&kept.positions[i * CHECK_PIECE..end])
    });
    if !sorted {
        return Err(EngineError::Inconsistent(
            "kept positions not strictly increasing".into(),
        ));
    }
    Ok(())
}

/// Entries per parallel piece of [`check_kept`].
const CHECK_PIECE: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::quantize::QuantGrid;
    use crate::algorithm::{TensorKey, TensorStats};

    /// A plan over 2 levels keeping `kept` entries of each (nothing pruned).
    fn plan(kept: [u64; 2]) -> SelectionPlan {
        let stats = TensorStats {
            grid: QuantGrid {
                lo: 0.0,
                hi: 1.0,
                bits: 1,
            },
            histogram: kept.to_vec(),
        };
        SelectionPlan::new(TensorKey::new(0, "m", "t"), &stats, 0.0)
    }

    #[test]
    fn check_kept_accepts_the_plan_and_names_each_inconsistency() {
        // More than one parallel piece, so that the boundary between pieces is checked too.
        let n = CHECK_PIECE + 10;
        let good = KeptEntries {
            positions: (0..n as u32).map(|i| 2 * i).collect(),
            levels: (0..n).map(|i| (i % 2) as u8).collect(),
        };
        let counts = [n.div_ceil(2) as u64, (n / 2) as u64];
        assert_eq!(plan(counts).kept_counts(), counts.to_vec());
        check_kept(&good, &plan(counts)).unwrap();
        let fails = |k: &KeptEntries, want: &str| {
            let e = check_kept(k, &plan(counts)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        let mut k = good.clone();
        k.positions.swap(CHECK_PIECE - 1, CHECK_PIECE);
        fails(&k, "not strictly increasing");
        let mut k = good.clone();
        k.positions[CHECK_PIECE] = k.positions[CHECK_PIECE - 1];
        fails(&k, "not strictly increasing");
        let mut k = good.clone();
        k.levels[7] = 2;
        fails(&k, "level 2 out of range");
        let mut k = good.clone();
        k.levels[7] = 0;
        fails(&k, "kept per level");
        let mut k = good;
        k.levels.pop();
        fails(&k, "kept positions");
    }
}
