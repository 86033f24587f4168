//! Level coding: a static frequency table derived from the kept-level histogram, and a 32-bit
//! byte-wise rANS coder (the classic `ryg_rans` "rans_byte" layout).
//!
//! # Frequency table ([`normalize`])
//! From the histogram `counts` (one `u64` per level, total `T > 0`), frequencies `f` summing to
//! `M = 2^PROB_BITS = 32768` are derived with integer arithmetic only:
//! 1. `f[i] = 0` if `counts[i] == 0`, else `f[i] = max(1, floor(counts[i] * M / T))` (in `u128`).
//! 2. While `sum(f) < M`: among the `i` with `counts[i] > 0`, pick the one with the largest
//!    `counts[i] / (2 f[i] + 1)` (compared exactly as `counts[i] * (2 f[j] + 1) >
//!    counts[j] * (2 f[i] + 1)`; ties go to the smaller `i`) and add 1 to `f[i]`.
//! 3. While `sum(f) > M`: among the `i` with `f[i] >= 2`, pick the one with the smallest
//!    `counts[i] / (2 f[i] - 1)` (ties to the smaller `i`) and subtract 1 from `f[i]`.
//!
//! (`counts / (2f ± 1)` is the first-order change of the coded size `sum counts[i] *
//! log2(M / f[i])` when `f[i]` moves by one, so each step is the cheapest available.) Every level
//! with a nonzero count gets `f >= 1`; the cumulative frequency `cum[i]` is `f[0] + ... +
//! f[i-1]`. If one level has all the mass (`f = M`), levels are not coded at all: every level
//! stream is empty and every kept entry has that level.
//!
//! # rANS stream ([`encode`], [`decode`])
//! Constants: `PROB_BITS = 15`, `RANS_L = 2^23`; the state `x` is a `u32` kept in
//! `[RANS_L, 256 * RANS_L)`. The encoder starts at `x = RANS_L` and processes the symbols in
//! *reverse* order; for symbol `s` (frequency `f`, cumulative `c`):
//! ```text
//! while x >= ((RANS_L >> PROB_BITS) << 8) * f { emit byte (x & 0xFF); x >>= 8 }
//! x = ((x / f) << PROB_BITS) + (x % f) + c
//! ```
//! then emits the final state (the encoder computes this step without a division, with a
//! per-symbol reciprocal, and renormalizes without a loop: same bytes, see `EncSymbol` and
//! [`Encoder`]). The stream is stored so that the decoder reads it front to
//! back: bytes 0..4 are the final state, little-endian, followed by the renormalization bytes
//! in reverse order of emission. The decoder reads `x` from the first 4 bytes, then for each
//! symbol, in forward order:
//! ```text
//! slot = x & (M - 1); s = the symbol with cum[s] <= slot < cum[s] + f[s]
//! x = f[s] * (x >> PROB_BITS) + slot - cum[s]
//! while x < RANS_L { x = (x << 8) | next byte }
//! ```
//! A valid stream ends with `x == RANS_L` exactly when its last byte has been read; the decoder
//! checks both. An empty symbol sequence is an empty stream (no flush), as is any sequence
//! under a single-symbol table.

use super::CodecError;

/// Precision of the frequency table: frequencies sum to `2^PROB_BITS`.
pub const PROB_BITS: u32 = 15;
/// `2^PROB_BITS`, the sum of all frequencies.
pub const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Lower bound of the normalized rANS state.
pub const RANS_L: u32 = 1 << 23;

