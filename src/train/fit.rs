//! The training loop: SGD with momentum and weight decay (PyTorch's update, implemented here so
//! that its state goes into checkpoints), step or cosine schedules, optional random crop with
//! padding and horizontal flip applied to the (already triggered) images, as BackdoorBox does,
//! seeded, with a checkpoint after every epoch from which an interrupted run resumes exactly.

use super::model::{Arch, Net};
use super::tensor::{labels_tensor, to_tensor};
use super::{TrainError, metrics};
use crate::dataset::{Dataset, ImageShape};
use crate::watermark::rng::{Rng, Stream};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// `lr · gamma^(number of milestones ≤ epoch)` (BackdoorBox's `adjust_learning_rate`).
    Step {
        /// Epochs (0-based) at which the rate is multiplied by gamma.
        milestones: Vec<usize>,
        /// Factor.
        gamma: f64,
    },
    /// `lr · (1 + cos(π · epoch / epochs)) / 2`.
    Cosine,
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Network.
    pub arch: Arch,
    /// Epochs.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Random crop after zero padding by this many pixels (0: none).
    pub crop_padding: usize,
    /// Random horizontal flip.
    pub flip: bool,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Epochs over which the learning rate rises linearly from 0, step by step (BackdoorBox's
    /// `warmup_epoch`); 0 for none. Keeps a network without batch norm from diverging in its
    /// first steps at a high rate.
    #[serde(default)]
    pub warmup_epochs: usize,
}

impl TrainConfig {
    /// The learning rate during `epoch` (0-based).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        match &self.schedule {
            Schedule::Step { milestones, gamma } => {
                self.lr * gamma.powi(milestones.iter().filter(|m| **m <= epoch).count() as i32)
            }
            Schedule::Cosine => {
                self.lr
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * epoch as f64 / self.epochs as f64).cos())
            }
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(
                "epochs and batch size must be at least 1".into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && (0.0..1.0).contains(&self.momentum))
            || self.weight_decay < 0.0
        {
            return Err(TrainError::Config(
                "need lr > 0, momentum in [0, 1), weight decay ≥ 0".into(),
            ));
        }
        Ok(())
    }
}

/// What one epoch gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss.
    pub loss: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// Metrics on the evaluation sets, where given.
    pub metrics: Option<metrics::Metrics>,
}

/// Progress of a run, for bars and logs.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Images done in this epoch.
    pub images: usize,
    /// Images per epoch.
    pub of: usize,
    /// Running mean loss of the epoch.
    pub loss: f64,
    /// Images per second so far in the epoch.
    pub rate: f64,
}

/// A trained network with its variables.
pub struct Trained {
    /// Variables (weights, batch-norm statistics).
    pub vs: nn::VarStore,
    /// The network.
    pub net: Net,
    /// One report per epoch, resumed epochs included.
    pub history: Vec<EpochReport>,
    /// The trigger an IAD or LIRA attack learnt, for the attacker's secret record.
    pub trigger: Option<crate::spec::Generated>,
}

fn augment(x: Tensor, cfg: &TrainConfig, rng: &mut Rng, shape: ImageShape) -> Tensor {
    let mut x = x;
    if cfg.crop_padding > 0 {
        let p = cfg.crop_padding as i64;
        let padded = x.constant_pad_nd([p, p, p, p]);
        let n = x.size()[0];
        let crops: Vec<Tensor> = (0..n)
            .map(|i| {
                let dy = rng.below(2 * cfg.crop_padding as u64 + 1) as i64;
                let dx = rng.below(2 * cfg.crop_padding as u64 + 1) as i64;
                padded
                    .get(i)
                    .narrow(1, dy, shape.height as i64)
                    .narrow(2, dx, shape.width as i64)
            })
            .collect();
        x = Tensor::stack(&crops, 0);
    }
    if cfg.flip {
        let n = x.size()[0];
        let mask: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
        let m = Tensor::from_slice(&mask)
            .to_device(x.device())
            .view([n, 1, 1, 1]);
        x = x.flip([3]).where_self(&m, &x);
    }
    x
}

const CHECKPOINT: &str = "checkpoint.ot";
const CHECKPOINT_META: &str = "checkpoint.json";

