//! Triggers learnt while the classifier trains, as a hook of the training loop:
//!
//! - IAD (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020): a mask network is
//!   trained first for density and diversity, then a pattern generator jointly with the
//!   classifier, with backdoor samples (target label) and cross-trigger samples (another image's
//!   pattern and mask, true label) in every batch; the other image is the batch's next one (IAD
//!   draws it from a second shuffled loader).
//! - LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021):
//!   an additive trigger function `x + eps · T(x)` learnt alternately with the classifier
//!   (T towards the target on the current classifier, then the classifier on the mix
//!   `alpha · CE(clean) + (1 − alpha) · CE(triggered → target)`), T frozen for the second half.
//!   LIRA's one-step look-ahead classifier in the trigger step is replaced by the current one,
//!   the trigger step takes a quarter of each batch, and T has a learnt input-independent map
//!   beside its input-aware body (see [`Learner::lira`]).

use crate::dataset::ImageShape;
use crate::spec::{Generated, GeneratedForm};
use crate::train::TrainError;
use crate::train::fit::{Batch, Hook, Start};
use crate::train::generator::{IAD_EPSILON, NORMALISE, Plan, TorchNet, body, quantise, seeded};
use crate::train::model::Net;
use crate::watermark::rng::{Rng, Stream};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Channels of LIRA's trigger function at full resolution: it runs on every training batch, so it
/// is kept at a quarter of the encoder's cost.
const GENERATOR_WIDTH: i64 = 8;
/// Channels of IAD's pattern and mask networks (at 8, the mask learnt in a few epochs went dark).
const IAD_WIDTH: i64 = 16;

/// LIRA's gain before its final tanh.
const LIRA_GAIN: f32 = 5.0;

/// IAD's Adam (lr 0.01, betas 0.5 and 0.9) over `vs`.
fn iad_adam(vs: &nn::VarStore, lr: f64) -> nn::Optimizer {
    nn::Adam {
        beta1: 0.5,
        beta2: 0.9,
        wd: 0.0,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(vs, lr)
    .expect("Adam over the generator's variables")
}

/// Settings of IAD's training (BackdoorBox's MNIST test: rates 0.1, lambda_div 1, lambda_norm
/// 100, mask density 0.032).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IadSettings {
    /// Fraction of each batch made backdoor samples.
    pub poisoned_rate: f64,
    /// Fraction of each batch made cross-trigger samples.
    pub cross_rate: f64,
    /// Weight of the diversity loss.
    pub lambda_div: f64,
    /// Weight of the mask's density loss.
    pub lambda_norm: f64,
    /// Mask density the norm loss allows.
    pub mask_density: f64,
    /// Epochs of mask training before the classifier's.
    pub mask_epochs: usize,
}

impl Default for IadSettings {
    fn default() -> Self {
        Self {
            poisoned_rate: 0.1,
            cross_rate: 0.1,
            lambda_div: 1.0,
            lambda_norm: 100.0,
            mask_density: 0.032,
            mask_epochs: 2,
        }
    }
}

/// Settings of LIRA's training (BackdoorBox's defaults: eps 0.01, alpha 0.5; the official
/// code's trigger learning rate is 1e-4; ours is 1e-3, which learns within a CPU's epochs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiraSettings {
    /// Largest change of one pixel value, 0–255 scale.
    pub eps: f64,
    /// Weight of the clean loss in the classifier's mix.
    pub alpha: f64,
    /// Learning rate of the trigger function (Adam).
    pub lr: f64,
}

impl Default for LiraSettings {
    fn default() -> Self {
        Self {
            eps: 2.55,
            alpha: 0.5,
            lr: 1e-3,
        }
    }
}

/// A generator learnt while the classifier trains (IAD or LIRA).
pub(crate) struct Learner {
    // Kept alive with the networks whose variables they hold.
    #[allow(dead_code)]
    vs: nn::VarStore,
    mask_vs: Option<nn::VarStore>,
    pattern: TorchNet,
    mask: Option<TorchNet>,
    opt: nn::Optimizer,
    target: i64,
    kind: LearnerKind,
    /// Epochs (from 0) before which the trigger learns; LIRA freezes it for the second half.
    learn_until: usize,
}

enum LearnerKind {
    Iad(IadSettings),
    Lira(LiraSettings),
}

