//! The order tensors are processed in, and the reads each step needs.

use super::model::{Model, Plan};
use super::open::Kind;
use super::RunCounters;
use crate::checkpoint::reader::Checkpoint;
use std::sync::Arc;

use super::super::prefetch::{ReadJob, TensorRead};

/// Tensor names in processing order: the first fine-tune's order, then any other names.
pub(super) fn schedule(models: &[Model]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    for m in models {
        for t in &m.ckpt.tensors {
            if seen.insert(t.name.clone()) {
                order.push(t.name.clone());
            }
        }
    }
    order
}

/// The reads one tensor name needs: the base tensor, then the fine-tuned tensor of each model
/// that compresses it, in model order (nothing when no model compresses it).
pub(super) fn compress_reads(name: &str, base: &Arc<Checkpoint>, models: &[Model]) -> ReadJob {
    let mut job = Vec::new();
    for m in models {
        let Some(ti) = m.ckpt.index_of(name) else {
            continue;
        };
        if let Kind::Compress(bi, _) = m.kinds[ti] {
            if job.is_empty() {
                job.push(TensorRead {
                    ckpt: base.clone(),
                    tensor: base.tensors[bi].clone(),
                });
            }
            job.push(TensorRead {
                ckpt: m.ckpt.clone(),
                tensor: m.ckpt.tensors[ti].clone(),
            });
        }
    }
    job
}

/// The reads of pass 1, one job per name in `order`, and whether each name is analysed in
/// blocks: its inputs exceed `threshold` bytes, and its job, then empty, reads nothing.
pub(super) fn pass1_reads(
    order: &[String],
    base: &Arc<Checkpoint>,
    models: &[Model],
    threshold: u64,
) -> (Vec<ReadJob>, Vec<bool>) {
    order
        .iter()
        .map(|n| {
            let job = compress_reads(n, base, models);
            if job_bytes(&job) > threshold {
                (Vec::new(), true)
            } else {
                (job, false)
            }
        })
        .unzip()
}

/// Bytes of tensor data one read job reads.
fn job_bytes(job: &ReadJob) -> u64 {
    job.iter().map(|r| r.tensor.len).sum()
}

/// The number of compressed tensors and the bytes of their inputs, the base's counted once
/// per tensor name (as [`compress_reads`] reads them).
pub(super) fn compressed_inputs(
    order: &[String],
    base: &Arc<Checkpoint>,
    models: &[Model],
) -> RunCounters {
    let mut c = RunCounters::default();
    for name in order {
        let reads = compress_reads(name, base, models);
        c.compressed_tensors += reads.len().saturating_sub(1) as u64;
        c.compressed_input_bytes += job_bytes(&reads);
    }
    c
}

/// Bytes pass 1 reads (both sides of every compared or compressed pair), for its progress bar.
pub(super) fn pass1_bytes(base: &Checkpoint, models: &[Model]) -> u64 {
    let per_model = |m: &Model| -> u64 {
        m.ckpt
            .tensors
            .iter()
            .zip(&m.kinds)
            .map(|(t, k)| match k {
                Kind::Raw => 0,
                Kind::Compare(bi) | Kind::Compress(bi, _) => t.len + base.tensors[*bi].len,
            })
            .sum()
    };
    models.iter().map(per_model).sum()
}

/// Bytes pass 2 reads (raw tensors, and both sides of compressed pairs), for its progress bar.
pub(super) fn pass2_bytes(base: &Checkpoint, models: &[Model]) -> u64 {
    let per_model = |m: &Model| -> u64 {
        m.ckpt
            .tensors
            .iter()
            .zip(&m.plans)
            .map(|(t, p)| match p {
                Some(Plan::Raw) => t.len,
                Some(Plan::Compress(a)) => t.len + base.tensors[a.base].len,
                _ => 0,
            })
            .sum()
    };
    models.iter().map(per_model).sum()
}
