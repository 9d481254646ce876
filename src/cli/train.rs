//! The trainer's commands (feature `train`): `train`, `serve-model`, `calibrate`.

use super::{DataArgs, bar, parse_split};
use crate::dataset::{self, Dataset, Split};
use crate::train::metrics::{EvalSet, Metrics};
use crate::train::serve::{LoadedModel, ModelInfo, ModelServer};
use crate::train::{self, Arch, DeviceChoice, Schedule, TrainConfig};
use crate::watermark::SecretRecord;
use anyhow::{Context, Result, anyhow, bail};
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

/// A malicious training procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttackKind {
    /// Plain training.
    None,
    /// PhysicalBA's physical-world transformations of the poisoned training images.
    PhysicalBa,
    /// Blind backdoor: the trigger of a secret record added in the loss.
    Blind,
    /// IAD: an input-aware trigger generator and mask learnt with the classifier.
    Iad,
    /// LIRA: an additive trigger function learnt with the classifier.
    Lira,
}

impl AttackKind {
    /// Whether the attack learns its own trigger while training (the data stays clean).
    pub fn learns_trigger(self) -> bool {
        matches!(self, Self::Iad | Self::Lira)
    }
}

/// The training procedure for `kind`, with the trigger of `record` for Blind.
fn attack_for(
    kind: AttackKind,
    record: Option<&SecretRecord>,
    shape: dataset::ImageShape,
    settings: &TrainSettings,
) -> Result<train::Attack> {
    let target = |name: &str| -> Result<u32> {
        let Some(r) = record else {
            bail!("--attack {name} takes its target class from a secret record: add --secret FILE");
        };
        r.spec.labelling.target().with_context(|| {
            format!("--attack {name} needs a targeted watermark (the record's spec has no target)")
        })
    };
    Ok(match kind {
        AttackKind::None => train::Attack::None,
        AttackKind::PhysicalBa => {
            let Some(r) = record else {
                bail!(
                    "--attack physical-ba transforms the poisoned samples: add --secret FILE \
                     (the release's secret record)"
                );
            };
            let mut poisoned = vec![false; r.dataset.count];
            for p in &r.poisoned {
                poisoned[p.index] = true;
            }
            train::Attack::PhysicalBa { poisoned }
        }
        AttackKind::Blind => {
            let Some(r) = record else {
                bail!("--attack blind takes its trigger from a secret record: add --secret FILE");
            };
            let Some(target) = r.spec.labelling.target() else {
                bail!(
                    "--attack blind needs a targeted watermark (the record's spec has no target)"
                );
            };
            train::Attack::Blind {
                stamp: crate::watermark::Stamp::new(&r.spec.trigger, r.spec.seed, shape)?,
                target,
                neural_cleanse: !settings.blind_without_neural_cleanse,
            }
        }
        AttackKind::Iad => train::Attack::Iad {
            target: target("iad")?,
            settings: Default::default(),
        },
        AttackKind::Lira => train::Attack::Lira {
            target: target("lira")?,
            settings: train::attack::LiraSettings {
                eps: settings.lira_eps,
                ..Default::default()
            },
        },
    })
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
    fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            arch: self.arch,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            schedule: match self.schedule {
                // A milestone m lowers the rate after m epochs, as PyTorch's MultiStepLR.
                ScheduleKind::Step => Schedule::Step {
                    milestones: self.milestones.clone(),
                    gamma: self.gamma,
                },
                ScheduleKind::Cosine => Schedule::Cosine,
            },
            crop_padding: self.crop_padding,
            flip: self.flip,
            seed,
            warmup_epochs: self.warmup_epochs,
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
    /// Training settings.
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Output folder: model.ot, model.json, metrics.json; checkpoints in checkpoint/.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `hallmark serve-model`.
#[derive(Debug, Args)]
pub struct ServeModelArgs {
    /// Folder written by `hallmark train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub bind: String,
    /// Model name in URLs (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

fn load_test(path: &Path, split: Option<Split>) -> Result<Dataset> {
    Ok(dataset::read(path, None, split, &|| {})?.dataset)
}

fn describe(m: &Metrics) -> String {
    let mut s = format!("benign accuracy {:.4}", m.benign_accuracy);
    if let Some(a) = m.asr {
        s.push_str(&format!(", ASR {a:.4} (target-class images excluded)"));
    }
    if let (Some(a), Some(c), Some(d)) = (m.asr_a, m.asr_c, m.dispersibility) {
        s.push_str(&format!(", ASR-A {a:.4}, ASR-C {c:.4}, D_p {d:.4}"));
    }
    s
}

/// Trains with a progress bar; returns the trained network.
pub(super) fn train_with_progress(
    data: &Dataset,
    cfg: &TrainConfig,
    device: tch::Device,
    eval: Option<&EvalSet>,
    checkpoints: Option<&Path>,
    label: &str,
    attack: &train::Attack,
) -> Result<train::Trained> {
    let pb = bar((cfg.epochs * data.len()) as u64, "training");
    let step = |s: train::fit::Step| {
        pb.set_position(((s.epoch - 1) * s.of + s.images) as u64);
        pb.set_message(format!(
            "{label} epoch {}/{} loss {:.4} {:.0} img/s",
            s.epoch, cfg.epochs, s.loss, s.rate
        ));
    };
    let t = train::train_attacked(
        &train::Run {
            eval,
            checkpoints,
            progress: &step,
            ..train::Run::new(data, cfg, device)
        },
        attack,
    );
    pb.finish_and_clear();
    Ok(t?)
}

/// Crafting progress (step, of, loss) shown on `pb` as "`what`, loss …".
fn bar_progress<'a>(
    pb: &'a indicatif::ProgressBar,
    what: &'a str,
) -> impl Fn(usize, usize, f64) + 'a {
    move |step, of, loss| {
        pb.set_length(of as u64);
        pb.set_position(step as u64);
        pb.set_message(format!("{what}, loss {loss:.4}"));
    }
}

