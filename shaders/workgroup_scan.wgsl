// Workgroup-wide inclusive scan helper shared by the scan and scatter kernels: `sums` holds
// one value per invocation; `scan_step` is one Hillis-Steele step.

var<workgroup> sums: array<u32, 256>;

// One Hillis-Steele step of an inclusive scan of `sums`.
fn scan_step(lid: u32, offset: u32) {
    var v = 0u;
    if lid >= offset {
        v = sums[lid - offset];
    }
    workgroupBarrier();
    sums[lid] += v;
    workgroupBarrier();
}
