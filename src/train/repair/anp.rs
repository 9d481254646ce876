//! Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
//! Models", NeurIPS 2021). Every neuron (an output channel of a layer of
//! [`Net::neuron_layers`]: a batch-norm layer, or a convolution or hidden linear layer where the
//! network has no batch norm) gets a mask m ∈ [0, 1] on its weight and, while the mask is
//! learnt, adversarial multiplicative noise: weight × (m + δ), bias × (1 + ξ), |δ|, |ξ| ≤ ε.
//! Neurons that a small perturbation turns into a backdoor's shortcut are the ones the clean
//! loss needs least under that noise. For every batch of clean data, δ and ξ start uniform in
//! [−ε, ε] and take one step of gradient ascent on the loss (step ε, then clipped), and the masks
//! take one step of SGD (learning rate 0.2, momentum 0.9, clipped to [0, 1]) on
//! α · L(m) + (1 − α) · L(m, δ, ξ), as the paper's Algorithm 1 with its defaults (ε 0.4, α 0.2,
//! 2,000 iterations of 128 images). Neurons whose mask ends below the threshold (0.2) are pruned:
//! their weight set to zero, as the paper's pruning by threshold does. The model is not trained
//! otherwise.
//!
//! The masks' gradient comes from the weights': with w = w₀ · s per channel, ∂L/∂s_c =
//! Σ ∂L/∂w[c, …] · w₀[c, …]; likewise for the bias.

use crate::dataset::Dataset;
use crate::train::fit::{self, Step, TrainConfig, Trained};
use crate::train::serve::LoadedModel;
use crate::train::tensor::{labels_tensor, to_tensor};
use crate::train::{Net, TrainError};
use crate::watermark::rng::Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

/// ANP's settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AnpConfig {
    /// Bound of the neurons' adversarial noise.
    pub eps: f64,
    /// Weight of the clean loss (the rest on the perturbed loss).
    pub alpha: f64,
    /// Batches of mask optimisation.
    pub iterations: usize,
    /// Neurons whose mask ends below this are pruned.
    pub threshold: f64,
}

impl Default for AnpConfig {
    fn default() -> Self {
        Self {
            eps: 0.4,
            alpha: 0.2,
            iterations: 2000,
            threshold: 0.2,
        }
    }
}

/// The masks' learning rate and momentum.
const MASK_LR: f64 = 0.2;
const MASK_MOMENTUM: f64 = 0.9;

/// What ANP found.
#[derive(Debug, Clone, Serialize)]
pub struct AnpReport {
    /// Per layer of [`Net::neuron_layers`]: its name, its neurons, and those pruned.
    pub layers: Vec<(String, i64, Vec<i64>)>,
    /// Neurons pruned in all.
    pub pruned: usize,
    /// Neurons in all.
    pub neurons: usize,
}

/// One layer's neurons: its variables, their original values and the per-neuron factors.
struct Layer {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    w0: Tensor,
    b0: Option<Tensor>,
    mask: Tensor,
    velocity: Tensor,
}

/// `s` ([C]) shaped to multiply a tensor like `like` along its first dimension.
fn per_channel(s: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
    s.view(shape.as_slice())
}

/// The layers of `net` (built under `vs`'s root) with masks of 1.
fn layers(vs: &nn::VarStore, net: &Net) -> Result<Vec<Layer>, TrainError> {
    let vars = vs.variables();
    net.neuron_layers()
        .iter()
        .map(|name| {
            let weight = vars
                .get(&format!("{name}.weight"))
                .ok_or_else(|| TrainError::Config(format!("the network has no `{name}.weight`")))?
                .shallow_clone();
            let bias = vars.get(&format!("{name}.bias")).map(|b| b.shallow_clone());
            let c = weight.size()[0];
            let mask = Tensor::ones([c], (weight.kind(), weight.device()));
            Ok(Layer {
                name: name.clone(),
                w0: weight.detach().copy(),
                b0: bias.as_ref().map(|b| b.detach().copy()),
                velocity: mask.zeros_like(),
                mask,
                weight,
                bias,
            })
        })
        .collect()
}

/// Sets every layer's weight to w₀ · (m + δ) and bias to b₀ · (1 + ξ) (no noise: δ = ξ = 0).
fn apply(layers: &[Layer], noise: Option<&[(Tensor, Tensor)]>) {
    tch::no_grad(|| {
        for (i, l) in layers.iter().enumerate() {
            let (s, t) = match noise {
                Some(n) => (&l.mask + &n[i].0, &n[i].1 + 1.0),
                None => (l.mask.shallow_clone(), l.mask.ones_like()),
            };
            l.weight
                .shallow_clone()
                .copy_(&(&l.w0 * per_channel(&s, &l.w0)));
            if let (Some(b), Some(b0)) = (&l.bias, &l.b0) {
                b.shallow_clone().copy_(&(b0 * t));
            }
        }
    });
}

