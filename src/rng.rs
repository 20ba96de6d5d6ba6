//! A small, seedable, serialisable random number generator (xoshiro256**, seeded through
//! SplitMix64). Used for LoRA initialisation, dropout masks, data shuffling and sampling, so
//! `--seed` makes a run reproducible and a checkpoint can store the exact state.

use rayon::prelude::*;

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

/// SplitMix64's counter step (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijection of u64 whose every output bit depends on every input bit.
fn splitmix64_finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Dropout draws are 16-bit uniforms: `u / 2^16` in [0, 1).
const DRAW_BITS: u32 = 16;

/// The least 16-bit draw `u` that is kept with drop probability `p`: `u / 2^16 >= p` holds iff
/// `u >= ceil(p * 2^16)` (`p * 2^16` is exact in f32: a power-of-two scaling). 0 (all kept) for
/// `p <= 0`; 2^16 (none kept) for `p >= 1` or NaN. `ptx/elementwise.cu` computes the same.
pub fn dropout_threshold(p: f32) -> u32 {
    if p <= 0.0 {
        0
    } else if p.is_nan() || p >= 1.0 {
        1 << DRAW_BITS
    } else {
        (p * (1u32 << DRAW_BITS) as f32).ceil() as u32
    }
}

/// Whether element `index` of a dropout mask keyed by `key` is kept, with drop probability `p`:
/// a counter-based draw. Elements come in quads: quad `q = index / 4` is the SplitMix64
/// finaliser of `key + (q + 1) * golden`, and element `index` takes its 16 bits
/// `16 * (index % 4) ..` as a uniform `u / 2^16`, dropped when below `p`
/// ([`dropout_threshold`]: p is resolved to 1 / 65536). Any element can be computed on its own,
/// in any order, on any device: `ptx/elementwise.cu` (`dropout_mask_from_keys`) computes the same
/// bits, one 64-bit hash for four mask bytes, so a GPU run sees the CPU run's masks.
pub fn dropout_keeps(key: u64, index: u64, p: f32) -> bool {
    quad_draw(quad_hash(key, index / 4), index % 4) >= dropout_threshold(p)
}

