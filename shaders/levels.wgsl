// include: common.wgsl delta.wgsl
// Select pass A: the level of every element, packed four per u32 word (element 4w + j in byte j
// of word w), and per level the histogram of key buckets (level-major, L * BUCKETS bins).

@group(0) @binding(3) var<storage, read_write> levels_out: array<u32>;
@group(0) @binding(4) var<storage, read_write> bucket_hist: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read_write> stats: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let words = (params.n + 3u) / 4u;
    let stride = nwg.x * WG;
    var flags = 0u;
    for (var w = gid.x; w < words; w += stride) {
        var packed = 0u;
        for (var j = 0u; j < 4u; j++) {
            let i = w * 4u + j;
            if i < params.n {
                let r = delta_at(i);
                let lv = level_of(r.d);
                flags |= r.flags | lv.y;
                let key = element_key(params.start + i);
                atomicAdd(&bucket_hist[lv.x * BUCKETS + (key >> BUCKET_SHIFT)], 1u);
                packed |= lv.x << (8u * j);
            }
        }
        levels_out[w] = packed;
    }
    if flags != 0u {
        atomicOr(&stats[STAT_FLAGS], flags);
    }
}
