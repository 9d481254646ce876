//! Request bodies and response parsing for each protocol (no I/O here).
//!
//! Parsing is lenient about form and strict about content (model-servers notes §4): optional
//! fields may be absent, null or `{}`; numbers may be any numeric type, nested or flat; error
//! bodies come in several shapes; TF Serving may send bare `NaN`/`Infinity`. But every value used
//! must be finite, every row must have the expected length, and probabilities must sum to 1.

use super::{Datatype, OutputKind, Prediction, TensorLayout};
use crate::Invalid;
use crate::dataset::ImageShape;
use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};
use serde_json::Value;

mod instances;
mod torchserve;
mod v2;

pub use instances::{instance_prediction, instances};
pub use torchserve::torchserve_prediction;
#[cfg(test)]
pub use v2::v2_response;
pub use v2::{v2_answer, v2_request};

/// How pixels become tensor values.
#[derive(Debug, Clone)]
pub struct Encoding {
    pub layout: TensorLayout,
    pub datatype: Datatype,
    pub scale: f64,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Encoding {
    /// Tensor dimensions of one image (without the batch axis).
    pub fn image_dims(&self, s: ImageShape) -> Vec<usize> {
        match self.layout {
            TensorLayout::Nchw => vec![s.channels, s.height, s.width],
            TensorLayout::Nhwc => vec![s.height, s.width, s.channels],
            TensorLayout::Nhw => vec![s.height, s.width],
            TensorLayout::Flat => vec![s.len()],
        }
    }

    /// Values of one image in tensor order.
    pub fn values(&self, img: &[u8], s: ImageShape) -> Vec<f64> {
        let value = |px: u8, c: usize| -> f64 {
            if self.datatype == Datatype::Uint8 {
                return f64::from(px);
            }
            let mean = self
                .mean
                .get(c)
                .or(self.mean.first())
                .copied()
                .unwrap_or(0.0);
            let std = self.std.get(c).or(self.std.first()).copied().unwrap_or(1.0);
            (f64::from(px) * self.scale - mean) / std
        };
        match self.layout {
            TensorLayout::Nchw => {
                let mut out = Vec::with_capacity(img.len());
                for c in 0..s.channels {
                    out.extend(img.iter().skip(c).step_by(s.channels).map(|&p| value(p, c)));
                }
                out
            }
            _ => img
                .iter()
                .enumerate()
                .map(|(i, &p)| value(p, i % s.channels))
                .collect(),
        }
    }
}

impl Encoding {
    /// The JSON text of every possible value, per channel: a pixel has 256 values, so encoding
    /// an image is copying bytes rather than formatting floats.
    pub fn table(&self, channels: usize) -> Vec<Vec<Vec<u8>>> {
        (0..channels)
            .map(|c| {
                (0..=255u8)
                    .map(|px| {
                        let mut img = vec![0u8; channels];
                        img[c] = px;
                        let v = self.values(
                            &img,
                            ImageShape {
                                height: 1,
                                width: 1,
                                channels,
                            },
                        )[c];
                        serde_json::to_vec(&Nested {
                            dims: &[],
                            data: &[v],
                            datatype: self.datatype,
                        })
                        .expect("memory")
                    })
                    .collect()
            })
            .collect()
    }

    /// The (HWC byte offset, channel) of the k-th element in tensor order.
    fn element(&self, k: usize, s: ImageShape) -> (usize, usize) {
        match self.layout {
            TensorLayout::Nchw => {
                let plane = s.height * s.width;
                let (c, p) = (k / plane, k % plane);
                (p * s.channels + c, c)
            }
            _ => (k, k % s.channels),
        }
    }

    /// Writes one image's values in tensor order, comma-separated, using `table`.
    pub fn write_flat(&self, img: &[u8], s: ImageShape, table: &[Vec<Vec<u8>>], out: &mut Vec<u8>) {
        for k in 0..s.len() {
            if k > 0 {
                out.push(b',');
            }
            let (off, c) = self.element(k, s);
            out.extend_from_slice(&table[c][img[off] as usize]);
        }
    }

    /// Writes one image as a nested JSON tensor (dims from [`Encoding::image_dims`]).
    pub fn write_nested(
        &self,
        img: &[u8],
        s: ImageShape,
        table: &[Vec<Vec<u8>>],
        out: &mut Vec<u8>,
    ) {
        fn level(
            enc: &Encoding,
            dims: &[usize],
            k: &mut usize,
            img: &[u8],
            s: ImageShape,
            table: &[Vec<Vec<u8>>],
            out: &mut Vec<u8>,
        ) {
            out.push(b'[');
            for i in 0..dims[0] {
                if i > 0 {
                    out.push(b',');
                }
                if dims.len() == 1 {
                    let (off, c) = enc.element(*k, s);
                    out.extend_from_slice(&table[c][img[off] as usize]);
                    *k += 1;
                } else {
                    level(enc, &dims[1..], k, img, s, table, out);
                }
            }
            out.push(b']');
        }
        level(self, &self.image_dims(s), &mut 0, img, s, table, out);
    }
}

/// A tensor serialised as nested JSON arrays, numbers written in the tensor's datatype.
pub struct Nested<'a> {
    pub dims: &'a [usize],
    pub data: &'a [f64],
    pub datatype: Datatype,
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some((&first, rest)) = self.dims.split_first() else {
            return match self.datatype {
                Datatype::Fp32 => s.serialize_f32(self.data[0] as f32),
                Datatype::Fp64 => s.serialize_f64(self.data[0]),
                Datatype::Uint8 => s.serialize_u8(self.data[0] as u8),
            };
        };
        let step: usize = rest.iter().product();
        let mut seq = s.serialize_seq(Some(first))?;
        for i in 0..first {
            if rest.is_empty() {
                match self.datatype {
                    Datatype::Fp32 => seq.serialize_element(&(self.data[i] as f32))?,
                    Datatype::Fp64 => seq.serialize_element(&self.data[i])?,
                    Datatype::Uint8 => seq.serialize_element(&(self.data[i] as u8))?,
                }
            } else {
                seq.serialize_element(&Nested {
                    dims: rest,
                    data: &self.data[i * step..(i + 1) * step],
                    datatype: self.datatype,
                })?;
            }
        }
        seq.end()
    }
}