/// Per-sample root mean square distance of two batches (a tiny floor under the root keeps its
/// gradient finite when two outputs coincide).
fn distance(a: &Tensor, b: &Tensor) -> Tensor {
    ((a - b)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float)
        + 1e-12)
        .sqrt()
}

impl Learner {
    pub(crate) fn iad(
        s: IadSettings,
        target: u32,
        shape: ImageShape,
        seed: u64,
        device: Device,
    ) -> Self {
        // The mask has its own variables: IAD trains it first and then freezes it.
        let (vs, mask_vs) = (nn::VarStore::new(device), nn::VarStore::new(device));
        let c = shape.channels as i64;
        let (pattern, mask) = seeded(seed ^ 0x1ad, || {
            let pattern = TorchNet::new(
                vs.root() / "pattern",
                c,
                &body(shape, c, IAD_WIDTH, &NORMALISE),
                shape,
            );
            let mut mask_plan = body(shape, 1, IAD_WIDTH, &NORMALISE);
            // IAD's threshold: tanh(20·m − 10) / (2 + ε) + 0.5.
            mask_plan.push(Plan::Affine(20.0, -10.0));
            mask_plan.extend(NORMALISE);
            (
                pattern,
                TorchNet::new(mask_vs.root() / "mask", c, &mask_plan, shape),
            )
        });
        let opt = iad_adam(&vs, 0.01);
        Self {
            vs,
            mask_vs: Some(mask_vs),
            pattern,
            mask: Some(mask),
            opt,
            target: i64::from(target),
            kind: LearnerKind::Iad(s),
            learn_until: usize::MAX,
        }
    }

    pub(crate) fn lira(
        s: LiraSettings,
        target: u32,
        shape: ImageShape,
        seed: u64,
        device: Device,
    ) -> Self {
        let vs = nn::VarStore::new(device);
        let c = shape.channels as i64;
        // A learnt input-independent map beside the input-aware body, and a gain before tanh: at
        // initialisation the body's outputs are small and tied to each image's own edges, and
        // eps · T(x) would round away on the byte grid, leaving the classifier two labels for
        // one image.
        let pattern = seeded(seed ^ 0x11ea, || {
            TorchNet::new(
                vs.root() / "trigger",
                c,
                &body(
                    shape,
                    c,
                    GENERATOR_WIDTH,
                    &[Plan::Bias, Plan::Affine(LIRA_GAIN, 0.0), Plan::Tanh],
                ),
                shape,
            )
        });
        let opt = nn::Adam::default()
            .build(&vs, s.lr)
            .expect("Adam over the generator's variables");
        Self {
            vs,
            mask_vs: None,
            pattern,
            mask: None,
            opt,
            target: i64::from(target),
            kind: LearnerKind::Lira(s),
            learn_until: usize::MAX,
        }
    }

    /// The learner for a run of `epochs`: LIRA learns its trigger in the first half and
    /// fine-tunes the classifier in the second.
    pub(super) fn for_epochs(mut self, epochs: usize) -> Self {
        if matches!(self.kind, LearnerKind::Lira(_)) {
            self.learn_until = epochs.div_ceil(2);
        }
        self
    }

    /// IAD's triggered images from the patterns and masks of `src`.
    fn masked(&self, x: &Tensor, src: &Tensor) -> Tensor {
        let m = self.mask.as_ref().expect("IAD has a mask").forward(src);
        let p = self.pattern.forward(src);
        quantise(&(x + m * (p - x)))
    }

    fn additive(&self, x: &Tensor, eps: f64) -> Tensor {
        quantise(&(x + self.pattern.forward(x) * (eps / 255.0)))
    }

