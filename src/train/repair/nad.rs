//! Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing Backdoor
//! Triggers from Deep Neural Networks", ICLR 2021) as a training hook: cross-entropy plus, for
//! each of the last three blocks, beta times the mean squared difference between the student's
//! and the teacher's attention maps.

use crate::train::Net;
use crate::train::fit::{Batch, Hook};
use tch::{Kind, Tensor};

/// An attention map per image: the sum over channels of squared activations, flattened and
/// normalised to unit L2 norm (NAD's attention with p = 2).
pub fn attention(fm: &Tensor) -> Tensor {
    let a = fm
        .pow_tensor_scalar(2)
        .sum_dim_intlist(1, false, Kind::Float)
        .flatten(1, -1);
    let norm = a.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    a / (norm + 1e-6)
}

/// The NAD hook: owns the loss.
pub struct Nad<'a> {
    teacher: &'a Net,
    beta: f64,
    epoch: usize,
    /// Per epoch: summed attention loss and batches.
    per_epoch: Vec<(f64, usize)>,
}

impl<'a> Nad<'a> {
    /// Distils from `teacher` with weight `beta` on the last block (NAD's 500, 1000, 1000 scaled
    /// by `beta / 1000`).
    pub fn new(teacher: &'a Net, beta: f64) -> Self {
        Self {
            teacher,
            beta,
            epoch: usize::MAX,
            per_epoch: Vec::new(),
        }
    }

    /// The mean attention loss of the first and the last epoch.
    pub fn first_and_last(&self) -> Option<(f64, f64)> {
        let mean = |&(s, n): &(f64, usize)| s / n.max(1) as f64;
        Some((mean(self.per_epoch.first()?), mean(self.per_epoch.last()?)))
    }
}

impl Hook for Nad<'_> {
    fn name(&self) -> &'static str {
        "nad"
    }

    fn resumable(&self) -> bool {
        false
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        if self.epoch != b.epoch {
            self.epoch = b.epoch;
            self.per_epoch.push((0.0, 0));
        }
        let (fs, logits) = b.net.features_t(b.x, true);
        let ft = tch::no_grad(|| self.teacher.features_t(b.x, false).0);
        let n = fs.len();
        let weights = [0.5, 1.0, 1.0];
        let mut at = Tensor::zeros([], (Kind::Float, b.x.device()));
        for (i, w) in (n.saturating_sub(3)..n).zip(weights[3 - n.min(3)..].iter()) {
            let d = attention(&fs[i]) - attention(&ft[i]);
            at += d.pow_tensor_scalar(2).mean(Kind::Float) * (self.beta * w);
        }
        if let Some(e) = self.per_epoch.last_mut() {
            e.0 += at.double_value(&[]);
            e.1 += 1;
        }
        Some(logits.cross_entropy_for_logits(b.y) + at)
    }
}