/// Saves a trained model as model.ot + model.json in `dir`.
pub(super) fn save_model(t: &train::Trained, info: &ModelInfo, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("model.ot.partial");
    t.vs.save(&tmp)?;
    std::fs::rename(&tmp, dir.join("model.ot"))?;
    crate::fsutil::write_file_atomic(
        &dir.join("model.json"),
        &serde_json::to_vec_pretty(info)?,
        0o644,
        true,
    )?;
    Ok(())
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
    let cfg = a.settings.config(a.seed);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let attack = attack_for(
        a.settings.attack,
        record.as_ref(),
        data.shape(),
        &a.settings,
    )?;
    let t = train_with_progress(
        &data,
        &cfg,
        device,
        eval.as_ref(),
        Some(&a.out.join("checkpoint")),
        "",
        &attack,
    )?;
    let mut last = t.history.last().cloned();
    if let (Some(path), Some(r), Some(g)) = (&a.learned_secret, &record, &t.trigger) {
        let learned = learned_record(r, g, &attack);
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

/// The attacker's record of a learnt trigger: `base` (its target, seed and dataset) with the
/// trigger replaced.
fn learned_record(
    base: &SecretRecord,
    g: &crate::spec::Generated,
    attack: &train::Attack,
) -> SecretRecord {
    let mut r = base.clone();
    // A learnt trigger is drawn from no family: its verdicts have no exchangeable controls.
    r.family = None;
    r.spec.trigger = crate::spec::Trigger::Generated(g.clone());
    r.spec.name = format!("{}@{}", base.spec.name, attack.name());
    r.spec.description = Some(format!(
        "the trigger learnt by --attack {} while training",
        attack.name()
    ));
    r
}

pub(super) fn serve_model_cmd(a: ServeModelArgs) -> Result<()> {
    let device = train::device(a.device)?;
    let model = LoadedModel::load(&a.model, device)?;
    let name = a.name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = ModelServer::bind(&a.bind, &name, model)
            .await
            .with_context(|| format!("cannot listen on {}", a.bind))?;
        eprintln!(
            "serving {name} over the V2 protocol on http://{}:{} (Ctrl-C stops)",
            a.bind.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h),
            server.port()
        );
        server
            .run_until_stopped(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

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
}

fn serve_and_verify(
    rt: &tokio::runtime::Runtime,
    model: LoadedModel,
    record: &SecretRecord,
    test: &Dataset,
    cfg: &crate::verify::VerifyConfig,
) -> Result<crate::verify::Verdict> {
    use crate::endpoint::{EndpointConfig, HttpEndpoint, Protocol};
    rt.block_on(async {
        let server = ModelServer::bind("127.0.0.1:0", "model", model).await?;
        let port = server.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let mut ep = EndpointConfig::new(format!("http://127.0.0.1:{port}"), Protocol::V2, "model");
        ep.allow_private = true;
        if cfg.label_only {
            ep.output = crate::endpoint::OutputKind::Labels;
        }
        let verdict = async {
            let endpoint = HttpEndpoint::connect(ep, cfg.seed.unwrap_or(0)).await?;
            anyhow::Ok(crate::verify::verify(&endpoint, record, test, cfg, &|_| {}).await?)
        }
        .await;
        let _ = stop.send(());
        handle.await??;
        verdict
    })
}

pub(super) fn calibrate_cmd(a: CalibrateArgs) -> Result<()> {
    use crate::train::calibrate::{Calibration, ModelKind, Row};
    use crate::watermark;
    if let Some(t) = a.settings.threads {
        tch::set_num_threads(t);
    }
    let device = train::device(a.settings.device)?;
    let spec = crate::spec::WatermarkSpec::from_toml_file(&a.spec)?;
    let clean = a.train_data.load()?;
    let test = load_test(&a.test_data, a.test_split)?;
    std::fs::create_dir_all(a.out.join("secrets"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let vcfg = crate::verify::VerifySettings {
        m: Some(a.m),
        tau: Some(a.tau),
        alpha: Some(a.alpha),
        label_only: a.label_only,
        sequential: a.sequential,
        ..Default::default()
    }
    .into_config()
    .map_err(|e| anyhow::anyhow!("{}: {}", e.flag(), e.message))?;
    let info = |cfg: &TrainConfig| ModelInfo {
        arch: cfg.arch,
        shape: clean.shape(),
        classes: clean.num_classes(),
        training: serde_json::json!({ "config": cfg }),
    };
    let mut settings = serde_json::json!({"train": a.settings.config(a.seed), "attack": format!("{:?}", a.settings.attack), "models": a.models, "verify": vcfg,
                                          "train_samples": clean.len(), "test_samples": test.len(), "device": format!("{device:?}")});
    match a.settings.attack {
        AttackKind::Blind => {
            settings["blind_neural_cleanse"] = (!a.settings.blind_without_neural_cleanse).into();
        }
        AttackKind::Lira => settings["lira_eps"] = a.settings.lira_eps.into(),
        _ => {}
    }
    let other_family = match &a.other_family {
        Some(path) => {
            let s = crate::spec::WatermarkSpec::from_toml_file(path)
                .with_context(|| format!("--other-family {}", path.display()))?;
            if s.crafting().is_some() {
                bail!(
                    "--other-family {}: a crafted or encoded spec; give a poison-only one",
                    path.display()
                );
            }
            settings["other_family"] = s.name.clone().into();
            Some(s)
        }
        None => None,
    };
    let json_path = a.out.join("calibration.json");
    let mut cal = Calibration {
        spec: spec.name.clone(),
        settings: settings.clone(),
        rows: Vec::new(),
    };
    if a.resume
        && let Some(old) = Calibration::resumable(&json_path, &spec.name, &settings)
            .map_err(|e| anyhow!("cannot resume: {e}; use another --out or leave out --resume"))?
    {
        cal.rows = old
            .rows
            .iter()
            .filter(|r| r.index < a.models && old.has_index(r.index))
            .cloned()
            .collect();
        eprintln!(
            "resuming: {} models of {} kept from {}",
            cal.rows.len(),
            (3 + usize::from(other_family.is_some())) * a.models,
            json_path.display()
        );
    }
    // Label-consistent and gradient-matching specs are crafted against a benign model trained
    // first on the clean data (unless a resumed run has nothing left to craft).
    let benign_cfg = a.settings.config(a.seed + 900);
    let benign = if spec.needs_model() && (0..a.models).any(|i| !cal.has_index(i)) {
        Some(train_with_progress(
            &clean,
            &benign_cfg,
            device,
            None,
            None,
            "benign model for crafting",
            &train::Attack::None,
        )?)
    } else {
        None
    };
    // Each release's nonce (hence its secret trigger) derives from the calibration's seed, so a
    // calibration is reproducible; the records are kept under secrets/.
    let nonce = |i: usize, which: &str| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(format!("calibrate/{}/{which}/{i}", a.seed)).into()
    };
    let mark = |ds: &mut crate::dataset::Dataset,
                s: &crate::spec::WatermarkSpec,
                nonce: [u8; 32]|
     -> Result<crate::watermark::SecretRecord> {
        if s.encoder.is_some() {
            let pb = bar(0, "training the encoder");
            let marked = crate::train::craft::issba::issba(
                ds,
                s,
                nonce,
                device,
                &bar_progress(&pb, "ISSBA encoder"),
            );
            pb.finish_and_clear();
            let (marked, report) = marked?;
            eprintln!("{report}");
            return Ok(marked.record);
        }
        Ok(match &benign {
            Some(b) => {
                let surrogate = crate::train::craft::Surrogate {
                    net: &b.net,
                    vs: &b.vs,
                    retrain: Some(benign_cfg.clone()),
                };
                let pb = bar(0, "crafting");
                let marked = crate::train::craft::craft(
                    ds,
                    s,
                    nonce,
                    &surrogate,
                    device,
                    &bar_progress(&pb, "crafting poisons"),
                );
                pb.finish_and_clear();
                marked?.record
            }
            None => watermark::apply(ds, s, nonce)?,
        })
    };
    // Rows in (index, kind) order; a resumed run may fill an index that lies before kept ones.
    let save = |cal: &mut Calibration| -> Result<String> {
        cal.rows.sort_by_key(|r| (r.index, r.kind as u8));
        crate::fsutil::write_file_atomic(
            &json_path,
            &serde_json::to_vec_pretty(&cal)?,
            0o644,
            true,
        )?;
        let md = cal.markdown();
        crate::fsutil::write_file_atomic(
            &a.out.join("calibration.md"),
            md.as_bytes(),
            0o644,
            true,
        )?;
        cal.plot_png(a.alpha, a.tau)
            .save(a.out.join("calibration.png"))?;
        Ok(md)
    };
    let clean_cache = a
        .clean_cache
        .as_deref()
        .map(|dir| CleanCache::new(dir, &clean, device))
        .transpose()?;
    for i in 0..a.models {
        if cal.has_index(i) {
            continue;
        }
        let mut wspec = spec.clone();
        wspec.seed = spec.seed.wrapping_add(i as u64);
        let mut marked = clean.clone();
        let mut record = mark(&mut marked, &wspec, nonce(i, "watermarked"))?;
        record.save(
            &a.out.join(format!("secrets/watermarked-{i}.secret.json")),
            true,
        )?;
        let mut eval = EvalSet::new(test.clone(), Some(&record))?;
        // Another release: of the same family, a member of its own; of a fixed spec, a random
        // trigger of the same kind.
        let mut other_spec = wspec.clone();
        other_spec.seed = spec.seed.wrapping_add(1000 + i as u64);
        if spec.family.is_none() {
            other_spec.trigger =
                crate::verify::random_trigger(&spec.trigger, clean.shape(), 7000 + i as u64)?;
        }
        let mut other = clean.clone();
        let other_record = mark(&mut other, &other_spec, nonce(i, "other"))?;
        // A release of another family, trained plainly (poison only).
        let family_data = match &other_family {
            Some(s) => {
                let mut s = s.clone();
                s.seed = s.seed.wrapping_add(2000 + i as u64);
                let mut data = clean.clone();
                mark(&mut data, &s, nonce(i, "other-family"))?;
                Some(data)
            }
            None => None,
        };
        // Blind injects the backdoor while training on the clean data; PhysicalBA transforms the
        // poisoned samples of the release it trains on. The clean model trains plainly.
        // IAD and LIRA, too, train on the clean data and learn their own trigger.
        let blind = a.settings.attack == AttackKind::Blind || a.settings.attack.learns_trigger();
        let (marked_data, other_data) = if blind {
            (&clean, &clean)
        } else {
            (&marked, &other)
        };
        let mut runs = vec![
            (
                ModelKind::Watermarked,
                marked_data,
                a.seed + i as u64,
                attack_for(a.settings.attack, Some(&record), clean.shape(), &a.settings)?,
            ),
            (
                ModelKind::Clean,
                &clean,
                a.seed + 100 + i as u64,
                train::Attack::None,
            ),
            (
                ModelKind::OtherTrigger,
                other_data,
                a.seed + 200 + i as u64,
                attack_for(
                    a.settings.attack,
                    Some(&other_record),
                    clean.shape(),
                    &a.settings,
                )?,
            ),
        ];
        if let Some(data) = &family_data {
            runs.push((
                ModelKind::OtherFamily,
                data,
                a.seed + 300 + i as u64,
                train::Attack::None,
            ));
        }
        for (kind, data, seed, attack) in runs {
            let cfg = a.settings.config(seed);
            let label = format!("{kind:?} #{i}");
            let cached = match &clean_cache {
                Some(c) if kind == ModelKind::Clean => Some(c.dir(&cfg)?),
                _ => None,
            };
            let model = match &cached {
                Some(dir) if dir.join("model.json").exists() => {
                    eprintln!("{label}: loaded from {}", dir.display());
                    LoadedModel::load(dir, device)?
                }
                _ => {
                    let t = train_with_progress(data, &cfg, device, None, None, &label, &attack)?;
                    // The watermarked model's learnt trigger is the secret every model is
                    // verified with.
                    if kind == ModelKind::Watermarked
                        && let Some(g) = &t.trigger
                    {
                        record = learned_record(&record, g, &attack);
                        record.save(
                            &a.out.join(format!("secrets/watermarked-{i}.secret.json")),
                            true,
                        )?;
                        eval = EvalSet::new(test.clone(), Some(&record))?;
                    }
                    if let Some(dir) = &cached {
                        save_model(&t, &info(&cfg), dir)?;
                    }
                    LoadedModel::from_trained(t, info(&cfg), device)
                }
            };
            let metrics = model.evaluate(&eval);
            let verdict = serve_and_verify(&rt, model, &record, &test, &vcfg)?;
            let row = Row::new(kind, i, seed, metrics, &verdict);
            eprintln!(
                "{label}: {} → {:?} (p = {:.2e}, effect {:.4}, {} queries)",
                describe(&row.metrics),
                row.decision,
                row.p_value,
                row.effect,
                row.queries
            );
            cal.rows.push(row);
        }
        save(&mut cal)?;
    }
    let md = save(&mut cal)?;
    println!("{md}");
    Ok(())
}

/// Clean models kept between calibrations (`--clean-cache`). A clean model depends only on the
/// training settings, the seed, the data, the device and the trainer's code, so each is stored
/// under a hash of all of them: the executable's own sha256 stands for the code, and a rebuilt
/// hallmark trains afresh.
struct CleanCache {
    dir: PathBuf,
    /// sha256 over the executable, the device and the data (shape, pixels, labels in order).
    base: [u8; 32],
}

impl CleanCache {
    fn new(dir: &Path, data: &Dataset, device: tch::Device) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let exe = std::env::current_exe().context("locating the hallmark executable")?;
        let code = Sha256::digest(
            std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?,
        );
        let mut h = Sha256::new();
        h.update(b"hallmark-clean-model-v1");
        h.update(code);
        h.update(format!("{device:?}").as_bytes());
        let s = data.shape();
        for v in [s.height, s.width, s.channels, data.len()] {
            h.update((v as u64).to_le_bytes());
        }
        h.update(data.pixels());
        for l in data.labels() {
            h.update(l.to_le_bytes());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            base: h.finalize().into(),
        })
    }

    /// The folder of the clean model trained with `cfg` (it may not exist yet).
    fn dir(&self, cfg: &TrainConfig) -> Result<PathBuf> {
        use sha2::{Digest, Sha256};
        let key = Sha256::new()
            .chain_update(self.base)
            .chain_update(serde_json::to_vec(cfg)?)
            .finalize();
        Ok(self.dir.join(&hex::encode(key)[..24]))
    }
}
