//! Gradient matching (Geiping et al., "Witches' Brew", ICLR 2021), as Sleeper Agent (Souri et
//! al., NeurIPS 2022) and UBW-C (Li et al., NeurIPS 2022) use it: the chosen images of one class
//! keep their labels and carry no trigger; each gets a perturbation δ, ‖δ‖∞ ≤ eps, optimised so
//! that the training gradient of the poisons, ∇θ CE(f(x + δ), y), points the same way as the
//! gradient of the attacker's objective on triggered source images (cosine distance, summed
//! over all parameters). The objective is CE towards the target class (Sleeper Agent) or
//! −(CE(f(x_src ⊕ t), y_src) + β·H(f(x_src ⊕ t))) (UBW-C: push triggered source images away from
//! their label and spread their predictions). δ is optimised with signed-gradient Adam (lr 0.1·eps,
//! ×0.1 at 3/8, 5/8 and 7/8 of the steps, as Witches' Brew); the surrogate is retrained from
//! scratch on the current poisons every `retrain_every` steps (Sleeper Agent's retraining).

use super::{BATCH, Surrogate, write_back};
use crate::dataset::Dataset;
use crate::spec::{GradientMatching, Labelling, WatermarkSpec};
use crate::train::Progress;
use crate::train::model::Net;
use crate::train::tensor::{labels_tensor, to_tensor};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{Stamp, WatermarkError};
use tch::{Device, Kind, Tensor, nn};

/// Makes a network's parameters differentiable for as long as it lives (trained and loaded
/// models are frozen).
struct Params(Vec<Tensor>);

impl Params {
    fn of(vs: &nn::VarStore) -> Self {
        Self(
            vs.trainable_variables()
                .into_iter()
                .map(|t| t.set_requires_grad(true))
                .collect(),
        )
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = t.set_requires_grad(false);
        }
    }
}

/// The attacker's objective on triggered source images, whose descent the poisons imitate.
enum Objective {
    /// Sleeper Agent: cross-entropy towards the target class.
    Targeted(i64),
    /// UBW-C: −(CE on the true label + β·entropy).
    Untargeted(f64),
}

/// The normalised gradient of the objective over the source images, one tensor per parameter.
fn objective_gradient(
    net: &Net,
    params: &Params,
    xs: &Tensor,
    ys: &Tensor,
    objective: &Objective,
) -> Vec<Tensor> {
    let n = xs.size()[0];
    let mut total: Option<Vec<Tensor>> = None;
    for start in (0..n).step_by(512) {
        let len = (n - start).min(512);
        let x = xs.narrow(0, start, len);
        let logits = net.forward_t(&x, false);
        let loss = match *objective {
            Objective::Targeted(t) => {
                logits.cross_entropy_for_logits(&Tensor::full([len], t, (Kind::Int64, x.device())))
            }
            Objective::Untargeted(beta) => {
                let ce = logits.cross_entropy_for_logits(&ys.narrow(0, start, len));
                let logp = logits.log_softmax(1, Kind::Float);
                let entropy = -(logp.exp() * &logp).sum_dim_intlist(1, false, Kind::Float);
                -(ce + entropy.mean(Kind::Float) * beta)
            }
        } * (len as f64 / n as f64);
        let grads = Tensor::run_backward(&[loss], &params.0, false, false);
        total = Some(match total {
            None => grads,
            Some(t) => t.iter().zip(grads).map(|(a, b)| a + b).collect(),
        });
    }
    let g = total.unwrap_or_default();
    let norm = g
        .iter()
        .map(|t| t.pow_tensor_scalar(2).sum(Kind::Float))
        .fold(Tensor::from(0f32).to_device(xs.device()), |a, b| a + b)
        .sqrt();
    g.into_iter().map(|t| t / &norm).collect()
}

