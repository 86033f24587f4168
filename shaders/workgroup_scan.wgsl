// Workgroup-wide inclusive scan shared by the scan and scatter kernels: each invocation puts
// its value in `sums[lid]`, then `inclusive_scan(lid)` leaves the inclusive prefix sum there.

var<workgroup> sums: array<u32, WG>;

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

// Inclusive prefix sum of `sums` over the WG invocations (Hillis-Steele, log2(WG) steps).
fn inclusive_scan(lid: u32) {
    workgroupBarrier();
    for (var offset = 1u; offset < WG; offset *= 2u) {
        scan_step(lid, offset);
    }
}
