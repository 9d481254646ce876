//! Training-time defences: what a careful thief (or an honest trainer) runs while training on a
//! dataset it does not trust, as hooks of the training loop (`hallmark train --defence`).
//!
//! - `mixup`: MixUp (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) with
//!   α = 1: each batch is blended with a shuffled copy of itself, λ drawn uniformly, and the loss
//!   mixes the two labels' cross-entropies by λ.
//! - `cutmix`: CutMix (Yun et al., ICCV 2019), as BackdoorBox's `CutMix` defence runs it with
//!   β = 1: with probability 0.5 a batch gets a box of a shuffled copy pasted in (area 1 − λ, λ
//!   uniform), and the loss mixes the labels by the pixels each image kept.
//! - `abl`: Anti-Backdoor Learning (Li et al., NeurIPS 2021): for the first fifth of the epochs
//!   the loss is LGA's sign(ℓ − γ)·ℓ (γ = 0.5), which keeps clean samples' loss near γ while
//!   backdoor samples, learnt fastest, fall below it; then the 1% of training samples with the
//!   lowest loss are isolated; the middle epochs train on the rest; the last fifth unlearn the
//!   isolated samples by gradient ascent at a learning rate of 5e-4 (ABL's unlearning rate, each
//!   isolated sample's step per epoch as in ABL's batches of isolated samples), with the
//!   optimiser's momentum cleared (ABL unlearns with an optimiser of its own).

use super::fit::{Batch, Hook, Start};
use super::tensor::labels_tensor;
use super::{TrainConfig, TrainError};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// A training-time defence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrainingDefence {
    /// None.
    #[default]
    None,
    /// MixUp.
    Mixup,
    /// CutMix.
    Cutmix,
    /// Anti-Backdoor Learning.
    Abl,
}

impl TrainingDefence {
    /// Whether it is the default (nothing).
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }

    /// The defence as a hook of a run of `cfg`, if any.
    pub(crate) fn hook(self, cfg: &TrainConfig) -> Result<Option<Box<dyn Hook>>, TrainError> {
        Ok(match self {
            Self::None => None,
            Self::Mixup => Some(Box::new(Mix { cut: false })),
            Self::Cutmix => Some(Box::new(Mix { cut: true })),
            Self::Abl => Some(Box::new(Abl::new(cfg.epochs)?)),
        })
    }
}

/// A random permutation of `n` from the batch's generator.
fn shuffled(b: &mut Batch<'_>, n: i64) -> Tensor {
    let mut perm: Vec<i64> = (0..n).collect();
    b.rng.choose_front(&mut perm, n as usize);
    Tensor::from_slice(&perm).to_device(b.x.device())
}

/// CutMix's box for a cut of area share `1 − lam` centred at (`cy`, `cx`) in an `h`×`w` image,
/// clipped to the image: (top, left, height, width).
pub fn cut_box(h: i64, w: i64, lam: f64, cy: i64, cx: i64) -> (i64, i64, i64, i64) {
    let r = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * r) as i64, (w as f64 * r) as i64);
    let (y0, y1) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
    let (x0, x1) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
    (y0, x0, y1 - y0, x1 - x0)
}

/// MixUp or CutMix.
struct Mix {
    cut: bool,
}

impl Hook for Mix {
    fn name(&self) -> &'static str {
        if self.cut { "cutmix" } else { "mixup" }
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        let s = b.x.size();
        let (n, h, w) = (s[0], s[2], s[3]);
        if self.cut && b.rng.unit_f32() >= 0.5 {
            return None;
        }
        let perm = shuffled(b, n);
        let other = b.x.index_select(0, &perm);
        let mut lam = b.rng.unit_f32() as f64;
        let mixed = if self.cut {
            let cy = b.rng.below(h as u64) as i64;
            let cx = b.rng.below(w as u64) as i64;
            let (top, left, bh, bw) = cut_box(h, w, lam, cy, cx);
            let mask = Tensor::zeros([1, 1, h, w], (Kind::Float, b.x.device()));
            let _ = mask.narrow(2, top, bh).narrow(3, left, bw).fill_(1.0);
            // λ is the share of pixels each image kept.
            lam = 1.0 - (bh * bw) as f64 / (h * w) as f64;
            b.x * (1.0 - &mask) + &other * &mask
        } else {
            b.x * lam + &other * (1.0 - lam)
        };
        let logits = b.net.forward_t(&mixed, true);
        let y2 = b.y.index_select(0, &perm);
        Some(
            logits.cross_entropy_for_logits(b.y) * lam
                + logits.cross_entropy_for_logits(&y2) * (1.0 - lam),
        )
    }
}