#[cfg(test)]
mod tests;

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    config: TrainConfig,
    shape: ImageShape,
    classes: usize,
    train_sha256: String,
    epochs_done: usize,
    history: Vec<EpochReport>,
}

/// Trains on `train`; evaluates after every epoch with `eval` when given. With `checkpoints`, the
/// state is saved there after every epoch and a run with the same settings and data resumes from
/// it. `stop_after(epochs_done)` returning true interrupts the run (after its checkpoint).
pub fn train(
    train: &Dataset,
    cfg: &TrainConfig,
    device: Device,
    eval: Option<&metrics::EvalSet>,
    checkpoints: Option<&Path>,
    progress: &dyn Fn(Step),
    stop_after: &dyn Fn(usize) -> bool,
) -> Result<Trained, TrainError> {
    train_attacked(
        train,
        cfg,
        device,
        eval,
        checkpoints,
        progress,
        stop_after,
        &Attack::None,
    )
}

/// A suspect that trains maliciously (calibration only): the attack lives in the training
/// procedure, not (only) in the data.
pub enum Attack {
    /// Plain training.
    None,
    /// PhysicalBA (Li et al., "Backdoor Attack in the Physical World", ICLR-W 2021): the poisoned
    /// training images (BackdoorBox appends the transformations to BadNets' poisoned-sample
    /// transform) go through the physical-world transformations of BackdoorBox's MNIST test,
    /// ColorJitter(brightness 0.2, contrast 0.2) and RandomAffine(translate 0.1, scale 0.8–0.9),
    /// each time they are drawn, so that the backdoor survives them at test time.
    PhysicalBa {
        /// Which training samples are poisoned.
        poisoned: Vec<bool>,
    },
    /// Blind backdoor (Bagdasaryan & Shmatikov, USENIX Security 2021): the training code adds a
    /// backdoor task on every batch (the same images stamped, labelled `target`) to the clean
    /// loss, the tasks weighted by MGDA (Sener & Koltun's min-norm combination of the task
    /// gradients, each normalised by loss × gradient norm capped at 10: BackdoorBox's `loss+`).
    /// The data stays clean. With `neural_cleanse` (BackdoorBox's default) a third task evades
    /// Neural Cleanse (Wang et al., S&P 2019): on every batch a mask and pattern are first
    /// reverse-engineered one Adam step further towards `target` (loss 0.999·CE + 0.001·‖mask‖₁,
    /// as Neural Cleanse weighs them), then the network learns to give the batch its true labels
    /// through that reverse-engineered trigger.
    Blind {
        /// The backdoor trigger.
        stamp: crate::watermark::Stamp,
        /// The backdoor's target class.
        target: u32,
        /// Add the Neural Cleanse evasion task.
        neural_cleanse: bool,
    },
    /// IAD (Nguyen & Tran, NeurIPS 2020): an input-aware pattern generator and mask network
    /// trained with the classifier ([`super::generator`]); the data stays clean.
    Iad {
        /// The backdoor's target class.
        target: u32,
        /// IAD's settings.
        settings: super::generator::IadSettings,
    },
    /// LIRA (Doan et al., ICCV 2021): an additive trigger function learnt with the classifier
    /// ([`super::generator`]); the data stays clean.
    Lira {
        /// The backdoor's target class.
        target: u32,
        /// LIRA's settings.
        settings: super::generator::LiraSettings,
    },
}

impl Attack {
    /// The attack's name, for records.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PhysicalBa { .. } => "physical-ba",
            Self::Blind { .. } => "blind",
            Self::Iad { .. } => "iad",
            Self::Lira { .. } => "lira",
        }
    }
}

