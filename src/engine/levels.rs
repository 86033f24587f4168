//! Every element's quantization level, packed, as pass 1 leaves them for pass 2: two levels
//! per byte up to 4 bits (element `2i` in the low nibble of byte `i`), one per byte above.
//! With the levels kept, pass 2 needs neither checkpoint again: the selection key of an element
//! is a hash of its index ([`crate::algorithm::selection::element_key`]).

use super::spare::Spare;
use crate::simd::multiversion;

/// Buffers of levels no longer needed (spilled to the temporary file, or selected from), for
/// the next tensor's ([`PackedLevels::buffer`]).
static SPARE: Spare<u8> = Spare::new(128 << 20);

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
        let start = out.len();
        out.resize(start + Self::packed_len(levels.len(), bits), 0);
        Self::pack_to(levels, bits, &mut out[start..]);
    }

    /// Writes the packing of `levels` to `out`, which must take exactly
    /// [`packed_len`](Self::packed_len) bytes (the same pieces as
    /// [`pack_into`](Self::pack_into)).
    ///
    /// # Panics
    /// If `out` has another length.
    pub fn pack_to(levels: &[u8], bits: u32, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            Self::packed_len(levels.len(), bits),
            "packed length"
        );
        if nibbles(bits) {
            pack_nibbles(levels, out);
        } else {
            out.copy_from_slice(levels);
        }
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

    /// A buffer of `len` bytes for packed levels: the smallest recycled one
    /// ([`recycle`](Self::recycle)) that holds them, else a fresh one. Its contents are
    /// unspecified: the caller overwrites every byte.
    pub fn buffer(len: usize) -> Vec<u8> {
        SPARE.filled(len)
    }

    /// Hands this tensor's buffer over to the next [`buffer`](Self::buffer).
    pub fn recycle(self) {
        SPARE.give(self.data);
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// A bit width packed as these levels are (4: two per byte; 8: one per byte), for
    /// [`from_bytes`](Self::from_bytes).
    pub fn packing_bits(&self) -> u32 {
        if self.nibbles {
            4
        } else {
            8
        }
    }

    /// The levels of elements `start .. start + len` where they lie (`start` even).
    pub fn slice(&self, start: usize, len: usize) -> LevelSlice<'_> {
        debug_assert!(start % 2 == 0 && start + len <= self.numel);
        if self.nibbles {
            LevelSlice::Nibbles {
                bytes: &self.data[start / 2..(start + len).div_ceil(2)],
                len,
            }
        } else {
            LevelSlice::Bytes(&self.data[start..start + len])
        }
    }

    /// Writes the levels of elements `start .. start + len` into `out` (resized to `len`;
    /// only its growth is zero-filled) (`start` even).
    pub fn unpack_into(&self, start: usize, len: usize, out: &mut Vec<u8>) {
        debug_assert!(start % 2 == 0 && start + len <= self.numel);
        out.truncate(len);
        out.resize(len, 0);
        if self.nibbles {
            unpack_nibbles(&self.data[start / 2..(start + len).div_ceil(2)], out);
        } else {
            out.copy_from_slice(&self.data[start..start + len]);
        }
    }
}

/// A run of levels as they are stored: one per byte, or packed two per byte.
#[derive(Debug, Clone, Copy)]
pub enum LevelSlice<'a> {
    /// One level per byte.
    Bytes(&'a [u8]),
    /// `len` levels two per byte, element `2i` in the low nibble of byte `i`.
    Nibbles {
        /// `len.div_ceil(2)` bytes.
        bytes: &'a [u8],
        /// Number of levels.
        len: usize,
    },
}

impl LevelSlice<'_> {
    /// Number of levels.
    pub fn len(&self) -> usize {
        match *self {
            LevelSlice::Bytes(b) => b.len(),
            LevelSlice::Nibbles { len, .. } => len,
        }
    }

    /// Whether there is no level.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Level `j`.
    #[inline(always)]
    pub fn get(&self, j: usize) -> u8 {
        match *self {
            LevelSlice::Bytes(b) => b[j],
            LevelSlice::Nibbles { bytes, .. } => (bytes[j / 2] >> (4 * (j & 1))) & 15,
        }
    }
}

multiversion! {
    /// `out[i] = levels[2i] | levels[2i + 1] << 4` (an odd last level alone in its byte).
    fn pack_nibbles(levels: &[u8], out: &mut [u8]) {
        let pairs = levels.chunks_exact(2);
        if let [last] = pairs.remainder() {
            out[levels.len() / 2] = *last;
        }
        for (o, p) in out.iter_mut().zip(pairs) {
            *o = p[0] | p[1] << 4;
        }
    }
}

multiversion! {
    /// The inverse of [`pack_nibbles`] for `out.len()` levels (`bytes` holds
    /// `out.len().div_ceil(2)`).
    fn unpack_nibbles(bytes: &[u8], out: &mut [u8]) {
        let mut pairs = out.chunks_exact_mut(2);
        for (p, &b) in (&mut pairs).zip(bytes) {
            p[0] = b & 15;
            p[1] = b >> 4;
        }
        if let [last] = pairs.into_remainder() {
            *last = bytes[bytes.len() - 1] & 15;
        }
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
                let slice = p.slice(0, n);
                assert_eq!(slice.len(), n);
                assert!((0..n).all(|j| slice.get(j) == levels[j]));
                let again = PackedLevels::from_bytes(n, bits, p.bytes().to_vec()).unwrap();
                assert_eq!(again, p);
            }
        }
        // Recycled buffers come back at the length asked for (other tests may take them
        // too, so only the lengths are certain).
        PackedLevels::pack(&[3; 1000], 4).recycle();
        for len in [0, 100, 500, 2000] {
            assert_eq!(PackedLevels::buffer(len).len(), len);
        }
        // Hand-packed: elements 0..3 = 1, 2, 15 -> bytes 0x21, 0x0f.
        assert_eq!(PackedLevels::pack(&[1, 2, 15], 4).bytes(), &[0x21, 0x0f]);
        assert!(PackedLevels::from_bytes(3, 4, vec![0; 3]).is_none());
    }
}
