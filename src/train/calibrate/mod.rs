//! Calibration: how often a watermark kind is detected, and how rarely an innocent model is
//! accused. For one spec and dataset, N watermarked models (the spec re-seeded per model) and N
//! independent models of each kind (trained on the clean data; trained on data watermarked with a
//! different secret trigger of the same kind; optionally trained on a release of another family)
//! are trained, served over HTTP, and verified with the watermarked models' secrets, through the
//! same path as `hallmark verify`.
//!
//! [`run`] does the work; the CLI only parses its arguments and shows what an [`Observer`] is
//! told. Results are saved after every watermarked index, so an interrupted run resumes.

mod cache;
mod table;

pub use cache::CleanCache;
pub use table::{Calibration, DefenceSummary, ModelKind, Row};

use super::attack::{AttackKind, AttackOptions};
use super::craft::{Crafter, Surrogate};
use super::defence::TrainingDefence;
use super::gate::{Gate, GateKind, OnFlag};
use super::metrics::{EvalSet, Metrics};
use super::repair::{Defence, RepairConfig};
use super::serve::{LoadedModel, ModelInfo, ModelServer, save_model};
use super::{TrainConfig, TrainError, Trained};
use crate::dataset::Dataset;
use crate::spec::WatermarkSpec;
use crate::verify::{Verdict, VerifyConfig};
use crate::watermark::{self, SecretRecord, WatermarkError};
use std::path::{Path, PathBuf};
use tch::Device;

/// The seed protocol. Every model's training seed and every release's spec seed derive from the
/// calibration's base seed and the watermarked index `i` by these offsets, and every release's
/// nonce from `sha256("calibrate/{seed}/{which}/{i}")`: a calibration is reproducible, and a
/// resumed one trains the same models.
pub mod seeds {
    /// Training seed of watermarked model `i`: base + `i`.
    pub const WATERMARKED: u64 = 0;
    /// Training seed of clean model `i`: base + 100 + `i`.
    pub const CLEAN: u64 = 100;
    /// Training seed of the model trained on another trigger's release: base + 200 + `i`.
    pub const OTHER_TRIGGER: u64 = 200;
    /// Training seed of the model trained on another family's release: base + 300 + `i`.
    pub const OTHER_FAMILY: u64 = 300;
    /// Training seed of the benign model that crafted specs are crafted against: base + 900.
    pub const BENIGN: u64 = 900;
    /// Spec seed of the other trigger's release: the spec's own + 1000 + `i` (watermarked
    /// release `i` takes the spec's own + `i`).
    pub const OTHER_RELEASE: u64 = 1000;
    /// Spec seed of the other family's release: that spec's own + 2000 + `i`.
    pub const OTHER_FAMILY_RELEASE: u64 = 2000;
    /// Seed of the random trigger of the same kind that stands for another release of a spec
    /// without a family: 7000 + `i`.
    pub const RANDOM_TRIGGER: u64 = 7000;
}

/// What to calibrate, and how.
pub struct Plan {
    /// The watermark spec.
    pub spec: WatermarkSpec,
    /// Clean training data.
    pub clean: Dataset,
    /// Held-out data: metrics and verification queries.
    pub test: Dataset,
    /// Watermarked models, and independent models of each kind.
    pub models: usize,
    /// Train and verify only indices `first_index..models`: one share of a calibration split
    /// over machines or sessions. Every index's seeds and secrets depend only on the base seed
    /// and the index ([`seeds`]), so a share trains the models one whole run would, and shares
    /// run into one output folder with `resume` add up to it.
    pub first_index: usize,
    /// Base seed (see [`seeds`]).
    pub seed: u64,
    /// Training settings (their seed is replaced per model).
    pub train: TrainConfig,
    /// The suspects' training procedure.
    pub attack: AttackKind,
    /// Its settings.
    pub attack_options: AttackOptions,
    /// Verification settings.
    pub verify: VerifyConfig,
    /// Device.
    pub device: Device,
    /// Output folder: calibration.json, calibration.md, calibration.png, secrets/.
    pub out: PathBuf,
    /// Keep the models of an earlier run into `out` and train only the missing ones.
    pub resume: bool,
    /// Where clean models are kept and shared between calibrations.
    pub clean_cache: Option<PathBuf>,
    /// Also train, for each index, a model on a release of this other (poison-only) spec,
    /// verified with the calibrated secret.
    pub other_family: Option<WatermarkSpec>,
    /// Put every model through each of these defences and verify it again.
    pub defences: Option<DefencePlan>,
    /// Stamp every release (the watermarked one and the other release) with one more trigger of
    /// each of these family specs too, on samples of its own
    /// ([`watermark::apply_trigger_specs`]); every model is then verified with each of its
    /// release's k triggers at alpha / k and accused when any is `used` ([`Row::combine`]).
    pub also_specs: Vec<WatermarkSpec>,
}

