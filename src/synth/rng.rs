//! Counter-based random numbers for the synthetic generator.
//!
//! Every random stream is keyed by a tuple (seed, purpose, model, tensor, row) hashed with
//! splitmix64, and then drawn sequentially from four interleaved xoshiro256++ generators
//! seeded from that key.
//! Rows are the unit of parallel work, so the output does not depend on how many threads ran.
//!
//! The float transforms (Box-Muller normals, Bailey's Student-t) take one 64-bit draw each, with
//! no rejection, and use only IEEE-754 basic operations (`+ - * /`, `sqrt`) and bit
//! manipulation, with our own `log2`/`exp2`/`sin`/`cos` polynomials instead of the platform's
//! libm: batches vectorize, and the values, therefore the files, are the same on every machine.

pub use crate::splitmix::splitmix64;

/// A 64-bit key for a stream: the parts are absorbed one after another through splitmix64.
pub fn key(parts: &[u64]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64; // pi, so that key(&[]) is not trivially zero
    for &p in parts {
        let mut s = h ^ p;
        h = splitmix64(&mut s);
    }
    h
}

/// Independent xoshiro256++ generators interleaved in one stream: draw `i` comes from lane
/// `i % LANES`. The lanes' dependency chains overlap (and vectorize), which makes batches of
/// draws several times faster than one generator's chain allows.
pub const LANES: usize = 4;

/// One step of xoshiro256++ (Blackman and Vigna) on lane `l` of a lane-interleaved state
/// (`s[k][l]` is word `k` of lane `l`).
#[inline(always)]
fn step(s: &mut [[u64; LANES]; 4], l: usize) -> u64 {
    let result = s[0][l]
        .wrapping_add(s[3][l])
        .rotate_left(23)
        .wrapping_add(s[0][l]);
    let t = s[1][l] << 17;
    s[2][l] ^= s[0][l];
    s[3][l] ^= s[1][l];
    s[1][l] ^= s[2][l];
    s[0][l] ^= s[3][l];
    s[2][l] ^= t;
    s[3][l] = s[3][l].rotate_left(45);
    result
}

/// A random stream: [`LANES`] xoshiro256++ generators, used in turn, with float helpers.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [[u64; LANES]; 4],
    /// The lane of the next draw.
    next: usize,
}

impl Rng {
    /// Every lane with this exact xoshiro256++ state (for reference tests).
    #[cfg(test)]
    pub fn from_state(state: [u64; 4]) -> Self {
        Rng {
            s: state.map(|w| [w; LANES]),
            next: 0,
        }
    }

    /// A stream seeded from `key` by splitmix64, as the xoshiro authors recommend: lane 0 takes
    /// the first four outputs, lane 1 the next four, and so on.
    pub fn from_key(key: u64) -> Self {
        let mut st = key;
        let mut s = [[0; LANES]; 4];
        for l in 0..LANES {
            for word in s.iter_mut() {
                word[l] = splitmix64(&mut st);
            }
        }
        Rng { s, next: 0 }
    }

    /// A generator for the stream keyed by `parts`.
    pub fn stream(parts: &[u64]) -> Self {
        Self::from_key(key(parts))
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let r = step(&mut self.s, self.next);
        self.next = (self.next + 1) % LANES;
        r
    }

    /// Uniform in [0, 1) with 53 bits (f64).
    #[inline]
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals from one draw (see [`normal_pair_from`]).
    #[inline]
    pub fn normal_pair(&mut self) -> (f32, f32) {
        normal_pair_from(self.next_u64())
    }

    /// A unit-variance Student-t (5 degrees of freedom) from one draw (see [`t5_from`]); the
    /// scalar reference of [`fill_t5`](Self::fill_t5).
    #[cfg(test)]
    pub fn student_t5_unit(&mut self) -> f32 {
        t5_from(self.next_u64())
    }

    /// The next `n` draws into `b`, as high and low 32-bit halves (the same draws as `n` calls
    /// of [`next_u64`](Self::next_u64)).
    fn fill_draws(&mut self, n: usize, b: &mut Batch) {
        b.hi.resize(n, 0);
        b.lo.resize(n, 0);
        let (hi, lo) = (&mut b.hi[..], &mut b.lo[..]);
        let mut i = 0;
        while i < n && self.next != 0 {
            (hi[i], lo[i]) = halves(self.next_u64());
            i += 1;
        }
        let end = i + (n - i) / LANES * LANES;
        draws_kernel(&mut self.s, &mut hi[i..end], &mut lo[i..end]);
        for j in end..n {
            (hi[j], lo[j]) = halves(self.next_u64());
        }
    }

