//! `hallmark serve-model` (feature `train`): a trained model over the Open Inference Protocol V2.

use crate::train::serve::{LoadedModel, ModelServer};
use crate::train::{self, DeviceChoice};
use anyhow::{Context, Result};
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