/// LGA's γ.
const ABL_GAMMA: f64 = 0.5;
/// Share of the training set isolated.
const ABL_ISOLATED: f64 = 0.01;
/// ABL's unlearning learning rate.
const ABL_UNLEARN_LR: f64 = 5e-4;

/// Anti-Backdoor Learning.
pub struct Abl {
    isolation_epochs: usize,
    unlearn_from: usize,
    x_all: Option<Tensor>,
    y_all: Option<Tensor>,
    /// Per training sample: isolated (1) or not (0), once chosen.
    isolated: Option<Tensor>,
    /// The isolated samples' indices, sorted.
    pub chosen: Vec<i64>,
}

impl Abl {
    /// ABL over a run of `epochs` (at least 3: isolation, training, unlearning).
    pub fn new(epochs: usize) -> Result<Self, TrainError> {
        if epochs < 3 {
            return Err(TrainError::Config(format!(
                "ABL needs at least 3 epochs (isolation, training, unlearning), got {epochs}"
            )));
        }
        let fifth = (epochs as f64 / 5.0).round().max(1.0) as usize;
        Ok(Self {
            isolation_epochs: fifth,
            unlearn_from: epochs - fifth,
            x_all: None,
            y_all: None,
            isolated: None,
            chosen: Vec::new(),
        })
    }

    /// Isolates the samples with the lowest loss under `net`.
    fn isolate(&mut self, net: &super::Net) {
        let (Some(x), Some(y)) = (&self.x_all, &self.y_all) else {
            return;
        };
        let n = x.size()[0];
        let losses = tch::no_grad(|| {
            let parts: Vec<Tensor> = (0..n)
                .step_by(512)
                .map(|i| {
                    let m = 512.min(n - i);
                    let logits = net.forward_t(&x.narrow(0, i, m), false);
                    logits
                        .log_softmax(1, Kind::Float)
                        .gather(1, &y.narrow(0, i, m).unsqueeze(1), false)
                        .neg()
                        .squeeze_dim(1)
                })
                .collect();
            Tensor::cat(&parts, 0)
        });
        let k = ((n as f64 * ABL_ISOLATED).ceil() as i64).max(1);
        let (_, idx) = losses.topk(k, 0, false, true);
        let mut chosen = Vec::<i64>::try_from(idx.to_device(tch::Device::Cpu)).unwrap_or_default();
        chosen.sort_unstable();
        let mut mask = Tensor::zeros([n], (Kind::Float, x.device()));
        let _ = mask.index_fill_(0, &idx, 1.0);
        self.isolated = Some(mask);
        self.chosen = chosen;
    }
}