/// Normalizes a level histogram to frequencies summing to [`PROB_SCALE`] (see the module
/// docs). Returns all zeros for an all-zero histogram. Fails for more than 256 levels.
pub fn normalize(counts: &[u64]) -> Result<Vec<u32>, CodecError> {
    if counts.len() > 256 {
        return Err(CodecError::Histogram(format!(
            "{} levels: at most 256 are supported",
            counts.len()
        )));
    }
    let total: u128 = counts.iter().map(|&c| u128::from(c)).sum();
    if total == 0 {
        return Ok(vec![0; counts.len()]);
    }
    let scale = u128::from(PROB_SCALE);
    let mut f: Vec<u32> = counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0
            } else {
                (u128::from(c) * scale / total).max(1) as u32
            }
        })
        .collect();
    let mut sum: u32 = f.iter().sum();
    while sum < PROB_SCALE {
        // Largest counts[i] / (2 f[i] + 1).
        let mut best: Option<usize> = None;
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            best = match best {
                Some(j)
                    if u128::from(c) * u128::from(2 * f[j] + 1)
                        <= u128::from(counts[j]) * u128::from(2 * f[i] + 1) =>
                {
                    Some(j)
                }
                _ => Some(i),
            };
        }
        let i = best.expect("a nonzero count exists");
        f[i] += 1;
        sum += 1;
    }
    while sum > PROB_SCALE {
        // Smallest counts[i] / (2 f[i] - 1) among f[i] >= 2.
        let mut best: Option<usize> = None;
        for (i, &c) in counts.iter().enumerate() {
            if f[i] < 2 {
                continue;
            }
            best = match best {
                Some(j)
                    if u128::from(c) * u128::from(2 * f[j] - 1)
                        >= u128::from(counts[j]) * u128::from(2 * f[i] - 1) =>
                {
                    Some(j)
                }
                _ => Some(i),
            };
        }
        // sum > M >= 256 >= number of nonzero counts, so some f[i] >= 2.
        let i = best.expect("a frequency >= 2 exists");
        f[i] -= 1;
        sum -= 1;
    }
    Ok(f)
}

/// The static model of one tensor's levels: frequencies, cumulative frequencies and the
/// decoding table.
#[derive(Debug, Clone)]
pub struct FreqTable {
    freq: Vec<u32>,
    cum: Vec<u32>,
    /// For each slot in `0..PROB_SCALE`, its symbol; empty unless at least two symbols occur.
    slot_symbol: Vec<u8>,
    single: Option<u8>,
    /// Each symbol's encoding constants (all 256, so that a `u8` indexes without a bounds
    /// check; zero for symbols out of the table).
    enc: Box<[EncSymbol; 256]>,
}

/// How the encoder codes one symbol of frequency `f >= 1` and cumulative frequency `c`
/// without a division (ryg_rans' `RansEncSymbol`, with a 64-bit reciprocal):
/// `x' = (x / f) * M + x % f + c = x + (x / f) * (M - f) + c`, where
/// `x / f = (x * rcp) >> 64` exactly for every `x < 2^32` when `rcp = ceil(2^64 / f)` and
/// `f >= 2` (Lemire, Kaser, Kurz: 32-bit numerator, divisor below `2^32`, 64-bit reciprocal).
/// For `f = 1`, `rcp = 2^64 - 1` gives `x - 1` (for `x >= 1`) instead of `x`, and `bias`
/// adds the missing `M - 1`: `x + (x - 1) (M - 1) + c + M - 1 = x M + c`.
#[derive(Debug, Clone, Copy, Default)]
struct EncSymbol {
    /// Renormalization bound `((RANS_L >> PROB_BITS) << 8) * f`; 0 marks `f = 0`.
    x_max: u32,
    /// The reciprocal of `f` (see the type's docs).
    rcp: u64,
    /// `c`, plus `M - 1` when `f = 1`.
    bias: u32,
    /// `M - f`.
    cmpl: u32,
}

impl EncSymbol {
    /// The constants for frequency `f` (`1..=PROB_SCALE`) and cumulative frequency `c`.
    fn new(f: u32, c: u32) -> Self {
        let (rcp, bias) = if f == 1 {
            (u64::MAX, c + PROB_SCALE - 1)
        } else {
            // ceil(2^64 / f) = floor((2^64 - 1) / f) + 1 for every f >= 2 (f divides 2^64
            // only as a power of two, and then both sides are 2^64 / f).
            (u64::MAX / u64::from(f) + 1, c)
        };
        EncSymbol {
            x_max: ((RANS_L >> PROB_BITS) << 8) * f,
            rcp,
            bias,
            cmpl: PROB_SCALE - f,
        }
    }