    /// `out.len()` standard normals in a batch that vectorizes: with `h = ceil(n / 2)` pairs
    /// from [`normal_pair`](Self::normal_pair), `out[j]` is the first of pair `j` and
    /// `out[h + j]` the second.
    pub fn fill_normal(&mut self, out: &mut [f32], b: &mut Batch) {
        let h = out.len().div_ceil(2);
        self.fill_draws(h, b);
        b.second.resize(h, 0.0);
        let (first, second) = out.split_at_mut(h);
        normal_kernel(first, &mut b.second, &b.hi, &b.lo);
        second.copy_from_slice(&b.second[..second.len()]);
    }

    /// `out.len()` values of `student_t5_unit` (the tests' scalar reference), in a batch that
    /// vectorizes.
    pub fn fill_t5(&mut self, out: &mut [f32], b: &mut Batch) {
        self.fill_draws(out.len(), b);
        t5_kernel(out, &b.hi, &b.lo);
    }
}

/// The high and low 32 bits of `r`.
#[inline(always)]
fn halves(r: u64) -> (u32, u32) {
    ((r >> 32) as u32, r as u32)
}

/// Scratch space of the batch generators.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    hi: Vec<u32>,
    lo: Vec<u32>,
    second: Vec<f32>,
}

use crate::simd::multiversion;

multiversion! {
    /// Draws for every lane in turn into `hi`, `lo` (lengths a multiple of [`LANES`]).
    fn draws_kernel(s: &mut [[u64; LANES]; 4], hi: &mut [u32], lo: &mut [u32]) {
        for (h, l) in hi.chunks_exact_mut(LANES).zip(lo.chunks_exact_mut(LANES)) {
            for lane in 0..LANES {
                (h[lane], l[lane]) = halves(step(s, lane));
            }
        }
    }
}

multiversion! {
    /// `out[i] = t5_from(hi[i] << 32 | lo[i])`.
    fn t5_kernel(out: &mut [f32], hi: &[u32], lo: &[u32]) {
        for ((o, &h), &l) in out.iter_mut().zip(hi).zip(lo) {
            let (w, x) = split_halves(h, l);
            *o = sin(x) * t5_radius(w);
        }
    }
}

multiversion! {
    /// `(first[i], second[i]) = normal_pair_from(hi[i] << 32 | lo[i])`.
    fn normal_kernel(first: &mut [f32], second: &mut [f32], hi: &[u32], lo: &[u32]) {
        for (((a, b), &h), &l) in first.iter_mut().zip(second.iter_mut()).zip(hi).zip(lo) {
            (*a, *b) = normal_pair_halves(h, l);
        }
    }
}

/// The two uniforms of one draw: `w` in (0, 1] from the high 31 bits (`(k + 1/2) / 2^31`,
/// so `w >= 2^-32`), and an angle `x = pi (u - 1/2)` in (-pi/2, pi/2) from bits 9..32
/// (`u = (j + 1/2) / 2^23`, exact).
#[cfg(test)]
fn split(r: u64) -> (f32, f32) {
    split_halves((r >> 32) as u32, r as u32)
}

/// `split` of the draw `hi << 32 | lo`.
#[inline(always)]
fn split_halves(hi: u32, lo: u32) -> (f32, f32) {
    let w = ((hi >> 1) as i32 as f32 + 0.5) * (1.0 / 2_147_483_648.0);
    let u = ((lo >> 9) as i32 as f32 + 0.5) * (1.0 / 8_388_608.0);
    (w, std::f32::consts::PI * (u - 0.5))
}

/// Box-Muller: `sqrt(-2 ln w) * (cos 2x, sin 2x)`, with `2x` uniform over the circle
/// (`sin 2x = 2 sin x cos x`, `cos 2x = (cos x - sin x)(cos x + sin x)`).
#[inline(always)]
pub fn normal_pair_from(r: u64) -> (f32, f32) {
    normal_pair_halves((r >> 32) as u32, r as u32)
}

#[inline(always)]
fn normal_pair_halves(hi: u32, lo: u32) -> (f32, f32) {
    let (w, x) = split_halves(hi, lo);
    let radius = normal_radius(w);
    let (s, c) = (sin(x), cos(x));
    (radius * ((c - s) * (c + s)), radius * (2.0 * s * c))
}

