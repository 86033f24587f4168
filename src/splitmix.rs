//! SplitMix64 (Steele, Lea and Flood, 2014), the one 64-bit mixer of the project: seeds and
//! selection keys (`algorithm::selection`), the trace-norm estimator's counter-based random
//! numbers (`tracenorm::rng`), the synthetic generator's stream keys (`synth::rng`), and the test
//! data of tests, benches and examples ([`SplitMix64`]).

/// The increment of the SplitMix64 state: the odd integer nearest `2^64 / phi`.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// One step of SplitMix64: advances `state` by [`GOLDEN_GAMMA`] and returns the mixed output.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The output of one SplitMix64 step from state `z` (a bijective mix of `z`).
#[inline]
pub fn mix64(z: u64) -> u64 {
    let mut s = z;
    splitmix64(&mut s)
}

/// A SplitMix64 stream, for test data, benches and examples.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_outputs() {
        // SplitMix64 from state 0 (Vigna's reference implementation, splitmix64.c).
        let mut s = SplitMix64(0);
        assert_eq!(s.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(s.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(GOLDEN_GAMMA), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn unit_is_in_range() {
        let mut s = SplitMix64(7);
        assert!((0..1000).map(|_| s.unit()).all(|u| (0.0..1.0).contains(&u)));
    }
}