    /// IAD's first phase: the mask network alone, for `mask_epochs` over `x_all`.
    pub(crate) fn pretrain(&mut self, x_all: &Tensor, batch: usize, rng: &mut Rng) {
        let LearnerKind::Iad(s) = self.kind else {
            return;
        };
        let (Some(mask), Some(mask_vs)) = (&self.mask, &self.mask_vs) else {
            return;
        };
        let mut opt = iad_adam(mask_vs, 0.01);
        let vars = mask_vs.trainable_variables();
        // Without IAD's batch norm, the mask sometimes goes dark for a while (no pixel on, every
        // mask alike, the diversity ratio in the hundred thousands) and comes back: the phase
        // ends with the last weights whose masks were on (at least a third of the allowed
        // density) and diverse.
        let mut healthy: Option<Vec<Tensor>> = None;
        let n = x_all.size()[0];
        for _ in 0..s.mask_epochs {
            let mut order: Vec<i64> = (0..n).collect();
            rng.choose_front(&mut order, n as usize);
            for chunk in order.chunks(batch) {
                if chunk.len() < 2 {
                    continue;
                }
                let x1 =
                    x_all.index_select(0, &Tensor::from_slice(chunk).to_device(x_all.device()));
                let x2 = x1.roll([1], [0]);
                let (m1, m2) = (mask.forward(&x1), mask.forward(&x2));
                let div = (distance(&x1, &x2) / (distance(&m1, &m2) + IAD_EPSILON))
                    .mean(Kind::Float)
                    * s.lambda_div;
                let on = m1
                    .gt(0.5)
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                if on >= s.mask_density / 3.0 && div.double_value(&[]) < 100.0 * s.lambda_div {
                    healthy = Some(tch::no_grad(|| vars.iter().map(|v| v.copy()).collect()));
                }
                let norm = (m1.mean(Kind::Float) - s.mask_density).relu() * s.lambda_norm;
                opt.zero_grad();
                (div + norm).backward();
                opt.step();
            }
        }
        if let Some(h) = healthy {
            tch::no_grad(|| {
                for (v, h) in vars.iter().zip(&h) {
                    v.shallow_clone().copy_(h);
                }
            });
        }
        if let Some(v) = &mut self.mask_vs {
            v.freeze();
        }
    }

    /// The classifier's loss on a batch with the attack's samples mixed in; backpropagating it
    /// also gives the generator's gradients (IAD). LIRA first takes its trigger step.
    pub(crate) fn loss(
        &mut self,
        net: &Net,
        x: &Tensor,
        y: &Tensor,
        learn_trigger: bool,
    ) -> Tensor {
        let b = x.size()[0];
        let tgt = y.full_like(self.target);
        match self.kind {
            LearnerKind::Iad(s) => {
                let nb = ((b as f64) * s.poisoned_rate).round() as i64;
                let nc = (((b as f64) * s.cross_rate).round() as i64).min(b - nb);
                self.opt.zero_grad();
                let x2 = x.roll([1], [0]);
                let bd = self.masked(&x.narrow(0, 0, nb), &x.narrow(0, 0, nb));
                let cross = self.masked(&x.narrow(0, nb, nc), &x2.narrow(0, nb, nc));
                let xin = Tensor::cat(&[bd, cross, x.narrow(0, nb + nc, b - nb - nc)], 0);
                let yin = Tensor::cat(&[tgt.narrow(0, 0, nb), y.narrow(0, nb, b - nb)], 0);
                let ce = net.forward_t(&xin, true).cross_entropy_for_logits(&yin);
                if nb >= 1 {
                    let (p1, p2) = (
                        self.pattern.forward(&x.narrow(0, 0, nb)),
                        self.pattern.forward(&x2.narrow(0, 0, nb)),
                    );
                    let div = (distance(&x.narrow(0, 0, nb), &x2.narrow(0, 0, nb))
                        / (distance(&p1, &p2) + IAD_EPSILON))
                        .mean(Kind::Float)
                        * s.lambda_div;
                    // The diversity term moves the generator only; the classifier's loss is ce.
                    ce.shallow_clone() + (&div - div.detach())
                } else {
                    ce
                }
            }
            LearnerKind::Lira(s) => {
                if learn_trigger {
                    // The trigger step on a quarter of the batch: it costs a forward and backward
                    // pass through both networks, and the whole batch would triple an epoch's
                    // time on a CPU.
                    let q = (b / 4).max(1);
                    self.opt.zero_grad();
                    let l = net
                        .forward_t(&self.additive(&x.narrow(0, 0, q), s.eps), true)
                        .cross_entropy_for_logits(&tgt.narrow(0, 0, q));
                    l.backward();
                    self.opt.step();
                }
                let xt = self.additive(x, s.eps).detach();
                net.forward_t(x, true).cross_entropy_for_logits(y) * s.alpha
                    + net.forward_t(&xt, true).cross_entropy_for_logits(&tgt) * (1.0 - s.alpha)
            }
        }
    }

