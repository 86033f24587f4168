//! The size model shared by `--target-size` / `--target-ratio` and `--dry-run`: the bytes the
//! compressed tensors will take at a sparsity, from their level histograms alone (the
//! allocation, the exact kept counts of the selection and the coder's cost model,
//! [`crate::codec::estimate`]), and the sparsity that meets a byte budget.

use crate::algorithm::{allocate_rates, CompressParams, SelectionPlan, TensorKey, TensorStats};
use crate::checkpoint::select::Pool;
use crate::codec::block_count;
use crate::codec::estimate::expected_payload_bytes;
use crate::error::{Error, Result};
use crate::format::{FOOTER_LEN, HEADER_LEN};

/// Header and footer of a `.udelta` file.
pub const FRAME_BYTES: f64 = (HEADER_LEN + FOOTER_LEN) as f64;
/// The footer alone (the header is written when the file is created).
pub const FOOTER_BYTES: f64 = FOOTER_LEN as f64;

/// Index bytes (deflated JSON) of one compressed tensor's entry, besides its block table:
/// `inspect --json` charges each tensor its share of the index (`bytes_meta`); on the files of
/// the real MiniLM pair (one block per tensor: 150 bytes) and of synth 7b --layers 2 (16 to
/// 125 blocks: 280 to 1,420 bytes), 2026-12-06, this and [`INDEX_BYTES_PER_BLOCK`] fit both.
pub const INDEX_BYTES_COMPRESSED: f64 = 140.0;
/// Index bytes of one codec block's entry in a compressed tensor's block table.
pub const INDEX_BYTES_PER_BLOCK: f64 = 10.0;
/// Index bytes of the entry of a tensor stored whole (45 to 52 measured) or unchanged (24).
pub const INDEX_BYTES_OTHER: f64 = 48.0;

/// The lowest and highest sparsity `--target-size` considers (the upper one is lowered to
/// `1 - step` so that the low-variance group's rate stays at most 1).
const SPARSITY_RANGE: (f64, f64) = (0.01, 0.999);

/// One compressed tensor as the size model sees it.
#[derive(Debug, Clone)]
pub struct SizedTensor {
    /// Elements shared with the base (the delta).
    pub numel: u64,
    /// Its level histogram (measured in pass 1, or estimated from a sample).
    pub stats: TensorStats,
    /// Its allocation pool.
    pub pool: Pool,
}

/// What the size model expects of one compressed tensor at a sparsity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpectedTensor {
    /// Its pruning rate.
    pub rate: f64,
    /// Its kept entries (exact, given the histogram).
    pub kept: u64,
    /// Its payload and index entry, in bytes.
    pub bytes: f64,
}

/// What the size model expects of each compressed tensor at `params.sparsity`, in input order.
pub fn expected_tensors(tensors: &[SizedTensor], params: &CompressParams) -> Vec<ExpectedTensor> {
    let key = TensorKey::new(params.seed, "", "");
    let mut out = vec![None; tensors.len()];
    for pool in [Pool::Blocks, Pool::Embeddings] {
        let members: Vec<usize> = (0..tensors.len())
            .filter(|&i| tensors[i].pool == pool)
            .collect();
        let stds: Vec<(u64, f64)> = members
            .iter()
            .map(|&i| (tensors[i].numel, tensors[i].stats.std_dev()))
            .collect();
        for (&i, a) in members.iter().zip(allocate_rates(&stds, params)) {
            let t = &tensors[i];
            let counts = SelectionPlan::new(key, &t.stats, a.rate).kept_counts();
            out[i] = Some(ExpectedTensor {
                rate: a.rate,
                kept: counts.iter().sum(),
                bytes: expected_payload_bytes(t.numel, &counts)
                    + INDEX_BYTES_COMPRESSED
                    + INDEX_BYTES_PER_BLOCK * block_count(t.numel) as f64,
            });
        }
    }
    out.into_iter()
        .map(|e| e.expect("every tensor is in a pool"))
        .collect()
}

/// Expected bytes of all the compressed tensors (payloads and index entries) at
/// `params.sparsity`.
pub fn compressed_bytes_at(tensors: &[SizedTensor], params: &CompressParams) -> f64 {
    expected_tensors(tensors, params)
        .iter()
        .map(|e| e.bytes)
        .sum()
}

/// The sparsity at which the compressed tensors take `budget` bytes (bisection: the size falls
/// as the sparsity rises), with the bytes expected there. A budget outside what the range of
/// sparsities reaches is an error saying what is reachable.
pub fn sparsity_for_budget(
    tensors: &[SizedTensor],
    params: &CompressParams,
    budget: f64,
) -> Result<(f64, f64)> {
    let at = |s: f64| {
        compressed_bytes_at(
            tensors,
            &CompressParams {
                sparsity: s,
                ..*params
            },
        )
    };
    let (mut lo, mut hi) = (SPARSITY_RANGE.0, SPARSITY_RANGE.1.min(1.0 - params.step));
    let (largest, smallest) = (at(lo), at(hi));
    if budget < smallest || budget > largest {
        return Err(Error::Param(format!(
            "the target leaves {budget:.0} bytes for the compressed tensors, outside the \
             {smallest:.0} to {largest:.0} bytes that sparsities {lo} to {hi} give"
        )));
    }
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if at(mid) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((hi, at(hi)))
}