    /// The state after coding this symbol from the renormalized state `x`
    /// (`x < x_max <= 2^31`).
    #[inline(always)]
    fn code(&self, x: u32) -> u32 {
        let q = ((u128::from(x) * u128::from(self.rcp)) >> 64) as u32;
        // The sum is the new state (< 2^31); every term is nonnegative, so nothing wraps.
        x + self.bias + q * self.cmpl
    }
}

impl FreqTable {
    /// Builds the table from a histogram of at most 256 levels (see [`normalize`]).
    pub fn from_counts(counts: &[u64]) -> Result<Self, CodecError> {
        let freq = normalize(counts)?;
        let mut cum = Vec::with_capacity(freq.len());
        let mut acc = 0u32;
        for &f in &freq {
            cum.push(acc);
            acc += f;
        }
        let single = freq.iter().position(|&f| f == PROB_SCALE).map(|s| s as u8);
        let mut slot_symbol = Vec::new();
        if acc == PROB_SCALE && single.is_none() {
            slot_symbol.reserve_exact(PROB_SCALE as usize);
            for (s, &f) in freq.iter().enumerate() {
                slot_symbol.extend(std::iter::repeat_n(s as u8, f as usize));
            }
        }
        let mut enc = Box::new([EncSymbol::default(); 256]);
        for (e, (&f, &c)) in enc.iter_mut().zip(freq.iter().zip(&cum)) {
            if f > 0 && f < PROB_SCALE {
                *e = EncSymbol::new(f, c);
            }
        }
        Ok(FreqTable {
            freq,
            cum,
            slot_symbol,
            single,
            enc,
        })
    }

    /// The normalized frequencies, one per symbol.
    pub fn freqs(&self) -> &[u32] {
        &self.freq
    }

    /// The level that has all the probability mass, if there is one (its streams are empty).
    pub fn single_symbol(&self) -> Option<u8> {
        self.single
    }
}

/// Encodes `symbols` into one rANS stream (see the module docs). Fails if a symbol has
/// frequency 0 (or is out of the table).
pub fn encode(table: &FreqTable, symbols: &[u8]) -> Result<Vec<u8>, &'static str> {
    if symbols.is_empty() || table.single.is_some() {
        return match table.single {
            Some(s) if symbols.iter().any(|&v| v != s) => {
                Err("level has zero frequency in the histogram")
            }
            _ => Ok(Vec::new()),
        };
    }
    let mut encoder = Encoder::new(symbols.len());
    for &s in symbols.iter().rev() {
        encoder.put(table, s)?;
    }
    Ok(encoder.finish())
}

/// Encodes one (non-empty, multi-symbol) rANS stream symbol by symbol, in *reverse* order
/// (last symbol first), so that a caller can interleave it with the position stream of the
/// same block; [`encode`] uses it. The stream is written back to front into a buffer sized
/// for the worst case, so that it needs no final reversal.
#[derive(Debug)]
pub struct Encoder {
    /// The stream is `buf[pos..]` once the state is flushed.
    buf: Vec<u8>,
    pos: usize,
    x: u32,
}

/// Most bytes one symbol emits: the state is below `2^31 = 256 RANS_L` and the
/// renormalization bound at least `2^16`, so at most two bytes are shifted out.
const MAX_BYTES_PER_SYMBOL: usize = 2;
/// Bytes below the write position when every symbol has been coded: room for the final
/// 4-byte state and for `put`'s 2-byte store. (A symbol count instead of this bound costs a
/// counter in the hot loop.)
const MIN_ROOM: usize = 4 + MAX_BYTES_PER_SYMBOL;

