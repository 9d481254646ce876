//! The command line: parses arguments into validated requests and calls the library.
//!
//! Exit codes: 0 success; 2 error (bad input, I/O). Later commands that give a verdict use 1 for
//! "not shown".

mod serve;
#[cfg(feature = "train")]
mod train;

use crate::dataset::{self, Format, Layout, ReleaseInfo, Split};
use crate::endpoint::{
    Datatype, EndpointSettings, HttpEndpoint, OutputKind, Protocol, TensorLayout,
};
use crate::fsutil::AtomicDir;
use crate::spec::WatermarkSpec;
use crate::verify::{self, Decision, VerifySettings};
use crate::watermark::{self, SecretRecord};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Secret backdoor watermarks for image datasets, and verification of suspicious models.
#[derive(Debug, Parser)]
#[command(name = "hallmark", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (SQLite by default, PostgreSQL with --database-url).
    Serve(serve::ServeArgs),
    /// Manage API keys directly in the database.
    #[command(subcommand)]
    Keys(serve::KeysCommand),
    /// Check that a running service is healthy (exit 0) or not (exit 2).
    Health(serve::HealthArgs),
    /// Print the service's OpenAPI document.
    Openapi,
    /// Stamp a dataset with a secret watermark and write the release, its manifest and the secret
    /// record; prints the public commitment on stdout.
    Watermark(WatermarkArgs),
    /// Work with watermark specs and secret records.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Read a dataset and write it in another format (with its manifest).
    Convert(ConvertArgs),
    /// Test whether a model behind an HTTP endpoint was trained on a watermarked release.
    /// Exit code 0: evidence it was; 1: not shown (or inconclusive); 2: error.
    Verify(Box<VerifyArgs>),
    /// Train a model on a dataset or release (feature `train`).
    #[cfg(feature = "train")]
    Train(Box<train::TrainArgs>),
    /// Serve a trained model over the Open Inference Protocol V2 (feature `train`).
    #[cfg(feature = "train")]
    ServeModel(train::ServeModelArgs),
    /// Train watermarked and independent models, verify each over HTTP, report detection and
    /// false-positive rates (feature `train`).
    #[cfg(feature = "train")]
    Calibrate(Box<train::CalibrateArgs>),
}

/// Where a dataset is read from.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// A folder holding one split, or the images / batch file itself.
    #[arg(long)]
    pub input: PathBuf,
    /// Input format (detected when left out).
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Which split, where the folder holds both.
    #[arg(long, value_parser = parse_split)]
    pub split: Option<Split>,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}
fn parse_split(s: &str) -> Result<Split, String> {
    s.parse()
}

/// Compression of IDX outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compress {
    /// As the input was.
    Auto,
    /// gzip.
    Gzip,
    /// Raw IDX.
    None,
}

/// Arguments of `hallmark watermark`.
#[derive(Debug, Args)]
pub struct WatermarkArgs {
    /// The watermark spec (TOML).
    #[arg(long)]
    pub spec: PathBuf,
    /// The dataset to read.
    #[command(flatten)]
    pub input: InputArgs,
    /// Release folder to write (written under a temporary name, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Secret record file to write (mode 0600); never inside the release.
    #[arg(long)]
    pub secret: PathBuf,
    /// Replace the seed of the spec.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replace the poisoning rate of the spec.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publish a trigger that is not drawn in secret from a family (a fixed spec, or a family of
    /// fewer than 12 bits): its verdicts can say at most `inconclusive`, since anyone may know
    /// or share the trigger.
    #[arg(long)]
    pub public_trigger: bool,
    /// The record's 32-byte nonce, as 64 hex digits, for a release that must be reproducible
    /// (tests, audits of the tool); drawn from the operating system when absent. The secret
    /// trigger derives from it: keep it as secret as the record.
    #[arg(long, value_parser = parse_nonce)]
    pub nonce: Option<[u8; 32]>,
    /// Stamp this many independent secret triggers of the spec's family (each on its own
    /// `rate` of the samples, disjoint), so that each verification can spend a fresh one: a
    /// verification shows its trigger to the endpoint's operator (docs/threat-model.md). The
    /// secret file then holds one record per trigger; `hallmark verify --trigger N` picks one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub triggers: u64,
    /// Compression of IDX outputs.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    pub compress: Compress,
    /// Replace existing output and secret files.
    #[arg(long)]
    pub force: bool,
    /// A benign model (`hallmark train --out DIR`) to craft poisons with, for specs with
    /// `[adversarial]` (label-consistent) or `[gradient_matching]` (Sleeper Agent, UBW-C)
    /// settings (feature `train`).
    #[cfg(feature = "train")]
    #[arg(long)]
    pub craft_model: Option<PathBuf>,
}

