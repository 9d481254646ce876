//! The training loop: SGD with momentum and weight decay (PyTorch's update, implemented here so
//! that its state goes into checkpoints), step or cosine schedules, optional random crop with
//! padding and horizontal flip applied to the (already triggered) images, as BackdoorBox does,
//! seeded, with a checkpoint after every epoch from which an interrupted run resumes exactly.

pub use super::config::{EpochReport, Schedule, TrainConfig};
use super::model::Net;
use super::tensor::{labels_tensor, to_tensor};
use super::{TrainError, checkpoint, metrics};
use crate::dataset::{Dataset, ImageShape};
use crate::watermark::rng::{Rng, Stream};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Tensor, nn};

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

pub(crate) fn augment(x: Tensor, cfg: &TrainConfig, rng: &mut Rng, shape: ImageShape) -> Tensor {
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

#[cfg(test)]
mod tests;

/// What a hook may change in a training run: an attack (a malicious procedure of a suspect) or a
/// training-time defence (`super::defence`, appended after the run's own hooks). The loop calls,
/// in this order: [`Hook::start`] once, after the network is made; at each epoch's start
/// [`Hook::fresh_optimiser`]; for every batch [`Hook::inputs`], then [`Hook::loss`] (the first
/// hook that answers owns the loss, else plain cross-entropy), the gradients are cleared, the
/// loss backpropagated, SGD steps, then [`Hook::after_step`]. A hook that needs libtorch's generator at creation makes its
/// variables when it is built, before the network (so the network's draws stay the run's own).
pub trait Hook {
    /// The hook's name, for records.
    fn name(&self) -> &'static str;
    /// Whether a run with this hook resumes from checkpoints (a hook whose own state is not in
    /// the checkpoint cannot).
    fn resumable(&self) -> bool {
        true
    }
    /// Once, after the network is made and the training set is on the device.
    fn start(&mut self, _s: &Start<'_>) -> Result<(), TrainError> {
        Ok(())
    }
    /// Changes the augmented images of a batch (`chunk`: their indices in the training set).
    fn inputs(&mut self, x: Tensor, _chunk: &[i64], _rng: &mut Rng) -> Tensor {
        x
    }
    /// The batch's loss, when this hook computes it (not yet backpropagated).
    fn loss(&mut self, _b: &mut Batch<'_>) -> Option<Tensor> {
        None
    }
    /// Whether the optimiser starts afresh (momentum cleared) at the start of `epoch` (0-based):
    /// a phase of the hook's that is a new optimisation, as ABL's unlearning is.
    fn fresh_optimiser(&self, _epoch: usize) -> bool {
        false
    }
    /// After the optimiser's step of the classifier.
    fn after_step(&mut self, _epoch: usize) {}
    /// The trigger the hook learnt, for the attacker's secret record.
    fn trigger(&self) -> Option<crate::spec::Generated> {
        None
    }
}

/// What [`Hook::start`] sees.
pub struct Start<'a> {
    /// The training set.
    pub train: &'a Dataset,
    /// All of its images, [n, C, H, W] in [0, 1], on the device.
    pub x_all: &'a Tensor,
    /// The run's settings.
    pub cfg: &'a TrainConfig,
    /// The device.
    pub device: Device,
}

/// One batch, as [`Hook::loss`] sees it.
pub struct Batch<'a> {
    /// The network in training mode.
    pub net: &'a Net,
    /// Images after augmentation and [`Hook::inputs`].
    pub x: &'a Tensor,
    /// Labels.
    pub y: &'a Tensor,
    /// The batch's indices in the training set, on the device.
    pub idx: &'a Tensor,
    /// Epoch (0-based).
    pub epoch: usize,
    /// The run's settings.
    pub cfg: &'a TrainConfig,
    /// The epoch's generator (shuffling and augmentation draw from it).
    pub rng: &'a mut Rng,
    /// The classifier's trainable variables.
    pub params: &'a [Tensor],
    /// The images' shape.
    pub shape: ImageShape,
}

impl Batch<'_> {
    /// `x` augmented as the run augments its images.
    pub fn augment(&mut self, x: Tensor) -> Tensor {
        augment(x, self.cfg, self.rng, self.shape)
    }
}

