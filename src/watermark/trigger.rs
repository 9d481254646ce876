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
}

/// One blended byte, exactly as BackdoorBox computes it.
#[inline]
pub fn blend_byte(x: u8, one_minus_w: f32, w_times_p: f32) -> u8 {
    (one_minus_w * f32::from(x) + w_times_p) as u8
}

impl Stamp {
    /// Renders `trigger` for images of `shape`; seeded parts draw from `seed`.
    pub fn new(trigger: &Trigger, seed: u64, shape: ImageShape) -> Result<Self, WatermarkError> {
        let (pattern, weight) = match trigger {
            Trigger::Warp(w) => return Ok(Self::Warp(WarpField::new(w, seed, shape))),
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
                        let mut rng = Rng::new(seed, Stream::Pattern);
                        (0..shape.len()).map(|_| rng.byte()).collect()
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
        }
    }
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
