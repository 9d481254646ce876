//! `hallmark repair` (feature `train`): what a thief runs on a model to remove a watermark before
//! serving it (fine-tuning, fine-pruning, NAD, MCR, distillation, ANP), with a little clean data.

use super::parse_split;
use super::train::{ScheduleKind, load_test};
use crate::dataset::Split;
use crate::train::calibrate::describe;
use crate::train::metrics::EvalSet;
use crate::train::repair::anp::AnpConfig;
use crate::train::repair::{Defence, RepairConfig, repair};
use crate::train::serve::{LoadedModel, save_model};
use crate::train::{self, DeviceChoice, TrainConfig};
use crate::watermark::SecretRecord;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `hallmark repair`.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Folder written by `hallmark train` (or by an earlier repair).
    #[arg(long)]
    pub model: PathBuf,
    /// The defence: `fine-tuning` on the clean data; `fine-pruning` removes the least active
    /// channels of the last block (--prune-rate), then fine-tunes; `nad` fine-tunes a teacher,
    /// then the model with NAD's attention loss; `mcr` trains a curve of weights to a fine-tuned
    /// copy and takes the point at --curve-t; `distillation` trains a fresh network on the
    /// model's answers; `anp` prunes the neurons that adversarial neuron noise turns into a
    /// shortcut (--anp-*), without training the model.
    #[arg(long, value_enum)]
    pub defence: Defence,
    /// The defender's clean data (any format hallmark reads).
    #[arg(long)]
    pub clean_data: PathBuf,
    /// Split of --clean-data.
    #[arg(long, value_parser = parse_split)]
    pub clean_split: Option<Split>,
    /// Keep only the first N images of --clean-data (BackdoorBench's defender holds 5% of the
    /// training set: 3,000 Fashion-MNIST images).
    #[arg(long)]
    pub clean_limit: Option<usize>,
    /// Output folder: model.ot, model.json, repair.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Test data, to report benign accuracy (and with --secret, attack success) before and after.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Split of --test-data.
    #[arg(long, value_parser = parse_split)]
    pub test_split: Option<Split>,
    /// The watermark's secret record, for attack success rates.
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// Epochs of the defender's training.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Initial learning rate (BackdoorBench's fine-tuning: 0.01, cosine).
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule (a step schedule here never steps).
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// Random crop after zero padding by this many pixels (0: none).
    #[arg(long, default_value_t = 0)]
    pub crop_padding: usize,
    /// Random horizontal flip.
    #[arg(long)]
    pub flip: bool,
    /// Seed of shuffling, augmentation and (distillation) the student's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fine-pruning: share of the last block's channels removed.
    #[arg(long, default_value_t = 0.2)]
    pub prune_rate: f64,
    /// NAD's teacher and MCR's fine-tuned end point: epochs of fine-tuning (default: --epochs).
    #[arg(long)]
    pub teacher_epochs: Option<usize>,
    /// NAD: weight of the attention loss of the last block.
    #[arg(long, default_value_t = 1000.0)]
    pub nad_beta: f64,
    /// Distillation: temperature.
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Distillation: share of the loss on the model's softened answers.
    #[arg(long, default_value_t = 0.9)]
    pub soft_weight: f64,
    /// MCR: the point on the curve served (0: the model, 1: its fine-tuned copy).
    #[arg(long, default_value_t = 0.3)]
    pub curve_t: f64,
    /// ANP: bound of the adversarial neuron noise.
    #[arg(long, default_value_t = 0.4)]
    pub anp_eps: f64,
    /// ANP: weight of the clean loss in the masks' objective (the rest on the perturbed loss).
    #[arg(long, default_value_t = 0.2)]
    pub anp_alpha: f64,
    /// ANP: batches of mask optimisation (of --batch-size clean images).
    #[arg(long, default_value_t = 2000)]
    pub anp_iterations: usize,
    /// ANP: neurons whose mask ends below this are pruned.
    #[arg(long, default_value_t = 0.2)]
    pub anp_threshold: f64,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU threads for libtorch (its default when absent).
    #[arg(long)]
    pub threads: Option<i32>,
}

pub(super) fn repair_cmd(a: RepairArgs) -> Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let device = train::device(a.device)?;
    let model = LoadedModel::load(&a.model, device)
        .with_context(|| format!("cannot load the model in {}", a.model.display()))?;
    let clean = super::read_first(&a.clean_data, None, a.clean_split, a.clean_limit)?;
    let record = a.secret.as_deref().map(SecretRecord::load).transpose()?;
    let eval = match (&a.test_data, &record) {
        (Some(p), r) => Some(EvalSet::new(load_test(p, a.test_split)?, r.as_ref())?),
        (None, Some(_)) => bail!("--secret needs --test-data to measure the attack success rate"),
        (None, None) => None,
    };
    let cfg = RepairConfig {
        teacher_epochs: a.teacher_epochs.unwrap_or(a.epochs),
        prune_rate: a.prune_rate,
        nad_beta: a.nad_beta,
        temperature: a.temperature,
        soft_weight: a.soft_weight,
        curve_t: a.curve_t,
        anp: AnpConfig {
            eps: a.anp_eps,
            alpha: a.anp_alpha,
            iterations: a.anp_iterations,
            threshold: a.anp_threshold,
        },
        ..RepairConfig::new(
            a.defence,
            TrainConfig {
                arch: model.info.arch,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                momentum: a.momentum,
                weight_decay: a.weight_decay,
                schedule: a.schedule.schedule(&[], 0.1),
                crop_padding: a.crop_padding,
                flip: a.flip,
                seed: a.seed,
                warmup_epochs: 0,
                defence: Default::default(),
            },
        )
    };
    let before = eval.as_ref().map(|e| model.evaluate(e));
    if let Some(m) = &before {
        eprintln!("before: {}", describe(m));
    }
    let observer = super::BarObserver::default();
    let progress = |s: train::fit::Step| {
        use crate::train::calibrate::Observer;
        observer.progress(
            s.images as u64,
            s.of as u64,
            &format!("epoch {} loss {:.3}", s.epoch, s.loss),
        );
    };
    let (t, report) = repair(&model, &clean, &cfg, device, &progress)?;
    crate::train::calibrate::Observer::task_done(&observer);
    let after = eval
        .as_ref()
        .map(|e| crate::train::metrics::evaluate(&t.net, e, device));
    let mut info = model.info.clone();
    info.training = serde_json::json!({
        "repaired_from": model.info.training,
        "repair": report,
        "clean_samples": clean.len(),
        "clean_sha256": clean.sha256(),
    });
    save_model(&t, &info, &a.out)?;
    crate::fsutil::write_file_atomic(
        &a.out.join("repair.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "model": a.model,
            "report": report,
            "before": before,
            "after": after,
        }))?,
        0o644,
        true,
    )
    .with_context(|| format!("cannot write {}", a.out.join("repair.json").display()))?;
    if !report.pruned.is_empty() {
        eprintln!(
            "pruned {} of {} channels of the last block",
            report.pruned.len(),
            t.net.channels()
        );
    }
    if let Some(r) = &report.anp {
        eprintln!("ANP pruned {} of {} neurons", r.pruned, r.neurons);
    }
    if let Some((first, last)) = report.attention_loss {
        eprintln!("attention loss {first:.4} → {last:.4}");
    }
    if let Some(m) = &after {
        eprintln!("after:  {}", describe(m));
    }
    eprintln!(
        "{} repaired model written to {}",
        a.defence.name(),
        a.out.display()
    );
    Ok(())
}