/// `hallmark spec …`.
#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Load and validate a spec; print what it does.
    Check {
        /// The spec file.
        file: PathBuf,
    },
    /// Recompute the commitment of a secret record (of a release with several triggers: each
    /// trigger's on stderr, the release's on stdout).
    Commitment {
        /// The secret record file.
        secret: PathBuf,
    },
}

/// Arguments of `hallmark convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The dataset to read.
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format.
    #[arg(long, value_parser = parse_format)]
    pub to: Format,
    /// Output folder.
    #[arg(long)]
    pub output: PathBuf,
    /// Gzip IDX output.
    #[arg(long)]
    pub gzip: bool,
    /// Keep only the first N samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

/// A dataset given by `--data` (any format the dataset module reads).
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// The dataset: a folder holding one split, or the images / batch file itself.
    #[arg(long)]
    pub data: PathBuf,
    /// Format of --data (detected when left out).
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Split of --data, where it holds both.
    #[arg(long, value_parser = parse_split)]
    pub split: Option<Split>,
    /// Keep only the first N samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DataArgs {
    /// Reads the dataset (and keeps the first --limit samples).
    pub fn load(&self) -> Result<dataset::Dataset> {
        let mut ds = dataset::read(&self.data, self.format, self.split, &|| {})?.dataset;
        if let Some(n) = self.limit
            && n < ds.len()
        {
            ds = ds.subset(&(0..n).collect::<Vec<_>>())?;
        }
        Ok(ds)
    }
}

/// Arguments of `hallmark verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The secret record of the watermark.
    #[arg(long)]
    pub secret: PathBuf,
    /// Which trigger of a release with several (`hallmark watermark --triggers N`) this
    /// verification spends, 1 to N. Spend each once: the endpoint sees the triggered queries.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub trigger: Option<u64>,
    /// Held-out benign images (never training images), e.g. the test split's IDX files.
    #[command(flatten)]
    pub held_out: DataArgs,
    /// Base URL of the model server (the full URL for --protocol json).
    #[arg(long, required_unless_present = "local_model", requires = "protocol")]
    pub endpoint: Option<String>,
    /// Verify a model folder written by `hallmark train` offline, in-process (feature `train`).
    #[arg(long, conflicts_with = "endpoint")]
    pub local_model: Option<PathBuf>,
    /// Wire protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Model name.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Model version.
    #[arg(long)]
    pub model_version: Option<String>,
    /// Use predicted labels only.
    #[arg(long)]
    pub label_only: bool,
    /// Query in rounds and stop as soon as the anytime-valid test decides.
    #[arg(long)]
    pub sequential: bool,
    /// Pairs of the fixed design (the most the sequential design may use): 2 to 10000, default
    /// 100.
    #[arg(long)]
    pub m: Option<usize>,
    /// Margin of the null hypothesis: in [0, 1), default 0.2.
    #[arg(long)]
    pub tau: Option<f64>,
    /// Significance level: in (0, 1), default 0.01.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Pairs per round in sequential mode: 1 to 1000, default 4.
    #[arg(long)]
    pub round: Option<usize>,
    /// Research override of the seed of the image order, the controls and their tie-breaks,
    /// which otherwise derive from the secret record (so a re-run repeats the verdict); an
    /// override is written in the verdict.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Controls drawn from the trigger's family for the rank test (default ⌈1/alpha⌉ − 1).
    #[arg(long)]
    pub controls: Option<usize>,
    /// Images each trigger is queried on in the rank test's first round (default 1; 2 spares a
    /// trigger that fails on one image, at the price of K + 1 more queries).
    #[arg(long)]
    pub first_images: Option<usize>,
    /// Where to write the full JSON report.
    #[arg(long)]
    pub report: PathBuf,
    /// Allow private, loopback and link-local endpoint addresses.
    #[arg(long)]
    pub allow_private: bool,
    /// Input tensor name (from V2 metadata when absent).
    #[arg(long)]
    pub input_name: Option<String>,
    /// Input datatype (from V2 metadata when absent, else FP32).
    #[arg(long, value_enum)]
    pub datatype: Option<Datatype>,
    /// Tensor layout (from V2 metadata when absent, else nchw).
    #[arg(long, value_enum)]
    pub layout: Option<TensorLayout>,
    /// Pixels are multiplied by this before normalisation (default 1/255).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Per-channel means subtracted after scaling (comma-separated, at most 4).
    #[arg(long, value_delimiter = ',')]
    pub mean: Vec<f64>,
    /// Per-channel standard deviations divided by (comma-separated, at most 4, positive).
    #[arg(long, value_delimiter = ',')]
    pub std: Vec<f64>,
    /// Output tensor name or key.
    #[arg(long)]
    pub output_name: Option<String>,
    /// What the output holds: auto settles logits or probabilities from the output's name or the
    /// first answer, and says which in the report (labels are implied by --label-only, and come
    /// from the arg-max of a score output where the model gives no label output).
    #[arg(long, value_enum, default_value_t = OutputKind::Auto)]
    pub output: OutputKind,
    /// Images per request, 1 to 1024, default 32 (lowered to the server's published limit, or
    /// halved when the server refuses a batch as too large).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Requests in flight at once: 1 to 64, default 4.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds before a request times out, at most 600, default 30; the first contact waits as
    /// long for a server that is still starting.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Retries after 5xx, 429, timeouts and connection errors: at most 10, default 3.
    #[arg(long)]
    pub retries: Option<u32>,
    /// --protocol json: file holding the request body with "$INSTANCES" where the batch goes.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// --protocol json: JSON pointer to the predictions in the response.
    #[arg(long)]
    pub output_pointer: Option<String>,
    /// Replace an existing report.
    #[arg(long)]
    pub force: bool,
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Verify(a) => verify_cmd(*a),
        other => run_plain(other).map(|()| 0),
    }
}