impl Encoder {
    /// An encoder for (at most) `symbols` symbols.
    pub fn new(symbols: usize) -> Self {
        let len = symbols * MAX_BYTES_PER_SYMBOL + MIN_ROOM;
        Encoder {
            buf: vec![0; len],
            pos: len,
            x: RANS_L,
        }
    }

    /// Codes `s` (symbols go in reverse order). Fails for a symbol of frequency 0 (or out of
    /// the table, or under a single-symbol table, whose streams are empty), and when the
    /// buffer runs out of room, which it does not within the symbol count given to
    /// [`Encoder::new`].
    #[inline(always)]
    pub fn put(&mut self, table: &FreqTable, s: u8) -> Result<(), &'static str> {
        let sym = &table.enc[usize::from(s)];
        if sym.x_max == 0 {
            return Err("level has zero frequency in the histogram");
        }
        if self.pos < MIN_ROOM + MAX_BYTES_PER_SYMBOL {
            return Err("more symbols than the encoder was sized for");
        }
        // Renormalize without a loop: the bytes `while x >= x_max { emit x & 0xFF; x >>= 8 }`
        // emits (at most two, see MAX_BYTES_PER_SYMBOL), stored back to front with one
        // 2-byte store; a byte below `pos` that is not emitted is overwritten later (or lies
        // outside the stream).
        let x = self.x;
        let emitted =
            usize::from(x >= sym.x_max) + usize::from(u64::from(x) >= u64::from(sym.x_max) << 8);
        self.buf[self.pos - 2..self.pos].copy_from_slice(&(x as u16).to_be_bytes());
        self.pos -= emitted;
        self.x = sym.code(x >> (8 * emitted));
        Ok(())
    }

    /// Flushes the state and returns the stream.
    pub fn finish(mut self) -> Vec<u8> {
        // `put` leaves pos >= MIN_ROOM >= 4.
        self.pos -= 4;
        self.buf[self.pos..self.pos + 4].copy_from_slice(&self.x.to_le_bytes());
        self.buf.drain(..self.pos);
        self.buf
    }
}

/// Decodes `out.len()` symbols from one rANS stream, which must be consumed exactly and end in
/// the initial state. Under a single-symbol table the stream must be empty.
pub fn decode(table: &FreqTable, data: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    if out.is_empty() {
        return if data.is_empty() {
            Ok(())
        } else {
            Err("stream must be empty for a block with no kept entries")
        };
    }
    if let Some(s) = table.single {
        out.fill(s);
        return if data.is_empty() {
            Ok(())
        } else {
            Err("stream must be empty when a single level has all the mass")
        };
    }
    let mut decoder = Decoder::new(table, data)?;
    for o in out.iter_mut() {
        *o = decoder.next_symbol()?;
    }
    decoder.finish()
}

/// Decodes one (non-empty, multi-symbol) rANS stream symbol by symbol, so that a caller can
/// interleave it with the position stream of the same block; [`decode`] uses it.
#[derive(Debug)]
pub struct Decoder<'a> {
    slot_symbol: &'a [u8; PROB_SCALE as usize],
    /// Each symbol's frequency and cumulative frequency in one fixed-size table: indexing it
    /// with a `u8` needs no bounds check.
    model: [(u32, u32); 256],
    /// The renormalization bytes, and how many were read.
    bytes: &'a [u8],
    pos: usize,
    x: u32,
}

