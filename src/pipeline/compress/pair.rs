//! One compressed tensor pair (a base tensor and its fine-tuned tensor), as both passes hand
//! it to the engine: its input, its errors (naming the right file), and the `--verify` check.

use crate::checkpoint::dtype::{dtype_name, FloatType};
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::engine::{cpu::CpuEngine, DeltaInput, EngineError};
use crate::error::{Error, Result};

/// A base tensor and the fine-tuned tensor compressed against it.
pub(super) struct Pair<'a> {
    pub base: &'a Checkpoint,
    pub b: &'a TensorEntry,
    pub ft: &'a Checkpoint,
    pub t: &'a TensorEntry,
}

impl<'a> Pair<'a> {
    /// The engine input over the first `shared_numel` elements of the two tensors' bytes.
    pub fn input<'d>(
        &self,
        base_bytes: &'d [u8],
        ft_bytes: &'d [u8],
        shared_numel: usize,
    ) -> Result<DeltaInput<'d>> {
        Ok(DeltaInput::new(
            base_bytes,
            self.base_type()?,
            ft_bytes,
            self.ft_type()?,
            shared_numel,
        ))
    }

    /// The base tensor's float type.
    pub fn base_type(&self) -> Result<FloatType> {
        float_type(self.base, self.b)
    }

    /// The fine-tuned tensor's float type.
    pub fn ft_type(&self) -> Result<FloatType> {
        float_type(self.ft, self.t)
    }

    /// An engine failure on this pair, naming the file it comes from: the base's file when
    /// the offending value is the base's (a NaN or infinity there), else the fine-tune's.
    pub fn engine_error(&self, e: EngineError) -> Error {
        let tensor = &self.t.name;
        match e {
            EngineError::NonFinite { base, .. } if !base.is_finite() => Error::tensor(
                self.base.shard_path(self.b),
                tensor,
                format!("the base holds a non-finite value: {e}"),
            ),
            EngineError::Gpu(m) => Error::tensor(
                self.ft.shard_path(self.t),
                tensor,
                format!("GPU engine: {m}"),
            ),
            other => Error::tensor(self.ft.shard_path(self.t), tensor, other.to_string()),
        }
    }

    /// `--verify`: recomputes `got` with the CPU engine, into `clock`, and fails on any
    /// difference, naming `engine` (the engine that computed `got`) and `what` it computed.
    pub fn check_against_cpu<T: PartialEq>(
        &self,
        got: &T,
        engine: &str,
        what: &str,
        clock: &mut f64,
        reference: impl FnOnce(&mut CpuEngine) -> std::result::Result<T, EngineError>,
    ) -> Result<()> {
        let want =
            super::timed(clock, || reference(&mut CpuEngine)).map_err(|e| self.engine_error(e))?;
        if want == *got {
            return Ok(());
        }
        Err(Error::tensor(
            self.ft.shard_path(self.t),
            &self.t.name,
            format!("--verify: the {what} of the '{engine}' engine differ from the CPU reference engine's"),
        ))
    }
}

/// The float type of tensor `t` of `c`, or an error naming it.
fn float_type(c: &Checkpoint, t: &TensorEntry) -> Result<FloatType> {
    t.float_type().ok_or_else(|| {
        Error::tensor(
            c.shard_path(t),
            &t.name,
            format!("dtype {} cannot be compressed", dtype_name(t.dtype)),
        )
    })
}