fn run_plain(command: Command) -> Result<()> {
    match command {
        Command::Verify(_) => unreachable!("handled in run"),
        #[cfg(feature = "train")]
        Command::Train(a) => train::train_cmd(*a),
        #[cfg(feature = "train")]
        Command::ServeModel(a) => train::serve_model_cmd(a),
        #[cfg(feature = "train")]
        Command::Calibrate(a) => train::calibrate_cmd(*a),
        Command::Watermark(a) => watermark_cmd(a),
        Command::Spec(SpecCommand::Check { file }) => {
            let spec = WatermarkSpec::from_toml_file(&file)?;
            println!("{}: valid", file.display());
            println!("  name       {}", spec.name);
            println!("  trigger    {}", spec.trigger.kind());
            let drawn = spec
                .family
                .as_ref()
                .is_some_and(|f| f.target == crate::spec::Choice::Drawn);
            let all_to_all = matches!(spec.labelling, crate::spec::Labelling::AllToAll { .. });
            if drawn && (spec.labelling.target().is_some() || all_to_all) {
                let kind = serde_json::to_value(spec.labelling)?;
                println!(
                    "  labelling  {}, the {} drawn for each release",
                    kind["kind"].as_str().unwrap_or_default(),
                    if all_to_all {
                        "class mapping"
                    } else {
                        "target"
                    }
                );
            } else {
                println!("  labelling  {}", serde_json::to_string(&spec.labelling)?);
            }
            println!("  rate       {}", spec.rate);
            println!("  seed       {}", spec.seed);
            if let Some(s) = spec.image {
                println!("  image      {s}");
            }
            match (&spec.family, spec.image) {
                (None, _) => println!(
                    "  family     none: a fixed, public trigger (publish with --public-trigger)"
                ),
                (Some(_), shape) => {
                    // Entropy depends on the image size; 10 classes when the spec cannot say.
                    let shape = shape.unwrap_or(crate::dataset::ImageShape {
                        height: 28,
                        width: 28,
                        channels: 1,
                    });
                    let parts = crate::spec::family::entropy(&spec, 10, shape)?;
                    let total: f64 = parts.iter().map(|e| e.bits).sum();
                    println!(
                        "  family     {total:.1} bits of secret per release ({shape} images, 10 classes){}",
                        if total < crate::spec::family::MIN_ENTROPY_BITS {
                            ": too few to publish without --public-trigger"
                        } else {
                            ""
                        }
                    );
                    for e in parts {
                        println!("    {:<28} {:.1} bits", e.parameter, e.bits);
                    }
                    if !crate::spec::family::has_exchangeable_controls(&spec) {
                        println!(
                            "    (crafted trigger: the verifier cannot draw controls of its family)"
                        );
                    }
                }
            }
            if let Some(crafting) = spec.crafting() {
                let c = crafting.describe();
                if crafting.needs_model() {
                    println!("  crafting   {c}, against a model (--craft-model DIR)");
                } else {
                    println!("  crafting   {c}, trained on the data (feature train)");
                }
            }
            println!("  sha256     {}", spec.sha256());
            Ok(())
        }
        Command::Spec(SpecCommand::Commitment { secret }) => {
            let secret = watermark::Secret::load(&secret)?;
            if let watermark::Secret::Set(set) = &secret {
                for (i, c) in set.commitments().iter().enumerate() {
                    eprintln!("trigger {}: {c}", i + 1);
                }
            }
            println!("{}", secret.commitment());
            Ok(())
        }
        Command::Convert(a) => convert_cmd(a),
        Command::Serve(a) => serve::serve_cmd(a),
        Command::Keys(c) => serve::keys_cmd(c),
        Command::Health(a) => serve::health_cmd(a),
        Command::Openapi => {
            let cfg = crate::config::PartialConfig::default().resolve()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::http::openapi(&cfg))?
            );
            Ok(())
        }
    }
}

