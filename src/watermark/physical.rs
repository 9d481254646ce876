//! PhysicalBA's physical-world transformations on u8 images (Li et al., "Backdoor Attack in the
//! Physical World", ICLR-W 2021; BackdoorBox's MNIST test: ColorJitter(brightness 0.2,
//! contrast 0.2), RandomAffine(translate 0.1, scale 0.8–0.9)). After the inner trigger, each
//! image is brightened by b, its contrast scaled by c around its mean grey (ITU-R 601 weights
//! for RGB, as torchvision), then zoomed by s about its centre and shifted by (tx, ty), bilinear,
//! black outside, rounded to bytes. b, c, s, tx, ty are drawn per image from the spec's seed and
//! the sha256 of the image's bytes before stamping, so the verifier recreates every query.

use super::rng::{Rng, Stream};
use super::trigger::Stamp;
use crate::dataset::ImageShape;
use crate::spec::Physical;

/// A stamp followed by the transformations.
#[derive(Debug, Clone)]
pub struct Transformed {
    inner: Stamp,
    p: Physical,
    seed: u64,
    shape: ImageShape,
}

impl Transformed {
    /// Wraps `inner`.
    pub fn new(inner: Stamp, p: &Physical, seed: u64, shape: ImageShape) -> Self {
        Self {
            inner,
            p: p.clone(),
            seed,
            shape,
        }
    }

    /// Stamps and transforms one HWC image in place.
    pub fn apply(&self, img: &mut [u8]) {
        let mut rng = Rng::for_image(self.seed, img, Stream::Noise);
        let mut u = || rng.unit_f32();
        self.inner.apply(img);
        let b = 1.0 - self.p.brightness + 2.0 * self.p.brightness * u();
        let c = 1.0 - self.p.contrast + 2.0 * self.p.contrast * u();
        let s = self.p.scale[0] + (self.p.scale[1] - self.p.scale[0]) * u();
        let tx = self.p.translate * (2.0 * u() - 1.0);
        let ty = self.p.translate * (2.0 * u() - 1.0);
        let (h, w, ch) = (self.shape.height, self.shape.width, self.shape.channels);
        let mut x: Vec<f32> = img
            .iter()
            .map(|&v| (f32::from(v) / 255.0 * b).min(1.0))
            .collect();
        let grey: f32 = if ch == 3 {
            x.chunks(3)
                .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                .sum::<f32>()
        } else {
            x.iter().sum::<f32>()
        } / (h * w) as f32;
        for v in &mut x {
            *v = (c * *v + (1.0 - c) * grey).clamp(0.0, 1.0);
        }
        // Output pixel centre (in [-1, 1], align_corners = false) → input coordinate.
        for oy in 0..h {
            for ox in 0..w {
                let nx = (2.0 * ox as f32 + 1.0) / w as f32 - 1.0;
                let ny = (2.0 * oy as f32 + 1.0) / h as f32 - 1.0;
                let ix = ((nx - 2.0 * tx) / s + 1.0) * w as f32 / 2.0 - 0.5;
                let iy = ((ny - 2.0 * ty) / s + 1.0) * h as f32 / 2.0 - 0.5;
                let (x0, y0) = (ix.floor(), iy.floor());
                let (fx, fy) = (ix - x0, iy - y0);
                for k in 0..ch {
                    let at = |yy: f32, xx: f32| -> f32 {
                        if yy < 0.0 || xx < 0.0 || yy >= h as f32 || xx >= w as f32 {
                            0.0
                        } else {
                            x[(yy as usize * w + xx as usize) * ch + k]
                        }
                    };
                    let v = at(y0, x0) * (1.0 - fx) * (1.0 - fy)
                        + at(y0, x0 + 1.0) * fx * (1.0 - fy)
                        + at(y0 + 1.0, x0) * (1.0 - fx) * fy
                        + at(y0 + 1.0, x0 + 1.0) * fx * fy;
                    img[(oy * w + ox) * ch + k] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Trigger, WatermarkSpec};

    fn spec(extra: &str) -> WatermarkSpec {
        WatermarkSpec::from_toml_str(
            &format!(
                "name = \"p\"\nrate = 0.1\nseed = 1\n[labelling]\nkind = \"targeted\"\n\
                 target = 1\n[trigger]\nkind = \"physical\"\n{extra}\n[trigger.inner]\n\
                 kind = \"patch\"\npattern = \"square\"\nsize = 3\n"
            ),
            None,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn identity_settings_leave_only_the_inner_trigger() {
        let s = spec("brightness = 0.0\ncontrast = 0.0\ntranslate = 0.0\nscale = [1.0, 1.0]");
        let shape = ImageShape {
            height: 8,
            width: 8,
            channels: 1,
        };
        let stamp = Stamp::new(&s.trigger, 1, shape).unwrap();
        let Trigger::Physical(p) = &s.trigger else {
            unreachable!()
        };
        let inner = Stamp::new(&p.inner, 1, shape).unwrap();
        let img: Vec<u8> = (0..64).map(|i| (i * 3) as u8).collect();
        let (mut a, mut b) = (img.clone(), img.clone());
        stamp.apply(&mut a);
        inner.apply(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn the_transformation_depends_on_the_image_and_repeats_for_it() {
        let s = spec("");
        let shape = ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        };
        let stamp = Stamp::new(&s.trigger, 1, shape).unwrap();
        let img: Vec<u8> = (0..784).map(|i| ((i * 7) % 256) as u8).collect();
        let (mut a, mut b) = (img.clone(), img.clone());
        stamp.apply(&mut a);
        stamp.apply(&mut b);
        assert_eq!(a, b, "same image, same draw");
        let mut other = img.clone();
        other[0] ^= 1;
        stamp.apply(&mut other);
        assert_ne!(a[1..], other[1..], "another image, another draw");
        // Zoomed out by 0.8-0.9: at least 19% of the image is black fill.
        let black = a.iter().filter(|v| **v == 0).count();
        assert!(black > 140, "{black} black pixels");
    }
}
