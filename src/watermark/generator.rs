//! Generated triggers applied to u8 images: ISSBA's encoder residual, LIRA's `x + eps · T(x)`
//! and IAD's `x + M(x) · (G(x) − x)`, computed with the stored networks in float32 and rounded
//! back to bytes.

use super::WatermarkError;
use crate::dataset::ImageShape;
use crate::spec::network::{Compiled, Map};
use crate::spec::{Generated, GeneratedForm, SpecError};

/// A generated trigger ready for images of one shape.
#[derive(Debug, Clone)]
pub struct Generator {
    form: GeneratedForm,
    scale: f32,
    pattern: Compiled,
    mask: Option<Compiled>,
    turned: bool,
    shape: ImageShape,
}

impl Generator {
    /// Compiles the trigger's networks for `shape`.
    pub fn new(g: &Generated, shape: ImageShape) -> Result<Self, WatermarkError> {
        let (c, h, w) = (shape.channels, shape.height, shape.width);
        let missing = |f: &str| {
            WatermarkError::Spec(SpecError::Field {
                field: f.into(),
                message: "the network is not trained yet".into(),
            })
        };
        let pattern = g
            .pattern
            .as_ref()
            .ok_or_else(|| missing("trigger.pattern"))?
            .compile("trigger.pattern", c, h, w)?;
        let wrong = |f: &str, m: String| {
            WatermarkError::Spec(SpecError::Field {
                field: f.into(),
                message: m,
            })
        };
        if pattern.output_channels() != c {
            return Err(wrong(
                "trigger.pattern",
                format!(
                    "gives {} channels, images have {c}",
                    pattern.output_channels()
                ),
            ));
        }
        let mask = match g.form {
            GeneratedForm::Additive => None,
            GeneratedForm::Masked => {
                let m = g
                    .mask
                    .as_ref()
                    .ok_or_else(|| missing("trigger.mask"))?
                    .compile("trigger.mask", c, h, w)?;
                if m.output_channels() != 1 && m.output_channels() != c {
                    return Err(wrong(
                        "trigger.mask",
                        format!("gives {} channels, not 1 or {c}", m.output_channels()),
                    ));
                }
                Some(m)
            }
        };
        Ok(Self {
            form: g.form,
            scale: g.scale.unwrap_or(0.0) / 255.0,
            pattern,
            mask,
            turned: g.turned,
            shape,
        })
    }

    /// Stamps one HWC image in place.
    pub fn apply(&self, img: &mut [u8]) {
        let ImageShape {
            height: h,
            width: w,
            channels: c,
        } = self.shape;
        // HWC bytes → CHW floats in [0, 1].
        let mut x = vec![0f32; c * h * w];
        for p in 0..h * w {
            for ch in 0..c {
                x[ch * h * w + p] = f32::from(img[p * c + ch]) / 255.0;
            }
        }
        let input = || Map {
            c,
            h,
            w,
            v: x.clone(),
        };
        let turn = |mut m: Map| {
            if self.turned {
                for ch in 0..m.c {
                    m.v[ch * h * w..(ch + 1) * h * w].reverse();
                }
            }
            m
        };
        let g = turn(self.pattern.forward(input()));
        let out: Vec<f32> = match (&self.form, &self.mask) {
            (GeneratedForm::Masked, Some(mnet)) => {
                let m = turn(mnet.forward(input()));
                (0..c * h * w)
                    .map(|i| {
                        let mi = if m.c == 1 { i % (h * w) } else { i };
                        x[i] + m.v[mi] * (g.v[i] - x[i])
                    })
                    .collect()
            }
            _ => (0..c * h * w).map(|i| x[i] + self.scale * g.v[i]).collect(),
        };
        for p in 0..h * w {
            for ch in 0..c {
                img[p * c + ch] = (out[ch * h * w + p] * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}