/// A thief's countermeasure every calibrated model goes through (one at a time), then verified
/// again: a repair of the model, a gate in front of it, or a training-time defence (the model
/// trained again, on the same data with the same seed, with the defence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Countermeasure {
    /// The model repaired (see [`super::repair`]).
    Repair(Defence),
    /// The model served behind a gate that refuses flagged queries (see [`super::gate`]).
    Gate(GateKind),
    /// The model trained with a training-time defence (see [`super::defence`]).
    Training(TrainingDefence),
}

impl Countermeasure {
    /// Its name, as `--defence` takes it.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        match self {
            Self::Repair(d) => d.name().to_string(),
            Self::Training(d) => d
                .to_possible_value()
                .map_or("?".into(), |v| v.get_name().to_string()),
            Self::Gate(g) => format!(
                "gate-{}",
                g.to_possible_value()
                    .map_or("?".into(), |v| v.get_name().to_string())
            ),
        }
    }
}

impl std::str::FromStr for Countermeasure {
    type Err = crate::Invalid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use clap::ValueEnum;
        if let Some(g) = s.strip_prefix("gate-") {
            return GateKind::from_str(g, false)
                .map(Self::Gate)
                .map_err(|_| crate::Invalid(format!("unknown gate `{g}` in `{s}`")));
        }
        if let Ok(d) = TrainingDefence::from_str(s, false)
            && !d.is_none()
        {
            return Ok(Self::Training(d));
        }
        Defence::from_str(s, false).map(Self::Repair).map_err(|_| {
            crate::Invalid(format!(
                "unknown defence `{s}`: expected fine-tuning, fine-pruning, nad, mcr, distillation, anp, gate-strip, gate-median, gate-scale-up, gate-ibd-psc, gate-shrinkpad, gate-jpeg, mixup, cutmix or abl"
            ))
        })
    }
}

/// The defences of a robustness calibration.
pub struct DefencePlan {
    /// Each model goes through each of these.
    pub list: Vec<Countermeasure>,
    /// The thief's clean data: repairs train on it, gates set their threshold on it (needed
    /// when the list has any).
    pub clean: Option<Dataset>,
    /// Repairs' settings (the defence is replaced by each of `list`'s).
    pub repair: RepairConfig,
    /// Gates flag this share of clean images, and refuse what they flag.
    pub false_flag_rate: f64,
}

/// Who follows a calibration: the CLI shows progress bars and lines.
pub trait Observer {
    /// A line for people (a model's result, what was resumed or loaded).
    fn note(&self, line: &str);
    /// Progress of the task now running: `done` of `total`, with a message.
    fn progress(&self, done: u64, total: u64, message: &str);
    /// The task now running ended.
    fn task_done(&self);
}