/// A training run: the data, the settings and where it reports.
pub struct Run<'a> {
    /// Training set.
    pub train: &'a Dataset,
    /// Settings.
    pub cfg: &'a TrainConfig,
    /// Device.
    pub device: Device,
    /// Evaluated after every epoch when given.
    pub eval: Option<&'a metrics::EvalSet>,
    /// The state is saved here after every epoch, and a run with the same settings and data
    /// resumes from it.
    pub checkpoints: Option<&'a Path>,
    /// Called after every batch.
    pub progress: &'a dyn Fn(Step),
    /// Returning true for the epochs done interrupts the run (after its checkpoint).
    pub stop_after: &'a dyn Fn(usize) -> bool,
    /// Start from this network's weights (and pruning) instead of a fresh initialisation: a
    /// defender fine-tuning a suspect model. Such a run keeps no checkpoints.
    pub init: Option<Init<'a>>,
}

/// The weights a run starts from.
#[derive(Clone, Copy)]
pub struct Init<'a> {
    /// Variables to copy (of a network of the run's architecture).
    pub vs: &'a nn::VarStore,
    /// Channels of the last block to prune.
    pub pruned: &'a [i64],
}

impl<'a> Run<'a> {
    /// A run of `cfg` on `train` that evaluates nothing, keeps no checkpoints and reports
    /// nowhere.
    pub fn new(train: &'a Dataset, cfg: &'a TrainConfig, device: Device) -> Self {
        Self {
            train,
            cfg,
            device,
            eval: None,
            checkpoints: None,
            progress: &|_| {},
            stop_after: &|_| false,
            init: None,
        }
    }
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
    run(
        &Run {
            train,
            cfg,
            device,
            eval,
            checkpoints,
            progress,
            stop_after,
            init: None,
        },
        &mut [],
    )
}

