// include: common.wgsl delta.wgsl
// Analyze pass 1: exact min/max of the delta (order-preserving u32 keys), the lowest index of a
// non-finite delta, and the flags. Grid-stride loop over the chunk's elements.

@group(0) @binding(3) var<storage, read_write> stats: array<atomic<u32>>;

var<workgroup> wg_min: atomic<u32>;
var<workgroup> wg_max: atomic<u32>;
var<workgroup> wg_bad: atomic<u32>;
var<workgroup> wg_flags: atomic<u32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    if lid == 0u {
        atomicStore(&wg_min, 0xffffffffu);
        atomicStore(&wg_max, 0u);
        atomicStore(&wg_bad, 0xffffffffu);
        atomicStore(&wg_flags, 0u);
    }
    workgroupBarrier();
    var lo = 0xffffffffu;
    var hi = 0u;
    var bad = 0xffffffffu;
    var flags = 0u;
    let stride = nwg.x * WG;
    for (var i = gid.x; i < params.n; i += stride) {
        let r = delta_at(i);
        let key = order_key(bitcast<u32>(r.d));
        lo = min(lo, key);
        hi = max(hi, key);
        if (r.flags & FLAG_NONFINITE) != 0u {
            bad = min(bad, i);
        }
        flags |= r.flags;
    }
    atomicMin(&wg_min, lo);
    atomicMax(&wg_max, hi);
    atomicMin(&wg_bad, bad);
    atomicOr(&wg_flags, flags);
    workgroupBarrier();
    if lid == 0u {
        atomicMin(&stats[STAT_MIN], atomicLoad(&wg_min));
        atomicMax(&stats[STAT_MAX], atomicLoad(&wg_max));
        let b = atomicLoad(&wg_bad);
        if b != 0xffffffffu {
            atomicMin(&stats[STAT_BAD], params.start + b);
        }
        atomicOr(&stats[STAT_FLAGS], atomicLoad(&wg_flags));
    }
}
