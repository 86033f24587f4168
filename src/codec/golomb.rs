//! Position coding: MSB-first bit packing and Golomb codes of gaps.
//!
//! # Bit order
//! Bits are packed **MSB-first**: the first bit written is bit 7 (the most significant bit) of
//! byte 0, the eighth is bit 0 of byte 0, the ninth is bit 7 of byte 1, and so on. A multi-bit
//! field is written most significant bit first. The last byte is padded with `0` bits; a stream
//! holds exactly `ceil(total_bits / 8)` bytes.
//!
//! # Golomb code with parameter `m >= 1`
//! A gap `g >= 0` is written as `q = g / m` and `r = g % m` (integer division):
//! 1. `q` in unary: `q` one bits followed by a single zero bit;
//! 2. `r` in truncated binary: with `b = ceil(log2 m)` (so `b = 0` for `m = 1`) and
//!    `u = 2^b - m`, a remainder `r < u` is written as `r` in `b - 1` bits, otherwise `r + u` is
//!    written in `b` bits. For `m = 1` nothing is written; for `m` a power of two this is plain
//!    `b`-bit binary.
//!
//! Example, `m = 3` (`b = 2`, `u = 1`): 0 -> `0 0`, 1 -> `0 10`, 2 -> `0 11`, 3 -> `10 0`,
//! 4 -> `10 10`, 7 -> `110 10`.
//!
//! # Golomb parameter ([`golomb_parameter`])
//! For `c` coded items among `n` elements (`1 <= c <= n`), density `p = c / n` and
//! `theta = 1 - p`, `m` is the Gallager–van Voorhis choice, the smallest `m >= 1` with
//! `theta^m + theta^(m+1) <= 1`, evaluated exactly as follows in unsigned integers (so every
//! machine derives the same `m`):
//! ```text
//! t    = floor(2^64 * (n - c) / n)          // theta in 0.64 fixed point, t < 2^64
//! x_0  = 2^64                               // theta^0 = 1.0
//! x_j  = floor(x_(j-1) * t / 2^64)          // (u128 arithmetic) ~ theta^j
//! m    = smallest j >= 1 with x_j + x_(j+1) <= 2^64, capped at n
//! ```
//! `x_j` never increases, so this is a well-defined monotone search; it needs about
//! `0.69 * n / c` steps (a few dozen at the densities UltraDelta produces).
//!
//! # Block position stream ([`encode_block_positions`])
//! A block covers `n` consecutive elements (offsets `0..n` from the block start) of which `k`
//! are kept; `n` and `k` are known to the decoder from the block table.
//! - If `k == 0` or `k == n` the stream is empty (0 bytes).
//! - Otherwise, if `2k <= n` (direct mode), the coded set is the kept offsets (`c = k`); if
//!   `2k > n` (complement mode), the coded set is the *non-kept* offsets (`c = n - k`).
//! - `m = golomb_parameter(n, c)`. The `c` coded offsets `o_0 < o_1 < ... < o_(c-1)` are written
//!   in increasing order as the Golomb codes of their gaps `g_0 = o_0` and
//!   `g_i = o_i - o_(i-1) - 1` (the number of elements of the other set before each coded one,
//!   counted from the block start or from the previous coded offset). Nothing is written for
//!   the elements after the last coded offset. The stream ends after the last codeword, padded
//!   to a byte boundary with zero bits.
//!
//! A decoder rejects a stream that ends early, a gap that would leave too few elements for the
//! coded offsets still to come (`o_i <= n - (c - i)`), trailing bytes, and nonzero padding.

/// Writes bits MSB-first into a byte vector. Every `put` stores the pending bits as one
/// 8-byte big-endian word at the first incomplete byte and advances by the bytes completed:
/// no branch on how full the accumulator is.
#[derive(Debug, Default)]
pub struct BitWriter {
    /// The stream is the first `bits` bits of `out`; `out` has at least 8 bytes from byte
    /// `bits / 8` on after a `put` (bytes past the last bit are scratch: zero, overwritten
    /// or cut off).
    out: Vec<u8>,
    bits: usize,
    /// The pending bits (those of the incomplete byte `bits / 8`) live in the low `bits % 8`
    /// bits of `acc`; the bits above them are stale and ignored.
    acc: u64,
}

impl BitWriter {
    /// The most bits one [`BitWriter::put`] takes: with up to 7 pending bits they fill at
    /// most 63 bits of the accumulator.
    pub const MAX_PUT_BITS: u32 = 56;

    /// A writer whose output vector starts with `bytes` of room.
    pub fn with_capacity(bytes: usize) -> Self {
        BitWriter {
            out: vec![0; bytes + 8],
            bits: 0,
            acc: 0,
        }
    }

    /// Appends the low `n` bits of `value` (`n <= MAX_PUT_BITS`, `value < 2^n`), most
    /// significant first.
    #[inline(always)]
    pub fn put(&mut self, value: u64, n: u32) {
        debug_assert!(n <= Self::MAX_PUT_BITS && value >> n == 0);
        if n > 0 {
            self.put_nonempty(value, n);
        }
    }

