//! The `instances` protocols: TensorFlow Serving REST `:predict`, KServe V1, and a JSON template
//! with the batch in place of `"$INSTANCES"`.

use super::{Encoding, flatten, label_of, number, probability_row};
use crate::Invalid;
use crate::dataset::ImageShape;
use crate::endpoint::{OutputKind, Prediction};
use serde_json::Value;

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

/// One prediction from an element of a `predictions` array (TF Serving, KServe V1, templates).
pub fn instance_prediction(
    v: &Value,
    output: Option<&str>,
    kind: OutputKind,
    class_names: Option<&[String]>,
    at: &str,
) -> Result<Prediction, Invalid> {
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
        Value::Null => Err(Invalid(format!(
            "{at}: a non-finite value (NaN or Infinity)"
        ))),
        other => Err(Invalid(format!(
            "{at}: the model returned {other}, not scores; configure the output as labels if it only gives labels"
        ))),
    }
}