fn spinner(msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len).with_message(msg);
    pb.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn read_input(input: &InputArgs) -> Result<dataset::Loaded> {
    let pb = spinner("reading");
    let tick = || pb.inc(1);
    let loaded = dataset::read(&input.input, input.format, input.split, &tick);
    pb.finish_and_clear();
    Ok(loaded?)
}

fn check_writable(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!("{} exists; pass --force to replace it", path.display());
    }
    Ok(())
}

fn write_release(
    ds: &dataset::Dataset,
    hashes: &[[u8; 32]],
    layout: &Layout,
    output: &Path,
    force: bool,
    commitment: Option<String>,
    before_commit: impl FnOnce() -> Result<()>,
) -> Result<ReleaseInfo> {
    let dir = AtomicDir::create(output, force)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let pb = if matches!(layout, Layout::Folder) {
        bar(ds.len() as u64, "writing")
    } else {
        spinner("writing")
    };
    let tick = || pb.inc(1);
    let info = dataset::write_release(ds, layout, dir.path(), hashes, &tick);
    pb.finish_and_clear();
    let mut info = info?;
    info.commitment = commitment;
    dataset::write_release_info(dir.path(), &info)?;
    before_commit()?;
    dir.commit()
        .with_context(|| format!("cannot move the release into {}", output.display()))?;
    Ok(info)
}

fn parse_nonce(s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    v.try_into()
        .map_err(|v: Vec<u8>| format!("{} bytes, the nonce has 32", v.len()))
}

/// Refuses a trigger that is not secret enough unless the publisher says it may be public.
fn check_secrecy(spec: &WatermarkSpec, ds: &dataset::Dataset, public: bool) -> Result<()> {
    if public {
        return Ok(());
    }
    let bits = crate::spec::family::entropy_bits(spec, ds.num_classes(), ds.shape())?;
    if spec.family.is_none() {
        bail!(
            "the spec `{}` has no [family] section: its trigger is fixed and public, so a model \
             reacting to it proves nothing about this release, and every release of the spec \
             shares it. Use a family spec (watermark_specs/), or pass --public-trigger to publish \
             it anyway (its verdicts will be at most inconclusive)",
            spec.name
        );
    }
    if bits < crate::spec::family::MIN_ENTROPY_BITS {
        bail!(
            "the spec `{}` draws only {bits:.1} bits of secret for its trigger (fewer than {}): \
             releases would share triggers too often and a thief could try them all. Let the \
             family draw more (pattern, position, target), or pass --public-trigger",
            spec.name,
            crate::spec::family::MIN_ENTROPY_BITS
        );
    }
    Ok(())
}

