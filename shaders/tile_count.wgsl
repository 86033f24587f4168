// include: common.wgsl keep.wgsl
// Select pass C1: kept entries per tile (one workgroup = one tile of WG words = 4 * WG elements).
// 2-D dispatch: tile = workgroup_id.x + workgroup_id.y * num_workgroups.x.

@group(0) @binding(1) var<storage, read> levels_in: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> tiles: array<u32>;

var<workgroup> wg_count: atomic<u32>;

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
    if lid == 0u {
        atomicStore(&wg_count, 0u);
    }
    workgroupBarrier();
    let w = tile * WG + lid;
    if w < (params.n + 3u) / 4u {
        let c = countOneBits(kept_mask(w, levels_in[w]));
        if c != 0u {
            atomicAdd(&wg_count, c);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        tiles[tile] = atomicLoad(&wg_count);
    }
}