    /// [`BitWriter::put`] for `1 <= n <= MAX_PUT_BITS`.
    #[inline(always)]
    fn put_nonempty(&mut self, value: u64, n: u32) {
        let byte = self.bits / 8;
        if self.out.len() < byte + 8 {
            // Only the vector goes to the (cold) call: the accumulator and the bit count stay
            // in registers in a caller's loop.
            grow(&mut self.out, byte + 8);
        }
        self.acc = (self.acc << n) | value;
        // 1 <= pending <= 63: the pending bits, left-aligned, stale bits shifted out, stored
        // from the incomplete byte on.
        let pending = (self.bits % 8) as u32 + n;
        let word = self.acc << (64 - pending);
        self.out[byte..byte + 8].copy_from_slice(&word.to_be_bytes());
        self.bits += n as usize;
    }

    /// Appends `count` one bits. (Inlined, as `put`, so that a caller's loop keeps the
    /// writer in registers.)
    #[inline(always)]
    pub fn put_ones(&mut self, mut count: u64) {
        while count >= 32 {
            self.put(0xFFFF_FFFF, 32);
            count -= 32;
        }
        if count > 0 {
            self.put((1u64 << count) - 1, count as u32);
        }
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> u64 {
        self.bits as u64
    }

    /// Pads the last byte with zero bits and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // The last put stored the pending bits followed by zeros.
        self.out.truncate(self.bits.div_ceil(8));
        self.out
    }
}

/// Doubles `out`'s length (zero-filled), to at least `min_len`.
#[cold]
#[inline(never)]
fn grow(out: &mut Vec<u8>, min_len: usize) {
    let len = (out.len() * 2).max(min_len);
    out.resize(len, 0);
}

/// Reads bits MSB-first from a byte slice; never reads past its end.
#[derive(Debug)]
pub struct BitReader<'a> {
    data: &'a [u8],
    /// Next byte of `data` to load.
    pos: usize,
    /// Loaded, unread bits, left-aligned; the bits below them are zero.
    buf: u64,
    avail: u32,
}

/// `x << s`, zero for `s >= 64`.
#[inline]
fn shl(x: u64, s: u32) -> u64 {
    x.checked_shl(s).unwrap_or(0)
}

impl<'a> BitReader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            buf: 0,
            avail: 0,
        }
    }

    #[inline]
    fn refill(&mut self) {
        while self.avail <= 56 && self.pos < self.data.len() {
            self.buf |= u64::from(self.data[self.pos]) << (56 - self.avail);
            self.avail += 8;
            self.pos += 1;
        }
    }

    /// Loads as many whole bytes as fit into the buffer with one 8-byte read. Returns `false`
    /// (loading nothing) when fewer than 8 unread bytes remain: the caller then takes the
    /// byte-wise path ([`BitReader::read`], [`BitReader::read_unary`]).
    #[inline(always)]
    fn refill_fast(&mut self) -> bool {
        let Some(chunk) = self.data.get(self.pos..self.pos + 8) else {
            return false;
        };
        let bytes = (64 - self.avail) / 8;
        if bytes > 0 {
            let word = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            let loaded = word & (u64::MAX << (64 - 8 * bytes));
            self.buf |= loaded >> self.avail;
            self.avail += 8 * bytes;
            self.pos += bytes as usize;
        }
        true
    }

    /// Drops `n <= avail` bits.
    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf = shl(self.buf, n);
        self.avail -= n;
    }

    /// Reads `n <= 32` bits as an unsigned number; `None` if the data ends first.
    #[inline]
    pub fn read(&mut self, n: u32) -> Option<u64> {
        debug_assert!(n <= 32);
        if n == 0 {
            return Some(0);
        }
        if self.avail < n {
            self.refill();
            if self.avail < n {
                return None;
            }
        }
        let v = self.buf >> (64 - n);
        self.buf <<= n;
        self.avail -= n;
        Some(v)
    }

    /// Reads a unary number (ones terminated by a zero). Fails if the data ends first or if the
    /// number would exceed `max`.
    #[inline]
    pub fn read_unary(&mut self, max: u64) -> Result<u64, &'static str> {
        let mut q: u64 = 0;
        loop {
            if self.avail == 0 {
                self.refill();
                if self.avail == 0 {
                    return Err("stream ends inside a unary quotient");
                }
            }
            let ones = self.buf.leading_ones().min(self.avail);
            q += u64::from(ones);
            if q > max {
                return Err("quotient runs past the end of the block");
            }
            if ones < self.avail {
                self.buf = shl(self.buf, ones + 1);
                self.avail -= ones + 1;
                return Ok(q);
            }
            self.buf = 0;
            self.avail = 0;
        }
    }

    /// True if everything but the zero padding of the last byte has been read: no unread byte,
    /// fewer than 8 unread bits, all of them zero.
    pub fn at_clean_end(&self) -> bool {
        self.pos == self.data.len() && self.avail < 8 && self.buf == 0
    }
}

