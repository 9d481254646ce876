//! Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
//! Network", 2015) as a training hook: a fresh student learns the suspect model's softened
//! answers on clean images, which carries its clean behaviour over but not a backdoor that
//! clean images never trigger.

use crate::train::Net;
use crate::train::fit::{Batch, Hook};
use tch::{Kind, Tensor};

/// The distillation hook: owns the loss.
pub struct Distil<'a> {
    teacher: &'a Net,
    temperature: f64,
    soft_weight: f64,
}

impl<'a> Distil<'a> {
    /// Learns from `teacher` at `temperature`, `soft_weight` of the loss on its answers.
    pub fn new(teacher: &'a Net, temperature: f64, soft_weight: f64) -> Self {
        Self {
            teacher,
            temperature,
            soft_weight,
        }
    }
}

impl Hook for Distil<'_> {
    fn name(&self) -> &'static str {
        "distillation"
    }

    fn resumable(&self) -> bool {
        false
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        let t = self.temperature;
        let logits = b.net.forward_t(b.x, true);
        let p_t = tch::no_grad(|| (self.teacher.forward_t(b.x, false) / t).softmax(1, Kind::Float));
        let log_s = (&logits / t).log_softmax(1, Kind::Float);
        // KL(teacher ‖ student) per image, averaged, scaled by T² so its gradients keep their size.
        let kl = (&p_t * (p_t.clamp_min(1e-12).log() - log_s))
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float);
        let hard = logits.cross_entropy_for_logits(b.y);
        Some(kl * (t * t * self.soft_weight) + hard * (1.0 - self.soft_weight))
    }
}
