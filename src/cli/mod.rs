//! The command line: parses arguments into validated requests and calls the library.
//!
//! Exit codes: 0 success; 2 error (bad input, I/O). Later commands that give a verdict use 1 for
//! "not shown".

#[cfg(feature = "train")]
mod calibrate;
mod convert;
#[cfg(feature = "train")]
mod repair;
mod report;
mod serve;
#[cfg(feature = "train")]
mod serve_model;
mod spec;
#[cfg(feature = "train")]
mod train;
mod verify;
mod watermark;

pub use convert::ConvertArgs;
pub use spec::SpecCommand;
pub use verify::VerifyArgs;
pub use watermark::{Compress, WatermarkArgs};

use crate::Invalid;
use crate::dataset::{self, Format, Layout, ReleaseInfo, Split};
use crate::fsutil::AtomicDir;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
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
    /// Write a verdict as a self-contained document (HTML with plots) for readers who are not
    /// statisticians.
    Report(report::ReportArgs),
    /// Test whether a model behind an HTTP endpoint was trained on a watermarked release.
    /// Exit code 0: evidence it was; 1: not shown (or inconclusive); 2: error.
    Verify(Box<VerifyArgs>),
    /// Train a model on a dataset or release (feature `train`).
    #[cfg(feature = "train")]
    Train(Box<train::TrainArgs>),
    /// Remove a watermark from a trained model as a thief would, with a little clean data
    /// (fine-tuning, fine-pruning, NAD, MCR, distillation; feature `train`).
    #[cfg(feature = "train")]
    Repair(Box<repair::RepairArgs>),
    /// Serve a trained model over the Open Inference Protocol V2 (feature `train`).
    #[cfg(feature = "train")]
    ServeModel(serve_model::ServeModelArgs),
    /// Train watermarked and independent models, verify each over HTTP, report detection and
    /// false-positive rates (feature `train`).
    #[cfg(feature = "train")]
    Calibrate(Box<calibrate::CalibrateArgs>),
}

impl Command {
    /// Whether the command runs a server until stopped.
    pub fn is_server(&self) -> bool {
        match self {
            Self::Serve(_) => true,
            #[cfg(feature = "train")]
            Self::ServeModel(_) => true,
            _ => false,
        }
    }
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

fn parse_format(s: &str) -> Result<Format, Invalid> {
    s.parse()
}
fn parse_split(s: &str) -> Result<Split, Invalid> {
    s.parse()
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
    /// Read every image at this size, HEIGHTxWIDTH (bilinear, as torchvision's `Resize`): a
    /// dataset of mixed sizes (ImageFolder, Parquet, WebDataset) trained on at one size.
    #[arg(long, value_parser = parse_size)]
    pub resize: Option<(usize, usize)>,
}

/// `HEIGHTxWIDTH`, each side 1 to 16,384.
fn parse_size(s: &str) -> Result<(usize, usize), Invalid> {
    let bad = || Invalid(format!("{s:?}: expected HEIGHTxWIDTH, such as 32x32"));
    let (h, w) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let side = |t: &str| {
        t.trim()
            .parse::<usize>()
            .ok()
            .filter(|v| (1..=dataset::Limits::default().max_side).contains(v))
            .ok_or_else(bad)
    };
    Ok((side(h)?, side(w)?))
}

impl DataArgs {
    /// Reads the dataset (at --resize, and keeps the first --limit samples).
    pub fn load(&self) -> Result<dataset::Dataset> {
        let limits = dataset::Limits {
            resize_to: self.resize,
            ..Default::default()
        };
        let mut ds =
            dataset::read_limited(&self.data, self.format, self.split, &|| {}, &limits)?.dataset;
        if let Some((h, w)) = self.resize
            && (ds.shape().height, ds.shape().width) != (h, w)
        {
            // Arrays (IDX, CIFAR) have one size: resized here.
            ds = ds.resized(h, w)?;
        }
        if let Some(n) = self.limit
            && n < ds.len()
        {
            ds = ds.subset(&(0..n).collect::<Vec<_>>())?;
        }
        Ok(ds)
    }
}

/// The dataset at `path` (format detected when `None`), its first `limit` samples when given.
#[cfg(feature = "train")]
fn read_first(
    path: &Path,
    format: Option<Format>,
    split: Option<Split>,
    limit: Option<usize>,
) -> Result<dataset::Dataset> {
    let mut ds = dataset::read(path, format, split, &|| {})?.dataset;
    if let Some(n) = limit
        && n < ds.len()
    {
        ds = ds.subset(&(0..n).collect::<Vec<_>>())?;
    }
    Ok(ds)
}

/// Runs a parsed command line; the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let done = |r: Result<()>| r.map(|()| 0);
    match cli.command {
        Command::Verify(a) => verify::verify_cmd(*a),
        #[cfg(feature = "train")]
        Command::Train(a) => done(train::train_cmd(*a)),
        #[cfg(feature = "train")]
        Command::ServeModel(a) => done(serve_model::serve_model_cmd(a)),
        #[cfg(feature = "train")]
        Command::Repair(a) => done(repair::repair_cmd(*a)),
        #[cfg(feature = "train")]
        Command::Calibrate(a) => done(calibrate::calibrate_cmd(*a)),
        Command::Watermark(a) => done(watermark::watermark_cmd(a)),
        Command::Spec(c) => done(spec::spec_cmd(c)),
        Command::Convert(a) => done(convert::convert_cmd(a)),
        Command::Report(a) => done(report::report_cmd(a)),
        Command::Serve(a) => done(serve::serve_cmd(a)),
        Command::Keys(c) => done(serve::keys_cmd(c)),
        Command::Health(a) => done(serve::health_cmd(a)),
        Command::Openapi => {
            let cfg = crate::config::PartialConfig::default().resolve()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::http::openapi(&cfg))?
            );
            Ok(0)
        }
    }
}