/// Student-t with `nu = 5` by Bailey's trigonometric method, `T = cos(phi) sqrt(nu (w^(-2/nu) - 1))`
/// with `w` uniform on (0, 1] and `phi` on the circle (`cos phi` has the law of `sin x`), scaled
/// to unit variance by `sqrt((nu - 2) / nu)`: `sin(x) sqrt(3 (w^(-0.4) - 1))`. Excess
/// kurtosis 6. The smallest `w` (2^-32) bounds `|T|` by 146, a cut the unit t5 passes with
/// probability about 4e-11.
#[cfg(test)]
pub fn t5_from(r: u64) -> f32 {
    let (w, x) = split(r);
    sin(x) * t5_radius(w)
}

/// `sqrt(-2 ln w)`.
#[inline(always)]
fn normal_radius(w: f32) -> f32 {
    (-2.0 * std::f32::consts::LN_2 * log2(w)).sqrt()
}

/// `sqrt(3 (w^(-0.4) - 1))`.
#[inline(always)]
fn t5_radius(w: f32) -> f32 {
    (3.0 * (exp2(-0.4 * log2(w)) - 1.0)).sqrt()
}

/// sin on [-pi/2, pi/2]: Taylor series to x^11 (error below 6e-8).
#[inline(always)]
fn sin(x: f32) -> f32 {
    let x2 = x * x;
    x * (1.0
        + x2 * (-1.0 / 6.0
            + x2 * (1.0 / 120.0
                + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362_880.0 + x2 * (-1.0 / 39_916_800.0))))))
}

/// cos on [-pi/2, pi/2]: Taylor series to x^12 (error below 7e-9).
#[inline(always)]
fn cos(x: f32) -> f32 {
    let x2 = x * x;
    1.0 + x2
        * (-0.5
            + x2 * (1.0 / 24.0
                + x2 * (-1.0 / 720.0
                    + x2 * (1.0 / 40_320.0
                        + x2 * (-1.0 / 3_628_800.0 + x2 * (1.0 / 479_001_600.0))))))
}

/// A stream of standard normals that keeps the second of each pair.
#[derive(Debug, Clone)]
pub struct Normals {
    rng: Rng,
    spare: Option<f32>,
}

impl Normals {
    /// Normals from `rng`.
    pub fn new(rng: Rng) -> Self {
        Normals { rng, spare: None }
    }
    /// The next standard normal.
    #[inline]
    pub fn next(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (a, b) = self.rng.normal_pair();
        self.spare = Some(b);
        a
    }
}

/// log2 of a positive, normal, finite `x`, to about 1e-7 relative, with basic operations only.
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
                                                                // Bring m into (sqrt(1/2), sqrt(2)] (written so that it compiles to selects, not branches).
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    // Wrapping ops: no overflow checks in the way of vectorization (none can overflow).
    let e = e.wrapping_add(big as i32).wrapping_sub(127);
    // ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716: the series to s^9 is within 1e-9.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let ln_m =
        s * (2.0 + s2 * (2.0 / 3.0 + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0)))));
    e as f32 + ln_m * std::f32::consts::LOG2_E
}

