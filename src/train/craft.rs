//! Poisons crafted with a model.
//!
//! - Label-consistent (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019; as
//!   BackdoorBox's `LabelConsistent`): the chosen target-class images first receive an untargeted
//!   L∞ PGD perturbation against a benign model (maximising its loss on their true label, so their
//!   natural features no longer explain the label), then the trigger; labels are kept.
//! - Gradient matching (Geiping et al., "Witches' Brew", ICLR 2021), as Sleeper Agent (Souri et
//!   al., NeurIPS 2022) and UBW-C (Li et al., NeurIPS 2022) use it: the chosen images of one class
//!   keep their labels and carry no trigger; each gets a perturbation δ, ‖δ‖∞ ≤ eps, optimised so
//!   that the training gradient of the poisons, ∇θ CE(f(x + δ), y), points the same way as the
//!   gradient of the attacker's objective on triggered source images (cosine distance, summed
//!   over all parameters). The objective is CE towards the target class (Sleeper Agent) or
//!   −(CE(f(x_src ⊕ t), y_src) + β·H(f(x_src ⊕ t))) (UBW-C: push triggered source images away from
//!   their label and spread their predictions). δ is optimised with signed-gradient Adam (lr 0.1·eps,
//!   ×0.1 at 3/8, 5/8 and 7/8 of the steps, as Witches' Brew); the surrogate is retrained from
//!   scratch on the current poisons every `retrain_every` steps (Sleeper Agent's retraining).
//! - TUAP (Zhao et al., CVPR 2020; BackdoorBox's `TUAP`): a targeted universal adversarial
//!   perturbation v, ‖v‖∞ ≤ eps, built as Moosavi-Dezfooli et al.'s UAP (CVPR 2017) with a
//!   targeted DeepFool step: for each of a random `p_samples` share of the training set that
//!   x + v does not yet send to the target, DeepFool's smallest L∞ step towards the target
//!   (`(|f| + 1e-4) / ‖w‖₁ · sign(w)`, overshoot 0.02, at most 50 iterations) is added to v,
//!   which is then clipped to the eps ball; passes repeat until at least 1 − delta of the samples
//!   go to the target. v (rounded to whole pixel values) becomes the trigger of clean-label
//!   poisons and of queries.

use tch::{Device, Kind, Tensor, nn};

use super::fit::TrainConfig;
use super::model::Net;
use super::tensor::{labels_tensor, to_tensor};
use crate::dataset::Dataset;
use crate::spec::{
    Adversarial, GradientMatching, Labelling, Perturbation, Trigger, Uap, WatermarkSpec,
};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{self, Stamp, WatermarkError, Watermarked};

/// Images per batch.
const BATCH: usize = 128;

/// The model poisons are crafted against.
pub struct Surrogate<'a> {
    /// The benign network.
    pub net: &'a Net,
    /// Its variables (gradient matching differentiates through them).
    pub vs: &'a nn::VarStore,
    /// How to retrain a surrogate (its `epochs` are replaced by the spec's `retrain_epochs`);
    /// needed only when the spec retrains.
    pub retrain: Option<TrainConfig>,
}

pub use super::Progress;

/// Watermarks `dataset` with `spec`, crafting its poisons against `s` when the spec asks for it
/// (label-consistent or gradient matching); other specs are applied as they are.
pub fn craft(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    s: &Surrogate<'_>,
    device: Device,
    progress: &Progress<'_>,
) -> Result<Watermarked, WatermarkError> {
    // A family's member is drawn first: the poisons are crafted for the release's own trigger and
    // target.
    if spec.family.is_some() {
        let drawn = watermark::draw_release(spec, dataset.num_classes(), dataset.shape(), &nonce)?;
        let mut marked = craft(dataset, &drawn, nonce, s, device, progress)?;
        marked.record.family = Some(spec.clone());
        return Ok(marked);
    }
    if let Some(a) = spec.adversarial {
        return label_consistent(dataset, spec, nonce, s.net, a, device);
    }
    if let Some(u) = spec.uap {
        let values = targeted_uap(dataset, spec, u, s.net, device, progress)?;
        let mut crafted = spec.clone();
        crafted.trigger = Trigger::Perturbation(Perturbation { values });
        return watermark::apply_crafted(dataset, &crafted, nonce, &mut |_, _| Ok(()));
    }
    let Some(g) = spec.gradient_matching else {
        return watermark::apply_with_hashes(dataset, spec, nonce);
    };
    watermark::apply_crafted(dataset, spec, nonce, &mut |ds, chosen| {
        gradient_match(ds, chosen, spec, g, s, device, progress)
    })
}