/// Per layer, ∂L/∂s and ∂L/∂t of the last backward pass (see the module's note).
fn factor_grads(layers: &[Layer]) -> Vec<(Tensor, Tensor)> {
    tch::no_grad(|| {
        layers
            .iter()
            .map(|l| {
                let g = l.weight.grad();
                let gs = if g.defined() {
                    let prod = g * &l.w0;
                    if prod.dim() > 1 {
                        prod.flatten(1, -1)
                            .sum_dim_intlist(&[1i64][..], false, Kind::Float)
                    } else {
                        prod
                    }
                } else {
                    l.mask.zeros_like()
                };
                let gt = match (&l.bias, &l.b0) {
                    (Some(b), Some(b0)) if b.grad().defined() => b.grad() * b0,
                    _ => l.mask.zeros_like(),
                };
                (gs, gt)
            })
            .collect()
    })
}

/// Cross-entropy of `net` on a batch, in the network's precision.
fn loss(net: &Net, x: &Tensor, y: &Tensor) -> Tensor {
    let logits = net.forward_t(x, true);
    logits.log_softmax(-1, logits.kind()).nll_loss(y)
}

/// [`loss`], after zeroing the gradients of `params`, backwards.
fn loss_backward(net: &Net, params: &[Tensor], x: &Tensor, y: &Tensor) -> f64 {
    for p in params {
        p.shallow_clone().zero_grad();
    }
    let loss = loss(net, x, y);
    loss.backward();
    loss.double_value(&[])
}

/// Uniform noise in [−ε, ε], one value per neuron of each layer.
fn draw_noise(layers: &[Layer], eps: f64, rng: &mut Rng) -> Vec<(Tensor, Tensor)> {
    let mut draw = |like: &Tensor| {
        let v: Vec<f64> = (0..like.size()[0])
            .map(|_| (rng.unit_f32() as f64 * 2.0 - 1.0) * eps)
            .collect();
        Tensor::from_slice(&v)
            .to_kind(like.kind())
            .to_device(like.device())
    };
    layers
        .iter()
        .map(|l| (draw(&l.mask), draw(&l.mask)))
        .collect()
}

