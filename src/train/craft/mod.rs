//! Poisons crafted with a model, and ISSBA's encoder trained on the data: every spec whose
//! release cannot be stamped from the spec alone ([`crate::spec::Crafting`]).
//!
//! - Label-consistent (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019; as
//!   BackdoorBox's `LabelConsistent`): the chosen target-class images first receive an untargeted
//!   L∞ PGD perturbation against a benign model (maximising its loss on their true label, so their
//!   natural features no longer explain the label), then the trigger; labels are kept.
//! - Gradient matching (Sleeper Agent, UBW-C): `craft/gradient.rs`.
//! - TUAP: `craft/uap.rs`.
//! - ISSBA: [`issba`].

mod gradient;
pub mod issba;
mod uap;

use gradient::gradient_match;
use uap::targeted_uap;

use tch::{Device, Kind, Tensor, nn};

use super::fit::TrainConfig;
use super::model::Net;
use super::tensor::{labels_tensor, to_tensor};
use crate::dataset::Dataset;
use crate::spec::{Adversarial, Crafting, Perturbation, Trigger, WatermarkSpec};
use crate::watermark::{self, WatermarkError, Watermarked};

/// Images per batch.
pub(super) const BATCH: usize = 128;

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

/// The trainer's [`watermark::Craft`]: ISSBA's encoder trained on the data, or poisons crafted
/// against a benign model (label-consistent, TUAP, gradient matching).
pub struct Crafter<'a> {
    /// Device.
    pub device: Device,
    /// The benign model, for specs that craft against one.
    pub surrogate: Option<Surrogate<'a>>,
    /// Progress of crafting or of the encoder's training.
    pub progress: &'a Progress<'a>,
    /// Told what a trained ISSBA encoder reached.
    pub report: &'a dyn Fn(&issba::IssbaReport),
}

impl watermark::Craft for Crafter<'_> {
    fn craft(
        &self,
        dataset: &mut Dataset,
        spec: &WatermarkSpec,
        nonce: [u8; 32],
    ) -> Result<Watermarked, WatermarkError> {
        match (spec.crafting(), &self.surrogate) {
            (Some(Crafting::Encoder), _) => {
                let (marked, report) =
                    issba::issba(dataset, spec, nonce, self.device, self.progress)?;
                (self.report)(&report);
                Ok(marked)
            }
            (Some(_), Some(s)) => craft(dataset, spec, nonce, s, self.device, self.progress),
            // Refused with what the spec needs.
            _ => watermark::apply_with_hashes(dataset, spec, nonce),
        }
    }
}

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
        let mut marked = match drawn.uap {
            Some(u) => {
                let p = tuap_with_controls(dataset, spec, &drawn, u, nonce, s, device, progress)?;
                stamp_perturbation(dataset, &drawn, p, nonce)?
            }
            None => craft(dataset, &drawn, nonce, s, device, progress)?,
        };
        marked.record.family = Some(spec.clone());
        return Ok(marked);
    }
    if let Some(a) = spec.adversarial {
        return label_consistent(dataset, spec, nonce, s.net, a, device);
    }
    if let Some(u) = spec.uap {
        let values = targeted_uap(dataset, spec, u, s.net, device, progress)?;
        let p = Perturbation {
            values,
            controls: Vec::new(),
        };
        return stamp_perturbation(dataset, spec, p, nonce);
    }
    let Some(g) = spec.gradient_matching else {
        return watermark::apply_with_hashes(dataset, spec, nonce);
    };
    watermark::apply_crafted(dataset, spec, nonce, &mut |ds, chosen| {
        gradient_match(ds, chosen, spec, g, s, device, progress)
    })
}

/// Watermarks `dataset` with `spec` whose trigger is the crafted perturbation `p`.
fn stamp_perturbation(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    p: Perturbation,
    nonce: [u8; 32],
) -> Result<Watermarked, WatermarkError> {
    let mut crafted = spec.clone();
    crafted.trigger = Trigger::Perturbation(p);
    watermark::apply_crafted(dataset, &crafted, nonce, &mut |_, _| Ok(()))
}

/// A TUAP family's release: the secret member's perturbation and `[uap] controls` controls,
/// each the member the family draws for the verifier's control seed j (its target and crafting
/// seed), crafted against the same model by the same procedure. Under H0 the secret is one more
/// such draw, so its effect on a model that never saw the release is exchangeable with theirs,
/// however well universal perturbations transfer.
#[allow(clippy::too_many_arguments)]
fn tuap_with_controls(
    dataset: &Dataset,
    family: &WatermarkSpec,
    drawn: &WatermarkSpec,
    u: crate::spec::Uap,
    nonce: [u8; 32],
    s: &Surrogate<'_>,
    device: Device,
    progress: &Progress<'_>,
) -> Result<Perturbation, WatermarkError> {
    let total = (u.controls + 1) * u.max_passes;
    let one = |spec: &WatermarkSpec, j: usize| {
        targeted_uap(dataset, spec, u, s.net, device, &|pass, _, rate| {
            progress(j * u.max_passes + pass, total, rate)
        })
    };
    let values = one(drawn, 0)?;
    let mut controls = Vec::with_capacity(u.controls);
    for j in 0..u.controls {
        let seed = crate::spec::family::control_seed(&nonce, j);
        let member =
            crate::spec::family::draw(family, dataset.num_classes(), dataset.shape(), seed)?;
        let target = member.labelling.target().expect("TUAP is clean-label");
        controls.push(crate::spec::CraftedControl::new(
            target,
            &one(&member, j + 1)?,
        ));
    }
    Ok(Perturbation { values, controls })
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
pub(super) fn write_back(dataset: &mut Dataset, indices: &[usize], x: &Tensor) {
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
            defence: Default::default(),
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
