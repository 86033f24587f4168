//! Each model's trace norm `T_m`: the sum of the nuclear norms of its compressed 2-D deltas.
//! With a host-side estimator they run on their own thread ([`NormWorker`]) beside the reads
//! and the selection of the next tensors; else (or if the thread cannot start) inline.
//! Either way each model's sum is taken in the order the matrices were submitted, so the
//! result is the same number.

use super::model::Model;
use super::StageTimes;
use crate::engine::{Engine, EngineError};
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
    /// Starts the worker thread if `engine` estimates on the host and `wanted`.
    pub fn start(wanted: bool, engine: &dyn Engine) -> TraceNorms {
        let worker = (wanted && engine.nuclear_norm_on_host())
            .then(|| NormWorker::start(EstimatorOptions::default()).ok())
            .flatten();
        TraceNorms { worker }
    }

    /// Adds the nuclear norm of `matrix` to model `mi`'s `T_m` (`model`): queued on the
    /// worker, or estimated now with `engine`, timed into `clock`.
    pub fn add(
        &self,
        mi: usize,
        model: &mut Model,
        matrix: KeptMatrix,
        engine: &mut dyn Engine,
        clock: &mut f64,
    ) -> Result<(), EngineError> {
        if let Some(worker) = &self.worker {
            let KeptMatrix {
                shape,
                positions,
                codes,
                table,
            } = matrix;
            worker.submit(mi, shape, positions, codes, table);
            return Ok(());
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
            engine.nuclear_norm(&delta, &EstimatorOptions::default())
        })?;
        Ok(())
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