/// Learns ANP's masks for `model` on `clean` (batches, seed and augmentation as `train` says) and
/// returns the model with the neurons whose mask ends below the threshold pruned.
pub(super) fn repair(
    model: &LoadedModel,
    clean: &Dataset,
    train: &TrainConfig,
    cfg: &AnpConfig,
    device: Device,
    progress: &dyn Fn(Step),
) -> Result<(Trained, AnpReport), TrainError> {
    // The masks are learnt on a copy whose batch-norm statistics move (the paper trains in
    // training mode, dropout included, drawn from libtorch's generator seeded here); the pruning
    // is applied to another copy of the model as it was.
    let (vs, net) = model.trainable_copy()?;
    {
        let _rng = crate::train::TORCH_RNG
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(train.seed as i64);
    }
    let params = vs.trainable_variables();
    let mut layers = layers(&vs, &net)?;

    let shape = clean.shape();
    let n = clean.len();
    let all: Vec<usize> = (0..n).collect();
    let x_all = to_tensor(clean, &all, device);
    let y_all = labels_tensor(clean, &all, device);
    let mut history = Vec::new();
    let mut done = 0;
    let mut pass = 0;
    while done < cfg.iterations {
        let (mut rng, order) = fit::epoch_order(train, pass, n);
        let batches: Vec<&[i64]> = order
            .chunks(train.batch_size)
            .take(cfg.iterations - done)
            .collect();
        let images = batches.iter().map(|b| b.len()).sum();
        let mut pass_loss = fit::EpochLoss::new(pass, images);
        for chunk in batches {
            let idx = Tensor::from_slice(chunk).to_device(device);
            let x = fit::augment(x_all.index_select(0, &idx), train, &mut rng, shape);
            let y = y_all.index_select(0, &idx);
            // The adversary: random noise, then a step up the loss, clipped to ε.
            let mut noise = draw_noise(&layers, cfg.eps, &mut rng);
            apply(&layers, Some(&noise));
            loss_backward(&net, &params, &x, &y);
            tch::no_grad(|| {
                for ((d, e), (gd, ge)) in noise.iter_mut().zip(factor_grads(&layers)) {
                    *d = (&*d + gd * cfg.eps).clamp(-cfg.eps, cfg.eps);
                    *e = (&*e + ge * cfg.eps).clamp(-cfg.eps, cfg.eps);
                }
            });
            // The masks: the perturbed and the clean loss.
            apply(&layers, Some(&noise));
            let robust = loss_backward(&net, &params, &x, &y);
            let g_robust = factor_grads(&layers);
            apply(&layers, None);
            let natural = loss_backward(&net, &params, &x, &y);
            let g_natural = factor_grads(&layers);
            tch::no_grad(|| {
                for (l, ((gr, _), (gn, _))) in
                    layers.iter_mut().zip(g_robust.iter().zip(&g_natural))
                {
                    let g = gn * cfg.alpha + gr * (1.0 - cfg.alpha);
                    let _ = l.velocity.g_mul_scalar_(MASK_MOMENTUM).g_add_(&g);
                    l.mask = (&l.mask - &l.velocity * MASK_LR).clamp(0.0, 1.0);
                }
            });
            pass_loss.add(
                cfg.alpha * natural + (1.0 - cfg.alpha) * robust,
                chunk.len(),
                progress,
            )?;
            done += 1;
        }
        history.push(pass_loss.report(MASK_LR, None));
        pass += 1;
    }

    let (mut out_vs, out_net) = model.trainable_copy()?;
    let vars = out_vs.variables();
    let mut report = AnpReport {
        layers: Vec::new(),
        pruned: 0,
        neurons: 0,
    };
    for l in &layers {
        let mask =
            Vec::<f32>::try_from(l.mask.to_device(Device::Cpu)).map_err(TrainError::Torch)?;
        let pruned: Vec<i64> = (0..mask.len() as i64)
            .filter(|&c| (mask[c as usize] as f64) < cfg.threshold)
            .collect();
        let w = &vars[&format!("{}.weight", l.name)];
        tch::no_grad(|| {
            for &c in &pruned {
                let _ = w.get(c).zero_();
            }
        });
        report.neurons += mask.len();
        report.pruned += pruned.len();
        report
            .layers
            .push((l.name.clone(), mask.len() as i64, pruned));
    }
    out_vs.freeze();
    Ok((
        Trained {
            vs: out_vs,
            net: out_net,
            history,
            trigger: None,
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::ImageShape;
    use crate::train::Arch;

    /// The masks' and the bias factors' gradients, read off the weights' gradients, are the
    /// loss's derivatives along them (central differences in double precision).
    #[test]
    fn factor_gradients_are_the_derivatives_along_the_masks() {
        let _one = crate::train::exclusive_torch();
        tch::manual_seed(3);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let shape = ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        };
        let net = Net::new(&vs.root(), Arch::BaselineMnist, shape, 10);
        vs.double();
        let mut layers = layers(&vs, &net).unwrap();
        assert_eq!(
            layers.iter().map(|l| l.mask.size()[0]).collect::<Vec<_>>(),
            vec![16, 32, 512]
        );
        for l in &mut layers {
            l.mask = Tensor::rand_like(&l.mask) * 0.5 + 0.5;
        }
        let params = vs.trainable_variables();
        let x = Tensor::rand([8, 1, 28, 28], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        let noise: Vec<(Tensor, Tensor)> = layers
            .iter()
            .map(|l| (l.mask.zeros_like(), Tensor::rand_like(&l.mask) * 0.4 - 0.2))
            .collect();
        apply(&layers, Some(&noise));
        loss_backward(&net, &params, &x, &y);
        let grads = factor_grads(&layers);
        let h = 1e-5;
        let loss_at = |layers: &[Layer], noise: &[(Tensor, Tensor)]| {
            apply(layers, Some(noise));
            tch::no_grad(|| loss(&net, &x, &y).double_value(&[]))
        };
        for (i, (gs, gt)) in grads.iter().enumerate() {
            // The neuron with the largest mask gradient, and its bias factor.
            let c = gs.abs().argmax(0, false).int64_value(&[]);
            let shift = |which: usize, by: f64| {
                let mut n: Vec<(Tensor, Tensor)> =
                    noise.iter().map(|(a, b)| (a.copy(), b.copy())).collect();
                let t = if which == 0 { &mut n[i].0 } else { &mut n[i].1 };
                let _ = t.get(c).g_add_scalar_(by);
                loss_at(&layers, &n)
            };
            for (which, g) in [(0, gs), (1, gt)] {
                let fd = (shift(which, h) - shift(which, -h)) / (2.0 * h);
                let g = g.double_value(&[c]);
                assert!(
                    (fd - g).abs() <= 1e-4 * g.abs().max(1e-3),
                    "layer {i} neuron {c} factor {which}: {g} vs {fd}"
                );
            }
        }
    }
}