/// Why a calibration failed.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// Settings that cannot work.
    #[error("{0}")]
    Config(String),
    /// An earlier run in the output folder cannot be resumed.
    #[error("cannot resume: {0}; use another output folder or do not resume")]
    Resume(String),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A release could not be made.
    #[error(transparent)]
    Watermark(#[from] WatermarkError),
    /// A verification failed.
    #[error("verification: {0}")]
    Verify(#[from] crate::verify::VerifyError),
    /// The served model could not be reached.
    #[error("model endpoint: {0}")]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// A file could not be read or written, or the model server failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The plot could not be written.
    #[error("{0}: {1}")]
    Image(String, image::ImageError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CalibrateError + '_ {
    move |e| CalibrateError::Io(path.display().to_string(), e)
}

/// The settings a calibration records, and that a resumed one must match.
fn settings(plan: &Plan) -> serde_json::Value {
    let mut s = serde_json::json!({"train": plan.train.with_seed(plan.seed), "attack": format!("{:?}", plan.attack),
                                   "models": plan.models, "verify": plan.verify, "train_samples": plan.clean.len(),
                                   "test_samples": plan.test.len(), "device": format!("{:?}", plan.device)});
    match plan.attack {
        AttackKind::Blind => {
            s["blind_neural_cleanse"] = plan.attack_options.blind_neural_cleanse.into();
        }
        AttackKind::Lira => s["lira_eps"] = plan.attack_options.lira_eps.into(),
        _ => {}
    }
    if let Some(o) = &plan.other_family {
        s["other_family"] = o.name.clone().into();
    }
    if !plan.also_specs.is_empty() {
        s["also_specs"] = plan
            .also_specs
            .iter()
            .map(|a| a.name.clone())
            .collect::<Vec<_>>()
            .into();
    }
    if let Some(d) = &plan.defences {
        s["defences"] = serde_json::json!({
            "list": d.list.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "repair": d.repair, "false_flag_rate": d.false_flag_rate,
        });
        if let Some(c) = &d.clean {
            s["defences"]["clean_samples"] = c.len().into();
            s["defences"]["clean_sha256"] = c.sha256().into();
        }
    }
    s
}

/// Runs the calibration `plan`, telling `observer`; returns the whole table (also saved in the
/// output folder after every watermarked index).
pub fn run(plan: &Plan, observer: &dyn Observer) -> Result<Calibration, CalibrateError> {
    let Plan {
        spec, clean, test, ..
    } = plan;
    let out = &plan.out;
    if plan.first_index >= plan.models {
        return Err(CalibrateError::Config(format!(
            "the first index {} leaves no model to train: it must be below the number of models ({})",
            plan.first_index, plan.models
        )));
    }
    if let Some(s) = &plan.other_family
        && s.crafting().is_some()
    {
        return Err(CalibrateError::Config(format!(
            "the other family `{}` is crafted or encoded; give a poison-only spec",
            s.name
        )));
    }
    if let Some(d) = &plan.defences {
        for c in &d.list {
            let training = matches!(c, Countermeasure::Training(_));
            if training && !matches!(plan.attack, AttackKind::None | AttackKind::PhysicalBa) {
                return Err(CalibrateError::Config(format!(
                    "the training-time defence {} changes the loss, which the attack {:?} \
                     computes itself",
                    c.name(),
                    plan.attack
                )));
            }
            if !training && d.clean.is_none() {
                return Err(CalibrateError::Config(format!(
                    "the defence {} needs the thief's clean data",
                    c.name()
                )));
            }
        }
    }
    let also = &plan.also_specs;
    if !also.is_empty() {
        if plan.attack != AttackKind::None {
            return Err(CalibrateError::Config(format!(
                "a release with several triggers is calibrated with plain training, not the \
                 attack {:?}",
                plan.attack
            )));
        }
        if let Some(s) = std::iter::once(spec)
            .chain(also)
            .find(|s| s.family.is_none() || s.crafting().is_some())
        {
            return Err(CalibrateError::Config(format!(
                "`{}`: a release with several triggers needs family specs without crafting",
                s.name
            )));
        }
    }
    // Each of a release's k triggers is verified at alpha / k (Bonferroni), with the controls
    // that lets the rank test reach it.
    let per_trigger = if also.is_empty() {
        plan.verify.clone()
    } else {
        plan.verify
            .with(|f| f.alpha /= (also.len() + 1) as f64)
            .map_err(|e| CalibrateError::Config(format!("{}: {}", e.flag(), e.message)))?
    };
    let names: Vec<String> = std::iter::once(spec)
        .chain(also)
        .map(|s| s.name.clone())
        .collect();
    let secrets = out.join("secrets");
    std::fs::create_dir_all(&secrets).map_err(io(&secrets))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io(Path::new("the tokio runtime")))?;
    let settings = settings(plan);
    let json_path = out.join("calibration.json");
    let name = names.join(" + ");
    let mut cal = Calibration {
        spec: name.clone(),
        settings: settings.clone(),
        rows: Vec::new(),
    };
    if plan.resume
        && let Some(old) = Calibration::resumable(&json_path, &name, &settings)
            .map_err(|e| CalibrateError::Resume(e.0))?
    {
        cal.rows = old
            .rows
            .iter()
            .filter(|r| r.index < plan.models && old.has_index(r.index))
            .cloned()
            .collect();
        observer.note(&format!(
            "resuming: {} models of {} kept from {}",
            // Models, not rows: a model's rows after each defence are one model.
            cal.rows.iter().filter(|r| r.defence.is_none()).count(),
            (3 + usize::from(plan.other_family.is_some())) * plan.models,
            json_path.display()
        ));
    }
    let info = |cfg: &TrainConfig| ModelInfo {
        arch: cfg.arch,
        shape: clean.shape(),
        classes: clean.num_classes(),
        training: serde_json::json!({ "config": cfg }),
        pruned: Vec::new(),
    };
    // Label-consistent and gradient-matching specs are crafted against a benign model trained
    // first on the clean data (unless a resumed run has nothing left to craft).
    let benign_cfg = plan.train.with_seed(plan.seed + seeds::BENIGN);
    let benign = if spec.needs_model() && (plan.first_index..plan.models).any(|i| !cal.has_index(i))
    {
        Some(train_observed(
            &super::Run::new(clean, &benign_cfg, plan.device),
            "benign model for crafting",
            &super::Attack::None,
            observer,
        )?)
    } else {
        None
    };
    let nonce = |i: usize, which: &str| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(format!("calibrate/{}/{which}/{i}", plan.seed)).into()
    };
    let crafting = spec.crafting().map_or("crafting", |c| c.describe());
    let craft_progress = |step: usize, of: usize, loss: f64| {
        observer.progress(
            step as u64,
            of as u64,
            &format!("{crafting}, loss {loss:.4}"),
        );
    };
    let report = |r: &super::craft::issba::IssbaReport| observer.note(&r.to_string());
    let crafter = Crafter {
        device: plan.device,
        surrogate: benign.as_ref().map(|b| Surrogate {
            net: &b.net,
            vs: &b.vs,
            retrain: Some(benign_cfg.clone()),
        }),
        progress: &craft_progress,
        report: &report,
    };
    let mark = |ds: &mut Dataset, s: &WatermarkSpec, nonce: [u8; 32]| {
        let marked = watermark::mark(ds, s, nonce, 1, Some(&crafter));
        observer.task_done();
        match marked?.secret {
            watermark::Secret::One(r) => Ok::<_, CalibrateError>(*r),
            watermark::Secret::Set(_) => Err(CalibrateError::Config(
                "a release of one trigger gave a set of triggers".into(),
            )),
        }
    };
    // A release of `s` and one trigger of each of `more` (seeded as `s` is: its own seed plus
    // `offset`): its records in order, and the secret as a file holds it.
    let mark_all = |ds: &mut Dataset,
                    s: &WatermarkSpec,
                    offset: u64,
                    nonce: [u8; 32]|
     -> Result<(Vec<SecretRecord>, watermark::Secret), CalibrateError> {
        if also.is_empty() {
            let r = mark(ds, s, nonce)?;
            return Ok((vec![r.clone()], watermark::Secret::One(Box::new(r))));
        }
        let more: Vec<WatermarkSpec> = also
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a.seed = a.seed.wrapping_add(offset);
                a
            })
            .collect();
        let specs: Vec<&WatermarkSpec> = std::iter::once(s).chain(&more).collect();
        let secret = watermark::apply_trigger_specs(ds, &specs, nonce)?.secret;
        Ok((secret.records().cloned().collect(), secret))
    };
    let save = |cal: &mut Calibration| -> Result<(), CalibrateError> {
        // Rows in (index, kind) order; a resumed run may fill an index that lies before kept ones.
        cal.rows.sort_by_key(|r| (r.index, r.kind as u8));
        crate::fsutil::write_file_atomic(
            &json_path,
            &serde_json::to_vec_pretty(&cal).expect("serialising to memory"),
            0o644,
            true,
        )
        .map_err(io(&json_path))?;
        let md_path = out.join("calibration.md");
        crate::fsutil::write_file_atomic(&md_path, cal.markdown().as_bytes(), 0o644, true)
            .map_err(io(&md_path))?;
        let png = out.join("calibration.png");
        cal.plot_png(plan.verify.alpha, plan.verify.tau)
            .save(&png)
            .map_err(|e| CalibrateError::Image(png.display().to_string(), e))
    };
    let clean_cache = plan
        .clean_cache
        .as_deref()
        .map(|dir| CleanCache::new(dir, clean, plan.device))
        .transpose()?;
    let options = plan.attack_options;
    for i in plan.first_index..plan.models {
        if cal.has_index(i) {
            continue;
        }
        let secret_path = secrets.join(format!("watermarked-{i}.secret.json"));
        let mut wspec = spec.clone();
        wspec.seed = spec.seed.wrapping_add(i as u64);
        let mut marked = clean.clone();
        let (mut records, secret) =
            mark_all(&mut marked, &wspec, i as u64, nonce(i, "watermarked"))?;
        secret.save(&secret_path, true).map_err(io(&secret_path))?;
        let mut record = records.remove(0);
        // The release's other triggers (several: `also`), each with its own evaluation set.
        let extra = records;
        let mut eval = EvalSet::new(test.clone(), Some(&record))?;
        let mut extra_evals = extra
            .iter()
            .map(|r| EvalSet::new(test.clone(), Some(r)))
            .collect::<Result<Vec<_>, _>>()?;
        // Another release: of the same family, a member of its own; of a fixed spec, a random
        // trigger of the same kind.
        let mut other_spec = wspec.clone();
        other_spec.seed = spec.seed.wrapping_add(seeds::OTHER_RELEASE + i as u64);
        if spec.family.is_none() {
            other_spec.trigger = crate::verify::random_trigger(
                &spec.trigger,
                clean.shape(),
                seeds::RANDOM_TRIGGER + i as u64,
            )?;
        }
        let mut other = clean.clone();
        let (other_records, _) = mark_all(
            &mut other,
            &other_spec,
            seeds::OTHER_RELEASE + i as u64,
            nonce(i, "other"),
        )?;
        let other_record = &other_records[0];
        // A release of another family, trained plainly (poison only).
        let family_data = match &plan.other_family {
            Some(s) => {
                let mut s = s.clone();
                s.seed = s.seed.wrapping_add(seeds::OTHER_FAMILY_RELEASE + i as u64);
                let mut data = clean.clone();
                mark(&mut data, &s, nonce(i, "other-family"))?;
                Some(data)
            }
            None => None,
        };
        // Blind injects the backdoor while training on the clean data; PhysicalBA transforms the
        // poisoned samples of the release it trains on. The clean model trains plainly.
        // IAD and LIRA, too, train on the clean data and learn their own trigger.
        let blind = plan.attack == AttackKind::Blind || plan.attack.learns_trigger();
        let (marked_data, other_data) = if blind {
            (clean, clean)
        } else {
            (&marked, &other)
        };
        let mut runs = vec![
            (
                ModelKind::Watermarked,
                marked_data,
                plan.seed + seeds::WATERMARKED + i as u64,
                plan.attack.attack(Some(&record), clean.shape(), options)?,
            ),
            (
                ModelKind::Clean,
                clean,
                plan.seed + seeds::CLEAN + i as u64,
                super::Attack::None,
            ),
            (
                ModelKind::OtherTrigger,
                other_data,
                plan.seed + seeds::OTHER_TRIGGER + i as u64,
                plan.attack
                    .attack(Some(other_record), clean.shape(), options)?,
            ),
        ];
        if let Some(data) = &family_data {
            runs.push((
                ModelKind::OtherFamily,
                data,
                plan.seed + seeds::OTHER_FAMILY + i as u64,
                super::Attack::None,
            ));
        }
        for (kind, data, seed, attack) in runs {
            let cfg = plan.train.with_seed(seed);
            let label = format!("{kind:?} #{i}");
            let cached = match &clean_cache {
                Some(c) if kind == ModelKind::Clean => Some(c.dir(&cfg)),
                _ => None,
            };
            let model = match &cached {
                Some(dir) if dir.join("model.json").exists() => {
                    observer.note(&format!("{label}: loaded from {}", dir.display()));
                    LoadedModel::load(dir, plan.device)?
                }
                _ => {
                    let t = train_observed(
                        &super::Run::new(data, &cfg, plan.device),
                        &label,
                        &attack,
                        observer,
                    )?;
                    // The watermarked model's learnt trigger is the secret every model is
                    // verified with.
                    if kind == ModelKind::Watermarked
                        && let Some(g) = &t.trigger
                    {
                        record = learned_record(&record, g, attack.name());
                        record.save(&secret_path, true).map_err(io(&secret_path))?;
                        eval = EvalSet::new(test.clone(), Some(&record))?;
                    }
                    if let Some(dir) = &cached {
                        save_model(&t, &info(&cfg), dir)?;
                    }
                    LoadedModel::from_trained(t, info(&cfg), plan.device)
                }
            };
            // The defended copies first: verifying the model hands it to its server.
            let mut defended = Vec::new();
            for &c in plan.defences.iter().flat_map(|d| &d.list) {
                let d = plan.defences.as_ref().expect("iterating its list");
                let (m, gate) = match c {
                    Countermeasure::Training(td) => {
                        let cfg = TrainConfig {
                            defence: td,
                            ..cfg.clone()
                        };
                        let t = match train_observed(
                            &super::Run::new(data, &cfg, plan.device),
                            &format!("{label} {}", c.name()),
                            &attack,
                            observer,
                        ) {
                            // A defence that breaks training leaves the thief nothing to serve:
                            // no row, and the calibration goes on.
                            Err(e @ TrainError::Diverged { .. }) => {
                                observer.note(&format!("{label} with {}: {e}", c.name()));
                                continue;
                            }
                            t => t?,
                        };
                        (LoadedModel::from_trained(t, info(&cfg), plan.device), None)
                    }
                    _ => defend(&model, c, d, &label, plan.device, observer)?,
                };
                defended.push((c.name(), m, gate));
            }
            let all: Vec<&SecretRecord> = std::iter::once(&record).chain(&extra).collect();
            let mut evals: Vec<&mut EvalSet> =
                std::iter::once(&mut eval).chain(&mut extra_evals).collect();
            let mut check = |m: LoadedModel, gate: Option<Gate>| {
                // Behind a gate that transforms every query, the accuracy and ASR its users
                // get; behind a flagging gate, the model's own.
                let through = gate.as_ref().and_then(|g| g.kind.transform());
                let metrics: Vec<Metrics> = evals
                    .iter_mut()
                    .map(|e| {
                        e.through = through;
                        let m = m.evaluate(e);
                        e.through = None;
                        m
                    })
                    .collect();
                let verdicts = serve_and_verify(&rt, m, gate, &all, test, &per_trigger)?;
                let rows = metrics
                    .into_iter()
                    .zip(&verdicts)
                    .map(|(metrics, v)| Row::new(kind, i, seed, metrics, v))
                    .collect();
                Ok::<_, CalibrateError>(Row::combine(&names, rows))
            };
            let mut rows = vec![check(model, None)?];
            for (name, m, gate) in defended {
                rows.push(check(m, gate)?.defended(&name));
            }
            for row in rows {
                observer.note(&format!(
                    "{label}{}: {} → {:?} (p = {:.2e}, effect {:.4}, {} queries{})",
                    row.defence
                        .as_deref()
                        .map_or(String::new(), |d| format!(" after {d}")),
                    describe(&row.metrics),
                    row.decision,
                    row.p_value,
                    row.effect,
                    row.queries,
                    row.withheld.map_or(String::new(), |(b, t)| format!(
                        ", withheld {b} benign / {t} triggered"
                    )),
                ));
                cal.rows.push(row);
            }
        }
        save(&mut cal)?;
    }
    save(&mut cal)?;
    Ok(cal)
}

