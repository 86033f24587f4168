//! Step 4: each model's allocation plan (group and pruning rate of every compressed tensor),
//! made from the sizes and standard deviations pass 1 measured. Tensors are allocated pool by
//! pool ([`Pool`]): with `--embeddings separate` the embedding-like tables get an allocation of
//! their own, otherwise every compressed tensor of a model is in one pool.
//!
//! With `--target-size` / `--target-ratio` the sparsity is chosen here first
//! ([`Run::choose_sparsity`]): the tensors stored whole are already coded (pass 2 writes them
//! before any compressed one), so the bytes left for the compressed tensors are known, and the
//! size model ([`super::sizing`]) finds the sparsity whose expected payload fills them, from
//! pass 1's exact level histograms, without coding anything twice.

use super::model::{Model, Plan};
use super::sizing::{self, SizedTensor};
use super::{Run, SizeTarget, TargetOutcome};
use crate::algorithm::{allocate_rates, CompressParams};
use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::select::{Pool, TensorSelector};
use crate::error::Result;

impl Run<'_> {
    /// The allocation step, run once the tensors stored whole are written: picks the sparsity
    /// when a target size was asked for, then allocates every model's rates.
    pub(super) fn plan_allocation(&mut self, models: &mut [Model]) -> Result<()> {
        if let Some(target) = self.opts.target {
            let outcome = self.choose_sparsity(&models[0], target)?;
            self.opts.params.sparsity = outcome.sparsity;
            self.target = Some(outcome);
        }
        allocate(models, &self.base, &self.opts.selector, &self.opts.params);
        Ok(())
    }

    /// The sparsity at which model `m`'s file is expected to take the target's bytes: what is
    /// written so far, the vocabulary tails, the index entries and the frame are fixed; the
    /// compressed tensors get the rest.
    fn choose_sparsity(&self, m: &Model, target: SizeTarget) -> Result<TargetOutcome> {
        let tensor_bytes: u64 = m.ckpt.tensors.iter().map(|t| t.len).sum();
        let bytes = target.bytes(tensor_bytes);
        let mut fixed = m.writer.offset() as f64 + sizing::FOOTER_BYTES;
        let mut sized = Vec::new();
        for (t, plan) in m.ckpt.tensors.iter().zip(&m.plans) {
            match plan {
                Some(Plan::Compress(a)) => {
                    let b = &self.base.tensors[a.base];
                    let elem = t.len / t.numel().max(1);
                    fixed += (t.len - a.shared_numel as u64 * elem) as f64;
                    sized.push(SizedTensor {
                        numel: a.shared_numel as u64,
                        stats: a.stats.clone(),
                        pool: self.opts.selector.pool(&b.name, &b.shape),
                    });
                }
                _ => fixed += sizing::INDEX_BYTES_OTHER,
            }
        }
        let budget = bytes as f64 - fixed;
        let (sparsity, compressed) =
            sizing::sparsity_for_budget(&sized, &self.opts.params, budget)?;
        Ok(TargetOutcome {
            target_bytes: bytes,
            sparsity,
            estimated_bytes: (fixed + compressed).round() as u64,
        })
    }
}

/// Sets the allocation of every compressed tensor of every model, each model on its own.
pub(super) fn allocate(
    models: &mut [Model],
    base: &Checkpoint,
    selector: &TensorSelector,
    params: &CompressParams,
) {
    for m in models {
        for pool in [Pool::Blocks, Pool::Embeddings] {
            let in_pool: Vec<bool> = m
                .plans
                .iter()
                .map(|p| match p {
                    Some(Plan::Compress(a)) => {
                        let b = &base.tensors[a.base];
                        selector.pool(&b.name, &b.shape) == pool
                    }
                    _ => false,
                })
                .collect();
            allocate_plans(&mut m.plans, &in_pool, params);
        }
    }
}

/// Sets the allocation of the compressed tensors among `plans` for which `in_pool` is true,
/// from all of them at once.
pub(super) fn allocate_plans(
    plans: &mut [Option<Plan>],
    in_pool: &[bool],
    params: &CompressParams,
) {
    let stds: Vec<(u64, f64)> = plans
        .iter()
        .zip(in_pool)
        .filter_map(|(p, &inside)| match p {
            Some(Plan::Compress(a)) if inside => Some((a.shared_numel as u64, a.stats.std_dev())),
            _ => None,
        })
        .collect();
    let mut allocations = allocate_rates(&stds, params).into_iter();
    for (p, &inside) in plans.iter_mut().zip(in_pool) {
        if let Some(Plan::Compress(a)) = p {
            if inside {
                a.allocation = allocations.next();
            }
        }
    }
}
