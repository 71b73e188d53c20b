//! Random numbers that every backend can reproduce.
//!
//! Two generators, both portable and fully determined by integers we can store in a checkpoint:
//! - [`Rng`]: a sequential xoshiro256++ stream for host-side sampling (negatives, shuffles, init,
//!   synthetic data). Its state is four `u64`s, so resuming a run restores it exactly.
//! - [`counter_uniform`]: a stateless, counter-based hash of `(seed, step, element)` for dropout
//!   masks. A CUDA kernel computes the same bits from the same three integers, so CPU and GPU agree on
//!   every mask without sharing any state (the kernel twin lives in `kernels/`).

/// SplitMix64 finaliser: a bijective 64-bit mixer (Steele, Lea & Flood 2014).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from `(seed, step, element)`, stateless. 24 random bits, exactly representable.
#[inline]
pub fn counter_uniform(seed: u64, step: u64, element: u64) -> f32 {
    counter_uniform_at(counter_base(seed, step), element)
}

/// The per-(seed, step) part of [`counter_uniform`], hoisted out of element loops.
#[inline]
pub fn counter_base(seed: u64, step: u64) -> u64 {
    mix64(seed ^ mix64(step))
}

/// [`counter_uniform`] given its precomputed [`counter_base`]: one mix per element.
#[inline]
pub fn counter_uniform_at(base: u64, element: u64) -> f32 {
    (mix64(base ^ element) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// xoshiro256++ (Blackman & Vigna), seeded through SplitMix64.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    pub state: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            mix64(s.wrapping_sub(0x9E37_79B9_7F4A_7C15))
        };
        let state = [next(), next(), next(), next()];
        Rng { state }
    }

    /// A child stream for a named purpose, independent of how much the parent has been used.
    pub fn derive(seed: u64, purpose: &str) -> Self {
        let mut h = seed;
        for b in purpose.bytes() {
            h = mix64(h ^ b as u64);
        }
        Rng::new(h)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 bits.
    #[inline]
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift; unbiased by rejection). `n` must be > 0.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform_f64().max(1e-300);
        let u2 = self.uniform_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_uniform_is_stateless_and_spread() {
        assert_eq!(counter_uniform(7, 3, 11), counter_uniform(7, 3, 11));
        assert_ne!(counter_uniform(7, 3, 11), counter_uniform(7, 3, 12));
        assert_ne!(counter_uniform(7, 3, 11), counter_uniform(7, 4, 11));
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| counter_uniform(1, 2, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn rng_is_reproducible_and_below_is_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[a.below(7) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