/// PhysicalBA's transformations of a batch [n, C, H, W] in [0, 1], drawn from `rng`: brightness
/// and contrast factors in [0.8, 1.2] (contrast around the image's mean grey, as torchvision),
/// then a shift of up to 10% each way and a zoom of 0.8–0.9 (bilinear, zero fill).
pub fn physical(x: &Tensor, rng: &mut Rng) -> Tensor {
    let n = x.size()[0];
    let mut u = || f64::from(rng.unit_f32());
    let mut b = Vec::with_capacity(n as usize);
    let mut c = Vec::with_capacity(n as usize);
    let mut theta = Vec::with_capacity(6 * n as usize);
    for _ in 0..n {
        b.push((0.8 + 0.4 * u()) as f32);
        c.push((0.8 + 0.4 * u()) as f32);
        let scale = 0.8 + 0.1 * u();
        // affine_grid maps output to input coordinates in [-1, 1]: the inverse of the zoom and
        // of a shift of up to 10% of the size (0.2 in normalised units).
        let (tx, ty) = (0.2 * (2.0 * u() - 1.0), 0.2 * (2.0 * u() - 1.0));
        theta.extend(
            [1.0 / scale, 0.0, -tx / scale, 0.0, 1.0 / scale, -ty / scale].map(|v| v as f32),
        );
    }
    let dev = x.device();
    let col = |v: Vec<f32>| Tensor::from_slice(&v).to_device(dev).view([n, 1, 1, 1]);
    let x = (x * col(b)).clamp(0.0, 1.0);
    let grey = if x.size()[1] == 3 {
        let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
            .to_device(dev)
            .view([1, 3, 1, 1]);
        (&x * w).sum_dim_intlist(1, true, Kind::Float)
    } else {
        x.shallow_clone()
    };
    let mean = grey.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
    let cf = col(c);
    let x = (&x * &cf + mean * (-cf + 1.0)).clamp(0.0, 1.0);
    let theta = Tensor::from_slice(&theta).to_device(dev).view([n, 2, 3]);
    let grid = Tensor::affine_grid_generator(&theta, x.size(), false);
    x.grid_sampler(&grid, 0, 0, false)
}