/// Perturbs `indices` of `dataset` in place by PGD against `net`: at most `eps` per pixel value
/// (0–255 scale), steps of `step`, rounded back to bytes. Deterministic (no random start).
pub fn pgd_perturb(
    net: &Net,
    dataset: &mut Dataset,
    indices: &[usize],
    a: Adversarial,
    device: Device,
) {
    let (eps, step) = (a.eps / 255.0, a.step / 255.0);
    for chunk in indices.chunks(BATCH) {
        let x0 = to_tensor(dataset, chunk, device);
        let y = labels_tensor(dataset, chunk, device);
        let mut x = x0.shallow_clone();
        for _ in 0..a.steps {
            let xr = x.detach().set_requires_grad(true);
            let loss = net.forward_t(&xr, false).cross_entropy_for_logits(&y);
            let grad = Tensor::run_backward(&[loss], &[&xr], false, false)
                .pop()
                .expect("one gradient");
            let next = xr.detach() + grad.sign() * step;
            x = next
                .clamp_tensor(Some(&(&x0 - eps)), Some(&(&x0 + eps)))
                .clamp(0.0, 1.0);
        }
        write_back(dataset, chunk, &x);
    }
}

/// Writes images `x` ([n, C, H, W] in [0, 1]) back into `indices` as bytes. Rounding keeps every
/// change within a whole-valued eps (the originals lie on the same grid).
fn write_back(dataset: &mut Dataset, indices: &[usize], x: &Tensor) {
    let len = dataset.shape().len();
    let bytes: Vec<u8> = Vec::<f32>::try_from(
        (x * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .permute([0, 2, 3, 1])
            .contiguous()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )
    .expect("float pixels")
    .into_iter()
    .map(|v| v as u8)
    .collect();
    for (k, &i) in indices.iter().enumerate() {
        dataset
            .image_mut(i)
            .copy_from_slice(&bytes[k * len..(k + 1) * len]);
    }
}

/// Watermarks `dataset` with a label-consistent spec, crafting its adversarial perturbations
/// against the benign model `net`.
pub fn label_consistent(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    net: &Net,
    a: Adversarial,
    device: Device,
) -> Result<Watermarked, WatermarkError> {
    watermark::apply_crafted(dataset, spec, nonce, &mut |ds, chosen| {
        pgd_perturb(net, ds, chosen, a, device);
        Ok(())
    })
}

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
fn gradient_match(
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

    let mut retrained: Option<super::Trained> = None;
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
                super::train(&poisoned, &cfg, device, None, None, &|_| {}, &|_| false)
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

/// TUAP's perturbation against `net`, as whole values on the 0–255 scale (HWC order).
fn targeted_uap(
    ds: &Dataset,
    spec: &WatermarkSpec,
    u: Uap,
    net: &Net,
    device: Device,
    progress: &Progress<'_>,
) -> Result<Vec<i16>, WatermarkError> {
    let Labelling::CleanLabel { target } = spec.labelling else {
        return Err(WatermarkError::Craft(
            "TUAP needs a clean-label spec".into(),
        ));
    };
    let shape = ds.shape();
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    let m = ((u.p_samples * ds.len() as f64).round() as usize).clamp(1, ds.len());
    Rng::new(spec.seed, Stream::Craft).choose_front(&mut idx, m);
    idx.truncate(m);
    idx.sort_unstable();
    let xs = to_tensor(ds, &idx, device);
    let (c, h, w) = (
        shape.channels as i64,
        shape.height as i64,
        shape.width as i64,
    );
    let eps = u.eps / 255.0;
    let t = i64::from(target);
    let mut v = Tensor::zeros([1, c, h, w], (Kind::Float, device));
    let predict = |x: &Tensor| tch::no_grad(|| net.forward_t(x, false).argmax(1, false));
    let fooling = |v: &Tensor| {
        let p = predict(&(&xs + v).clamp(0.0, 1.0));
        p.eq(t)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    for pass in 0..u.max_passes {
        let rate = fooling(&v);
        if rate >= 1.0 - u.delta {
            break;
        }
        progress(pass + 1, u.max_passes, rate);
        for k in 0..m as i64 {
            let x0 = xs.narrow(0, k, 1);
            if predict(&(&x0 + &v).clamp(0.0, 1.0)).int64_value(&[0]) == t {
                continue;
            }
            // Targeted DeepFool from x0 + v.
            let mut r_tot = v.zeros_like();
            for _ in 0..u.max_iter_df {
                let x = (&x0 + &v + &r_tot * (1.0 + u.overshoot))
                    .clamp(0.0, 1.0)
                    .detach()
                    .set_requires_grad(true);
                let logits = net.forward_t(&x, false);
                let cur = logits.argmax(1, false).int64_value(&[0]);
                if cur == t {
                    break;
                }
                let f = logits.get(0).get(t) - logits.get(0).get(cur);
                let fv = f.double_value(&[]);
                let grad = Tensor::run_backward(&[f], &[&x], false, false)
                    .pop()
                    .expect("one gradient");
                let l1 = grad.abs().sum(Kind::Float).double_value(&[]);
                if l1 <= 1e-12 {
                    break;
                }
                r_tot += grad.sign() * ((fv.abs() + 1e-4) / l1);
            }
            v = (&v + &r_tot * (1.0 + u.overshoot)).clamp(-eps, eps);
        }
    }
    progress(u.max_passes, u.max_passes, fooling(&v));
    let values: Vec<f32> = Vec::<f32>::try_from(
        (v * 255.0)
            .round()
            .clamp(-u.eps.floor(), u.eps.floor())
            .permute([0, 2, 3, 1])
            .contiguous()
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .expect("float values");
    Ok(values.into_iter().map(|x| x as i16).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Format, Split};

    /// Same benign model, spec and seed: the same poisons, byte for byte, the surrogate's
    /// retraining included.
    #[test]
    fn gradient_matching_is_reproducible() {
        let _one = crate::train::exclusive_torch();
        let ds = crate::dataset::read(
            std::path::Path::new("/usr/share/datasets/fashion-mnist"),
            Some(Format::Idx),
            Some(Split::Train),
            &|| {},
        )
        .expect("Fashion-MNIST is installed by scripts/test")
        .dataset;
        let clean = ds.subset(&(0..1000).collect::<Vec<_>>()).unwrap();
        let mut spec = WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs/fixed/ubw-c-28x28-grey.toml"),
        )
        .unwrap();
        spec.rate = 0.02;
        let g = spec.gradient_matching.as_mut().unwrap();
        (g.iterations, g.retrain_every, g.retrain_epochs, g.sources) = (6, 3, 1, 50);
        let cfg = TrainConfig {
            arch: crate::train::Arch::BaselineMnist,
            epochs: 1,
            batch_size: 128,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: crate::train::Schedule::Cosine,
            crop_padding: 0,
            flip: false,
            seed: 3,
            warmup_epochs: 0,
        };
        let benign =
            super::super::train(&clean, &cfg, Device::Cpu, None, None, &|_| {}, &|_| false)
                .unwrap();
        let s = Surrogate {
            net: &benign.net,
            vs: &benign.vs,
            retrain: Some(cfg),
        };
        let run = || {
            let mut d = clean.clone();
            let w = craft(&mut d, &spec, [2; 32], &s, Device::Cpu, &|_, _, _| {}).unwrap();
            (d, w.record.commitment())
        };
        let (a, ca) = run();
        let (b, cb) = run();
        assert_ne!(a.pixels(), clean.pixels(), "crafting changed nothing");
        assert_eq!(a.pixels(), b.pixels());
        assert_eq!(ca, cb);
    }
}