fn watermark_cmd(a: WatermarkArgs) -> Result<()> {
    let mut spec = WatermarkSpec::from_toml_file(&a.spec)?;
    if let Some(seed) = a.seed {
        spec.seed = seed;
    }
    if let Some(rate) = a.rate {
        spec.rate = rate;
    }
    spec.validate().context("after applying --seed / --rate")?;
    let out_abs = absolute(&a.output);
    if absolute(&a.secret).starts_with(&out_abs) {
        bail!(
            "--secret {} lies inside the release folder {}: the secret record must never be published",
            a.secret.display(),
            a.output.display()
        );
    }
    check_writable(&a.output, a.force)?;
    check_writable(&a.secret, a.force)?;

    let triggers = a.triggers as usize;
    if triggers > 1 && spec.family.is_none() {
        bail!(
            "--triggers {triggers}: a spec without a [family] section has one fixed trigger; \
             several triggers need a family to draw them from"
        );
    }
    let mut loaded = read_input(&a.input)?;
    check_secrecy(&spec, &loaded.dataset, a.public_trigger)?;
    let nonce = a.nonce.unwrap_or_else(watermark::random_nonce);
    if let (2.., Some(crafting)) = (triggers, spec.crafting()) {
        bail!(
            "--triggers {triggers}: a release with several triggers needs a spec without \
             crafting ([{}] crafts one trigger's poisons)",
            crafting.section()
        );
    }
    let pb = spinner("watermarking");
    #[cfg(feature = "train")]
    let marked = {
        if a.craft_model.is_some() && !spec.needs_model() {
            bail!(
                "--craft-model is for specs whose poisons are crafted with a model ([adversarial] \
                 or [gradient_matching] settings)"
            );
        }
        match spec.crafting() {
            None => watermark::mark(&mut loaded.dataset, &spec, nonce, triggers, None),
            Some(crafting) => {
                let device = crate::train::device(crate::train::DeviceChoice::Auto)?;
                let model = a
                    .craft_model
                    .as_deref()
                    .map(|dir| crate::train::serve::LoadedModel::load(dir, device))
                    .transpose()?;
                let progress = |step, of, loss| {
                    pb.set_message(format!(
                        "{}: step {step}/{of}, loss {loss:.4}",
                        crafting.describe()
                    ))
                };
                let report =
                    |r: &crate::train::craft::issba::IssbaReport| pb.println(r.to_string());
                let crafter = crate::train::craft::Crafter {
                    device,
                    surrogate: model.as_ref().map(|m| crate::train::craft::Surrogate {
                        net: m.net(),
                        vs: m.vs(),
                        // Retraining the surrogate (gradient matching) repeats the model's own
                        // training.
                        retrain: m.info.training.get("config").and_then(|c| {
                            serde_json::from_value::<crate::train::TrainConfig>(c.clone()).ok()
                        }),
                    }),
                    progress: &progress,
                    report: &report,
                };
                watermark::mark(&mut loaded.dataset, &spec, nonce, triggers, Some(&crafter))
            }
        }
    };
    #[cfg(not(feature = "train"))]
    let marked = watermark::mark(&mut loaded.dataset, &spec, nonce, triggers, None);
    pb.finish_and_clear();
    let watermark::WatermarkedRelease {
        secret,
        image_hashes,
    } = marked?;
    let commitment = secret.commitment();
    if let Layout::Idx { gzip, .. } = &mut loaded.layout {
        match a.compress {
            Compress::Auto => {}
            Compress::Gzip => *gzip = true,
            Compress::None => *gzip = false,
        }
    }
    // The secret is written before the release is moved into place: a release never exists
    // without its secret.
    let info = write_release(
        &loaded.dataset,
        &image_hashes,
        &loaded.layout,
        &a.output,
        a.force,
        Some(commitment.clone()),
        || {
            secret
                .save(&a.secret, a.force)
                .with_context(|| format!("cannot write the secret record {}", a.secret.display()))
        },
    )?;
    let noise: usize = secret.records().map(|r| r.noise_indices.len()).sum();
    eprintln!(
        "watermarked {} samples ({}): {} poisoned{}{}, {} classes, release in {}",
        info.count,
        spec.name,
        secret.poisoned_count(),
        if triggers > 1 {
            format!(" by {triggers} independent triggers")
        } else {
            String::new()
        },
        if noise == 0 {
            String::new()
        } else {
            format!(", {noise} noise-mode")
        },
        info.num_classes,
        a.output.display()
    );
    eprintln!(
        "secret record: {} (keep it secret; publish only the commitment)",
        a.secret.display()
    );
    eprintln!("dataset sha256: {}", info.dataset_sha256);
    println!("{commitment}");
    Ok(())
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    check_writable(&a.output, a.force)?;
    let mut loaded = read_input(&a.input)?;
    if let Some(n) = a.limit
        && n < loaded.dataset.len()
    {
        loaded.dataset = loaded.dataset.subset(&(0..n).collect::<Vec<_>>())?;
    }
    let mut layout = Layout::for_format(a.to, &loaded.dataset)?;
    if let Layout::Idx { gzip, .. } = &mut layout {
        *gzip = a.gzip;
    }
    let hashes = dataset::image_sha256s(&loaded.dataset);
    let info = write_release(
        &loaded.dataset,
        &hashes,
        &layout,
        &a.output,
        a.force,
        None,
        || Ok(()),
    )?;
    eprintln!(
        "wrote {} samples as {} to {}",
        info.count,
        info.format,
        a.output.display()
    );
    println!("{}", info.dataset_sha256);
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // Resolve symlinks of the existing part so that two spellings of one folder compare equal.
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    out.extend(rest.into_iter().rev());
    out
}