/// 2^y for |y| < 126, to about 1e-7 relative, with basic operations only.
#[inline(always)]
pub fn exp2(y: f32) -> f32 {
    // k = y rounded to an integer (nearest, ties to even) by the 1.5 * 2^23 trick: the low
    // mantissa bits of `y + MAGIC` then hold `2^22 + k`. No libm `floor`, no saturating
    // float-to-int cast: the loops around this vectorize.
    const MAGIC: f32 = 12_582_912.0;
    let t = y + MAGIC;
    let k = t - MAGIC;
    let ki = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let f = (y - k) * std::f32::consts::LN_2; // |f| <= ln2 / 2
                                              // Taylor series of e^f to f^7: remainder below 6e-9.
    let p = 1.0
        + f * (1.0
            + f * (1.0 / 2.0
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits((ki.wrapping_add(127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_outputs() {
        // xoshiro256++ from state {1, 2, 3, 4} (reference implementation's first outputs), in
        // every lane.
        let mut r = Rng::from_state([1, 2, 3, 4]);
        let first: Vec<u64> = (0..4 * LANES).map(|_| r.next_u64()).collect();
        let want = [41943041u64, 58720359, 3588806011781223, 3591011842654386];
        assert_eq!(
            first,
            want.iter().flat_map(|&w| [w; LANES]).collect::<Vec<u64>>()
        );
        // Keys depend on every part and on their order.
        assert_ne!(key(&[1, 2]), key(&[2, 1]));
        assert_ne!(key(&[0]), key(&[0, 0]));
    }

    #[test]
    fn log2_and_exp2_match_std() {
        let mut r = Rng::from_key(7);
        for i in 0..200_000 {
            let x = if i % 2 == 0 {
                (r.uniform_f64() as f32).max(1e-30)
            } else {
                exp2_std(r.uniform_f64() as f32 * 100.0 - 50.0)
            };
            let (a, b) = (log2(x) as f64, (x as f64).log2());
            assert!(
                (a - b).abs() <= 3e-7 * b.abs().max(1.0),
                "log2({x}) = {a} vs {b}"
            );
            let y = r.uniform_f64() as f32 * 60.0 - 30.0;
            let (a, b) = (exp2(y) as f64, (y as f64).exp2());
            assert!((a - b).abs() <= 4e-7 * b, "exp2({y}) = {a} vs {b}");
        }
    }

    fn exp2_std(y: f32) -> f32 {
        y.exp2()
    }

    fn moments(v: &[f64]) -> (f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let m2 = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let m4 = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
        (mean, m2, m4 / (m2 * m2) - 3.0)
    }

    #[test]
    fn batches_equal_scalar_draws() {
        let mut d = Batch::default();
        for n in [0, 1, 2, 7, 1000, 1001] {
            let (mut a, mut b) = (Rng::from_key(n as u64), Rng::from_key(n as u64));
            // Start mid-way through the lanes.
            for _ in 0..n % 3 {
                assert_eq!(a.next_u64(), b.next_u64());
            }
            let mut out = vec![0.0; n];
            a.fill_t5(&mut out, &mut d);
            let want: Vec<f32> = (0..n).map(|_| b.student_t5_unit()).collect();
            assert_eq!(out, want);
            assert_eq!(a.next_u64(), b.next_u64(), "same stream position");
            a.fill_normal(&mut out, &mut d);
            let pairs: Vec<(f32, f32)> = (0..n.div_ceil(2)).map(|_| b.normal_pair()).collect();
            let mut want: Vec<f32> = pairs.iter().map(|p| p.0).collect();
            want.extend(pairs.iter().map(|p| p.1).take(n / 2));
            assert_eq!(out, want);
            assert_eq!(a.next_u64(), b.next_u64(), "same stream position");
        }
    }

    #[test]
    fn sin_cos_match_std() {
        for i in 0..=10_000 {
            let x = std::f32::consts::PI * (i as f32 / 10_000.0 - 0.5);
            assert!((sin(x) as f64 - (x as f64).sin()).abs() < 2e-7, "sin({x})");
            assert!((cos(x) as f64 - (x as f64).cos()).abs() < 2e-7, "cos({x})");
        }
        // Extremes of the draws: w = 2^-32 and w = 1, angles at the ends.
        let (w, x) = split(0);
        assert_eq!(w, 2f32.powi(-32));
        assert!(x > -std::f32::consts::FRAC_PI_2);
        let (w, x) = split(u64::MAX);
        assert!(w <= 1.0 && x < std::f32::consts::FRAC_PI_2);
        assert!(t5_from(0).is_finite() && t5_from(0).abs() > 100.0);
        assert!(normal_pair_from(0).0.is_finite());
    }

    #[test]
    fn normal_and_t_moments() {
        let mut n = Normals::new(Rng::from_key(1));
        let v: Vec<f64> = (0..1_000_000).map(|_| n.next() as f64).collect();
        let (mean, var, kurt) = moments(&v);
        assert!(
            mean.abs() < 0.005 && (var - 1.0).abs() < 0.01 && kurt.abs() < 0.05,
            "{mean} {var} {kurt}"
        );
        let frac_above_2 = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / v.len() as f64;
        assert!((frac_above_2 - 0.0455).abs() < 0.002, "{frac_above_2}");

        let mut r = Rng::from_key(2);
        let v: Vec<f64> = (0..1_000_000).map(|_| r.student_t5_unit() as f64).collect();
        let (mean, var, kurt) = moments(&v);
        assert!(
            mean.abs() < 0.005 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        // t5 has excess kurtosis 6; the sample estimate is noisy (the 8th moment is infinite).
        assert!(kurt > 3.0, "{kurt}");
        // P(|t5| > 2.015) = 0.1; scaled to unit variance the threshold is 2.015 * sqrt(3/5).
        let thr = 2.015 * 0.6f64.sqrt();
        let frac = v.iter().filter(|x| x.abs() > thr).count() as f64 / v.len() as f64;
        assert!((frac - 0.1).abs() < 0.002, "{frac}");
    }
}
