//! A counter-based random number generator: every draw is a pure function of
//! `(seed, stream, step, token, slot)`, so noise and reroute decisions do not
//! depend on the thread count or on the order in which tokens are processed
//! (the approach of JAX's keyed RNG and of Philox in cuRAND).
//!
//! The mixing function is the SplitMix64 finalizer (Steele, Lea & Flood,
//! "Fast splittable pseudorandom number generators", OOPSLA 2014), applied
//! once per key word.

/// Independent families of draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Multiplicative jitter on logits.
    Jitter = 1,
    /// Additive Gaussian noise on logits.
    Gaussian = 2,
    /// The coin that decides whether an overflowing assignment tries a reroute.
    Reroute = 3,
}

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for the key.
#[inline]
pub fn bits(seed: u64, stream: Stream, step: u64, token: u64, slot: u64) -> u64 {
    let mut h = mix(seed);
    h = mix(h ^ stream as u64);
    h = mix(h ^ step);
    h = mix(h ^ token);
    mix(h ^ slot)
}

/// A uniform draw in `[0, 1)` with 53 random bits.
#[inline]
pub fn uniform(seed: u64, stream: Stream, step: u64, token: u64, slot: u64) -> f64 {
    (bits(seed, stream, step, token, slot) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal draw (Box-Muller on two keyed uniforms).
#[inline]
pub fn normal(seed: u64, stream: Stream, step: u64, token: u64, slot: u64) -> f64 {
    let u1 = 1.0 - uniform(seed, stream, step, token, 2 * slot); // (0, 1]
    let u2 = uniform(seed, stream, step, token, 2 * slot + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A xorshift64 sequence (Marsaglia 2003) for the random inputs of unit tests.
#[cfg(test)]
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_keyed_and_roughly_uniform() {
        assert_eq!(uniform(1, Stream::Jitter, 2, 3, 4), uniform(1, Stream::Jitter, 2, 3, 4));
        assert_ne!(uniform(1, Stream::Jitter, 2, 3, 4), uniform(1, Stream::Jitter, 2, 3, 5));
        assert_ne!(uniform(1, Stream::Jitter, 2, 3, 4), uniform(1, Stream::Gaussian, 2, 3, 4));
        let n = 100_000;
        let mean = (0..n).map(|i| uniform(7, Stream::Reroute, 0, i, 0)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let m2 = (0..n).map(|i| normal(7, Stream::Gaussian, 0, i, 0).powi(2)).sum::<f64>() / n as f64;
        assert!((m2 - 1.0).abs() < 0.03, "{m2}");
    }
}