/// [`train`] with a malicious training procedure.
#[allow(clippy::too_many_arguments)]
pub fn train_attacked(
    train: &Dataset,
    cfg: &TrainConfig,
    device: Device,
    eval: Option<&metrics::EvalSet>,
    checkpoints: Option<&Path>,
    progress: &dyn Fn(Step),
    stop_after: &dyn Fn(usize) -> bool,
    attack: &Attack,
) -> Result<Trained, TrainError> {
    cfg.check()?;
    if let Attack::PhysicalBa { poisoned } = attack
        && poisoned.len() != train.len()
    {
        return Err(TrainError::Config(format!(
            "PhysicalBA marks {} samples as poisoned or not, the training set has {}",
            poisoned.len(),
            train.len()
        )));
    }
    if train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    let shape = train.shape();
    let mut learner = match attack {
        Attack::Iad { target, settings } => Some(super::generator::Learner::iad(
            *settings, *target, shape, cfg.seed, device,
        )),
        Attack::Lira { target, settings } => Some(super::generator::Learner::lira(
            *settings, *target, shape, cfg.seed, device,
        )),
        _ => None,
    };
    // A learnt generator and its optimiser are not in the checkpoint: such runs do not resume.
    let checkpoints = if learner.is_some() { None } else { checkpoints };
    let (mut vs, net) = {
        let _rng = super::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let net = Net::new(&vs.root(), cfg.arch, shape, train.num_classes() as i64);
        (vs, net)
    };
    let trainable = vs.trainable_variables();
    let mut momentum: Vec<Tensor> = trainable.iter().map(|t| t.zeros_like()).collect();
    let mut history = Vec::new();
    let mut start_epoch = 0;
    let train_sha256 = train.sha256();

    if let Some(dir) = checkpoints {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(dir.display().to_string(), e))?;
        let meta_path = dir.join(CHECKPOINT_META);
        if meta_path.exists() {
            let meta: CheckpointMeta = serde_json::from_slice(
                &std::fs::read(&meta_path)
                    .map_err(|e| TrainError::Io(meta_path.display().to_string(), e))?,
            )
            .map_err(|e| TrainError::Config(format!("{}: {e}", meta_path.display())))?;
            if meta.config != *cfg || meta.train_sha256 != train_sha256 || meta.shape != shape {
                return Err(TrainError::Config(format!(
                    "{} holds a checkpoint of another run (settings or data differ); remove it or use another folder",
                    dir.display()
                )));
            }
            let named = Tensor::load_multi_with_device(dir.join(CHECKPOINT), device)
                .map_err(TrainError::Torch)?;
            let lookup: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
            tch::no_grad(|| -> Result<(), TrainError> {
                for (name, var) in vs.variables() {
                    let t = lookup
                        .get(&name)
                        .ok_or_else(|| TrainError::Config(format!("checkpoint lacks {name}")))?;
                    var.shallow_clone().copy_(t);
                }
                for (i, m) in momentum.iter_mut().enumerate() {
                    let t = lookup
                        .get(&format!("momentum.{i}"))
                        .ok_or_else(|| TrainError::Config("checkpoint lacks momentum".into()))?;
                    m.copy_(t);
                }
                Ok(())
            })?;
            start_epoch = meta.epochs_done;
            history = meta.history;
        }
    }

    let n = train.len();
    let x_all = to_tensor(train, &(0..n).collect::<Vec<_>>(), device);
    let y_all = labels_tensor(train, &(0..n).collect::<Vec<_>>(), device);
    // Blind: the whole training set stamped once, labelled with the target.
    let x_bd_all = match attack {
        Attack::Blind { stamp, .. } => {
            let mut stamped = train.clone();
            for i in 0..n {
                stamp.apply(stamped.image_mut(i));
            }
            Some(to_tensor(&stamped, &(0..n).collect::<Vec<_>>(), device))
        }
        _ => None,
    };
    if let Some(l) = &mut learner {
        let mut rng = Rng::new(cfg.seed ^ 0x1ad, Stream::Selection);
        l.pretrain(&x_all, cfg.batch_size, &mut rng);
    }
    let mut cleanse = match attack {
        Attack::Blind {
            neural_cleanse: true,
            ..
        } => Some(Cleanse::new(shape, cfg.seed, device)?),
        _ => None,
    };
    for epoch in start_epoch..cfg.epochs {
        let lr = cfg.lr_at(epoch);
        // LIRA learns its trigger in the first half and fine-tunes the classifier in the second.
        let learn_trigger = match attack {
            Attack::Lira { .. } => epoch < cfg.epochs.div_ceil(2),
            _ => true,
        };
        // Shuffling and augmentation depend on (seed, epoch) only, so a resumed run draws the same.
        let mut rng = Rng::new(
            cfg.seed
                .wrapping_add((epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            Stream::Selection,
        );
        let mut order: Vec<i64> = (0..n as i64).collect();
        rng.choose_front(&mut order, n);
        let started = Instant::now();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let steps = n.div_ceil(cfg.batch_size);
        for (step, chunk) in order.chunks(cfg.batch_size).enumerate() {
            let lr = if epoch < cfg.warmup_epochs {
                lr * (epoch * steps + step + 1) as f64 / (cfg.warmup_epochs * steps) as f64
            } else {
                lr
            };
            let idx = Tensor::from_slice(chunk).to_device(device);
            let mut x = augment(x_all.index_select(0, &idx), cfg, &mut rng, shape);
            if let Attack::PhysicalBa { poisoned } = attack {
                let mask: Vec<bool> = chunk.iter().map(|&i| poisoned[i as usize]).collect();
                if mask.iter().any(|m| *m) {
                    let m = Tensor::from_slice(&mask).to_device(device).view([
                        chunk.len() as i64,
                        1,
                        1,
                        1,
                    ]);
                    x = physical(&x, &mut rng).where_self(&m, &x);
                }
            }
            let y = y_all.index_select(0, &idx);
            let loss = match &mut learner {
                Some(l) => l.loss(&net, &x, &y, learn_trigger),
                None => net.forward_t(&x, true).cross_entropy_for_logits(&y),
            };
            for t in &trainable {
                t.shallow_clone().zero_grad();
            }
            let loss = match (attack, &x_bd_all) {
                (Attack::Blind { target, .. }, Some(bd)) => {
                    let xb = augment(bd.index_select(0, &idx), cfg, &mut rng, shape);
                    let yb = y.full_like(i64::from(*target));
                    let loss_bd = net.forward_t(&xb, true).cross_entropy_for_logits(&yb);
                    let mut tasks = vec![loss, loss_bd];
                    if let Some(c) = &mut cleanse {
                        c.reverse_engineer(&net, &x, &yb, &trainable);
                        tasks.push(
                            net.forward_t(&c.apply(&x), true)
                                .cross_entropy_for_logits(&y),
                        );
                    }
                    let weights = mgda_weights(&tasks, &trainable);
                    let total = tasks
                        .iter()
                        .zip(&weights)
                        .map(|(l, w)| l * *w)
                        .reduce(|a, b| a + b)
                        .expect("two tasks or more");
                    total.backward();
                    total
                }
                _ => {
                    loss.backward();
                    loss
                }
            };
            tch::no_grad(|| {
                for (p, buf) in trainable.iter().zip(momentum.iter_mut()) {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    // PyTorch SGD: d = g + wd·p; buf = momentum·buf + d (buf = d at the first
                    // step, which zero-initialised buffers give too); p -= lr·buf.
                    let d = &g + p * cfg.weight_decay;
                    let _ = buf.g_mul_scalar_(cfg.momentum).g_add_(&d);
                    let _ = p.shallow_clone().g_sub_(&(&*buf * lr));
                }
            });
            if let Some(l) = &mut learner {
                l.step(learn_trigger);
            }
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(TrainError::Diverged { epoch: epoch + 1 });
            }
            loss_sum += l * chunk.len() as f64;
            seen += chunk.len();
            progress(Step {
                epoch: epoch + 1,
                images: seen,
                of: n,
                loss: loss_sum / seen as f64,
                rate: seen as f64 / started.elapsed().as_secs_f64(),
            });
        }
        let secs = started.elapsed().as_secs_f64();
        let metrics = eval.map(|e| metrics::evaluate(&net, e, device));
        history.push(EpochReport {
            epoch: epoch + 1,
            lr,
            loss: loss_sum / n as f64,
            images_per_second: n as f64 / secs,
            metrics,
        });
        if let Some(dir) = checkpoints {
            save_checkpoint(
                dir,
                &vs,
                &momentum,
                &CheckpointMeta {
                    config: cfg.clone(),
                    shape,
                    classes: train.num_classes(),
                    train_sha256: train_sha256.clone(),
                    epochs_done: epoch + 1,
                    history: history.clone(),
                },
            )?;
        }
        if epoch + 1 < cfg.epochs && stop_after(epoch + 1) {
            return Err(TrainError::Interrupted {
                epochs_done: epoch + 1,
            });
        }
    }
    vs.freeze();
    let trigger = learner.as_ref().map(|l| l.trigger());
    Ok(Trained {
        vs,
        net,
        history,
        trigger,
    })
}