/// The Golomb parameter for `c` coded items among `n` elements (see the module docs for the
/// exact integer rule). Returns 1 for `c == 0`, `n == 0` or `c >= n`.
pub fn golomb_parameter(n: u32, c: u32) -> u32 {
    if c == 0 || c >= n {
        return 1;
    }
    const ONE: u128 = 1 << 64;
    let t: u128 = (u128::from(n - c) << 64) / u128::from(n);
    let mut x_j: u128 = ONE; // x_0
    let mut x_next: u128 = (x_j * t) >> 64; // x_1
    let mut m: u32 = 0;
    loop {
        // Invariant: x_j = x_m, x_next = x_(m+1).
        m += 1;
        x_j = x_next;
        x_next = (x_j * t) >> 64;
        if x_j + x_next <= ONE || m >= n {
            return m;
        }
    }
}

/// A Golomb parameter with its truncated-binary constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GolombCode {
    /// The divisor `m >= 1`.
    pub m: u32,
    /// `b = ceil(log2 m)`.
    pub b: u32,
    /// `u = 2^b - m`: remainders below `u` take `b - 1` bits.
    pub u: u32,
    /// `ceil(2^64 / m)` for `m >= 2` (0 for `m = 1`): `g / m = (g * rcp) >> 64` exactly for
    /// every `g < 2^32` (Lemire, Kaser, Kurz, "Faster remainder by direct computation":
    /// a 32-bit numerator and a 64-bit reciprocal).
    pub rcp: u64,
}

impl GolombCode {
    /// The code with divisor `m` (`m >= 1`; 0 is treated as 1).
    pub fn new(m: u32) -> Self {
        let m = m.max(1);
        let b = 32 - (m - 1).leading_zeros();
        let u = ((1u64 << b) - u64::from(m)) as u32;
        // ceil(2^64 / m) = floor((2^64 - 1) / m) + 1 for m >= 2 (m divides 2^64 only as a
        // power of two, and then both sides are 2^64 / m).
        let rcp = if m == 1 {
            0
        } else {
            u64::MAX / u64::from(m) + 1
        };
        GolombCode { m, b, u, rcp }
    }

    /// `(gap / m, gap % m)` without a division.
    #[inline(always)]
    fn divide(&self, gap: u32) -> (u32, u32) {
        if self.m == 1 {
            return (gap, 0);
        }
        let q = ((u128::from(gap) * u128::from(self.rcp)) >> 64) as u32;
        (q, gap - q * self.m)
    }

    /// Appends the codeword of `gap`.
    #[inline(always)]
    pub fn put(&self, w: &mut BitWriter, gap: u32) {
        let (q, r) = self.divide(gap);
        // Truncated binary, branch-free: `long` when r >= u (always for u = 0, which covers
        // m = 1 with b = 0: then nothing is written).
        let long = u32::from(r >= self.u);
        let rv = u64::from(r + (self.u & long.wrapping_neg()));
        let rn = (self.b + long).wrapping_sub(1);
        // q + 1 + rn <= MAX_PUT_BITS, written so that no q (up to 2^32 - 1) overflows.
        if q < BitWriter::MAX_PUT_BITS - rn {
            // q ones, a zero, the remainder: one field.
            let unary = ((1u64 << q) - 1) << 1;
            w.put_nonempty((unary << rn) | rv, q + 1 + rn);
        } else {
            w.put_ones(u64::from(q));
            w.put(0, 1);
            w.put(rv, rn);
        }
    }

    /// Decodes the codeword at the front of `r`'s buffer if all its bits are loaded (the
    /// buffer was just refilled), returning the gap (unchecked) and consuming its bits; `None`
    /// (consuming nothing) for a codeword longer than what is loaded, or for `m = 1`. No
    /// division: the fast path of [`decode_block_positions`].
    #[inline(always)]
    fn get_loaded(&self, r: &mut BitReader<'_>) -> Option<u64> {
        let q = r.buf.leading_ones();
        if self.b == 0 || q + 1 + self.b > r.avail {
            return None;
        }
        // The b bits after the unary zero; the remainder takes their first b - 1 bits, or all
        // b of them (minus u) when those b - 1 bits are >= u.
        let t = (r.buf << (q + 1)) >> (64 - self.b);
        let short = t >> 1;
        // Branch-free (the two cases are about equally likely): `long` is 1 when the
        // remainder takes all b bits.
        let long = u64::from(short >= u64::from(self.u));
        let mask = long.wrapping_neg();
        let rem = (short & !mask) | (t.wrapping_sub(u64::from(self.u)) & mask);
        r.consume(q + self.b + long as u32);
        Some(u64::from(q) * u64::from(self.m) + rem)
    }

    /// The error [`GolombCode::get`] reports for a decoded `gap > max_gap`.
    fn overrun(&self, gap: u64, max_gap: u32) -> &'static str {
        if gap / u64::from(self.m) > u64::from(max_gap / self.m) {
            "quotient runs past the end of the block"
        } else {
            "gap runs past the end of the block"
        }
    }

    /// Reads one codeword; the decoded gap must be `<= max_gap`.
    #[inline]
    pub fn get(&self, r: &mut BitReader<'_>, max_gap: u32) -> Result<u32, &'static str> {
        let q = r.read_unary(u64::from(max_gap / self.m))?;
        let rem = if self.b == 0 {
            0
        } else {
            let v = r.read(self.b - 1).ok_or("stream ends inside a remainder")? as u32;
            if v < self.u {
                v
            } else {
                let bit = r.read(1).ok_or("stream ends inside a remainder")? as u32;
                ((v << 1) | bit) - self.u
            }
        };
        // q <= max_gap / m, so q * m + rem < (max_gap / m + 1) * m <= max_gap + m: no overflow
        // in u64, and the bound check below is exact.
        let gap = u64::from(q as u32) * u64::from(self.m) + u64::from(rem);
        if gap > u64::from(max_gap) {
            return Err("gap runs past the end of the block");
        }
        Ok(gap as u32)
    }
}

