// include: common.wgsl workgroup_scan.wgsl
// Select pass C2: exclusive prefix sum of the tile counts in place, in one workgroup (each
// thread scans a contiguous run of tiles); the chunk's total goes to stats[STAT_KEPT].

@group(0) @binding(1) var<storage, read_write> tiles: array<u32>;
@group(0) @binding(2) var<storage, read_write> stats: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    let per = (params.num_tiles + WG - 1u) / WG;
    let begin = min(lid * per, params.num_tiles);
    let end = min(begin + per, params.num_tiles);
    var s = 0u;
    for (var t = begin; t < end; t++) {
        s += tiles[t];
    }
    sums[lid] = s;
    inclusive_scan(lid);
    var run = sums[lid] - s;
    for (var t = begin; t < end; t++) {
        let c = tiles[t];
        tiles[t] = run;
        run += c;
    }
    if lid == WG - 1u {
        atomicStore(&stats[STAT_KEPT], sums[lid]);
    }
}
