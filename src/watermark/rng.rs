//! Seeded randomness with a fixed, documented stream per purpose, so that every random choice of
//! a watermark can be reproduced from the spec's seed alone: ChaCha8 seeded with the u64 seed
//! (rand_core's `seed_from_u64`), one stream number per use.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// What a random stream is used for; the value is the ChaCha stream number.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Stream {
    /// Which samples are poisoned.
    Selection = 0,
    /// Random labels of untargeted watermarks.
    Labels = 1,
    /// Seeded trigger patterns (noise blends, WaNet grids).
    Pattern = 2,
    /// WaNet noise-mode samples and their random grids; adaptive triggers' cover samples.
    Noise = 3,
    /// Which pieces of an adaptive trigger each training sample carries.
    Pieces = 4,
    /// Crafting with a model: which source images, the perturbations' starting points.
    Craft = 5,
    /// A trigger family's draw of one member (the release's secret or a verifier's control).
    Family = 6,
    /// The verifier's tie-breaks between equal effects.
    Ties = 7,
    /// An all-to-all labelling's permutation of the classes.
    Mapping = 8,
    /// The verifier's query traffic: the order images are sent in, and its decoys.
    Traffic = 9,
    /// The verifier's second asking of an image: which of its pixels change.
    Echo = 10,
}

/// A seeded generator with the few draws the watermark needs.
pub struct Rng(ChaCha8Rng);

impl Rng {
    /// The generator for `stream` of `seed`.
    pub fn new(seed: u64, stream: Stream) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream as u64);
        Self(r)
    }

    /// The generator for `stream` of `seed` mixed with the first 8 bytes of the sha256 of `image`:
    /// sample-specific triggers (Refool, PhysicalBA) draw the same values for the same image.
    pub fn for_image(seed: u64, image: &[u8], stream: Stream) -> Self {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(image);
        let mix = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        Self::new(seed ^ mix, stream)
    }

    /// Uniform integer in `0..n` (Lemire's method with rejection: unbiased).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        loop {
            let m = u128::from(self.0.next_u64()) * u128::from(n);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in [0, 1) with 24 bits, as an f32.
    pub fn unit_f32(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    /// A uniform u64.
    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.0.next_u32() as u8
    }

    /// Moves a uniformly random choice of `k` elements to the front (partial Fisher–Yates).
    pub fn choose_front<T>(&mut self, v: &mut [T], k: usize) {
        let n = v.len();
        for i in 0..k.min(n) {
            let j = i + self.below((n - i) as u64) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::new(7, Stream::Selection).below(1000))
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut s = Rng::new(7, Stream::Selection);
        let mut l = Rng::new(7, Stream::Labels);
        let x: Vec<u64> = (0..8).map(|_| s.below(1 << 40)).collect();
        let y: Vec<u64> = (0..8).map(|_| l.below(1 << 40)).collect();
        assert_ne!(x, y);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(1, Stream::Labels);
        let mut seen = [0usize; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (850..1150).contains(&c)), "{seen:?}");
    }
}
