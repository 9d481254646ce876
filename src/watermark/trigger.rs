//! Triggers rendered for one image shape and applied to u8 pixels.
//!
//! Patch and blend triggers become BackdoorBox's (pattern, weight) pair and are applied with its
//! arithmetic, `x' = uint8((1 − w)·x + w·p)` in float32 with `w·p` and `1 − w` computed first
//! (BackdoorBox `core/attacks/BadNets.py`, `AddTrigger`), so pixels match it byte for byte. Pixels
//! of weight 0 are left untouched, which is exactly what the formula gives for them.

use super::WatermarkError;
use super::rng::{Rng, Stream};
use super::warp::WarpField;
use crate::dataset::ImageShape;
use crate::spec::{BlendSource, Trigger};

/// A trigger ready to stamp images of one shape.
#[derive(Debug, Clone)]
pub enum Stamp {
    /// Pixels to blend: (byte offset in the HWC image, 1 − w, w·p).
    Mask(Vec<(u32, f32, f32)>),
    /// A WaNet warping field.
    Warp(WarpField),
    /// A geometric transformation: for each output pixel, the input pixel it takes (or none:
    /// black fill).
    Remap(Vec<Option<u32>>),
    /// Refool's sample-specific reflection.
    Reflect(Box<super::reflect::Reflector>),
    /// A stamp seen through PhysicalBA's transformations.
    Physical(Box<super::physical::Transformed>),
    /// A trigger made by stored networks.
    Generated(Box<super::generator::Generator>),
}

/// A patch or blend trigger with another weight (other kinds unchanged).
pub fn with_alpha(t: &Trigger, alpha: f32) -> Trigger {
    let mut t = t.clone();
    match &mut t {
        Trigger::Patch(p) => p.alpha = alpha,
        Trigger::Blend(b) => b.alpha = alpha,
        _ => {}
    }
    t
}

/// One blended byte, exactly as BackdoorBox computes it.
#[inline]
pub fn blend_byte(x: u8, one_minus_w: f32, w_times_p: f32) -> u8 {
    (one_minus_w * f32::from(x) + w_times_p) as u8
}

impl Stamp {
    /// Whether stamping one image costs more than a pass over its pixels: a network run
    /// (ISSBA, IAD, LIRA), a reflection or PhysicalBA's transformations. Callers on an async
    /// runtime stamp such triggers on a blocking thread.
    pub fn is_costly(&self) -> bool {
        matches!(
            self,
            Self::Reflect(_) | Self::Physical(_) | Self::Generated(_)
        )
    }

