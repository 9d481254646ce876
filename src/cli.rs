//! The command line: parses arguments into validated requests and calls the library.
//!
//! Exit codes: 0 success; 2 error (bad input, I/O). Later commands that give a verdict use 1 for
//! "not shown".

use crate::dataset::{self, Format, Layout, ReleaseInfo, Split};
use crate::fsutil::AtomicDir;
use crate::spec::WatermarkSpec;
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
    /// Stamp a dataset with a secret watermark and write the release, its manifest and the secret
    /// record; prints the public commitment on stdout.
    Watermark(WatermarkArgs),
    /// Work with watermark specs and secret records.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Read a dataset and write it in another format (with its manifest).
    Convert(ConvertArgs),
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
    /// Compression of IDX outputs.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    pub compress: Compress,
    /// Replace existing output and secret files.
    #[arg(long)]
    pub force: bool,
}

/// `hallmark spec …`.
#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Load and validate a spec; print what it does.
    Check {
        /// The spec file.
        file: PathBuf,
    },
    /// Recompute the commitment of a secret record.
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
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Watermark(a) => watermark_cmd(a),
        Command::Spec(SpecCommand::Check { file }) => {
            let spec = WatermarkSpec::from_toml_file(&file)?;
            println!("{}: valid", file.display());
            println!("  name       {}", spec.name);
            println!("  trigger    {}", spec.trigger.kind());
            println!("  labelling  {}", serde_json::to_string(&spec.labelling)?);
            println!("  rate       {}", spec.rate);
            println!("  seed       {}", spec.seed);
            if let Some(s) = spec.image {
                println!("  image      {s}");
            }
            println!("  sha256     {}", spec.sha256());
            Ok(())
        }
        Command::Spec(SpecCommand::Commitment { secret }) => {
            let rec = SecretRecord::load(&secret)?;
            println!("{}", rec.commitment());
            Ok(())
        }
        Command::Convert(a) => convert_cmd(a),
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

    let mut loaded = read_input(&a.input)?;
    let pb = spinner("watermarking");
    let marked =
        watermark::apply_with_hashes(&mut loaded.dataset, &spec, watermark::random_nonce());
    pb.finish_and_clear();
    let watermark::Watermarked {
        record,
        image_hashes,
    } = marked?;
    let commitment = record.commitment();
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
            record
                .save(&a.secret, a.force)
                .with_context(|| format!("cannot write the secret record {}", a.secret.display()))
        },
    )?;
    eprintln!(
        "watermarked {} samples ({}): {} poisoned{}, {} classes, release in {}",
        info.count,
        spec.name,
        record.poisoned.len(),
        if record.noise_indices.is_empty() {
            String::new()
        } else {
            format!(", {} noise-mode", record.noise_indices.len())
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
    let loaded = read_input(&a.input)?;
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
