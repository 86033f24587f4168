// include: common.wgsl
// Sparse (CSR) times dense block: y = M x for the rows of one row block of M, where x and y are
// row-major blocks of `w` vectors (x[i * w + l] is entry i of vector l). A^T products use the
// CSC copy of A (the CSR of A^T) with this same kernel.
//
// One invocation per output element (row r, vector l), in a grid-stride loop: neighbouring
// invocations of a row read neighbouring entries of x. Each output is accumulated in f32 from
// 0 over the row's stored entries in ascending order, so the result does not depend on the
// dispatch size. It is the CPU operator's order, but a driver may still fuse the multiply and
// the add into an FMA: bit-equal to the CPU on lavapipe, within f32 rounding elsewhere (see
// src/engine/gpu/spmm.rs).
//
// Params: n = rows of this block, start = global index of its first row, num_levels = w.

@group(0) @binding(1) var<storage, read> row_ptr: array<u32>; // n + 1 offsets into idx/val
@group(0) @binding(2) var<storage, read> idx: array<u32>; // column of each entry
@group(0) @binding(3) var<storage, read> val: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let w = params.num_levels;
    let total = params.n * w;
    let stride = groups.x * WG;
    for (var item = gid.x; item < total; item += stride) {
        let r = item / w;
        let l = item - r * w;
        var acc = 0.0;
        let end = row_ptr[r + 1u];
        for (var k = row_ptr[r]; k < end; k++) {
            acc += val[k] * x[idx[k] * w + l];
        }
        y[(params.start + r) * w + l] = acc;
    }
}
