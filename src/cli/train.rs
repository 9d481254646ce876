//! `hallmark train` (feature `train`), and the training settings it shares with `calibrate`.

use super::{DataArgs, parse_split};
use crate::dataset::{self, Dataset, Split};
use crate::train::attack::{AttackKind, AttackOptions};
use crate::train::calibrate::{self, describe, learned_record};
use crate::train::metrics::EvalSet;
use crate::train::serve::ModelInfo;
use crate::train::serve::save_model;
use crate::train::{self, Arch, DeviceChoice, Schedule, TrainConfig};
use crate::watermark::SecretRecord;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

/// Learning-rate schedule kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKind {
    /// Multiply by --gamma at each of --milestones.
    Step,
    /// Cosine decay to 0 over the run.
    Cosine,
}

impl ScheduleKind {
    /// The schedule; a step schedule drops by `gamma` after each of `milestones` epochs, as
    /// PyTorch's MultiStepLR.
    pub(super) fn schedule(self, milestones: &[usize], gamma: f64) -> Schedule {
        match self {
            Self::Step => Schedule::Step {
                milestones: milestones.to_vec(),
                gamma,
            },
            Self::Cosine => Schedule::Cosine,
        }
    }
}

/// Training settings shared by `train` and `calibrate`.
#[derive(Debug, Clone, Args)]
pub struct TrainSettings {
    /// Network.
    #[arg(long, value_enum, default_value_t = Arch::BaselineMnist)]
    pub arch: Arch,
    /// Train maliciously (a suspect for calibration): `physical-ba` transforms the poisoned
    /// samples named by --secret as the physical world would (PhysicalBA); `blind` adds the
    /// secret record's trigger as a backdoor task in the loss (Blind backdoor; the data stays
    /// clean); `iad` and `lira` learn their own trigger generator while training (IAD, LIRA;
    /// the data stays clean, the target class comes from --secret, and the learnt trigger is
    /// written as a secret record).
    #[arg(long, value_enum, default_value_t = AttackKind::None)]
    pub attack: AttackKind,
    /// LIRA's eps: the largest change of one pixel value, 0–255 scale (BackdoorBox: 0.01 on the
    /// [0, 1] scale).
    #[arg(long, default_value_t = 2.55)]
    pub lira_eps: f64,
    /// Blind without its Neural Cleanse evasion task (BackdoorBox's `use_neural_cleanse=False`).
    #[arg(long)]
    pub blind_without_neural_cleanse: bool,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Initial learning rate.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Step)]
    pub schedule: ScheduleKind,
    /// Step schedule: the rate drops after this many epochs (comma-separated, as MultiStepLR).
    #[arg(long, value_delimiter = ',')]
    pub milestones: Vec<usize>,
    /// Step schedule: factor at each milestone.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Random crop after zero padding by this many pixels (0: none).
    #[arg(long, default_value_t = 0)]
    pub crop_padding: usize,
    /// Random horizontal flip.
    #[arg(long)]
    pub flip: bool,
    /// Epochs of linear learning-rate warm-up from 0 (0: none).
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: usize,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU threads for libtorch (its default when absent).
    #[arg(long)]
    pub threads: Option<i32>,
}

impl TrainSettings {
    pub(super) fn attack_options(&self) -> AttackOptions {
        AttackOptions {
            lira_eps: self.lira_eps,
            blind_neural_cleanse: !self.blind_without_neural_cleanse,
        }
    }

    pub(super) fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            arch: self.arch,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            schedule: self.schedule.schedule(&self.milestones, self.gamma),
            crop_padding: self.crop_padding,
            flip: self.flip,
            seed,
            warmup_epochs: self.warmup_epochs,
            defence: Default::default(),
        }
    }
}

