//! `hallmark serve-model` (feature `train`): a trained model over the Open Inference Protocol V2.

use crate::train::gate::{Gate, GateKind, OnFlag};
use crate::train::serve::{LoadedModel, ModelServer};
use crate::train::{self, DeviceChoice};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

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
    /// Put a gate in front of the model, as a thief who dodges verification would: `strip`
    /// flags a query whose answers stay certain when it is blended with clean images (STRIP);
    /// `median` flags one whose answer moves under 3×3 median smoothing (feature squeezing);
    /// `scale-up` flags one whose answer survives amplified pixels (SCALE-UP); `ibd-psc` flags
    /// one whose answer survives amplified last layers (IBD-PSC); these need --gate-data. `shrinkpad` (shrink and pad back) and `jpeg` (re-encode at quality 75)
    /// change every query instead.
    #[arg(long, value_enum)]
    pub gate: Option<GateKind>,
    /// Clean images that set the gate's threshold (for --false-flag-rate of them flagged).
    #[command(flatten)]
    pub gate_data: Option<GateData>,
    /// Share of clean images the gate may flag.
    #[arg(long, default_value_t = 0.05)]
    pub false_flag_rate: f64,
    /// What a flagged query gets: an HTTP 403 refusal, equal probabilities for every class, or a
    /// random class (drawn from the query's bytes, or from the model's own answer).
    #[arg(long, value_enum, default_value_t = OnFlag::Refuse)]
    pub on_flag: OnFlag,
}

/// The gate's clean images.
#[derive(Debug, Clone, clap::Args)]
#[group(required = false, multiple = true)]
pub struct GateData {
    /// Clean images (any format hallmark reads).
    #[arg(long = "gate-data", required = false)]
    pub path: PathBuf,
    /// Split of --gate-data.
    #[arg(long = "gate-split", value_parser = super::parse_split)]
    pub split: Option<crate::dataset::Split>,
    /// Keep only the first N images of --gate-data.
    #[arg(long = "gate-limit")]
    pub limit: Option<usize>,
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
    let gate = match (a.gate, &a.gate_data) {
        (None, _) => None,
        (Some(kind), _) if kind.transforms() => {
            eprintln!("gate: {kind:?}, applied to every query");
            Some(Gate::transforming(kind)?)
        }
        (Some(_), None) => bail!("--gate needs --gate-data (clean images)"),
        (Some(kind), Some(d)) => {
            let clean = super::read_first(&d.path, None, d.split, d.limit)?;
            let g = Gate::calibrate(kind, &model, &clean, a.false_flag_rate, a.on_flag)?;
            eprintln!(
                "gate: {kind:?}, threshold {:.4} (flags {:.1}% of {} clean images, {:.1}% asked), \
                 {:?} on flag",
                g.threshold,
                g.clean_flag_rate * 100.0,
                clean.len(),
                a.false_flag_rate * 100.0,
                a.on_flag
            );
            if kind == GateKind::IbdPsc {
                eprintln!("gate: amplifies the last {:?} layers", g.amplified_layers());
            }
            Some(g)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = ModelServer::bind_gated(&a.bind, &name, model, gate)
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