/// Encodes one block's positions (see the module docs). `offsets` are the kept offsets within
/// the block, strictly increasing and `< n` (the caller checks this).
pub fn encode_block_positions(n: u32, offsets: &[u32]) -> Vec<u8> {
    let k = offsets.len() as u32;
    if k == 0 || k == n {
        return Vec::new();
    }
    if let Some(mut direct) = DirectWriter::new(n, k) {
        let mut next = 0u32;
        for &o in offsets {
            direct.put_gap(o - next);
            next = o + 1;
        }
        direct.finish()
    } else {
        let c = n - k;
        let code = GolombCode::new(golomb_parameter(n, c));
        let mut w = BitWriter::with_capacity(estimate_bytes(n, c, code));
        // Non-kept offsets are the runs between kept ones; `next` is one past the previous
        // non-kept offset, `cursor` the first offset not yet classified.
        let mut next = 0u32;
        let mut cursor = 0u32;
        for &o in offsets.iter().chain(std::iter::once(&n)) {
            if cursor < o {
                code.put(&mut w, cursor - next);
                for _ in cursor + 1..o {
                    code.put(&mut w, 0);
                }
                next = o;
            }
            cursor = o + 1;
        }
        w.finish()
    }
}

/// Writes a direct-mode block position stream (`0 < 2k <= n`) one gap at a time, so that a
/// caller can interleave it with the level stream of the same block (the encoder side of
/// [`DirectPositions`]); [`encode_block_positions`] uses it.
#[derive(Debug)]
pub struct DirectWriter {
    code: GolombCode,
    w: BitWriter,
}

impl DirectWriter {
    /// A writer for `k` kept offsets among `n` elements, or `None` unless `0 < 2k <= n`.
    pub fn new(n: u32, k: u32) -> Option<Self> {
        (k > 0 && 2 * u64::from(k) <= u64::from(n)).then(|| {
            let code = GolombCode::new(golomb_parameter(n, k));
            DirectWriter {
                code,
                w: BitWriter::with_capacity(estimate_bytes(n, k, code)),
            }
        })
    }

    /// Appends the next kept offset's gap (`o_0`, then `o_i - o_(i-1) - 1`).
    #[inline(always)]
    pub fn put_gap(&mut self, gap: u32) {
        self.code.put(&mut self.w, gap);
    }

    /// The padded stream.
    pub fn finish(self) -> Vec<u8> {
        self.w.finish()
    }
}

/// Decodes a direct-mode block position stream (`0 < 2k <= n`) one kept position at a time,
/// so that a caller can interleave it with the level stream of the same block. Every
/// position is checked as in [`decode_block_positions`], which uses it.
#[derive(Debug)]
pub struct DirectPositions<'a> {
    code: GolombCode,
    r: BitReader<'a>,
    /// Block length, kept count, first element of the block.
    n: u32,
    k: u32,
    base: u32,
    /// One past the previous kept offset.
    next: u32,
    /// Kept offsets decoded so far.
    decoded: u32,
}

impl<'a> DirectPositions<'a> {
    /// A decoder for `k` kept offsets among `n` elements, or `None` unless `0 < 2k <= n`
    /// (direct mode).
    pub fn new(n: u32, k: u32, base: u32, data: &'a [u8]) -> Option<Self> {
        (k > 0 && 2 * u64::from(k) <= u64::from(n)).then(|| DirectPositions {
            code: GolombCode::new(golomb_parameter(n, k)),
            r: BitReader::new(data),
            n,
            k,
            base,
            next: 0,
            decoded: 0,
        })
    }

    /// The largest gap the next offset may have: it must leave room for the kept offsets
    /// after it.
    #[inline(always)]
    fn max_gap(&self) -> u32 {
        self.n - (self.k - self.decoded) - self.next
    }

    /// Records a checked gap; returns the absolute position.
    #[inline(always)]
    fn advance(&mut self, gap: u32) -> u32 {
        let o = self.next + gap;
        self.next = o + 1;
        self.decoded += 1;
        self.base + o
    }