#[cfg(feature = "train")]
fn local_endpoint(dir: &Path) -> Result<Box<dyn crate::endpoint::ModelEndpoint>> {
    let model = crate::train::serve::LoadedModel::load(
        dir,
        crate::train::device(crate::train::DeviceChoice::Auto)?,
    )?;
    Ok(Box::new(crate::train::serve::LocalEndpoint::new(
        model,
        dir.display().to_string(),
    )))
}

#[cfg(not(feature = "train"))]
fn local_endpoint(_: &Path) -> Result<Box<dyn crate::endpoint::ModelEndpoint>> {
    bail!("--local-model needs hallmark built with the `train` feature")
}

/// Prints a verdict's decision, its reason and the tests behind it.
fn print_verdict(verdict: &verify::Verdict, alpha: f64) {
    let p = &verdict.primary;
    println!(
        "verdict: {}",
        match verdict.decision {
            Decision::Used =>
                "USED: evidence that the model was trained on the watermarked release",
            Decision::NotShown =>
                "NOT SHOWN: no evidence that the model was trained on the release",
            Decision::Inconclusive =>
                "INCONCLUSIVE: the model reacts to the trigger, but the trigger is not secret",
        }
    );
    println!("why:      {}", verdict.reason);
    println!("protocol: {}", verdict.protocol);
    if let Some(t) = &verdict.trigger {
        println!(
            "trigger:  {} of {} (release commitment {})",
            t.number, t.of, t.release_commitment
        );
    }
    println!("model:    {}", verdict.endpoint);
    println!(
        "margin:   {}, {} pairs: p = {:.3e} (alpha {}), effect {:.4} (lower {:.0}% bound {:.4}, margin {})",
        p.test,
        p.n,
        p.p_value,
        alpha,
        p.effect,
        100.0 * p.ci_level,
        p.ci_low,
        p.tau
    );
    if let Some(r) = &verdict.rank {
        println!(
            "rank:     secret {} of {} {} triggers{}: p = {:.3} (secret effect {:.4} on {} images)",
            r.rank,
            r.controls + 1,
            r.kind,
            if r.exchangeable {
                " of its family"
            } else {
                " (controls not drawn from a secret family)"
            },
            r.p_value,
            r.secret.effect,
            r.secret.images
        );
    }
    if let Some(d) = &verdict.dispersion {
        println!(
            "scatter:  {} answers moved, entropy {:.3} nats (needs {:.3}): {}",
            d.moved,
            d.entropy,
            d.threshold,
            if d.passed {
                "dispersed"
            } else {
                "concentrated"
            }
        );
    }
    println!(
        "queries:  {} images ({} pairs, {} for the rank test){}",
        verdict.queries,
        verdict.pairs,
        verdict.rank.as_ref().map_or(0, |r| r.queries),
        match verdict.config.seed {
            Some(s) => format!(", research seed {s}"),
            None => String::new(),
        }
    );
}