/// Shows the progress of training and calibration: one bar per task, lines above it.
#[cfg(feature = "train")]
#[derive(Default)]
struct BarObserver {
    task: std::sync::Mutex<Option<Task>>,
}

/// The task under way: its bar and, without a terminal, when it last wrote to the log.
#[cfg(feature = "train")]
struct Task {
    bar: ProgressBar,
    logged: Option<std::time::Instant>,
}

/// Without a terminal, a long task (a crafting's 250 steps, a full-length training) writes its
/// progress to the log at most this often.
#[cfg(feature = "train")]
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The line a log gets for a task's progress, if one is due: the task's first message when it
/// begins, then its position once `every` has passed since the last line.
#[cfg(feature = "train")]
fn log_line(
    last: &mut Option<std::time::Instant>,
    now: std::time::Instant,
    every: Duration,
    done: u64,
    total: u64,
    message: &str,
) -> Option<String> {
    match *last {
        None => {
            *last = Some(now);
            Some(message.to_string())
        }
        Some(t) if now.duration_since(t) >= every => {
            *last = Some(now);
            Some(format!("{message} ({done}/{total})"))
        }
        Some(_) => None,
    }
}

#[cfg(feature = "train")]
impl crate::train::calibrate::Observer for BarObserver {
    fn note(&self, line: &str) {
        match &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            // A hidden bar (stderr is not a terminal: a log, CI) drops its println.
            Some(t) if !t.bar.is_hidden() => t.bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn progress(&self, done: u64, total: u64, message: &str) {
        let mut current = self.task.lock().unwrap_or_else(|e| e.into_inner());
        let task = current.get_or_insert_with(|| Task {
            bar: bar(total, ""),
            logged: None,
        });
        if task.bar.is_hidden() {
            // Without a terminal, a log still shows when each task began and, now and then,
            // how far a long one has come.
            let now = std::time::Instant::now();
            if let Some(line) = log_line(&mut task.logged, now, LOG_EVERY, done, total, message) {
                eprintln!("{line}");
            }
        }
        task.bar.set_length(total);
        task.bar.set_position(done);
        task.bar.set_message(message.to_string());
    }

    fn task_done(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.bar.finish_and_clear();
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
    let pb = if matches!(
        layout,
        Layout::Folder(_) | Layout::Parquet(_) | Layout::WebDataset(_)
    ) {
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

#[cfg(all(test, feature = "train"))]
mod tests {
    use super::log_line;
    use std::time::{Duration, Instant};

    #[test]
    fn a_log_gets_a_tasks_first_message_then_its_position_once_a_minute() {
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut last = None;
        let at = |s| t0 + Duration::from_secs(s);
        let first = log_line(
            &mut last,
            at(0),
            every,
            1,
            250,
            "gradient matching, loss 0.6",
        );
        assert_eq!(first.as_deref(), Some("gradient matching, loss 0.6"));
        // Within the minute: nothing; after it, the step reached.
        assert_eq!(log_line(&mut last, at(59), every, 40, 250, "m"), None);
        let later = log_line(
            &mut last,
            at(61),
            every,
            41,
            250,
            "gradient matching, loss 0.4",
        );
        assert_eq!(
            later.as_deref(),
            Some("gradient matching, loss 0.4 (41/250)")
        );
        // The minute counts from the last line written, not from the task's start.
        assert_eq!(log_line(&mut last, at(100), every, 60, 250, "m"), None);
        assert!(log_line(&mut last, at(121), every, 80, 250, "m").is_some());
    }
}
