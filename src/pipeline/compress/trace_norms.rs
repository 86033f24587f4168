//! Each model's trace norm `T_m`: the sum of the nuclear norms of its compressed 2-D deltas.
//!
//! The stored estimate is always the host estimator's ([`crate::tracenorm::nuclear_norm`]) on
//! the kept entries, whatever the engine: a GPU's products may contract `acc += a * x` into a
//! fused multiply-add where another device does not, and `T_m` sets gamma, which is stored in
//! the file, so a device-dependent estimate would make the file depend on the driver. The
//! estimates run on their own thread ([`NormWorker`]) beside the selection and coding of the
//! next tensors; inline if the thread cannot start. Either way each model's sum is taken in
//! the order the matrices were submitted, so the result is the same number.

use super::model::Model;
use super::StageTimes;
use crate::tracenorm::{DeltaValues, EstimatorOptions, SparseDelta};

use super::super::norm_worker::NormWorker;

/// The nuclear-norm estimates of one compression run.
pub(super) struct TraceNorms {
    worker: Option<NormWorker>,
}

/// One compressed matrix: its shape, kept entries and their levels, and each level's value.
pub(super) struct KeptMatrix {
    pub shape: (usize, usize),
    pub positions: Vec<u32>,
    pub codes: Vec<u8>,
    pub table: Vec<f32>,
}

impl TraceNorms {
    /// Starts the worker thread if `wanted`.
    pub fn start(wanted: bool) -> TraceNorms {
        let worker = wanted
            .then(|| NormWorker::start(EstimatorOptions::default()).ok())
            .flatten();
        TraceNorms { worker }
    }

    /// Adds the nuclear norm of `matrix` to model `mi`'s `T_m` (`model`): queued on the
    /// worker, or estimated now, timed into `clock`.
    pub fn add(&self, mi: usize, model: &mut Model, matrix: KeptMatrix, clock: &mut f64) {
        if let Some(worker) = &self.worker {
            let KeptMatrix {
                shape,
                positions,
                codes,
                table,
            } = matrix;
            worker.submit(mi, shape, positions, codes, table);
            return;
        }
        let delta = SparseDelta {
            rows: matrix.shape.0,
            cols: matrix.shape.1,
            positions: &matrix.positions,
            values: DeltaValues::Coded {
                codes: &matrix.codes,
                table: &matrix.table,
            },
        };
        model.trace_norm += super::timed(clock, || {
            crate::tracenorm::nuclear_norm(&delta, &EstimatorOptions::default())
        });
    }

    /// Waits for the worker's last estimates and adds them to the models' trace norms.
    pub fn finish(self, models: &mut [Model], times: &mut StageTimes) {
        let Some(worker) = self.worker else {
            return;
        };
        let wait = std::time::Instant::now();
        let (estimates, seconds) = worker.finish();
        times.trace_norm_wait += wait.elapsed().as_secs_f64();
        times.trace_norm += seconds;
        // In submission order: the same sums as inline.
        for (mi, estimate) in estimates {
            models[mi].trace_norm += estimate;
        }
    }
}