/// Trains `run` (its own progress replaced) with progress told to `observer` as "`label` epoch
/// e/E loss … img/s".
pub fn train_observed(
    run: &super::Run<'_>,
    label: &str,
    attack: &super::Attack,
    observer: &dyn Observer,
) -> Result<Trained, TrainError> {
    let cfg = run.cfg;
    let total = (cfg.epochs * run.train.len()) as u64;
    let step = |s: super::fit::Step| {
        observer.progress(
            ((s.epoch - 1) * s.of + s.images) as u64,
            total,
            &format!(
                "{label} epoch {}/{} loss {:.4} {:.0} img/s",
                s.epoch, cfg.epochs, s.loss, s.rate
            ),
        );
    };
    let t = super::train_attacked(
        &super::Run {
            progress: &step,
            ..*run
        },
        attack,
    );
    observer.task_done();
    t
}

/// Metrics in one line: benign accuracy, and the attack's success rates where measured.
pub fn describe(m: &Metrics) -> String {
    let mut s = format!("benign accuracy {:.4}", m.benign_accuracy);
    if let Some(a) = m.asr {
        s.push_str(&format!(", ASR {a:.4} (target-class images excluded)"));
    }
    if let (Some(a), Some(c), Some(d)) = (m.asr_a, m.asr_c, m.dispersibility) {
        s.push_str(&format!(", ASR-A {a:.4}, ASR-C {c:.4}, D_p {d:.4}"));
    }
    s
}

