//! Mode Connectivity Repair (Zhao et al., "Bridging Mode Connectivity in Loss Landscapes and
//! Adversarial Robustness", ICLR 2020): between the suspect model (w₀) and a copy fine-tuned on
//! clean data (w₁), the bend θ of a quadratic Bézier curve
//! φ(t) = (1 − t)² w₀ + 2t(1 − t) θ + t² w₁ is trained on clean data with t drawn uniformly for
//! every batch; the repaired model is φ(t) at the chosen t, with its batch-norm statistics
//! recomputed on the clean data (the curve's weights were never trained with them).

use crate::dataset::Dataset;
use crate::train::fit::{self, Step, TrainConfig, Trained};
use crate::train::serve::LoadedModel;
use crate::train::tensor::{labels_tensor, to_tensor};
use crate::train::{Net, TrainError};
use tch::{Device, Tensor, nn};

fn curve(w0: &[Tensor], bend: &[Tensor], w1: &[Tensor], t: f64) -> Vec<Tensor> {
    let (a, b, c) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
    w0.iter()
        .zip(bend)
        .zip(w1)
        .map(|((x, y), z)| x * a + y * b + z * c)
        .collect()
}

fn set(params: &[Tensor], values: &[Tensor]) {
    tch::no_grad(|| {
        for (p, v) in params.iter().zip(values) {
            p.shallow_clone().copy_(v);
        }
    });
}

fn snapshot(vs: &nn::VarStore) -> Vec<Tensor> {
    vs.trainable_variables()
        .iter()
        .map(|t| t.detach().copy())
        .collect()
}

/// Trains the curve from `model` to `end` on `clean` as `cfg` says and returns φ(`t`).
pub(super) fn repair(
    model: &LoadedModel,
    end: &Trained,
    clean: &Dataset,
    cfg: &TrainConfig,
    t_out: f64,
    device: Device,
    progress: &dyn Fn(Step),
) -> Result<Trained, TrainError> {
    let (mut vs, net) = model.trainable_copy()?;
    let params = vs.trainable_variables();
    let w0 = snapshot(&vs);
    let w1 = snapshot(&end.vs);
    let bend: Vec<Tensor> = w0.iter().zip(&w1).map(|(a, b)| (a + b) * 0.5).collect();
    let mut momentum: Vec<Tensor> = bend.iter().map(|t| t.zeros_like()).collect();

    let shape = clean.shape();
    let n = clean.len();
    let all: Vec<usize> = (0..n).collect();
    let x_all = to_tensor(clean, &all, device);
    let y_all = labels_tensor(clean, &all, device);
    let mut history = Vec::new();
    for epoch in 0..cfg.epochs {
        let lr = cfg.lr_at(epoch);
        let (mut rng, order) = fit::epoch_order(cfg, epoch, n);
        let mut epoch_loss = fit::EpochLoss::new(epoch, n);
        for chunk in order.chunks(cfg.batch_size) {
            let t = rng.unit_f32() as f64;
            set(&params, &curve(&w0, &bend, &w1, t));
            let idx = Tensor::from_slice(chunk).to_device(device);
            let x = fit::augment(x_all.index_select(0, &idx), cfg, &mut rng, shape);
            let y = y_all.index_select(0, &idx);
            let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            loss.backward();
            // dL/dθ = 2t(1 − t) dL/dφ; SGD with momentum and weight decay on θ.
            let scale = 2.0 * t * (1.0 - t);
            tch::no_grad(|| {
                for ((p, th), buf) in params.iter().zip(&bend).zip(momentum.iter_mut()) {
                    let g = p.grad();
                    if g.defined() {
                        fit::sgd_step(th, &(&g * scale), buf, cfg, lr);
                    }
                }
            });
            epoch_loss.add(loss.double_value(&[]), chunk.len(), progress)?;
        }
        history.push(epoch_loss.report(lr, None));
    }
    set(&params, &curve(&w0, &bend, &w1, t_out));
    recompute_batch_norm(&vs, &net, &x_all, cfg.batch_size);
    vs.freeze();
    Ok(Trained {
        vs,
        net,
        history,
        trigger: None,
    })
}

/// Resets the running statistics of every batch-norm layer and runs the clean images through the
/// network in training mode (without a step), so that they describe the weights now set.
fn recompute_batch_norm(vs: &nn::VarStore, net: &Net, x_all: &Tensor, batch: usize) {
    let vars = vs.variables();
    let mut any = false;
    tch::no_grad(|| {
        for (name, t) in &vars {
            if name.ends_with("running_mean") {
                let _ = t.shallow_clone().zero_();
                any = true;
            } else if name.ends_with("running_var") {
                let _ = t.shallow_clone().fill_(1.0);
            }
        }
        if !any {
            return;
        }
        // libtorch's running averages move by 0.1 per batch: several passes forget the reset.
        let n = x_all.size()[0];
        for _ in 0..3 {
            let mut i = 0;
            while i < n {
                let m = (batch as i64).min(n - i);
                let _ = net.forward_t(&x_all.narrow(0, i, m), true);
                i += m;
            }
        }
    });
}