/// MGDA's weights of the tasks (Sener & Koltun, NeurIPS 2018), as Blind balances them: each
/// task's gradient over `params` is normalised by min(loss · ‖gradient‖, 10) (BackdoorBox's
/// `loss+`), and the weights are those of the convex combination with the smallest norm.
fn mgda_weights(losses: &[Tensor], params: &[Tensor]) -> Vec<f64> {
    let grads: Vec<Tensor> = losses
        .iter()
        .map(|loss| {
            let g = Tensor::run_backward(&[loss], params, true, false);
            let flat = Tensor::cat(&g.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
            let norm = flat.norm().double_value(&[]);
            let scale = (loss.double_value(&[]) * norm).min(10.0) + 1e-5;
            flat / scale
        })
        .collect();
    let gram: Vec<Vec<f64>> = grads
        .iter()
        .map(|a| grads.iter().map(|b| a.dot(b).double_value(&[])).collect())
        .collect();
    min_norm_weights(&gram)
}

/// The point of the probability simplex that minimises `wᵀ G w` for a Gram matrix `G` of a few
/// vectors: the min-norm element of their convex hull. Exact: the minimum lies in the relative
/// interior of some face, so every face's stationary point (a small linear system) is tried and
/// the best feasible one kept; vertices make the answer total.
fn min_norm_weights(gram: &[Vec<f64>]) -> Vec<f64> {
    let k = gram.len();
    assert!((1..=8).contains(&k), "a few tasks");
    let value = |w: &[f64]| -> f64 {
        (0..k)
            .map(|i| (0..k).map(|j| w[i] * gram[i][j] * w[j]).sum::<f64>())
            .sum()
    };
    let mut best: Option<(f64, Vec<f64>)> = None;
    for subset in 1u32..(1 << k) {
        let idx: Vec<usize> = (0..k).filter(|i| subset & (1 << i) != 0).collect();
        // KKT on the face: G_S w_S = λ·1, Σ w_S = 1, as one (m+1)×(m+1) system.
        let m = idx.len();
        let mut a = vec![vec![0.0; m + 2]; m + 1];
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] = gram[i][j];
            }
            a[r][m] = -1.0;
        }
        a[m][..m].fill(1.0);
        a[m][m + 1] = 1.0;
        let Some(x) = solve(a) else { continue };
        if x[..m].iter().any(|v| *v < -1e-12 || !v.is_finite()) {
            continue;
        }
        let mut w = vec![0.0; k];
        for (r, &i) in idx.iter().enumerate() {
            w[i] = x[r].max(0.0);
        }
        let v = value(&w);
        if best.as_ref().is_none_or(|(b, _)| v < *b) {
            best = Some((v, w));
        }
    }
    best.map(|(_, w)| w).expect("every vertex is feasible")
}