impl Hook for Abl {
    fn name(&self) -> &'static str {
        "abl"
    }

    fn resumable(&self) -> bool {
        false
    }

    /// Unlearning is a new optimisation (ABL's own optimiser): the training's momentum would
    /// carry it on for ten more steps.
    fn fresh_optimiser(&self, epoch: usize) -> bool {
        epoch == self.unlearn_from
    }

    fn start(&mut self, s: &Start<'_>) -> Result<(), TrainError> {
        let all: Vec<usize> = (0..s.train.len()).collect();
        self.x_all = Some(s.x_all.shallow_clone());
        self.y_all = Some(labels_tensor(s.train, &all, s.device));
        Ok(())
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        if b.epoch < self.isolation_epochs {
            // LGA: the batch's loss pushed towards γ from either side.
            let ce = b.net.forward_t(b.x, true).cross_entropy_for_logits(b.y);
            let sign = if ce.double_value(&[]) >= ABL_GAMMA {
                1.0
            } else {
                -1.0
            };
            return Some(ce * sign);
        }
        if self.isolated.is_none() {
            self.isolate(b.net);
        }
        let iso = self.isolated.as_ref()?.index_select(0, b.idx);
        let per = b
            .net
            .forward_t(b.x, true)
            .log_softmax(1, Kind::Float)
            .gather(1, &b.y.unsqueeze(1), false)
            .neg()
            .squeeze_dim(1);
        if b.epoch < self.unlearn_from {
            // Train on the samples not isolated.
            let keep = 1.0 - &iso;
            Some((&per * &keep).sum(Kind::Float) / keep.sum(Kind::Float).clamp_min(1.0))
        } else {
            // Unlearn the isolated ones: gradient ascent, its step scaled to ABL's rate. ABL
            // unlearns in batches of isolated samples only, each step the mean over a full batch;
            // here they are spread over the training batches, so their sum is divided by the
            // batch size, which gives each isolated sample ABL's step per epoch (dividing by the
            // few isolated samples of a batch made steps ~50× larger, and the loss diverged).
            let scale = ABL_UNLEARN_LR / b.cfg.lr_at(b.epoch).max(1e-12);
            Some(-(&per * &iso).sum(Kind::Float) / b.cfg.batch_size as f64 * scale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutmix_boxes_have_the_drawn_area_and_stay_inside() {
        // λ = 0.75: a quarter of the image, a 14×14 box in 28×28.
        assert_eq!(cut_box(28, 28, 0.75, 14, 14), (7, 7, 14, 14));
        // Near a corner it is clipped.
        assert_eq!(cut_box(28, 28, 0.75, 0, 27), (0, 20, 7, 8));
        assert_eq!(cut_box(28, 28, 1.0, 5, 5).2, 0);
    }

    /// ABL's defining effect: after the LGA epoch, the samples it isolates as learnt fastest are
    /// mostly the poisoned ones (10% of a BadNets release of 3,000 Fashion-MNIST images).
    #[test]
    fn abl_isolates_poisoned_samples() {
        let _one = crate::train::exclusive_torch();
        tch::set_num_threads(2);
        let mut data = crate::train::fashion(crate::dataset::Split::Train, 3000);
        let spec = crate::spec::WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs/badnets-square-28x28-grey.toml"),
        )
        .unwrap();
        let release = crate::watermark::mark(&mut data, &spec, [3; 32], 1, None).unwrap();
        let crate::watermark::Secret::One(record) = release.secret else {
            panic!("one trigger")
        };
        let poisoned: Vec<i64> = record.poisoned.iter().map(|p| p.index as i64).collect();
        let cfg = TrainConfig {
            arch: crate::train::Arch::BaselineMnist,
            epochs: 12,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: crate::train::Schedule::Step {
                milestones: vec![],
                gamma: 0.1,
            },
            crop_padding: 0,
            flip: false,
            seed: 5,
            warmup_epochs: 0,
            defence: TrainingDefence::None,
        };
        // Ten epochs of LGA before isolating (ABL's own runs spend 20): after three, the
        // isolation depended on the CPU path (0, 7 and 22 of 30 under `default`, AVX-512 and
        // `avx2`), as LGA holds the loss at γ only on average.
        let mut abl = Abl::new(12).unwrap();
        abl.isolation_epochs = 10;
        crate::train::fit::run(
            &crate::train::Run::new(&data, &cfg, tch::Device::Cpu),
            &mut [&mut abl],
        )
        .unwrap();
        assert_eq!(abl.chosen.len(), 30);
        let hits = abl.chosen.iter().filter(|i| poisoned.contains(i)).count();
        eprintln!("ABL isolated {hits} poisoned of {}", abl.chosen.len());
        // 22, 24 and 29 of 30 under `ATEN_CPU_CAPABILITY=default`, this machine's AVX-512 and
        // `avx2`; by chance 3 would be.
        assert!(hits >= 9, "{hits} of {:?} poisoned", abl.chosen);
        assert!(Abl::new(2).is_err());
    }
}
