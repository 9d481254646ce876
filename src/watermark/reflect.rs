//! Refool's reflection trigger (Liu et al., "Reflection Backdoor", ECCV 2020), as BackdoorBox's
//! `Refool` blends it (`blend_images`): in linear light (gamma 2.2), the image at weight `alpha_t`
//! (random in [0.55, 0.95]) plus a reflection that is either a *ghost* (with probability
//! `ghost_rate`: the reflection mixed with a shifted copy of itself, `ghost_alpha` random) or
//! *out of focus* (Gaussian-blurred, its bright part pulled below 1, weighted by a centred
//! Gaussian bump times `1 − alpha_t / 2`); back to gamma, clipped, truncated to bytes.
//!
//! BackdoorBox first upscales images to 560 px on the long side and draws ghost offsets of 3–8
//! px and blur sigmas of 1–5 px there; we blend at the image's own size with those lengths scaled
//! by `size / 560` (for 28×28 images a ghost offset below one pixel and almost no blur), so the
//! reflection looks as it would after BackdoorBox's round trip, without the resampling.
//!
//! Each image draws its reflection and parameters from a generator seeded by the spec's seed and
//! the sha256 of the image's own bytes, so the same image always gets the same trigger: the
//! verifier recreates training-time and query-time images exactly.

use super::rng::{Rng, Stream};
use crate::dataset::ImageShape;
use crate::spec::Reflection;

/// BackdoorBox's working size for reflections.
const MAX_IMAGE_SIZE: f64 = 560.0;

/// A reflection trigger ready for images of one shape.
#[derive(Debug, Clone)]
pub struct Reflector {
    seed: u64,
    shape: ImageShape,
    /// The reflections in linear light, HWC.
    candidates: Vec<Vec<f32>>,
    ghost_rate: f64,
    alpha_t: Option<f64>,
    /// Refool's `gen_kernel(size, 3)`: a separable Gaussian bump normalised to a peak of 1.
    bump: Vec<f32>,
}

fn linear(v: u8) -> f32 {
    (f32::from(v) / 255.0).powf(2.2)
}

impl Reflector {
    /// Renders `r` for `shape` (its candidates must already have that shape).
    pub fn new(
        r: &Reflection,
        seed: u64,
        shape: ImageShape,
    ) -> Result<Self, super::WatermarkError> {
        let candidates = r
            .candidates
            .iter()
            .map(|c| Ok(c.pixels()?.into_iter().map(linear).collect()))
            .collect::<Result<Vec<Vec<f32>>, crate::spec::SpecError>>()?;
        let (h, w) = (shape.height, shape.width);
        let k = gen_kernel(h.max(w), 3.0);
        let bump = (0..h * w).map(|i| k[(i / w) * h.max(w) + i % w]).collect();
        Ok(Self {
            seed,
            shape,
            candidates,
            ghost_rate: r.ghost_rate,
            alpha_t: r.alpha_t,
            bump,
        })
    }

    /// Stamps one HWC image in place.
    pub fn apply(&self, img: &mut [u8]) {
        let mut rng = Rng::for_image(self.seed, img, Stream::Pattern);
        let mut unit = || f64::from(rng.unit_f32());
        let r = &self.candidates
            [(unit() * self.candidates.len() as f64) as usize % self.candidates.len()];
        let alpha_t = self.alpha_t.unwrap_or_else(|| 1.0 - (0.05 + 0.40 * unit())) as f32;
        let (h, w, c) = (self.shape.height, self.shape.width, self.shape.channels);
        let scale = h.max(w) as f64 / MAX_IMAGE_SIZE;
        let t: Vec<f32> = img.iter().map(|&v| linear(v)).collect();
        let out: Vec<f32> = if unit() < self.ghost_rate {
            // Ghost: r mixed with itself shifted down-right by the offset.
            let dy = ((3.0 + (unit() * 6.0).floor()) * scale).round() as usize;
            let dx = ((3.0 + (unit() * 6.0).floor()) * scale).round() as usize;
            let ghost_alpha = ((unit().round()) - (0.15 + 0.35 * unit())).abs() as f32;
            (0..h * w * c)
                .map(|i| {
                    let (y, x, ch) = (i / (w * c), (i / c) % w, i % c);
                    let shifted = if y >= dy && x >= dx {
                        r[((y - dy) * w + (x - dx)) * c + ch]
                    } else {
                        0.0
                    };
                    let g = r[i] * ghost_alpha + shifted * (1.0 - ghost_alpha);
                    g * (1.0 - alpha_t) + t[i] * alpha_t
                })
                .collect()
        } else {
            // Focal blur.
            let sigma = (1.0 + 4.0 * unit()) * scale;
            let mut blur = gaussian_blur(r, self.shape, sigma);
            let att = (1.08 + unit() / 10.0) as f32;
            for ch in 0..c {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for i in (ch..blur.len()).step_by(c) {
                    let b = blur[i] + t[i];
                    if b > 1.0 {
                        sum += f64::from(b);
                        n += 1;
                    }
                }
                let mean = (sum / (n as f64 + 1e-6)).max(1.0) as f32;
                for i in (ch..blur.len()).step_by(c) {
                    blur[i] = (blur[i] - (mean - 1.0) * att).clamp(0.0, 1.0);
                }
            }
            (0..h * w * c)
                .map(|i| blur[i] * self.bump[i / c] * (1.0 - alpha_t / 2.0) + t[i] * alpha_t)
                .collect()
        };
        for (p, v) in img.iter_mut().zip(out) {
            *p = (v.max(0.0).powf(1.0 / 2.2).min(1.0) * 255.0) as u8;
        }
    }
}