    /// The fast path: the next position when its codeword lies in the loaded bits (the buffer
    /// is refilled 8 bytes at a time while 8 remain; no division), `None` otherwise (nothing
    /// consumed: call [`DirectPositions::next_checked`]). The caller decodes at most `k`
    /// positions.
    #[inline(always)]
    pub fn next_loaded(&mut self) -> Option<Result<u32, &'static str>> {
        if self.r.avail < 32 && !self.r.refill_fast() {
            return None;
        }
        let gap = self.code.get_loaded(&mut self.r)?;
        let max_gap = self.max_gap();
        if gap > u64::from(max_gap) {
            return Some(Err(self.code.overrun(gap, max_gap)));
        }
        Some(Ok(self.advance(gap as u32)))
    }

    /// The next position, read bit by bit with every check (any stream state).
    pub fn next_checked(&mut self) -> Result<u32, &'static str> {
        let max_gap = self.max_gap();
        let gap = self.code.get(&mut self.r, max_gap)?;
        Ok(self.advance(gap))
    }

    /// Decodes the next `out.len()` positions.
    pub fn decode_into(&mut self, out: &mut [u32]) -> Result<(), &'static str> {
        for slot in out {
            *slot = match self.next_loaded() {
                Some(p) => p?,
                None => self.next_checked()?,
            };
        }
        Ok(())
    }

    /// Checks that all `k` positions were decoded and the stream ends there (zero padding).
    pub fn finish(self) -> Result<(), &'static str> {
        if self.decoded != self.k {
            return Err("fewer kept entries decoded than the block table says");
        }
        if !self.r.at_clean_end() {
            return Err("stream has trailing bits or bytes after the last kept entry");
        }
        Ok(())
    }
}

/// A capacity hint: quotient bits are about `n / m`, plus `1 + b` bits per item.
fn estimate_bytes(n: u32, c: u32, code: GolombCode) -> usize {
    let bits = u64::from(n / code.m) + u64::from(c) * u64::from(code.b + 1);
    (bits / 8 + 8) as usize
}