    /// Renders `trigger` for images of `shape`; seeded parts draw from `seed`.
    pub fn new(trigger: &Trigger, seed: u64, shape: ImageShape) -> Result<Self, WatermarkError> {
        let (pattern, weight) = match trigger {
            Trigger::Warp(w) => {
                // The field's control grid is k × k, at most the image's size (this also bounds
                // the allocation for any k a spec may hold).
                if w.k < 2 || w.k > shape.height.min(shape.width) {
                    return Err(WatermarkError::Spec(crate::spec::SpecError::Field {
                        field: "trigger.k".into(),
                        message: format!("grid size {} does not fit {shape} images", w.k),
                    }));
                }
                return Ok(Self::Warp(WarpField::new(w, seed, shape)));
            }
            Trigger::Rotate(r) => return Ok(Self::Remap(rotation_map(r.angle, shape))),
            // x + v, clipped: weight 1 on x, v added (the byte cast saturates at 0 and 255).
            Trigger::Perturbation(p) => {
                if p.values.len() != shape.len() {
                    return Err(WatermarkError::Spec(crate::spec::SpecError::Field {
                        field: "trigger.values".into(),
                        message: format!(
                            "{} values for {shape} images (crafted yet?)",
                            p.values.len()
                        ),
                    }));
                }
                return Ok(Self::Mask(
                    p.values
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| **v != 0)
                        .map(|(i, &v)| (i as u32, 1.0, f32::from(v)))
                        .collect(),
                ));
            }
            Trigger::Generated(g) => {
                return Ok(Self::Generated(Box::new(super::generator::Generator::new(
                    g, shape,
                )?)));
            }
            Trigger::Physical(p) => {
                let inner = Self::new(&p.inner, seed, shape)?;
                return Ok(Self::Physical(Box::new(super::physical::Transformed::new(
                    inner, p, seed, shape,
                ))));
            }
            Trigger::Reflection(r) => {
                return Ok(Self::Reflect(Box::new(super::reflect::Reflector::new(
                    r, seed, shape,
                )?)));
            }
            // Test queries carry every piece at the test weight, stamped in order.
            Trigger::Adaptive(a) => {
                let mut entries = Vec::new();
                for p in &a.pieces {
                    if let Self::Mask(e) = Self::new(&with_alpha(p, a.test_alpha), seed, shape)? {
                        entries.extend(e);
                    }
                }
                return Ok(Self::Mask(entries));
            }
            Trigger::Patch(p) => {
                let (rows, r0, c0) = p.grid(shape.height, shape.width)?;
                let mut pattern = vec![0u8; shape.len()];
                let mut weight = vec![0f32; shape.height * shape.width];
                for (dr, row) in rows.iter().enumerate() {
                    for (dc, &v) in row.iter().enumerate() {
                        let px = (r0 + dr) * shape.width + c0 + dc;
                        weight[px] = p.alpha;
                        pattern[px * shape.channels..(px + 1) * shape.channels].fill(v);
                    }
                }
                (pattern, weight)
            }
            Trigger::Blend(b) => {
                let pattern = match b.source {
                    BlendSource::Noise => {
                        let mut rng = Rng::new(b.noise_seed.unwrap_or(seed), Stream::Pattern);
                        match b.cells {
                            None => (0..shape.len()).map(|_| rng.byte()).collect(),
                            Some(n) => {
                                let ch = shape.channels;
                                let grid: Vec<u8> = (0..n * n * ch).map(|_| rng.byte()).collect();
                                let mut out = Vec::with_capacity(shape.len());
                                for y in 0..shape.height {
                                    let gy = y * n / shape.height;
                                    for x in 0..shape.width {
                                        let at = (gy * n + x * n / shape.width) * ch;
                                        out.extend_from_slice(&grid[at..at + ch]);
                                    }
                                }
                                out
                            }
                        }
                    }
                    BlendSource::Image => {
                        let img = b.pattern.as_ref().ok_or_else(|| {
                            WatermarkError::Spec(crate::spec::SpecError::Field {
                                field: "trigger.image".into(),
                                message: "pattern image was not loaded".into(),
                            })
                        })?;
                        convert_channels(&img.pixels()?, img.shape.channels, shape.channels)
                    }
                };
                let mut weight = vec![0f32; shape.height * shape.width];
                match b.region {
                    None => weight.fill(b.alpha),
                    Some(r) => {
                        let fits = |at: usize, len: usize, size: usize| {
                            at.checked_add(len).is_some_and(|end| end <= size)
                        };
                        if !fits(r.row, r.height, shape.height)
                            || !fits(r.col, r.width, shape.width)
                        {
                            return Err(WatermarkError::Spec(crate::spec::SpecError::Field {
                                field: "trigger.region".into(),
                                message: format!(
                                    "{}×{} at ({}, {}) does not fit {}×{} images",
                                    r.height, r.width, r.row, r.col, shape.height, shape.width
                                ),
                            }));
                        }
                        for row in r.row..r.row + r.height {
                            weight[row * shape.width + r.col..row * shape.width + r.col + r.width]
                                .fill(b.alpha);
                        }
                    }
                }
                (pattern, weight)
            }
        };
        Ok(Self::from_pattern(&pattern, &weight, shape))
    }

    /// A stamp from a full-size pattern (HWC bytes) and per-pixel weights, BackdoorBox style.
    pub fn from_pattern(pattern: &[u8], weight: &[f32], shape: ImageShape) -> Self {
        let mut entries = Vec::new();
        for (px, &w) in weight.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            for ch in 0..shape.channels {
                let off = px * shape.channels + ch;
                entries.push((off as u32, 1.0f32 - w, w * f32::from(pattern[off])));
            }
        }
        Self::Mask(entries)
    }

    /// Stamps one HWC image in place.
    pub fn apply(&self, img: &mut [u8]) {
        match self {
            Self::Mask(entries) => {
                for &(off, a, b) in entries {
                    let x = &mut img[off as usize];
                    *x = blend_byte(*x, a, b);
                }
            }
            Self::Warp(field) => field.apply(img, None),
            Self::Reflect(r) => r.apply(img),
            Self::Physical(t) => t.apply(img),
            Self::Generated(g) => g.apply(img),
            Self::Remap(map) => {
                let src = img.to_vec();
                let c = img.len() / map.len().max(1);
                for (px, from) in map.iter().enumerate() {
                    let out = &mut img[px * c..(px + 1) * c];
                    match from {
                        Some(f) => {
                            let f = *f as usize;
                            out.copy_from_slice(&src[f * c..(f + 1) * c]);
                        }
                        None => out.fill(0),
                    }
                }
            }
        }
    }
}

