//! Model repair: what a thief runs on a model trained on a watermarked release to remove the
//! watermark before serving it, with a small set of clean data (the defender's 5% of
//! BackdoorBench). Each defence follows its paper and BackdoorBox's defaults where it has them:
//!
//! - `fine-tuning`: plain training of the model on the clean data (Liu et al., "Fine-Pruning:
//!   Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018, the baseline of
//!   that paper);
//! - `fine-pruning` (same paper): the channels of the last convolutional block with the lowest
//!   mean activation on clean data are pruned (a mask zeroes them), then the model is fine-tuned;
//! - `nad`: Neural Attention Distillation (Li et al., ICLR 2021): a teacher is fine-tuned from the
//!   model, then the model is fine-tuned again with an extra loss pulling its attention maps
//!   (channel-wise mean of squared activations, normalised) towards the teacher's, on the last
//!   three blocks, with NAD's weights 500, 1000, 1000 (scaled by `nad_beta / 1000`);
//! - `mcr`: Mode Connectivity Repair (Zhao et al., "Bridging Mode Connectivity in Loss Landscapes
//!   and Adversarial Robustness", ICLR 2020): a quadratic Bézier curve of weights is trained on
//!   clean data between the model and a fine-tuned copy of it, and the model at `curve_t` along
//!   it, with its batch-norm statistics recomputed, is served;
//! - `distillation`: knowledge distillation (Hinton et al., 2015) of the model into a fresh
//!   network of the same architecture, trained on the clean images only, with temperature 4 and
//!   0.9 of the loss on the teacher's softened answers;
//! - `anp`: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; see [`anp`]): masks on every
//!   neuron learnt under adversarial neuron noise, and the neurons whose mask falls below 0.2
//!   pruned, without further training.

pub mod anp;
mod distil;
mod mcr;
mod nad;
#[cfg(test)]
mod tests;

use super::fit::{self, Init, Run, TrainConfig, Trained};
use super::serve::LoadedModel;
use super::tensor::to_tensor;
use super::{Net, TrainError};
use crate::dataset::Dataset;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// A defence that repairs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Defence {
    /// Fine-tune on the clean data.
    FineTuning,
    /// Prune the least active channels of the last block, then fine-tune.
    FinePruning,
    /// Neural Attention Distillation from a fine-tuned teacher.
    Nad,
    /// Mode Connectivity Repair: a point on a curve trained between the model and a fine-tuned
    /// copy.
    Mcr,
    /// Distil the model into a fresh network on the clean images.
    Distillation,
    /// Adversarial Neuron Pruning: prune the neurons that adversarial noise turns into a
    /// shortcut.
    Anp,
}

impl Defence {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::FineTuning => "fine-tuning",
            Self::FinePruning => "fine-pruning",
            Self::Nad => "nad",
            Self::Mcr => "mcr",
            Self::Distillation => "distillation",
            Self::Anp => "anp",
        }
    }
}

/// How to repair.
#[derive(Debug, Clone, Serialize)]
pub struct RepairConfig {
    /// The defence.
    pub defence: Defence,
    /// The defender's training on the clean data (its architecture is the model's): fine-tuning,
    /// NAD's student, MCR's curve, the distilled student.
    pub train: TrainConfig,
    /// Share of the last block's channels fine-pruning removes.
    pub prune_rate: f64,
    /// Epochs of fine-tuning for NAD's teacher and MCR's second end point.
    pub teacher_epochs: usize,
    /// NAD's attention-loss weight of the last block (the two before it get 1000/1000 and
    /// 500/1000 of it, as NAD's 500, 1000, 1000).
    pub nad_beta: f64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Share of the distillation loss on the teacher's softened answers (the rest on labels).
    pub soft_weight: f64,
    /// Where on MCR's curve the repaired model lies (0: the model, 1: its fine-tuned copy).
    pub curve_t: f64,
    /// ANP's noise bound, loss weight, iterations and pruning threshold.
    pub anp: anp::AnpConfig,
}

impl RepairConfig {
    /// `defence` with the defaults of its paper or BackdoorBox, training as `train` says.
    pub fn new(defence: Defence, train: TrainConfig) -> Self {
        Self {
            defence,
            teacher_epochs: train.epochs,
            train,
            prune_rate: 0.2,
            nad_beta: 1000.0,
            temperature: 4.0,
            soft_weight: 0.9,
            curve_t: 0.3,
            anp: anp::AnpConfig::default(),
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |what: String| Err(TrainError::Config(what));
        if !(0.0..1.0).contains(&self.prune_rate) {
            return bad(format!(
                "the prune rate must lie in [0, 1), got {}",
                self.prune_rate
            ));
        }
        if !(0.0..=1.0).contains(&self.curve_t) {
            return bad(format!(
                "the curve point t must lie in [0, 1], got {}",
                self.curve_t
            ));
        }
        if !(0.0..=1.0).contains(&self.soft_weight)
            || self.temperature.is_nan()
            || self.temperature <= 0.0
        {
            return bad(
                "the distillation weight must lie in [0, 1] and the temperature be > 0".into(),
            );
        }
        if self.nad_beta.is_nan() || self.nad_beta < 0.0 || self.teacher_epochs == 0 {
            return bad("NAD's beta must be ≥ 0 and the teacher's epochs at least 1".into());
        }
        let a = &self.anp;
        if !(0.0..=1.0).contains(&a.eps)
            || !(0.0..=1.0).contains(&a.alpha)
            || !(0.0..=1.0).contains(&a.threshold)
            || a.iterations == 0
        {
            return bad(format!(
                "ANP's noise bound, loss weight and threshold must lie in [0, 1] and its \
                 iterations be at least 1, got eps {}, alpha {}, threshold {}, {} iterations",
                a.eps, a.alpha, a.threshold, a.iterations
            ));
        }
        Ok(())
    }
}

/// What a repair did, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The settings.
    pub config: RepairConfig,
    /// Channels of the last block pruned (fine-pruning), sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<i64>,
    /// The mean clean activation of every channel of the last block, before pruning.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub activations: Vec<f64>,
    /// Mean loss of each epoch of the final training (NAD: cross-entropy plus attention loss).
    pub losses: Vec<f64>,
    /// NAD only: the attention loss of the first and the last epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_loss: Option<(f64, f64)>,
    /// ANP only: the neurons pruned in each layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anp: Option<anp::AnpReport>,
}

