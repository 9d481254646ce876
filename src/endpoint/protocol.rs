//! Request bodies and response parsing for each protocol (no I/O here).
//!
//! Parsing is lenient about form and strict about content (model-servers notes §4): optional
//! fields may be absent, null or `{}`; numbers may be any numeric type, nested or flat; error
//! bodies come in several shapes; TF Serving may send bare `NaN`/`Infinity`. But every value used
//! must be finite, every row must have the expected length, and probabilities must sum to 1.

use super::{Datatype, OutputKind, Prediction, TensorLayout};
use crate::dataset::ImageShape;
use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};
use serde_json::Value;

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

/// The V2 inference request body for a batch: `data` is flat, row-major.
pub fn v2_request(
    images: &[Vec<u8>],
    shape: ImageShape,
    enc: &Encoding,
    input: &str,
    output: Option<&str>,
    id: &str,
) -> Vec<u8> {
    let mut dims = vec![images.len()];
    dims.extend(enc.image_dims(shape));
    let table = enc.table(shape.channels);
    let mut out = Vec::with_capacity(64 + images.len() * shape.len() * 12);
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut out, id).expect("memory");
    out.extend_from_slice(b",\"inputs\":[{\"name\":");
    serde_json::to_writer(&mut out, input).expect("memory");
    out.extend_from_slice(b",\"shape\":");
    serde_json::to_writer(&mut out, &dims).expect("memory");
    out.extend_from_slice(
        format!(",\"datatype\":\"{}\",\"data\":[", enc.datatype.name()).as_bytes(),
    );
    for (i, img) in images.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        enc.write_flat(img, shape, &table, &mut out);
    }
    out.extend_from_slice(b"]}]");
    if let Some(name) = output {
        out.extend_from_slice(b",\"outputs\":[{\"name\":");
        serde_json::to_writer(&mut out, name).expect("memory");
        out.extend_from_slice(b"}]");
    }
    out.push(b'}');
    out
}

/// The `instances` array (TF Serving, KServe V1, templates): one nested tensor per image, or
/// `{input_name: tensor}` objects when an input name is given.
pub fn instances(
    images: &[Vec<u8>],
    shape: ImageShape,
    enc: &Encoding,
    input: Option<&str>,
) -> Vec<u8> {
    let table = enc.table(shape.channels);
    let mut out = Vec::with_capacity(images.len() * shape.len() * 12);
    out.push(b'[');
    for (i, img) in images.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match input {
            Some(name) => {
                out.push(b'{');
                serde_json::to_writer(&mut out, name).expect("memory");
                out.push(b':');
                enc.write_nested(img, shape, &table, &mut out);
                out.push(b'}');
            }
            None => enc.write_nested(img, shape, &table, &mut out),
        }
    }
    out.push(b']');
    out
}

/// Parses JSON, turning the bare tokens `NaN`, `Infinity` and `-Infinity` that TF Serving may
/// send into `null` first, so that they reach validation as non-finite values rather than
/// failing as unreadable JSON.
pub fn lenient_json(bytes: &[u8]) -> Result<Value, String> {
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
    serde_json::from_str(&out).map_err(|e| format!("not JSON: {e}"))
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

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

fn number(v: &Value, at: &str) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("{at}: {n} is not a number")),
        Value::Null => Err(format!("{at}: a non-finite value (NaN or Infinity)")),
        other => Err(format!("{at}: expected a number, found {other}")),
    }
}

/// What the error for a score that cannot be a probability says.
pub const NOT_A_PROBABILITY: &str = "is outside [0, 1]";

