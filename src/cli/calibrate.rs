//! `hallmark calibrate` (feature `train`): parses its arguments into a
//! [`crate::train::calibrate::Plan`], shows progress, prints the table.

use super::train::{TrainSettings, load_test};
use super::{DataArgs, parse_split};
use crate::dataset::Split;
use crate::train::{self, calibrate};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `hallmark calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The watermark spec to calibrate.
    #[arg(long)]
    pub spec: PathBuf,
    /// Clean training data.
    #[command(flatten)]
    pub train_data: DataArgs,
    /// Held-out data: metrics and verification queries.
    #[arg(long)]
    pub test_data: PathBuf,
    /// Split of --test-data.
    #[arg(long, value_parser = parse_split)]
    pub test_split: Option<Split>,
    /// Watermarked models, and independent models of each kind.
    #[arg(long, default_value_t = 3)]
    pub models: usize,
    /// Train and verify only watermarked indices N to --models − 1 (and their independent
    /// models): one share of a calibration split over machines. Each index's seeds and secrets
    /// depend only on --seed and the index, so a share trains what a whole run would; shares
    /// run into one --out with --resume add up to it.
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Base seed of training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training settings.
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Verification pairs (the cap in sequential mode).
    #[arg(long, default_value_t = 100)]
    pub m: usize,
    /// Margin.
    #[arg(long, default_value_t = 0.2)]
    pub tau: f64,
    /// Significance level.
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Use the sequential test.
    #[arg(long)]
    pub sequential: bool,
    /// Use predicted labels only.
    #[arg(long)]
    pub label_only: bool,
    /// Output folder: calibration.json, calibration.md, calibration.png, secrets/.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep the models of an earlier run into --out (same spec and settings; --models may be
    /// larger) and train only the missing ones. Results are saved after each watermarked index.
    #[arg(long)]
    pub resume: bool,
    /// A folder where clean models are kept and shared between calibrations: a clean model of
    /// the same training settings, seed, data and hallmark executable is loaded, not retrained.
    #[arg(long)]
    pub clean_cache: Option<PathBuf>,
    /// Also train, for each index, a model on a release of this other spec (a family whose
    /// trigger sits at the same place, say), verified with the calibrated secret: a real
    /// backdoor that is not this release's, which must not be accused.
    #[arg(long)]
    pub other_family: Option<PathBuf>,
    /// Stamp every release with one more secret trigger of this other family spec too
    /// (repeatable; `hallmark watermark --also-spec`): every model is verified with each of
    /// its release's k triggers at alpha / k and accused when any is `used` (Bonferroni).
    #[arg(long)]
    pub also_spec: Vec<PathBuf>,
    /// Robustness: put every model through each of these defences (comma-separated) and verify
    /// it again: fine-tuning, fine-pruning, nad, mcr, distillation, anp (repairs, see `hallmark
    /// repair`), gate-strip, gate-median, gate-scale-up, gate-ibd-psc (gates that refuse
    /// flagged queries), gate-shrinkpad, gate-jpeg (gates that change every query), which need
    /// --defence-data; mixup, cutmix, abl (the model trained again with the training-time
    /// defence, see `hallmark train --defence`).
    #[arg(long, value_delimiter = ',')]
    pub defence: Vec<calibrate::Countermeasure>,
    /// The thief's clean data for --defence (BackdoorBench's defender: 5% of the training set),
    /// apart from the training and test data.
    #[arg(long)]
    pub defence_data: Option<PathBuf>,
    /// Split of --defence-data.
    #[arg(long, value_parser = parse_split)]
    pub defence_split: Option<Split>,
    /// Keep only the first N images of --defence-data.
    #[arg(long)]
    pub defence_limit: Option<usize>,
    /// Epochs of each repair (at learning rate 0.01, cosine, with the models' augmentation).
    #[arg(long, default_value_t = 10)]
    pub defence_epochs: usize,
    /// Fine-pruning: share of the last block's channels removed.
    #[arg(long, default_value_t = 0.2)]
    pub prune_rate: f64,
    /// ANP: batches of mask optimisation (the paper's 2,000; fewer for a network that is slow to
    /// run on this machine).
    #[arg(long, default_value_t = 2000)]
    pub anp_iterations: usize,
    /// Gates: share of clean images flagged.
    #[arg(long, default_value_t = 0.05)]
    pub false_flag_rate: f64,
}

fn defences(a: &CalibrateArgs) -> Result<Option<calibrate::DefencePlan>> {
    if a.defence.is_empty() {
        return Ok(None);
    }
    let needs_data = a
        .defence
        .iter()
        .any(|c| !matches!(c, calibrate::Countermeasure::Training(_)));
    let clean = match &a.defence_data {
        None if needs_data => {
            bail!("--defence with repairs or gates needs --defence-data (the thief's clean images)")
        }
        None => None,
        Some(path) => Some(
            super::read_first(path, None, a.defence_split, a.defence_limit)
                .with_context(|| format!("--defence-data {}", path.display()))?,
        ),
    };
    let train = crate::train::TrainConfig {
        epochs: a.defence_epochs,
        lr: 0.01,
        schedule: crate::train::Schedule::Cosine,
        warmup_epochs: 0,
        ..a.settings.config(a.seed)
    };
    Ok(Some(calibrate::DefencePlan {
        list: a.defence.clone(),
        clean,
        repair: crate::train::repair::RepairConfig {
            prune_rate: a.prune_rate,
            anp: crate::train::repair::anp::AnpConfig {
                iterations: a.anp_iterations,
                ..Default::default()
            },
            ..crate::train::repair::RepairConfig::new(
                crate::train::repair::Defence::FineTuning,
                train,
            )
        },
        false_flag_rate: a.false_flag_rate,
    }))
}

pub(super) fn calibrate_cmd(a: CalibrateArgs) -> Result<()> {
    if let Some(t) = a.settings.threads {
        tch::set_num_threads(t);
    }
    let verify = crate::verify::VerifySettings {
        m: Some(a.m),
        tau: Some(a.tau),
        alpha: Some(a.alpha),
        label_only: a.label_only,
        sequential: a.sequential,
        ..Default::default()
    }
    .into_config()
    .map_err(|e| anyhow!("{}: {}", e.flag(), e.message))?;
    let other_family = a
        .other_family
        .as_deref()
        .map(|path| {
            crate::spec::WatermarkSpec::from_toml_file(path)
                .with_context(|| format!("--other-family {}", path.display()))
        })
        .transpose()?;
    let plan = calibrate::Plan {
        spec: crate::spec::WatermarkSpec::from_toml_file(&a.spec)?,
        clean: a.train_data.load()?,
        test: load_test(&a.test_data, a.test_split)?,
        models: a.models,
        first_index: a.first_index,
        seed: a.seed,
        train: a.settings.config(a.seed),
        attack: a.settings.attack,
        attack_options: a.settings.attack_options(),
        verify,
        device: train::device(a.settings.device)?,
        out: a.out.clone(),
        resume: a.resume,
        clean_cache: a.clean_cache.clone(),
        other_family,
        defences: defences(&a)?,
        also_specs: a
            .also_spec
            .iter()
            .map(|path| {
                crate::spec::WatermarkSpec::from_toml_file(path)
                    .with_context(|| format!("--also-spec {}", path.display()))
            })
            .collect::<Result<_>>()?,
    };
    let observer = super::BarObserver::default();
    let cal = calibrate::run(&plan, &observer)?;
    println!("{}", cal.markdown());
    Ok(())
}