    /// After the loss's backward pass: the generator's step (IAD; LIRA steps in [`Self::loss`]).
    pub(crate) fn step(&mut self, learn_trigger: bool) {
        if learn_trigger && matches!(self.kind, LearnerKind::Iad(_)) {
            self.opt.step();
        }
    }

    /// The learnt trigger, for a secret record.
    pub(crate) fn trigger(&self) -> Generated {
        match self.kind {
            LearnerKind::Iad(_) => Generated {
                form: GeneratedForm::Masked,
                scale: None,
                pattern: Some(self.pattern.export(Vec::new())),
                mask: self.mask.as_ref().map(|m| m.export(Vec::new())),
                turned: false,
                message: None,
            },
            LearnerKind::Lira(s) => Generated {
                form: GeneratedForm::Additive,
                scale: Some(s.eps as f32),
                pattern: Some(self.pattern.export(Vec::new())),
                mask: None,
                turned: false,
                message: None,
            },
        }
    }

    /// Triggered images as the trainer makes them (float, quantised), for comparing with the
    /// exported networks run in plain Rust.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn triggered(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| match self.kind {
            LearnerKind::Iad(_) => self.masked(x, x),
            LearnerKind::Lira(s) => self.additive(x, s.eps),
        })
    }
}

impl Hook for Learner {
    fn name(&self) -> &'static str {
        match self.kind {
            LearnerKind::Iad(_) => "iad",
            LearnerKind::Lira(_) => "lira",
        }
    }

    /// A learnt generator and its optimiser are not in the checkpoint.
    fn resumable(&self) -> bool {
        false
    }

    fn start(&mut self, s: &Start<'_>) -> Result<(), TrainError> {
        let mut rng = Rng::new(s.cfg.seed ^ 0x1ad, Stream::Selection);
        self.pretrain(s.x_all, s.cfg.batch_size, &mut rng);
        Ok(())
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        let learn = b.epoch < self.learn_until;
        Some(Learner::loss(self, b.net, b.x, b.y, learn))
    }

    fn after_step(&mut self, epoch: usize) {
        self.step(epoch < self.learn_until);
    }

    fn trigger(&self) -> Option<Generated> {
        Some(Learner::trigger(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Dataset, Split};
    use crate::spec::Trigger;
    use crate::watermark::Stamp;

    /// The exported networks, run in plain Rust on bytes, make the images the trainer makes in
    /// libtorch (to one grey level: float summation order differs).
    fn check_export(l: &Learner, ds: &Dataset) {
        let x =
            crate::train::tensor::to_tensor(ds, &(0..ds.len()).collect::<Vec<_>>(), Device::Cpu);
        let want: Vec<f32> = Vec::<f32>::try_from(
            (l.triggered(&x) * 255.0)
                .round()
                .permute([0, 2, 3, 1])
                .contiguous()
                .flatten(0, -1),
        )
        .unwrap();
        let stamp = Stamp::new(&Trigger::Generated(l.trigger()), 0, ds.shape()).unwrap();
        let len = ds.shape().len();
        let mut changed = 0;
        for i in 0..ds.len() {
            let mut img = ds.image(i).to_vec();
            stamp.apply(&mut img);
            for (k, &v) in img.iter().enumerate() {
                let w = want[i * len + k];
                assert!(
                    (f32::from(v) - w).abs() <= 1.0,
                    "image {i} byte {k}: {v} vs {w}"
                );
                changed += usize::from(v != ds.image(i)[k]);
            }
        }
        assert!(changed > ds.len() * 10, "the trigger changes the images");
    }

    #[test]
    fn learnt_generators_run_the_same_in_plain_rust() {
        let _one = crate::train::exclusive_torch();
        let ds = crate::train::fashion(Split::Test, 16);
        let iad = Learner::iad(IadSettings::default(), 1, ds.shape(), 3, Device::Cpu);
        check_export(&iad, &ds);
        let lira = Learner::lira(
            LiraSettings {
                eps: 40.0,
                ..Default::default()
            },
            1,
            ds.shape(),
            3,
            Device::Cpu,
        );
        check_export(&lira, &ds);
    }
}
