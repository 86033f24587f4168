//! Every element's quantization level, packed, as pass 1 leaves them for pass 2: two levels
//! per byte up to 4 bits (element `2i` in the low nibble of byte `i`), one per byte above.
//! With the levels kept, pass 2 needs neither checkpoint again: the selection key of an element
//! is a hash of its index ([`crate::algorithm::selection::element_key`]).

/// The levels of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedLevels {
    numel: usize,
    nibbles: bool,
    data: Vec<u8>,
}

/// Whether levels of `bits` bits are stored two per byte.
fn nibbles(bits: u32) -> bool {
    bits <= 4
}

impl PackedLevels {
    /// Bytes that `numel` levels of `bits` bits take.
    pub fn packed_len(numel: usize, bits: u32) -> usize {
        if nibbles(bits) {
            numel.div_ceil(2)
        } else {
            numel
        }
    }

    /// Packs `levels` (each below `2^bits`).
    pub fn pack(levels: &[u8], bits: u32) -> PackedLevels {
        let mut data = Vec::with_capacity(Self::packed_len(levels.len(), bits));
        Self::pack_into(levels, bits, &mut data);
        PackedLevels {
            numel: levels.len(),
            nibbles: nibbles(bits),
            data,
        }
    }

    /// Appends the packing of `levels` to `out` (an even number of levels, but for the last
    /// piece of a tensor, keeps pieces packed apart equal to the whole packed at once).
    pub fn pack_into(levels: &[u8], bits: u32, out: &mut Vec<u8>) {
        if !nibbles(bits) {
            out.extend_from_slice(levels);
            return;
        }
        out.extend(
            levels
                .chunks(2)
                .map(|p| p[0] | p.get(1).map_or(0, |h| h << 4)),
        );
    }

    /// Levels of `numel` elements of `bits` bits from their packed bytes (as
    /// [`bytes`](Self::bytes) gave them); `None` when the length does not match.
    pub fn from_bytes(numel: usize, bits: u32, data: Vec<u8>) -> Option<PackedLevels> {
        (data.len() == Self::packed_len(numel, bits)).then_some(PackedLevels {
            numel,
            nibbles: nibbles(bits),
            data,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Writes the levels of elements `start .. start + len` into `out` (`start` even).
    pub fn unpack_into(&self, start: usize, len: usize, out: &mut Vec<u8>) {
        debug_assert!(start % 2 == 0 && start + len <= self.numel);
        out.clear();
        if !self.nibbles {
            out.extend_from_slice(&self.data[start..start + len]);
            return;
        }
        let bytes = &self.data[start / 2..(start + len).div_ceil(2)];
        out.reserve(2 * bytes.len());
        for &b in bytes {
            out.push(b & 15);
            out.push(b >> 4);
        }
        out.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_at_every_width() {
        for bits in 1..=8u32 {
            for n in [0usize, 1, 2, 7, 1000] {
                let levels: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let p = PackedLevels::pack(&levels, bits);
                assert_eq!(p.bytes().len(), if bits <= 4 { n.div_ceil(2) } else { n });
                let mut out = Vec::new();
                p.unpack_into(0, n, &mut out);
                assert_eq!(out, levels, "{bits} bits, {n} levels");
                if n > 4 {
                    p.unpack_into(2, 3, &mut out);
                    assert_eq!(out, &levels[2..5]);
                }
                let again = PackedLevels::from_bytes(n, bits, p.bytes().to_vec()).unwrap();
                assert_eq!(again, p);
            }
        }
        // Hand-packed: elements 0..3 = 1, 2, 15 -> bytes 0x21, 0x0f.
        assert_eq!(PackedLevels::pack(&[1, 2, 15], 4).bytes(), &[0x21, 0x0f]);
        assert!(PackedLevels::from_bytes(3, 4, vec![0; 3]).is_none());
    }
}