/// Solves the augmented system `a` (n rows, n + 1 columns) by Gaussian elimination with partial
/// pivoting; `None` when it is singular.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[p][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, p);
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// Blind's Neural Cleanse evasion state: the trigger Neural Cleanse would reverse-engineer, kept
/// one Adam step ahead of the network (BackdoorBox's `NCModel`: mask `tanh(m)/2 + 1/2` over the
/// image, pattern `2.2·tanh(p)`, m = 0 and p ~ N(0, 0.5²) at the start, Adam at 0.01).
struct Cleanse {
    _vs: nn::VarStore,
    mask: Tensor,
    pattern: Tensor,
    opt: nn::Optimizer,
}

impl Cleanse {
    fn new(shape: ImageShape, seed: u64, device: Device) -> Result<Self, TrainError> {
        use nn::OptimizerConfig;
        let (h, w) = (shape.height as i64, shape.width as i64);
        let vs = nn::VarStore::new(device);
        let mut rng = Rng::new(seed ^ 0x0c1ea5e, Stream::Selection);
        // Box–Muller, so that the draw is ours and seeded.
        let init: Vec<f32> = (0..h * w)
            .map(|_| {
                let (u, v) = (1.0 - rng.unit_f32(), rng.unit_f32());
                0.5 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let mask = vs.root().zeros("mask", &[h, w]);
        let pattern = vs.root().var_copy(
            "pattern",
            &Tensor::from_slice(&init).view([h, w]).to_device(device),
        );
        let opt = nn::Adam::default().build(&vs, 0.01)?;
        Ok(Self {
            _vs: vs,
            mask,
            pattern,
            opt,
        })
    }

    /// `x` through the current reverse-engineered trigger.
    fn apply(&self, x: &Tensor) -> Tensor {
        let m = self.mask.tanh() / 2.0 + 0.5;
        let p = self.pattern.tanh() * 2.2;
        x * (1.0 - &m) + &m * p
    }

    /// One step of Neural Cleanse's optimisation towards `target` (labels of the batch `x`);
    /// the network's gradients (`params`) are cleared afterwards.
    fn reverse_engineer(&mut self, net: &Net, x: &Tensor, target: &Tensor, params: &[Tensor]) {
        let loss = net
            .forward_t(&self.apply(x), true)
            .cross_entropy_for_logits(target)
            * 0.999
            + (self.mask.tanh() / 2.0 + 0.5).sum(Kind::Float) * 0.001;
        self.opt.zero_grad();
        loss.backward();
        for p in params {
            p.shallow_clone().zero_grad();
        }
        self.opt.step();
    }
}

fn save_checkpoint(
    dir: &Path,
    vs: &nn::VarStore,
    momentum: &[Tensor],
    meta: &CheckpointMeta,
) -> Result<(), TrainError> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.extend(
        momentum
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("momentum.{i}"), t.shallow_clone())),
    );
    // Weights first, then the metadata that says they are complete; both by rename.
    let tmp = dir.join(format!("{CHECKPOINT}.partial"));
    Tensor::save_multi(&named, &tmp).map_err(TrainError::Torch)?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT))
        .map_err(|e| TrainError::Io(dir.display().to_string(), e))?;
    let bytes = serde_json::to_vec_pretty(meta).expect("serialising to memory");
    crate::fsutil::write_file_atomic(&dir.join(CHECKPOINT_META), &bytes, 0o644, true)
        .map_err(|e| TrainError::Io(dir.display().to_string(), e))
}
