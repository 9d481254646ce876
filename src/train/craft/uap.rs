//! TUAP (Zhao et al., CVPR 2020; BackdoorBox's `TUAP`): a targeted universal adversarial
//! perturbation v, ‖v‖∞ ≤ eps, built as Moosavi-Dezfooli et al.'s UAP (CVPR 2017) with a
//! targeted DeepFool step: for each of a random `p_samples` share of the training set that
//! x + v does not yet send to the target, DeepFool's smallest L∞ step towards the target
//! (`(|f| + 1e-4) / ‖w‖₁ · sign(w)`, overshoot 0.02, at most 50 iterations) is added to v,
//! which is then clipped to the eps ball; passes repeat until at least 1 − delta of the samples
//! go to the target. v (rounded to whole pixel values) becomes the trigger of clean-label
//! poisons and of queries.

use crate::dataset::Dataset;
use crate::spec::{Labelling, Uap, WatermarkSpec};
use crate::train::Progress;
use crate::train::model::Net;
use crate::train::tensor::to_tensor;
use crate::watermark::WatermarkError;
use crate::watermark::rng::{Rng, Stream};
use tch::{Device, Kind, Tensor};

/// TUAP's perturbation against `net`, as whole values on the 0–255 scale (HWC order).
pub(super) fn targeted_uap(
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