/// Crafts the gradient-matching perturbations of `chosen` in place.
pub(super) fn gradient_match(
    ds: &mut Dataset,
    chosen: &[usize],
    spec: &WatermarkSpec,
    g: GradientMatching,
    s: &Surrogate<'_>,
    device: Device,
    progress: &Progress<'_>,
) -> Result<(), WatermarkError> {
    let shape = ds.shape();
    let objective = match spec.labelling {
        Labelling::CleanLabel { target } => Objective::Targeted(i64::from(target)),
        Labelling::UntargetedCleanLabel { .. } => Objective::Untargeted(g.beta),
        _ => {
            return Err(WatermarkError::Craft(
                "gradient matching needs a clean-label spec".into(),
            ));
        }
    };
    if g.retrain_every > 0 && g.retrain_every < g.iterations && s.retrain.is_none() {
        return Err(WatermarkError::Craft(
            "the spec retrains the surrogate, but the model carries no training settings".into(),
        ));
    }
    let mut rng = Rng::new(spec.seed, Stream::Craft);
    // The triggered source images: a seeded choice among the source classes' training images.
    let classes = spec.source_classes.clone().unwrap_or_default();
    let mut src: Vec<usize> = (0..ds.len())
        .filter(|&i| classes.contains(&ds.label(i)))
        .collect();
    if src.is_empty() {
        return Err(WatermarkError::Craft(format!(
            "the dataset has no image of the source classes {classes:?}"
        )));
    }
    let m = g.sources.min(src.len());
    rng.choose_front(&mut src, m);
    src.truncate(m);
    src.sort_unstable();
    let stamp = Stamp::new(&spec.trigger, spec.seed, shape)?;
    let mut triggered = ds.subset(&src)?;
    for i in 0..triggered.len() {
        stamp.apply(triggered.image_mut(i));
    }
    let all: Vec<usize> = (0..triggered.len()).collect();
    let xs = to_tensor(&triggered, &all, device);
    let ys = labels_tensor(&triggered, &all, device);

    let eps = g.eps / 255.0;
    let x0 = to_tensor(ds, chosen, device);
    let y = labels_tensor(ds, chosen, device);
    let init: Vec<f32> = (0..chosen.len() * shape.len())
        .map(|_| ((2.0 * rng.unit_f32() - 1.0) as f64 * eps) as f32)
        .collect();
    let mut delta = Tensor::from_slice(&init)
        .view(x0.size().as_slice())
        .to_device(device);
    delta = (&x0 + &delta).clamp(0.0, 1.0) - &x0;
    let (mut m1, mut m2) = (delta.zeros_like(), delta.zeros_like());
    let (b1, b2) = (0.9f64, 0.999f64);
    let milestones = [
        g.iterations * 3 / 8,
        g.iterations * 5 / 8,
        g.iterations * 7 / 8,
    ];

    let mut retrained: Option<crate::train::Trained> = None;
    let mut target: Option<Vec<Tensor>> = None;
    for it in 0..g.iterations {
        if it > 0 && g.retrain_every > 0 && it % g.retrain_every == 0 {
            // Sleeper Agent: retrain the surrogate from scratch on the current poisons.
            let mut poisoned = ds.clone();
            write_back(&mut poisoned, chosen, &(&x0 + &delta));
            let mut cfg = s.retrain.clone().expect("checked above");
            cfg.epochs = g.retrain_epochs;
            cfg.seed = cfg.seed.wrapping_add(it as u64);
            retrained = Some(
                crate::train::train(&poisoned, &cfg, device, None, None, &|_| {}, &|_| false)
                    .map_err(|e| WatermarkError::Craft(format!("retraining the surrogate: {e}")))?,
            );
            target = None;
        }
        let (net, vs) = match &retrained {
            Some(t) => (&t.net, &t.vs),
            None => (s.net, s.vs),
        };
        let params = Params::of(vs);
        let t = match target.take() {
            Some(t) => t,
            None => objective_gradient(net, &params, &xs, &ys, &objective),
        };
        let grad = delta.zeros_like();
        let mut loss_sum = 0.0;
        let n = chosen.len() as i64;
        for start in (0..n).step_by(BATCH) {
            let len = (n - start).min(BATCH as i64);
            let d = delta.narrow(0, start, len).detach().set_requires_grad(true);
            let x = &x0.narrow(0, start, len) + &d;
            let loss = net
                .forward_t(&x, false)
                .cross_entropy_for_logits(&y.narrow(0, start, len));
            let pg = Tensor::run_backward(&[loss], &params.0, true, true);
            let mut dot = Tensor::from(0f32).to_device(device);
            let mut norm = Tensor::from(0f32).to_device(device);
            for (a, b) in pg.iter().zip(&t) {
                dot += (a * b).sum(Kind::Float);
                norm += a.pow_tensor_scalar(2).sum(Kind::Float);
            }
            let passenger = -(dot / (norm.sqrt() + 1e-12)) + 1.0;
            loss_sum += passenger.double_value(&[]) * len as f64;
            let dg = Tensor::run_backward(&[passenger], &[&d], false, false)
                .pop()
                .expect("one gradient");
            grad.narrow(0, start, len).copy_(&dg);
        }
        target = Some(t);
        drop(params);
        let lr = 0.1 * eps * 0.1f64.powi(milestones.iter().filter(|&&m| it >= m).count() as i32);
        tch::no_grad(|| {
            // Signed gradient through Adam (Witches' Brew's "signAdam"), then the projection onto
            // the eps ball and the image range.
            let gs = grad.sign();
            let _ = m1.g_mul_scalar_(b1).g_add_(&(&gs * (1.0 - b1)));
            let _ = m2
                .g_mul_scalar_(b2)
                .g_add_(&(gs.pow_tensor_scalar(2) * (1.0 - b2)));
            let k = (it + 1) as i32;
            let mh = &m1 / (1.0 - b1.powi(k));
            let vh = &m2 / (1.0 - b2.powi(k));
            let step = mh / (vh.sqrt() + 1e-8) * lr;
            delta = (&delta - step).clamp(-eps, eps);
            delta = (&x0 + &delta).clamp(0.0, 1.0) - &x0;
        });
        progress(it + 1, g.iterations, loss_sum / n as f64);
    }
    write_back(ds, chosen, &(&x0 + &delta));
    Ok(())
}