/// Mean activation of every channel of the last block over `clean` (evaluation mode).
pub fn channel_activations(net: &Net, clean: &Dataset, device: Device) -> Vec<f64> {
    let all: Vec<usize> = (0..clean.len()).collect();
    let mut sum = Tensor::zeros([net.channels()], (Kind::Double, device));
    tch::no_grad(|| {
        for chunk in all.chunks(256) {
            let (feats, _) = net.features_t(&to_tensor(clean, chunk, device), false);
            let last = feats.last().expect("a network has blocks");
            sum += last.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Double) * chunk.len() as f64;
        }
    });
    Vec::<f64>::try_from(sum / clean.len() as f64).unwrap_or_default()
}

/// The `rate` share of channels with the lowest mean activation (Fine-Pruning's order), sorted.
pub fn least_active(activations: &[f64], rate: f64) -> Vec<i64> {
    let k = (rate * activations.len() as f64).round() as usize;
    let mut order: Vec<usize> = (0..activations.len()).collect();
    // Ties broken by channel index, so the choice does not depend on the sort.
    order.sort_by(|&a, &b| activations[a].total_cmp(&activations[b]).then(a.cmp(&b)));
    let mut out: Vec<i64> = order[..k].iter().map(|&c| c as i64).collect();
    out.sort_unstable();
    out
}

/// Fine-tunes `model`, with the last block's channels `pruned`, on `clean` as `cfg` says.
fn fine_tune(
    model: &LoadedModel,
    pruned: &[i64],
    clean: &Dataset,
    cfg: &TrainConfig,
    device: Device,
    progress: &dyn Fn(fit::Step),
    hooks: &mut [&mut dyn fit::Hook],
) -> Result<Trained, TrainError> {
    fit::run(
        &Run {
            progress,
            init: Some(Init {
                vs: model.vs(),
                pruned,
            }),
            ..Run::new(clean, cfg, device)
        },
        hooks,
    )
}

/// Repairs `model` with the clean data `clean` as `cfg` says; `progress` sees every training
/// step (the teacher's or the curve's included).
pub fn repair(
    model: &LoadedModel,
    clean: &Dataset,
    cfg: &RepairConfig,
    device: Device,
    progress: &dyn Fn(fit::Step),
) -> Result<(Trained, RepairReport), TrainError> {
    cfg.check()?;
    if clean.shape() != model.info.shape || clean.num_classes() != model.info.classes {
        return Err(TrainError::Config(format!(
            "the clean data ({}×{}×{}, {} classes) does not fit the model ({}×{}×{}, {} classes)",
            clean.shape().channels,
            clean.shape().height,
            clean.shape().width,
            clean.num_classes(),
            model.info.shape.channels,
            model.info.shape.height,
            model.info.shape.width,
            model.info.classes
        )));
    }
    let train = TrainConfig {
        arch: model.info.arch,
        ..cfg.train.clone()
    };
    let teacher_cfg = TrainConfig {
        epochs: cfg.teacher_epochs,
        ..train.clone()
    };
    let mut report = RepairReport {
        config: cfg.clone(),
        pruned: Vec::new(),
        activations: Vec::new(),
        losses: Vec::new(),
        attention_loss: None,
        anp: None,
    };
    let own = model.net().pruned();
    let tune = |pruned: &[i64], c: &TrainConfig, hooks: &mut [&mut dyn fit::Hook]| {
        fine_tune(model, pruned, clean, c, device, progress, hooks)
    };
    let trained = match cfg.defence {
        Defence::FineTuning => tune(own, &train, &mut [])?,
        Defence::FinePruning => {
            report.activations = channel_activations(model.net(), clean, device);
            // Already pruned channels have zero activation and are counted in the rate.
            let pruned = least_active(&report.activations, cfg.prune_rate);
            tune(&pruned, &train, &mut [])?
        }
        Defence::Nad => {
            let teacher = tune(own, &teacher_cfg, &mut [])?;
            let mut hook = nad::Nad::new(&teacher.net, cfg.nad_beta);
            let t = tune(own, &train, &mut [&mut hook])?;
            report.attention_loss = hook.first_and_last();
            t
        }
        Defence::Mcr => {
            let end = tune(own, &teacher_cfg, &mut [])?;
            mcr::repair(model, &end, clean, &train, cfg.curve_t, device, progress)?
        }
        Defence::Anp => {
            let (t, r) = anp::repair(model, clean, &train, &cfg.anp, device, progress)?;
            report.anp = Some(r);
            t
        }
        Defence::Distillation => {
            let mut hook = distil::Distil::new(model.net(), cfg.temperature, cfg.soft_weight);
            fit::run(
                &Run {
                    progress,
                    ..Run::new(clean, &train, device)
                },
                &mut [&mut hook],
            )?
        }
    };
    report.losses = trained.history.iter().map(|e| e.loss).collect();
    if report.pruned.is_empty() {
        report.pruned = trained.net.pruned().to_vec();
    }
    Ok((trained, report))
}