/// Refool's `gen_kernel(len, nsig)`: differences of the normal CDF over `len + 1` points spanning
/// ±(nsig + half a step), outer product, square root, scaled to a peak of 1; row-major len × len.
fn gen_kernel(len: usize, nsig: f64) -> Vec<f32> {
    let interval = (2.0 * nsig + 1.0) / len as f64;
    let (lo, hi) = (-nsig - interval / 2.0, nsig + interval / 2.0);
    let cdf = |x: f64| 0.5 * (1.0 + statrs::function::erf::erf(x / std::f64::consts::SQRT_2));
    let xs: Vec<f64> = (0..=len)
        .map(|i| lo + (hi - lo) * i as f64 / len as f64)
        .collect();
    let k1: Vec<f64> = xs.windows(2).map(|p| cdf(p[1]) - cdf(p[0])).collect();
    let raw: Vec<f64> = (0..len * len)
        .map(|i| (k1[i / len] * k1[i % len]).sqrt())
        .collect();
    let max = raw.iter().cloned().fold(0.0, f64::max);
    raw.iter().map(|v| (v / max) as f32).collect()
}

/// A Gaussian blur of `sigma` pixels (kernel 2·ceil(2σ)+1 wide as in Refool, borders reflected);
/// below a third of a pixel it is the identity.
fn gaussian_blur(img: &[f32], shape: ImageShape, sigma: f64) -> Vec<f32> {
    if sigma < 1.0 / 3.0 {
        return img.to_vec();
    }
    let half = (2.0 * sigma).ceil() as i64;
    let weights: Vec<f32> = (-half..=half)
        .map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = weights.iter().sum();
    let (h, w, c) = (
        shape.height as i64,
        shape.width as i64,
        shape.channels as i64,
    );
    let reflect = |v: i64, n: i64| -> i64 {
        let m = v.rem_euclid(2 * n);
        if m < n { m } else { 2 * n - 1 - m }
    };
    let pass = |src: &[f32], along_rows: bool| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let mut acc = 0f32;
                    for (k, wgt) in weights.iter().enumerate() {
                        let d = k as i64 - half;
                        let (yy, xx) = if along_rows {
                            (y, reflect(x + d, w))
                        } else {
                            (reflect(y + d, h), x)
                        };
                        acc += wgt * src[((yy * w + xx) * c + ch) as usize];
                    }
                    out[((y * w + x) * c + ch) as usize] = acc / total;
                }
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bump_peaks_at_the_centre_and_is_symmetric() {
        let k = gen_kernel(28, 3.0);
        assert!((k.iter().cloned().fold(0.0, f32::max) - 1.0).abs() < 1e-6);
        assert!(
            k[14 * 28 + 14] > 0.9 && k[0] < 0.02,
            "{} {}",
            k[14 * 28 + 14],
            k[0]
        );
        assert!((k[3 * 28 + 5] - k[5 * 28 + 3]).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_a_flat_image_flat() {
        let shape = ImageShape {
            height: 8,
            width: 8,
            channels: 1,
        };
        let out = gaussian_blur(&[0.5; 64], shape, 1.5);
        assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-5));
    }
}
