//! Nuclear norms on a background thread: with the CPU engine, `compress` hands each compressed
//! matrix to [`NormWorker`] and goes on with the next tensors, so the estimates fill the time the
//! pipeline otherwise spends waiting for reads. Results come back in submission order, so each
//! model's `T_m` is summed in the same order, and is the same number, as when computed inline.

use crate::tracenorm::{nuclear_norm, DeltaValues, EstimatorOptions, SparseDelta};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Instant;

/// One matrix to estimate, for model `model`.
struct Job {
    model: usize,
    rows: usize,
    cols: usize,
    positions: Vec<u32>,
    /// The level of each entry, and the value of each level.
    codes: Vec<u8>,
    table: Vec<f32>,
}

/// What the worker did: per job `(model, estimate)` in submission order, and the seconds it
/// spent estimating.
type Done = (Vec<(usize, f64)>, f64);

/// A thread estimating nuclear norms with [`nuclear_norm`], at most [`NormWorker::QUEUE`] jobs
/// behind (a full queue makes [`submit`](NormWorker::submit) wait, which bounds the memory held
/// to a few matrices).
pub struct NormWorker {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<Done>>,
}

impl NormWorker {
    /// Jobs that may wait in the queue besides the one being estimated.
    pub const QUEUE: usize = 2;

    /// Starts the thread.
    pub fn start(opts: EstimatorOptions) -> std::io::Result<NormWorker> {
        let (jobs, queue) = sync_channel(Self::QUEUE);
        let thread = std::thread::Builder::new()
            .name("udelta-trace-norm".into())
            .spawn(move || run(queue, &opts))?;
        Ok(NormWorker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues the matrix `rows x cols` with the given kept entries (see [`SparseDelta`]; entry
    /// `k` has the value `table[codes[k]]`) for model `model`.
    pub fn submit(
        &self,
        model: usize,
        (rows, cols): (usize, usize),
        positions: Vec<u32>,
        codes: Vec<u8>,
        table: Vec<f32>,
    ) {
        let job = Job {
            model,
            rows,
            cols,
            positions,
            codes,
            table,
        };
        let jobs = self.jobs.as_ref().expect("the queue is open until finish");
        // The worker only stops when the queue closes or it panicked; a panic is reported by
        // `finish`.
        let _ = jobs.send(job);
    }

    /// Waits for every queued job; returns the estimates in submission order and the seconds
    /// spent estimating.
    pub fn finish(mut self) -> Done {
        self.jobs = None;
        let thread = self.thread.take().expect("finish runs once");
        match thread.join() {
            Ok(done) => done,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for NormWorker {
    /// On an early return of the caller: closes the queue and waits for the thread (it finishes
    /// the few queued jobs), discarding the results.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(queue: Receiver<Job>, opts: &EstimatorOptions) -> Done {
    let mut results = Vec::new();
    let mut seconds = 0.0;
    for job in queue {
        let t = Instant::now();
        let delta = SparseDelta {
            rows: job.rows,
            cols: job.cols,
            positions: &job.positions,
            values: DeltaValues::Coded {
                codes: &job.codes,
                table: &job.table,
            },
        };
        results.push((job.model, nuclear_norm(&delta, opts)));
        seconds += t.elapsed().as_secs_f64();
    }
    (results, seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small sparse matrix: every `step`-th element of `rows x cols`, with codes from its
    /// index into a table of 13 values.
    fn matrix(rows: usize, cols: usize, step: usize) -> (Vec<u32>, Vec<u8>, Vec<f32>) {
        let positions: Vec<u32> = (0..rows * cols).step_by(step).map(|p| p as u32).collect();
        let codes = positions.iter().map(|&p| ((p * 7919) % 13) as u8).collect();
        let table = (0..13).map(|c| c as f32 / 6.0 - 1.0).collect();
        (positions, codes, table)
    }

    #[test]
    fn results_come_back_in_submission_order_and_equal_inline_estimates() {
        let opts = EstimatorOptions::default();
        let shapes = [(300, 500, 7), (40, 30, 3), (600, 400, 11), (2, 2, 1)];
        let worker = NormWorker::start(opts.clone()).unwrap();
        let mut want = Vec::new();
        for (i, &(rows, cols, step)) in shapes.iter().enumerate() {
            let (positions, codes, table) = matrix(rows, cols, step);
            // Inline, with the values decoded: the worker's coded products give the same bits.
            let values: Vec<f32> = codes.iter().map(|&c| table[c as usize]).collect();
            let delta = SparseDelta {
                rows,
                cols,
                positions: &positions,
                values: DeltaValues::F32(&values),
            };
            want.push((i % 2, nuclear_norm(&delta, &opts)));
            worker.submit(i % 2, (rows, cols), positions, codes, table);
        }
        let (got, seconds) = worker.finish();
        assert_eq!(got, want);
        assert!(seconds >= 0.0);
    }

    #[test]
    fn dropping_an_unfinished_worker_waits_for_it_and_returns() {
        let worker = NormWorker::start(EstimatorOptions::default()).unwrap();
        let (positions, codes, table) = matrix(500, 700, 5);
        worker.submit(0, (500, 700), positions, codes, table);
        drop(worker);
    }
}