fn verify_cmd(a: VerifyArgs) -> Result<u8> {
    check_writable(&a.report, a.force)?;
    // The record and the held-out images load while the endpoint is contacted.
    let (secret, held_out) = (a.secret.clone(), a.held_out.clone());
    let number = a.trigger.map(|n| n as usize);
    type Loaded = (
        SecretRecord,
        Option<watermark::SpentTrigger>,
        dataset::Dataset,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let loading = runtime.spawn_blocking(move || -> Result<Loaded> {
        let all = watermark::Secret::load(&secret)?;
        let (record, spent) = all
            .trigger(number)
            .map_err(|m| anyhow::anyhow!("{}: {m}", secret.display()))?;
        Ok((record.clone(), spent, held_out.load()?))
    });
    // Only the retries' jitter is random; the verification itself derives from the record.
    let jitter = a.seed.unwrap_or_else(|| {
        u64::from_le_bytes(watermark::random_nonce()[..8].try_into().expect("8 bytes"))
    });
    // The same settings, ranges and defaults as the HTTP API's (`EndpointSettings`).
    let flag = |e: crate::endpoint::SettingError| anyhow::anyhow!("{}: {}", e.flag(), e.message);
    let template = match &a.template {
        Some(t) => Some(
            std::fs::read_to_string(t).with_context(|| format!("cannot read {}", t.display()))?,
        ),
        None => None,
    };
    let ep = EndpointSettings {
        version: a.model_version.clone(),
        input_name: a.input_name.clone(),
        datatype: a.datatype,
        layout: a.layout,
        scale: a.scale,
        mean: a.mean.clone(),
        std: a.std.clone(),
        output_name: a.output_name.clone(),
        output: Some(if a.label_only {
            OutputKind::Labels
        } else {
            a.output
        }),
        batch_size: a.batch_size,
        concurrency: a.concurrency,
        timeout_secs: a.timeout,
        retries: a.retries,
        template,
        output_pointer: a.output_pointer.clone(),
        ..EndpointSettings::new(
            a.endpoint.clone().unwrap_or_default(),
            a.protocol.unwrap_or(Protocol::V2),
            a.model.clone(),
        )
    }
    .into_config(a.allow_private)
    .map_err(flag)?;
    let cfg = VerifySettings {
        m: a.m,
        tau: a.tau,
        alpha: a.alpha,
        label_only: a.label_only,
        sequential: a.sequential,
        round: a.round,
        seed: a.seed,
        controls: a.controls,
        first_images: a.first_images,
    }
    .into_config()
    .map_err(flag)?;
    let pb = bar(
        (2 * cfg.m + (cfg.first_image_count() + 1) * (cfg.control_count() + 1)) as u64,
        "querying",
    );
    let local = a.local_model.clone();
    let verdict = runtime.block_on(async {
        let progress = |q: usize| pb.set_position(q as u64);
        let loaded = async {
            loading
                .await
                .map_err(|_| anyhow::anyhow!("loading the inputs panicked"))?
        };
        if let Some(dir) = local {
            let (record, spent, pool) = loaded.await?;
            let endpoint = tokio::task::spawn_blocking(move || local_endpoint(&dir))
                .await
                .map_err(|_| anyhow::anyhow!("loading the model panicked"))??;
            let mut v = verify::verify(endpoint.as_ref(), &record, &pool, &cfg, &progress).await?;
            v.trigger = spent;
            return anyhow::Ok(v);
        }
        let endpoint = HttpEndpoint::connect(ep, jitter).await;
        let (record, spent, pool) = loaded.await?;
        let mut endpoint = endpoint?;
        endpoint.set_class_names(pool.class_names().map(<[String]>::to_vec));
        let mut v = verify::verify(&endpoint, &record, &pool, &cfg, &progress).await?;
        v.trigger = spent;
        anyhow::Ok(v)
    });
    pb.finish_and_clear();
    let verdict = verdict?;
    let mut json = serde_json::to_vec_pretty(&verdict)?;
    json.push(b'\n');
    crate::fsutil::write_file_atomic(&a.report, &json, 0o644, a.force)
        .with_context(|| format!("cannot write {}", a.report.display()))?;
    print_verdict(&verdict, cfg.alpha);
    println!("report:   {}", a.report.display());
    Ok(if verdict.decision == Decision::Used {
        0
    } else {
        1
    })
}
