//! The UltraDelta algorithm's pure rules, shared by every engine: parameters, min/max
//! quantization, variance-based sparsity allocation and the exact per-level random selection.
//! Nothing here touches files or devices; see `docs/ALGORITHM.md`.

pub mod allocation;
pub mod params;
pub mod quantize;
pub mod rescale;
pub mod selection;

pub use allocation::{allocate_rates, rate_floor, Allocation, Group};
pub use params::CompressParams;
pub use quantize::{QuantGrid, TensorStats};
pub use selection::{SelectionPlan, TensorKey};

/// Rounds half to even, as PyTorch's `torch.round` and WGSL's `round` do.
#[inline]
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}
