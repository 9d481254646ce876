//! `hallmark report`: a verdict (the JSON `hallmark verify --report` writes, or a verification's
//! `verdict` from the service) as a self-contained document for readers who are not
//! statisticians ([`crate::report`]).

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// The document's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// One HTML file: inline CSS and SVG plots, no script, nothing fetched.
    Html,
    /// A PDF (A4, standard fonts, vector plots), written without a browser.
    Pdf,
}

/// Arguments of `hallmark report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The verdict JSON (`hallmark verify --report FILE`, or the service's verification JSON,
    /// whose `verdict` field is read).
    pub verdict: PathBuf,
    /// The document's format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
    pub format: ReportFormat,
    /// Where to write the document (replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
}

pub(super) fn report_cmd(a: ReportArgs) -> Result<()> {
    let text = std::fs::read(&a.verdict)
        .with_context(|| format!("cannot read the verdict {}", a.verdict.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not JSON", a.verdict.display()))?;
    // A verification as the service returns it holds the verdict in `verdict`.
    let verdict_value = match value.get("verdict") {
        Some(v) if value.get("decision").is_none() => v.clone(),
        _ => value,
    };
    let ctx = crate::report::Context {
        json_link: a
            .verdict
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        ..crate::report::Context::default()
    };
    let doc = match a.format {
        ReportFormat::Html => crate::report::html(&verdict_value, &ctx).map(String::into_bytes),
        ReportFormat::Pdf => crate::report::pdf(&verdict_value, &ctx),
    }
    .with_context(|| format!("cannot report {}", a.verdict.display()))?;
    crate::fsutil::write_file_atomic(&a.out, &doc, 0o644, true)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "{}: verdict {} (sha256 {})",
        a.out.display(),
        verdict_value["decision"].as_str().unwrap_or_default(),
        crate::report::verdict_sha256(&verdict_value)
    );
    Ok(())
}
