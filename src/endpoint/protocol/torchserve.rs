//! TorchServe `/predictions/{model}`: one PNG per request, a JSON answer of class names or
//! indices to probabilities, or a label.

use super::{instance_prediction, label_of, number};
use crate::Invalid;
use crate::endpoint::{OutputKind, Prediction};
use serde_json::Value;

/// A TorchServe answer: `{class: probability}` (top-k), a score array, or a label.
pub fn torchserve_prediction(
    v: &Value,
    kind: OutputKind,
    class_names: Option<&[String]>,
) -> Result<Prediction, Invalid> {
    match v {
        Value::Object(map) if kind != OutputKind::Labels || !map.contains_key("label") => {
            if map.contains_key("code") && map.contains_key("message") {
                return Err(Invalid(format!("error body: {}", map["message"])));
            }
            let mut top = map
                .iter()
                .map(|(k, p)| {
                    let class = label_of(&Value::String(k.clone()), class_names, "top-k key")?;
                    let p = number(p, &format!("top-k entry {k}"))?;
                    if !(-1e-6..=1.0 + 1e-6).contains(&p) {
                        return Err(Invalid(format!(
                            "top-k entry {k}: probability {p} is outside [0, 1]"
                        )));
                    }
                    Ok((class, p))
                })
                .collect::<Result<Vec<_>, Invalid>>()?;
            if top.is_empty() {
                return Err("empty top-k answer".into());
            }
            let sum: f64 = top.iter().map(|(_, p)| p).sum();
            if sum > 1.0 + 1e-3 {
                return Err(Invalid(format!(
                    "top-k probabilities sum to {sum}, above 1"
                )));
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
