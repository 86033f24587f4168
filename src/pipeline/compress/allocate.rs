//! Step 4: each model's allocation plan (group and pruning rate of every compressed tensor),
//! made from the sizes and standard deviations pass 1 measured.

use super::model::{Model, Plan};
use crate::algorithm::{allocate_rates, CompressParams};

/// Sets the allocation of every compressed tensor of every model, each model on its own.
pub(super) fn allocate(models: &mut [Model], params: &CompressParams) {
    for m in models {
        allocate_plans(&mut m.plans, params);
    }
}

/// Sets the allocation of the compressed tensors among `plans`, from all of them at once.
pub(super) fn allocate_plans(plans: &mut [Option<Plan>], params: &CompressParams) {
    let stds: Vec<(u64, f64)> = plans
        .iter()
        .filter_map(|p| match p {
            Some(Plan::Compress(a)) => Some((a.shared_numel as u64, a.stats.std_dev())),
            _ => None,
        })
        .collect();
    let mut allocations = allocate_rates(&stds, params).into_iter();
    for p in plans.iter_mut() {
        if let Some(Plan::Compress(a)) = p {
            a.allocation = allocations.next();
        }
    }
}