/// The source pixel of each output pixel when an image is rotated by `angle` degrees
/// counter-clockwise about its centre, exactly as Pillow's `Image.rotate(angle)` does it:
/// `Image.rotate` builds the inverse affine matrix (coefficients rounded to 15 digits) and
/// `ImagingTransformAffine` walks the output pixels from their centres in 16.16 fixed point,
/// taking the input pixel `floor(coordinate)` (nearest neighbour), black outside.
fn rotation_map(angle: f64, shape: ImageShape) -> Vec<Option<u32>> {
    let (w, h) = (shape.width as f64, shape.height as f64);
    let round15 = |v: f64| (v * 1e15).round() / 1e15;
    let a = -angle.rem_euclid(360.0).to_radians();
    let m = [
        round15(a.cos()),
        round15(a.sin()),
        0.0,
        round15(-a.sin()),
        round15(a.cos()),
        0.0,
    ];
    let (cx, cy) = (w / 2.0, h / 2.0);
    let m2 = m[0] * -cx + m[1] * -cy + m[2] + cx;
    let m5 = m[3] * -cx + m[4] * -cy + m[5] + cy;
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i32;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    let mut a2 = fix(m2 + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = fix(m5 + m[3] * 0.5 + m[4] * 0.5);
    let mut map = Vec::with_capacity(shape.height * shape.width);
    for _ in 0..shape.height {
        let (mut xx, mut yy) = (a2, a5);
        for _ in 0..shape.width {
            let (xin, yin) = (xx >> 16, yy >> 16);
            map.push(
                (xin >= 0
                    && yin >= 0
                    && (xin as usize) < shape.width
                    && (yin as usize) < shape.height)
                    .then(|| (yin as usize * shape.width + xin as usize) as u32),
            );
            xx = xx.wrapping_add(a0);
            yy = yy.wrapping_add(a3);
        }
        a2 = a2.wrapping_add(a1);
        a5 = a5.wrapping_add(a4);
    }
    map
}

/// Converts HWC pixels between grey and RGB (grey from RGB with PIL's ITU-R 601 weights).
fn convert_channels(pixels: &[u8], from: usize, to: usize) -> Vec<u8> {
    match (from, to) {
        (a, b) if a == b => pixels.to_vec(),
        (1, 3) => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        (3, 1) => pixels
            .chunks_exact(3)
            .map(|p| {
                ((u32::from(p[0]) * 299 + u32::from(p[1]) * 587 + u32::from(p[2]) * 114 + 500)
                    / 1000) as u8
            })
            .collect(),
        _ => unreachable!("datasets and patterns have 1 or 3 channels"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_matches_pillow_pixel_for_pixel() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rotate_golden.json"
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 18);
        let bytes = |v: &serde_json::Value| -> Vec<u8> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect()
        };
        for c in cases {
            let shape = ImageShape {
                height: c["height"].as_u64().unwrap() as usize,
                width: c["width"].as_u64().unwrap() as usize,
                channels: c["channels"].as_u64().unwrap() as usize,
            };
            let angle = c["angle"].as_f64().unwrap();
            let trigger = Trigger::Rotate(crate::spec::Rotate { angle });
            let mut img = bytes(&c["input"]);
            Stamp::new(&trigger, 0, shape).unwrap().apply(&mut img);
            let want = bytes(&c["output"]);
            let diff = img.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{shape} rotated by {angle}: {diff} bytes differ");
        }
    }

    #[test]
    fn blending_matches_backdoorbox_float32_golden_values() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/trigger_golden.json"
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert!(rows.len() > 300);
        for r in rows {
            let (x, p, w, want) = (
                r[0].as_u64().unwrap() as u8,
                r[1].as_u64().unwrap() as u8,
                r[2].as_f64().unwrap() as f32,
                r[3].as_u64().unwrap() as u8,
            );
            let stamp = Stamp::from_pattern(
                &[p],
                &[w],
                ImageShape {
                    height: 1,
                    width: 1,
                    channels: 1,
                },
            );
            let mut img = [x];
            stamp.apply(&mut img);
            assert_eq!(img[0], want, "x={x} p={p} w={w}");
        }
    }

    #[test]
    fn grey_and_rgb_conversions_keep_values() {
        assert_eq!(convert_channels(&[7], 1, 3), vec![7, 7, 7]);
        assert_eq!(
            convert_channels(&[255, 255, 255, 0, 0, 0], 3, 1),
            vec![255, 0]
        );
    }
}
