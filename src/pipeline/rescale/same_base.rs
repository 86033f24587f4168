//! Whether `.udelta` files were made against one base: the same fingerprint of the base's
//! tensor names, dtypes and shapes (when both files have that fingerprint; files written
//! before it have one over the tensors they used), and the same CRC-32 for every base tensor
//! both files recorded, of which there must be at least one.

use crate::error::{Error, Result};
use crate::format::UdeltaReader;
use std::collections::HashMap;

/// Refuses `readers` unless every file was made against the first one's base.
pub fn check(readers: &[UdeltaReader]) -> Result<()> {
    let first = &readers[0];
    for r in &readers[1..] {
        let (a, b) = (&first.index.base, &r.index.base);
        if a.identity == b.identity && a.fingerprint != b.fingerprint {
            return Err(Error::format(
                r.path(),
                format!(
                    "made against another base (fingerprint {} vs {} of {})",
                    b.fingerprint,
                    a.fingerprint,
                    first.path().display()
                ),
            ));
        }
        check_shared_tensors(first, r)?;
    }
    Ok(())
}

/// Every base tensor both files recorded a CRC-32 for must have the same one, and there must
/// be one: without it nothing says the two bases hold the same values.
fn check_shared_tensors(first: &UdeltaReader, other: &UdeltaReader) -> Result<()> {
    let crcs: HashMap<&str, u32> = first
        .index
        .tensors
        .iter()
        .filter_map(|t| Some((t.name.as_str(), t.kind.base_crc32()?)))
        .collect();
    let mut shared = 0usize;
    for t in &other.index.tensors {
        let (Some(crc), Some(&expected)) = (t.kind.base_crc32(), crcs.get(t.name.as_str())) else {
            continue;
        };
        if crc != expected {
            return Err(Error::tensor(
                other.path(),
                &t.name,
                format!(
                    "made against another base: base CRC-32 {crc:08x}, but {expected:08x} in {}",
                    first.path().display()
                ),
            ));
        }
        shared += 1;
    }
    if shared == 0 {
        return Err(Error::format(
            other.path(),
            format!(
                "shares no base tensor with {} (none that both store a base checksum for), so \
                 nothing shows they were made against the same base",
                first.path().display()
            ),
        ));
    }
    Ok(())
}