/// Parses JSON, turning the bare tokens `NaN`, `Infinity` and `-Infinity` that TF Serving may
/// send into `null` first, so that they reach validation as non-finite values rather than
/// failing as unreadable JSON.
pub fn lenient_json(bytes: &[u8]) -> Result<Value, Invalid> {
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "response is not UTF-8".to_string())?;
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push_str("null");
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    serde_json::from_str(&out).map_err(|e| Invalid(format!("not JSON: {e}")))
}

/// The message of an error body, whatever its shape, else the raw text (shortened).
pub fn error_message(bytes: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        for key in ["error", "message", "detail"] {
            match v.get(key) {
                Some(Value::String(s)) => return s.clone(),
                Some(Value::Array(items)) => {
                    let msgs: Vec<String> = items
                        .iter()
                        .map(|i| {
                            i.get("msg")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .unwrap_or_else(|| i.to_string())
                        })
                        .collect();
                    return msgs.join("; ");
                }
                _ => {}
            }
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let t = text.trim();
    if t.is_empty() {
        "(empty body)".into()
    } else if t.len() > 300 {
        format!(
            "{}…",
            &t[..t.char_indices().nth(300).map_or(t.len(), |(i, _)| i)]
        )
    } else {
        t.to_string()
    }
}

pub(super) fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

pub(super) fn number(v: &Value, at: &str) -> Result<f64, Invalid> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| Invalid(format!("{at}: {n} is not a number"))),
        Value::Null => Err(Invalid(format!(
            "{at}: a non-finite value (NaN or Infinity)"
        ))),
        other => Err(Invalid(format!("{at}: expected a number, found {other}"))),
    }
}

/// What the error for a score that cannot be a probability says.
pub const NOT_A_PROBABILITY: &str = "is outside [0, 1]";

/// A probability row from a vector of scores, validated (probabilities) or normalised (logits).
pub fn probability_row(row: Vec<f64>, kind: OutputKind, at: &str) -> Result<Prediction, Invalid> {
    if row.len() < 2 {
        return Err(Invalid(format!(
            "{at}: {} scores; a classifier gives at least 2",
            row.len()
        )));
    }
    if let Some(v) = row.iter().find(|v| !v.is_finite()) {
        return Err(Invalid(format!("{at}: non-finite score {v}")));
    }
    match kind {
        OutputKind::Logits => {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            Ok(Prediction::Probs(
                exp.into_iter().map(|e| e / sum).collect(),
            ))
        }
        _ => {
            if let Some(v) = row.iter().find(|v| !(-1e-6..=1.0 + 1e-6).contains(*v)) {
                return Err(Invalid(format!(
                    "{at}: probability {v} {NOT_A_PROBABILITY} (logits? configure the output as logits)"
                )));
            }
            let sum: f64 = row.iter().sum();
            if (sum - 1.0).abs() > 1e-3 {
                return Err(Invalid(format!(
                    "{at}: probabilities sum to {sum}, not 1 within 1e-3"
                )));
            }
            Ok(Prediction::Probs(row))
        }
    }
}

/// A label from a number or a string (`"3"`, a class name, or Triton's `"score:index[:name]"`).
pub fn label_of(v: &Value, class_names: Option<&[String]>, at: &str) -> Result<u32, Invalid> {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 {
                Ok(f as u32)
            } else {
                Err(Invalid(format!("{at}: {n} is not a class index")))
            }
        }
        Value::String(s) => {
            if let Ok(i) = s.trim().parse::<u32>() {
                return Ok(i);
            }
            if let Some(i) = class_names.and_then(|names| names.iter().position(|n| n == s)) {
                return Ok(i as u32);
            }
            let parts: Vec<&str> = s.split(':').collect();
            if parts.len() >= 2
                && let Ok(i) = parts[1].parse::<u32>()
            {
                return Ok(i);
            }
            Err(Invalid(format!(
                "{at}: label {s:?} is neither an index nor a known class name"
            )))
        }
        Value::Array(a) if a.len() == 1 => label_of(&a[0], class_names, at),
        other => Err(Invalid(format!("{at}: expected a label, found {other}"))),
    }
}

/// What an output's name says it holds: logits (`logits`), probabilities (`prob`, `softmax`),
/// or nothing.
pub fn kind_from_name(name: &str) -> Option<OutputKind> {
    let n = name.to_ascii_lowercase();
    if n.contains("logit") {
        Some(OutputKind::Logits)
    } else if n.contains("prob") || n.contains("softmax") {
        Some(OutputKind::Probabilities)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