impl<'a> Decoder<'a> {
    /// A decoder of `data` under `table`, which must have at least two symbols.
    pub fn new(table: &'a FreqTable, data: &'a [u8]) -> Result<Self, &'static str> {
        let Ok(slot_symbol) = <&[u8; PROB_SCALE as usize]>::try_from(table.slot_symbol.as_slice())
        else {
            return Err("the level histogram is empty");
        };
        let mut model = [(0u32, 0u32); 256];
        for (m, (&f, &c)) in model.iter_mut().zip(table.freq.iter().zip(&table.cum)) {
            *m = (f, c);
        }
        let Some((head, bytes)) = data.split_first_chunk::<4>() else {
            return Err("stream shorter than the 4-byte rANS state");
        };
        let x = u32::from_le_bytes(*head);
        if x < RANS_L {
            // No encoder state is below RANS_L.
            return Err("initial rANS state below RANS_L (corrupt stream)");
        }
        Ok(Decoder {
            slot_symbol,
            model,
            bytes,
            pos: 0,
            x,
        })
    }

    /// Decodes the next symbol.
    #[inline(always)]
    pub fn next_symbol(&mut self) -> Result<u8, &'static str> {
        let slot = self.x & (PROB_SCALE - 1);
        let s = self.slot_symbol[slot as usize];
        let (f, cum) = self.model[usize::from(s)];
        // f * (x >> 15) + (slot - cum) <= f * ((x >> 15) + 1) - 1 <= 2^15 * 2^17 - 1: no overflow.
        self.x = f * (self.x >> PROB_BITS) + slot - cum;
        while self.x < RANS_L {
            let Some(&b) = self.bytes.get(self.pos) else {
                return Err("stream truncated");
            };
            self.x = (self.x << 8) | u32::from(b);
            self.pos += 1;
        }
        Ok(s)
    }

    /// Checks that the stream was consumed exactly and ended in the initial state.
    pub fn finish(self) -> Result<(), &'static str> {
        if self.pos != self.bytes.len() {
            return Err("stream has trailing bytes");
        }
        if self.x != RANS_L {
            return Err("final rANS state is wrong (corrupt stream)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_normalize_by_hand() {
        // Exact proportions.
        assert_eq!(normalize(&[1, 1]).unwrap(), vec![16384, 16384]);
        assert_eq!(normalize(&[3, 1, 0, 0]).unwrap(), vec![24576, 8192, 0, 0]);
        // 1/3 each: floors 10922 * 3 = 32766, deficit 2; all keys equal -> ties to the
        // smallest index: level 0 gets +1, then level 1 (level 0's key is now smaller).
        assert_eq!(normalize(&[1, 1, 1]).unwrap(), vec![10923, 10923, 10922]);
        // A rare level is raised to 1; floor(32768 * 999_999 / 1_000_000) = 32767 (exactly
        // 32767.967), sum 32768: no adjustment.
        assert_eq!(normalize(&[999_999, 1]).unwrap(), vec![32767, 1]);
        // Two rare levels: floors 32767 + 0 + 0 -> bumped to 32767 + 1 + 1 = 32769; excess 1
        // is taken from the only frequency >= 2.
        assert_eq!(normalize(&[10_000_000, 1, 1]).unwrap(), vec![32766, 1, 1]);
        // 2:1 split of 32768: floors 21845 + 10922 = 32767; keys 2/43691 vs 1/21845 ->
        // 2 * 21845 = 43690 < 43691 -> level 1 gets the unit.
        assert_eq!(normalize(&[2, 1]).unwrap(), vec![21845, 10923]);
        // Single symbol.
        assert_eq!(normalize(&[0, 0, 5, 0]).unwrap(), vec![0, 0, 32768, 0]);
        // Empty histogram.
        assert_eq!(normalize(&[0, 0]).unwrap(), vec![0, 0]);
        // Too many levels.
        assert!(normalize(&[1; 257]).is_err());
    }

    #[test]
    fn codec_normalize_properties() {
        // 256 levels, every count 1 but one huge: every nonzero gets >= 1, sum is exact.
        let mut counts = vec![1u64; 256];
        counts[17] = u64::from(u32::MAX);
        let f = normalize(&counts).unwrap();
        assert_eq!(f.iter().sum::<u32>(), PROB_SCALE);
        assert!(f.iter().all(|&v| v >= 1));
        assert_eq!(f[17], PROB_SCALE - 255);
        // Zero counts stay zero.
        let f = normalize(&[0, 7, 0, 9, 0, 0, 0, 1]).unwrap();
        assert_eq!(f.iter().sum::<u32>(), PROB_SCALE);
        assert_eq!((f[0], f[2], f[4], f[5], f[6]), (0, 0, 0, 0, 0));
        assert!(f[1] > 0 && f[3] > 0 && f[7] > 0);
    }

    #[test]
    fn codec_rans_round_trip_small() {
        let table = FreqTable::from_counts(&[3, 1, 0, 2]).unwrap();
        let symbols = [0u8, 3, 1, 0, 0, 3];
        let bytes = encode(&table, &symbols).unwrap();
        let mut out = [0u8; 6];
        decode(&table, &bytes, &mut out).unwrap();
        assert_eq!(out, symbols);
        // Zero-frequency level.
        assert!(encode(&table, &[2]).is_err());
        assert!(encode(&table, &[9]).is_err());
        // Truncation and trailing bytes are detected.
        assert!(decode(&table, &bytes[..bytes.len() - 1], &mut out).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&table, &longer, &mut out).is_err());
    }

    #[test]
    fn codec_rans_one_symbol_stream_by_hand() {
        // f = [16384, 16384]: encoding symbol 1 from x = 2^23: x_max = 2^16 * 2^14 = 2^30, no
        // output; x = (2^23 / 2^14) << 15 + 0 + 16384 = 2^24 + 2^14.
        let table = FreqTable::from_counts(&[1, 1]).unwrap();
        let bytes = encode(&table, &[1]).unwrap();
        assert_eq!(bytes, (1u32 << 24 | 1 << 14).to_le_bytes().to_vec());
    }

    #[test]
    fn codec_rans_single_symbol_table() {
        let table = FreqTable::from_counts(&[0, 0, 0, 9]).unwrap();
        assert_eq!(table.single_symbol(), Some(3));
        assert!(encode(&table, &[3, 3, 3]).unwrap().is_empty());
        assert!(encode(&table, &[3, 1]).is_err());
        let mut out = [0u8; 3];
        decode(&table, &[], &mut out).unwrap();
        assert_eq!(out, [3, 3, 3]);
        assert!(decode(&table, &[0], &mut out).is_err());
    }

    /// The straightforward encoder (division, byte-wise renormalization loop, push and a
    /// final reversal): the reference for [`encode`].
    fn encode_by_division(table: &FreqTable, symbols: &[u8]) -> Result<Vec<u8>, &'static str> {
        if symbols.is_empty() || table.single.is_some() {
            return match table.single {
                Some(s) if symbols.iter().any(|&v| v != s) => Err("zero frequency"),
                _ => Ok(Vec::new()),
            };
        }
        let mut out = Vec::new();
        let mut x: u32 = RANS_L;
        for &s in symbols.iter().rev() {
            let f = table.freq.get(usize::from(s)).copied().unwrap_or(0);
            if f == 0 {
                return Err("zero frequency");
            }
            while x >= ((RANS_L >> PROB_BITS) << 8) * f {
                out.push(x as u8);
                x >>= 8;
            }
            x = ((x / f) << PROB_BITS) + (x % f) + table.cum[usize::from(s)];
        }
        out.extend_from_slice(&x.to_be_bytes());
        out.reverse();
        Ok(out)
    }

    #[test]
    fn codec_rans_reciprocal_step_equals_division() {
        use crate::splitmix::mix64;
        // Every frequency, states at the edges of the renormalized range, and random ones
        // in it.
        for f in 1..PROB_SCALE {
            let sym = EncSymbol::new(f, 7);
            let x_max = ((RANS_L >> PROB_BITS) << 8) * f;
            // `code` takes renormalized states: 256 f <= x < x_max (<= 2^31).
            let mut xs = vec![256 * f, 256 * f + 1, x_max - f, x_max - 1];
            xs.extend((0..8).map(|i| {
                256 * f + (mix64(u64::from(f) * 8 + i) % u64::from(x_max - 256 * f)) as u32
            }));
            for x in xs {
                let want = u64::from(x / f) * u64::from(PROB_SCALE) + u64::from(x % f) + 7;
                assert_eq!(u64::from(sym.code(x)), want, "f {f}, x {x}");
            }
        }
    }

    /// A table with the given frequencies (as counts: normalize keeps exact proportions).
    fn table_of(freqs: &[u64]) -> FreqTable {
        let t = FreqTable::from_counts(freqs).unwrap();
        assert_eq!(
            t.freqs().iter().map(|&f| u64::from(f)).collect::<Vec<_>>(),
            freqs
        );
        t
    }

    #[test]
    fn codec_rans_encoder_equals_reference() {
        use crate::splitmix::mix64;
        let m = u64::from(PROB_SCALE);
        let mut tables = vec![
            // f = 1 next to f = max.
            table_of(&[1, m - 1]),
            table_of(&[m - 1, 1]),
            table_of(&[1, m - 2, 0, 1]),
            table_of(&[m / 2, m / 2]),
            // 256 symbols: one with all but 255, the others 1.
            table_of(&std::iter::once(m - 255).chain([1; 255]).collect::<Vec<_>>()),
            // Single symbol: empty streams.
            table_of(&[0, m, 0, 0]),
        ];
        for seed in 0..20u64 {
            let n = 2 + (mix64(seed) % 255) as usize;
            let counts: Vec<u64> = (0..n)
                .map(|i| mix64(seed << 16 | i as u64) % 1000 * u64::from(i % 3 != 0))
                .collect();
            if counts.iter().sum::<u64>() > 0 {
                tables.push(FreqTable::from_counts(&counts).unwrap());
            }
        }
        for (t, table) in tables.iter().enumerate() {
            let coded: Vec<u8> = (0..=255u8)
                .filter(|&s| table.freqs().get(usize::from(s)).is_some_and(|&f| f > 0))
                .collect();
            for (len, seed) in [
                (0usize, 1u64),
                (1, 2),
                (2, 3),
                (7, 4),
                (1000, 5),
                (100_000, 6),
            ] {
                // Symbols drawn uniformly among the coded ones (far from the model: long
                // runs of rare symbols, two renormalization bytes per step).
                let symbols: Vec<u8> = (0..len)
                    .map(|i| coded[(mix64(seed << 32 | i as u64) % coded.len() as u64) as usize])
                    .collect();
                let fast = encode(table, &symbols).unwrap();
                assert_eq!(
                    fast,
                    encode_by_division(table, &symbols).unwrap(),
                    "table {t}, {len}"
                );
                let mut out = vec![0u8; len];
                decode(table, &fast, &mut out).unwrap();
                assert_eq!(out, symbols, "table {t}, {len}");
            }
            // A symbol of frequency 0 or beyond the table is refused, as by the reference.
            if let Some(z) = (0..=255u8).find(|&s| !coded.contains(&s)) {
                let symbols = [coded[0], z, coded[0]];
                assert!(encode(table, &symbols).is_err());
                assert!(encode_by_division(table, &symbols).is_err());
            }
        }
    }

    #[test]
    fn codec_rans_encoder_refuses_symbols_past_its_room() {
        // Symbol 0 has f = 1: every step after the first emits two bytes, so an encoder
        // sized for 2 symbols takes 2 and then runs out of room within a few more.
        let table = FreqTable::from_counts(&[1, u64::from(PROB_SCALE) - 1]).unwrap();
        let mut e = Encoder::new(2);
        let mut accepted = 0;
        while e.put(&table, 0).is_ok() {
            accepted += 1;
            assert!(accepted < 10, "no refusal");
        }
        assert!(accepted >= 2, "{accepted} accepted");
        // The accepted symbols still make a valid stream.
        let bytes = e.finish();
        let mut out = vec![1u8; accepted];
        decode(&table, &bytes, &mut out).unwrap();
        assert!(out.iter().all(|&s| s == 0));
    }
}
