//! Step 4: each model's allocation plan (group and pruning rate of every compressed tensor),
//! made from the sizes and standard deviations pass 1 measured. Tensors are allocated pool by
//! pool ([`Pool`]): with `--embeddings separate` the embedding-like tables get an allocation of
//! their own, otherwise every compressed tensor of a model is in one pool.

use super::model::{Model, Plan};
use crate::algorithm::{allocate_rates, CompressParams};
use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::select::{Pool, TensorSelector};

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
