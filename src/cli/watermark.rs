//! `hallmark watermark`: stamps a dataset and writes the release and its secret record.

use super::{InputArgs, absolute, bar, check_writable, read_input, spinner, write_release};
use crate::dataset::{self, Layout};
use crate::spec::WatermarkSpec;
use crate::watermark;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

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
    /// Also stamp one secret trigger of this other family spec (repeatable), on samples of its
    /// own: a release with triggers of two families, so that a defence that removes one may
    /// leave the other (docs/robustness.md). The secret file holds one record per trigger, the
    /// spec's first; verifying a model with k of them at alpha / k each (Bonferroni) keeps the
    /// chance of accusing an innocent at most alpha (docs/verification.md). --seed and --rate
    /// change the first spec only.
    #[arg(long)]
    pub also_spec: Vec<PathBuf>,
    /// Compression of IDX outputs.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    pub compress: Compress,
    /// Parquet, WebDataset and ImageFolder releases: a poisoned JPEG image is encoded again as JPEG at its
    /// original's quality (read from its quantisation table), but never below this one, where
    /// the shipped triggers were measured to survive (docs/formats.md).
    #[arg(long, default_value_t = dataset::encoding::MIN_JPEG_QUALITY,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub min_jpeg_quality: u8,
    /// Stream a Parquet, WebDataset or ImageFolder release shard by shard (a class folder is an
    /// ImageFolder's shard), in parallel, with flat memory whatever its size: each sample is
    /// chosen by a keyed function of the secret and its key (shard and row, WebDataset key or
    /// file path), images may be of any size (the spec must be an any-size family), untouched
    /// samples are copied without being decoded. The record is version 3;
    /// docs/formats.md#streamed-releases.
    #[arg(long)]
    pub stream: bool,
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

fn parse_nonce(s: &str) -> Result<[u8; 32], crate::Invalid> {
    let v = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    v.try_into()
        .map_err(|v: Vec<u8>| format!("{} bytes, the nonce has 32", v.len()).into())
}

