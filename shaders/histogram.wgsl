// include: common.wgsl delta.wgsl
// Analyze pass 2: the level histogram (L <= MAX_LEVELS bins), counted per workgroup in shared memory
// and added to the global bins once per workgroup.

@group(0) @binding(3) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> stats: array<atomic<u32>>;

var<workgroup> wg_hist: array<atomic<u32>, MAX_LEVELS>;
var<workgroup> wg_flags: atomic<u32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // One bin per invocation (the host checks WG >= MAX_LEVELS).
    if lid < MAX_LEVELS {
        atomicStore(&wg_hist[lid], 0u);
    }
    if lid == 0u {
        atomicStore(&wg_flags, 0u);
    }
    workgroupBarrier();
    var flags = 0u;
    let stride = nwg.x * WG;
    for (var i = gid.x; i < params.n; i += stride) {
        let r = delta_at(i);
        let lv = level_of(r.d);
        atomicAdd(&wg_hist[lv.x], 1u);
        flags |= r.flags | lv.y;
    }
    if flags != 0u {
        atomicOr(&wg_flags, flags);
    }
    workgroupBarrier();
    if lid < params.num_levels {
        let c = atomicLoad(&wg_hist[lid]);
        if c != 0u {
            atomicAdd(&hist[lid], c);
        }
    }
    if lid == 0u {
        let f = atomicLoad(&wg_flags);
        if f != 0u {
            atomicOr(&stats[STAT_FLAGS], f);
        }
    }
}