/// The attacker's record of a learnt trigger: `base` (its target, seed and dataset) with the
/// trigger replaced by `g`, learnt by the attack `attack`.
pub fn learned_record(
    base: &SecretRecord,
    g: &crate::spec::Generated,
    attack: &str,
) -> SecretRecord {
    let mut r = base.clone();
    // A learnt trigger is drawn from no family: its verdicts have no exchangeable controls.
    r.family = None;
    r.spec.trigger = crate::spec::Trigger::Generated(g.clone());
    r.spec.name = format!("{}@{attack}", base.spec.name);
    r.spec.description = Some(format!(
        "the trigger learnt by --attack {attack} while training"
    ));
    r
}

/// `model` after the countermeasure `c`: a repaired copy, or the model itself (reloaded) with a
/// gate calibrated on the defender's clean data.
fn defend(
    model: &LoadedModel,
    c: Countermeasure,
    plan: &DefencePlan,
    label: &str,
    device: Device,
    observer: &dyn Observer,
) -> Result<(LoadedModel, Option<Gate>), CalibrateError> {
    let clean = || {
        plan.clean.as_ref().ok_or_else(|| {
            CalibrateError::Config(format!("the defence {} needs clean data", c.name()))
        })
    };
    match c {
        Countermeasure::Training(_) => Err(CalibrateError::Config(format!(
            "{} is a training-time defence: the model is trained again with it",
            c.name()
        ))),
        Countermeasure::Repair(d) => {
            // Distillation's fresh student too trains at the repairs' rate: its loss, scaled by
            // T² = 16, makes the models' rate (0.05) collapse BaselineMNIST to one class.
            let cfg = RepairConfig {
                defence: d,
                ..plan.repair.clone()
            };
            let name = c.name();
            let progress = |s: super::fit::Step| {
                observer.progress(
                    s.images as u64,
                    s.of as u64,
                    &format!("{label} {name} epoch {} loss {:.4}", s.epoch, s.loss),
                );
            };
            let (t, _) = super::repair::repair(model, clean()?, &cfg, device, &progress)?;
            observer.task_done();
            Ok((
                LoadedModel::from_trained(t, model.info.clone(), device),
                None,
            ))
        }
        Countermeasure::Gate(kind) => {
            let gate =
                Gate::calibrate(kind, model, clean()?, plan.false_flag_rate, OnFlag::Refuse)?;
            Ok((model.try_clone()?, Some(gate)))
        }
    }
}

