// include: common.wgsl
// Select pass B: append every element whose key lies in its level's cut bucket to the candidate
// list (order does not matter). A candidate is stored as (level << BUCKET_SHIFT) |
// (key & KEY_LOW_MASK): the key's top bits are the level's cut bucket, known to the host.

@group(0) @binding(1) var<storage, read> levels_in: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> candidates: array<u32>;
@group(0) @binding(4) var<storage, read_write> stats: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let words = (params.n + 3u) / 4u;
    let stride = nwg.x * WG;
    let capacity = arrayLength(&candidates);
    for (var w = gid.x; w < words; w += stride) {
        let lw = levels_in[w];
        for (var j = 0u; j < 4u; j++) {
            let i = w * 4u + j;
            if i < params.n {
                let level = (lw >> (8u * j)) & 0xffu;
                let key = element_key(params.start + i);
                if (key >> BUCKET_SHIFT) == table[level] {
                    let slot = atomicAdd(&stats[STAT_CANDIDATES], 1u);
                    if slot < capacity {
                        candidates[slot] = (level << BUCKET_SHIFT) | (key & KEY_LOW_MASK);
                    }
                }
            }
        }
    }
}