/// The generator of epoch `epoch` (0-based) and the order of `n` samples it draws: shuffling
/// and augmentation depend on (seed, epoch) only, so a resumed run draws the same.
pub(crate) fn epoch_order(cfg: &TrainConfig, epoch: usize, n: usize) -> (Rng, Vec<i64>) {
    let mut rng = Rng::new(
        cfg.seed
            .wrapping_add((epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        Stream::Selection,
    );
    let mut order: Vec<i64> = (0..n as i64).collect();
    rng.choose_front(&mut order, n);
    (rng, order)
}

/// PyTorch's SGD step of `p` with gradient `g`: d = g + wd·p; buf = momentum·buf + d (buf = d at
/// the first step, which zero-initialised buffers give too); p −= lr·buf. Call without grad.
pub(crate) fn sgd_step(p: &Tensor, g: &Tensor, buf: &mut Tensor, cfg: &TrainConfig, lr: f64) {
    let d = g + p * cfg.weight_decay;
    let _ = buf.g_mul_scalar_(cfg.momentum).g_add_(&d);
    let _ = p.shallow_clone().g_sub_(&(&*buf * lr));
}

/// An epoch's running loss, told to `progress` after every batch.
pub(crate) struct EpochLoss {
    epoch: usize,
    of: usize,
    started: Instant,
    sum: f64,
    seen: usize,
}

impl EpochLoss {
    /// Epoch `epoch` (0-based) of `of` images, starting now.
    pub(crate) fn new(epoch: usize, of: usize) -> Self {
        Self {
            epoch,
            of,
            started: Instant::now(),
            sum: 0.0,
            seen: 0,
        }
    }

    /// Adds a batch of `images` with mean loss `loss`; a loss that is not finite is divergence.
    pub(crate) fn add(
        &mut self,
        loss: f64,
        images: usize,
        progress: &dyn Fn(Step),
    ) -> Result<(), TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                epoch: self.epoch + 1,
            });
        }
        self.sum += loss * images as f64;
        self.seen += images;
        progress(Step {
            epoch: self.epoch + 1,
            images: self.seen,
            of: self.of,
            loss: self.sum / self.seen as f64,
            rate: self.seen as f64 / self.started.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// The epoch's report at learning rate `lr`, its throughput measured now.
    pub(crate) fn report(&self, lr: f64, metrics: Option<metrics::Metrics>) -> EpochReport {
        EpochReport {
            epoch: self.epoch + 1,
            lr,
            loss: self.sum / self.of as f64,
            images_per_second: self.of as f64 / self.started.elapsed().as_secs_f64(),
            metrics,
        }
    }
}

/// The training loop: SGD over shuffled, augmented batches, with `hooks` (see [`Hook`]).
pub fn run(run: &Run<'_>, hooks: &mut [&mut dyn Hook]) -> Result<Trained, TrainError> {
    let Run {
        train,
        cfg,
        device,
        eval,
        progress,
        stop_after,
        ..
    } = *run;
    cfg.check()?;
    let mut defence = cfg.defence.hook(cfg)?;
    let mut hooks: Vec<&mut dyn Hook> = hooks.iter_mut().map(|h| &mut **h).collect();
    if let Some(d) = defence.as_mut() {
        hooks.push(d.as_mut());
    }
    if train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    let shape = train.shape();
    let checkpoints = run
        .checkpoints
        .filter(|_| run.init.is_none() && hooks.iter().all(|h| h.resumable()));
    let (mut vs, mut net) = {
        let _rng = super::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let net = Net::new(&vs.root(), cfg.arch, shape, train.num_classes() as i64);
        (vs, net)
    };
    if let Some(init) = &run.init {
        // Fails on variables of another architecture.
        vs.copy(init.vs)?;
        net.prune(init.pruned, device)
            .map_err(|e| TrainError::Config(e.to_string()))?;
    }
    let trainable = vs.trainable_variables();
    let mut momentum: Vec<Tensor> = trainable.iter().map(|t| t.zeros_like()).collect();
    let mut history = Vec::new();
    let mut start_epoch = 0;
    let train_sha256 = train.sha256();
    if let Some(dir) = checkpoints
        && let Some((done, h)) =
            checkpoint::load(dir, &vs, &mut momentum, (cfg, &train_sha256, shape), device)?
    {
        start_epoch = done;
        history = h;
    }

    let n = train.len();
    let all: Vec<usize> = (0..n).collect();
    let x_all = to_tensor(train, &all, device);
    let y_all = labels_tensor(train, &all, device);
    let start = Start {
        train,
        x_all: &x_all,
        cfg,
        device,
    };
    for h in hooks.iter_mut() {
        h.start(&start)?;
    }
    for epoch in start_epoch..cfg.epochs {
        if hooks.iter().any(|h| h.fresh_optimiser(epoch)) {
            for buf in momentum.iter_mut() {
                let _ = buf.zero_();
            }
        }
        let lr = cfg.lr_at(epoch);
        let (mut rng, order) = epoch_order(cfg, epoch, n);
        let mut epoch_loss = EpochLoss::new(epoch, n);
        let steps = n.div_ceil(cfg.batch_size);
        for (step, chunk) in order.chunks(cfg.batch_size).enumerate() {
            let lr = if epoch < cfg.warmup_epochs {
                lr * (epoch * steps + step + 1) as f64 / (cfg.warmup_epochs * steps) as f64
            } else {
                lr
            };
            let idx = Tensor::from_slice(chunk).to_device(device);
            let mut x = augment(x_all.index_select(0, &idx), cfg, &mut rng, shape);
            for h in hooks.iter_mut() {
                x = h.inputs(x, chunk, &mut rng);
            }
            let y = y_all.index_select(0, &idx);
            let mut batch = Batch {
                net: &net,
                x: &x,
                y: &y,
                idx: &idx,
                epoch,
                cfg,
                rng: &mut rng,
                params: &trainable,
                shape,
            };
            let owned = hooks.iter_mut().find_map(|h| h.loss(&mut batch));
            let loss =
                owned.unwrap_or_else(|| net.forward_t(&x, true).cross_entropy_for_logits(&y));
            for t in &trainable {
                t.shallow_clone().zero_grad();
            }
            loss.backward();
            tch::no_grad(|| {
                for (p, buf) in trainable.iter().zip(momentum.iter_mut()) {
                    let g = p.grad();
                    if g.defined() {
                        sgd_step(p, &g, buf, cfg, lr);
                    }
                }
            });
            for h in hooks.iter_mut() {
                h.after_step(epoch);
            }
            epoch_loss.add(loss.double_value(&[]), chunk.len(), progress)?;
        }
        // Throughput of the training alone, before the evaluation.
        let mut report = epoch_loss.report(lr, None);
        report.metrics = eval.map(|e| metrics::evaluate(&net, e, device));
        history.push(report);
        if let Some(dir) = checkpoints {
            checkpoint::save(
                dir,
                &vs,
                &momentum,
                &checkpoint::Meta {
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
    let trigger = hooks.iter().find_map(|h| h.trigger());
    Ok(Trained {
        vs,
        net,
        history,
        trigger,
    })
}
