//! Metrics with one definition each.
//!
//! - benign accuracy: top-1 on the clean test set;
//! - ASR (targeted watermarks): the fraction of triggered test images predicted as the target,
//!   counted **without** target-class images (BackdoorBox's printed "ASR" counts them; its
//!   `ASR_NoTarget` and DVBW do not);
//! - untargeted watermarks (UBW, `UBW-P/eval_UBW_P_BadNets.py`): ASR-A, the fraction of triggered
//!   images predicted differently from their true label; ASR-C, the same among images the model
//!   classifies correctly when clean; D_p, the natural-log entropy of the histogram of predicted
//!   labels of triggered images of one source class (class 0 as in the UBW code, or the spec's
//!   first source class).
//!
//! When a spec names source classes, only their test images count (Sleeper Agent's and UBW-C's
//! ASR are over the source class).

use super::model::Net;
use super::tensor::to_tensor;
use crate::dataset::Dataset;
use crate::spec::Labelling;
use crate::watermark::Stamp;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// What to evaluate on.
pub struct EvalSet {
    /// The clean test set.
    pub test: Dataset,
    /// The watermark whose success is measured, if any.
    pub watermark: Option<(Stamp, Labelling, u32)>,
    /// The spec's source classes: only their triggered images count (all classes when `None`).
    pub sources: Option<Vec<u32>>,
    /// What every input goes through before the network (a gate that transforms queries, such
    /// as ShrinkPad): its accuracy is then the one the thief's users get.
    pub through: Option<fn(&Tensor) -> Tensor>,
}

impl EvalSet {
    /// An evaluation set for a secret record's watermark (or none).
    pub fn new(
        test: Dataset,
        record: Option<&crate::watermark::SecretRecord>,
    ) -> Result<Self, super::TrainError> {
        let watermark = match record {
            None => None,
            Some(r) => {
                let stamp = Stamp::new(&r.spec.trigger, r.spec.seed, test.shape())?;
                let dp_class = r
                    .spec
                    .source_classes
                    .as_ref()
                    .and_then(|s| s.first().copied())
                    .unwrap_or(0);
                Some((stamp, r.spec.labelling, dp_class))
            }
        };
        let sources = record.and_then(|r| r.spec.source_classes.clone());
        Ok(Self {
            test,
            watermark,
            sources,
            through: None,
        })
    }
}

/// Metrics of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Top-1 accuracy on the clean test set.
    pub benign_accuracy: f64,
    /// Targeted: attack success rate without target-class images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asr: Option<f64>,
    /// Untargeted: triggered images predicted ≠ their label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asr_a: Option<f64>,
    /// Untargeted: the same among images classified correctly when clean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asr_c: Option<f64>,
    /// Untargeted: entropy (nats) of predicted labels of triggered images of one class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispersibility: Option<f64>,
}

/// Predicted labels of every image of `ds`, optionally stamped first, each batch passed through
/// `through` (when given) before the network.
pub fn predict_labels(
    net: &Net,
    ds: &Dataset,
    stamp: Option<&Stamp>,
    through: Option<fn(&Tensor) -> Tensor>,
    device: Device,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(ds.len());
    for start in (0..ds.len()).step_by(512) {
        let idx: Vec<usize> = (start..(start + 512).min(ds.len())).collect();
        let x = match stamp {
            None => to_tensor(ds, &idx, device),
            Some(s) => {
                let mut copy = ds.subset(&idx).expect("indices in range");
                for i in 0..copy.len() {
                    s.apply(copy.image_mut(i));
                }
                to_tensor(&copy, &(0..copy.len()).collect::<Vec<_>>(), device)
            }
        };
        let x = match through {
            Some(f) => f(&x).to_device(device),
            None => x,
        };
        let pred = tch::no_grad(|| net.forward_t(&x, false).argmax(1, false));
        out.extend(
            Vec::<i64>::try_from(pred.to_device(Device::Cpu))
                .expect("int64 labels")
                .into_iter()
                .map(|v| v as u32),
        );
    }
    out
}

/// Softmax probabilities for a batch [N, C, H, W].
pub fn probabilities(net: &Net, x: &Tensor) -> Tensor {
    tch::no_grad(|| net.forward_t(x, false).softmax(1, tch::Kind::Float))
}

/// Evaluates `net` on `eval`.
pub fn evaluate(net: &Net, eval: &EvalSet, device: Device) -> Metrics {
    let ds = &eval.test;
    let clean = predict_labels(net, ds, None, eval.through, device);
    let correct: Vec<bool> = clean.iter().zip(ds.labels()).map(|(p, y)| p == y).collect();
    let benign_accuracy = correct.iter().filter(|c| **c).count() as f64 / ds.len().max(1) as f64;
    let mut m = Metrics {
        benign_accuracy,
        asr: None,
        asr_a: None,
        asr_c: None,
        dispersibility: None,
    };
    let Some((stamp, labelling, dp_class)) = &eval.watermark else {
        return m;
    };
    let triggered = predict_labels(net, ds, Some(stamp), eval.through, device);
    let in_source = |i: usize| {
        eval.sources
            .as_ref()
            .is_none_or(|s| s.contains(&ds.label(i)))
    };
    let frac = |num: usize, den: usize| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    match labelling {
        Labelling::Targeted { target } | Labelling::CleanLabel { target } => {
            let keep: Vec<usize> = (0..ds.len())
                .filter(|&i| ds.label(i) != *target && in_source(i))
                .collect();
            m.asr = Some(frac(
                keep.iter().filter(|&&i| triggered[i] == *target).count(),
                keep.len(),
            ));
        }
        Labelling::AllToAll { .. } => {
            let mapping = labelling.mapping(ds.num_classes()).unwrap_or_default();
            let keep: Vec<usize> = (0..ds.len()).filter(|&i| in_source(i)).collect();
            m.asr = Some(frac(
                keep.iter()
                    .filter(|&&i| mapping.get(ds.label(i) as usize) == Some(&triggered[i]))
                    .count(),
                keep.len(),
            ));
        }
        Labelling::Untargeted | Labelling::UntargetedCleanLabel { .. } => {
            let src: Vec<usize> = (0..ds.len()).filter(|&i| in_source(i)).collect();
            m.asr_a = Some(frac(
                src.iter().filter(|&&i| triggered[i] != ds.label(i)).count(),
                src.len(),
            ));
            let ok: Vec<usize> = src.iter().copied().filter(|&i| correct[i]).collect();
            m.asr_c = Some(frac(
                ok.iter().filter(|&&i| triggered[i] != ds.label(i)).count(),
                ok.len(),
            ));
            let k = ds.num_classes();
            let mut hist = vec![0usize; k];
            let mut total = 0;
            for i in (0..ds.len()).filter(|&i| ds.label(i) == *dp_class) {
                hist[(triggered[i] as usize).min(k - 1)] += 1;
                total += 1;
            }
            m.dispersibility = Some(entropy(&hist, total));
        }
    }
    m
}

/// Natural-log entropy of a histogram.
pub fn entropy(hist: &[usize], total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::entropy;

    #[test]
    fn entropy_of_a_uniform_histogram_is_log_k() {
        assert!((entropy(&[5; 10], 50) - 10f64.ln()).abs() < 1e-12);
        assert_eq!(entropy(&[7, 0, 0], 7), 0.0);
    }
}
