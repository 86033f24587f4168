// include: common.wgsl keep.wgsl workgroup_scan.wgsl
// Select pass C3: ordered compaction. Each workgroup takes one tile, ranks its kept entries
// with a workgroup prefix sum, and writes positions (global indices, ascending) and levels
// (packed four per word with atomicOr into a zeroed buffer) from the tile's scanned offset.

@group(0) @binding(1) var<storage, read> levels_in: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read> tiles: array<u32>;
@group(0) @binding(4) var<storage, read_write> out_positions: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_levels: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = wid.x + wid.y * nwg.x;
    if tile >= params.num_tiles {
        return;
    }
    let w = tile * WG + lid;
    var mask = 0u;
    var lw = 0u;
    if w < (params.n + 3u) / 4u {
        lw = levels_in[w];
        mask = kept_mask(w, lw);
    }
    let c = countOneBits(mask);
    sums[lid] = c;
    inclusive_scan(lid);
    var r = tiles[tile] + sums[lid] - c;
    for (var j = 0u; j < 4u; j++) {
        if ((mask >> j) & 1u) != 0u {
            out_positions[r] = params.start + w * 4u + j;
            let level = (lw >> (8u * j)) & 0xffu;
            atomicOr(&out_levels[r >> 2u], level << (8u * (r & 3u)));
            r += 1u;
        }
    }
}
