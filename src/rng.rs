//! A small, seedable, serialisable random number generator (xoshiro256**, seeded through
//! SplitMix64). Used for LoRA initialisation, dropout masks, data shuffling and sampling, so
//! `--seed` makes a run reproducible and a checkpoint can store the exact state.

/// xoshiro256** state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator restored from [`Rng::state`]. An all-zero state (never produced by
    /// [`Rng::new`]) is replaced by a seeded one, since xoshiro would emit zeros forever.
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            Rng::new(0)
        } else {
            Rng { s }
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n); `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        // Lemire's multiply-shift; the bias for n far below 2^64 is negligible.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Whether element `index` of a dropout mask keyed by `key` is kept, with drop probability `p`:
/// a counter-based draw (the SplitMix64 finaliser of `key + (index + 1) * golden`, its top 24
/// bits as a uniform in [0, 1), dropped when below `p`). Any element can be computed on its own,
/// in any order, on any device: `ptx/elementwise.cu` (`dropout_mask_from_keys`) computes the same
/// bits, so a GPU run sees the CPU run's masks.
pub fn dropout_keeps(key: u64, index: u64, p: f32) -> bool {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let uniform = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    uniform >= p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_reference_sequence() {
        // Reference: xoshiro256** from state {1, 2, 3, 4} (the authors' C code) yields
        // 11520, 0, 1509978240, 1215971899390074240.
        let mut r = Rng { s: [1, 2, 3, 4] };
        assert_eq!(
            [r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64()],
            [11520, 0, 1509978240, 1215971899390074240]
        );
    }

    #[test]
    fn dropout_keeps_about_one_minus_p() {
        let kept = (0..100_000u64)
            .filter(|&i| dropout_keeps(12345, i, 0.1))
            .count();
        assert!((kept as f64 / 1e5 - 0.9).abs() < 0.005, "{kept}");
        assert!((0..1000u64).all(|i| dropout_keeps(7, i, 0.0)));
        // The first draws of key 0, written out by hand from the SplitMix64 finaliser.
        let z = 0x9E37_79B9_7F4A_7C15u64;
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let u = ((z ^ (z >> 31)) >> 40) as f32 / 16_777_216.0;
        assert!(dropout_keeps(0, 0, u));
        assert!(!dropout_keeps(0, 0, u + 1e-6));
    }

    /// The draw the way `dropout_mask_from_keys` in ptx/elementwise.cu computes it: in 32-bit
    /// words, the counter advanced by one add, only the high word of the last product, and an
    /// integer threshold.
    fn keeps_as_the_kernel_draws(counter: u64, threshold: u32) -> bool {
        let (lo, hi) = (counter as u32, (counter >> 32) as u32);
        let funnel = |lo: u32, hi: u32, s: u32| ((((hi as u64) << 32) | lo as u64) >> s) as u32;
        let (xlo, xhi) = (lo ^ funnel(lo, hi, 30), hi ^ (hi >> 30));
        let (c1_lo, c1_hi, c2_lo, c2_hi) = (
            0x1CE4_E5B9u32,
            0xBF58_476Du32,
            0x1331_11EBu32,
            0x94D0_49BBu32,
        );
        let w = xlo as u64 * c1_lo as u64;
        let zlo = w as u32;
        let zhi = ((w >> 32) as u32)
            .wrapping_add(xlo.wrapping_mul(c1_hi))
            .wrapping_add(xhi.wrapping_mul(c1_lo));
        let (ylo, yhi) = (zlo ^ funnel(zlo, zhi, 27), zhi ^ (zhi >> 27));
        let top = (((ylo as u64 * c2_lo as u64) >> 32) as u32)
            .wrapping_add(ylo.wrapping_mul(c2_hi))
            .wrapping_add(yhi.wrapping_mul(c2_lo));
        (top >> 8) >= threshold
    }

    /// `dropout_threshold` of ptx/elementwise.cu.
    fn kernel_threshold(p: f32) -> u32 {
        if p <= 0.0 {
            0
        } else if p.is_nan() || p >= 1.0 {
            1 << 24
        } else {
            (p * 16_777_216.0).ceil() as u32
        }
    }

    #[test]
    fn the_kernels_32_bit_draw_is_dropout_keeps() {
        let golden = 0x9E37_79B9_7F4A_7C15u64;
        let mut rng = Rng::new(7);
        let ps = [
            0.1f32,
            0.05,
            0.25,
            0.5,
            0.9,
            0.0,
            -0.0,
            -1.0,
            1.0,
            2.0,
            1.0 - 1.0 / 16_777_216.0,
            1.0 / 16_777_216.0,
            3e-8,
            1e-30,
            f32::NAN,
        ];
        for _ in 0..2000 {
            let key = rng.next_u64();
            let first = rng.below(1 << 20) as u64;
            let mut counter = key.wrapping_add(first.wrapping_add(1).wrapping_mul(golden));
            for j in first..first + 16 {
                for &p in &ps {
                    let want = dropout_keeps(key, j, p);
                    assert_eq!(
                        keeps_as_the_kernel_draws(counter, kernel_threshold(p)),
                        want
                    );
                }
                counter = counter.wrapping_add(golden);
            }
        }
    }

    #[test]
    fn state_round_trips_and_uniforms_are_in_range() {
        let mut a = Rng::new(42);
        a.next_u64();
        let mut b = Rng::from_state(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
        let mean: f64 = (0..10_000).map(|_| a.next_f32() as f64).sum::<f64>() / 1e4;
        assert!((mean - 0.5).abs() < 0.02);
        assert!((0..1000).all(|_| a.below(7) < 7));
    }
}
