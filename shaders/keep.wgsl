// Which of the four elements of levels word `w` are kept: key >= threshold[level] and the
// level does not prune everything. Bit j of the result is element 4w + j. Requires common.wgsl
// and a `table` binding (cut buckets, then (threshold, prune_all) pairs at TABLE_THRESHOLDS).

fn kept_mask(w: u32, lw: u32) -> u32 {
    var mask = 0u;
    for (var j = 0u; j < 4u; j++) {
        let i = w * 4u + j;
        if i < params.n {
            let level = (lw >> (8u * j)) & 0xffu;
            let threshold = table[TABLE_THRESHOLDS + 2u * level];
            let prune_all = table[TABLE_THRESHOLDS + 2u * level + 1u];
            if prune_all == 0u && element_key(params.start + i) >= threshold {
                mask |= 1u << j;
            }
        }
    }
    return mask;
}
