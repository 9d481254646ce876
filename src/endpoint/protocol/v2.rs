//! Open Inference Protocol V2 (KServe V2, Triton, MLServer): the `inputs` request and the
//! `outputs` answer.

use super::{Encoding, flatten, label_of, number, probability_row};
use crate::Invalid;
use crate::dataset::ImageShape;
use crate::endpoint::{OutputKind, Prediction};
use serde_json::Value;

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

/// Predictions from a V2 inference response for a batch of `n`.
#[cfg(test)]
pub fn v2_response(
    body: &Value,
    n: usize,
    output: Option<&str>,
    kind: OutputKind,
    class_names: Option<&[String]>,
) -> Result<Vec<Prediction>, Invalid> {
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
) -> Result<V2Answer, Invalid> {
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
        return Err(Invalid(format!(
            "output {name}: shape {shape:?} holds {count} values, data has {}",
            data.len()
        )));
    }
    if shape.first() != Some(&n)
        && !(shape.len() == 1 && kind == OutputKind::Labels && data.len() == n)
    {
        return Err(Invalid(format!(
            "output {name}: shape {shape:?} does not start with the batch size {n}"
        )));
    }
    if data.len() % n != 0 {
        return Err(Invalid(format!(
            "output {name}: {} values for {n} images",
            data.len()
        )));
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
                    return Err(Invalid(format!("{at}: the output holds labels; configure the output as labels, or name the probability output")));
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
