//! Compression parameters and their validation (done before any work).

use crate::error::{Error, Result};

/// The user's UltraDelta settings for one run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompressParams {
    /// Target sparsity `s`: the fraction of delta entries set to zero, in (0, 1).
    pub sparsity: f64,
    /// Quantization bit width `b`, 1..=8.
    pub bits: u32,
    /// Sparsity step between the allocation groups (`s_step`), >= 0.
    pub step: f64,
    /// Additional rescale factor `a` (> 0).
    pub factor: f64,
    /// Seed of the counter-based selection hash.
    pub seed: u64,
}

impl Default for CompressParams {
    fn default() -> Self {
        CompressParams {
            sparsity: 0.95,
            bits: 4,
            step: 0.01,
            factor: 1.0,
            seed: 0,
        }
    }
}

impl CompressParams {
    /// Rejects out-of-range settings with a message naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let s = self.sparsity;
        if !(s.is_finite() && s > 0.0 && s < 1.0) {
            return Err(Error::Param(format!(
                "--sparsity {s} must lie strictly between 0 and 1"
            )));
        }
        if !(1..=8).contains(&self.bits) {
            return Err(Error::Param(format!(
                "--bits {} must be between 1 and 8",
                self.bits
            )));
        }
        if !(self.step.is_finite() && self.step >= 0.0) {
            return Err(Error::Param(format!(
                "--step {} must be a finite number >= 0",
                self.step
            )));
        }
        if s + self.step > 1.0 {
            return Err(Error::Param(format!(
                "--sparsity {s} + --step {} gives the low-variance group a pruning rate above 1",
                self.step
            )));
        }
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return Err(Error::Param(format!(
                "--factor {} must be a finite number > 0",
                self.factor
            )));
        }
        if !self.rescale().is_finite() {
            return Err(Error::Param(format!(
                "--factor {} / (1 - --sparsity {s}) overflows: the scale would be infinite",
                self.factor
            )));
        }
        Ok(())
    }

    /// Number of quantization levels, `2^bits`.
    pub fn levels(&self) -> usize {
        1 << self.bits
    }

    /// The rescale applied to every kept value before trace-norm rescaling: `a / (1 - s)`.
    pub fn rescale(&self) -> f64 {
        self.factor / (1.0 - self.sparsity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range() {
        let ok = CompressParams::default();
        ok.validate().unwrap();
        assert_eq!(ok.rescale(), 1.0 / (1.0 - 0.95));
        for bad in [
            CompressParams {
                sparsity: 0.0,
                ..ok
            },
            CompressParams {
                sparsity: 1.0,
                ..ok
            },
            CompressParams {
                sparsity: f64::NAN,
                ..ok
            },
            CompressParams { bits: 0, ..ok },
            CompressParams { bits: 9, ..ok },
            CompressParams { step: -0.1, ..ok },
            CompressParams {
                sparsity: 0.995,
                step: 0.01,
                ..ok
            },
            CompressParams { factor: 0.0, ..ok },
            CompressParams {
                factor: f64::MAX,
                ..ok
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Param(_))), "{bad:?}");
        }
    }
}