/// A probability row from a vector of scores, validated (probabilities) or normalised (logits).
pub fn probability_row(row: Vec<f64>, kind: OutputKind, at: &str) -> Result<Prediction, String> {
    if row.len() < 2 {
        return Err(format!(
            "{at}: {} scores; a classifier gives at least 2",
            row.len()
        ));
    }
    if let Some(v) = row.iter().find(|v| !v.is_finite()) {
        return Err(format!("{at}: non-finite score {v}"));
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
                return Err(format!(
                    "{at}: probability {v} {NOT_A_PROBABILITY} (logits? configure the output as logits)"
                ));
            }
            let sum: f64 = row.iter().sum();
            if (sum - 1.0).abs() > 1e-3 {
                return Err(format!(
                    "{at}: probabilities sum to {sum}, not 1 within 1e-3"
                ));
            }
            Ok(Prediction::Probs(row))
        }
    }
}

/// A label from a number or a string (`"3"`, a class name, or Triton's `"score:index[:name]"`).
pub fn label_of(v: &Value, class_names: Option<&[String]>, at: &str) -> Result<u32, String> {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 {
                Ok(f as u32)
            } else {
                Err(format!("{at}: {n} is not a class index"))
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
            Err(format!(
                "{at}: label {s:?} is neither an index nor a known class name"
            ))
        }
        Value::Array(a) if a.len() == 1 => label_of(&a[0], class_names, at),
        other => Err(format!("{at}: expected a label, found {other}")),
    }
}

/// Predictions from a V2 inference response for a batch of `n`.
#[cfg(test)]
pub fn v2_response(
    body: &Value,
    n: usize,
    output: Option<&str>,
    kind: OutputKind,
    class_names: Option<&[String]>,
) -> Result<Vec<Prediction>, String> {
    v2_answer(body, n, output, kind, class_names).map(|a| a.predictions)
}

/// A V2 answer read: the predictions, the output they came from, and whether labels were taken
/// as the arg-max of a score output (a model that gives no label output).
#[derive(Debug)]
pub struct V2Answer {
    /// One prediction per image.
    pub predictions: Vec<Prediction>,
    /// The output read.
    pub output: String,
    /// Labels are the arg-max of scores.
    pub argmax: bool,
}

