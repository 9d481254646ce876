//! WaNet's warping trigger (Nguyen & Tran, "WaNet – Imperceptible Warping-based Backdoor Attack",
//! ICLR 2021), following BackdoorBox's `core/attacks/WaNet.py`:
//!
//! - a k×k×2 field of uniform values in [−1, 1), divided by its mean absolute value, upsampled to
//!   the image size with bicubic interpolation (align_corners, a = −0.75, as torch's `upsample`);
//! - `grid = clamp((identity + s · field / size) · grid_rescale, −1, 1)`;
//! - each image is resampled bilinearly at the grid (torch's `grid_sample`, align_corners);
//! - noise mode adds `(u · noise_rescale − 1) / size` per pixel, u uniform in [0, 1), clamped again.
//!
//! The random numbers come from the spec's seed (see `rng`), so a WaNet field is reproducible from
//! the secret record, though not equal to one drawn by torch. Resampled values are rounded to the
//! nearest byte.

use super::rng::{Rng, Stream};
use crate::dataset::ImageShape;
use crate::spec::Warp;

/// A warping grid for one image shape.
#[derive(Debug, Clone)]
pub struct WarpField {
    shape: ImageShape,
    /// (x, y) sampling position in [−1, 1] for each output pixel, row-major.
    grid: Vec<[f32; 2]>,
    noise_rescale: f32,
}

impl WarpField {
    /// Draws the field for `spec` from `seed`.
    pub fn new(spec: &Warp, seed: u64, shape: ImageShape) -> Self {
        let (h, w, k) = (shape.height, shape.width, spec.k);
        let mut rng = Rng::new(spec.field_seed.unwrap_or(seed), Stream::Pattern);
        let mut ins: Vec<f32> = (0..2 * k * k).map(|_| rng.unit_f32() * 2.0 - 1.0).collect();
        let mean_abs = ins.iter().map(|v| v.abs()).sum::<f32>() / ins.len() as f32;
        if mean_abs > 0.0 {
            ins.iter_mut().for_each(|v| *v /= mean_abs);
        }
        let fx = bicubic_resize(&ins[..k * k], k, k, h, w);
        let fy = bicubic_resize(&ins[k * k..], k, k, h, w);
        let grid = (0..h * w)
            .map(|p| {
                let (i, j) = (p / w, p % w);
                let x = (linspace(j, w) + spec.s * fx[p] / w as f32) * spec.grid_rescale;
                let y = (linspace(i, h) + spec.s * fy[p] / h as f32) * spec.grid_rescale;
                [x.clamp(-1.0, 1.0), y.clamp(-1.0, 1.0)]
            })
            .collect();
        Self {
            shape,
            grid,
            noise_rescale: spec.noise_rescale,
        }
    }