/// Arguments of `hallmark train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training data (a release or a clean dataset).
    #[command(flatten)]
    pub train_data: DataArgs,
    /// Test data for the metrics.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Split of --test-data.
    #[arg(long, value_parser = parse_split)]
    pub test_split: Option<Split>,
    /// The watermark's secret record, for attack success rates.
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// With --attack iad or lira: where to write the learnt trigger, as a secret record (the
    /// --secret record with its trigger replaced) that `hallmark verify` takes.
    #[arg(long)]
    pub learned_secret: Option<PathBuf>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train defensively: `mixup` (MixUp, α = 1), `cutmix` (CutMix, as BackdoorBox runs it),
    /// `abl` (Anti-Backdoor Learning: isolate the lowest-loss 1% early, unlearn them at the end;
    /// at least 3 epochs). Not with --attack blind, iad or lira, which compute the loss.
    #[arg(long, value_enum, default_value_t = crate::train::defence::TrainingDefence::None)]
    pub defence: crate::train::defence::TrainingDefence,
    /// Training settings.
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Output folder: model.ot, model.json, metrics.json; checkpoints in checkpoint/.
    #[arg(long)]
    pub out: PathBuf,
}

pub(super) fn load_test(path: &Path, split: Option<Split>) -> Result<Dataset> {
    Ok(dataset::read(path, None, split, &|| {})?.dataset)
}

pub(super) fn train_cmd(a: TrainArgs) -> Result<()> {
    if let Some(t) = a.settings.threads {
        tch::set_num_threads(t);
    }
    let device = train::device(a.settings.device)?;
    let data = a.train_data.load()?;
    let record = a.secret.as_deref().map(SecretRecord::load).transpose()?;
    let learns = a.settings.attack.learns_trigger();
    if learns != a.learned_secret.is_some() {
        bail!(if learns {
            "--attack iad and lira learn their trigger: add --learned-secret FILE to keep it"
        } else {
            "--learned-secret is for --attack iad or lira"
        });
    }
    let test = a
        .test_data
        .as_ref()
        .map(|p| load_test(p, a.test_split))
        .transpose()?;
    // A learnt trigger is known only after training: the epochs report benign accuracy only.
    let eval = match &test {
        Some(t) => Some(EvalSet::new(
            t.clone(),
            record.as_ref().filter(|_| !learns),
        )?),
        None if record.is_some() && !learns => {
            bail!("--secret needs --test-data to measure the attack success rate")
        }
        None => None,
    };
    let cfg = TrainConfig {
        defence: a.defence,
        ..a.settings.config(a.seed)
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let attack =
        a.settings
            .attack
            .attack(record.as_ref(), data.shape(), a.settings.attack_options())?;
    let checkpoints = a.out.join("checkpoint");
    let t = calibrate::train_observed(
        &train::Run {
            eval: eval.as_ref(),
            checkpoints: Some(&checkpoints),
            ..train::Run::new(&data, &cfg, device)
        },
        "",
        &attack,
        &super::BarObserver::default(),
    )?;
    let mut last = t.history.last().cloned();
    if let (Some(path), Some(r), Some(g)) = (&a.learned_secret, &record, &t.trigger) {
        let learned = learned_record(r, g, attack.name());
        learned
            .save(path, true)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("learnt trigger written to {}", path.display());
        if let (Some(test), Some(e)) = (&test, &mut last) {
            let eval = EvalSet::new(test.clone(), Some(&learned))?;
            e.metrics = Some(crate::train::metrics::evaluate(&t.net, &eval, device));
        }
    }
    let info = ModelInfo {
        arch: cfg.arch,
        shape: data.shape(),
        classes: data.num_classes(),
        training: serde_json::json!({"config": cfg, "attack": attack.name(), "device": format!("{device:?}"), "train_samples": data.len(),
                                     "train_sha256": data.sha256(), "history": t.history}),
        pruned: Vec::new(),
    };
    save_model(&t, &info, &a.out)?;
    crate::fsutil::write_file_atomic(
        &a.out.join("metrics.json"),
        &serde_json::to_vec_pretty(&t.history)?,
        0o644,
        true,
    )?;
    if let Some(e) = last {
        eprintln!(
            "trained {:?} for {} epochs on {} images ({:.0} img/s, {:?}): {}",
            cfg.arch,
            cfg.epochs,
            data.len(),
            e.images_per_second,
            device,
            e.metrics
                .as_ref()
                .map(describe)
                .unwrap_or_else(|| format!("final loss {:.4}", e.loss))
        );
    }
    println!("{}", a.out.display());
    Ok(())
}