/// The hash of quad `quad` of the mask keyed by `key`: its four elements' 16-bit draws.
fn quad_hash(key: u64, quad: u64) -> u64 {
    splitmix64_finalize(key.wrapping_add(quad.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Element `lane` (0..4) of a quad's hash: its 16-bit draw.
fn quad_draw(hash: u64, lane: u64) -> u32 {
    ((hash >> (u64::from(DRAW_BITS) * lane)) & 0xFFFF) as u32
}

/// A whole dropout mask: `mask[i] = keep` where element `i` of the mask keyed by `key` is kept
/// with drop probability `p` ([`dropout_keeps`]), else 0. One hash serves a quad of elements;
/// quads run in parallel.
pub fn dropout_mask(key: u64, p: f32, keep: f32, mask: &mut [f32]) {
    let threshold = dropout_threshold(p);
    mask.par_chunks_mut(4)
        .with_min_len(1024)
        .enumerate()
        .for_each(|(quad, values)| {
            let hash = quad_hash(key, quad as u64);
            for (lane, value) in (0u64..).zip(values.iter_mut()) {
                *value = if quad_draw(hash, lane) >= threshold {
                    keep
                } else {
                    0.0
                };
            }
        });
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
        for p in [0.1f32, 0.05, 0.5] {
            let kept = (0..100_000u64)
                .filter(|&i| dropout_keeps(12345, i, p))
                .count();
            assert!(
                (kept as f64 / 1e5 - (1.0 - p as f64)).abs() < 0.005,
                "{p}: {kept}"
            );
        }
        assert!((0..1000u64).all(|i| dropout_keeps(7, i, 0.0)));
        assert!((0..1000u64).all(|i| !dropout_keeps(7, i, 1.0)));
        assert!((0..1000u64).all(|i| !dropout_keeps(7, i, f32::NAN)));
    }

    #[test]
    fn dropout_draws_are_the_quads_16_bit_lanes() {
        // Quad 0 of key 0, written out by hand from the SplitMix64 finaliser: elements 0..3 take
        // its bits 0-15, 16-31, 32-47, 48-63; quad 1 (elements 4..7) hashes 2 * golden.
        let finalize = |z: u64| {
            let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for (quad, counter) in [(0u64, GOLDEN), (1, GOLDEN.wrapping_mul(2))] {
            let h = finalize(counter);
            for lane in 0..4u64 {
                let u = ((h >> (16 * lane)) & 0xFFFF) as f32 / 65_536.0;
                let index = 4 * quad + lane;
                // Kept at p = u (u >= p), dropped at the next representable draw above it.
                assert!(dropout_keeps(0, index, u), "{index}");
                assert!(!dropout_keeps(0, index, u + 1.0 / 65_536.0), "{index}");
            }
        }
    }

    #[test]
    fn dropout_thresholds_resolve_p_to_a_65536th() {
        assert_eq!(dropout_threshold(0.1), 6554); // ceil(6553.6)
        assert_eq!(dropout_threshold(0.5), 32768);
        assert_eq!(dropout_threshold(0.0), 0);
        assert_eq!(dropout_threshold(-0.0), 0);
        assert_eq!(dropout_threshold(-1.0), 0);
        assert_eq!(dropout_threshold(1.0), 65536);
        assert_eq!(dropout_threshold(f32::NAN), 65536);
        assert_eq!(dropout_threshold(1e-30), 1);
        assert_eq!(dropout_threshold(1.0 - 1.0 / 65_536.0), 65535);
    }

    /// `quad_mask_word` of ptx/elementwise.cu: halfwords compared two at a time (vcmpgeu2:
    /// 0xFFFF where >=), each halfword's low byte picked (byte_perm 0x6420), masked to 0 or 1.
    fn quad_mask_word_as_the_kernel_packs(h: u64, threshold: u32) -> u32 {
        if threshold >= 1 << 16 {
            return 0;
        }
        let vcmpgeu2 = |a: u32, b: u32| {
            let ge = |s: u32| -> u32 {
                if (a >> s) & 0xFFFF >= (b >> s) & 0xFFFF {
                    0xFFFF << s
                } else {
                    0
                }
            };
            ge(0) | ge(16)
        };
        let both = threshold | (threshold << 16);
        let (lo, hi) = (vcmpgeu2(h as u32, both), vcmpgeu2((h >> 32) as u32, both));
        let bytes = (u64::from(hi) << 32 | u64::from(lo)).to_le_bytes();
        u32::from_le_bytes([bytes[0], bytes[2], bytes[4], bytes[6]]) & 0x0101_0101
    }

    #[test]
    fn the_kernels_packed_quad_is_dropout_keeps() {
        let mut rng = Rng::new(7);
        let ps = [
            0.1f32,
            0.05,
            0.5,
            0.9,
            0.0,
            -1.0,
            1.0,
            2.0,
            1e-30,
            f32::NAN,
            0.99999,
        ];
        for _ in 0..2000 {
            let key = rng.next_u64();
            let quad = rng.below(1 << 20) as u64;
            let h = splitmix64_finalize(key.wrapping_add((quad + 1).wrapping_mul(GOLDEN)));
            for &p in &ps {
                let word = quad_mask_word_as_the_kernel_packs(h, dropout_threshold(p));
                for lane in 0..4 {
                    let want = dropout_keeps(key, 4 * quad + lane, p);
                    assert_eq!((word >> (8 * lane)) & 1 == 1, want, "{p} {lane}");
                }
            }
        }
    }

    #[test]
    fn a_whole_mask_is_dropout_keeps_element_by_element() {
        // Lengths off a multiple of 4 and of the parallel chunks, several p.
        for (n, p) in [
            (10_003usize, 0.1f32),
            (4, 0.5),
            (1, 0.05),
            (0, 0.1),
            (5_000, 1.0),
        ] {
            let mut mask = vec![-1.0f32; n];
            dropout_mask(99, p, 1.25, &mut mask);
            for (i, &m) in mask.iter().enumerate() {
                let want = if dropout_keeps(99, i as u64, p) {
                    1.25
                } else {
                    0.0
                };
                assert_eq!(m, want, "n {n}, p {p}, element {i}");
            }
        }
    }

    #[test]
    fn neighbouring_keys_and_quads_draw_unrelated_masks() {
        // Masks of adjacent keys (a model's per-sequence keys) and of a key's adjacent quads agree
        // on about p^2 + (1 - p)^2 of their elements, as independent draws do.
        let n = 40_000u64;
        let same = (0..n)
            .filter(|&i| dropout_keeps(100, i, 0.5) == dropout_keeps(101, i, 0.5))
            .count();
        assert!((same as f64 / n as f64 - 0.5).abs() < 0.02, "{same}");
        let shifted = (0..n)
            .filter(|&i| dropout_keeps(100, i, 0.5) == dropout_keeps(100, i + 4, 0.5))
            .count();
        assert!((shifted as f64 / n as f64 - 0.5).abs() < 0.02, "{shifted}");
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