/// Reads a V2 inference response for a batch of `n` (see [`v2_response`]).
pub fn v2_answer(
    body: &Value,
    n: usize,
    output: Option<&str>,
    kind: OutputKind,
    class_names: Option<&[String]>,
) -> Result<V2Answer, String> {
    let outputs = body
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("no \"outputs\" array")?;
    let names = || {
        outputs
            .iter()
            .filter_map(|o| o.get("name").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let is_int = |o: &&Value| {
        o.get("datatype")
            .and_then(Value::as_str)
            .is_some_and(|d| d.starts_with("INT") || d.starts_with("UINT") || d == "BYTES")
    };
    let is_float = |o: &&Value| {
        o.get("datatype")
            .and_then(Value::as_str)
            .is_some_and(|d| d.starts_with("FP") || d == "BF16")
    };
    let scores = || {
        outputs.iter().filter(is_float).find(|o| {
            let count = o
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_u64).product::<u64>());
            count.is_some_and(|c| c as usize >= 2 * n)
        })
    };
    let chosen = match output {
        Some(name) => outputs
            .iter()
            .find(|o| o.get("name").and_then(Value::as_str) == Some(name))
            .ok_or_else(|| format!("no output named {name:?} (outputs: {})", names()))?,
        // Labels from a label output where there is one, else the arg-max of the scores.
        None if kind == OutputKind::Labels => {
            outputs.iter().find(is_int).or_else(scores).ok_or_else(|| {
                format!(
                    "no integer, BYTES or floating-point [N, K] output to read labels from (outputs: {})",
                    names()
                )
            })?
        }
        None => scores().ok_or_else(|| {
            format!(
                "no floating-point [N, K] output (outputs: {}); name one",
                names()
            )
        })?,
    };
    let name = chosen.get("name").and_then(Value::as_str).unwrap_or("?");
    let shape: Vec<usize> = chosen
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("output {name}: no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or_else(|| format!("output {name}: shape {d} is not a size"))
        })
        .collect::<Result<_, _>>()?;
    let mut data = Vec::new();
    flatten(
        chosen
            .get("data")
            .ok_or_else(|| format!("output {name}: no data (binary outputs are not requested)"))?,
        &mut data,
    );
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(format!(
            "output {name}: shape {shape:?} holds {count} values, data has {}",
            data.len()
        ));
    }
    if shape.first() != Some(&n)
        && !(shape.len() == 1 && kind == OutputKind::Labels && data.len() == n)
    {
        return Err(format!(
            "output {name}: shape {shape:?} does not start with the batch size {n}"
        ));
    }
    if data.len() % n != 0 {
        return Err(format!(
            "output {name}: {} values for {n} images",
            data.len()
        ));
    }
    let per = data.len() / n;
    // A label output: integers, strings, or one value per image.
    let is_labels = is_int(&chosen) || (kind == OutputKind::Labels && per == 1);
    let argmax = kind == OutputKind::Labels && !is_labels;
    let predictions = (0..n)
        .map(|i| {
            let at = format!("output {name}, image {i}");
            let row = &data[i * per..(i + 1) * per];
            if is_labels {
                if kind != OutputKind::Labels {
                    return Err(format!("{at}: the output holds labels; configure the output as labels, or name the probability output"));
                }
                // One label, or Triton's classification extension: the first of k
                // "score:index" strings.
                label_of(&row[0], class_names, &at).map(Prediction::Label)
            } else if argmax {
                let r: Vec<f64> = row.iter().map(|v| number(v, &at)).collect::<Result<_, _>>()?;
                probability_row(r, OutputKind::Logits, &at).map(|p| Prediction::Label(p.label().expect("non-empty")))
            } else {
                let r: Vec<f64> = row.iter().map(|v| number(v, &at)).collect::<Result<_, _>>()?;
                probability_row(r, kind, &at)
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(V2Answer {
        predictions,
        output: name.to_string(),
        argmax,
    })
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

/// One prediction from an element of a `predictions` array (TF Serving, KServe V1, templates).
pub fn instance_prediction(
    v: &Value,
    output: Option<&str>,
    kind: OutputKind,
    class_names: Option<&[String]>,
    at: &str,
) -> Result<Prediction, String> {
    match v {
        Value::Object(map) => {
            let keys: &[&str] = match kind {
                OutputKind::Labels => &[
                    "classes",
                    "class",
                    "label",
                    "labels",
                    "class_ids",
                    "predictions",
                ],
                _ => &["probabilities", "probs", "scores", "logits", "predictions"],
            };
            let key = match output {
                Some(k) => Some(k),
                None => keys.iter().copied().find(|k| map.contains_key(*k)),
            };
            let inner = key.and_then(|k| map.get(k)).ok_or_else(|| {
                format!(
                    "{at}: no output {} in {:?}",
                    output.unwrap_or("of a known name"),
                    map.keys().collect::<Vec<_>>()
                )
            })?;
            instance_prediction(inner, None, kind, class_names, at)
        }
        Value::Array(_) if kind == OutputKind::Labels => {
            let mut flat = Vec::new();
            flatten(v, &mut flat);
            if flat.len() == 1 {
                return label_of(&flat[0], class_names, at).map(Prediction::Label);
            }
            let r: Vec<f64> = flat
                .iter()
                .map(|x| number(x, at))
                .collect::<Result<_, _>>()?;
            probability_row(r, OutputKind::Logits, at)
                .map(|p| Prediction::Label(p.label().expect("non-empty")))
        }
        Value::Array(_) => {
            let mut flat = Vec::new();
            flatten(v, &mut flat);
            let r: Vec<f64> = flat
                .iter()
                .map(|x| number(x, at))
                .collect::<Result<_, _>>()?;
            probability_row(r, kind, at)
        }
        Value::Number(_) | Value::String(_) if kind == OutputKind::Labels => {
            label_of(v, class_names, at).map(Prediction::Label)
        }
        Value::Null => Err(format!("{at}: a non-finite value (NaN or Infinity)")),
        other => Err(format!(
            "{at}: the model returned {other}, not scores; configure the output as labels if it only gives labels"
        )),
    }
}

/// A TorchServe answer: `{class: probability}` (top-k), a score array, or a label.
pub fn torchserve_prediction(
    v: &Value,
    kind: OutputKind,
    class_names: Option<&[String]>,
) -> Result<Prediction, String> {
    match v {
        Value::Object(map) if kind != OutputKind::Labels || !map.contains_key("label") => {
            if map.contains_key("code") && map.contains_key("message") {
                return Err(format!("error body: {}", map["message"]));
            }
            let mut top = map
                .iter()
                .map(|(k, p)| {
                    let class = label_of(&Value::String(k.clone()), class_names, "top-k key")?;
                    let p = number(p, &format!("top-k entry {k}"))?;
                    if !(-1e-6..=1.0 + 1e-6).contains(&p) {
                        return Err(format!(
                            "top-k entry {k}: probability {p} is outside [0, 1]"
                        ));
                    }
                    Ok((class, p))
                })
                .collect::<Result<Vec<_>, String>>()?;
            if top.is_empty() {
                return Err("empty top-k answer".into());
            }
            let sum: f64 = top.iter().map(|(_, p)| p).sum();
            if sum > 1.0 + 1e-3 {
                return Err(format!("top-k probabilities sum to {sum}, above 1"));
            }
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            Ok(if kind == OutputKind::Labels {
                Prediction::Label(top[0].0)
            } else {
                Prediction::TopK(top)
            })
        }
        other => instance_prediction(other, None, kind, class_names, "response"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GREY: ImageShape = ImageShape {
        height: 2,
        width: 2,
        channels: 1,
    };

    fn enc(layout: TensorLayout) -> Encoding {
        Encoding {
            layout,
            datatype: Datatype::Fp32,
            scale: 1.0 / 255.0,
            mean: vec![],
            std: vec![],
        }
    }

    #[test]
    fn layouts_order_values_as_named() {
        let s = ImageShape {
            height: 1,
            width: 2,
            channels: 3,
        };
        let img = [1, 2, 3, 4, 5, 6];
        let e = Encoding {
            layout: TensorLayout::Nchw,
            datatype: Datatype::Uint8,
            scale: 1.0,
            mean: vec![],
            std: vec![],
        };
        assert_eq!(e.values(&img, s), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let e = Encoding {
            layout: TensorLayout::Nhwc,
            ..e
        };
        assert_eq!(e.values(&img, s), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let e = Encoding {
            datatype: Datatype::Fp64,
            scale: 0.5,
            mean: vec![1.0, 2.0, 3.0],
            std: vec![2.0],
            ..e
        };
        assert_eq!(
            e.values(&img, s)[..3],
            [(0.5 - 1.0) / 2.0, (1.0 - 2.0) / 2.0, (1.5 - 3.0) / 2.0]
        );
    }

    #[test]
    fn table_encoding_writes_what_the_serialiser_writes() {
        let s = ImageShape {
            height: 2,
            width: 3,
            channels: 3,
        };
        let img: Vec<u8> = (0..18).map(|v| (v * 37 % 256) as u8).collect();
        for layout in [TensorLayout::Nchw, TensorLayout::Nhwc, TensorLayout::Flat] {
            for datatype in [Datatype::Fp32, Datatype::Fp64, Datatype::Uint8] {
                let e = Encoding {
                    layout,
                    datatype,
                    scale: 1.0 / 255.0,
                    mean: vec![0.5, 0.4, 0.3],
                    std: vec![0.2, 0.25, 0.3],
                };
                let dims = e.image_dims(s);
                let want = serde_json::to_vec(&Nested {
                    dims: &dims,
                    data: &e.values(&img, s),
                    datatype,
                })
                .unwrap();
                let mut got = Vec::new();
                e.write_nested(&img, s, &e.table(3), &mut got);
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    String::from_utf8(want).unwrap(),
                    "{layout:?} {datatype:?}"
                );
            }
        }
    }

    #[test]
    fn v2_requests_carry_shape_datatype_and_data() {
        let body = v2_request(
            &[vec![0, 255, 0, 255]],
            GREY,
            &enc(TensorLayout::Nchw),
            "img",
            Some("predict_proba"),
            "q1",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["inputs"][0]["shape"], json!([1, 1, 2, 2]));
        assert_eq!(v["inputs"][0]["datatype"], "FP32");
        assert_eq!(v["inputs"][0]["data"], json!([0.0, 1.0, 0.0, 1.0]));
        assert_eq!(v["outputs"][0]["name"], "predict_proba");
    }

    #[test]
    fn v2_responses_in_every_observed_form_parse() {
        // MLServer: FP64, parameters {}; KServe: nulls; Triton: FP32 plus a label output.
        let mls = json!({"model_name":"m","id":"x","parameters":{},"outputs":[{"name":"predict_proba","shape":[2,3],"datatype":"FP64","parameters":{"content_type":"np"},"data":[0.2,0.3,0.5,1.0,0.0,0.0]}]});
        let p = v2_response(&mls, 2, None, OutputKind::Probabilities, None).unwrap();
        assert_eq!(p[0], Prediction::Probs(vec![0.2, 0.3, 0.5]));
        let kserve = json!({"model_name":"m","model_version":null,"id":"x","parameters":null,"outputs":[{"name":"output-0","shape":[1,2],"datatype":"FP64","parameters":null,"data":[[0.25,0.75]]}]});
        assert_eq!(
            v2_response(&kserve, 1, None, OutputKind::Probabilities, None).unwrap()[0].label(),
            Some(1)
        );
        let triton = json!({"outputs":[{"name":"label","datatype":"INT64","shape":[1,1],"data":[4]},{"name":"probs","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]});
        assert_eq!(
            v2_response(&triton, 1, None, OutputKind::Labels, None).unwrap()[0],
            Prediction::Label(4)
        );
        assert!(matches!(
            v2_response(&triton, 1, None, OutputKind::Probabilities, None).unwrap()[0],
            Prediction::Probs(_)
        ));
        let classification = json!({"outputs":[{"name":"probs","datatype":"BYTES","shape":[1,3],"data":["1.000000:7","0.000000:5","0.000000:1"]}]});
        assert_eq!(
            v2_response(&classification, 1, Some("probs"), OutputKind::Labels, None).unwrap()[0],
            Prediction::Label(7)
        );
        let mls_label =
            json!({"outputs":[{"name":"predict","shape":[1,1],"datatype":"INT64","data":[0]}]});
        assert_eq!(
            v2_response(&mls_label, 1, None, OutputKind::Labels, None).unwrap()[0],
            Prediction::Label(0)
        );
    }

    #[test]
    fn invalid_v2_responses_are_errors_not_data() {
        let bad_sum =
            json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.7,0.7]}]});
        assert!(
            v2_response(&bad_sum, 1, None, OutputKind::Probabilities, None)
                .unwrap_err()
                .contains("sum to 1.4")
        );
        let logits =
            json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[3.0,-1.0]}]});
        assert!(
            v2_response(&logits, 1, None, OutputKind::Probabilities, None)
                .unwrap_err()
                .contains("outside [0, 1]")
        );
        let Prediction::Probs(p) =
            &v2_response(&logits, 1, None, OutputKind::Logits, None).unwrap()[0]
        else {
            panic!()
        };
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12 && p[0] > 0.98);
        let short =
            json!({"outputs":[{"name":"p","shape":[2,2],"datatype":"FP32","data":[0.5,0.5,0.5]}]});
        assert!(
            v2_response(&short, 2, None, OutputKind::Probabilities, None)
                .unwrap_err()
                .contains("holds 4 values")
        );
        let wrong_batch =
            json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.5,0.5]}]});
        assert!(v2_response(&wrong_batch, 3, Some("p"), OutputKind::Probabilities, None).is_err());
        let missing =
            json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.5,0.5]}]});
        assert!(
            v2_response(&missing, 1, Some("q"), OutputKind::Probabilities, None)
                .unwrap_err()
                .contains("outputs: p")
        );
        assert!(
            v2_response(
                &json!({"error": "x"}),
                1,
                None,
                OutputKind::Probabilities,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn tf_serving_nan_tokens_become_validation_errors() {
        let v = lenient_json(
            br#"{"predictions": [[NaN, 0.5], [0.5, 0.5]], "note": "NaN inside a string"}"#,
        )
        .unwrap();
        assert_eq!(v["note"], "NaN inside a string");
        let e = instance_prediction(
            &v["predictions"][0],
            None,
            OutputKind::Probabilities,
            None,
            "image 0",
        )
        .unwrap_err();
        assert!(e.contains("non-finite"), "{e}");
        assert!(lenient_json(b"{\"a\": -Infinity}").unwrap()["a"].is_null());
    }

    #[test]
    fn instance_predictions_accept_rows_labels_and_named_outputs() {
        let names = vec!["cat".to_string(), "dog".to_string()];
        assert_eq!(
            instance_prediction(
                &json!([0.1, 0.9]),
                None,
                OutputKind::Probabilities,
                None,
                "i"
            )
            .unwrap()
            .label(),
            Some(1)
        );
        assert_eq!(
            instance_prediction(&json!(2), None, OutputKind::Labels, None, "i").unwrap(),
            Prediction::Label(2)
        );
        assert_eq!(
            instance_prediction(&json!("dog"), None, OutputKind::Labels, Some(&names), "i")
                .unwrap(),
            Prediction::Label(1)
        );
        let named = json!({"probabilities": [0.6, 0.4], "classes": 0});
        assert_eq!(
            instance_prediction(&named, None, OutputKind::Probabilities, None, "i")
                .unwrap()
                .label(),
            Some(0)
        );
        assert_eq!(
            instance_prediction(&named, None, OutputKind::Labels, None, "i").unwrap(),
            Prediction::Label(0)
        );
        assert!(
            instance_prediction(&json!(3), None, OutputKind::Probabilities, None, "i")
                .unwrap_err()
                .contains("labels")
        );
    }

    #[test]
    fn torchserve_top_k_keeps_order_and_maps_names() {
        let names: Vec<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let v = json!({"c": 0.7, "a": 0.2, "f": 0.05});
        let p = torchserve_prediction(&v, OutputKind::Probabilities, Some(&names)).unwrap();
        assert_eq!(p, Prediction::TopK(vec![(2, 0.7), (0, 0.2), (5, 0.05)]));
        assert_eq!(p.prob_bounds(2), Some((0.7, 0.7)));
        assert_eq!(p.prob_bounds(1), Some((0.0, 0.05)));
        let idx = json!({"0": 0.9999999985349382, "5": 4.43e-10});
        assert_eq!(
            torchserve_prediction(&idx, OutputKind::Probabilities, None)
                .unwrap()
                .label(),
            Some(0)
        );
        assert!(
            torchserve_prediction(&json!({"x": 0.5}), OutputKind::Probabilities, None).is_err()
        );
        assert!(
            torchserve_prediction(
                &json!({"0": 0.9, "1": 0.9}),
                OutputKind::Probabilities,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn error_bodies_of_every_shape_give_their_message() {
        assert_eq!(
            error_message(br#"{"error": "Model nope not found"}"#),
            "Model nope not found"
        );
        assert_eq!(error_message(br#"{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"}"#), "Model not found: nope");
        assert_eq!(
            error_message(br#"{"detail":[{"type":"missing","msg":"Field required"}]}"#),
            "Field required"
        );
        assert_eq!(
            error_message(b"Internal Server Error"),
            "Internal Server Error"
        );
        assert_eq!(error_message(b""), "(empty body)");
    }
}