    /// Warps one HWC image in place; with `noise`, a random per-pixel offset is added (noise mode).
    pub fn apply(&self, img: &mut [u8], mut noise: Option<&mut Rng>) {
        let s = self.shape;
        let src = img.to_vec();
        let mut acc = vec![0f32; s.channels];
        for (p, g) in self.grid.iter().enumerate() {
            let [mut gx, mut gy] = *g;
            if let Some(rng) = noise.as_deref_mut() {
                gx = (gx + (rng.unit_f32() * self.noise_rescale - 1.0) / s.height as f32)
                    .clamp(-1.0, 1.0);
                gy = (gy + (rng.unit_f32() * self.noise_rescale - 1.0) / s.height as f32)
                    .clamp(-1.0, 1.0);
            }
            let ix = (gx + 1.0) / 2.0 * (s.width - 1) as f32;
            let iy = (gy + 1.0) / 2.0 * (s.height - 1) as f32;
            let (x0, y0) = (ix.floor(), iy.floor());
            let (wx, wy) = (ix - x0, iy - y0);
            acc.fill(0.0);
            for (dy, wyv) in [(0, 1.0 - wy), (1, wy)] {
                for (dx, wxv) in [(0, 1.0 - wx), (1, wx)] {
                    let (yy, xx) = (y0 as isize + dy, x0 as isize + dx);
                    let weight = wyv * wxv;
                    if weight == 0.0
                        || yy < 0
                        || xx < 0
                        || yy >= s.height as isize
                        || xx >= s.width as isize
                    {
                        continue;
                    }
                    let base = (yy as usize * s.width + xx as usize) * s.channels;
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a += weight * f32::from(src[base + c]);
                    }
                }
            }
            for (c, a) in acc.iter().enumerate() {
                img[p * s.channels + c] = a.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn linspace(i: usize, n: usize) -> f32 {
    if n == 1 {
        -1.0
    } else {
        -1.0 + 2.0 * i as f32 / (n - 1) as f32
    }
}

/// Cubic convolution weights for fraction `t` (Keys, a = −0.75, as torch).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Bicubic resize of a single-channel `ih`×`iw` array with align_corners semantics.
fn bicubic_resize(src: &[f32], ih: usize, iw: usize, oh: usize, ow: usize) -> Vec<f32> {
    let axis = |o: usize, i_len: usize, o_len: usize| -> (isize, [f32; 4]) {
        let scale = if o_len > 1 {
            (i_len - 1) as f32 / (o_len - 1) as f32
        } else {
            0.0
        };
        let x = o as f32 * scale;
        let x0 = x.floor();
        (x0 as isize, cubic_weights(x - x0))
    };
    let at = |r: isize, c: isize| {
        src[r.clamp(0, ih as isize - 1) as usize * iw + c.clamp(0, iw as isize - 1) as usize]
    };
    let mut out = vec![0f32; oh * ow];
    for i in 0..oh {
        let (r0, wr) = axis(i, ih, oh);
        for j in 0..ow {
            let (c0, wc) = axis(j, iw, ow);
            let mut v = 0.0;
            for (a, wa) in wr.iter().enumerate() {
                let row: f32 = wc
                    .iter()
                    .enumerate()
                    .map(|(b, wb)| wb * at(r0 - 1 + a as isize, c0 - 1 + b as isize))
                    .sum();
                v += wa * row;
            }
            out[i * ow + j] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warp(s: f32) -> Warp {
        Warp {
            k: 4,
            s,
            grid_rescale: 1.0,
            noise: true,
            cross_ratio: 2.0,
            noise_rescale: 2.0,
            field_seed: None,
        }
    }

    #[test]
    fn bicubic_with_aligned_corners_keeps_the_control_points() {
        let src = [1.0, 2.0, 3.0, 4.0];
        let out = bicubic_resize(&src, 2, 2, 5, 5);
        assert!((out[0] - 1.0).abs() < 1e-6 && (out[4] - 2.0).abs() < 1e-6);
        assert!((out[20] - 3.0).abs() < 1e-6 && (out[24] - 4.0).abs() < 1e-6);
        assert!((out[12] - 2.5).abs() < 1e-5, "centre {}", out[12]);
    }

    #[test]
    fn a_vanishing_field_is_the_identity() {
        let shape = ImageShape {
            height: 8,
            width: 8,
            channels: 1,
        };
        let f = WarpField::new(&warp(1e-9), 3, shape);
        let mut img: Vec<u8> = (0..64).map(|v| (v * 3) as u8).collect();
        let orig = img.clone();
        f.apply(&mut img, None);
        assert_eq!(img, orig);
    }

    #[test]
    fn the_field_is_seeded_and_moves_pixels() {
        let shape = ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        };
        let img: Vec<u8> = (0..784).map(|v| (v % 251) as u8).collect();
        let run = |seed| {
            let mut x = img.clone();
            WarpField::new(&warp(0.5), seed, shape).apply(&mut x, None);
            x
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_ne!(run(1), img);
    }
}
