//! Poisons crafted with a model.
//!
//! Label-consistent (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019; as
//! BackdoorBox's `LabelConsistent`): the chosen target-class images first receive an untargeted
//! L∞ PGD perturbation against a benign model (maximising its loss on their true label, so their
//! natural features no longer explain the label), then the trigger; labels are kept.

use tch::{Device, Kind, Tensor};

use super::fit::{labels_tensor, to_tensor};
use super::model::Net;
use crate::dataset::Dataset;
use crate::spec::{Adversarial, WatermarkSpec};
use crate::watermark::{self, WatermarkError, Watermarked};

/// Images per PGD batch.
const BATCH: usize = 128;

/// Perturbs `indices` of `dataset` in place by PGD against `net`: at most `eps` per pixel value
/// (0–255 scale), steps of `step`, rounded back to bytes. Deterministic (no random start).
pub fn pgd_perturb(
    net: &Net,
    dataset: &mut Dataset,
    indices: &[usize],
    a: Adversarial,
    device: Device,
) {
    let shape = dataset.shape();
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
        // Back to HWC bytes; rounding keeps every change within eps (the originals are whole
        // values on the same grid).
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
        for (k, &i) in chunk.iter().enumerate() {
            dataset
                .image_mut(i)
                .copy_from_slice(&bytes[k * shape.len()..(k + 1) * shape.len()]);
        }
    }
}

/// Watermarks `dataset` with a label-consistent spec, crafting its adversarial perturbations
/// against the benign model `net`.
pub fn label_consistent(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    net: &Net,
    device: Device,
) -> Result<Watermarked, WatermarkError> {
    let a = spec
        .adversarial
        .ok_or_else(|| WatermarkError::Craft("the spec has no [adversarial] settings".into()))?;
    watermark::apply_crafted(dataset, spec, nonce, &mut |ds, chosen| {
        pgd_perturb(net, ds, chosen, a, device);
        Ok(())
    })
}
