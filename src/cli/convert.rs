//! `hallmark convert`: reads a dataset and writes it in another format.

use super::{InputArgs, check_writable, parse_format, read_input, write_release};
use crate::dataset::{self, Format, Layout};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

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

pub(super) fn convert_cmd(a: ConvertArgs) -> Result<()> {
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