/// Serves `model` (behind `gate` when given) over the V2 protocol on a local port and verifies it
/// with each of `records` in turn, through the same HTTP path as `hallmark verify`.
fn serve_and_verify(
    rt: &tokio::runtime::Runtime,
    model: LoadedModel,
    gate: Option<Gate>,
    records: &[&SecretRecord],
    test: &Dataset,
    cfg: &VerifyConfig,
) -> Result<Vec<Verdict>, CalibrateError> {
    use crate::endpoint::{EndpointConfig, HttpEndpoint, OutputKind, Protocol};
    let local = Path::new("the local model server");
    rt.block_on(async {
        let server = ModelServer::bind_gated("127.0.0.1:0", "model", model, gate)
            .await
            .map_err(io(local))?;
        let port = server.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let mut ep = EndpointConfig::new(format!("http://127.0.0.1:{port}"), Protocol::V2, "model");
        ep.allow_private = true;
        if cfg.label_only {
            ep.output = OutputKind::Labels;
        }
        let verdict = async {
            let endpoint = HttpEndpoint::connect(ep, cfg.seed.unwrap_or(0)).await?;
            let mut verdicts = Vec::with_capacity(records.len());
            for record in records {
                verdicts.push(crate::verify::verify(&endpoint, record, test, cfg, &|_| {}).await?);
            }
            Ok::<_, CalibrateError>(verdicts)
        }
        .await;
        let _ = stop.send(());
        handle
            .await
            .map_err(|e| CalibrateError::Io(local.display().to_string(), e.into()))?
            .map_err(io(local))?;
        verdict
    })
}