/// Decodes one block's positions: `out.len()` is the kept count `k`, `n` the block length,
/// `base` the block's first element; writes `base + offset` for every kept offset in
/// increasing order. Errors describe what is wrong with the stream.
pub fn decode_block_positions(
    n: u32,
    base: u32,
    data: &[u8],
    out: &mut [u32],
) -> Result<(), &'static str> {
    let k = out.len() as u64;
    if k > u64::from(n) {
        return Err("more kept entries than elements in the block");
    }
    let k = k as u32;
    if k == 0 || k == n {
        if !data.is_empty() {
            return Err("stream must be empty for a block with no or all entries kept");
        }
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = base + i as u32;
        }
        return Ok(());
    }
    if let Some(mut direct) = DirectPositions::new(n, k, base, data) {
        direct.decode_into(out)?;
        return direct.finish();
    }
    // Complement mode: the stream codes the non-kept offsets.
    let mut r = BitReader::new(data);
    let c = n - k;
    let code = GolombCode::new(golomb_parameter(n, c));
    const OVERFLOW: &str = "more kept entries than the block table says";
    let mut next = 0u32; // one past the previous non-kept offset
    let mut slots = out.iter_mut();
    for i in 0..c {
        let last_allowed = n - (c - i);
        let gap = code.get(&mut r, last_allowed - next)?;
        let x = next + gap;
        // Offsets next..x are kept: at most k in total because x <= n - (c - i), so the
        // OVERFLOW errors cannot happen; they only make that visible without a panic path.
        for o in next..x {
            *slots.next().ok_or(OVERFLOW)? = base + o;
        }
        next = x + 1;
    }
    for o in next..n {
        *slots.next().ok_or(OVERFLOW)? = base + o;
    }
    if slots.next().is_some() {
        return Err("fewer kept entries than the block table says");
    }
    if !r.at_clean_end() {
        return Err("stream has trailing bits or bytes after the last kept entry");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits of a stream as a '0'/'1' string, `nbits` long.
    fn bits_of(bytes: &[u8], nbits: usize) -> String {
        (0..nbits)
            .map(|i| {
                if bytes[i / 8] >> (7 - i % 8) & 1 == 1 {
                    '1'
                } else {
                    '0'
                }
            })
            .collect()
    }

    fn codeword(m: u32, gap: u32) -> String {
        let mut w = BitWriter::default();
        GolombCode::new(m).put(&mut w, gap);
        let n = w.bit_len() as usize;
        bits_of(&w.finish(), n)
    }

    #[test]
    fn codec_golomb_codewords_by_hand() {
        // m = 1: unary only.
        assert_eq!(codeword(1, 0), "0");
        assert_eq!(codeword(1, 3), "1110");
        // m = 2: one remainder bit.
        assert_eq!(codeword(2, 0), "00");
        assert_eq!(codeword(2, 1), "01");
        assert_eq!(codeword(2, 5), "1101");
        // m = 3: b = 2, u = 1: r=0 -> "0", r=1 -> "10", r=2 -> "11".
        assert_eq!(codeword(3, 0), "00");
        assert_eq!(codeword(3, 1), "010");
        assert_eq!(codeword(3, 2), "011");
        assert_eq!(codeword(3, 3), "100");
        assert_eq!(codeword(3, 4), "1010");
        assert_eq!(codeword(3, 7), "11010");
        // m = 4: plain 2-bit remainders.
        assert_eq!(codeword(4, 6), "1010");
        // m = 5: b = 3, u = 3: r in 0..3 -> 2 bits, r=3 -> "110", r=4 -> "111".
        assert_eq!(codeword(5, 2), "010");
        assert_eq!(codeword(5, 3), "0110");
        assert_eq!(codeword(5, 4), "0111");
        assert_eq!(codeword(5, 9), "10111");
        // m = 6: b = 3, u = 2.
        assert_eq!(codeword(6, 1), "001");
        assert_eq!(codeword(6, 2), "0100");
        assert_eq!(codeword(6, 5), "0111");
        // A long quotient goes through the split path: 40 ones, a zero, 1 remainder bit.
        assert_eq!(codeword(2, 81), format!("{}01", "1".repeat(40)));
    }

    #[test]
    fn codec_golomb_constants() {
        let mbu = |c: GolombCode| (c.m, c.b, c.u);
        assert_eq!(mbu(GolombCode::new(1)), (1, 0, 0));
        assert_eq!(mbu(GolombCode::new(2)), (2, 1, 0));
        assert_eq!(mbu(GolombCode::new(3)), (3, 2, 1));
        assert_eq!(mbu(GolombCode::new(7)), (7, 3, 1));
        assert_eq!(mbu(GolombCode::new(8)), (8, 3, 0));
        assert_eq!(mbu(GolombCode::new(9)), (9, 4, 7));
        // Reciprocals: ceil(2^64 / m); 2^63 for m = 2, 0 (unused) for m = 1.
        assert_eq!(GolombCode::new(1).rcp, 0);
        assert_eq!(GolombCode::new(2).rcp, 1 << 63);
        assert_eq!(GolombCode::new(3).rcp, 0x5555_5555_5555_5556);
        assert_eq!(GolombCode::new(8).rcp, 1 << 61);
    }

    #[test]
    fn codec_bit_writer_layout() {
        let mut w = BitWriter::default();
        w.put(0b101, 3);
        w.put(0xABCD_EF01, 32);
        w.put(1, 1);
        assert_eq!(w.bit_len(), 36);
        // 101 + 1010_1011_1100_1101_1110_1111_0000_0001 + 1 + 0000 padding
        assert_eq!(
            w.finish(),
            vec![
                0b1011_0101,
                0b0111_1001,
                0b1011_1101,
                0b1110_0000,
                0b0011_0000
            ]
        );
    }

    #[test]
    fn codec_golomb_parameter_by_hand() {
        // p = 1/2: theta = 1/2, 1/2 + 1/4 <= 1 -> m = 1.
        assert_eq!(golomb_parameter(2, 1), 1);
        assert_eq!(golomb_parameter(1000, 500), 1);
        // theta = 0.7: 0.7 + 0.49 > 1, 0.49 + 0.343 <= 1 -> m = 2.
        assert_eq!(golomb_parameter(10, 3), 2);
        // theta = 0.9: 0.9^6 * 1.9 = 1.0097 > 1, 0.9^7 * 1.9 = 0.9088 -> m = 7.
        assert_eq!(golomb_parameter(10, 1), 7);
        assert_eq!(golomb_parameter(1000, 100), 7);
        // theta = 0.95: 0.95^13 * 1.95 = 1.0015, 0.95^14 * 1.95 = 0.9514 -> m = 14.
        assert_eq!(golomb_parameter(20, 1), 14);
        // theta = 0.99: 0.99^68 * 1.99 = 1.0039, 0.99^69 * 1.99 = 0.9939 -> m = 69.
        assert_eq!(golomb_parameter(100, 1), 69);
        // theta = 0.6 (just below the golden ratio 0.618): 0.6 + 0.36 <= 1 -> m = 1;
        // theta = 0.62: 0.62 + 0.3844 > 1 -> m = 2.
        assert_eq!(golomb_parameter(5, 2), 1);
        assert_eq!(golomb_parameter(50, 19), 2);
        // One kept entry in a full block: ceil(ln(2 - 2^-20) / -ln(1 - 2^-20)) = 726_817.
        assert_eq!(golomb_parameter(1 << 20, 1), 726_817);
        // Degenerate inputs.
        assert_eq!(golomb_parameter(10, 0), 1);
        assert_eq!(golomb_parameter(10, 10), 1);
        assert_eq!(golomb_parameter(0, 0), 1);
    }

    fn round_trip(n: u32, offsets: &[u32]) -> Vec<u8> {
        let bytes = encode_block_positions(n, offsets);
        let mut out = vec![0u32; offsets.len()];
        decode_block_positions(n, 7, &bytes, &mut out).unwrap();
        let expect: Vec<u32> = offsets.iter().map(|o| o + 7).collect();
        assert_eq!(out, expect);
        bytes
    }

    #[test]
    fn codec_block_positions_by_hand() {
        // n = 10, k = 1: m = 7 (b = 3, u = 1); offset 8 -> gap 8 = q 1, r 1 -> "10" + "010"
        // (r >= u: r + u = 2 in 3 bits).
        assert_eq!(round_trip(10, &[8]), vec![0b1001_0000]);
        // n = 4, k = 2: m = 1 (theta 1/2); offsets 1, 3 -> gaps 1, 1 -> "10" "10".
        assert_eq!(round_trip(4, &[1, 3]), vec![0b1010_0000]);
        // n = 4, k = 3: complement, c = 1, theta = 3/4: 0.75 + 0.5625 > 1, 0.5625 + 0.4219 <= 1 -> m = 2.
        // Non-kept offset 2 -> gap 2 = q 1, r 0 -> "10" "0".
        assert_eq!(round_trip(4, &[0, 1, 3]), vec![0b1000_0000]);
        // Empty and full blocks take no bytes.
        assert!(round_trip(5, &[]).is_empty());
        assert!(round_trip(5, &[0, 1, 2, 3, 4]).is_empty());
        assert!(round_trip(1, &[0]).is_empty());
    }

    #[test]
    fn codec_block_positions_rejects_bad_streams() {
        let mut out = vec![0u32; 1];
        // Empty stream for a block that needs bits.
        assert!(decode_block_positions(10, 0, &[], &mut out).is_err());
        // Trailing byte.
        assert!(decode_block_positions(10, 0, &[0b1001_0000, 0], &mut out).is_err());
        // Nonzero padding.
        assert!(decode_block_positions(10, 0, &[0b1001_0001], &mut out).is_err());
        // Gap past the block end: q = 2 -> gap >= 14 > 9.
        assert!(decode_block_positions(10, 0, &[0b1100_0000], &mut out).is_err());
        // All ones: unary never ends.
        assert!(decode_block_positions(10, 0, &[0xFF; 4], &mut out).is_err());
        // A non-empty stream for an empty or full block.
        assert!(decode_block_positions(10, 0, &[0], &mut []).is_err());
        // More kept than elements.
        assert!(decode_block_positions(1, 0, &[], &mut [0, 0]).is_err());
    }

    /// A direct-mode stream decoded with the bit-by-bit path only (the reference for the fast
    /// path): the positions, or the first error.
    fn decode_checked_only(n: u32, k: u32, data: &[u8]) -> Result<Vec<u32>, &'static str> {
        let mut d = DirectPositions::new(n, k, 7, data).expect("direct mode");
        let out = (0..k)
            .map(|_| d.next_checked())
            .collect::<Result<Vec<_>, _>>()?;
        d.finish().map(|()| out)
    }

    /// The same with the fast path where it applies (what `decode_block_positions` runs).
    fn decode_fast(n: u32, k: u32, data: &[u8]) -> Result<Vec<u32>, &'static str> {
        let mut d = DirectPositions::new(n, k, 7, data).expect("direct mode");
        let mut out = vec![0; k as usize];
        d.decode_into(&mut out)
            .and_then(|()| d.finish())
            .map(|()| out)
    }

    #[test]
    fn codec_fast_position_path_decodes_exactly_as_the_checked_path() {
        use crate::splitmix::mix64;
        let (mut ok, mut refused) = (0, 0);
        for seed in 0..400u64 {
            let r = |i: u64| mix64(seed * 1000 + i);
            let n = 2 + (r(0) % 20_000) as u32;
            // Densities from very sparse (long unary runs) to one half.
            let cap = u64::from(((n / 2) >> (r(2) % 8)).max(1));
            let k = (1 + r(1) % cap).min(u64::from(n / 2)) as u32;
            let mut chosen: Vec<u32> = (0..n)
                .filter(|&o| r(10 + u64::from(o)) % u64::from(n) < u64::from(k))
                .collect();
            chosen.truncate(k as usize);
            if chosen.is_empty() {
                continue;
            }
            let k = chosen.len() as u32;
            let mut data = encode_block_positions(n, &chosen);
            let want: Vec<u32> = chosen.iter().map(|o| o + 7).collect();
            assert_eq!(decode_fast(n, k, &data), Ok(want.clone()), "seed {seed}");
            // Corruptions: a flipped bit, a truncation or an extra byte.
            let at = (r(4) % data.len() as u64) as usize;
            match r(3) % 3 {
                0 => data[at] ^= 1 << (r(5) % 8),
                1 => data.truncate(at),
                _ => data.push(r(4) as u8),
            }
            let (fast, checked) = (decode_fast(n, k, &data), decode_checked_only(n, k, &data));
            assert_eq!(fast, checked, "seed {seed}");
            if fast.is_ok() {
                ok += 1
            } else {
                refused += 1
            }
        }
        // Both outcomes were exercised.
        assert!(ok > 10 && refused > 100, "{ok} accepted, {refused} refused");
    }

    /// Appends the codeword of `gap` under divisor `m`, one bit at a time, straight from the
    /// module docs (division, unary, truncated binary): the reference for the writer.
    fn push_codeword_reference(bits: &mut Vec<bool>, m: u32, gap: u32) {
        let (q, r) = (gap / m, gap % m);
        bits.extend(std::iter::repeat_n(true, q as usize));
        bits.push(false);
        let b = (0..=32).find(|&b| 1u64 << b >= u64::from(m)).unwrap();
        let u = (1u64 << b) - u64::from(m);
        let (v, width) = if u64::from(r) < u {
            (u64::from(r), b - 1)
        } else {
            (u64::from(r) + u, b)
        };
        bits.extend((0..width).rev().map(|i| v >> i & 1 == 1));
    }

    /// Packs bits MSB-first, zero-padded.
    fn pack(bits: &[bool]) -> Vec<u8> {
        bits.chunks(8)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u8, |a, (i, &b)| a | u8::from(b) << (7 - i))
            })
            .collect()
    }

    /// A block's position stream from the module docs: the coded set (kept offsets, or the
    /// non-kept ones when 2k > n), its gaps, one codeword after the other, bit by bit.
    fn block_positions_reference(n: u32, offsets: &[u32]) -> Vec<u8> {
        let k = offsets.len() as u32;
        if k == 0 || k == n {
            return Vec::new();
        }
        let coded: Vec<u32> = if 2 * k <= n {
            offsets.to_vec()
        } else {
            (0..n)
                .filter(|o| offsets.binary_search(o).is_err())
                .collect()
        };
        let m = golomb_parameter(n, coded.len() as u32);
        let mut bits = Vec::new();
        let mut next = 0;
        for &o in &coded {
            push_codeword_reference(&mut bits, m, o - next);
            next = o + 1;
        }
        pack(&bits)
    }

    #[test]
    fn codec_golomb_division_by_reciprocal_is_exact() {
        use crate::splitmix::mix64;
        let mut divisors: Vec<u32> = (1..=1000)
            .chain([u32::MAX, u32::MAX - 1, 1 << 31])
            .collect();
        divisors.extend((0..2000).map(|i| (mix64(i) >> (32 + i % 32)) as u32 | 1));
        divisors.extend((0..31).map(|b| 1u32 << b));
        for m in divisors {
            let code = GolombCode::new(m);
            let mut gaps = vec![0, 1, m - 1, m, m.saturating_add(1), u32::MAX, u32::MAX - 1];
            let top = u32::MAX / m; // largest quotient
            for j in [1, 2, top / 2, top.saturating_sub(1), top] {
                let g = u64::from(j) * u64::from(m);
                gaps.extend(
                    [g.saturating_sub(1), g, g + 1].map(|g| g.min(u64::from(u32::MAX)) as u32),
                );
            }
            gaps.extend((0..16).map(|i| mix64(u64::from(m) << 8 | i) as u32));
            for g in gaps {
                assert_eq!(code.divide(g), (g / m, g % m), "{g} / {m}");
            }
        }
    }

    #[test]
    fn codec_golomb_writer_equals_bitwise_reference() {
        use crate::splitmix::mix64;
        // Per divisor, a run of codewords in one writer (so they straddle every byte and word
        // boundary), including unary parts of 0 to 200 bits (over 32 and 56).
        let mut divisors: Vec<u32> = (1..=40).chain([63, 64, 65, 1000, 726_817]).collect();
        divisors.extend((0..40).map(|i| (mix64(i) >> (33 + i % 31)) as u32 | 1));
        divisors.extend([1u32 << 31, u32::MAX]);
        for (t, &m) in divisors.iter().enumerate() {
            let code = GolombCode::new(m);
            let mut w = BitWriter::default();
            let mut bits = Vec::new();
            for i in 0..300u64 {
                let r = mix64((t as u64) << 20 | i);
                let q = match i % 5 {
                    0 => r % 201,
                    _ => r % 3,
                };
                let gap = (q * u64::from(m) + (r >> 32) % u64::from(m)).min(u64::from(u32::MAX));
                let gap = gap as u32;
                code.put(&mut w, gap);
                push_codeword_reference(&mut bits, m, gap);
                assert_eq!(w.bit_len(), bits.len() as u64, "m {m}, codeword {i}");
            }
            assert_eq!(w.finish(), pack(&bits), "m {m}");
        }
    }

    #[test]
    fn codec_block_positions_equal_bitwise_reference() {
        use crate::splitmix::mix64;
        let mut cases: Vec<(u32, Vec<u32>)> = vec![
            (1, vec![]),
            (1, vec![0]),
            (2, vec![1]),
            (3, vec![0, 2]),
            // k = n / 2 exactly: direct mode with m = 1, then one gap of 500 ones.
            (1000, (0..499).chain([999]).collect()),
            // Complement mode (2k > n): non-kept 0..400 and 999, m = 1, then a gap of 598.
            (1000, (400..999).collect()),
            // Almost all kept, almost none kept.
            (5000, (0..5000).filter(|&o| o != 2500).collect()),
            (1 << 20, vec![(1 << 20) - 1]),
            (1 << 20, vec![0]),
        ];
        for seed in 0..300u64 {
            let n = 1 + (mix64(seed) % 5000) as u32;
            // Densities from 2^-12 to 1.
            let shift = mix64(seed + 1) % 13;
            let offsets: Vec<u32> = (0..n)
                .filter(|&o| mix64(seed << 32 | u64::from(o)) >> (64 - 12) < 4096 >> shift)
                .collect();
            cases.push((n, offsets));
        }
        let mut complement = 0;
        for (n, offsets) in &cases {
            let bytes = encode_block_positions(*n, offsets);
            assert_eq!(
                bytes,
                block_positions_reference(*n, offsets),
                "n {n}, {offsets:?}"
            );
            if !offsets.is_empty() && offsets.len() < *n as usize {
                let mut out = vec![0u32; offsets.len()];
                decode_block_positions(*n, 0, &bytes, &mut out).unwrap();
                assert_eq!(&out, offsets);
            }
            complement += usize::from(2 * offsets.len() > *n as usize);
        }
        assert!(complement > 20, "{complement} complement-mode blocks");
    }
}
