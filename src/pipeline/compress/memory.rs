//! The host memory `compress` may use, and how it is shared out: one bound,
//! [`MEMORY_BOUND`], from which every other budget is derived.
//!
//! - the levels pass 1 keeps for pass 2 stay in memory up to [`KEPT_LEVELS_BUDGET`], the rest go
//!   to a temporary file ([`super::kept`]);
//! - a tensor name whose inputs (the base tensor and every fine-tuned tensor compressed against
//!   it) exceed [`BLOCKED_INPUT_BYTES`] is not read whole: pass 1 analyses it in blocks of
//!   elements ([`super::blocked`]), reading it twice, so the read-ahead
//!   ([`super::super::prefetch`]) holds only tensors below that size. The threshold, 768 MiB,
//!   lets the largest tables of LLaMA-2 7B and 13B (a 32000 x 4096 or x 5120 embedding or
//!   head: 524 and 655 MB per pair in 16 bits) be read once; Llama-3's 128256-row tables
//!   (2.1 GB per pair at 8B) are still read twice;
//! - the read-ahead holds at most [`READ_AHEAD_BYTES`] (the step in hand included), or the
//!   next step alone when it is larger; on an engine that analyses on a device, the pair in
//!   flight is held beside the step in hand until the latter has been submitted, but only
//!   while both together take at most [`IN_FLIGHT_BYTES`] (otherwise the one in flight is
//!   finished first).
//!
//! At the defaults (2 GiB): 512 MiB of kept data, 512 MiB of read-ahead (or one pair of up to
//! 768 MiB), and a huge tensor as blocks of 2 x 32 MiB (shared out among the threads) plus its
//! own packed levels.

use crate::error::{Error, Result};

/// Peak host memory that `compress` is designed to stay under (the process's peak RSS, with
/// the libraries and the page tables, is measured in `docs/BENCHMARKS.md`).
pub const MEMORY_BOUND: u64 = 2 << 30;

/// Bytes of kept levels held in memory at most.
pub const KEPT_LEVELS_BUDGET: u64 = MEMORY_BOUND / 4;

/// Bytes of tensors pass 1 reads ahead at most (but always the next step's, however large).
pub const READ_AHEAD_BYTES: u64 = MEMORY_BOUND / 4;

/// A tensor name whose inputs take more bytes than this is analysed in blocks.
pub const BLOCKED_INPUT_BYTES: u64 = MEMORY_BOUND / 8 * 3;

/// Bytes of the pair in flight on a device and the step in hand together, at most.
pub const IN_FLIGHT_BYTES: u64 = MEMORY_BOUND / 4;

/// The environment variable that replaces [`IN_FLIGHT_BYTES`] (tests raise or lower it).
pub const IN_FLIGHT_ENV: &str = "UDELTA_IN_FLIGHT_BYTES";

/// The environment variable that replaces [`BLOCKED_INPUT_BYTES`] (tests lower it to send
/// small tensors through the blocked path).
pub const BLOCKED_ENV: &str = "UDELTA_BLOCKED_INPUT_BYTES";

/// Bytes of one side (base or fine-tuned) of the blocks in flight (all threads' together), per
/// byte of the blocked threshold (32 MiB at the default threshold).
pub const BLOCK_FRACTION: u64 = 24;

/// A number of bytes from the environment variable `var`, or `default` when it is unset.
pub fn bytes_from_env(var: &str, default: u64) -> Result<u64> {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .map_err(|_| Error::Param(format!("{var}={v}: expected a number of bytes"))),
        Err(_) => Ok(default),
    }
}