/// Refuses a trigger that is not secret enough unless the publisher says it may be public.
fn check_secrecy(
    spec: &WatermarkSpec,
    num_classes: usize,
    shape: dataset::ImageShape,
    public: bool,
) -> Result<()> {
    if public {
        return Ok(());
    }
    let bits = crate::spec::family::entropy_bits(spec, num_classes, shape)?;
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

pub(super) fn watermark_cmd(a: WatermarkArgs) -> Result<()> {
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
    let also = a
        .also_spec
        .iter()
        .map(|path| {
            WatermarkSpec::from_toml_file(path)
                .with_context(|| format!("--also-spec {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    if !also.is_empty() && spec.family.is_none() {
        bail!(
            "--also-spec: the spec `{}` has no [family] section; a release with several \
             triggers needs a family for each",
            spec.name
        );
    }
    if a.stream {
        if !also.is_empty() {
            bail!("--stream stamps one trigger; --also-spec needs the in-memory release");
        }
        return watermark_stream(&a, &spec);
    }
    let mut loaded = read_input(&a.input)?;
    let ds = &loaded.dataset;
    check_secrecy(&spec, ds.num_classes(), ds.shape(), a.public_trigger)?;
    for (other, path) in also.iter().zip(&a.also_spec) {
        check_secrecy(other, ds.num_classes(), ds.shape(), a.public_trigger)
            .with_context(|| format!("--also-spec {}", path.display()))?;
    }
    let triggers = triggers + also.len();
    let nonce = a.nonce.unwrap_or_else(watermark::random_nonce);
    if let (2.., Some(crafting)) = (triggers, spec.crafting()) {
        bail!(
            "a release with {triggers} triggers (--triggers, --also-spec) needs specs without \
             crafting ([{}] crafts one trigger's poisons)",
            crafting.section()
        );
    }
    let pb = spinner("watermarking");
    let specs: Vec<&WatermarkSpec> = std::iter::repeat_n(&spec, a.triggers as usize)
        .chain(&also)
        .collect();
    #[cfg(feature = "train")]
    let marked = if !also.is_empty() {
        watermark::apply_trigger_specs(&mut loaded.dataset, &specs, nonce)
    } else {
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
    let marked = if also.is_empty() {
        watermark::mark(&mut loaded.dataset, &spec, nonce, triggers, None)
    } else {
        watermark::apply_trigger_specs(&mut loaded.dataset, &specs, nonce)
    };
    pb.finish_and_clear();
    let mut marked = marked?;
    loaded.layout.set_min_jpeg_quality(a.min_jpeg_quality);
    marked.settle(&mut loaded.layout, &mut loaded.dataset)?;
    let watermark::WatermarkedRelease {
        secret,
        image_hashes,
    } = marked;
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
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
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
    print_done(&a.secret, &info.dataset_sha256, &commitment);
    Ok(())
}

/// `hallmark watermark --stream`: a Parquet, WebDataset or ImageFolder release stamped shard by
/// shard.
fn watermark_stream(a: &WatermarkArgs, spec: &WatermarkSpec) -> Result<()> {
    if a.triggers > 1 {
        bail!(
            "--stream stamps one trigger; --triggers {} needs the in-memory release",
            a.triggers
        );
    }
    #[cfg(feature = "train")]
    if a.craft_model.is_some() {
        bail!(
            "--stream stamps sample by sample; crafted poisons (--craft-model) need the whole dataset"
        );
    }
    let pb = spinner("reading labels");
    let tick = || pb.inc(1);
    let survey = dataset::stream::survey(&a.input.input, a.input.format, a.input.split, &tick);
    pb.finish_and_clear();
    let survey = survey?;
    let shape = dataset::ImageShape {
        height: 256,
        width: 256,
        channels: survey.channels,
    };
    check_secrecy(spec, survey.class_counts.len(), shape, a.public_trigger)?;
    let nonce = a.nonce.unwrap_or_else(watermark::random_nonce);
    let dir = crate::fsutil::AtomicDir::create(&a.output, a.force)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    let pb = bar(survey.count() as u64, "watermarking");
    let tick = || pb.inc(1);
    let limits = dataset::Limits::default();
    let done = watermark::keyed::mark_stream(
        &survey,
        spec,
        nonce,
        a.min_jpeg_quality,
        dir.path(),
        &limits,
        &tick,
    );
    pb.finish_and_clear();
    let done = done?;
    let rec = &done.record;
    let keyed = rec.keyed.as_ref().expect("a streamed record is keyed");
    let commitment = rec.commitment();
    let info = watermark::keyed::stream_release_info(&survey, rec, &done.shards);
    dataset::write_release_info(dir.path(), &info)?;
    // The secret is written before the release is moved into place.
    rec.save(&a.secret, a.force)
        .with_context(|| format!("cannot write the secret record {}", a.secret.display()))?;
    dir.commit()
        .with_context(|| format!("cannot move the release into {}", a.output.display()))?;
    eprintln!(
        "watermarked {} samples in {} shards ({}): {} poisoned, {} classes, images {}×{} to {}×{}, \
         release in {}",
        info.count,
        done.shards.len(),
        spec.name,
        rec.poisoned_count(),
        info.num_classes,
        keyed.min_size[0],
        keyed.min_size[1],
        keyed.max_size[0],
        keyed.max_size[1],
        a.output.display()
    );
    print_done(&a.secret, &info.dataset_sha256, &commitment);
    Ok(())
}

/// The end of a release: where the secret is, the dataset's hash, and the commitment on stdout.
fn print_done(secret: &std::path::Path, dataset_sha256: &str, commitment: &str) {
    eprintln!(
        "secret record: {} (keep it secret; publish only the commitment)",
        secret.display()
    );
    eprintln!("dataset sha256: {dataset_sha256}");
    println!("{commitment}");
}
