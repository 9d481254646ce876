//! Inference-time gates that a thief puts in front of a served model to dodge verification: the
//! gate flags queries it finds suspicious and refuses them or flattens their answers.
//!
//! Each gate gives a query a suspicion score and flags it above a threshold set, as the papers
//! do, for a stated false-flag rate on clean images (the `1 − rate` quantile of their scores).
//!
//! `strip` is STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural
//! Networks", ACSAC 2019): the query is blended half and half with each of a few clean images
//! held by the gate, and a backdoored input keeps the backdoor's answer through every blend, so
//! the mean entropy of the blends' predictions is low; the score is minus that entropy.
//!
//! `median` is feature squeezing (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial
//! Examples in Deep Neural Networks", NDSS 2018) with its 3×3 median smoothing: a query is
//! flagged when the L1 distance between the model's probabilities on the image and on its
//! median-smoothed copy exceeds a threshold, set, as the paper does, for a stated false-flag rate
//! on clean images. A sparse trigger does not survive the smoothing, so the backdoor's answer
//! changes and the query is flagged.

use super::TrainError;
use super::serve::LoadedModel;
use super::tensor::to_tensor;
use crate::dataset::Dataset;
use tch::{Kind, Tensor};

/// What the gate does with a flagged query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFlag {
    /// Refuse the request with HTTP 403.
    Refuse,
    /// Answer every class equally likely (the softmax of all-zero logits, as DATABench's
    /// evasion does).
    Uniform,
}

/// How a gate scores a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GateKind {
    /// STRIP: minus the mean prediction entropy of the query blended with clean images.
    Strip,
    /// Feature squeezing: how far the answer moves under 3×3 median smoothing.
    Median,
}

/// Clean images STRIP blends each query with.
const STRIP_BLENDS: usize = 8;

/// A calibrated gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    /// How it scores.
    pub kind: GateKind,
    /// Flags queries whose score exceeds this.
    pub threshold: f64,
    /// What a flagged query gets.
    pub on_flag: OnFlag,
    /// STRIP's clean images, [`STRIP_BLENDS`] of them in [0, 1] (NCHW), flattened.
    blends: Vec<f32>,
}

/// `x` ([N, C, H, W]) smoothed by a 3×3 median filter (edges replicated).
pub fn median3(x: &Tensor) -> Tensor {
    let s = x.size();
    let padded = x.replication_pad2d([1, 1, 1, 1]);
    padded
        .unfold(2, 3, 1)
        .unfold(3, 3, 1)
        .reshape([s[0], s[1], s[2], s[3], 9])
        .median_dim(-1, false)
        .0
}

/// Per image, the L1 distance between the probabilities on `x` and on its smoothed copy.
pub fn squeeze_distance(model: &LoadedModel, x: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let p = model.probabilities(x);
        let q = model.probabilities(&median3(x));
        let d = (p - q).abs().sum_dim_intlist(1, false, Kind::Double);
        Vec::<f64>::try_from(d).unwrap_or_default()
    })
}

/// Per image, minus the mean entropy (nats) of the predictions on `x` blended half and half with
/// each of `blends` ([B, C, H, W]).
pub fn strip_score(model: &LoadedModel, x: &Tensor, blends: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let (n, b) = (x.size()[0], blends.size()[0]);
        let mixed = (x.unsqueeze(1) * 0.5 + blends.unsqueeze(0) * 0.5).flatten(0, 1);
        let p = model.probabilities(&mixed).clamp_min(1e-12);
        let h = -(&p * p.log()).sum_dim_intlist(1, false, Kind::Double);
        let mean = h.view([n, b]).mean_dim(1, false, Kind::Double);
        Vec::<f64>::try_from(-mean).unwrap_or_default()
    })
}

impl Gate {
    /// The gate whose threshold flags `false_flag_rate` of the clean images `clean` (the
    /// `1 − rate` quantile of their scores); STRIP keeps the first images of `clean` to blend
    /// with, and is calibrated on the others.
    pub fn calibrate(
        kind: GateKind,
        model: &LoadedModel,
        clean: &Dataset,
        false_flag_rate: f64,
        on_flag: OnFlag,
    ) -> Result<Self, TrainError> {
        if !(0.0..1.0).contains(&false_flag_rate) {
            return Err(TrainError::Config(format!(
                "the false-flag rate must lie in [0, 1), got {false_flag_rate}"
            )));
        }
        let held = if kind == GateKind::Strip {
            STRIP_BLENDS
        } else {
            0
        };
        if clean.len() < held + 20 {
            return Err(TrainError::Config(format!(
                "the gate needs at least {} clean images to set its threshold, got {}",
                held + 20,
                clean.len()
            )));
        }
        let blends = if held > 0 {
            Vec::<f32>::try_from(
                to_tensor(clean, &(0..held).collect::<Vec<_>>(), tch::Device::Cpu).flatten(0, -1),
            )
            .map_err(TrainError::Torch)?
        } else {
            Vec::new()
        };
        let mut gate = Self {
            kind,
            threshold: f64::INFINITY,
            on_flag,
            blends,
        };
        let rest: Vec<usize> = (held..clean.len()).collect();
        let mut d = Vec::with_capacity(rest.len());
        for chunk in rest.chunks(256) {
            d.extend(gate.scores(model, &to_tensor(clean, chunk, tch::Device::Cpu)));
        }
        d.sort_by(f64::total_cmp);
        // The smallest threshold that flags at most the rate: the score at rank ⌈(1 − r)·n⌉.
        let k = ((1.0 - false_flag_rate) * d.len() as f64).ceil() as usize;
        gate.threshold = d[k.clamp(1, d.len()) - 1];
        Ok(gate)
    }

    /// The suspicion score of each image of `x`.
    pub fn scores(&self, model: &LoadedModel, x: &Tensor) -> Vec<f64> {
        match self.kind {
            GateKind::Median => squeeze_distance(model, x),
            GateKind::Strip => {
                let s = x.size();
                let blends = Tensor::from_slice(&self.blends).view([-1, s[1], s[2], s[3]]);
                strip_score(model, x, &blends)
            }
        }
    }

    /// Which images of `x` the gate flags.
    pub fn flags(&self, model: &LoadedModel, x: &Tensor) -> Vec<bool> {
        self.scores(model, x)
            .into_iter()
            .map(|d| d > self.threshold)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median filter removes a lone bright pixel and keeps a flat image.
    #[test]
    fn median_smoothing_removes_a_speck() {
        let mut v = vec![0.2f32; 25];
        v[12] = 1.0;
        let x = Tensor::from_slice(&v).view([1, 1, 5, 5]);
        let m = median3(&x);
        assert_eq!(m.size(), vec![1, 1, 5, 5]);
        let out = Vec::<f32>::try_from(m.flatten(0, -1)).unwrap();
        assert!(out.iter().all(|&p| (p - 0.2).abs() < 1e-6), "{out:?}");
    }
}
